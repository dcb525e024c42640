"""Sparse decoding with a budget: footprint accounting, the offload mirror, evict mode."""

from __future__ import annotations

import pytest
import torch
from helpers import converted_copy, hf_greedy, no_eos
from transformers import DynamicCache
from zoo import make_model

import lsa_rewrite
from lsa_rewrite import LSAConfig

CHUNK = 16
PROMPT, NEW = 1024, 64


def _config(mode: str, budget: float = 0.25) -> LSAConfig:
    return LSAConfig(budget=budget, chunk_size=CHUNK, interval=16, sink_tokens=16, recent_tokens=32, mode=mode)


@pytest.fixture(scope="module")
def llama():
    return no_eos(make_model("llama"))


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(3, 250, (2, PROMPT), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("mode", ["offload", "evict"])
def test_budget_quarter_footprint_and_accounting(llama, prompt, mode):
    converted = no_eos(converted_copy(llama, _config(mode)))
    seq, logits = hf_greedy(converted, prompt, NEW)
    fp = lsa_rewrite.footprint(converted)
    store = converted.lsa.store
    kv_chunk_bytes = sum(2 * CHUNK * s.kv_heads * s.head_dim * 4 for s in converted.lsa.sites)
    slack = store.batch * kv_chunk_bytes / fp["dense_kv_bytes"]
    assert fp["tokens"] == PROMPT + NEW - 1 >= 1024
    assert fp["ratio"] <= 0.25 + slack, fp
    assert fp["ratio"] > 0.1, "the pool is far below its budget"
    # The accounting is every tensor the store holds on the device: what the graph is fed, plus the
    # manager's state (planned tables, availability map, counters), which the graph never sees.
    program = converted.lsa.program(store.batch)
    fed = [store.tensor(layer, name) for layer, name in program.store_keys]
    held = store.device_tensors()
    assert fp["resident_kv_bytes"] == sum(t.numel() * t.element_size() for t in held)
    assert {id(t) for t in fed} <= {id(t) for t in held}
    manager = [t for t in held if id(t) not in {id(f) for f in fed}]
    planned = sum(layer.planned.numel() * 8 + layer.available.numel() for layer in store.chunk_layers)
    assert planned <= sum(t.numel() * t.element_size() for t in manager) <= planned + 64 * (len(store.chunk_layers) + store.batch)
    dense_bytes = store.batch * fp["tokens"] * sum(2 * s.kv_heads * s.head_dim * 4 for s in converted.lsa.sites)
    assert fp["dense_kv_bytes"] == dense_bytes
    assert fp["selections"] >= 3
    assert torch.isfinite(logits).all()
    if mode == "offload":
        assert fp["mirror_bytes"] > 0 and fp["dropped_chunks"] == 0
    else:
        assert fp["mirror_bytes"] == 0, "evict mode still holds a host copy"
        assert fp["dropped_chunks"] > 0, "evict mode reports nothing dropped"


def test_offload_mirror_holds_the_exact_history(llama, prompt):
    """The prompt KV in the mirror is bit-identical to the dense model's cache; recalled chunks match it."""
    converted = no_eos(converted_copy(llama, _config("offload")))
    hf_greedy(converted, prompt, NEW)
    store = converted.lsa.store
    dense_cache = DynamicCache(config=llama.config)
    kw = converted.lsa.adapter.cache_kw
    with torch.no_grad():
        llama(input_ids=prompt, use_cache=True, **{kw: dense_cache})
    full_chunks = PROMPT // CHUNK
    for site in converted.lsa.sites:
        layer = store.layers[site.layer]
        mirror_k = layer.mirror_k[:, :full_chunks].flatten(1, 2)  # [B, T, Hkv, D]
        mirror_v = layer.mirror_v[:, :full_chunks].flatten(1, 2)
        assert torch.equal(mirror_k, dense_cache.layers[site.layer].keys.transpose(1, 2))
        assert torch.equal(mirror_v, dense_cache.layers[site.layer].values.transpose(1, 2))
        # every resident chunk that was recalled from the mirror is bit-identical to it
        sink_chunks = -(-store.config.sink_tokens // CHUNK)
        tail_start = (PROMPT - store.config.recent_tokens) // CHUNK  # the first placement holds the prompt's tail
        recalled = 0
        for b in range(store.batch):
            for slot, chunk in enumerate(layer.host_slot_chunk[b]):
                if 0 <= chunk < full_chunks:
                    row = b * store.slots + slot
                    assert torch.equal(layer.k_pool[row], layer.mirror_k[b, chunk])
                    assert torch.equal(layer.v_pool[row], layer.mirror_v[b, chunk])
                    recalled += sink_chunks <= chunk < tail_start  # neither sink nor first-placed tail: recalled
        assert recalled > 0, "no chunk outside the sink and the prompt's tail is resident: nothing recalled was checked"


def test_query_aware_keeps_what_attention_needs(llama, prompt):
    """Same budget: the query-aware selector stays closer to dense than recency and random do."""
    dense_seq, dense_logits = hf_greedy(llama, prompt[:1], NEW)
    errors = {}
    for selector in ("query-aware", "recency", "random"):
        config = LSAConfig(budget=0.25, chunk_size=CHUNK, interval=16, sink_tokens=16, recent_tokens=32, selector=selector)
        converted = no_eos(converted_copy(llama, config))
        # Teacher-forced on the dense tokens, so every selector is scored on the same sequence.
        out = converted(input_ids=prompt[:1], use_cache=True)
        cache = out[converted.lsa.adapter.cache_field]
        step_logits = []
        for t in range(NEW - 1):
            token = dense_seq[:, PROMPT + t : PROMPT + t + 1]
            step_logits.append(converted(input_ids=token, **{converted.lsa.adapter.cache_kw: cache}).logits[:, -1])
        errors[selector] = (torch.stack(step_logits) - dense_logits[1:]).abs().mean().item()
    assert errors["query-aware"] < errors["recency"], errors
    assert errors["query-aware"] < errors["random"], errors


def test_first_selection_uses_the_last_prompt_tokens_queries(llama, prompt):
    """Right after the prefill, the first resident set is chosen with real queries, and the probe
    that produced them leaves the prefill's K/V and chunk bounds exactly as they were."""
    converted = no_eos(converted_copy(llama, _config("offload")))
    kw = converted.lsa.adapter.cache_kw
    dense_cache = DynamicCache(config=llama.config)
    with torch.no_grad():
        llama(input_ids=prompt, use_cache=True, **{kw: dense_cache})
        out = converted(input_ids=prompt, use_cache=True)
    store = out[converted.lsa.adapter.cache_field].store
    assert store.selections == 1 and store.steps == 0
    last = (PROMPT - 1) // CHUNK
    for site in converted.lsa.sites:
        layer = store.layers[site.layer]
        assert layer.q_tap.abs().sum() > 0, "the probe did not record queries"
        keys = dense_cache.layers[site.layer].keys.transpose(1, 2)  # [B, T, Hkv, D]
        for b in range(store.batch):
            row = b * store.slots + layer.host_slot_chunk[b].index(last)
            assert torch.equal(layer.k_pool[row], keys[b, last * CHUNK:(last + 1) * CHUNK])
            chunk_keys = keys[b, last * CHUNK:(last + 1) * CHUNK]
            assert torch.equal(layer.kmin[b, last], chunk_keys.amin(0))
            assert torch.equal(layer.kmax[b, last], chunk_keys.amax(0))
