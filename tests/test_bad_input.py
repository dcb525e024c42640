"""Bad input gives an error that says what was found and what to do, and leaves the model untouched."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import make_model

import lsa_rewrite
from lsa_rewrite import LSAConfig
from lsa_rewrite.passes import LocateError


class NoAttention(nn.Module):
    """A decoder-shaped model with no attention at all."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64))

    def forward(self, idx, input_pos):
        return self.mlp(self.emb(idx))


class UncachedAttention(nn.Module):
    """Attention over keys computed from the current tokens only: nothing to pair with a cache."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 32)
        self.qkv = nn.Linear(32, 96)
        self.out = nn.Linear(32, 64)

    def forward(self, idx, input_pos):
        q, k, v = self.qkv(self.emb(idx)).view(idx.shape[0], idx.shape[1], 3, 2, 16).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class HalfCached(nn.Module):
    """Keys come from a cache buffer, values do not: the passes cannot pair this attention."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 32)
        self.qkv = nn.Linear(32, 96)
        self.out = nn.Linear(32, 64)
        self.register_buffer("k_cache", torch.zeros(1, 2, 16, 16))

    def forward(self, idx, input_pos):
        q, k, v = self.qkv(self.emb(idx)).view(idx.shape[0], idx.shape[1], 3, 2, 16).permute(2, 0, 3, 1, 4)
        self.k_cache[:, :, input_pos] = k
        vv = v.expand(-1, -1, 16, -1)
        return self.out(F.scaled_dot_product_attention(q, self.k_cache, vv).transpose(1, 2).flatten(2))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()} | {
        f"buffer:{k}": v.clone() for k, v in model.named_buffers()
    }


def _assert_untouched(model: nn.Module, before: dict[str, torch.Tensor], forward) -> None:
    assert getattr(model, "lsa", None) is None
    assert model.forward == forward, "forward was replaced on a failed conversion"
    after = _state(model)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed on a failed conversion"


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (NoAttention(), "found no attention"),
        (UncachedAttention(), "none of them reads a KV cache"),
        (HalfCached(), "keys only"),
    ],
    ids=["no-attention", "uncached-attention", "half-cached"],
)
def test_unconvertible_models(model, message):
    model.eval()
    before, forward = _state(model), model.forward
    with pytest.raises(LocateError, match=message) as err:
        lsa_rewrite.convert(model)
    assert "lsa-rewrite" in str(err.value) or "convert" in str(err.value) or "needs" in str(err.value)
    _assert_untouched(model, before, forward)


def test_buffer_decoder_untouched_after_failure():
    model = make_model("buffer")
    model.setup_caches(max_batch_size=1, max_seq_length=64)
    before, forward = _state(model), model.forward
    with pytest.raises(ValueError, match="indexer"):
        lsa_rewrite.convert(model, LSAConfig(selector="indexer"))
    _assert_untouched(model, before, forward)


def test_training_mode_is_refused():
    model = make_model("llama").train()
    with pytest.raises(ValueError, match="eval"):
        lsa_rewrite.convert(model)
    assert getattr(model, "lsa", None) is None


@pytest.mark.parametrize("budget", [0.0, 1.5, -2, True, "all"])
def test_budget_out_of_range(budget):
    with pytest.raises(ValueError, match="budget"):
        LSAConfig(budget=budget)


@pytest.mark.parametrize("chunk_size", [0, 3, 48, -16, 2.0])
def test_chunk_size_not_power_of_two(chunk_size):
    with pytest.raises(ValueError, match="chunk_size must be a positive power of two"):
        LSAConfig(chunk_size=chunk_size)


def test_budget_too_small_for_sink_and_tail_says_what_to_change():
    """An int budget (an explicit number of resident tokens) too small for sink, tail and window, on a
    context long enough for sparse attention to matter, is refused (a fraction is raised to the minimum
    with a warning, and a short context keeps everything resident: tests/test_budgets.py)."""
    model = make_model("llama")
    converted = lsa_rewrite.convert(copy.deepcopy(model), LSAConfig(budget=32, chunk_size=16, interval=16))
    with pytest.raises(ValueError, match="raise the budget"):
        converted.generate(torch.randint(3, 250, (1, 1800)), max_new_tokens=4)
    assert converted.lsa.store is None, "a failed prefill left a store behind"


def test_converting_twice_is_refused():
    model = lsa_rewrite.convert(make_model("llama"), LSAConfig(mode="dense"))
    with pytest.raises(ValueError, match="already converted"):
        lsa_rewrite.convert(model)


def test_footprint_needs_a_converted_model_with_sequences():
    model = make_model("llama")
    with pytest.raises(ValueError, match="convert"):
        lsa_rewrite.footprint(model)
    lsa_rewrite.convert(model, LSAConfig(mode="dense"))
    with pytest.raises(ValueError, match="generate"):
        lsa_rewrite.footprint(model)


def test_right_padding_is_refused():
    model = lsa_rewrite.convert(make_model("llama"), LSAConfig(mode="dense"))
    ids = torch.randint(3, 250, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    with pytest.raises(ValueError, match="left padding"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0)
