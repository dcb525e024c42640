"""``TapIndexerInputsPass`` finds each layer's query projection and, in a fused qkv projection, which of its
output features hold the query: the first ``Hq * D`` (separate q_proj, Phi-3's qkv_proj, GPT-2's c_attn)
or, where the fused output is laid out per head (GPT-NeoX: ``[q_h, k_h, v_h]`` for each head) or per KV
group (Falcon's new decoder architecture: ``[q_g1 .. q_gG, k_g, v_g]`` for each group), the features the
forward code slices the query from. Falcon's projection is a hand-written ``x @ W.T`` (no ``linear``)."""

from __future__ import annotations

import pytest
import torch
from zoo import make_model

from lsa_rewrite import LSAConfig
from lsa_rewrite.adapters import HFAdapter, hf_layer_windows
from lsa_rewrite.passes import LocateAttentionPass, TapIndexerInputsPass


def _tap(model):
    step = HFAdapter(model, LSAConfig()).capture(1)
    sites = LocateAttentionPass(hf_layer_windows(model.config))(step)
    TapIndexerInputsPass((1,))(step, sites)
    site = next(s for s in sites if s.layer == 1)
    return site, site.indexer


def _per_head(heads: int, dim: int) -> torch.Tensor:  # GPT-NeoX: view(B, T, H, 3 * D), query first in each head
    return torch.cat([torch.arange(h * 3 * dim, h * 3 * dim + dim) for h in range(heads)])


def _per_group(heads: int, kv_heads: int, dim: int) -> torch.Tensor:  # Falcon: view(B, T, KV, H / KV + 2, D)
    group = heads // kv_heads
    return torch.cat([torch.arange(g * (group + 2) * dim, g * (group + 2) * dim + group * dim) for g in range(kv_heads)])


@pytest.mark.parametrize(
    ("family", "weight", "expected"),
    [
        ("llama", "model.layers.1.self_attn.q_proj.weight", None),
        ("phi3", "model.layers.1.self_attn.qkv_proj.weight", None),
        ("gpt2", "transformer.h.1.attn.c_attn.weight", None),
        ("gpt_neox", "gpt_neox.layers.1.attention.query_key_value.weight", _per_head(4, 16)),
        ("falcon", "transformer.h.1.self_attention.query_key_value.weight", _per_group(4, 2, 16)),
    ],
)
def test_query_rows_of_the_projection(family, weight, expected):
    model = make_model(family)
    site, tap = _tap(model)
    assert tap.weight == weight
    rows = site.q_heads * site.head_dim
    if expected is None:
        assert tap.rows is None  # the first Hq * D features
    else:
        assert torch.equal(tap.rows, expected)
    param = model.get_parameter(weight).detach()
    want = param[:, expected if expected is not None else slice(0, rows)].t() if tap.transposed else param[expected if expected is not None else slice(0, rows)]
    assert torch.equal(tap.query_weight(model, rows), want)
