"""Decoder families convert() refuses: the error names the feature and says what to do, and the model
is left exactly as it was (same weights and buffers, same forward, and it generates the same tokens).

The HF families are ``zoo.REFUSED`` (tiny configs showing each feature: ALiBi, multi-head latent
attention, differential attention, attention sinks, chunked attention, cross-layer KV sharing, linear
attention / state-space / convolution layers). The plain-PyTorch decoders below show the graph-level
check behind the ALiBi refusal: whatever the config says, a term added to attention scores that is not
a mask (0 or very negative) is refused, and a real float mask is not. Last, a family that traces only over
a DynamicCache (``zoo.DYNAMIC_CAPTURE_ONLY``) is told to use ``capture_cache="dynamic"``, and then converts.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from helpers import hf_greedy, no_eos
from zoo import DYNAMIC_CAPTURE_ONLY, REFUSED, make_refused

import lsa_rewrite
from lsa_rewrite import LSAConfig
from lsa_rewrite.passes import CaptureError, LocateError

NEW = 6


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()} | {
        f"buffer:{k}": v.detach().clone() for k, v in model.named_buffers()
    }


def _assert_untouched(model: nn.Module, before: dict[str, torch.Tensor], forward) -> None:
    assert getattr(model, "lsa", None) is None, "a refused model carries an LSA session"
    assert model.forward == forward, "forward was replaced on a refused conversion"
    after = _state(model)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), f"{key} changed on a refused conversion"


def _generate(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.generation_config.eos_token_id = None
    return model.generate(ids, max_new_tokens=NEW, do_sample=False)


@pytest.mark.parametrize("family", list(REFUSED))
def test_refused_family_says_why_and_is_left_as_it_was(family):
    model = make_refused(family)
    ids = torch.randint(3, 250, (1, 24), generator=torch.Generator().manual_seed(0))
    tokens = _generate(model, ids)
    before, forward = _state(model), model.forward
    with pytest.raises(ValueError) as err:
        lsa_rewrite.convert(model, LSAConfig(chunk_size=16))
    message = str(err.value)
    assert REFUSED[family][1] in message, message
    assert "run it unconverted" in message or "run them unconverted" in message, message
    _assert_untouched(model, before, forward)
    assert torch.equal(_generate(model, ids), tokens), "the refused model no longer generates as before"


def _alibi_slopes(heads: int) -> torch.Tensor:
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)])


class BiasedDecoder(nn.Module):
    """One attention layer over a module-buffer KV cache whose SDPA mask carries a per-head position bias
    (ALiBi) on top of the causal mask, or (``bias=False``) the causal mask alone as a float 0 / -inf
    tensor; ``eager=True`` adds it to matmul scores instead of passing it to SDPA."""

    def __init__(self, *, bias: bool, eager: bool = False, heads: int = 2, dim: int = 16, length: int = 64):
        super().__init__()
        self.heads, self.dim, self.bias, self.eager = heads, dim, bias, eager
        self.emb = nn.Embedding(64, heads * dim)
        self.qkv = nn.Linear(heads * dim, 3 * heads * dim)
        self.out = nn.Linear(heads * dim, 64)
        self.register_buffer("k_cache", torch.zeros(1, heads, length, dim))
        self.register_buffer("v_cache", torch.zeros(1, heads, length, dim))
        self.register_buffer("slopes", _alibi_slopes(heads).view(1, heads, 1, 1))

    def forward(self, idx, input_pos):
        b, t = idx.shape
        q, k, v = self.qkv(self.emb(idx)).view(b, t, 3, self.heads, self.dim).permute(2, 0, 3, 1, 4)
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        keys = torch.arange(self.k_cache.shape[2])
        visible = keys[None, :] <= input_pos[:, None]  # [T, S]
        mask = torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))[None, None]  # [1, 1, T, S]
        if self.bias:
            mask = mask + self.slopes * (keys - input_pos[:, None]).float()[None, None]  # ALiBi: -slope * distance
        if self.eager:
            scores = q @ self.k_cache.transpose(-1, -2) * (1.0 / math.sqrt(self.dim)) + mask
            attn = scores.softmax(-1) @ self.v_cache
        else:
            attn = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask)
        return self.out(attn.transpose(1, 2).flatten(2))


@pytest.mark.parametrize("eager", [False, True], ids=["sdpa", "eager"])
def test_a_position_bias_added_to_scores_is_refused(eager):
    model = BiasedDecoder(bias=True, eager=eager).eval()
    before, forward = _state(model), model.forward
    with pytest.raises(LocateError, match="not a mask") as err:
        lsa_rewrite.convert(model, LSAConfig(chunk_size=16))
    assert "ALiBi" in str(err.value) and "run it unconverted" in str(err.value)
    _assert_untouched(model, before, forward)


@pytest.mark.parametrize("eager", [False, True], ids=["sdpa", "eager"])
def test_a_float_causal_mask_is_a_mask(eager):
    """The same decoder with the plain causal mask (0 / -inf floats) converts: the check refuses biases, not masks."""
    model = BiasedDecoder(bias=False, eager=eager).eval()
    rows = lsa_rewrite.inspect_model(model, LSAConfig(chunk_size=16))
    assert [r["action"] for r in rows] == ["rewrite"]


@pytest.mark.parametrize("family", list(DYNAMIC_CAPTURE_ONLY))
def test_a_model_that_traces_only_over_a_dynamic_cache_is_told_so(family):
    """The static capture fails (the model is left as it was) with an error that names the way out, and
    that way converts the model exactly (covering budget = dense)."""
    model = no_eos(make_refused(family, attn_implementation="sdpa"))
    ids = torch.randint(3, 250, (1, 40), generator=torch.Generator().manual_seed(0))
    dense = hf_greedy(model, ids, NEW)
    before, forward = _state(model), model.forward
    with pytest.raises(CaptureError, match="try LSAConfig\\(capture_cache='dynamic'\\)"):
        lsa_rewrite.convert(model, LSAConfig(chunk_size=16))
    _assert_untouched(model, before, forward)
    converted = lsa_rewrite.convert(model, LSAConfig(chunk_size=16, budget=4096, capture_cache="dynamic"))
    sequences, logits = hf_greedy(converted, ids, NEW)
    assert torch.equal(sequences, dense[0])
    assert (logits - dense[1]).abs().max() <= 1e-4
