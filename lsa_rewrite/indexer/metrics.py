"""Chunk-selection metrics over all chunks of each window, and the baselines' scores.

Per window (``scores``/``golden`` ``[N]``, ``mass`` ``[Ls, N]``), over the window's selectable chunks
(all but the always-resident sink and tail, which no selector chooses), at each budget fraction f of
those N chunks (k = ceil(f N), top-k by score, on top of the always-resident ones):
- golden recall: golden chunks kept / golden chunks (windows without a golden chunk are skipped);
- attention-mass recall: per sparse layer, mass on kept chunks / mass on all N selectable chunks, mean over layers;
- golden-recall ceiling: ``min(1, k / golden chunks)``, the golden recall of a perfect ranking (a window
  with more golden chunks than the budget keeps cannot be recalled in full by any selector).
All are averaged over windows. With probabilities, precision / recall / F1 at the threshold are
counted over all chunks of all windows, with the share of chunks above the threshold (how often the
manager would widen past the budget).

Baselines: ``recency_scores`` (newest chunks first), ``random_scores`` (seeded), ``query_aware_scores``
(the training-free bound of the runtime's query-aware selector, from recorded queries).
Not here: anything that needs the model.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

BUDGETS = (0.05, 0.10, 0.135, 0.25)


def budget_chunks(fraction: float, num_chunks: int) -> int:
    """``ceil(fraction * N)`` clamped to [1, N], robust to float round-off (0.135 * 200 gives 27, not 28)."""
    return max(1, min(num_chunks, math.ceil(fraction * num_chunks - 1e-9)))


def budget_key(fraction: float) -> str:
    """The JSON key of a budget: ``0.135 -> "0.135"``, ``0.1 -> "0.1"``."""
    return f"{fraction:g}"


class SelectionMetrics:
    """Accumulates the metrics of one scorer over windows; ``result()`` gives the JSON-ready dict.

    Example::

        >>> m = SelectionMetrics()
        >>> m.add(scores, golden, mass, probs=probs)
        >>> m.result()["golden_recall"]["0.1"]
    """

    def __init__(self, budgets: tuple[float, ...] = BUDGETS, *, threshold: float = 0.5) -> None:
        self.budgets = tuple(budgets)
        self.threshold = threshold
        self.windows = 0
        self.golden_windows = 0
        self.golden_recall = [0.0] * len(self.budgets)
        self.golden_ceiling = [0.0] * len(self.budgets)
        self.golden_share = 0.0
        self.mass_recall = [0.0] * len(self.budgets)
        self.tp = self.fp = self.fn = self.chunks = 0
        self.has_probs = False

    def add(
        self,
        scores: Tensor | Callable[[int], Tensor],
        golden: Tensor,
        mass: Tensor,
        *,
        probs: Tensor | None = None,
        selectable: Tensor | None = None,
    ) -> None:
        """One window: scores [N] (higher = keep first), golden bool [N], mass [Ls, N], probs [N] optional;
        ``selectable`` bool [N]: the chunks a selector chooses among (all when ``None``). ``scores`` may be
        a function of the number of chunks a budget keeps (``k -> [N]``), for a ranking that depends on
        it (the indexer's span rule, off below ``IndexerConfig.neighbour_min_free``)."""
        golden, mass = golden.detach().bool().cpu(), mass.detach().float().cpu()
        keep = selectable.detach().bool().cpu() if selectable is not None else torch.ones(golden.shape[0], dtype=torch.bool)
        golden, mass = golden[keep], mass[:, keep]
        if probs is not None and selectable is not None:
            probs = probs.detach()[keep.to(probs.device)]
        n = int(keep.sum())
        if n == 0:  # nothing to choose: every written chunk is always resident
            return
        rank = scores if callable(scores) else (lambda k, fixed=scores: fixed)
        orders: dict[int, Tensor] = {}
        positives = int(golden.sum())
        layer_mass = mass.sum(1)  # [Ls]
        live = layer_mass > 0
        for j, fraction in enumerate(self.budgets):
            k = budget_chunks(fraction, n)
            if k not in orders:
                orders[k] = torch.sort(rank(k).detach().float().cpu()[keep], descending=True, stable=True).indices
            kept = orders[k][:k]
            if positives:
                self.golden_recall[j] += float(golden[kept].sum()) / positives
                self.golden_ceiling[j] += min(1.0, k / positives)
            if live.any():
                self.mass_recall[j] += float((mass[:, kept].sum(1)[live] / layer_mass[live]).mean())
            else:
                self.mass_recall[j] += 1.0
        self.windows += 1
        self.golden_windows += positives > 0
        self.golden_share += positives / n
        self.chunks += n
        if probs is not None:
            self.has_probs = True
            predicted = probs.detach().float().cpu() > self.threshold
            self.tp += int((predicted & golden).sum())
            self.fp += int((predicted & ~golden).sum())
            self.fn += int((~predicted & golden).sum())

    def result(self) -> dict[str, Any]:
        keys = [budget_key(f) for f in self.budgets]
        out: dict[str, Any] = {
            "golden_recall": {k: (v / self.golden_windows if self.golden_windows else None) for k, v in zip(keys, self.golden_recall)},
            "mass_recall": {k: (v / self.windows if self.windows else None) for k, v in zip(keys, self.mass_recall)},
            # what a perfect ranking would reach, and the mean share of the selectable chunks that are golden
            "golden_recall_ceiling": {
                k: (v / self.golden_windows if self.golden_windows else None) for k, v in zip(keys, self.golden_ceiling)
            },
            "golden_share": self.golden_share / self.windows if self.windows else None,
        }
        if self.has_probs:
            tp, fp, fn = self.tp, self.fp, self.fn
            precision = tp / (tp + fp) if tp + fp else None
            recall = tp / (tp + fn) if tp + fn else None
            f1 = None if precision is None or recall is None else (2 * precision * recall / (precision + recall) if tp else 0.0)
            out.update(
                threshold=self.threshold,
                precision=precision,
                recall=recall,
                f1=f1,
                above_threshold=(tp + fp) / self.chunks if self.chunks else None,
            )
        return out


def recency_scores(num_chunks: int) -> Tensor:
    """Newest chunks first: the chunk index."""
    return torch.arange(num_chunks, dtype=torch.float32)


def random_scores(num_chunks: int, *, generator: torch.Generator) -> Tensor:
    return torch.rand(num_chunks, generator=generator)


def query_aware_scores(query: Tensor, kmin: Tensor, kmax: Tensor) -> Tensor:
    """The runtime's query-aware bound, over target layers: query [Lt, Hq, D], kmin/kmax [Lt, N, Hkv, D] -> [N].

    Per layer, the largest over query heads of ``sum_d max(q kmin, q kmax)`` (Quest's bound, as
    ``lsa::chunk_scores``); the runtime selects per layer, so the layers' bounds (on different scales)
    are combined by their mean normalised rank.
    """
    lt, q_heads, head_dim = query.shape
    kv_heads = kmin.shape[2]
    qg = query.float().view(lt, 1, kv_heads, q_heads // kv_heads, head_dim)  # [Lt, 1, Hkv, G, D]
    lo, hi = kmin.float().unsqueeze(3), kmax.float().unsqueeze(3)  # [Lt, N, Hkv, 1, D]
    bound = torch.maximum(qg * lo, qg * hi).sum(-1).flatten(2).amax(-1)  # [Lt, N]
    n = bound.shape[1]
    ranks = bound.argsort(dim=1, stable=True).argsort(dim=1).float() / max(n - 1, 1)
    return ranks.mean(0)
