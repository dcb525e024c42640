"""The small-row GEMV (``small_m_linear_triton``, the op and ``small_m_linear_ref``) on CPU tensors under
Triton's interpreter.

Fresh random x, weight and bias per case; the output buffer is poisoned (NaN) first, so every element
must be written. Cases cover the one-row reduction path and the dot path (2 to 16 rows), N and K that
are not multiples of the blocks, split-K (the last program of a block sums the partials) with splits
that run past K, bias and none.
"""

from __future__ import annotations

import importlib
import zlib

from triton_interpreter import interpreted_kernels  # noqa: F401  (sets TRITON_INTERPRET=1 first)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lsa_rewrite.kernels import GemvConfig, small_m_linear, small_m_linear_ref, small_m_linear_triton  # noqa: E402

GEMV = importlib.import_module("lsa_rewrite.kernels.small_m_linear")  # the module, not the op the package exports
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}  # relative, against float64: the output's own rounding

# (rows, N, K, dtype, bias, config)
CASES = [
    (1, 40, 96, "bf16", True, GemvConfig(block_n=8, block_k=32)),  # 3 whole tiles, 5 whole blocks
    (1, 37, 100, "f16", False, GemvConfig(block_n=8, block_k=32)),  # partial last block and tile
    (1, 64, 256, "bf16", True, GemvConfig(block_n=16, block_k=64, split_k=2)),
    (1, 37, 200, "bf16", False, GemvConfig(block_n=4, block_k=32, split_k=4)),  # 7 tiles in 4 splits of 2: the last split runs past K
    (1, 9, 48, "f16", True, GemvConfig(block_n=16, block_k=64)),  # one tile wider than K, one block wider than N
    (1, 24, 64, "bf16", True, GemvConfig(block_n=8, block_k=16, split_k=4, num_warps=1)),  # one tile per split
    (2, 40, 96, "bf16", True, GemvConfig(block_n=16, block_k=32, dot=True)),
    (3, 37, 100, "f16", False, GemvConfig(block_n=16, block_k=32, split_k=2, dot=True)),
    (16, 33, 80, "bf16", True, GemvConfig(block_n=16, block_k=16, split_k=4, dot=True)),  # 5 tiles in 3 splits
    (5, 70, 64, "bf16", False, GemvConfig(block_n=64, block_k=32, num_stages=3, dot=True)),
    (1, 48, 128, "bf16", True, GemvConfig(block_n=16, block_k=32, split_k=2, dot=True)),  # one row on the dot path
]


def _problem(rows: int, n: int, k: int, dtype: torch.dtype, bias: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    return x, w, b


def _rel_err(got: torch.Tensor, x, w, b) -> float:
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    return ((got.double() - want).norm() / want.norm()).item()


def _case_id(c) -> str:
    rows, n, k, dtype, bias, cfg = c
    path = "dot" if cfg.dot else "red"
    return f"m{rows}-n{n}-k{k}-{dtype}-{'bias' if bias else 'nobias'}-{path}-bn{cfg.block_n}-bk{cfg.block_k}-s{cfg.split_k}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_gemv_matches_linear(case):
    rows, n, k, dtype_id, bias, config = case
    dtype = DTYPES[dtype_id]
    x, w, b = _problem(rows, n, k, dtype, bias, zlib.crc32(_case_id(case).encode()))
    out = torch.full((rows, n), float("nan"), dtype=dtype)

    got = small_m_linear_triton(x, w, b, config=config, out=out)

    assert got.data_ptr() == out.data_ptr() and not torch.isnan(out).any(), "an output element was not written"
    assert _rel_err(out, x, w, b) < TOL[dtype]
    # the same inputs give the same bits (split-K sums its partials in split order, whoever arrives last)
    again = small_m_linear_triton(x, w, b, config=config)
    assert torch.equal(again, out)


def test_split_k_counters_are_reset_for_the_next_call():
    """Every block's arrival counter is back at zero after a split-K call, so the next call (or the next
    layer of that shape, sharing the workspace) starts clean; a stale partial cannot leak into it."""
    config = GemvConfig(block_n=8, block_k=16, split_k=4)
    x, w, b = _problem(1, 40, 64, torch.bfloat16, True, 5)
    GEMV._WORKSPACES.clear()
    small_m_linear_triton(x, w, b, config=config)
    (part, count), = GEMV._WORKSPACES.values()
    assert count.shape == (5,) and torch.equal(count, torch.zeros_like(count))
    part.fill_(float("nan"))  # a second call must overwrite every partial it reads
    x2, w2, b2 = _problem(1, 40, 64, torch.bfloat16, True, 6)
    got = small_m_linear_triton(x2, w2, b2, config=config)
    assert _rel_err(got, x2, w2, b2) < TOL[torch.bfloat16]


def test_leading_dimensions_are_kept():
    """x [B, 1, K] (a decode step's hidden state) -> [B, 1, N], as F.linear gives."""
    x, w, b = _problem(3, 24, 64, torch.bfloat16, True, 7)
    got = small_m_linear_triton(x.view(3, 1, 64), w, b, config=GemvConfig(block_n=16, block_k=32, dot=True))
    assert got.shape == (3, 1, 24)
    assert _rel_err(got.view(3, 24), x, w, b) < TOL[torch.bfloat16]


@pytest.mark.parametrize("rows,n,k", [(1, 40, 96), (1, 9, 1000), (4, 70, 200)])
def test_default_launch_matches_linear(rows, n, k):
    """The heuristic's launch (no config given) on shapes outside the table."""
    x, w, b = _problem(rows, n, k, torch.bfloat16, False, rows * n + k)
    config = GEMV.default_config(rows, n, k, x.device)
    assert config.dot == (rows > 1)
    got = small_m_linear_triton(x, w, b)
    assert _rel_err(got, x, w, b) < TOL[torch.bfloat16]


def test_table_covers_the_8b_projection_shapes():
    shapes = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (128256, 4096)]
    for n, k in shapes:
        assert GEMV.default_config(1, n, k, torch.device("cpu")) == GEMV.TABLE[(n, k)]
    for config in GEMV.TABLE.values():
        GEMV._check_config(config, 1)


def test_op_on_cpu_is_linear():
    """On CPU the op runs F.linear itself: bit-equal, fp32 and bf16, with and without bias."""
    for dtype in (torch.float32, torch.bfloat16):
        x, w, b = _problem(2, 24, 40, dtype, True, 9)
        assert torch.equal(small_m_linear(x.view(2, 1, 40), w, b), F.linear(x.view(2, 1, 40), w, b))
        assert torch.equal(small_m_linear(x, w, None), small_m_linear_ref(x, w))


def test_bad_operands_say_what_is_wrong():
    x, w, _ = _problem(1, 24, 40, torch.bfloat16, False, 10)
    with pytest.raises(ValueError, match="does not end in the weight's K = 40"):
        small_m_linear(x[:, :32], w)
    with pytest.raises(ValueError, match=r"bias must be \[N\] = \[24\]"):
        small_m_linear(x, w, torch.zeros(23, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="1 to 16"):
        small_m_linear_triton(torch.zeros(17, 40, dtype=torch.bfloat16), w)
    with pytest.raises(ValueError, match="share one of"):
        small_m_linear_triton(x.float(), w.float())
    with pytest.raises(ValueError, match="need the dot path"):
        small_m_linear_triton(torch.zeros(2, 40, dtype=torch.bfloat16), w, config=GemvConfig(block_n=8, block_k=16))
    with pytest.raises(ValueError, match="power of two"):
        small_m_linear_triton(x, w, config=GemvConfig(block_n=12, block_k=16))


@pytest.mark.skipif(not hasattr(torch.library, "opcheck"), reason="torch.library.opcheck needs torch >= 2.4")
def test_opcheck():
    """Schema and fake implementation of lsa::small_m_linear agree with what it does."""
    x, w, b = _problem(2, 24, 40, torch.bfloat16, True, 11)
    torch.library.opcheck(torch.ops.lsa.small_m_linear.default, (x.view(2, 1, 40), w, b))
    torch.library.opcheck(torch.ops.lsa.small_m_linear.default, (x, w, None))
