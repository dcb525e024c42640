"""Sparse decoding under real selection, at model level: chunks leave the pool and come back.

Every run here decodes several windows with a budget well below the context, and first checks that
selection really moved chunks (dropped, and in offload mode recalled from the mirror) beyond the
always-resident sink and tail; then:

- a batch of left-padded prompts (padding a whole number of chunks, an int budget, a fixed
  ``max_context``, so each sequence's chunk grid and pool size are the same as alone) decodes as each
  prompt does alone: the same resident sets at every step, the same tokens, logits within 5e-5;
- every selector gives the same run whatever the global RNG holds (the random selector draws from
  its own seeded generator);
- sampling under ``torch.manual_seed`` is reproducible, and the selector never draws from the
  sampler's random stream;

for HF models (``generate()``) and the plain buffer decoder, in offload and evict modes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import no_eos
from selection_trace import ResidentTrace, buffer_decode, churn, replay_sampling, total_churn
from zoo import make_model

import lsa_rewrite
from lsa_rewrite import LSAConfig

pytestmark = pytest.mark.usefixtures("one_thread")

CHUNK = 16
MAX_CONTEXT = 512
NEW = 100  # 99 decode steps: the probe's selection, then 7 scheduled ones
LOGIT_TOL = 5e-5
MODES = ["offload", "evict"]
SELECTORS = ["query-aware", "recency", "random"]


def sparse_config(mode: str, selector: str = "query-aware", **overrides) -> LSAConfig:
    # 6 slots of 16 tokens for 16-25 written chunks: sink + tail + window take 4, selection fills 2.
    fields = dict(
        budget=96, chunk_size=CHUNK, interval=16, sink_tokens=16, recent_tokens=16, max_context=MAX_CONTEXT, mode=mode, selector=selector
    )
    return LSAConfig(**(fields | overrides))


def prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 250, (1, length), generator=torch.Generator().manual_seed(seed))


def left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(p.shape[1] for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - p.shape[1] :] = p[0]
        mask[row, width - p.shape[1] :] = 1
    return ids, mask


def converted(model, config: LSAConfig):
    return no_eos(lsa_rewrite.convert(copy.deepcopy(model), config))


def hf_run(model, ids, new: int, *, mask=None, **kwargs):
    """generate() with a resident-set trace: (sequences, logits [steps, B, V], trace, output)."""
    trace = ResidentTrace(model)
    extra = dict(attention_mask=mask, pad_token_id=0) if mask is not None else {}
    out = model.generate(
        ids, max_new_tokens=new, output_logits=True, output_scores=True, return_dict_in_generate=True,
        logits_processor=trace.processors(), **extra, **kwargs,
    )
    return out.sequences, torch.stack(out.logits), trace, out


def assert_selection_moved_chunks(trace: ResidentTrace, model, *, mode: str, selector: str, prompt_len: int, pads=None) -> None:
    """Selection ran several times and moved chunks other than the always-resident ones.

    ``pads``: chunks of left padding per sequence (default none).
    """
    store = model.lsa.store
    assert store.selections >= 5, f"only {store.selections} selections ran"
    dropped, came_back = total_churn(trace)
    assert dropped > 0, "no chunk ever left the pool"
    if mode == "evict":
        assert came_back == 0, "evict mode: a dropped chunk came back"
        assert lsa_rewrite.footprint(model)["dropped_chunks"] > 0
        # Evict mode never stages the prompt: the prefill keeps the first placement (sink + newest
        # chunks) and the first selection can only choose among those, so no older prompt chunk is held.
        slots = lsa_rewrite.footprint(model)["slots_per_sequence"]
        last = (prompt_len - 1) // CHUNK
        pads = pads or [0] * store.batch
        older = [c for sets in trace.sets[0].values() for b, held in enumerate(sets) for c in held if pads[b] < c <= last - slots]
        assert not older, f"evict mode held prompt chunks {sorted(set(older))} beyond its first placement: was the prompt staged?"
        assert lsa_rewrite.footprint(model)["host_bytes"] == 0
    elif selector == "recency":
        assert came_back == 0, "recency brought an old chunk back"
    else:
        assert came_back > 0, "no chunk was ever recalled after leaving the pool"
        assert store.recalled_chunks >= came_back and store.written_back_chunks > 0


# -- batch equals alone ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_hf_batch_with_left_padding_decodes_as_each_alone(family, mode):
    model = converted(make_model(family), sparse_config(mode))
    prompts = [prompt(256, 1), prompt(320, 2)]  # sequence 0 gets 64 pads: 4 whole chunks
    ids, mask = left_padded(prompts)
    batch_seq, batch_logits, batch_trace, _ = hf_run(model, ids, NEW, mask=mask)
    width = ids.shape[1]
    pads = [(width - p.shape[1]) // CHUNK for p in prompts]
    assert_selection_moved_chunks(batch_trace, model, mode=mode, selector="query-aware", prompt_len=width, pads=pads)
    width = ids.shape[1]
    for row, p in enumerate(prompts):
        alone_seq, alone_logits, alone_trace, _ = hf_run(model, p, NEW)
        shift = (width - p.shape[1]) // CHUNK
        for layer in alone_trace.sets[0]:
            assert batch_trace.sequence(layer, row, shift=shift) == alone_trace.sequence(layer, 0), (
                f"layer {layer}: sequence {row} holds other chunks in the batch than alone"
            )
        assert torch.equal(batch_seq[row, width:], alone_seq[0, p.shape[1] :]), f"sequence {row} decodes differently in the batch"
        diff = (batch_logits[:, row] - alone_logits[:, 0]).abs().max().item()
        assert diff <= LOGIT_TOL, f"sequence {row}: logits differ by {diff:.3g} between batch and alone"


@pytest.mark.parametrize("mode", MODES)
def test_buffer_batch_decodes_as_each_alone(mode):
    """The plain decoder's batch is fixed by its cache buffers: batch 2 and batch 1 are two conversions."""
    config = sparse_config(mode)
    base = make_model("buffer")
    models = {}
    for batch in (1, 2):
        m = copy.deepcopy(base)
        m.setup_caches(max_batch_size=batch, max_seq_length=MAX_CONTEXT)
        models[batch] = lsa_rewrite.convert(m, config)
    ids = torch.cat([prompt(300, 3), prompt(300, 4)])
    trace = ResidentTrace(models[2])
    batch_seq, batch_logits = buffer_decode(models[2], ids, NEW, trace=trace)
    assert_selection_moved_chunks(trace, models[2], mode=mode, selector="query-aware", prompt_len=300)
    for row in range(2):
        alone_trace = ResidentTrace(models[1])
        alone_seq, alone_logits = buffer_decode(models[1], ids[row : row + 1], NEW, trace=alone_trace)
        for layer in alone_trace.sets[0]:
            assert trace.sequence(layer, row) == alone_trace.sequence(layer, 0), f"layer {layer}: sequence {row} holds other chunks"
        assert torch.equal(batch_seq[row], alone_seq[0])
        diff = (batch_logits[:, row] - alone_logits[:, 0]).abs().max().item()
        assert diff <= LOGIT_TOL, f"sequence {row}: logits differ by {diff:.3g} between batch and alone"


# -- determinism -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("selector", SELECTORS)
def test_hf_selection_ignores_the_global_rng(selector, mode):
    """Two generations that differ only in ``torch.manual_seed`` select, and decode, identically."""
    model = converted(make_model("llama"), sparse_config(mode, selector, seed=7))
    ids = prompt(300, 5)
    runs = []
    for global_seed in (0, 1234):
        torch.manual_seed(global_seed)
        runs.append(hf_run(model, ids, NEW, do_sample=False))
    (seq_a, logits_a, trace_a, _), (seq_b, logits_b, trace_b, _) = runs
    assert_selection_moved_chunks(trace_b, model, mode=mode, selector=selector, prompt_len=ids.shape[1])
    assert trace_a.sets == trace_b.sets, "the resident sets depend on the global RNG"
    assert torch.equal(seq_a, seq_b)
    assert torch.equal(logits_a, logits_b)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("selector", SELECTORS)
def test_buffer_selection_ignores_the_global_rng(selector, mode):
    base = make_model("buffer")
    base.setup_caches(max_batch_size=1, max_seq_length=MAX_CONTEXT)
    model = lsa_rewrite.convert(base, sparse_config(mode, selector, seed=7))
    ids = prompt(300, 6)
    runs = []
    for global_seed in (0, 1234):
        torch.manual_seed(global_seed)
        trace = ResidentTrace(model)
        runs.append((*buffer_decode(model, ids, NEW, trace=trace), trace))
    (seq_a, logits_a, trace_a), (seq_b, logits_b, trace_b) = runs
    assert_selection_moved_chunks(trace_b, model, mode=mode, selector=selector, prompt_len=ids.shape[1])
    assert trace_a.sets == trace_b.sets, "the resident sets depend on the global RNG"
    assert torch.equal(seq_a, seq_b)
    assert torch.equal(logits_a, logits_b)


def test_random_selector_seed_changes_the_selection():
    """The random selector's seed is ``LSAConfig.seed``: another seed, other resident sets (so the
    determinism above is not that of a selector that ignores its generator)."""
    base = make_model("llama")
    ids = prompt(300, 5)
    sets = []
    for seed in (7, 8):
        model = converted(base, sparse_config("offload", "random", seed=seed))
        sets.append(hf_run(model, ids, 40, do_sample=False)[2].sets)
    assert sets[0] != sets[1]


# -- sampling ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_hf_sampling_is_reproducible_and_the_selector_leaves_the_sampler_rng_alone(mode):
    model = converted(make_model("llama"), sparse_config(mode, "random", seed=3))
    ids = prompt(300, 7)
    runs = []
    for _ in range(2):
        torch.manual_seed(42)
        runs.append(hf_run(model, ids, NEW, do_sample=True, top_k=20, temperature=0.8))
    (seq_a, _, trace_a, out_a), (seq_b, _, trace_b, _) = runs
    assert_selection_moved_chunks(trace_a, model, mode=mode, selector="random", prompt_len=ids.shape[1])
    assert torch.equal(seq_a, seq_b), "the same manual seed sampled different tokens"
    assert trace_a.sets == trace_b.sets
    # generate() draws one multinomial per step from the global RNG; replaying those draws on the
    # scores it sampled from gives its tokens only if nothing else drew from the global RNG.
    scores = torch.stack(out_a.scores)
    assert torch.equal(seq_a[:, ids.shape[1] :], replay_sampling(scores, 42)), "something drew from the global RNG between samples"


@pytest.mark.parametrize("mode", MODES)
def test_buffer_sampling_is_reproducible_and_the_selector_leaves_the_sampler_rng_alone(mode):
    base = make_model("buffer")
    base.setup_caches(max_batch_size=2, max_seq_length=MAX_CONTEXT)
    model = lsa_rewrite.convert(base, sparse_config(mode, "random", seed=3))
    ids = torch.cat([prompt(300, 8), prompt(300, 9)])
    runs = []
    for _ in range(2):
        torch.manual_seed(42)
        trace = ResidentTrace(model)
        runs.append((*buffer_decode(model, ids, NEW, trace=trace, sample=True, temperature=0.8), trace))
    (seq_a, logits_a, trace_a), (seq_b, _, trace_b) = runs
    assert_selection_moved_chunks(trace_a, model, mode=mode, selector="random", prompt_len=ids.shape[1])
    assert torch.equal(seq_a, seq_b), "the same manual seed sampled different tokens"
    assert trace_a.sets == trace_b.sets
    assert torch.equal(seq_a, replay_sampling(logits_a / 0.8, 42)), "something drew from the global RNG between samples"


def test_churn_counts_drops_and_returns():
    """The trace arithmetic the tests above rely on."""
    history = [frozenset(s) for s in ({0, 1, 2}, {0, 2, 3}, {0, 3, 4}, {0, 1, 4})]
    c = churn(history)
    assert c.dropped == {1, 2, 3} and c.came_back == {1}
