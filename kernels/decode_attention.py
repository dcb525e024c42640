"""Decode attention of one query token over the resident KV store.

Ops (namespace ``lsa``):
- ``sparse_decode_attention``: attention over the chunks listed in a sequence's slot table. Each slot
  ``i`` of sequence ``b`` holds logical chunk ``slot_chunk[b, i]`` (-1: empty); its tokens sit at
  positions ``chunk * C + j``. A token takes part when its slot is filled, its position is at most
  ``pos`` (the token being decoded, already appended) and at least ``valid_start[b]`` (left padding).
  GQA-aware: query head ``h`` reads kv head ``h // (Hq // Hkv)``, as repeat_kv and ``enable_gqa`` do.
- ``ring_decode_attention``: exact attention over a sliding-window layer's ring of ``W`` tokens.

Scores are computed in float32; optional tanh soft-capping (``softcap > 0``) matches Gemma-2 style
``tanh(s / cap) * cap``. The result has the query's dtype.

Shapes: ``q`` ``[B, Hq, D]``; pool ``[B * S, C, Hkv, D]``; ``slot_chunk`` ``[B, S]`` int64;
``pos`` ``[1]`` int64; ``valid_start`` ``[B]`` int64; ring ``[B, W, Hkv, D]``; output ``[B, Hq, D]``.

Not here: prefill attention (the model's own), choosing the resident chunks (the memory manager).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _attend(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, *, scale: float, softcap: float) -> Tensor:
    """Masked softmax attention. q [B, Hq, D], k/v [B, N, Hkv, D], valid [B, N] -> [B, Hq, D]."""
    batch, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    qf = q.float().view(batch, kv_heads, group, head_dim)
    scores = torch.einsum("bhgd,bnhd->bhgn", qf, k.float()) * scale  # [B, Hkv, G, N]
    if softcap > 0.0:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhgn,bnhd->bhgd", probs, v.float())  # [B, Hkv, G, D]
    return out.reshape(batch, q_heads, head_dim).to(q.dtype)


def sparse_decode_attention_ref(
    q: Tensor,
    k_pool: Tensor,
    v_pool: Tensor,
    slot_chunk: Tensor,
    pos: Tensor,
    valid_start: Tensor,
    *,
    scale: float,
    softcap: float = 0.0,
) -> Tensor:
    """Reference for ``lsa::sparse_decode_attention`` (pure PyTorch)."""
    batch = q.shape[0]
    slots = slot_chunk.shape[1]
    chunk, kv_heads, head_dim = k_pool.shape[1:]
    k = k_pool.view(batch, slots * chunk, kv_heads, head_dim)
    v = v_pool.view(batch, slots * chunk, kv_heads, head_dim)
    offs = torch.arange(chunk, device=q.device)
    positions = (slot_chunk.unsqueeze(-1) * chunk + offs).view(batch, slots * chunk)  # [B, S*C]
    filled = (slot_chunk >= 0).unsqueeze(-1).expand(batch, slots, chunk).reshape(batch, slots * chunk)
    valid = filled & (positions <= pos) & (positions >= valid_start.unsqueeze(1))
    return _attend(q, k, v, valid, scale=scale, softcap=softcap)


def ring_decode_attention_ref(
    q: Tensor, k_ring: Tensor, v_ring: Tensor, pos: Tensor, valid_start: Tensor, *, scale: float, softcap: float = 0.0
) -> Tensor:
    """Reference for ``lsa::ring_decode_attention``: ring slot i holds the latest position = i mod W."""
    window = k_ring.shape[1]
    slot = torch.arange(window, device=q.device)
    positions = pos - torch.remainder(pos - slot, window)  # [W]
    valid = (positions >= 0).unsqueeze(0) & (positions.unsqueeze(0) >= valid_start.unsqueeze(1))  # [B, W]
    return _attend(q, k_ring, v_ring, valid, scale=scale, softcap=softcap)


def _check_query(name: str, q: Tensor, k: Tensor) -> None:
    if q.dim() != 3:
        raise ValueError(f"{name}: q must be [B, Hq, D], got {tuple(q.shape)}")
    if k.dim() != 4 or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{name}: keys {tuple(k.shape)} do not match q {tuple(q.shape)} (head_dim)")
    if q.shape[1] % k.shape[2]:
        raise ValueError(f"{name}: {q.shape[1]} query heads are not a multiple of {k.shape[2]} kv heads")


@torch.library.custom_op("lsa::sparse_decode_attention", mutates_args=())
def sparse_decode_attention(
    q: Tensor,
    k_pool: Tensor,
    v_pool: Tensor,
    slot_chunk: Tensor,
    pos: Tensor,
    valid_start: Tensor,
    scale: float,
    softcap: float = 0.0,
) -> Tensor:
    """Attention of one query token per sequence over its resident chunks.

    Example::

        >>> q = torch.randn(1, 4, 8)
        >>> k = torch.randn(1 * 2, 16, 2, 8); v = torch.randn_like(k)
        >>> table = torch.tensor([[0, 3]])  # slot 0 holds chunk 0, slot 1 chunk 3
        >>> out = sparse_decode_attention(q, k, v, table, torch.tensor([50]), torch.zeros(1, dtype=torch.long), 8 ** -0.5)
        >>> out.shape
        torch.Size([1, 4, 8])
    """
    _check_query("sparse_decode_attention", q, k_pool)
    if slot_chunk.dim() != 2 or k_pool.shape[0] != slot_chunk.shape[0] * slot_chunk.shape[1] or slot_chunk.shape[0] != q.shape[0]:
        raise ValueError(
            f"sparse_decode_attention: pool {tuple(k_pool.shape)} and slot table {tuple(slot_chunk.shape)} do not match batch {q.shape[0]}"
        )
    return sparse_decode_attention_ref(q, k_pool, v_pool, slot_chunk, pos, valid_start, scale=scale, softcap=softcap)


@sparse_decode_attention.register_fake
def _(q, k_pool, v_pool, slot_chunk, pos, valid_start, scale, softcap=0.0):
    return torch.empty_like(q)


@torch.library.custom_op("lsa::ring_decode_attention", mutates_args=())
def ring_decode_attention(
    q: Tensor, k_ring: Tensor, v_ring: Tensor, pos: Tensor, valid_start: Tensor, scale: float, softcap: float = 0.0
) -> Tensor:
    """Exact attention of one query token per sequence over a sliding-window ring ``[B, W, Hkv, D]``."""
    _check_query("ring_decode_attention", q, k_ring)
    return ring_decode_attention_ref(q, k_ring, v_ring, pos, valid_start, scale=scale, softcap=softcap)


@ring_decode_attention.register_fake
def _(q, k_ring, v_ring, pos, valid_start, scale, softcap=0.0):
    return torch.empty_like(q)
