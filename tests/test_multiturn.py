"""Multi-turn over the lossless mirror: HF's cache-reuse pattern on a converted model (issue 12).

``out = model.generate(ids, return_dict_in_generate=True)``, then
``model.generate(torch.cat([out.sequences, next_turn], 1), cache=out.cache)``: only the new tokens are
prefilled, attending exactly to the whole history (read back from the store's pool and CPU mirror), into
a store sized for the longer conversation; the cache object the caller holds keeps working.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from helpers import converted_copy, no_eos
from zoo import make_model

import lsa_rewrite
from lsa_rewrite import LSAConfig
from lsa_rewrite.hf_cache import LSACache
from lsa_rewrite.runtime.store import StoreError

pytestmark = pytest.mark.usefixtures("one_thread")

COVERING = LSAConfig(budget=4096, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=16)
SPARSE = LSAConfig(budget=96, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=16, recall_lag=0)


def _tokens(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 250, (1, length), generator=torch.Generator().manual_seed(seed))


def _cache_kw(model) -> str:
    """``cache`` in newer transformers, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _turns(model, prompt: torch.Tensor, follow_ups: list[torch.Tensor], new_tokens: list[int]):
    """Generate turn after turn, each reusing the cache of the last; returns [(sequences, logits [B, steps, V], cache)]."""
    kw = _cache_kw(model)
    out = model.generate(prompt, max_new_tokens=new_tokens[0], do_sample=False, return_dict_in_generate=True, output_logits=True)
    turns = [(out.sequences, torch.stack(out.logits, 1), _cache_of(out))]
    for ids, n in zip(follow_ups, new_tokens[1:]):
        history, _, cache = turns[-1]
        out = model.generate(
            torch.cat([history, ids], 1), max_new_tokens=n, do_sample=False, return_dict_in_generate=True, output_logits=True, **{kw: cache}
        )
        turns.append((out.sequences, torch.stack(out.logits, 1), _cache_of(out)))
    return turns


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2"])
def test_three_turns_at_a_covering_budget_equal_dense(family):
    model = no_eos(make_model(family))
    converted = no_eos(converted_copy(model, COVERING))
    follow_ups, steps = [_tokens(23, 1), _tokens(9, 2)], [12, 10, 8]
    dense = _turns(model, _tokens(70, 0), follow_ups, steps)
    ours = _turns(converted, _tokens(70, 0), follow_ups, steps)
    for (d_seq, d_logits, _), (o_seq, o_logits, cache) in zip(dense, ours):
        assert torch.equal(d_seq, o_seq)
        torch.testing.assert_close(o_logits, d_logits, atol=1e-4, rtol=0)
        assert isinstance(cache, LSACache)
    # The caller's cache object is the same one across turns, now over a store holding the whole conversation.
    assert ours[0][2] is ours[1][2] is ours[2][2]
    assert ours[2][2].store is converted.lsa.store and converted.lsa.store.length == ours[2][0].shape[1] - 1


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_later_turn_attends_exactly_to_the_history_under_a_sparse_budget(family):
    """Turn 1 keeps only its prompt in the store (one new token, never fed back): every history token's KV
    is the dense prefill's, so the new tokens' prefill logits must equal a dense forward over the whole
    sequence, although the device holds only the budget."""
    model = no_eos(make_model(family))
    converted = no_eos(converted_copy(model, SPARSE))
    prompt, follow_up = _tokens(200, 3), _tokens(30, 4)
    kw = _cache_kw(converted)
    first = converted.generate(prompt, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
    history = first.sequences
    cache = _cache_of(first)
    old_store = cache.store
    assert old_store.slots < old_store.num_chunks  # sparse: the pool holds less than the history
    with torch.no_grad():
        # The generated token (position 200) was never fed back: it goes in with the new turn.
        new = torch.cat([history[:, 200:], follow_up], 1)
        ours = converted(input_ids=new, position_ids=torch.arange(200, 231).view(1, -1), use_cache=True, **{kw: cache}).logits
        dense = model(input_ids=torch.cat([history, follow_up], 1)).logits[:, -31:]
    torch.testing.assert_close(ours, dense, atol=1e-4, rtol=0)
    store = converted.lsa.store
    assert cache.store is store and store is not old_store and old_store.retired
    assert store.length == 231 and store.slots < store.num_chunks
    fp = lsa_rewrite.footprint(converted)
    assert fp["tokens"] == 231 and fp["mirror_bytes"] > 0 and fp["ratio"] < 1.0
    # Decoding goes on from the new store, sparse.
    step = converted(input_ids=ours[:, -1:].argmax(-1), use_cache=True, **{kw: cache})
    assert step.logits.shape[:2] == (1, 1) and store.length == 232


def test_a_sparse_conversation_keeps_going_and_selects_for_the_new_question():
    model = no_eos(make_model("llama"))
    converted = no_eos(converted_copy(model, SPARSE))
    turns = _turns(converted, _tokens(180, 5), [_tokens(25, 6), _tokens(25, 7)], [20, 20, 20])
    store = converted.lsa.store
    assert store.length == turns[-1][0].shape[1] - 1 and store.selections >= 2
    assert lsa_rewrite.footprint(converted)["ratio"] < 1.0


def test_a_retired_cache_or_a_changed_batch_is_refused():
    model = no_eos(make_model("llama"))
    converted = no_eos(converted_copy(model, COVERING))
    kw = _cache_kw(converted)
    first = converted.generate(_tokens(40, 8), max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    cache = _cache_of(first)
    old = cache.store
    second = converted.generate(
        torch.cat([first.sequences, _tokens(5, 9)], 1), max_new_tokens=4, do_sample=False, return_dict_in_generate=True, **{kw: cache}
    )
    assert old.retired and cache.store is not old
    stale = LSACache(old, converted.config.num_hidden_layers)
    with pytest.raises(StoreError, match="can no longer be continued"):
        converted(input_ids=_tokens(3, 10), use_cache=True, **{kw: stale})
    with pytest.raises(ValueError, match="batch of 1"):
        converted(input_ids=torch.cat([_tokens(3, 10)] * 2), use_cache=True, **{kw: cache})
    with pytest.raises(ValueError, match="attention_mask must cover the whole conversation"):
        converted(input_ids=_tokens(3, 10), attention_mask=torch.ones(1, 3, dtype=torch.long), use_cache=True, **{kw: cache})
    # The refusals changed nothing: the conversation goes on.
    held = cache.store.length
    third = converted.generate(
        torch.cat([second.sequences, _tokens(4, 11)], 1), max_new_tokens=3, do_sample=False, return_dict_in_generate=True, **{kw: cache}
    )
    assert cache.store.length == held + 1 + 4 + 3 - 1 and third.sequences.shape[1] == second.sequences.shape[1] + 4 + 3


def test_evict_mode_refuses_a_later_turn_once_chunks_are_gone():
    model = no_eos(make_model("llama"))
    converted = no_eos(converted_copy(model, LSAConfig(budget=96, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=16, mode="evict")))
    kw = _cache_kw(converted)
    first = converted.generate(_tokens(200, 12), max_new_tokens=20, do_sample=False, return_dict_in_generate=True)
    cache = _cache_of(first)
    assert lsa_rewrite.footprint(converted)["dropped_chunks"] > 0
    with pytest.raises(StoreError, match="mode='offload'"):
        converted.generate(torch.cat([first.sequences, _tokens(5, 13)], 1), max_new_tokens=3, do_sample=False, **{kw: cache})
    # The failed turn left the first turn's store in place.
    assert cache.store is converted.lsa.store and not cache.store.retired
