"""A converted HF model under ``generate()``: greedy, sampling, eos, batches with left padding."""

from __future__ import annotations

import pytest
import torch
from helpers import converted_copy, hf_greedy, no_eos
from zoo import make_model

from lsa_rewrite import LSAConfig
from lsa_rewrite.runtime.store import StoreError

COVERING = LSAConfig(budget=4096, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=16)


def _prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 250, (1, length), generator=torch.Generator().manual_seed(seed))


def test_sampling_matches_dense_under_the_same_seed():
    model = no_eos(make_model("llama"))
    converted = no_eos(converted_copy(model, COVERING))
    ids = _prompt(30, 0)
    runs = []
    for m in (model, converted):
        torch.manual_seed(123)
        runs.append(m.generate(ids, max_new_tokens=40, do_sample=True, top_k=20, temperature=0.8))
    assert torch.equal(runs[0], runs[1])


def test_eos_stops_generation_where_the_dense_model_stops():
    model = no_eos(make_model("qwen2"))
    ids = _prompt(30, 1)
    free_run, _ = hf_greedy(model, ids, 20)
    eos = int(free_run[0, 30 + 6])  # the 7th generated token becomes the end-of-sequence token
    first = (free_run[0, 30:] == eos).nonzero()[0].item()
    converted = converted_copy(model, COVERING)
    for m in (model, converted):
        m.generation_config.eos_token_id = eos
        m.generation_config.pad_token_id = 0
    dense = model.generate(ids, max_new_tokens=20, do_sample=False)
    ours = converted.generate(ids, max_new_tokens=20, do_sample=False)
    assert ours.shape[1] == 30 + first + 1, "generation did not stop at eos"
    assert torch.equal(ours, dense)


def _left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(p.shape[1] for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - p.shape[1]:] = p[0]
        mask[row, width - p.shape[1]:] = 1
    return ids, mask


def _batch_matches_alone(family: str, config: LSAConfig):
    model = no_eos(make_model(family))
    converted = no_eos(converted_copy(model, config))
    prompts = [_prompt(37, 2), _prompt(58, 3)]
    ids, mask = _left_padded(prompts)
    new = 70
    batch_seq, batch_logits = hf_greedy(converted, ids, new, attention_mask=mask, pad_token_id=0)
    for row, p in enumerate(prompts):
        alone_seq, alone_logits = hf_greedy(converted, p, new)
        assert torch.equal(batch_seq[row, ids.shape[1]:], alone_seq[0, p.shape[1]:]), f"sequence {row} decodes differently in the batch"
        diff = (batch_logits[:, row] - alone_logits[:, 0]).abs().max().item()
        assert diff <= 1e-4, f"sequence {row}: logits differ by {diff:.3g} between batch and alone"
    # ... and the batch still matches the dense model's own batched decoding.
    dense_seq, dense_logits = hf_greedy(model, ids, new, attention_mask=mask, pad_token_id=0)
    assert torch.equal(batch_seq, dense_seq)
    assert (batch_logits - dense_logits).abs().max().item() <= 1e-4


def test_batch_with_left_padding_decodes_as_each_alone():
    _batch_matches_alone("llama", COVERING)


def test_batch_with_left_padding_sliding_window_layers():
    # gemma3: sliding-window ring layers and a full layer; 58 + 70 tokens run well past the window of 32.
    _batch_matches_alone("gemma3", COVERING)


def test_batch_sequences_choose_their_own_resident_sets():
    """Two prompts of the same length (no padding, so the sink, tail and window chunks coincide): the
    chunks each sequence holds beyond those are its own choice, and the two choices differ."""
    model = no_eos(make_model("llama"))
    config = LSAConfig(budget=0.3, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=16)
    converted = no_eos(converted_copy(model, config))
    ids = torch.cat([_prompt(420, 4), _prompt(420, 5)])
    hf_greedy(converted, ids, 40)
    store = converted.lsa.store
    assert store.selections >= 2 and not store.all_resident
    must = set(store.policy.must_keep(0, store.length)) | set(store.policy.must_keep(1, store.length))
    differ = 0
    for layer in store.chunk_layers:
        rows = [set(r) - {-1} - must for r in layer.slot_chunk.tolist()]
        assert rows[0] and rows[1], "no chunk chosen beyond sink, tail and window"
        differ += rows[0] != rows[1]
        assert 0 in set(layer.slot_chunk[0].tolist()) and 0 in set(layer.slot_chunk[1].tolist())  # the sink
    assert differ > 0, "both sequences chose the same chunks in every layer"


def test_next_generation_takes_over_the_mirror_and_retires_the_old_store():
    """A second generate() of the same shape reuses the first store's CPU mirror (no new pinning) and
    gives the tokens a fresh conversion gives; the first generation's cache then refuses to decode."""
    model = no_eos(make_model("llama"))
    config = LSAConfig(budget=0.3, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=16, max_context=512, recall_lag=3)
    converted = no_eos(converted_copy(model, config))
    first = converted(input_ids=_prompt(300, 6), use_cache=True)
    old_cache = first[converted.lsa.adapter.cache_field]
    old_store = converted.lsa.store
    mirror = old_store.chunk_layers[0].mirror_k
    assert mirror is not None and not old_store.all_resident

    ids = _prompt(280, 7)
    ours, _ = hf_greedy(converted, ids, 40)
    store = converted.lsa.store
    assert store is not old_store and store.chunk_layers[0].mirror_k is mirror
    assert store.selections >= 2
    fresh, _ = hf_greedy(no_eos(converted_copy(model, config)), ids, 40)
    assert torch.equal(ours, fresh)
    with pytest.raises(StoreError, match="retired: a newer prefill took over"):
        converted(input_ids=ours[:, -1:], **{converted.lsa.adapter.cache_kw: old_cache})
