"""The compact (fp8) CPU mirror: its chunk format, and the copies between it and the resident pool.

Format (``LSAConfig(mirror="fp8")``, lossy): a chunk row ``[C, Hkv, D]`` of the model's dtype is kept
as ``C * Hkv * (D + 1)`` bytes (a tensor of shape ``[C, Hkv, D + 1]``, uint8): first the
``float8_e4m3fn`` codes of ``x / s`` in the row's order (``C * Hkv * D`` bytes, so every vector of
codes starts 16-byte aligned when D is a multiple of 16 and the kernel reads them in wide loads),
then one scale byte ``e + 127`` per token and KV head (``C * Hkv`` bytes; an E8M0 exponent, as in the
OCP microscaling formats), where ``s = 2**e`` is the smallest power of two with ``amax / s <= 448``
(``amax``: the largest magnitude of that token and head; 448 is the largest e4m3 value). Because ``s`` is a power of two, dividing by
it and multiplying back are exact, so the only error is e4m3's rounding to nearest:

    |x_hat - x| <= 2**-4 * |x|       where |x / s| >= 2**-6 (e4m3's normal range: 3 mantissa bits)
    |x_hat - x| <= 2**-10 * s        below it (subnormal spacing 2**-9, halved)

and ``s < 2 * amax / 448``, so ``|x_hat - x| <= 2**-4 * |x| + 2**-9 * amax / 448`` everywhere. The
dequantised value has 4 significant bits, so it is exact in bf16, fp16 and fp32 (no second rounding).
Host bytes: ``(D + 1) / (2 D)`` of a bf16/fp16 mirror (50.4% at D = 128), ``(D + 1) / (4 D)`` of fp32.
``e`` is kept in [-117, 117] (an ``amax`` up to 448 * 2**117), so every dequantised value is a normal
float32.

Ops (namespace ``lsa``), each with a reference and the same skip rule as ``lsa::copy_chunks``: a pair
with a negative index moves nothing.
- ``pack_chunks(dst_k, dst_v, src_k, src_v, dst_rows, src_rows)``: write-back, pool rows -> packed
  mirror rows. The source rows are gathered and encoded on the source's device (torch ops), then
  their bytes go into the mirror with ``lsa::copy_chunks`` (on CUDA: one launch, writing page-locked
  host memory directly, so half the bytes cross the link).
- ``unpack_chunks(dst_k, dst_v, src_k, src_v, dst_rows, src_rows)``: recall, packed mirror rows ->
  pool rows, dequantised on the way. On CUDA one Triton launch reads the page-locked mirror directly
  and writes the pool in the model's dtype (the e4m3 codes are decoded with integer ops, so the
  kernel needs no fp8 support from the GPU or the interpreter); the reference elsewhere.
- ``pack_fp8`` / ``unpack_fp8``: whole tensors of chunk rows ``[..., C, Hkv, D]`` <-> ``[..., C, Hkv, D + 1]``
  bytes (the prompt's ingest, a later turn's read of the history, the write-back's encoding).

Not here: which chunks move (``lsa_rewrite.runtime``).
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor

from .copy_chunks import copy_chunks_problem, copy_chunks_ref, copy_chunks_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships for Linux only; the ops then run their references.
    triton = None

FP8_MAX = 448.0  # the largest finite float8_e4m3fn
SCALE_BIAS = 127  # the scale byte is e + 127 (E8M0)
MIN_EXP, MAX_EXP = -117, 117  # keeps every dequantised value a normal float32 (see the module docstring)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _pow2(exp: Tensor) -> Tensor:
    """``2.0 ** exp`` as float32, exactly (built from the exponent bits), for int ``exp`` in [-126, 127]."""
    return ((exp.to(torch.int32) + 127) << 23).view(torch.float32)


def pack_fp8(x: Tensor) -> Tensor:
    """Chunk rows ``x`` ``[..., C, Hkv, D]`` (float) -> ``[..., C, Hkv, D + 1]`` uint8: per row, the e4m3
    codes of every token and head, then one scale byte per token and head.

    Example::

        >>> x = torch.tensor([1.0, -0.5, 300.0, 0.0]).view(1, 1, 4)
        >>> packed = pack_fp8(x)
        >>> packed.shape, unpack_fp8(packed, torch.float32).flatten().tolist()
        (torch.Size([1, 1, 5]), [1.0, -0.5, 288.0, 0.0])
    """
    if x.dim() < 3:
        raise ValueError(f"pack_fp8: chunk rows [..., C, Hkv, D] expected, got {tuple(x.shape)}")
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True)
    mant, exp = torch.frexp(amax / FP8_MAX)  # amax / 448 = mant * 2**exp, mant in [0.5, 1)
    exp = torch.where(mant == 0.5, exp - 1, exp)  # ceil(log2(amax / 448))
    exp = exp.clamp(MIN_EXP, MAX_EXP)
    exp = torch.where(amax > FP8_MAX * _pow2(exp), exp + 1, exp).clamp(MIN_EXP, MAX_EXP)  # the division above rounded down
    codes = (xf / _pow2(exp)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    chunk, heads, dim = x.shape[-3:]
    row = torch.cat([codes.flatten(-3), (exp + SCALE_BIAS).to(torch.uint8).flatten(-3)], -1)  # [..., C*Hkv*D + C*Hkv]
    return row.view(*x.shape[:-3], chunk, heads, dim + 1)


def unpack_fp8(packed: Tensor, dtype: torch.dtype) -> Tensor:
    """Inverse of :func:`pack_fp8` (up to e4m3's rounding): ``[..., C, Hkv, D + 1]`` uint8 -> ``[..., C, Hkv, D]`` ``dtype``."""
    if packed.dtype != torch.uint8 or packed.dim() < 3:
        raise ValueError(f"unpack_fp8: packed chunk rows are uint8 [..., C, Hkv, D + 1], got {packed.dtype} {tuple(packed.shape)}")
    chunk, heads, dim = packed.shape[-3], packed.shape[-2], packed.shape[-1] - 1
    row = packed.flatten(-3)
    codes = row[..., : chunk * heads * dim].view(torch.float8_e4m3fn).float().view(*packed.shape[:-3], chunk, heads, dim)
    exp = row[..., chunk * heads * dim :].to(torch.int32).view(*packed.shape[:-3], chunk, heads, 1) - SCALE_BIAS
    return (codes * _pow2(exp)).to(dtype)


def _check(pool_k: Tensor, pool_v: Tensor, mirror_k: Tensor, mirror_v: Tensor, dst_rows: Tensor, src_rows: Tensor) -> tuple[int, int]:
    """Checks shared by both directions; returns (vectors per chunk row, head_dim)."""
    if pool_k.shape != pool_v.shape or mirror_k.shape != mirror_v.shape:
        raise ValueError(
            f"compact chunks: K and V must have the same shape on each side, got pool {tuple(pool_k.shape)}/{tuple(pool_v.shape)}, "
            f"mirror {tuple(mirror_k.shape)}/{tuple(mirror_v.shape)}"
        )
    if pool_k.dtype not in DTYPES or pool_v.dtype != pool_k.dtype:
        raise ValueError(f"compact chunks: the pool must be one of {DTYPES} (K and V alike), got {pool_k.dtype}/{pool_v.dtype}")
    if mirror_k.dtype != torch.uint8 or mirror_v.dtype != torch.uint8:
        raise ValueError(f"compact chunks: the mirror holds packed bytes (uint8), got {mirror_k.dtype}/{mirror_v.dtype}")
    if pool_k.dim() != 4 or mirror_k.dim() != 5:
        raise ValueError(
            f"compact chunks: pool [rows, C, Hkv, D] and mirror [B, N, C, Hkv, D + 1] expected, got {tuple(pool_k.shape)} and {tuple(mirror_k.shape)}"
        )
    chunk, heads, dim = pool_k.shape[1:]
    if tuple(mirror_k.shape[2:]) != (chunk, heads, dim + 1):
        raise ValueError(f"compact chunks: a pool row [C, Hkv, D] = {[chunk, heads, dim]} is packed as {[chunk, heads, dim + 1]}, got mirror rows {list(mirror_k.shape[2:])}")
    if not all(t.is_contiguous() for t in (pool_k, pool_v, mirror_k, mirror_v)):
        raise ValueError("compact chunks: pool and mirror must be contiguous")
    if dst_rows.dtype != torch.int64 or src_rows.dtype != torch.int64 or dst_rows.dim() != 1 or dst_rows.shape != src_rows.shape:
        raise ValueError(
            f"compact chunks: dst_rows and src_rows must be int64 [M] of one length, got {dst_rows.dtype} {tuple(dst_rows.shape)} "
            f"and {src_rows.dtype} {tuple(src_rows.shape)}"
        )
    return chunk * heads, dim


# -- write-back: pool -> packed mirror ------------------------------------------------------------


def pack_chunks_impl(mirror_k: Tensor, mirror_v: Tensor, pool_k: Tensor, pool_v: Tensor, dst_rows: Tensor, src_rows: Tensor) -> None:
    """``mirror[dst_rows[i]] = pack_fp8(pool[src_rows[i]])`` where both are >= 0; no host sync on CUDA.

    The pool rows are gathered (negative indices clamped: those rows are encoded but never copied)
    and encoded on the pool's device; ``lsa::copy_chunks`` then moves the bytes.
    """
    _check(pool_k, pool_v, mirror_k, mirror_v, dst_rows, src_rows)
    count = dst_rows.numel()
    if count == 0:
        return
    src = src_rows.to(pool_k.device)
    staged_k = pack_fp8(pool_k.index_select(0, src.clamp_min(0)))  # [M, C, Hkv, D + 1]
    staged_v = pack_fp8(pool_v.index_select(0, src.clamp_min(0)))
    rows = torch.arange(count, device=src.device)
    staged_rows = torch.where((src >= 0) & (dst_rows.to(src.device) >= 0), rows, -1)
    operands = (mirror_k, mirror_v, staged_k, staged_v, dst_rows.to(staged_rows.device), staged_rows)
    if (staged_k.is_cuda or mirror_k.is_cuda) and copy_chunks_problem(operands) is None:
        copy_chunks_triton(*operands)
    else:
        copy_chunks_ref(*operands)


pack_chunks_ref = pack_chunks_impl  # the reference is the implementation: torch ops + lsa::copy_chunks


# -- recall: packed mirror -> pool ----------------------------------------------------------------


def unpack_chunks_ref(pool_k: Tensor, pool_v: Tensor, mirror_k: Tensor, mirror_v: Tensor, dst_rows: Tensor, src_rows: Tensor) -> None:
    """Reference for ``lsa::unpack_chunks`` (pure PyTorch, in place): ``pool[dst_rows[i]] = unpack_fp8(mirror[src_rows[i]])``
    for every ``i`` where both are >= 0."""
    vectors, dim = _check(pool_k, pool_v, mirror_k, mirror_v, dst_rows, src_rows)
    moving = (dst_rows >= 0) & (src_rows >= 0)
    dst_rows, src_rows = dst_rows[moving], src_rows[moving]
    if dst_rows.numel() == 0:
        return
    row_shape = mirror_k.shape[2:]
    for rows, limit, side in ((dst_rows, pool_k.shape[0], "dst_rows"), (src_rows, mirror_k.shape[0] * mirror_k.shape[1], "src_rows")):
        lo, hi = int(rows.min()), int(rows.max())
        if hi >= limit:
            raise IndexError(f"unpack_chunks: {side} holds rows {lo}..{hi}, but that side has {limit} chunk rows")
    src_idx = src_rows.to(mirror_k.device)
    dst_idx = dst_rows.to(pool_k.device)
    for pool, mirror in ((pool_k, mirror_k), (pool_v, mirror_v)):
        packed = mirror.view(-1, *row_shape).index_select(0, src_idx).to(pool.device)
        pool.index_copy_(0, dst_idx, unpack_fp8(packed, pool.dtype))


if triton is not None:

    @triton.jit
    def _unpack_block(src_ptr, dst_ptr, codes, scales, dst, mask, live, DIM: tl.constexpr, BLOCK_D: tl.constexpr):
        """Decode one block of ``BLOCK_V`` packed vectors (``codes``: offsets of their D code bytes,
        ``scales``: of their scale bytes) into ``[BLOCK_V, D]`` of the pool's dtype at ``dst``."""
        offs_d = tl.arange(0, BLOCK_D)
        code = tl.load(src_ptr + codes[:, None] + offs_d[None, :], mask=mask, other=0).to(tl.int32)
        scale = tl.load(src_ptr + scales, mask=live, other=127).to(tl.int32)  # [BLOCK_V]; the scale byte is e + 127
        # e4m3fn: sign | 4 exponent bits (bias 7) | 3 mantissa bits; normal (8 + m) * 2**(e - 10), subnormal m * 2**-9
        expo = (code >> 3) & 15
        mant = code & 7
        digits = tl.where(expo == 0, mant, mant + 8)
        shift = tl.where(expo == 0, -9, expo - 10) + scale[:, None] - 127  # in [-126, 122]: a normal float32
        power = ((shift + 127) << 23).to(tl.float32, bitcast=True)
        value = digits.to(tl.float32) * power
        value = tl.where((code >> 7) != 0, -value, value)
        tl.store(dst_ptr + dst[:, None] + offs_d[None, :], value.to(dst_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _unpack_chunks_kernel(
        pool_k_ptr, pool_v_ptr, mirror_k_ptr, mirror_v_ptr, dst_rows_ptr, src_rows_ptr, count, vectors, blocks_per_row,
        DIM: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Persistent: program p decodes blocks p, p + P, ... of the ``count * blocks_per_row`` work items.

        Work item t: vectors ``(t % blocks_per_row) * BLOCK_V ..`` (a vector: one token and KV head)
        of mirror row ``src_rows[t // blocks_per_row]`` -> pool row ``dst_rows[...]``, K and V.
        """
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        for t in range(pid, count * blocks_per_row, programs):
            i = t // blocks_per_row
            j = (t - i * blocks_per_row).to(tl.int64)
            dst_row = tl.load(dst_rows_ptr + i).to(tl.int64)
            src_row = tl.load(src_rows_ptr + i).to(tl.int64)
            offs_v = j * BLOCK_V + tl.arange(0, BLOCK_V)
            # a negative index: nothing moves (vector form of the scalar tests, as the interpreter needs)
            live = (offs_v < vectors) & ((offs_v * 0 + dst_row) >= 0) & ((offs_v * 0 + src_row) >= 0)
            mask = live[:, None] & (tl.arange(0, BLOCK_D)[None, :] < DIM)
            row = src_row * vectors * (DIM + 1)  # a packed row: every vector's codes, then every vector's scale byte
            codes = row + offs_v * DIM
            scales = row + vectors * DIM + offs_v
            dst = (dst_row * vectors + offs_v) * DIM
            _unpack_block(mirror_k_ptr, pool_k_ptr, codes, scales, dst, mask, live, DIM, BLOCK_D)
            _unpack_block(mirror_v_ptr, pool_v_ptr, codes, scales, dst, mask, live, DIM, BLOCK_D)


DEFAULT_PROGRAMS = 16  # as lsa::copy_chunks: a few readers keep the host link busy and leave the SMs to decode


def unpack_chunks_triton(
    pool_k: Tensor, pool_v: Tensor, mirror_k: Tensor, mirror_v: Tensor, dst_rows: Tensor, src_rows: Tensor, *, block: int = 4096,
    programs: int | None = DEFAULT_PROGRAMS,
) -> None:
    """Triton launcher of ``lsa::unpack_chunks``: one launch on the current stream, no host sync.

    Operands: CUDA or pinned CPU tensors (CPU tensors under ``TRITON_INTERPRET=1``); row indices are
    not range-checked (that would sync). ``block``: pool elements per work item; ``programs``: how
    many persistent programs share the work (``None``: one per work item).
    """
    vectors, dim = _check(pool_k, pool_v, mirror_k, mirror_v, dst_rows, src_rows)
    if triton is None:
        raise ValueError("unpack_chunks (Triton): Triton is not installed")
    count = dst_rows.numel()
    if count == 0:
        return
    block_d = triton.next_power_of_2(dim)
    block_v = max(1, min(triton.next_power_of_2(vectors), block // block_d))
    blocks_per_row = triton.cdiv(vectors, block_v)
    work = count * blocks_per_row
    grid = work if programs is None else max(1, min(programs, work))
    _unpack_chunks_kernel[(grid,)](
        pool_k, pool_v, mirror_k, mirror_v, dst_rows, src_rows, count, vectors, blocks_per_row,
        DIM=dim, BLOCK_V=block_v, BLOCK_D=block_d, num_warps=4,
    )


@functools.lru_cache(maxsize=None)
def _warn_reference_fallback(problem: str) -> None:
    warnings.warn(f"lsa::unpack_chunks runs its PyTorch reference: {problem}", RuntimeWarning, stacklevel=3)


def unpack_chunks_impl(pool_k: Tensor, pool_v: Tensor, mirror_k: Tensor, mirror_v: Tensor, dst_rows: Tensor, src_rows: Tensor) -> None:
    """The Triton kernel when a GPU operand is involved and every operand is reachable from it, else the reference."""
    tensors = (pool_k, pool_v, mirror_k, mirror_v, dst_rows, src_rows)
    if any(t.is_cuda for t in tensors):
        problem = copy_chunks_problem(tensors)  # the same operand rules as the exact copy
        if problem is None:
            return unpack_chunks_triton(*tensors)
        _warn_reference_fallback(problem)
    unpack_chunks_ref(*tensors)


# -- op registration ---------------------------------------------------------------------------


@torch.library.custom_op("lsa::pack_chunks", mutates_args=("mirror_k", "mirror_v"))
def pack_chunks(mirror_k: Tensor, mirror_v: Tensor, pool_k: Tensor, pool_v: Tensor, dst_rows: Tensor, src_rows: Tensor) -> None:
    """Write-back into the compact mirror: pool rows ``src_rows`` -> packed mirror rows ``dst_rows`` (lossy).

    Example::

        >>> pool = torch.randn(4, 2, 1, 8); mirror = torch.zeros(1, 3, 2, 1, 9, dtype=torch.uint8)
        >>> pack_chunks(mirror, mirror.clone(), pool, pool.clone(), torch.tensor([2]), torch.tensor([1]))
        >>> bool(((unpack_fp8(mirror[0, 2], torch.float32) - pool[1]).abs() <= pool[1].abs() / 16 + 1e-3).all())
        True
    """
    pack_chunks_impl(mirror_k, mirror_v, pool_k, pool_v, dst_rows, src_rows)


@pack_chunks.register_fake
def _(mirror_k, mirror_v, pool_k, pool_v, dst_rows, src_rows):
    _check(pool_k, pool_v, mirror_k, mirror_v, dst_rows, src_rows)


@torch.library.custom_op("lsa::unpack_chunks", mutates_args=("pool_k", "pool_v"))
def unpack_chunks(pool_k: Tensor, pool_v: Tensor, mirror_k: Tensor, mirror_v: Tensor, dst_rows: Tensor, src_rows: Tensor) -> None:
    """Recall from the compact mirror: packed mirror rows ``src_rows`` -> pool rows ``dst_rows``, dequantised.

    Example::

        >>> pool = torch.zeros(4, 2, 1, 8); mirror = pack_fp8(torch.ones(1, 3, 2, 1, 8))
        >>> unpack_chunks(pool, pool.clone(), mirror, mirror.clone(), torch.tensor([3]), torch.tensor([1]))
        >>> pool[3].flatten().tolist() == [1.0] * 16
        True
    """
    unpack_chunks_impl(pool_k, pool_v, mirror_k, mirror_v, dst_rows, src_rows)


@unpack_chunks.register_fake
def _(pool_k, pool_v, mirror_k, mirror_v, dst_rows, src_rows):
    _check(pool_k, pool_v, mirror_k, mirror_v, dst_rows, src_rows)
