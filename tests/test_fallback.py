"""The needle fallback (``LSAConfig.fallback_budget``): when more chunks pass the indexer's threshold
than the budget holds, a selection widens up to a ceiling; the pool is sized for it and footprint()
counts it (issue 11, item 6)."""

from __future__ import annotations

import copy

import pytest
import torch
from zoo import make_model

import lsa_rewrite
from lsa_rewrite import LSAConfig
from lsa_rewrite.indexer.from_model import indexer_from_model
from lsa_rewrite.runtime.policy import SelectionPolicy

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = LSAConfig(budget=96, fallback_budget=192, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=16, recall_lag=0, selector="indexer")


class _Scores:
    """Fixed scores and a threshold: exercises the policy alone (the real selectors have their own tests)."""

    name = "fixed"
    threshold_score = 0.0

    def __init__(self, scores: torch.Tensor):
        self.fixed = scores

    def scores(self, layers, window):
        return self.fixed


def _policy(scores: torch.Tensor) -> SelectionPolicy:
    return SelectionPolicy(CFG, _Scores(scores), batch=1, slots=12, base_slots=6, num_chunks=40, capacity=640, valid_start=[0], device=torch.device("cpu"))


def test_a_selection_widens_to_the_chunks_above_the_threshold_up_to_the_ceiling():
    pos = 600  # 38 chunks written; must-keep: sink chunk 0, tail 36-37, window 37-38 -> 4 chunks
    available = torch.ones(1, 1, 40, dtype=torch.bool)
    below = torch.linspace(-5, -1, 40).view(1, 1, 40)
    policy = _policy(below)
    chosen = policy.choose([None], available, pos)
    assert int((chosen >= 0).sum()) == 6 and int(policy.widened) == 0  # nothing passes: the budget

    some = below.clone()
    some[..., 5:9] = 1.0  # 4 pass + 4 must-keep = 8 > 6: widened to 8
    policy = _policy(some)
    chosen = policy.choose([None], available, pos)
    kept = set(chosen[chosen >= 0].tolist())
    assert len(kept) == 8 and {5, 6, 7, 8} <= kept and int(policy.widened) == 1

    many = below.clone()
    many[..., 2:30] = 1.0  # 28 pass: capped at the ceiling of 12
    policy = _policy(many)
    chosen = policy.choose([None], available, pos)
    assert int((chosen >= 0).sum()) == 12 and int(policy.widened) == 1


def test_the_pool_is_sized_for_the_ceiling_and_footprint_counts_it():
    base = make_model("llama")
    indexer = indexer_from_model(base, CFG)
    plain = lsa_rewrite.convert(copy.deepcopy(base), LSAConfig(**{**CFG.to_dict()["_data"], "fallback_budget": None}), indexer=indexer)
    widened = lsa_rewrite.convert(copy.deepcopy(base), CFG, indexer=indexer)
    ids = torch.randint(3, 250, (1, 400), generator=torch.Generator().manual_seed(0))
    for m in (plain, widened):
        m.generate(ids, max_new_tokens=20, do_sample=False)
    fp_plain, fp = lsa_rewrite.footprint(plain), lsa_rewrite.footprint(widened)
    assert fp["base_slots_per_sequence"] == fp_plain["slots_per_sequence"] == 6
    assert fp["slots_per_sequence"] == 12 and fp["resident_kv_bytes"] > fp_plain["resident_kv_bytes"]
    assert fp["widened"] >= 0 and fp_plain["widened"] == 0
    store = widened.lsa.store
    for layer in store.chunk_layers:  # every selection kept at most the ceiling, at least the budget
        held = int((layer.chunk_slot >= 0).sum())
        assert 6 <= held <= 12


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(budget=96, fallback_budget=192, selector="query-aware"), "needs selector='indexer'"),
        (dict(budget=192, fallback_budget=96, selector="indexer"), "must be >= budget"),
        (dict(budget=0.1, fallback_budget=256, selector="indexer"), "same kind as budget"),
        (dict(budget=0.1, fallback_budget=1.5, selector="indexer"), "fallback_budget"),
    ],
)
def test_bad_fallback_budgets_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LSAConfig(**kwargs)
