"""Chunk scorers the memory manager chooses the resident set with.

A selector maps one layer's chunk index and latest query to a score per chunk ``[B, N]``; higher
means more likely to be attended in the coming window. The manager adds the always-resident sink
and recent tail and keeps the top-scoring chunks that fit the pool.

- ``query-aware`` (training-free default): an upper bound on ``q . k`` over each chunk from its
  per-channel key min/max (as Quest does), maxed over query heads.
- ``recency``: newer chunks first (the keep-recent baseline).
- ``random``: uniform scores from a seeded generator (the random baseline).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Selector = Callable[..., Tensor]


def query_aware_scores(q: Tensor, kmin: Tensor, kmax: Tensor, **_: object) -> Tensor:
    """q [B, Hq, D], kmin/kmax [B, N, Hkv, D] -> [B, N] upper bound of q . k per chunk (max over heads)."""
    batch, q_heads, head_dim = q.shape
    kv_heads = kmin.shape[2]
    qg = q.float().view(batch, 1, kv_heads, q_heads // kv_heads, head_dim)  # [B, 1, Hkv, G, D]
    lo = kmin.float().unsqueeze(3)  # [B, N, Hkv, 1, D]
    hi = kmax.float().unsqueeze(3)
    bound = torch.maximum(qg * lo, qg * hi).sum(-1)  # [B, N, Hkv, G]
    return bound.flatten(2).amax(-1)


def recency_scores(q: Tensor, kmin: Tensor, kmax: Tensor, **_: object) -> Tensor:
    batch, num_chunks = kmin.shape[:2]
    return torch.arange(num_chunks, dtype=torch.float32, device=kmin.device).expand(batch, num_chunks).clone()


def random_scores(q: Tensor, kmin: Tensor, kmax: Tensor, *, generator: torch.Generator | None = None, **_: object) -> Tensor:
    batch, num_chunks = kmin.shape[:2]
    return torch.rand(batch, num_chunks, generator=generator).to(kmin.device)


SELECTORS: dict[str, Selector] = {
    "query-aware": query_aware_scores,
    "recency": recency_scores,
    "random": random_scores,
}
