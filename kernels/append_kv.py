"""Writes of one decode token's K/V into the resident store.

Ops (namespace ``lsa``):
- ``append_kv``: write K/V of the token at position ``pos`` into the pool slot that the chunk table
  maps its chunk to. The memory manager guarantees, outside the decode step, that every chunk written
  during the coming window has a slot; this op never allocates and never syncs with the host.
- ``update_chunk_index``: fold the new key into the per-chunk key bounds (min/max over the chunk's
  tokens) that selectors score; a token that opens a chunk resets its bounds.
- ``ring_append_kv``: write into a sliding-window layer's ring of ``window`` tokens (slot ``pos % W``).

Layouts (per layer): ``k_pool``/``v_pool`` ``[B * S, C, Hkv, D]`` (sequence b owns slots
``b*S .. b*S+S-1``), ``chunk_slot`` ``[B, N]`` int64 (-1: not resident), ``k_new`` ``[B, Hkv, D]``,
``pos`` ``[1]`` int64 (the physical position, shared by the batch: sequences are left-padded),
``kmin``/``kmax`` ``[B, N, Hkv, D]``, ring ``[B, W, Hkv, D]``.

Triton (CUDA tensors): one launch per op on grid ``(B, Hkv)``, each program one head's ``D`` values;
``pos`` is read inside the kernel. ``append_kv_triton(..., kmin=, kmax=)`` also folds the key into the
chunk bounds in the same launch (the fused form of ``append_kv`` + ``update_chunk_index``). Unlike the
reference, which writes a token whose chunk has no slot (-1) into slot 0 of its sequence, the kernel
drops that write (and a chunk id past the table's end) instead of corrupting another chunk. The
kernel takes any head_dim and fp16/bf16/fp32 (casting the token to the pool's dtype); other operands
on CUDA run the reference with a one-time warning.

Not here: choosing which chunks are resident (``lsa_rewrite.runtime``).
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships for Linux only; every op then runs its reference.
    triton = None


def append_kv_ref(k_pool: Tensor, v_pool: Tensor, k_new: Tensor, v_new: Tensor, pos: Tensor, chunk_slot: Tensor) -> None:
    """Reference for ``lsa::append_kv`` (pure PyTorch, in place, no host sync)."""
    batch, num_chunks = chunk_slot.shape
    chunk = k_pool.shape[1]
    slots_per_seq = k_pool.shape[0] // batch
    logical = torch.div(pos, chunk, rounding_mode="floor")  # [1]
    offset = pos - logical * chunk  # [1]
    slot = chunk_slot.gather(1, logical.expand(batch, 1)).squeeze(1)  # [B]
    rows = torch.arange(batch, device=k_pool.device) * slots_per_seq + slot.clamp_min(0)  # [B]
    cols = offset.expand(batch)
    # A token whose chunk has no slot is dropped (as the Triton kernel does), never written elsewhere.
    held = (slot >= 0).view(batch, 1, 1)
    k_pool[rows, cols] = torch.where(held, k_new.to(k_pool.dtype), k_pool[rows, cols])
    v_pool[rows, cols] = torch.where(held, v_new.to(v_pool.dtype), v_pool[rows, cols])


def update_chunk_index_ref(kmin: Tensor, kmax: Tensor, k_new: Tensor, pos: Tensor, chunk_size: int) -> None:
    """Reference for ``lsa::update_chunk_index``: running per-chunk key bounds."""
    batch = kmin.shape[0]
    logical = torch.div(pos, chunk_size, rounding_mode="floor")  # [1]
    opens_chunk = (pos - logical * chunk_size) == 0  # [1]
    idx = logical.view(1, 1, 1, 1).expand(batch, 1, *kmin.shape[2:])  # [B, 1, Hkv, D]
    k = k_new.unsqueeze(1).to(kmin.dtype)  # [B, 1, Hkv, D]
    old_min = kmin.gather(1, idx)
    old_max = kmax.gather(1, idx)
    new_min = torch.where(opens_chunk, k, torch.minimum(old_min, k))
    new_max = torch.where(opens_chunk, k, torch.maximum(old_max, k))
    kmin.scatter_(1, idx, new_min)
    kmax.scatter_(1, idx, new_max)


def ring_append_kv_ref(k_ring: Tensor, v_ring: Tensor, k_new: Tensor, v_new: Tensor, pos: Tensor) -> None:
    """Reference for ``lsa::ring_append_kv``: slot ``pos % W`` of every sequence's ring."""
    window = k_ring.shape[1]
    slot = torch.remainder(pos, window)  # [1]
    k_ring.index_copy_(1, slot, k_new.unsqueeze(1).to(k_ring.dtype))
    v_ring.index_copy_(1, slot, v_new.unsqueeze(1).to(v_ring.dtype))


# -- Triton kernel -------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _append_token_kernel(
        k_dst_ptr, v_dst_ptr, k_new_ptr, v_new_ptr, pos_ptr, table_ptr, kmin_ptr, kmax_ptr,
        num_chunks, num_bounds, slots_per_seq, tokens_per_row, head_dim,
        stride_kd_row, stride_kd_tok, stride_kd_h, stride_kd_d,
        stride_vd_row, stride_vd_tok, stride_vd_h, stride_vd_d,
        stride_kn_b, stride_kn_h, stride_kn_d,
        stride_vn_b, stride_vn_h, stride_vn_d,
        stride_table_b, stride_table_n,
        stride_kmin_b, stride_kmin_n, stride_kmin_h, stride_kmin_d,
        stride_kmax_b, stride_kmax_n, stride_kmax_h, stride_kmax_d,
        WRITE_KV: tl.constexpr,
        IS_RING: tl.constexpr,
        UPDATE_BOUNDS: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """One (sequence, kv head): write the token's K/V into its row and/or fold K into its chunk's bounds.

        Pool: row ``b * slots_per_seq + table[b, pos // C]``, token ``pos % C`` (``tokens_per_row`` = C).
        Ring (``IS_RING``): row ``b``, token ``pos % W`` (``tokens_per_row`` = W).
        """
        pid_b = tl.program_id(0).to(tl.int64)
        pid_h = tl.program_id(1).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < head_dim

        pos = tl.load(pos_ptr)
        logical = pos // tokens_per_row
        offset = pos - logical * tokens_per_row
        k = tl.load(k_new_ptr + pid_b * stride_kn_b + pid_h * stride_kn_h + offs_d * stride_kn_d, mask=mask_d)

        if WRITE_KV:
            v = tl.load(v_new_ptr + pid_b * stride_vn_b + pid_h * stride_vn_h + offs_d * stride_vn_d, mask=mask_d)
            if IS_RING:
                row = pid_b
                mask_w = mask_d
            else:
                in_table = logical < num_chunks
                slot = tl.load(table_ptr + pid_b * stride_table_b + logical * stride_table_n, mask=in_table, other=-1)
                row = pid_b * slots_per_seq + slot
                # vector form of "slot >= 0": a non-resident chunk is not written anywhere
                mask_w = mask_d & ((offs_d * 0 + slot) >= 0)
            k_dst = k_dst_ptr + row * stride_kd_row + offset * stride_kd_tok + pid_h * stride_kd_h + offs_d * stride_kd_d
            v_dst = v_dst_ptr + row * stride_vd_row + offset * stride_vd_tok + pid_h * stride_vd_h + offs_d * stride_vd_d
            tl.store(k_dst, k.to(k_dst_ptr.dtype.element_ty), mask=mask_w)
            tl.store(v_dst, v.to(v_dst_ptr.dtype.element_ty), mask=mask_w)

        if UPDATE_BOUNDS:
            mask_b = mask_d & ((offs_d * 0 + logical) < num_bounds)
            kmin_ptrs = kmin_ptr + pid_b * stride_kmin_b + logical * stride_kmin_n + pid_h * stride_kmin_h + offs_d * stride_kmin_d
            kmax_ptrs = kmax_ptr + pid_b * stride_kmax_b + logical * stride_kmax_n + pid_h * stride_kmax_h + offs_d * stride_kmax_d
            # the key in the bounds' dtype first (as the reference); min/max then in fp32, which is
            # exact since the result is one of the inputs
            key = k.to(kmin_ptr.dtype.element_ty).to(tl.float32)
            # the chunk's first token resets its bounds (the old values belong to an earlier chunk)
            opens = (offs_d * 0 + offset) == 0
            old_min = tl.load(kmin_ptrs, mask=mask_b & ~opens, other=0.0).to(tl.float32)
            old_max = tl.load(kmax_ptrs, mask=mask_b & ~opens, other=0.0).to(tl.float32)
            new_min = tl.where(opens, key, tl.minimum(old_min, key))
            new_max = tl.where(opens, key, tl.maximum(old_max, key))
            tl.store(kmin_ptrs, new_min.to(kmin_ptr.dtype.element_ty), mask=mask_b)
            tl.store(kmax_ptrs, new_max.to(kmax_ptr.dtype.element_ty), mask=mask_b)


# -- launchers ---------------------------------------------------------------------------------
# No launch configuration to tune: each program moves a few hundred bytes; the launch is the cost.

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _token_problem(floats: tuple[Tensor, ...], pos: Tensor, table: Tensor | None = None) -> str | None:
    """Why the Triton kernel cannot take these operands (None: it can). ``floats``: K/V/bounds tensors."""
    if triton is None:
        return "Triton is not installed"
    indices = (pos,) if table is None else (pos, table)
    if len({t.device for t in (*floats, *indices)}) != 1:
        return "operands live on different devices"
    if any(t.dtype not in _FLOAT_DTYPES for t in floats):
        return "K/V and bounds must be fp16, bf16 or fp32"
    if any(t.dtype != torch.int64 for t in indices):
        return "pos and the chunk table must be int64"
    if pos.numel() != 1:
        return f"pos must hold one position, got shape {tuple(pos.shape)}"
    return None


@functools.lru_cache(maxsize=None)
def _warn_reference_fallback(op: str, problem: str) -> None:
    warnings.warn(f"lsa::{op} runs its PyTorch reference on CUDA: {problem}", RuntimeWarning, stacklevel=3)


def _launch_token(
    *, k_dst: Tensor | None, v_dst: Tensor | None, k_new: Tensor, v_new: Tensor | None, pos: Tensor,
    table: Tensor | None, kmin: Tensor | None, kmax: Tensor | None, slots_per_seq: int, tokens_per_row: int,
    is_ring: bool,
) -> None:
    batch, kv_heads, head_dim = k_new.shape
    if batch == 0 or kv_heads == 0 or head_dim == 0:
        return
    write_kv, update_bounds = k_dst is not None, kmin is not None
    # operands a mode does not use get stand-ins (views of k_new / pos); their constexpr branches are compiled out
    k_dst, v_dst = (k_dst, v_dst) if write_kv else (k_new.unsqueeze(1), k_new.unsqueeze(1))
    v_new = v_new if v_new is not None else k_new
    table = table if table is not None else pos.view(1, 1)
    kmin, kmax = (kmin, kmax) if update_bounds else (k_new.unsqueeze(1), k_new.unsqueeze(1))
    # rows: the pool's [B*S] slots, or the ring's [B] sequences; tokens: C or W per row
    _append_token_kernel[(batch, kv_heads)](
        k_dst, v_dst, k_new, v_new, pos, table, kmin, kmax,
        table.shape[1], kmin.shape[1], slots_per_seq, tokens_per_row, head_dim,
        k_dst.stride(0), k_dst.stride(1), k_dst.stride(2), k_dst.stride(3),
        v_dst.stride(0), v_dst.stride(1), v_dst.stride(2), v_dst.stride(3),
        k_new.stride(0), k_new.stride(1), k_new.stride(2),
        v_new.stride(0), v_new.stride(1), v_new.stride(2),
        table.stride(0), table.stride(1),
        kmin.stride(0), kmin.stride(1), kmin.stride(2), kmin.stride(3),
        kmax.stride(0), kmax.stride(1), kmax.stride(2), kmax.stride(3),
        WRITE_KV=write_kv,
        IS_RING=is_ring,
        UPDATE_BOUNDS=update_bounds,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        num_warps=1,
    )


def append_kv_triton(
    k_pool: Tensor,
    v_pool: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    pos: Tensor,
    chunk_slot: Tensor,
    *,
    kmin: Tensor | None = None,
    kmax: Tensor | None = None,
) -> None:
    """Triton launcher of ``lsa::append_kv``; with ``kmin``/``kmax`` it also does ``update_chunk_index``
    (chunk size: the pool's) in the same launch. One launch, grid ``(B, Hkv)``, no host sync, no allocation.
    """
    _check_append(k_pool, v_pool, k_new, v_new, pos, chunk_slot)
    if (kmin is None) != (kmax is None):
        raise ValueError("append_kv (Triton): pass both kmin and kmax, or neither")
    if kmin is not None:
        _check_bounds(kmin, kmax, k_new)
    bounds = (kmin, kmax) if kmin is not None else ()
    problem = _token_problem((k_pool, v_pool, k_new, v_new, *bounds), pos, chunk_slot)
    if problem is not None:
        raise ValueError(f"append_kv (Triton): {problem}")
    _launch_token(
        k_dst=k_pool, v_dst=v_pool, k_new=k_new, v_new=v_new, pos=pos, table=chunk_slot, kmin=kmin, kmax=kmax,
        slots_per_seq=k_pool.shape[0] // chunk_slot.shape[0], tokens_per_row=k_pool.shape[1], is_ring=False,
    )


def update_chunk_index_triton(kmin: Tensor, kmax: Tensor, k_new: Tensor, pos: Tensor, chunk_size: int) -> None:
    """Triton launcher of ``lsa::update_chunk_index``: one launch, grid ``(B, Hkv)``, no host sync."""
    _check_bounds(kmin, kmax, k_new)
    if chunk_size <= 0:
        raise ValueError(f"update_chunk_index (Triton): chunk_size must be positive, got {chunk_size}")
    problem = _token_problem((kmin, kmax, k_new), pos)
    if problem is not None:
        raise ValueError(f"update_chunk_index (Triton): {problem}")
    _launch_token(
        k_dst=None, v_dst=None, k_new=k_new, v_new=None, pos=pos, table=None, kmin=kmin, kmax=kmax,
        slots_per_seq=1, tokens_per_row=chunk_size, is_ring=False,
    )


def ring_append_kv_triton(k_ring: Tensor, v_ring: Tensor, k_new: Tensor, v_new: Tensor, pos: Tensor) -> None:
    """Triton launcher of ``lsa::ring_append_kv``: one launch, grid ``(B, Hkv)``, no host sync."""
    _check_ring(k_ring, v_ring, k_new, v_new)
    problem = _token_problem((k_ring, v_ring, k_new, v_new), pos)
    if problem is None and k_ring.shape[1] == 0:
        problem = "the ring has no slots"
    if problem is not None:
        raise ValueError(f"ring_append_kv (Triton): {problem}")
    _launch_token(
        k_dst=k_ring, v_dst=v_ring, k_new=k_new, v_new=v_new, pos=pos, table=None, kmin=None, kmax=None,
        slots_per_seq=1, tokens_per_row=k_ring.shape[1], is_ring=True,
    )


# -- op registration ---------------------------------------------------------------------------


def _check_append(k_pool: Tensor, v_pool: Tensor, k_new: Tensor, v_new: Tensor, pos: Tensor, chunk_slot: Tensor) -> None:
    if k_pool.dim() != 4 or k_pool.shape != v_pool.shape:
        raise ValueError(f"append_kv: k_pool/v_pool must be [B*S, C, Hkv, D] and equal, got {tuple(k_pool.shape)} / {tuple(v_pool.shape)}")
    if k_new.dim() != 3 or k_new.shape != v_new.shape:
        raise ValueError(f"append_kv: k_new/v_new must be [B, Hkv, D], got {tuple(k_new.shape)} / {tuple(v_new.shape)}")
    if chunk_slot.dim() != 2 or chunk_slot.shape[0] != k_new.shape[0] or k_pool.shape[0] % chunk_slot.shape[0]:
        raise ValueError(f"append_kv: chunk_slot {tuple(chunk_slot.shape)} does not match batch {k_new.shape[0]} and pool {tuple(k_pool.shape)}")
    if tuple(k_new.shape[1:]) != tuple(k_pool.shape[2:]):
        raise ValueError(f"append_kv: token heads/head_dim {tuple(k_new.shape[1:])} differ from the pool's {tuple(k_pool.shape[2:])}")
    if pos.numel() != 1:
        raise ValueError(f"append_kv: pos must hold one position, got shape {tuple(pos.shape)}")


def _check_bounds(kmin: Tensor, kmax: Tensor, k_new: Tensor) -> None:
    if kmin.shape != kmax.shape or kmin.dim() != 4 or tuple(k_new.shape) != (kmin.shape[0], *kmin.shape[2:]):
        raise ValueError(f"update_chunk_index: bounds {tuple(kmin.shape)} do not fit key {tuple(k_new.shape)}")


def _check_ring(k_ring: Tensor, v_ring: Tensor, k_new: Tensor, v_new: Tensor) -> None:
    if k_ring.shape != v_ring.shape or k_ring.dim() != 4 or tuple(k_new.shape) != (k_ring.shape[0], *k_ring.shape[2:]):
        raise ValueError(f"ring_append_kv: ring {tuple(k_ring.shape)} does not fit token {tuple(k_new.shape)}")


@torch.library.custom_op("lsa::append_kv", mutates_args=("k_pool", "v_pool"))
def append_kv(k_pool: Tensor, v_pool: Tensor, k_new: Tensor, v_new: Tensor, pos: Tensor, chunk_slot: Tensor) -> None:
    """Write one token's K/V ``[B, Hkv, D]`` at position ``pos`` into the resident pool.

    Example::

        >>> pool_k = torch.zeros(2 * 4, 16, 2, 8); pool_v = torch.zeros_like(pool_k)
        >>> table = torch.full((2, 8), -1, dtype=torch.long); table[:, 0] = 0
        >>> append_kv(pool_k, pool_v, torch.randn(2, 2, 8), torch.randn(2, 2, 8), torch.tensor([3]), table)
    """
    _check_append(k_pool, v_pool, k_new, v_new, pos, chunk_slot)
    if k_pool.is_cuda:
        problem = _token_problem((k_pool, v_pool, k_new, v_new), pos, chunk_slot)
        if problem is None:
            return append_kv_triton(k_pool, v_pool, k_new, v_new, pos, chunk_slot)
        _warn_reference_fallback("append_kv", problem)
    append_kv_ref(k_pool, v_pool, k_new, v_new, pos, chunk_slot)


@append_kv.register_fake
def _(k_pool, v_pool, k_new, v_new, pos, chunk_slot):
    return None


@torch.library.custom_op("lsa::update_chunk_index", mutates_args=("kmin", "kmax"))
def update_chunk_index(kmin: Tensor, kmax: Tensor, k_new: Tensor, pos: Tensor, chunk_size: int) -> None:
    """Fold the key ``[B, Hkv, D]`` of the token at ``pos`` into its chunk's bounds ``[B, N, Hkv, D]``."""
    _check_bounds(kmin, kmax, k_new)
    if kmin.is_cuda:
        problem = _token_problem((kmin, kmax, k_new), pos)
        if problem is None and chunk_size > 0:
            return update_chunk_index_triton(kmin, kmax, k_new, pos, chunk_size)
        _warn_reference_fallback("update_chunk_index", problem or f"chunk_size {chunk_size}")
    update_chunk_index_ref(kmin, kmax, k_new, pos, chunk_size)


@update_chunk_index.register_fake
def _(kmin, kmax, k_new, pos, chunk_size):
    return None


@torch.library.custom_op("lsa::ring_append_kv", mutates_args=("k_ring", "v_ring"))
def ring_append_kv(k_ring: Tensor, v_ring: Tensor, k_new: Tensor, v_new: Tensor, pos: Tensor) -> None:
    """Write one token's K/V ``[B, Hkv, D]`` into a sliding-window ring ``[B, W, Hkv, D]``."""
    _check_ring(k_ring, v_ring, k_new, v_new)
    if k_ring.is_cuda:
        problem = _token_problem((k_ring, v_ring, k_new, v_new), pos)
        if problem is None and k_ring.shape[1] > 0:
            return ring_append_kv_triton(k_ring, v_ring, k_new, v_new, pos)
        _warn_reference_fallback("ring_append_kv", problem or "the ring has no slots")
    ring_append_kv_ref(k_ring, v_ring, k_new, v_new, pos)


@ring_append_kv.register_fake
def _(k_ring, v_ring, k_new, v_new, pos):
    return None
