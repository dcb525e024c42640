"""The GEMV with an RMSNorm prologue (``small_m_linear_rmsnorm_triton``, the op and its reference) on CPU
tensors under Triton's interpreter.

Fresh random x, norm weight, weight and bias per case; the output buffer is poisoned (NaN) first, so every
element must be written; the result is compared with norm + linear in float64 (the op's own rounding
of the normed x to the model's dtype included in the tolerance), and with the PyTorch reference, which
rounds where Hugging Face's ``LlamaRMSNorm`` does.
"""

from __future__ import annotations

import importlib
import zlib

from triton_interpreter import interpreted_kernels  # noqa: F401  (sets TRITON_INTERPRET=1 first)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lsa_rewrite.kernels import GemvConfig  # noqa: E402

GEMV = importlib.import_module("lsa_rewrite.kernels.small_m_linear")
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}  # relative, against float64: the normed x and the output rounded
EPS = 1e-5

# (N, K, dtype, bias, config)
CASES = [
    (40, 96, "bf16", True, GemvConfig(block_n=8, block_k=32)),  # 3 tiles, the norm over 96 in one NORM_BLOCK of 128
    (37, 100, "f16", False, GemvConfig(block_n=8, block_k=32)),  # partial last block and tile
    (24, 64, "bf16", False, GemvConfig(block_n=2, block_k=64)),  # x one tile: loaded once for the norm and the product
    (9, 48, "f16", True, GemvConfig(block_n=16, block_k=64)),  # one tile wider than K, one block wider than N
    (37, 200, "bf16", True, GemvConfig(block_n=4, block_k=32, split_k=4)),  # split-K, the last split past K
    (16, 64, "bf16", False, GemvConfig(block_n=4, block_k=16, split_k=2, num_warps=1)),
]


def _problem(n: int, k: int, dtype: torch.dtype, bias: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(1, 1, k, generator=gen)).to(dtype)
    g = (1 + 0.5 * torch.randn(k, generator=gen)).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    return x, g, w, b


def _want64(x, g, w, b):
    h = x.double()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * g.double()
    return F.linear(h, w.double(), None if b is None else b.double())


def _rel_err(got, want) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def _case_id(c) -> str:
    n, k, dtype, bias, cfg = c
    return f"n{n}-k{k}-{dtype}-{'bias' if bias else 'nobias'}-bn{cfg.block_n}-bk{cfg.block_k}-s{cfg.split_k}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_fused_norm_gemv_matches_norm_then_linear(case):
    n, k, dtype_id, bias, config = case
    dtype = DTYPES[dtype_id]
    x, g, w, b = _problem(n, k, dtype, bias, zlib.crc32(_case_id(case).encode()))
    out = torch.full((1, n), float("nan"), dtype=dtype)

    got = GEMV.small_m_linear_rmsnorm_triton(x, g, EPS, w, b, config=config, out=out)

    assert got.shape == (1, 1, n) and got.data_ptr() == out.data_ptr()
    assert not torch.isnan(out).any(), "an output element was not written"
    assert _rel_err(got, _want64(x, g, w, b)) < TOL[dtype]
    ref = GEMV.small_m_linear_rmsnorm_ref(x, g, EPS, w, b)  # the model's rounding: closer than the fp64 tolerance
    assert _rel_err(got, ref.double()) < TOL[dtype] / 2
    again = GEMV.small_m_linear_rmsnorm_triton(x, g, EPS, w, b, config=config)
    assert torch.equal(again, got)


def test_default_launch_and_the_normed_input_rounding():
    """The heuristic's launch; and with W = identity the output is the normed x itself, which must equal
    the reference's ``norm_weight * h.to(dtype)`` (rounded where LlamaRMSNorm rounds) to within one rounding."""
    k = 64
    x, g, _, _ = _problem(k, k, torch.bfloat16, False, 21)
    eye = torch.eye(k, dtype=torch.bfloat16)
    got = GEMV.small_m_linear_rmsnorm_triton(x, g, EPS, eye)
    h = x.float()
    normed = g * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)).to(torch.bfloat16)
    assert (got.float() - normed.float()).abs().max() <= normed.float().abs().max() * 2 ** -7
    assert (got != normed).sum() <= 2  # the sum of squares in another order: a rare one-ulp difference


def test_op_on_cpu_is_the_reference_and_checks_shapes():
    x, g, w, b = _problem(24, 40, torch.bfloat16, True, 9)
    op = torch.ops.lsa.small_m_linear_rmsnorm.default
    assert torch.equal(op(x, g, EPS, w, b), GEMV.small_m_linear_rmsnorm_ref(x, g, EPS, w, b))
    x2 = torch.randn(3, 1, 40).bfloat16()  # more rows: the reference, on CPU and as a CUDA fallback
    assert op(x2, g, EPS, w, None).shape == (3, 1, 24)
    with pytest.raises(ValueError, match=r"norm_weight must be \[K\] = \[40\]"):
        op(x, g[:32], EPS, w, b)
    with pytest.raises(ValueError, match="takes one"):
        GEMV.small_m_linear_rmsnorm_triton(x2, g, EPS, w)
    with pytest.raises(ValueError, match="reduction path only"):
        GEMV.small_m_linear_rmsnorm_triton(x, g, EPS, w, config=GemvConfig(block_n=16, block_k=16, dot=True))
    if hasattr(torch.library, "opcheck"):
        torch.library.opcheck(op, (x, g, EPS, w, b))
        torch.library.opcheck(op, (x2, g, EPS, w, None))
