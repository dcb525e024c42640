"""Whole-chunk copies between the resident pool and the CPU mirror: recall and write-back.

Op (namespace ``lsa``):
- ``copy_chunks(dst_k, dst_v, src_k, src_v, dst_rows, src_rows)``: for every ``i``, chunk row
  ``src_rows[i]`` of ``src_k``/``src_v`` is copied over chunk row ``dst_rows[i]`` of ``dst_k``/``dst_v``,
  bit for bit; a pair with a negative index is skipped (so a caller on the GPU can pass fixed-size
  index tensors without learning on the host how many rows move). A chunk row is everything after
  the leading dimension(s) that number chunks: the pool ``[B * S, C, Hkv, D]`` has ``B * S`` rows,
  the mirror ``[B, N, C, Hkv, D]`` has ``B * N`` rows (row ``b * N + n``). Recall is mirror -> pool,
  write-back is pool -> mirror.

Why a kernel and not ``copy_``: a selection moves hundreds of chunks per layer, each a separate
region on both sides, and one ``cudaMemcpyAsync`` per chunk costs host time on the step's critical
path. With unified virtual addressing, pinned host memory is addressable from the GPU, so one
launch per layer and tensor pair gathers (or scatters) every chunk over PCIe/C2C, on whatever stream
is current: the memory manager issues it on a side stream and lets decode go on.

Shapes and checks: both sides contiguous, the same dtype and the same row size; ``dst_rows`` and
``src_rows`` int64 ``[M]`` with values in range (checked on the host by the reference; the kernel
trusts them, as it runs without syncing). Triton: a persistent grid of ``programs`` (default 16)
looping over ``M * cdiv(row, BLOCK)`` blocks, so that a copy running beside the decode step leaves
it most of the SMs; operands may be CUDA tensors or pinned CPU tensors (any mix); everything else
runs the reference.

Not here: which chunks to move (``lsa_rewrite.runtime``).
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


def _rows(t: Tensor, row_elems: int) -> Tensor:
    return t.view(-1, row_elems)


def _check_copy(dst_k: Tensor, dst_v: Tensor, src_k: Tensor, src_v: Tensor, dst_rows: Tensor, src_rows: Tensor) -> int:
    """Shape/dtype checks shared by every path; returns the elements per chunk row."""
    if dst_k.shape != dst_v.shape or src_k.shape != src_v.shape:
        raise ValueError(
            f"copy_chunks: K and V must have the same shape on each side, got dst {tuple(dst_k.shape)}/{tuple(dst_v.shape)}, "
            f"src {tuple(src_k.shape)}/{tuple(src_v.shape)}"
        )
    if len({dst_k.dtype, dst_v.dtype, src_k.dtype, src_v.dtype}) != 1:
        raise ValueError(f"copy_chunks: a bitwise copy needs one dtype, got {dst_k.dtype}/{dst_v.dtype} <- {src_k.dtype}/{src_v.dtype}")
    if dst_k.dim() < 2 or src_k.dim() < 2:
        raise ValueError("copy_chunks: pool and mirror must have a chunk dimension and at least one more")
    # The chunk row: the trailing [C, Hkv, D] that pool and mirror share.
    row_shape = dst_k.shape[-3:] if dst_k.dim() >= 4 else dst_k.shape[1:]
    if src_k.shape[-len(row_shape):] != row_shape:
        raise ValueError(f"copy_chunks: chunk rows differ: dst {tuple(dst_k.shape)} vs src {tuple(src_k.shape)} (trailing {tuple(row_shape)})")
    if not all(t.is_contiguous() for t in (dst_k, dst_v, src_k, src_v)):
        raise ValueError("copy_chunks: pool and mirror must be contiguous")
    if dst_rows.dtype != torch.int64 or src_rows.dtype != torch.int64 or dst_rows.dim() != 1 or dst_rows.shape != src_rows.shape:
        raise ValueError(
            f"copy_chunks: dst_rows and src_rows must be int64 [M] of one length, got {dst_rows.dtype} {tuple(dst_rows.shape)} "
            f"and {src_rows.dtype} {tuple(src_rows.shape)}"
        )
    return int(torch.Size(row_shape).numel())


def copy_chunks_ref(dst_k: Tensor, dst_v: Tensor, src_k: Tensor, src_v: Tensor, dst_rows: Tensor, src_rows: Tensor) -> None:
    """Reference for ``lsa::copy_chunks`` (pure PyTorch, in place): ``dst[dst_rows[i]] = src[src_rows[i]]``
    for every ``i`` where both are >= 0."""
    row = _check_copy(dst_k, dst_v, src_k, src_v, dst_rows, src_rows)
    moving = (dst_rows >= 0) & (src_rows >= 0)
    dst_rows, src_rows = dst_rows[moving], src_rows[moving]
    if dst_rows.numel() == 0:
        return
    dk, dv, sk, sv = (_rows(t, row) for t in (dst_k, dst_v, src_k, src_v))
    for rows, limit, side in ((dst_rows, dk.shape[0], "dst_rows"), (src_rows, sk.shape[0], "src_rows")):
        lo, hi = int(rows.min()), int(rows.max())
        if hi >= limit:
            raise IndexError(f"copy_chunks: {side} holds rows {lo}..{hi}, but that side has {limit} chunk rows")
    dst_idx = dst_rows.to(dk.device)
    src_idx = src_rows.to(sk.device)
    dk.index_copy_(0, dst_idx, sk.index_select(0, src_idx).to(dk.device))
    dv.index_copy_(0, dst_idx, sv.index_select(0, src_idx).to(dv.device))


# -- Triton kernel -------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _copy_chunks_kernel(dst_k_ptr, dst_v_ptr, src_k_ptr, src_v_ptr, dst_rows_ptr, src_rows_ptr, count, row_elems, blocks_per_row, BLOCK: tl.constexpr):
        """Persistent: program p moves blocks p, p + P, p + 2P, ... of the ``count * blocks_per_row`` work items.

        Work item t: elements ``(t % blocks_per_row) * BLOCK ..`` of chunk row ``src_rows[t // blocks_per_row]``
        -> row ``dst_rows[...]``, K and V.
        """
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        for t in range(pid, count * blocks_per_row, programs):
            i = t // blocks_per_row
            j = (t - i * blocks_per_row).to(tl.int64)
            dst_row = tl.load(dst_rows_ptr + i).to(tl.int64)
            src_row = tl.load(src_rows_ptr + i).to(tl.int64)
            dst = dst_row * row_elems
            src = src_row * row_elems
            offs = j * BLOCK + tl.arange(0, BLOCK)
            # a negative index: nothing moves (vector form of the scalar tests, as the interpreter needs)
            mask = (offs < row_elems) & ((offs * 0 + dst_row) >= 0) & ((offs * 0 + src_row) >= 0)
            k = tl.load(src_k_ptr + src + offs, mask=mask)
            v = tl.load(src_v_ptr + src + offs, mask=mask)
            tl.store(dst_k_ptr + dst + offs, k, mask=mask)
            tl.store(dst_v_ptr + dst + offs, v, mask=mask)


# Programs of the copy kernel by default: a reader of host memory spends most of its time waiting on
# the link, so a few programs with a block each in flight keep PCIe busy while leaving the other SMs
# to the decode step the copy overlaps (one program per block would occupy every SM until the copy
# ends). H200, 2026-11-28 (benchmarks/recall.py, results/recall.json): 16 programs recall at 48.5
# GB/s (one contiguous pinned copy: 54.3) and hide 86% of a 32-layer recall under graph-replayed
# decode attention; one program per block hides 1.6%; 4 programs reach only 32 GB/s.
DEFAULT_PROGRAMS = 16


def _reachable(t: Tensor) -> bool:
    """CUDA memory, or pinned host memory (addressable from the GPU under unified addressing)."""
    return t.is_cuda or (t.device.type == "cpu" and t.is_pinned())


def copy_chunks_problem(tensors: tuple[Tensor, ...]) -> str | None:
    """Why the Triton kernel cannot take these operands on the GPU (None: it can)."""
    if triton is None:
        return "Triton is not installed"
    if not all(_reachable(t) for t in tensors):
        return "an operand is pageable host memory (pin the mirror: torch.empty(..., pin_memory=True))"
    devices = {t.device for t in tensors if t.is_cuda}
    if len(devices) > 1:
        return f"operands live on several GPUs: {sorted(map(str, devices))}"
    return None


@functools.lru_cache(maxsize=None)
def _warn_reference_fallback(problem: str) -> None:
    warnings.warn(f"lsa::copy_chunks runs its PyTorch reference: {problem}", RuntimeWarning, stacklevel=3)


def copy_chunks_triton(
    dst_k: Tensor, dst_v: Tensor, src_k: Tensor, src_v: Tensor, dst_rows: Tensor, src_rows: Tensor, *, block: int = 4096, programs: int | None = DEFAULT_PROGRAMS
) -> None:
    """Triton launcher of ``lsa::copy_chunks``: one launch on the current stream, no host sync.

    Operands: CUDA or pinned CPU tensors (CPU tensors under ``TRITON_INTERPRET=1``). Row indices are
    not range-checked here (that would sync); the memory manager builds them from its own tables.
    ``programs``: how many persistent programs share the work (``None``: one per block).
    """
    row = _check_copy(dst_k, dst_v, src_k, src_v, dst_rows, src_rows)
    if triton is None:
        raise ValueError("copy_chunks (Triton): Triton is not installed")
    count = dst_rows.numel()
    if count == 0 or row == 0:
        return
    block = min(block, triton.next_power_of_2(row))
    blocks_per_row = triton.cdiv(row, block)
    work = count * blocks_per_row
    grid = work if programs is None else max(1, min(programs, work))
    _copy_chunks_kernel[(grid,)](dst_k, dst_v, src_k, src_v, dst_rows, src_rows, count, row, blocks_per_row, BLOCK=block, num_warps=4)


# -- op registration ---------------------------------------------------------------------------


@torch.library.custom_op("lsa::copy_chunks", mutates_args=("dst_k", "dst_v"))
def copy_chunks(dst_k: Tensor, dst_v: Tensor, src_k: Tensor, src_v: Tensor, dst_rows: Tensor, src_rows: Tensor) -> None:
    """Copy chunk rows ``src_rows`` of ``src_k``/``src_v`` over rows ``dst_rows`` of ``dst_k``/``dst_v``.

    Runs the Triton kernel when a GPU operand is involved and every operand is reachable from it
    (CUDA or pinned host memory), the reference otherwise.

    Example::

        >>> pool = torch.zeros(4, 2, 1, 1); mirror = torch.arange(6.0).view(1, 3, 2, 1, 1)
        >>> copy_chunks(pool, pool.clone(), mirror, mirror.clone(), torch.tensor([3]), torch.tensor([1]))
        >>> pool[3].flatten().tolist()
        [2.0, 3.0]
    """
    tensors = (dst_k, dst_v, src_k, src_v, dst_rows, src_rows)
    if any(t.is_cuda for t in tensors):
        problem = copy_chunks_problem(tensors)
        if problem is None:
            return copy_chunks_triton(*tensors)
        _warn_reference_fallback(problem)
    copy_chunks_ref(*tensors)


@copy_chunks.register_fake
def _(dst_k, dst_v, src_k, src_v, dst_rows, src_rows):
    _check_copy(dst_k, dst_v, src_k, src_v, dst_rows, src_rows)
