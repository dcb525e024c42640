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

Not here: choosing which chunks are resident (``lsa_rewrite.runtime``), Triton versions (later).
"""

from __future__ import annotations

import torch
from torch import Tensor


def append_kv_ref(k_pool: Tensor, v_pool: Tensor, k_new: Tensor, v_new: Tensor, pos: Tensor, chunk_slot: Tensor) -> None:
    """Reference for ``lsa::append_kv`` (pure PyTorch, in place, no host sync)."""
    batch, num_chunks = chunk_slot.shape
    chunk = k_pool.shape[1]
    slots_per_seq = k_pool.shape[0] // batch
    logical = torch.div(pos, chunk, rounding_mode="floor")  # [1]
    offset = pos - logical * chunk  # [1]
    slot = chunk_slot.gather(1, logical.expand(batch, 1)).squeeze(1)  # [B]
    rows = torch.arange(batch, device=k_pool.device) * slots_per_seq + slot.clamp_min(0)  # [B]
    k_pool[rows, offset.expand(batch)] = k_new.to(k_pool.dtype)
    v_pool[rows, offset.expand(batch)] = v_new.to(v_pool.dtype)


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


@torch.library.custom_op("lsa::append_kv", mutates_args=("k_pool", "v_pool"))
def append_kv(k_pool: Tensor, v_pool: Tensor, k_new: Tensor, v_new: Tensor, pos: Tensor, chunk_slot: Tensor) -> None:
    """Write one token's K/V ``[B, Hkv, D]`` at position ``pos`` into the resident pool.

    Example::

        >>> pool_k = torch.zeros(2 * 4, 16, 2, 8); pool_v = torch.zeros_like(pool_k)
        >>> table = torch.full((2, 8), -1, dtype=torch.long); table[:, 0] = 0
        >>> append_kv(pool_k, pool_v, torch.randn(2, 2, 8), torch.randn(2, 2, 8), torch.tensor([3]), table)
    """
    _check_append(k_pool, v_pool, k_new, v_new, pos, chunk_slot)
    append_kv_ref(k_pool, v_pool, k_new, v_new, pos, chunk_slot)


@append_kv.register_fake
def _(k_pool, v_pool, k_new, v_new, pos, chunk_slot):
    return None


@torch.library.custom_op("lsa::update_chunk_index", mutates_args=("kmin", "kmax"))
def update_chunk_index(kmin: Tensor, kmax: Tensor, k_new: Tensor, pos: Tensor, chunk_size: int) -> None:
    """Fold the key ``[B, Hkv, D]`` of the token at ``pos`` into its chunk's bounds ``[B, N, Hkv, D]``."""
    if kmin.shape != kmax.shape or kmin.dim() != 4 or tuple(k_new.shape) != (kmin.shape[0], *kmin.shape[2:]):
        raise ValueError(f"update_chunk_index: bounds {tuple(kmin.shape)} do not fit key {tuple(k_new.shape)}")
    update_chunk_index_ref(kmin, kmax, k_new, pos, chunk_size)


@update_chunk_index.register_fake
def _(kmin, kmax, k_new, pos, chunk_size):
    return None


@torch.library.custom_op("lsa::ring_append_kv", mutates_args=("k_ring", "v_ring"))
def ring_append_kv(k_ring: Tensor, v_ring: Tensor, k_new: Tensor, v_new: Tensor, pos: Tensor) -> None:
    """Write one token's K/V ``[B, Hkv, D]`` into a sliding-window ring ``[B, W, Hkv, D]``."""
    if k_ring.shape != v_ring.shape or k_ring.dim() != 4 or tuple(k_new.shape) != (k_ring.shape[0], *k_ring.shape[2:]):
        raise ValueError(f"ring_append_kv: ring {tuple(k_ring.shape)} does not fit token {tuple(k_new.shape)}")
    ring_append_kv_ref(k_ring, v_ring, k_new, v_new, pos)


@ring_append_kv.register_fake
def _(k_ring, v_ring, k_new, v_new, pos):
    return None
