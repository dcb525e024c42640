"""Triton chunk scores (``chunk_scores_triton``) against ``chunk_scores_ref`` and the selector it mirrors
(``lsa_rewrite.selectors.QueryAwareSelector``), on CPU tensors under Triton's interpreter.

Fresh random inputs per case; the output is poisoned (NaN) before each call.
"""

from __future__ import annotations

import zlib

from triton_interpreter import interpreted_kernels  # noqa: F401  (sets TRITON_INTERPRET=1 first)

import pytest  # noqa: E402
import torch  # noqa: E402

from lsa_rewrite.kernels import chunk_scores_ref, chunk_scores_triton  # noqa: E402
from lsa_rewrite.selectors import QueryAwareSelector, SelectionWindow  # noqa: E402

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def bounds(batch, num_chunks, kv_heads, head_dim, dtype, gen):
    kmin = torch.randn(batch, num_chunks, kv_heads, head_dim, generator=gen)
    kmax = kmin + torch.rand(kmin.shape, generator=gen) * 2
    return kmin.to(dtype), kmax.to(dtype)


# (batch, kv_heads, group, head_dim, num_chunks, dtype): GQA groups 1/2/4 and 3 (padded group), MQA,
# head_dim 16/64/128 and 24 (masked channels), one chunk, a partial last block, several blocks.
CASES = [
    (1, 2, 1, 16, 1, "f32"),
    (2, 2, 3, 16, 20, "f32"),
    (3, 2, 2, 16, 37, "f32"),
    (3, 2, 4, 64, 130, "f32"),
    (1, 1, 4, 24, 9, "f32"),
    (3, 2, 4, 128, 70, "bf16"),
    (2, 2, 2, 64, 33, "f16"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}-kv{c[1]}-g{c[2]}-d{c[3]}-n{c[4]}-{c[5]}")
def test_chunk_scores_match_reference(case):
    batch, kv_heads, group, head_dim, num_chunks, dtype_id = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    dtype = DTYPES[dtype_id]
    q = torch.randn(batch, kv_heads * group, head_dim, generator=gen).to(dtype)
    kmin, kmax = bounds(batch, num_chunks, kv_heads, head_dim, dtype, gen)
    out = torch.full((batch, num_chunks), float("nan"))

    got = chunk_scores_triton(q, kmin, kmax, out=out)

    assert got is out and torch.isfinite(out).all()
    ref = chunk_scores_ref(q, kmin, kmax)
    # both in fp32 from the same (exactly widened) inputs: only the summation order differs
    torch.testing.assert_close(out, ref, atol=1e-5 * head_dim**0.5, rtol=1e-5)


def test_padded_query_heads_do_not_raise_negative_scores():
    """With every bound negative, a padded (zero) query head scoring 0 would win the max."""
    gen = torch.Generator().manual_seed(3)
    q = torch.rand(2, 2 * 3, 16, generator=gen) + 0.1  # positive: bound = q . kmax < 0
    kmax = -(torch.rand(2, 9, 2, 16, generator=gen) + 0.1)
    kmin = kmax - 1.0
    out = chunk_scores_triton(q, kmin, kmax)
    assert (out < 0).all()
    torch.testing.assert_close(out, chunk_scores_ref(q, kmin, kmax), atol=1e-5, rtol=1e-5)


def test_chunk_scores_with_mixed_dtypes_multiply_in_fp32():
    """An fp32 query against bf16 bounds is not rounded to bf16 on the way into the product."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 32, generator=gen)
    kmin, kmax = bounds(2, 19, 2, 32, torch.bfloat16, gen)
    out = chunk_scores_triton(q, kmin, kmax)
    torch.testing.assert_close(out, chunk_scores_ref(q, kmin, kmax), atol=1e-5, rtol=1e-5)


def test_reference_is_the_quest_bound():
    """The selector's score is the per-channel upper bound sum_d max(q_d * lo_d, q_d * hi_d), maxed over heads."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 8, 32, generator=gen).bfloat16()
    kmin, kmax = bounds(2, 11, 2, 32, torch.bfloat16, gen)
    qg = q.float().view(2, 1, 2, 4, 32)  # [B, 1, Hkv, G, D]
    lo, hi = kmin.float().unsqueeze(3), kmax.float().unsqueeze(3)  # [B, N, Hkv, 1, D]
    expected = torch.maximum(qg * lo, qg * hi).sum(-1).flatten(2).amax(-1)
    layer = type("Layer", (), {"q_tap": q, "kmin": kmin, "kmax": kmax})()
    window = SelectionWindow(start=11 * 16, interval=16, lag=0, chunk_size=16, valid_start=(0, 0))
    torch.testing.assert_close(QueryAwareSelector().scores([layer], window)[0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunk_scores_ref(q, kmin, kmax), expected, atol=1e-5, rtol=1e-5)


def test_chunk_scores_read_strided_bounds():
    """Bounds sliced out of a wider index (every other chunk, the first Hkv heads) and a strided q."""
    gen = torch.Generator().manual_seed(2)
    wide_min, wide_max = bounds(2, 40, 4, 16, torch.float32, gen)
    kmin, kmax = wide_min[:, ::2, :2], wide_max[:, ::2, :2]
    q = torch.randn(2, 16, 4, generator=gen).transpose(1, 2)  # [B, Hq=4, D=16], D not innermost
    assert not (kmin.is_contiguous() or q.is_contiguous())
    out = chunk_scores_triton(q, kmin, kmax)
    torch.testing.assert_close(out, chunk_scores_ref(q, kmin, kmax), atol=1e-5, rtol=1e-5)


def test_chunk_scores_launcher_rejects_bad_operands():
    q = torch.randn(1, 4, 16)
    with pytest.raises(ValueError, match=r"not a multiple"):
        chunk_scores_triton(torch.randn(1, 3, 16), torch.randn(1, 5, 2, 16), torch.randn(1, 5, 2, 16))
    with pytest.raises(ValueError, match=r"fp16, bf16 or fp32"):
        chunk_scores_triton(q.double(), torch.randn(1, 5, 2, 16).double(), torch.randn(1, 5, 2, 16).double())
    with pytest.raises(ValueError, match=r"out must be"):
        chunk_scores_triton(q, torch.randn(1, 5, 2, 16), torch.randn(1, 5, 2, 16), out=torch.empty(1, 4))
