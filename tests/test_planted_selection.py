"""Selection quality on a model whose attention provably needs known chunks (``tests/planted.py``).

Each selector is judged by whether the needle chunks the question attends to are resident after the
selections that follow the question, and by what the model then says: the answer while a needle
chunk is resident, ``FALLBACK`` once none is.
"""

from __future__ import annotations

import copy

import pytest
import torch
from planted import FALLBACK, planted_config, planted_model
from selection_trace import ResidentTrace

import lsa_rewrite

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = 60  # 59 decode steps: the probe's selection and 4 scheduled ones


@pytest.fixture(scope="module")
def planted(one_thread):
    return planted_model(batch=2)


def run(planted, **config):
    """Generate with the planted model converted under ``planted_config(**config)``: (new tokens [B, NEW], trace)."""
    model = lsa_rewrite.convert(copy.deepcopy(planted.model), planted_config(**config))
    trace = ResidentTrace(model)
    out = model.generate(planted.input_ids, max_new_tokens=NEW, do_sample=False, logits_processor=trace.processors())
    assert model.lsa.store.selections >= 4
    return out[:, planted.input_ids.shape[1] :], trace


def held_needles(planted, trace: ResidentTrace, *, window_after_question: bool = False) -> list[list[set[int]]]:
    """Per recorded step, per sequence: the needle chunks resident in (every layer of) the pool.

    ``window_after_question``: only the steps whose resident sets were chosen with the question's
    query (the probe's selection right after the prefill, and the one before decode step 1); the
    next selection uses the query of whatever the model said, which asks for the needles only if it
    answered.
    """
    steps = trace.sets[: planted_config().interval + 1] if window_after_question else trace.sets
    out = []
    for step in steps:
        out.append([set.intersection(*(set(layer[b]) for layer in step.values())) & set(planted.needle_chunks[b]) for b in range(len(planted.needle_chunks))])
    return out


def invert_query_aware(monkeypatch) -> None:
    """Make the query-aware selector rank chunks upside down (scores negated)."""
    from lsa_rewrite.selectors import QueryAwareSelector

    original = QueryAwareSelector.scores
    monkeypatch.setattr(QueryAwareSelector, "scores", lambda self, *a, **k: -original(self, *a, **k))


def test_the_answer_needs_the_needles(planted):
    """Dense, the model answers every step; with the needle tokens replaced by filler it cannot."""
    length = planted.input_ids.shape[1]
    dense = planted.model.generate(planted.input_ids, max_new_tokens=8, do_sample=False)[:, length:]
    assert dense.tolist() == [[a] * 8 for a in planted.answers]
    blank = planted.input_ids.clone()
    for row, chunks in enumerate(planted.needle_chunks):
        for c in chunks:
            blank[row, c * planted.chunk_size : (c + 1) * planted.chunk_size] = 100  # a filler token
    without = planted.model.generate(blank, max_new_tokens=2, do_sample=False)[:, length:]
    assert (without[:, 0] == FALLBACK).all(), without


def test_query_aware_keeps_each_sequences_needles(planted):
    tokens, trace = run(planted, selector="query-aware", mode="offload")
    for step, held in enumerate(held_needles(planted, trace)):
        for b, needles in enumerate(planted.needle_chunks):
            assert held[b] == set(needles), f"step {step}, sequence {b}: needles {sorted(set(needles) - held[b])} not resident"
    for b, distractors in enumerate(planted.distractor_chunks):
        for layer in trace.sets[0].values():
            assert not layer[b] & set(distractors), f"sequence {b} holds the other question's needles {sorted(layer[b] & set(distractors))}"
    assert tokens.tolist() == [[a] * NEW for a in planted.answers]


def test_evict_mode_keeps_only_the_first_resident_set_of_the_prompt(planted):
    """Evict mode never stages the prompt: the prefill keeps the sink and the newest chunks, so needles far
    behind the tail are gone before any selection sees the question's query (the price of holding no
    host memory; offload mode above keeps them)."""
    tokens, trace = run(planted, selector="query-aware", mode="evict")
    assert all(not any(held) for held in held_needles(planted, trace)), "evict mode kept a needle chunk it never had room for"
    assert lsa_rewrite.footprint(trace.model)["host_bytes"] == 0
    assert (tokens[:, 0] == torch.tensor(planted.answers)).all()  # from the dense prefill
    assert (tokens[:, 1] == FALLBACK).all(), "the model answered without its needles"


def test_recency_loses_needles_far_back(planted):
    tokens, trace = run(planted, selector="recency")
    assert all(not any(held) for held in held_needles(planted, trace)), "recency kept a needle chunk far behind the tail"
    assert (tokens[:, 0] == torch.tensor(planted.answers)).all()  # from the dense prefill
    assert (tokens[:, 1] == FALLBACK).all(), "the model answered without its needles"


def test_random_keeps_needles_only_by_chance(planted):
    # 6 free slots for ~27 candidate chunks: each needle chunk is held about 1 time in 4.
    held_counts = []
    for seed in (0, 1):
        _, trace = run(planted, selector="random", seed=seed)
        held_counts += [len(h) for step in held_needles(planted, trace) for h in step]
    rate = sum(held_counts) / (2 * len(held_counts))
    assert rate < 0.5, f"random held the needles {rate:.0%} of the time"
    assert 0 in held_counts, "random always held a needle chunk"


def test_inverted_scores_lose_the_needles(planted, monkeypatch):
    """The test above is not satisfied by any ranking: the same selector upside down keeps none."""
    invert_query_aware(monkeypatch)
    tokens, trace = run(planted, selector="query-aware")
    assert all(not any(held) for held in held_needles(planted, trace, window_after_question=True)), "inverted scores kept a needle"
    assert (tokens[:, 1] == FALLBACK).all()
