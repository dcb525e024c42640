"""``LSAConfig(prefill_batch=p)``: a batch of prompts prefilled ``p`` rows at a time into one store.

Each piece runs the model's own forward over its rows only, hands their KV to those rows of the store
sized for the whole batch, and the batch then decodes together. Checked against the same conversion
prefilling every row in one forward and against the dense model: a ragged, left-padded batch under
greedy ``generate()`` (sparse in offload mode with the exact and the fp8 mirror, evict, dense mode and a
covering budget), sliding-window ring layers, a plain buffer decoder, and a later turn (multi-turn);
that each forward sees only its piece's rows; and bad values refused with what to do.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import buffer_greedy, converted_copy, hf_greedy, no_eos
from zoo import make_model

from lsa_rewrite import KVStore, LSAConfig, StoreError
from lsa_rewrite.runtime.store import LayerSpec

pytestmark = pytest.mark.usefixtures("one_thread")

COVERING = LSAConfig(budget=4096, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=16)
SPARSE = LSAConfig(budget=128, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=16, recall_lag=2)
NEW = 40


def _prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 250, (1, length), generator=torch.Generator().manual_seed(seed))


def _left_padded(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = _prompt(n, seed + row)[0]
        mask[row, width - n:] = 1
    return ids, mask


class _ForwardBatches:
    """Batch sizes of the model's own prefill forwards over ``width`` tokens (the first decoder layer's
    input; the decode step's capture runs a two-token forward, and decode steps one token)."""

    def __init__(self, layer: torch.nn.Module, width: int):
        self.seen: list[int] = []
        self.width = width
        self.handle = layer.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        if x.shape[1] == self.width:
            self.seen.append(x.shape[0])


def _generate(model, config: LSAConfig, ids, mask):
    converted = no_eos(converted_copy(model, config))
    batches = _ForwardBatches(converted.model.layers[0], ids.shape[1])
    seq, logits = hf_greedy(converted, ids, NEW, attention_mask=mask, pad_token_id=0)
    return seq, logits, batches.seen, converted


@pytest.mark.parametrize(
    "name, config",
    [
        ("offload-exact", SPARSE),
        ("offload-fp8", dataclasses.replace(SPARSE, mirror="fp8")),
        ("evict", dataclasses.replace(SPARSE, mode="evict")),
        ("dense", dataclasses.replace(SPARSE, mode="dense")),
    ],
)
def test_row_wise_prefill_equals_the_whole_batch_prefill(name, config):
    """A ragged, left-padded batch of three prompts (longer than the pool, so selections and recalls run)
    prefilled one row and two rows at a time gives the tokens, and the logits, of one whole-batch prefill."""
    model = no_eos(make_model("llama"))
    ids, mask = _left_padded([300, 411, 352], seed=10)
    whole_seq, whole_logits, whole_batches, whole = _generate(model, config, ids, mask)
    assert whole_batches == [3]
    if name != "dense":
        assert not whole.lsa.store.all_resident and whole.lsa.store.selections >= 2
    for piece, expected in ((1, [1, 1, 1]), (2, [2, 1])):
        seq, logits, batches, converted = _generate(model, dataclasses.replace(config, prefill_batch=piece), ids, mask)
        assert batches == expected, f"prefill_batch={piece}: the model's forwards ran batches {batches}"
        assert torch.equal(seq, whole_seq), f"{name}, prefill_batch={piece}: tokens differ from the whole-batch prefill"
        diff = (logits - whole_logits).abs().max().item()
        assert diff <= 1e-4, f"{name}, prefill_batch={piece}: logits differ by {diff:.3g}"
        store, ref = converted.lsa.store, whole.lsa.store
        fp, ref_fp = converted.lsa.store.footprint(), ref.footprint()
        assert fp["dropped_chunks"] == ref_fp["dropped_chunks"] and fp["host_bytes"] == ref_fp["host_bytes"]
        for layer, ref_layer in zip(store.chunk_layers, ref.chunk_layers):
            assert torch.equal(layer.slot_chunk, ref_layer.slot_chunk), "the resident sets differ"


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_row_wise_prefill_at_a_covering_budget_equals_dense(family):
    """gemma3: sliding-window ring layers take their rows too."""
    model = no_eos(make_model(family))
    ids, mask = _left_padded([37, 58, 45], seed=20)
    dense_seq, dense_logits = hf_greedy(model, ids, NEW, attention_mask=mask, pad_token_id=0)
    seq, logits, batches, _ = _generate(model, dataclasses.replace(COVERING, prefill_batch=1), ids, mask)
    assert batches == [1, 1, 1]
    assert torch.equal(seq, dense_seq)
    diff = (logits - dense_logits).abs().max().item()
    assert diff <= 1e-4, f"logits differ from the dense model's by {diff:.3g}"


def test_plain_decoder_prefills_row_by_row_with_buffers_of_one_row():
    model = make_model("buffer")
    model.setup_caches(max_batch_size=3, max_seq_length=400)
    ids = torch.randint(3, 250, (3, 300), generator=torch.Generator().manual_seed(3))
    dense = buffer_greedy(model, ids, NEW)
    whole = buffer_greedy(converted_copy(model, dataclasses.replace(SPARSE, max_context=400)), ids, NEW)
    for config, reference in ((dataclasses.replace(COVERING, max_context=400, prefill_batch=1), dense),
                              (dataclasses.replace(SPARSE, max_context=400, prefill_batch=2), whole)):
        converted = converted_copy(model, config)
        cache_batches = []
        hook = converted.layers[0].register_forward_pre_hook(
            lambda module, args: cache_batches.append(module.attention.kv_cache.k_cache.shape[0]) if args[0].shape[1] == ids.shape[1] else None
        )
        seq, logits = buffer_greedy(converted, ids, NEW)
        hook.remove()
        assert cache_batches == ([1, 1, 1] if config.prefill_batch == 1 else [2, 1])
        assert torch.equal(seq, reference[0])
        assert (logits - reference[1]).abs().max().item() <= 1e-4
        for name, buf in converted.named_buffers():
            if name.endswith(("k_cache", "v_cache")):
                assert buf.numel() == 0, f"{name} still holds {tuple(buf.shape)} after the prefill"


def test_a_later_turn_prefills_row_by_row_over_the_history():
    """Multi-turn: each piece reads its own rows' history back from the previous store."""
    model = no_eos(make_model("llama"))
    ids, mask = _left_padded([300, 260], seed=30)
    follow = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(31))
    outs = []
    for piece in (None, 1):
        converted = no_eos(converted_copy(model, dataclasses.replace(SPARSE, prefill_batch=piece)))
        first = converted.generate(ids, attention_mask=mask, pad_token_id=0, max_new_tokens=20, do_sample=False, return_dict_in_generate=True)
        cache = getattr(first, "cache", None) or first.past_key_values
        history = torch.cat([first.sequences, follow], 1)
        kw = converted.lsa.adapter.cache_kw
        second = converted.generate(
            history, attention_mask=torch.cat([mask, torch.ones(2, 20 + 24, dtype=torch.long)], 1), pad_token_id=0,
            max_new_tokens=20, do_sample=False, return_dict_in_generate=True, output_logits=True, **{kw: cache},
        )
        outs.append((second.sequences, torch.stack(second.logits)))
    assert torch.equal(outs[0][0], outs[1][0])
    assert (outs[0][1] - outs[1][1]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "1"])
def test_bad_prefill_batch_is_refused(value):
    with pytest.raises(ValueError, match=r"prefill_batch must be None .* or an int >= 1 .*, got"):
        LSAConfig(prefill_batch=value)


def test_prefill_batch_round_trips_through_json():
    config = LSAConfig(prefill_batch=2)
    assert LSAConfig.from_json(config.to_json()) == config
    assert LSAConfig.from_dict({"_type": "LSAConfig", "_version": 1, "_data": {"budget": 0.25}}).prefill_batch is None


def test_store_refuses_kv_that_does_not_match_its_rows():
    spec = LayerSpec(layer=0, q_heads=4, kv_heads=2, head_dim=16, dtype=torch.float32)
    store = KVStore([spec], SPARSE, batch=3, capacity=512)
    kv = torch.randn(2, 2, 300, 16)
    with pytest.raises(StoreError, match="pass rows= matching"):
        store.ingest(0, kv, kv, rows=slice(0, 1))
    with pytest.raises(StoreError, match="not a non-empty range"):
        store.ingest(0, kv, kv, rows=slice(2, 4))
    with pytest.raises(StoreError, match="pass rows= matching"):
        store.ingest(0, kv, kv)  # the whole batch is 3 sequences
