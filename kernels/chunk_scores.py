"""Query-aware chunk scores: an upper bound on ``q . k`` over each chunk, from its key bounds.

Op (namespace ``lsa``):
- ``chunk_scores(q, kmin, kmax) -> [B, N] float32``: for chunk ``n`` of sequence ``b``, the largest
  over query heads ``h`` of ``sum_d max(q[b, h, d] * kmin[b, n, h // G, d], q[b, h, d] * kmax[b, n, h // G, d])``
  (Quest's bound; ``G = Hq // Hkv``, as repeat_kv maps query heads to kv heads). The same math as
  ``lsa_rewrite.selectors.query_aware_scores``, which the memory manager calls between decode steps.

Shapes: ``q`` ``[B, Hq, D]``; ``kmin``/``kmax`` ``[B, N, Hkv, D]`` (per-chunk, per-channel key min/max).

Triton (CUDA tensors): one pass over ``kmin``/``kmax`` (the op is bandwidth-bound: each bound is read
once, ``q`` is tiny), grid ``(B, cdiv(N, BLOCK_N))``, fp32 arithmetic; any head_dim, fp16/bf16/fp32.
Other dtypes on CUDA run the reference (with a one-time warning); CPU tensors always do.

Not here: turning scores into a resident set (top-k, sink and recent chunks: the memory manager).
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships for Linux only; the op then runs its reference.
    triton = None


def chunk_scores_ref(q: Tensor, kmin: Tensor, kmax: Tensor) -> Tensor:
    """Reference for ``lsa::chunk_scores`` (pure PyTorch): q [B, Hq, D], kmin/kmax [B, N, Hkv, D] -> [B, N]."""
    batch, q_heads, head_dim = q.shape
    kv_heads = kmin.shape[2]
    qg = q.float().view(batch, 1, kv_heads, q_heads // kv_heads, head_dim)  # [B, 1, Hkv, G, D]
    lo = kmin.float().unsqueeze(3)  # [B, N, Hkv, 1, D]
    hi = kmax.float().unsqueeze(3)
    bound = torch.maximum(qg * lo, qg * hi).sum(-1)  # [B, N, Hkv, G]
    return bound.flatten(2).amax(-1)


# -- Triton kernel -------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _chunk_scores_kernel(
        q_ptr, kmin_ptr, kmax_ptr, out_ptr,
        num_chunks, kv_heads, group, head_dim,
        stride_q_b, stride_q_h, stride_q_d,
        stride_kmin_b, stride_kmin_n, stride_kmin_h, stride_kmin_d,
        stride_kmax_b, stride_kmax_n, stride_kmax_h, stride_kmax_d,
        stride_out_b, stride_out_n,
        BLOCK_N: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_D: tl.constexpr,
        DOT_IN_FP32: tl.constexpr,
    ):
        """One (sequence, block of BLOCK_N chunks): each kv head's bounds are loaded once and scored
        against its whole query group; the running max over heads is the chunk's score.

        ``max(q lo, q hi) = max(q, 0) max(lo, hi) + min(q, 0) min(lo, hi)`` for every q, lo, hi (one
        term is zero), so the bound over a group is two matrix products ``[BLOCK_N, D] x [D, BLOCK_G]``
        on the same products the reference sums (only the summation order differs).
        """
        tl.static_assert(BLOCK_N >= 16, "tl.dot needs 16 rows")
        tl.static_assert(BLOCK_G >= 16, "tl.dot needs 16 columns: pad the query group")
        tl.static_assert(BLOCK_D >= 16)
        pid_b = tl.program_id(0).to(tl.int64)
        pid_n = tl.program_id(1).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        mask_n = offs_n < num_chunks
        mask_g = offs_g < group
        mask_d = offs_d < head_dim
        mask_nd = mask_n[:, None] & mask_d[None, :]
        mask_dg = mask_d[:, None] & mask_g[None, :]

        kmin_rows = kmin_ptr + pid_b * stride_kmin_b + offs_n[:, None] * stride_kmin_n + offs_d[None, :] * stride_kmin_d
        kmax_rows = kmax_ptr + pid_b * stride_kmax_b + offs_n[:, None] * stride_kmax_n + offs_d[None, :] * stride_kmax_d
        # q of the group transposed: [BLOCK_D, BLOCK_G]
        q_cols = q_ptr + pid_b * stride_q_b + offs_g[None, :] * stride_q_h + offs_d[:, None] * stride_q_d

        best = tl.full([BLOCK_N], float("-inf"), tl.float32)
        for kv in range(0, kv_heads):
            lo = tl.load(kmin_rows + kv * stride_kmin_h, mask=mask_nd, other=0.0)  # [BLOCK_N, BLOCK_D]
            hi = tl.load(kmax_rows + kv * stride_kmax_h, mask=mask_nd, other=0.0)
            q = tl.load(q_cols + (kv * group) * stride_q_h, mask=mask_dg, other=0.0)  # [BLOCK_D, BLOCK_G]
            # min/max/sign split in fp32, then back to the shared input dtype exactly (each result is an
            # input or 0); mixed or fp32 inputs multiply in fp32 (ieee, not tf32)
            lo32, hi32, q32 = lo.to(tl.float32), hi.to(tl.float32), q.to(tl.float32)
            if DOT_IN_FP32:
                upper, lower = tl.maximum(lo32, hi32), tl.minimum(lo32, hi32)
                q_pos, q_neg = tl.maximum(q32, 0.0), tl.minimum(q32, 0.0)
                bound = tl.dot(upper, q_pos, input_precision="ieee")  # [BLOCK_N, BLOCK_G]
                bound = tl.dot(lower, q_neg, bound, input_precision="ieee")
            else:
                upper = tl.maximum(lo32, hi32).to(lo.dtype)
                lower = tl.minimum(lo32, hi32).to(lo.dtype)
                q_pos = tl.maximum(q32, 0.0).to(lo.dtype)
                q_neg = tl.minimum(q32, 0.0).to(lo.dtype)
                bound = tl.dot(upper, q_pos)  # [BLOCK_N, BLOCK_G], fp32 accumulation of exact products
                bound = tl.dot(lower, q_neg, bound)
            bound = tl.where(mask_g[None, :], bound, float("-inf"))  # padded query heads stay out
            best = tl.maximum(best, tl.max(bound, 1))

        tl.store(out_ptr + pid_b * stride_out_b + offs_n * stride_out_n, best, mask=mask_n)


# -- launch configuration ----------------------------------------------------------------------
# Fixed rules rather than triton.autotune (no benchmarking on first call, graph-capture safe): bound
# tiles [BLOCK_N, BLOCK_D] of at most about 8K elements, and on CUDA blocks small enough that the grid
# has about two programs per SM (a sequence of 2048 chunks would otherwise make a few dozen programs).

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TILE_ELEMENTS = 8192
_MIN_BLOCK_N = 16
_PROGRAMS_PER_SM = 2


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _scores_block_n(device: torch.device, batch: int, num_chunks: int, block_d: int) -> int:
    block_n = max(_MIN_BLOCK_N, min(triton.next_power_of_2(max(num_chunks, 1)), _TILE_ELEMENTS // block_d, 128))
    if device.type == "cuda":
        target = _PROGRAMS_PER_SM * _sm_count(device.index)
        while block_n > _MIN_BLOCK_N and batch * triton.cdiv(num_chunks, block_n) < target:
            block_n //= 2
    return block_n


# -- launcher ----------------------------------------------------------------------------------


def _check_scores(q: Tensor, kmin: Tensor, kmax: Tensor) -> None:
    if q.dim() != 3:
        raise ValueError(f"chunk_scores: q must be [B, Hq, D], got {tuple(q.shape)}")
    if kmin.dim() != 4 or kmin.shape != kmax.shape:
        raise ValueError(f"chunk_scores: kmin/kmax must be [B, N, Hkv, D] and equal, got {tuple(kmin.shape)} / {tuple(kmax.shape)}")
    if kmin.shape[0] != q.shape[0] or kmin.shape[3] != q.shape[2]:
        raise ValueError(f"chunk_scores: bounds {tuple(kmin.shape)} do not match q {tuple(q.shape)} (batch, head_dim)")
    if kmin.shape[2] == 0 or q.shape[1] % kmin.shape[2]:
        raise ValueError(f"chunk_scores: {q.shape[1]} query heads are not a multiple of {kmin.shape[2]} kv heads")


def _scores_problem(q: Tensor, kmin: Tensor, kmax: Tensor) -> str | None:
    """Why the Triton kernel cannot take these operands (None: it can)."""
    if triton is None:
        return "Triton is not installed"
    if len({q.device, kmin.device, kmax.device}) != 1:
        return "operands live on different devices"
    if any(t.dtype not in _SUPPORTED_DTYPES for t in (q, kmin, kmax)):
        return f"dtypes {q.dtype}/{kmin.dtype}/{kmax.dtype}: need fp16, bf16 or fp32"
    return None


@functools.lru_cache(maxsize=None)
def _warn_reference_fallback(problem: str) -> None:
    warnings.warn(f"lsa::chunk_scores runs its PyTorch reference on CUDA: {problem}", RuntimeWarning, stacklevel=3)


def chunk_scores_triton(q: Tensor, kmin: Tensor, kmax: Tensor, *, out: Tensor | None = None) -> Tensor:
    """Triton launcher of ``lsa::chunk_scores`` (CUDA; CPU tensors under ``TRITON_INTERPRET=1``).

    One launch, grid ``(B, cdiv(N, BLOCK_N))``, no host sync; writes ``out`` ``[B, N]`` float32 when
    given, else allocates it.
    """
    _check_scores(q, kmin, kmax)
    problem = _scores_problem(q, kmin, kmax)
    if problem is not None:
        raise ValueError(f"chunk_scores (Triton): {problem}")
    batch, q_heads, head_dim = q.shape
    num_chunks, kv_heads = kmin.shape[1:3]
    if out is None:
        out = torch.empty(batch, num_chunks, dtype=torch.float32, device=q.device)
    elif out.shape != (batch, num_chunks) or out.dtype != torch.float32 or out.device != q.device:
        raise ValueError(f"chunk_scores (Triton): out must be [{batch}, {num_chunks}] float32 on {q.device}, got {tuple(out.shape)} {out.dtype}")
    if out.numel() == 0:
        return out
    group = q_heads // kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_g = max(16, triton.next_power_of_2(group))
    block_n = _scores_block_n(q.device, batch, num_chunks, block_d)
    _chunk_scores_kernel[(batch, triton.cdiv(num_chunks, block_n))](
        q, kmin, kmax, out,
        num_chunks, kv_heads, group, head_dim,
        q.stride(0), q.stride(1), q.stride(2),
        kmin.stride(0), kmin.stride(1), kmin.stride(2), kmin.stride(3),
        kmax.stride(0), kmax.stride(1), kmax.stride(2), kmax.stride(3),
        out.stride(0), out.stride(1),
        BLOCK_N=block_n,
        BLOCK_G=block_g,
        BLOCK_D=block_d,
        DOT_IN_FP32=q.dtype == torch.float32 or len({q.dtype, kmin.dtype, kmax.dtype}) > 1,
        num_warps=4,
    )
    return out


# -- op registration ---------------------------------------------------------------------------


@torch.library.custom_op("lsa::chunk_scores", mutates_args=())
def chunk_scores(q: Tensor, kmin: Tensor, kmax: Tensor) -> Tensor:
    """Upper bound of ``q . k`` per chunk (max over query heads): q [B, Hq, D], kmin/kmax [B, N, Hkv, D] -> [B, N].

    Example::

        >>> q = torch.tensor([[[1.0, -1.0]]])  # B=1, Hq=1, D=2
        >>> kmin = torch.tensor([[[[0.0, -2.0]], [[1.0, 1.0]]]])  # B=1, N=2, Hkv=1
        >>> chunk_scores(q, kmin, kmin + 1.0)  # chunk 0: 1*1 + (-1)*(-2); chunk 1: 1*2 + (-1)*1
        tensor([[3., 1.]])
    """
    _check_scores(q, kmin, kmax)
    if q.is_cuda:
        problem = _scores_problem(q, kmin, kmax)
        if problem is None:
            return chunk_scores_triton(q, kmin, kmax)
        _warn_reference_fallback(problem)
    return chunk_scores_ref(q, kmin, kmax)


@chunk_scores.register_fake
def _(q, kmin, kmax):
    return q.new_empty(kmin.shape[:2], dtype=torch.float32)
