"""Chunk selectors: the seam where the resident set's ranking comes from.

A selector sees the sparsely attended layers' state (the tensors of the per-layer state contract,
``runtime/state.py``: chunk index ``kmin``/``kmax``, the query tap ``q_tap``, ...) and the window
about to start, and returns a score per chunk ``[L, B, N]`` (one row per layer in the order given;
higher: more likely attended in the coming window). The selection policy (``runtime/policy.py``)
adds the always-resident sink and tail, masks chunks that are not written yet or are gone, and keeps
the top-scoring chunks that fit the pool. Selectors never allocate store state or move chunks.

- ``QueryAwareSelector`` (training-free default): an upper bound on ``q . k`` over each chunk from its
  per-channel key min/max (as Quest does), maxed over query heads.
- ``RecencySelector``: newer chunks first (the keep-recent baseline).
- ``IndexerSelector``: the trained lookahead indexer over the tapped hidden states and the chunk index.
- ``RandomSelector``: uniform scores from its own seeded generator (the random baseline); it never
  draws from the global RNG, so a run is reproducible whatever else uses ``torch.manual_seed``.

A wrapper (e.g. a tensor-parallel all-reduce of scores across ranks) implements the same protocol
around another selector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from . import kernels  # noqa: F401  (registers lsa::chunk_scores)


@dataclass(frozen=True)
class WindowMasks:
    """A window's chunk classes as device tensors, computed from a device-side position
    (``window_masks``), so that a selection captured in a CUDA graph recomputes them for every window.

    Args:
        resident: ``[B, N]`` the sink and tail chunks (``config.always_resident_chunks``).
        window: ``[B, N]`` the last token's chunk and every chunk the window writes (up to chunk N-1).
        written: ``[B, N]`` chunks holding at least one token before the window.
        padding: ``[B, N]`` chunks holding left padding only.
        beyond: ``[]`` int64: chunks the window writes past chunk N-1 (the end of the store).
    """

    resident: Tensor
    window: Tensor
    written: Tensor
    padding: Tensor
    beyond: Tensor

    def selectable(self) -> Tensor:
        """``[B, N]`` written chunks that are neither sink nor tail nor left padding only."""
        return self.written & ~self.padding & ~self.resident

    def free_slots(self, slots: int) -> Tensor:
        """``[]`` int64: ``slots`` less the most slots any sequence's sink, tail and window chunks take
        (``SelectionWindow.free_slots`` computed on the device)."""
        taken = (self.resident | self.window).sum(-1).amax() + self.beyond
        return slots - taken


def window_masks(
    position: Tensor, valid_start: Tensor, *, num_chunks: int, chunk_size: int, interval: int, lag: int, sink_tokens: int, recent_tokens: int
) -> WindowMasks:
    """The chunk classes of the window starting at ``position`` (``[]`` or ``[1]`` int64 on the device)
    for sequences whose real tokens start at ``valid_start`` (``[B]`` int64), in device ops only (no
    host sync, no host-to-device copy): the same chunks as ``SelectionWindow``'s host-side methods.

    Example::

        >>> m = window_masks(torch.tensor(100), torch.tensor([0]), num_chunks=8, chunk_size=16, interval=16,
        ...                  lag=0, sink_tokens=16, recent_tokens=32)
        >>> m.resident[0].nonzero().flatten().tolist(), m.window[0].nonzero().flatten().tolist()
        ([0, 4, 5, 6], [6, 7])
    """
    c = chunk_size
    p = position.reshape(()).to(torch.long)
    ids = torch.arange(num_chunks, device=valid_start.device)
    vs = valid_start.to(torch.long).view(-1, 1)  # [B, 1]
    resident = torch.zeros(vs.shape[0], num_chunks, dtype=torch.bool, device=valid_start.device)
    if sink_tokens:
        last = (torch.minimum(vs + sink_tokens, p) - 1).div(c, rounding_mode="floor")
        resident |= (p > vs) & (ids >= vs // c) & (ids <= last)
    tail_first = (p - max(recent_tokens, 1)).clamp_min(0) // c
    resident |= (p > 0) & (ids >= tail_first) & (ids <= (p - 1).div(c, rounding_mode="floor"))
    lo = (p - 1).clamp_min(0) // c
    hi = (p + interval + lag - 1) // c
    window = ((ids >= lo) & (ids <= hi)).expand_as(resident)
    beyond = (hi - torch.maximum(lo, torch.full_like(lo, num_chunks)) + 1).clamp_min(0)
    written = (ids < (p + c - 1) // c).expand_as(resident)
    return WindowMasks(resident=resident, window=window, written=written, padding=ids < vs // c, beyond=beyond)


@dataclass(frozen=True)
class SelectionWindow:
    """The decode window a selection chooses for.

    Args:
        start: first position the window decodes (tokens ``< start`` are held).
        interval: decode steps until the next selection.
        lag: steps before this selection's recalled chunks join the tables.
        chunk_size: tokens per chunk.
        valid_start: first real position of each sequence (left padding before it).
        slots: chunks the selection keeps per sequence, sink and tail included (``None``: not given).
        sink_tokens, recent_tokens: the always-resident sink and tail (``LSAConfig``; 0: not given).
        masks: the same classes as device tensors (``WindowMasks``), when the selection policy gives
            them: ``selectable``, ``unwritten`` and ``free_slots_tensor`` then read them, and a
            selection captured in a CUDA graph (which replays them, not ``start``) stays exact.
    """

    start: int
    interval: int
    lag: int
    chunk_size: int
    valid_start: tuple[int, ...]
    slots: int | None = None
    sink_tokens: int = 0
    recent_tokens: int = 0
    masks: WindowMasks | None = field(default=None, compare=False, repr=False)

    @property
    def written_chunks(self) -> int:
        """Chunks that hold at least one token before the window."""
        return -(-self.start // self.chunk_size)

    def always_resident(self, valid_start: int) -> list[int]:
        """Sink and tail chunks of a sequence starting at ``valid_start`` (``config.always_resident_chunks``)."""
        from .config import always_resident_chunks

        return always_resident_chunks(
            self.start, chunk_size=self.chunk_size, sink_tokens=self.sink_tokens, recent_tokens=self.recent_tokens, valid_start=valid_start
        )

    @property
    def free_slots(self) -> int | None:
        """Slots per sequence left to the selector beyond the sink, the tail and the chunks the window
        writes (the fewest over the batch); ``None`` when ``slots`` is not given."""
        if self.slots is None:
            return None
        c = self.chunk_size
        window = set(range(max(self.start - 1, 0) // c, (self.start + self.interval + self.lag - 1) // c + 1))
        return self.slots - max((len(set(self.always_resident(v)) | window) for v in self.valid_start), default=0)

    def selectable(self, num_chunks: int, device: torch.device | str | None = None) -> Tensor:
        """``[B, num_chunks]`` bool: written chunks that are neither sink nor tail nor left padding only
        (the chunks a selector chooses among; the policy keeps the others or cannot use them)."""
        if self.masks is not None and self.masks.written.shape[-1] == num_chunks:
            out = self.masks.selectable()
            return out.to(device) if device is not None else out
        c = self.chunk_size
        out = torch.zeros(len(self.valid_start), num_chunks, dtype=torch.bool)
        for b, first in enumerate(self.valid_start):
            out[b, first // c : min(self.written_chunks, num_chunks)] = True
            out[b, [i for i in self.always_resident(first) if i < num_chunks]] = False
        return out.to(device) if device is not None else out

    def unwritten(self, num_chunks: int, device: torch.device | str | None = None) -> Tensor:
        """``[num_chunks]`` bool: chunks holding no token before the window."""
        if self.masks is not None and self.masks.written.shape[-1] == num_chunks:
            return ~self.masks.written[0]
        return torch.arange(num_chunks, device=device) >= self.written_chunks

    def free_slots_tensor(self, device: torch.device | str | None = None) -> Tensor | None:
        """``free_slots`` as a ``[]`` int64 tensor (from ``masks`` on the device when given)."""
        if self.slots is None:
            return None
        if self.masks is not None:
            return self.masks.free_slots(self.slots)
        return torch.tensor(self.free_slots, device=device)


class LayerState(Protocol):
    """What a selector may read of one sparsely attended layer: the contract's tensors as attributes."""

    kmin: Tensor  # [B, N, Hkv, D]
    kmax: Tensor  # [B, N, Hkv, D]
    q_tap: Tensor  # [B, Hq, D]


@runtime_checkable
class Selector(Protocol):
    """``scores(layers, window) -> [L, B, N]`` float scores, on the layers' device.

    A selector may also set ``graph_safe = True``: its ``scores`` queues device work only (no host sync,
    no host-to-device copy, no collective), reads tensors that stay at fixed addresses (the layers'
    state, its own parameters), and reads the window only through ``window.masks`` and the methods
    that use them (``selectable``, ``unwritten``, ``free_slots_tensor``), not through ``start``. On CUDA
    the store then captures whole selections in CUDA graphs and replays them (``KVStore``); without
    the attribute a selection is queued op by op.
    """

    name: str

    def scores(self, layers: Sequence[LayerState], window: SelectionWindow) -> Tensor: ...


class PerLayerSelector:
    """A selector that scores each layer on its own state: subclasses implement ``layer_scores``."""

    name = "per-layer"

    def layer_scores(self, layer: LayerState, window: SelectionWindow) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def scores(self, layers: Sequence[LayerState], window: SelectionWindow) -> Tensor:
        return torch.stack([self.layer_scores(layer, window).float() for layer in layers])


class QueryAwareSelector(PerLayerSelector):
    """Upper bound of ``q . k`` per chunk from the key bounds, max over query heads (``lsa::chunk_scores``).

    Example::

        >>> sel = QueryAwareSelector()
        >>> sel.scores(store.chunk_layers, window).shape   # [L, B, N]
    """

    name = "query-aware"
    graph_safe = True

    def layer_scores(self, layer: LayerState, window: SelectionWindow) -> Tensor:
        return torch.ops.lsa.chunk_scores(layer.q_tap, layer.kmin, layer.kmax)


class RecencySelector(PerLayerSelector):
    """Newer chunks score higher."""

    name = "recency"
    graph_safe = True

    def layer_scores(self, layer: LayerState, window: SelectionWindow) -> Tensor:
        batch, num_chunks = layer.kmin.shape[:2]
        return torch.arange(num_chunks, dtype=torch.float32, device=layer.kmin.device).expand(batch, num_chunks).clone()


class RandomSelector(PerLayerSelector):
    """Uniform random scores from a generator of its own, seeded once (``LSAConfig.seed``)."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def layer_scores(self, layer: LayerState, window: SelectionWindow) -> Tensor:
        batch, num_chunks = layer.kmin.shape[:2]
        return torch.rand(batch, num_chunks, generator=self.generator).to(layer.kmin.device)


class IndexerSelector:
    """The trained lookahead indexer (``lsa_rewrite.indexer.LSAIndexer``, docs/indexer.md).

    At each target layer it runs the query tower on the tapped query-projection input (``idx_x``) and
    rotary ``idx_cos``/``idx_sin`` of the latest token, scores every chunk's key bounds (``kmin``/``kmax``)
    with the document tower, and ensembles the target layers; the one ``[B, N]`` map ranks chunks for
    every layer. Under ``IndexerConfig.ensemble="group"`` there is no ensemble: each layer gets the
    logits of the target layer whose group holds it (``layer_groups``), so layer groups keep resident
    sets of their own (with ``IndexerConfig.group_shared``, a share of each set from the shared ranking
    first). The indexer's span rule (``IndexerConfig.neighbour_margin``) applies to each
    target layer's logits before the ensemble, with the selectable chunks of the window as lenders.
    """

    name = "indexer"

    def __init__(self, indexer, *, kv_heads: slice | None = None, group=None):
        """``kv_heads``/``group`` under tensor parallelism: the KV heads this rank's chunk index holds and
        the ranks' process group; each rank sums its heads' share of every target layer's score and the
        shares are all-reduced (sum) before the scale, bias and ensemble, so every rank ranks chunks as
        the unsharded model would (the query tower reads the full hidden state, which every rank has)."""
        self.indexer = indexer.eval()
        self.kv_heads, self.group = kv_heads, group
        self.graph_safe = group is None  # an all-reduce of scores is not captured

    @property
    def threshold_score(self) -> float:
        """The score above which a chunk passes the indexer's threshold (the needle fallback counts
        them): its logit under the ``max`` and ``group`` ensembles (scores are logits), the probability under ``mean``."""
        p = float(self.indexer.config.threshold)
        return math.log(p / (1.0 - p)) if self.indexer.config.ensemble != "mean" else p

    def scores(self, layers: Sequence[LayerState], window: SelectionWindow) -> Tensor:
        cfg = self.indexer.config
        rows = self._rows(layers) if cfg.per_layer else None
        stacked = self.target_scores(layers, window)
        if rows is not None:  # each layer ranks by its group's target layer (views and a stack: graph-safe)
            return torch.stack([stacked[i] for i in rows])
        # Ranked by logits where that is the same order: a sigmoid saturates to 1.0 in float32 (z > ~17)
        # and would leave the top chunks tied.
        scores = stacked.amax(0) if cfg.ensemble == "max" else torch.sigmoid(stacked).mean(0)
        return scores.expand(len(layers), -1, -1)

    def target_scores(self, layers: Sequence[LayerState], window: SelectionWindow) -> Tensor:
        """Each target layer's logits ``[Lt, B, N]`` before the ensemble, after the span rule where the
        indexer has one (unwritten chunks then at ``-inf``); ``layers`` must include the target layers."""
        by_layer = {layer.spec.layer: layer for layer in layers}
        cfg = self.indexer.config
        logits = []
        with torch.no_grad():
            for i, target in enumerate(cfg.target_layers):
                layer, rope = by_layer[target], cfg.layer_rope(i)  # rotary per target layer (SmolLM3 mixes)
                q, w = self.indexer.query(i, layer.idx_x, layer.idx_cos if rope else None, layer.idx_sin if rope else None)
                logits.append(self.indexer.head_sum(i, q, w, layer.kmin, layer.kmax, kv_heads=self.kv_heads))
            sums = torch.stack(logits)  # [Lt, B, N]
            if self.group is not None:
                import torch.distributed as dist

                dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self.group)
            stacked = torch.stack([self.indexer.finish_logits(i, z) for i, z in enumerate(sums)])
            if cfg.neighbour_margin is not None or cfg.group_shared:
                # Only selectable chunks lend their score to a neighbour: not the sink and tail (kept
                # anyway), not chunks unwritten yet, which also take none.
                n = stacked.shape[-1]
                lenders = window.selectable(n, stacked.device)  # [B, N]
                free = window.free_slots_tensor(stacked.device)
                if cfg.neighbour_margin is not None:
                    stacked = self.indexer.spread(stacked, slots=free, lenders=lenders).masked_fill(window.unwritten(n, stacked.device), -torch.inf)
                # group_shared: each layer's free slots start with the shared ranking's best (the groups' union)
                stacked = self.indexer.share_slots(stacked.transpose(0, 1), slots=free, selectable=lenders).transpose(0, 1)
        return stacked

    def _rows(self, layers: Sequence[LayerState]) -> list[int]:
        """Under ``ensemble="group"``: the target layer number whose logits rank each of ``layers``."""
        cfg = self.indexer.config
        rows = [cfg.target_of(layer.spec.layer) for layer in layers]
        if None in rows:
            missing = [layer.spec.layer for layer, row in zip(layers, rows) if row is None]
            raise ValueError(
                f"indexer {self.indexer.source} chooses for layer groups {[list(g) for g in cfg.layer_groups or ()]}; "
                f"layers {missing} are in none of them (convert() checks this for indexers trained for the model)"
            )
        return rows


class AllReduceSelector:
    """Another selector's scores, agreed across tensor-parallel ranks by an all-reduce, so that every rank
    keeps the same resident set (and recalls the same chunks) although each holds only its own KV heads.

    With ``op="max"`` around the query-aware selector (a max over query heads) the agreed score is the
    max over all heads of the model, the single-process score. Runs outside the compiled step, once per
    selection: ``[L, B, N]`` float32 per rank. Every rank of ``group`` must select at the same steps
    (they do: the schedule depends only on positions).

    Example::

        >>> sel = AllReduceSelector(QueryAwareSelector(), group=dist.group.WORLD)
        >>> sel.scores(store.chunk_layers, window)   # the same tensor on every rank
    """

    graph_safe = False  # a collective per selection: queued op by op, never captured

    def __init__(self, inner: Selector, *, group, op: str = "max"):
        import torch.distributed as dist

        ops = {"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}
        if op not in ops:
            raise ValueError(f"AllReduceSelector op must be one of {sorted(ops)}, got {op!r}")
        self.inner, self.group, self.op = inner, group, ops[op]
        self.name = inner.name

    def __getattr__(self, name: str):  # threshold_score and the like come from the wrapped selector
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def scores(self, layers: Sequence[LayerState], window: SelectionWindow) -> Tensor:
        import torch.distributed as dist

        scores = self.inner.scores(layers, window).float().contiguous()
        dist.all_reduce(scores, op=self.op, group=self.group)
        return scores


def make_selector(name: str, *, seed: int = 0, indexer: object | None = None) -> Selector:
    """The selector named by ``LSAConfig.selector`` (a fresh one: the random selector's generator restarts).

    Example::

        >>> make_selector("recency").name
        'recency'
    """
    if name == "query-aware":
        return QueryAwareSelector()
    if name == "recency":
        return RecencySelector()
    if name == "random":
        return RandomSelector(seed)
    if name == "indexer":
        if indexer is None:
            raise ValueError("selector='indexer' needs an indexer: convert(model, config, indexer=PATH or LSAIndexer)")
        return IndexerSelector(indexer)
    raise ValueError(f"unknown selector {name!r}; known: query-aware, recency, random, indexer")
