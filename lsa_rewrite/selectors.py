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

from . import kernels  # noqa: F401  (registers lsa::chunk_scores)

Selector = Callable[..., Tensor]


def query_aware_scores(q: Tensor, kmin: Tensor, kmax: Tensor, **_: object) -> Tensor:
    """q [B, Hq, D], kmin/kmax [B, N, Hkv, D] -> [B, N] upper bound of q . k per chunk (max over heads).

    Runs ``lsa::chunk_scores``: one bandwidth-bound Triton pass over the chunk index on CUDA, its
    PyTorch reference elsewhere.
    """
    return torch.ops.lsa.chunk_scores(q, kmin, kmax)


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
