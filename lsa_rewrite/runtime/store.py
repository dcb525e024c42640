"""The LSA KV store: sizing, per-layer state, prefill intake, the selection schedule, accounting.

Per rewritten layer (``ChunkLayer``) the store holds the tensors of the per-layer state contract
(``runtime/state.py``): the resident pool ``k_pool``/``v_pool`` ``[B * S, C, Hkv, D]`` (S slots per
sequence, sized from the budget, never from the full context), the chunk table ``chunk_slot``
``[B, N]`` and its inverse ``slot_chunk`` ``[B, S]``, the chunk index ``kmin``/``kmax``
``[B, N, Hkv, D]`` (per-chunk key bounds, what selectors score), the query tap ``q_tap``, and the
manager's state (``planned``, ``available``, ``dropped``). In offload mode a CPU mirror per layer
holds the full history (every layer's carved from one exact-size host allocation, page-locked when
CUDA is present): ``[B, N, C, Hkv, D]`` in the model's dtype (``LSAConfig.mirror="exact"``, lossless)
or ``[B, N, C, Hkv, D + 1]`` packed fp8 bytes (``"fp8"``, lossy, half the bytes:
``kernels/compact_chunks.py``). Evict mode has no mirror and no host memory that grows with the
context: the prefill writes the first resident set (sink and newest chunks) straight into the pool,
and every other chunk, of the prompt or decoded, is gone once it is not resident (counted in
``dropped``). Sliding-window layers (``RingLayer``) keep an exact ring of their last ``W`` tokens.

The store composes two parts that own the rest of the memory manager:

- ``SelectionPolicy`` (``runtime/policy.py``): which chunks stay (sink, tail, window, selector scores);
- ``MemoryMover`` (``runtime/mover.py``): slots, mirror, write-back and recall copies, streams.

On CUDA a selection is captured once as CUDA graphs and replayed for every later window
(``runtime/selection_graph.py``: a handful of launches instead of a few hundred).

Schedule (outside the decode step): ``ingest`` takes each layer's prompt KV (for the whole batch, or
for a few of its sequences at a time: ``LSAConfig.prefill_batch``), ``finish_prefill``
places the first resident set, ``probe`` fills the query taps and runs the first selection, then
around every decode step ``before_step`` (selection when due, position) and ``after_step``. Each
sequence of a batch has its own resident set. Nothing here allocates per decode step except at
selection time.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..config import LSAConfig
from ..selectors import Selector, make_selector
from ..kernels.compact_chunks import pack_fp8, unpack_fp8
from .host_memory import to_device
from .mover import MemoryMover, mirror_layout, new_mirrors, reusable_mirrors
from .policy import SelectionPolicy, min_slots
from .selection_graph import SelectionGraphs, write_back_width
from .state import RING_LAYER_STATE, STORE_STATE, allocate, check_tensor, layout


logger = logging.getLogger(__name__)


class StoreError(ValueError):
    """A store cannot hold what was asked of it (capacity, budget, unsupported call order)."""


class LSABudgetWarning(UserWarning):
    """The budget is too small for a short context's always-resident chunks: everything stays resident."""


@dataclass(frozen=True)
class LayerSpec:
    """What the store needs to know about one rewritten attention layer."""

    layer: int
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    window: int | None = None  # sliding-window layers keep an exact ring of this many tokens
    indexer_hidden: int = 0  # > 0: the indexer reads this layer (its query-projection input has this size)
    indexer_rotary: int = 0  # rotary channels the indexer taps (0: the model has no rotary embedding)

    @property
    def layout(self) -> str:
        """The layer's state contract (``runtime/state.py``)."""
        if self.window is not None:
            return "ring"
        return "rewrite+indexer" if self.indexer_hidden else "rewrite"


def _nbytes(t: Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class ChunkLayer:
    """Resident pool, tables, chunk index and mirror of one sparsely attended layer (``CHUNK_LAYER_STATE``,
    plus ``INDEXER_TAP_STATE`` where the indexer reads it)."""

    def __init__(
        self, spec: LayerSpec, dims: dict[str, int], *, device: torch.device, state: tuple[Tensor, Tensor, Tensor],
        mirror: tuple[Tensor, Tensor] | None = None,
    ):
        """``dims``: the contract's sizes; ``state``: views of the mover's stacked (planned, available,
        dropped); ``mirror``: this layer's (K, V) host tensors ``[B, N, C, Hkv, D]``, or None."""
        self.spec = spec
        self.contract = layout(spec.layout)
        dims = {**dims, "X": spec.indexer_hidden, "R": spec.indexer_rotary or spec.head_dim}
        for name, value in allocate(self.contract, dims, kv_dtype=spec.dtype, device=device, only_graph=True).items():
            setattr(self, name, value)
        self.planned, self.available, self.dropped = state
        for t in self.contract:
            check_tensor(t, getattr(self, t.name), dims, kv_dtype=spec.dtype, device=device, where=f"layer {spec.layer}")
        self.mirror_k, self.mirror_v = mirror if mirror is not None else (None, None)

    def device_tensors(self) -> dict[str, Tensor]:
        """Everything this layer holds on the device: what the graph is fed, and the manager's state."""
        return {t.name: getattr(self, t.name) for t in self.contract}

    @property
    def index_bytes(self) -> int:
        return _nbytes(self.kmin) + _nbytes(self.kmax)

    @property
    def mirror_bytes(self) -> int:
        return _nbytes(self.mirror_k) + _nbytes(self.mirror_v)

    @property
    def dropped_chunks(self) -> int:
        return int(self.dropped)

    @property
    def host_slot_chunk(self) -> list[list[int]]:
        """The planned slot -> chunk table per sequence, on the host (reads the device: for checks, not the manager)."""
        return self.planned.tolist()


class RingLayer:
    """Exact sliding-window KV: a ring of the last ``window`` tokens per sequence (``RING_LAYER_STATE``)."""

    contract = RING_LAYER_STATE

    def __init__(self, spec: LayerSpec, dims: dict[str, int], *, device: torch.device):
        self.spec = spec
        for name, value in allocate(self.contract, dims, kv_dtype=spec.dtype, device=device).items():
            setattr(self, name, value)

    def device_tensors(self) -> dict[str, Tensor]:
        return {t.name: getattr(self, t.name) for t in self.contract}


class KVStore:
    """All rewritten layers' KV for one batch of sequences, plus the manager that fills it.

    Life cycle: ``KVStore(...)`` sizes and allocates for the whole batch; ``ingest(layer, k, v)`` takes
    each layer's prompt KV during the dense prefill (``rows=``: a few sequences of the batch at a
    time, ``LSAConfig.prefill_batch``); ``finish_prefill()`` places the first resident set; then for
    every decode token ``before_step()`` (selection when due, position update), the compiled step,
    and ``after_step()``.

    Example::

        >>> spec = LayerSpec(layer=0, q_heads=4, kv_heads=2, head_dim=16, dtype=torch.float32)
        >>> store = KVStore([spec], LSAConfig(budget=0.25, chunk_size=16, interval=16, sink_tokens=16,
        ...                 recent_tokens=16), batch=1, capacity=1024)
        >>> store.ingest(0, torch.randn(1, 2, 900, 16), torch.randn(1, 2, 900, 16)); store.finish_prefill(900)
        >>> store.footprint()["ratio"] <= 0.25 * 1024 / 900
        True
    """

    def __init__(
        self,
        specs: list[LayerSpec],
        config: LSAConfig,
        *,
        batch: int,
        capacity: int,
        valid_start: list[int] | None = None,
        device: torch.device | str = "cpu",
        reuse: "KVStore | None" = None,
        selector: Selector | None = None,
        capture_selection: bool | None = None,
    ):
        """``reuse``: an earlier store whose CPU mirror this one takes over when the shapes match (that
        store is retired); ``selector``: scores chunks (default: the one ``config.selector`` names);
        ``capture_selection``: replay the selection as CUDA graphs (``runtime/selection_graph.py``) once
        it has run eagerly; ``None``: on CUDA when ``config.compile`` is on and the selector is
        ``graph_safe``; ``True`` on another device, or with a selector that is not, is refused."""
        device = torch.device(device)
        self.retired: str | None = None  # why this store may no longer be used (its mirror went to a newer one)
        if capacity < 1:
            raise StoreError(f"store capacity must be >= 1 token, got {capacity}")
        self.config, self.batch, self.capacity, self.device = config, batch, capacity, device
        self.chunk = config.chunk_size
        self.num_chunks = math.ceil(capacity / self.chunk)
        self.valid_start_host = list(valid_start) if valid_start is not None else [0] * batch
        if len(self.valid_start_host) != batch:
            raise StoreError(f"valid_start has {len(self.valid_start_host)} entries for a batch of {batch}")
        self.pos = torch.zeros(1, dtype=torch.long, device=device)  # [1] physical position being decoded
        self.valid_start = torch.tensor(self.valid_start_host, dtype=torch.long, device=device)  # [B]
        for t in STORE_STATE:
            check_tensor(t, getattr(self, t.name), {"1": 1, "B": batch}, kv_dtype=torch.float32, device=device, where="store")
        chunk_specs = [s for s in specs if s.window is None]
        self.selector = selector if selector is not None else make_selector(config.selector, seed=config.seed)
        safe = bool(getattr(self.selector, "graph_safe", False))
        if capture_selection and (device.type != "cuda" or not safe):
            why = f"the store is on {device.type}" if device.type != "cuda" else f"selector {self.selector.name!r} is not graph_safe"
            raise StoreError(f"capture_selection=True needs a CUDA store and a graph_safe selector, but {why}; pass capture_selection=None")
        self._capture = device.type == "cuda" and bool(config.compile) and safe if capture_selection is None else capture_selection
        self.budget_note: str | None = None  # why the budget was not applied as asked (see _plan_slots)
        self.slots = self._plan_slots(chunk_specs)
        self.base_slots = self.slots  # what a selection keeps unless the needle fallback widens it
        if config.fallback_budget is not None and self.slots < self.num_chunks:
            self.slots = max(self.slots, self._plan_slots(chunk_specs, budget=config.fallback_budget))
        self.all_resident = self.slots >= self.num_chunks
        mirrored = not self.all_resident and config.mode == "offload"  # evict mode keeps no host copy at all
        self.mirror = config.mirror if mirrored else None  # the mirror's format, None without one
        shapes = {s.layer: mirror_layout(batch, self.num_chunks, self.chunk, s.kv_heads, s.head_dim, s.dtype, config.mirror) for s in chunk_specs}
        mirrors = {}
        # The store whose mirror this one shares: it is retired when this store's prefill first writes,
        # so a prefill that fails before that leaves the running generation as it was.
        self._predecessor: KVStore | None = None
        if mirrored:
            if reuse is not None and not reuse.retired and reuse.device == device:
                mirrors = reusable_mirrors(reuse.layers, shapes)
            if mirrors:
                self._predecessor = reuse
            else:
                mirrors = new_mirrors(shapes, device)
        self.layers: dict[int, ChunkLayer | RingLayer] = {}
        self.mover = MemoryMover(
            len(chunk_specs), batch=batch, slots=self.slots, num_chunks=self.num_chunks, device=device, side_stream=mirrored, mirror=config.mirror,
        )
        for spec in specs:
            dims = {"B": batch, "S": self.slots, "N": self.num_chunks, "C": self.chunk, "Hq": spec.q_heads, "Hkv": spec.kv_heads, "D": spec.head_dim}
            if spec.window is None:
                state = self.mover.layer_state(len(self.mover.layers))
                layer = ChunkLayer(spec, dims, device=device, state=state, mirror=mirrors.get(spec.layer))
                self.mover.layers.append(layer)
            else:
                layer = RingLayer(spec, {**dims, "W": spec.window}, device=device)
            self.layers[spec.layer] = layer
        self.policy = SelectionPolicy(
            config, self.selector, batch=batch, slots=self.slots, num_chunks=self.num_chunks, capacity=capacity, base_slots=self.base_slots,
            valid_start=self.valid_start_host, device=device,
        )
        self.length = 0  # tokens held per sequence (physical, left padding included)
        self.steps = 0  # decode steps since the prefill
        self.synced = 0  # positions below this are in the mirror
        self.selections = 0
        self.next_selection = 1  # decode step before which the next selection runs
        self.lag = config.lag
        self.lag_max = config.lag_max
        # The captured selection (runtime/selection_graph.py): None until captured; `_graph_width`: chunks its
        # write-back looks at (0: never captured); `_graph_warm`: an eager selection has run its kernels.
        self._graphs: SelectionGraphs | None = None
        self._graph_width = write_back_width(config.interval, self.chunk) if self._capture and not self.all_resident else 0
        self._graph_warm = False
        self.capture_note: str | None = None  # why a capture failed (the selection then stays eager)
        self._first_keeps: tuple[int, Tensor] | None = None  # (prompt length, first resident set) the ingest placed
        # (layer, rows, chunks), copy-done event, K, V: the next layer's history being read ahead (_stage_next)
        self._staged: tuple | None = None
        self._piece: tuple | None = None  # the current piece's key and device index tensors (_piece_index)
        self._stage_stream: torch.cuda.Stream | None = None

    @property
    def chunk_layers(self) -> list[ChunkLayer]:
        """The sparsely attended layers, in model order."""
        return self.mover.layers

    @property
    def recalled_chunks(self) -> int:
        """Chunks copied from the mirror into the pool so far (reads the device)."""
        return int(self.mover.recalled)

    @property
    def written_back_chunks(self) -> int:
        return int(self.mover.written_back)

    def _retire(self, reason: str) -> None:
        """Give up this store: wait for its copies, drop its device buffers, refuse further use."""
        self.synchronize()
        self._drop_staged()
        self.retired = reason
        self.mover.pending = None
        if self._graphs is not None:
            self._graphs.release()
            self._graphs = None
        self._graph_width = 0
        for layer in self.layers.values():
            for t in layer.contract:
                if t.graph:
                    setattr(layer, t.name, None)
            if isinstance(layer, ChunkLayer):
                layer.mirror_k = layer.mirror_v = None

    def _check_live(self) -> None:
        if self.retired:
            raise StoreError(f"this store is retired: {self.retired}")

    def abandon(self, reason: str) -> None:
        """Give up this store (its prefill failed, or a conversation moved on to a newer one); a predecessor
        it has not written over stays live."""
        self._predecessor = None
        self._retire(reason)

    def _take_over(self) -> None:
        """This store's prefill is about to write the shared mirror: the store it came from is retired."""
        if self._predecessor is not None:
            self._predecessor._retire("a newer prefill took over this store's CPU mirror; decode with the cache that prefill returned")
            self._predecessor = None

    # -- sizing -------------------------------------------------------------------------------
    def _plan_slots(self, chunk_specs: list[LayerSpec], *, budget: float | int | None = None) -> int:
        cfg, n, c = self.config, self.num_chunks, self.chunk
        budget = cfg.budget if budget is None else budget
        if cfg.mode == "dense" or not chunk_specs:
            return n
        if isinstance(budget, int):
            slots = math.ceil(budget / c)
        else:
            # Byte budget per sequence: pool + index + tables + query and indexer taps + the manager's
            # planned table and availability map + (recall_lag > 0) the tables a pending recall
            # installs later <= budget x dense, summed over layers. The same on every device, so a CPU
            # and a CUDA conversion keep the same chunks: a captured selection's plan (on CUDA: those
            # tables at recall_lag 0 too, and its copies' rows, 16 bytes per slot and layer) is counted
            # by footprint() but not reserved here (at 128K, the 8B shape: 0.006% of the budget, 0.03% at recall_lag 0).
            pending = 1 if cfg.lag else 0
            allowed = pool_chunk = fixed = 0.0
            for s in chunk_specs:
                es = torch.empty((), dtype=s.dtype).element_size()
                kv_token = 2 * s.kv_heads * s.head_dim * es
                allowed += budget * self.capacity * kv_token
                taps = s.q_heads * s.head_dim + (s.indexer_hidden + 2 * (s.indexer_rotary or s.head_dim) if s.indexer_hidden else 0)
                fixed += n * kv_token + n * 8 * (1 + pending) + n + taps * es
                pool_chunk += c * kv_token + 8 + 8 + 8 * pending
            slots = math.floor((allowed - fixed) / pool_chunk)
        if slots >= n or (isinstance(budget, float) and budget >= 1.0):
            return n  # the budget covers the context: everything resident, the dense outputs
        need = min_slots(cfg)
        if slots < need and 2 * need >= n:
            # A short context: sink, tail and window alone are half of it or more, so sparse attention
            # saves little; keep everything resident rather than refuse, and say so once.
            self.budget_note = (
                f"budget {budget!r} cannot hold sink_tokens={cfg.sink_tokens}, recent_tokens={cfg.recent_tokens} and "
                f"interval={cfg.interval} ({need} chunks of {c}) beside a selection for a {self.capacity}-token context; "
                "every chunk is kept resident (the dense KV footprint)"
            )
            warnings.warn(self.budget_note, LSABudgetWarning, stacklevel=4)
            return n
        if slots < need and isinstance(budget, float):
            # A fraction too small for this context's always-resident chunks: the fewest chunks that work
            # (sink, tail, window), with one warning; an int budget is an explicit size and is refused.
            self.budget_note = (
                f"budget {budget!r} leaves {max(slots, 0)} resident chunks of {c} tokens for a {self.capacity}-token context, "
                f"fewer than sink_tokens={cfg.sink_tokens}, recent_tokens={cfg.recent_tokens}, interval={cfg.interval} and "
                f"recall_lag={cfg.lag} need; {need} chunks ({need * c / self.capacity:.1%} of the context) are kept resident instead"
            )
            warnings.warn(self.budget_note, LSABudgetWarning, stacklevel=4)
            return need
        if slots < need:
            raise StoreError(
                f"budget {budget!r} leaves {max(slots, 0)} resident chunks of {c} tokens per sequence for a "
                f"{self.capacity}-token context, but sink_tokens={cfg.sink_tokens}, recent_tokens={cfg.recent_tokens}, "
                f"interval={cfg.interval} and recall_lag={cfg.lag} need {need}; raise the budget, or lower "
                "sink_tokens/recent_tokens/interval/recall_lag"
            )
        return slots

    # -- prefill ------------------------------------------------------------------------------
    def ingest(self, layer: int, k: Tensor, v: Tensor, *, rows: slice | None = None, start: int = 0, prompt_len: int | None = None) -> None:
        """Take one layer's prompt KV ``[b, Hkv, T, D]`` (positions ``start..start+T-1``) during prefill.

        ``rows``: the sequences of the batch this KV belongs to (``LSAConfig.prefill_batch``: a batch
        prefilled a few prompts at a time); None: the whole batch. Every row takes the same ``T``
        (left padding included); ``finish_prefill`` runs once every row of every layer is in.
        ``start``: where this piece of the prompt begins (``LSAConfig.prefill_chunk``: a prompt
        prefilled a piece at a time, in order), a multiple of the chunk size; 0: the whole prompt.
        ``prompt_len``: the whole prompt's length when this is one of its pieces (default: the end of
        this piece), for the first resident set.
        """
        self._check_live()
        if self.steps or self.length:
            raise StoreError("the store takes one prefill per sequence batch; start a new generation for a new prompt")
        rows = self._rows(rows)
        if k.shape[0] != rows.stop - rows.start or v.shape != k.shape:
            raise StoreError(
                f"prefill KV of {k.shape[0]} sequences (K {tuple(k.shape)}, V {tuple(v.shape)}) for rows "
                f"{rows.start}..{rows.stop - 1} of a batch of {self.batch}; pass rows= matching the KV's batch dimension"
            )
        target = self.layers.get(layer)
        if target is None:
            return
        self._take_over()
        batch, heads, length, dim = k.shape
        c = self.chunk
        if start % c or start < 0:
            raise StoreError(f"a prompt piece must start at a multiple of the chunk size {c}, got start={start}")
        end = start + length  # this piece covers positions start..end-1
        if end > self.capacity:
            raise StoreError(f"prompt of {end} tokens exceeds the store capacity of {self.capacity}; raise LSAConfig.max_context")
        if prompt_len is not None and prompt_len < end:
            raise StoreError(f"a prompt piece ending at {end} is past the prompt's {prompt_len} tokens")
        k = k.detach().transpose(1, 2)  # [b, T, Hkv, D]
        v = v.detach().transpose(1, 2)
        if isinstance(target, RingLayer):
            w = target.spec.window
            lo = max(0, length - w)
            slots = torch.arange(start + lo, end, device=k.device) % w
            target.k_ring[rows, slots] = k[:, lo:].to(target.k_ring.dtype)
            target.v_ring[rows, slots] = v[:, lo:].to(target.v_ring.dtype)
            return
        first = start // c  # this piece's first chunk
        chunks = math.ceil(length / c)
        padded = chunks * c
        kp = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, padded - length)).view(batch, chunks, c, heads, dim)
        vp = torch.nn.functional.pad(v, (0, 0, 0, 0, 0, padded - length)).view(batch, chunks, c, heads, dim)
        # Key bounds over the real tokens only (left padding and the unfilled tail are excluded).
        position = start + torch.arange(padded, device=k.device).view(1, chunks, c, 1, 1)
        index = self._piece_index(rows, first, chunks, prompt_len if prompt_len is not None else end)
        valid = index["valid"].view(batch, 1, 1, 1, 1)
        real = (position >= valid) & (position < end)
        kf = kp.float()
        lo = torch.where(real, kf, torch.inf).amin(2)
        hi = torch.where(real, kf, -torch.inf).amax(2)
        del kf
        empty = ~real.any(2)
        span = slice(first, first + chunks)
        target.kmin[rows, span] = lo.masked_fill(empty, 0).to(target.kmin.dtype)
        target.kmax[rows, span] = hi.masked_fill(empty, 0).to(target.kmax.dtype)
        del lo, hi
        pool_k = target.k_pool.view(self.batch, self.slots, c, heads, dim)[rows]
        pool_v = target.v_pool.view(self.batch, self.slots, c, heads, dim)[rows]
        if self.all_resident:
            # Identity placement: chunk i lives in slot i of its sequence.
            pool_k[:, span] = kp.to(pool_k.dtype)
            pool_v[:, span] = vp.to(pool_v.dtype)
            target.available[rows, span] = True
            return
        # The first resident set goes straight into the slots finish_prefill's placement gives it (the
        # j-th kept chunk of a sequence in its slot j), exact from the prefill, not through the mirror.
        seq, slot, held = index["seq"], index["slot"], index["held"]
        pool_k[seq, slot] = kp[seq, held].to(pool_k.dtype)
        pool_v[seq, slot] = vp[seq, held].to(pool_v.dtype)
        if target.mirror_k is None:
            # Evict mode: the rest of the prompt is gone here, and counted; finish_prefill marks the
            # kept chunks available.
            kept = torch.zeros(batch, chunks, dtype=torch.bool, device=k.device)
            kept[seq, held] = True
            real_chunk = ~empty.view(batch, chunks)  # holds a real token (not only left padding)
            target.dropped += (real_chunk & ~kept).sum().to(target.dropped.device)
            return
        if self.mirror == "fp8":
            # Encoded on the device (half the bytes cross to the host), then into the pinned mirror.
            kp, vp = pack_fp8(kp), pack_fp8(vp)
        # Into the (pinned) mirror; finish_prefill waits for these copies.
        target.mirror_k[rows, span].copy_(kp, non_blocking=True)
        target.mirror_v[rows, span].copy_(vp, non_blocking=True)
        target.available[rows, span] = True

    def _piece_index(self, rows: slice, first: int, chunks: int, prompt_len: int) -> dict[str, Tensor]:
        """Device index tensors of one prompt piece (rows, first chunk, chunk count), the same for every
        layer: made once per piece, so that a layer's ingest queues no host-to-device copy (one would
        wait behind a read-ahead of the next layer's history on the copy engine). ``valid``: each row's
        first real position; ``seq``, ``slot``, ``held`` (sparse stores): the first resident chunks this piece holds
        (the keeps are chunk indices of the whole prompt, computed on the host: no host sync)."""
        key = (rows.start, rows.stop, first, chunks, prompt_len, tuple(self.valid_start_host[rows]))
        if self._piece is None or self._piece[0] != key:
            host = {"valid": torch.tensor(self.valid_start_host[rows])}
            if not self.all_resident:  # (identity placement otherwise)
                keeps = self._first_resident_keeps(prompt_len)[rows]  # [b, S]
                placed = (keeps >= first) & (keeps < first + chunks)
                seq, slot = placed.nonzero(as_tuple=True)
                host.update(seq=seq, slot=slot, held=keeps[seq, slot] - first)
            self._piece = (key, {name: to_device(t, self.device) for name, t in host.items()})
        return self._piece[1]

    def _rows(self, rows: slice | None) -> slice:
        """``rows`` as a slice ``start:stop`` of this store's batch (None: all of it), checked."""
        if rows is None:
            return slice(0, self.batch)
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise StoreError(f"rows must be a slice start:stop of the batch's sequences, got {rows!r}")
        start, stop, _ = rows.indices(self.batch)
        if rows.start is not None and not 0 <= rows.start < self.batch or rows.stop is not None and not 0 < rows.stop <= self.batch or start >= stop:
            raise StoreError(f"rows {rows.start}:{rows.stop} are not a non-empty range of the store's {self.batch} sequences")
        return slice(start, stop)

    def _first_resident_keeps(self, length: int) -> Tensor:
        """The first resident set ``[B, S]`` (host) of a ``length``-token prompt: the same for every
        layer's ingest and for ``finish_prefill``."""
        if self._first_keeps is None or self._first_keeps[0] != length:
            self._first_keeps = (length, self.policy.first_resident(length).cpu())
        return self._first_keeps[1]

    def history(self, layer: int, *, rows: slice | None = None, length: int | None = None) -> tuple[Tensor, Tensor]:
        """Every token this store holds for ``layer``, exactly: K, V ``[b, Hkv, length, D]`` on the device.

        For a later turn's prefill (multi-turn): resident chunks come from the pool, the others from
        the CPU mirror (offload mode keeps the whole history there); a sliding-window layer gives its
        last ``window`` tokens and zeros before them (its attention never reaches them). Refuses when
        a chunk is gone (evict mode dropped it). With ``LSAConfig(mirror="fp8")`` the chunks not
        resident come back dequantised (lossy, within the fp8 bound of ``kernels/compact_chunks.py``);
        resident ones as the pool holds them (exact, unless they were recalled from the mirror).
        ``rows``: only these sequences of the batch (a later turn prefilled a few prompts at a time,
        ``LSAConfig.prefill_batch``); None: all of them. ``length``: the first ``length`` tokens only,
        while a prompt is still being prefilled a piece at a time (``LSAConfig.prefill_chunk``: the
        pieces ingested so far); default: everything held.
        """
        self._check_live()
        target = self.layers.get(layer)
        if target is None:
            raise StoreError(f"layer {layer} keeps no KV in this store")
        rows = self._rows(rows)
        # Outstanding recall and write-back copies (a side stream) come first; the prefill's copies into
        # the mirror are on this stream already. The GPU waits, not the host: a prefill in pieces reads
        # every layer's history once per piece.
        self.mover.wait_on_current_stream()
        if length is not None and not 0 <= length <= max(self.length, self.capacity):
            raise StoreError(f"history of {length} tokens asked of a store of capacity {self.capacity}")
        b, length, c = rows.stop - rows.start, self.length if length is None else length, self.chunk
        if isinstance(target, RingLayer):
            w = target.spec.window
            k = target.k_ring.new_zeros(b, length, *target.k_ring.shape[2:])
            v = torch.zeros_like(k)
            lo = max(0, length - w)
            ring = torch.arange(lo, length, device=k.device) % w
            k[:, lo:], v[:, lo:] = target.k_ring[rows, ring], target.v_ring[rows, ring]
            return k.transpose(1, 2), v.transpose(1, 2)
        n = math.ceil(length / c)
        heads, dim = target.k_pool.shape[2:]
        if target.mirror_k is not None:
            # Every chunk comes from the mirror (then the pool's resident ones over it): no zero fill.
            raw_k, raw_v = self._mirror_read(layer, rows, n)
            if self.mirror == "fp8":  # packed bytes crossed the link, decoded here
                k, v = unpack_fp8(raw_k, target.k_pool.dtype), unpack_fp8(raw_v, target.k_pool.dtype)
            else:
                k, v = raw_k, raw_v
            if length is not None:
                self._stage_next(layer, rows, n)
        else:
            k = target.k_pool.new_zeros(b, n, c, heads, dim)
            v = torch.zeros_like(k)
        if self.all_resident:
            # Identity placement (chunk i in slot i), also before finish_prefill writes the tables.
            slot = torch.arange(n, device=target.chunk_slot.device).expand(b, n)
        else:
            slot = target.chunk_slot[rows, :n].long()  # the table the decode step reads
        resident = slot >= 0
        if target.mirror_k is None and self.config.mode == "evict":
            # Only evict mode drops chunks (offload keeps every one in the mirror, dense in the pool):
            # check there, on the host, that every real chunk is still held.
            starts = [s // c for s in self.valid_start_host[rows]]
            real = torch.arange(n, device=k.device).view(1, n) >= torch.tensor(starts, device=k.device).view(b, 1)
            if bool((real & ~resident.to(real.device)).any()):
                raise StoreError(
                    "this store no longer holds the whole history (mode='evict' dropped chunks), so a later turn cannot "
                    "attend to it exactly; convert with LSAConfig(mode='offload') for multi-turn use"
                )
        # Resident chunks from the pool (exact, and newer than the mirror for chunks decoded since the last
        # write-back): a gather of every chunk's slot and a select, so the host never waits on a mask. Not
        # needed while a prompt is still being prefilled into an exact mirror: the pool's chunks are copies
        # of the mirror's then, and the gather would double the history's device memory for nothing.
        if target.mirror_k is None or self.mirror == "fp8" or self.length:
            seqs = torch.arange(rows.start, rows.stop, device=slot.device).view(b, 1)
            pool_rows = (seqs * self.slots + slot.clamp_min(0)).view(-1)
            keep = resident.view(b, n, 1, 1, 1)
            k = torch.where(keep, target.k_pool.index_select(0, pool_rows).view_as(k), k)
            v = torch.where(keep, target.v_pool.index_select(0, pool_rows).view_as(v), v)
        k = k.view(b, n * c, heads, dim)[:, :length].transpose(1, 2)
        v = v.view(b, n * c, heads, dim)[:, :length].transpose(1, 2)
        return k, v

    def _mirror_read(self, layer: int, rows: slice, n: int) -> tuple[Tensor, Tensor]:
        """Chunks ``[rows, :n]`` of ``layer``'s mirror (as stored: packed with an fp8 mirror) on the
        device: the copy :meth:`_stage_next` started for them, or a non-blocking copy now (after the
        prefill's own copies into the mirror, which are earlier on this stream)."""
        staged = self._drop_staged()
        if staged is not None and staged[0] == (layer, rows.start, rows.stop, n):
            return staged[2], staged[3]
        target = self.layers[layer]
        # (a copy even where the mirror is on the device's side already: the caller may write to it)
        return (target.mirror_k[rows, :n].to(self.device, non_blocking=True, copy=True),
                target.mirror_v[rows, :n].to(self.device, non_blocking=True, copy=True))

    def _drop_staged(self) -> tuple | None:
        """Take the staged read (None if there is none); the current stream waits for its copy either way,
        so that its buffers are reused only after the side stream is done writing them."""
        staged, self._staged = self._staged, None
        if staged is not None and staged[1] is not None:
            torch.cuda.current_stream(self.device).wait_event(staged[1])
        return staged

    def _stage_next(self, layer: int, rows: slice, n: int) -> None:
        """A prompt prefilled in pieces reads each layer's history once per piece, in model order: start
        copying the next sparsely attended layer's (the same rows and chunks) on a side stream, so the
        host-to-device read overlaps this layer's attention instead of preceding the next one's. Costs
        one layer's history of device memory more while a piece runs; the last layer stages nothing (the
        next piece's history is longer)."""
        later = [i for i in self.layers if i > layer and isinstance(self.layers[i], ChunkLayer)]
        if not later:
            return
        nxt = self.layers[min(later)]
        if nxt.mirror_k is None:
            return
        if self.device.type != "cuda":
            raw = (nxt.mirror_k[rows, :n].to(self.device, copy=True), nxt.mirror_v[rows, :n].to(self.device, copy=True))
            self._staged = ((nxt.spec.layer, rows.start, rows.stop, n), None, *raw)
            return
        current = torch.cuda.current_stream(self.device)
        if self._stage_stream is None:
            self._stage_stream = torch.cuda.Stream(self.device)
        # Allocated on the current stream (which frees them after waiting for the copy's event), filled on
        # the side stream once the current stream's earlier copies into the mirror are done.
        raw_k = torch.empty(nxt.mirror_k[rows, :n].shape, dtype=nxt.mirror_k.dtype, device=self.device)
        raw_v = torch.empty_like(raw_k)
        for t in (raw_k, raw_v):  # freed unread (a prefill that failed), their memory waits for the copy
            t.record_stream(self._stage_stream)
        self._stage_stream.wait_stream(current)
        with torch.cuda.stream(self._stage_stream):
            raw_k.copy_(nxt.mirror_k[rows, :n], non_blocking=True)
            raw_v.copy_(nxt.mirror_v[rows, :n], non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stage_stream)
        self._staged = ((nxt.spec.layer, rows.start, rows.stop, n), done, raw_k, raw_v)

    def finish_prefill(self, length: int) -> None:
        """Record the prompt length and place the first resident set (sink + newest chunks)."""
        if length >= self.capacity:
            raise StoreError(f"prompt of {length} tokens leaves no room to decode in a store of {self.capacity}; raise LSAConfig.max_context")
        self._take_over()
        self._drop_staged()  # nothing reads ahead once the prompt is in
        self._piece = None
        self.length = self.synced = length
        self.next_selection = 1
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the prompt's copies into the mirror
        if self.all_resident:
            self.mover.place_identity()
            return
        if self._first_keeps is not None and self._first_keeps[0] != length:
            raise StoreError(f"the prompt's KV was ingested for {self._first_keeps[0]} tokens, but the prefill finished at {length}")
        keeps = self._first_resident_keeps(length).to(self.device).expand(len(self.chunk_layers), -1, -1)
        self._first_keeps = None  # only the ingest needed it
        # ingest already wrote these chunks into their slots: nothing to recall
        self.mover.apply(keeps, written=range(0), lag=0, evict=False, step=self.steps, recall=False)

    # -- decode -------------------------------------------------------------------------------
    def before_step(self) -> None:
        """Run between decode steps: selection when due, then set the position being decoded."""
        self._check_live()
        if self.length >= self.capacity:
            raise StoreError(
                f"sequence reached the store capacity of {self.capacity} tokens; raise LSAConfig.max_context "
                "or pass max_new_tokens to generate() so the store is sized for it"
            )
        if self.mover.swap_due(self.steps):
            self.mover.swap()
        if not self.all_resident and self.steps == self.next_selection:
            self.select()
            self.next_selection += self.config.interval
        self.pos.fill_(self.length)

    def probe(self, run_step: Callable[[], object], taps: dict[int, Tensor] | None = None) -> None:
        """Choose the first window's resident set with the real queries of the last prompt token.

        The prefill (the model's own attention) leaves no queries behind, so right after it
        ``run_step`` re-runs the decode step on the last prompt token (position T-1) over the
        initial resident set (sink + newest chunks). That fills every layer's ``q_tap``; what the step
        wrote at T-1 (K/V from approximate deeper layers, chunk bounds) is put back exactly as the
        prefill left it, and the first selection runs with those queries. The regular schedule then
        selects again before decode step 1 (with the first generated token's queries) and every
        ``interval`` steps after that.

        ``taps``: ``{layer: [B, hidden]}``, the indexer's query-projection inputs at T-1 as the model's
        own prefill computed them (``lsa_rewrite.prefill_taps``); they replace the step's ``idx_x`` of
        those layers, which came from layers attending over the first resident set only.
        """
        if self.all_resident or not self.chunk_layers or self.steps or not self.length:
            return
        pos = self.length - 1
        chunk = pos // self.chunk
        saved = []
        for layer in self.chunk_layers:
            rows = self.mover.row_seq[: self.batch, 0] * self.slots + layer.chunk_slot[:, chunk]  # the last chunk is always resident
            saved.append((layer, rows, layer.k_pool[rows].clone(), layer.v_pool[rows].clone(), layer.kmin[:, chunk].clone(), layer.kmax[:, chunk].clone()))
        rings = []
        for layer in self.layers.values():
            if isinstance(layer, RingLayer):  # the step rewrites T-1 in the ring of a sliding-window layer too
                slot = pos % layer.spec.window
                rings.append((layer, slot, layer.k_ring[:, slot].clone(), layer.v_ring[:, slot].clone()))
        self.pos.fill_(pos)
        run_step()
        for layer, rows, k, v, lo, hi in saved:
            layer.k_pool[rows] = k
            layer.v_pool[rows] = v
            layer.kmin[:, chunk] = lo
            layer.kmax[:, chunk] = hi
        for layer, slot, k, v in rings:
            layer.k_ring[:, slot] = k
            layer.v_ring[:, slot] = v
        for index, x in (taps or {}).items():
            tapped = self.tensor(index, "idx_x")
            if x.shape != tapped.shape:
                raise StoreError(f"layer {index}: the prefill's indexer input is {tuple(x.shape)}, the store's tap {tuple(tapped.shape)}")
            tapped.copy_(x)
        self.select(lag=0)
        self.next_selection = 1  # and again once the first generated token has its own queries

    def after_step(self) -> None:
        self.length += 1
        self.steps += 1

    def select(self, lag: int | None = None) -> None:
        """Choose and load the resident set for the next ``interval`` tokens, for every layer and sequence.

        Everything runs as device work queued on the current stream, with no host sync: the policy
        scores and ranks (``SelectionPolicy.choose``), the mover plans slots, drops what leaves at
        once, writes back the chunks decoded since the last selection and recalls the incoming ones
        (on a side stream on CUDA); the recalled chunks join the tables ``lag`` decode steps later
        (``LSAConfig.recall_lag``; 0: right here), after the main stream waits for the copies (with
        ``LSAConfig.recall_lag_max``: at the first step from then on whose copies are done, at most
        ``recall_lag_max`` steps later). An explicit ``lag`` is exact (``recall_lag_max`` does not apply).
        """
        lag, lag_max = (self.lag, self.lag_max) if lag is None else (lag, lag)
        self.mover.swap()  # a pending recall from the last selection goes in first
        layers = self.chunk_layers
        if not layers:
            return
        pos, c = self.length, self.chunk
        written = range(self.synced // c, math.ceil(pos / c))
        graphs = self._captured(written)
        if graphs is not None:
            graphs.run(self.mover, pos=pos, first=written.start, step=self.steps, lag=lag, lag_max=lag_max)
        else:
            chosen = self.policy.choose(layers, self.mover.available, pos)
            self.mover.apply(
                chosen, written=written, lag=lag, lag_max=lag_max, evict=self.config.mode == "evict", step=self.steps, width=self._graph_width
            )
            if self._graph_width and len(written) <= self._graph_width:
                self._graph_warm = True  # this selection ran every kernel a captured one runs
        self.synced = pos
        self.selections += 1

    def _captured(self, written: range) -> SelectionGraphs | None:
        """The captured selection for a window whose write-back is ``written``, capturing it when the eager
        selection has warmed up; None: select eagerly (not captured, not warm yet, or not covered)."""
        if not self._graph_width or len(written) > self._graph_width:
            return None
        if self._graphs is None:
            if not self._graph_warm:
                return None
            try:
                self._graphs = SelectionGraphs(self, width=self._graph_width)
            except Exception as exc:  # the capture failed: this store selects eagerly from now on
                self._graph_width = 0
                self.capture_note = f"the selection was not captured in a CUDA graph ({type(exc).__name__}: {exc}); it runs eagerly"
                logger.debug("selection capture failed", exc_info=True)
                warnings.warn(self.capture_note, RuntimeWarning, stacklevel=3)
                return None
        return self._graphs

    @property
    def selection_captured(self) -> bool:
        """Whether selections replay CUDA graphs now (``runtime/selection_graph.py``)."""
        return self._graphs is not None

    def synchronize(self) -> None:
        """Wait for outstanding recall and write-back copies (e.g. before reading the mirror on the host)."""
        self.mover.synchronize()

    # -- graph binding ------------------------------------------------------------------------
    def tensor(self, layer: int | None, name: str) -> Tensor:
        """The device tensor a rewritten graph binds to placeholder ``(layer, name)``."""
        if layer is None:
            return getattr(self, name)
        return getattr(self.layers[layer], name)

    def device_tensors(self) -> list[Tensor]:
        """Every tensor the store holds on the device: the graph's inputs and the manager's state."""
        out = [getattr(self, t.name) for t in STORE_STATE] + self.mover.device_tensors() + self.policy.device_tensors()
        if self._graphs is not None:
            out += self._graphs.tensors()
        for layer in self.layers.values():
            out.extend(layer.device_tensors().values())
        return out

    # -- accounting ---------------------------------------------------------------------------
    def footprint(self) -> dict[str, float | int]:
        """Accelerator-side bytes held against what a dense cache holds for the same sequences, and the
        host memory held for them (``host_bytes``: the mirror's page-aligned host allocation; 0 in evict
        mode, with a covering budget and in dense mode)."""
        resident = sum(_nbytes(t) for t in self.device_tensors())
        dense = pools = index = mirror = 0
        arenas = {}
        tokens = max(self.length, 1)
        dropped = 0
        for layer in self.layers.values():
            s = layer.spec
            es = torch.empty((), dtype=s.dtype).element_size()
            held = tokens if s.window is None else min(tokens, s.window)
            dense += self.batch * held * 2 * s.kv_heads * s.head_dim * es
            if isinstance(layer, ChunkLayer):
                pools += _nbytes(layer.k_pool) + _nbytes(layer.v_pool)
                index += layer.index_bytes
                mirror += layer.mirror_bytes
                for t in (layer.mirror_k, layer.mirror_v):
                    arena = getattr(t, "_lsa_host_arena", None)
                    if arena is not None:
                        arenas[id(arena)] = arena.nbytes
                    elif t is not None:
                        arenas[id(t)] = _nbytes(t)
                dropped += layer.dropped_chunks
            else:
                pools += _nbytes(layer.k_ring) + _nbytes(layer.v_ring)
        return {
            "resident_kv_bytes": resident,
            "dense_kv_bytes": dense,
            "ratio": resident / dense if dense else 0.0,
            "pool_bytes": pools,
            "index_bytes": index,
            "table_bytes": resident - pools - index,
            "mirror_bytes": mirror,
            "mirror": self.mirror or "none",
            "host_bytes": sum(arenas.values()),
            "dropped_chunks": dropped,
            "tokens": self.length,
            "capacity_tokens": self.capacity,
            "slots_per_sequence": self.slots,
            "base_slots_per_sequence": self.base_slots,
            "widened": int(self.policy.widened),
            "selections": self.selections,
            "budget_note": self.budget_note,
        }
