"""The LSA KV store and its memory manager.

Per rewritten layer (``ChunkLayer``):
- resident pool ``k_pool``/``v_pool`` ``[B * S, C, Hkv, D]``: S slots per sequence, sized from the
  budget, never from the full context;
- chunk table ``chunk_slot`` ``[B, N]`` (logical chunk -> slot, -1 when not resident) and its
  inverse ``slot_chunk`` ``[B, S]``, which the decode attention reads;
- chunk index ``kmin``/``kmax`` ``[B, N, Hkv, D]``: per-chunk key bounds, what selectors score;
- ``q_tap`` ``[B, Hq, D]``: the latest query, written by the decode step;
- CPU mirror ``[B, N, C, Hkv, D]`` holding the full history in offload mode: every layer's carved
  from one exact-size host allocation, page-locked when CUDA is present (``host_memory.HostArena``).
  In evict mode it only stages the prompt until the first selection; afterwards a chunk that leaves
  the pool is gone and counted in ``dropped_chunks``.
- manager state ``planned`` ``[B, S]`` (the table once a pending recall is in), ``available``
  ``[B, N]`` (held in pool or mirror), ``dropped``: views of the store's stacked ``[L, B, ...]``
  tensors, on the device and counted in ``footprint()``, never fed to the graph.
Sliding-window layers (``RingLayer``) keep an exact ring of their last ``W`` tokens.

The manager side (``ingest``/``finish_prefill``/``before_step``/``after_step``) runs outside the
decode step: every ``interval`` steps it scores every chunk, keeps sink + recent tail + the chunks the
next ``interval + recall_lag`` tokens write + the top-scoring rest, and plans all layers and
sequences in one pass of device tensor ops (no host sync). Chunks that leave the pool leave the
tables at once; on a side stream (CUDA) the chunks decoded since the last selection are written back
to the mirror and the incoming chunks are recalled into free slots (``lsa::copy_chunks``); the tables
take the recalled chunks ``recall_lag`` steps later, after the main stream waits on the copies'
event. Each sequence of a batch has its own resident set. Nothing here allocates per decode step
except at selection time.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..config import LSAConfig
from ..kernels.copy_chunks import copy_chunks_problem, copy_chunks_ref, copy_chunks_triton
from ..selectors import SELECTORS
from .host_memory import HostArena

_INDEX = torch.long


def _copy(dst_k: Tensor, dst_v: Tensor, src_k: Tensor, src_v: Tensor, dst_rows: Tensor, src_rows: Tensor) -> None:
    """Chunk rows ``src`` -> ``dst`` (pool <-> mirror): one Triton launch on the current stream on CUDA."""
    operands = (dst_k, dst_v, src_k, src_v, dst_rows, src_rows)
    if (dst_k.is_cuda or src_k.is_cuda) and copy_chunks_problem(operands) is None:
        copy_chunks_triton(*operands)
    else:
        copy_chunks_ref(*operands)


class StoreError(ValueError):
    """A store cannot hold what was asked of it (capacity, budget, unsupported call order)."""


@dataclass(frozen=True)
class LayerSpec:
    """What the store needs to know about one rewritten attention layer."""

    layer: int
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    window: int | None = None  # sliding-window layers keep an exact ring of this many tokens


def _nbytes(t: Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class ChunkLayer:
    """Resident pool, tables, chunk index and mirror of one sparsely attended layer."""

    graph_tensors = ("k_pool", "v_pool", "slot_chunk", "chunk_slot", "kmin", "kmax", "q_tap")
    manager_tensors = ("planned", "available", "dropped")  # on the device too, never fed to the graph

    def __init__(
        self, spec: LayerSpec, *, batch: int, slots: int, num_chunks: int, chunk: int, mirrored: bool, device: torch.device,
        state: tuple[Tensor, Tensor, Tensor], mirror: tuple[Tensor, Tensor] | None = None,
    ):
        """``mirror``: this layer's (K, V) host tensors ``[B, N, C, Hkv, D]`` when ``mirrored`` (the store
        allocates every layer's at once, page-locked on CUDA, or hands over an earlier store's)."""
        h, d, dt = spec.kv_heads, spec.head_dim, spec.dtype
        self.spec, self.batch, self.slots, self.num_chunks, self.chunk = spec, batch, slots, num_chunks, chunk
        self.k_pool = torch.zeros(batch * slots, chunk, h, d, dtype=dt, device=device)  # [B*S, C, Hkv, D]
        self.v_pool = torch.zeros_like(self.k_pool)
        self.slot_chunk = torch.full((batch, slots), -1, dtype=_INDEX, device=device)  # [B, S]
        self.chunk_slot = torch.full((batch, num_chunks), -1, dtype=_INDEX, device=device)  # [B, N]
        self.kmin = torch.zeros(batch, num_chunks, h, d, dtype=dt, device=device)  # [B, N, Hkv, D]
        self.kmax = torch.zeros_like(self.kmin)
        self.q_tap = torch.zeros(batch, spec.q_heads, d, dtype=dt, device=device)  # [B, Hq, D]
        if mirrored:
            if mirror is None or any(t.shape != (batch, num_chunks, chunk, h, d) or t.dtype != dt for t in mirror):
                raise StoreError(f"layer {spec.layer}: a mirrored layer needs (K, V) host tensors [B, N, C, Hkv, D] of {dt}")
            self.mirror_k, self.mirror_v = mirror
        else:
            self.mirror_k = self.mirror_v = None
        # Manager state on the device, views of the store's stacked state (a selection plans every
        # layer in one pass and never waits for the GPU): the table once a pending swap is in
        # [B, S], chunks held in pool or mirror [B, N], chunks gone for good in evict mode [].
        self.planned, self.available, self.dropped = state

    # -- accounting ---------------------------------------------------------------------------
    def device_tensors(self) -> dict[str, Tensor]:
        """Everything this layer holds on the device: what the graph is fed, and the manager's state."""
        return {name: getattr(self, name) for name in self.graph_tensors + self.manager_tensors}

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


def _scatter_spare(values: Tensor, index: Tensor, src: Tensor | float | bool, width: int) -> Tensor:
    """``values`` ``[R, width]`` with ``src`` scattered at ``index`` along dim 1; index ``width`` is a spare
    column (dropped) that masked-out entries aim at."""
    spare = values.new_full((values.shape[0], 1), -1 if values.dtype != torch.bool else False)
    return torch.cat([values, spare], 1).scatter_(1, index, src)[:, :width]


def _inverse(slot_chunk: Tensor, num_chunks: int) -> Tensor:
    """``[R, S]`` slot -> chunk tables to ``[R, N]`` chunk -> slot tables (-1: not resident)."""
    rows, slots = slot_chunk.shape
    ids = torch.arange(slots, device=slot_chunk.device).expand(rows, slots)
    table = torch.full((rows, num_chunks), -1, dtype=_INDEX, device=slot_chunk.device)
    return _scatter_spare(table, torch.where(slot_chunk >= 0, slot_chunk, num_chunks), ids, num_chunks)


class RingLayer:
    """Exact sliding-window KV: a ring of the last ``window`` tokens per sequence."""

    graph_tensors = ("k_ring", "v_ring")

    def __init__(self, spec: LayerSpec, *, batch: int, device: torch.device):
        assert spec.window is not None
        self.spec = spec
        self.k_ring = torch.zeros(batch, spec.window, spec.kv_heads, spec.head_dim, dtype=spec.dtype, device=device)  # [B, W, Hkv, D]
        self.v_ring = torch.zeros_like(self.k_ring)

    def device_tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in self.graph_tensors}


class KVStore:
    """All rewritten layers' KV for one batch of sequences, plus the manager that fills it.

    Life cycle: ``KVStore(...)`` sizes and allocates; ``ingest(layer, k, v)`` takes each layer's
    prompt KV during the dense prefill; ``finish_prefill()`` places the first resident set; then for
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
    ):
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
        self.pos = torch.zeros(1, dtype=_INDEX, device=device)  # [1] physical position being decoded
        self.valid_start = torch.tensor(self.valid_start_host, dtype=_INDEX, device=device)  # [B]
        chunk_specs = [s for s in specs if s.window is None]
        self.slots = self._plan_slots(chunk_specs)
        self.all_resident = self.slots >= self.num_chunks
        mirrored = not self.all_resident
        self.layers: dict[int, ChunkLayer | RingLayer] = {}
        mirrors = self._mirrors_of(reuse, specs, batch) if mirrored else {}
        if mirrors:
            reuse._retire("a newer prefill took over this store's CPU mirror; decode with the cache that prefill returned")
        elif mirrored:
            mirrors = self._new_mirrors(chunk_specs, batch)
        # The manager's state of every chunk layer, stacked [L, B, ...]: a selection plans all at once.
        count = len(chunk_specs)
        self.planned = torch.full((count, batch, self.slots), -1, dtype=_INDEX, device=device)
        self.available = torch.zeros(count, batch, self.num_chunks, dtype=torch.bool, device=device)
        self.dropped = torch.zeros(count, dtype=_INDEX, device=device)
        rows = torch.arange(count * batch, device=device).view(-1, 1)
        self._row_seq = rows % batch  # [L*B, 1]: the sequence of each planning row
        for spec in specs:
            if spec.window is None:
                i = len(self._chunk_layers())
                self.layers[spec.layer] = ChunkLayer(
                    spec, batch=batch, slots=self.slots, num_chunks=self.num_chunks, chunk=self.chunk, mirrored=mirrored, device=device,
                    state=(self.planned[i], self.available[i], self.dropped[i]), mirror=mirrors.get(spec.layer),
                )
            else:
                self.layers[spec.layer] = RingLayer(spec, batch=batch, device=device)
        self.length = 0  # tokens held per sequence (physical, left padding included)
        self.steps = 0  # decode steps since the prefill
        self.synced = 0  # positions below this are in the mirror
        self.selections = 0
        self.next_selection = 1  # decode step before which the next selection runs
        self.generator = torch.Generator().manual_seed(config.seed)
        self.lag = config.lag
        # Recall copies run on a side stream (CUDA); the tables they complete wait in _pending until
        # decode step _swap_at, when the main stream waits for them and installs the tables.
        self._side = torch.cuda.Stream(device) if device.type == "cuda" and not self.all_resident else None
        self._pending: tuple[list[tuple[ChunkLayer, Tensor, Tensor]], object] | None = None
        self._swap_at = -1
        # chunk copies mirror -> pool and pool -> mirror (summed over layers and sequences), on the device
        self._recalled = torch.zeros((), dtype=_INDEX, device=device)
        self._written_back = torch.zeros((), dtype=_INDEX, device=device)

    def _mirrors_of(self, other: "KVStore | None", specs: list[LayerSpec], batch: int) -> dict[int, tuple[Tensor, Tensor]]:
        """Every chunk layer's mirror of ``other`` when all have exactly the shapes this store needs, else none."""
        if other is None or other.retired or other.device != self.device:
            return {}
        shape = (batch, self.num_chunks, self.chunk)
        found = {}
        for spec in specs:
            if spec.window is not None:
                continue
            layer = other.layers.get(spec.layer)
            if not isinstance(layer, ChunkLayer) or layer.mirror_k is None:
                return {}
            want = (*shape, spec.kv_heads, spec.head_dim)
            if layer.mirror_k.shape != want or layer.mirror_k.dtype != spec.dtype:
                return {}
            found[spec.layer] = (layer.mirror_k, layer.mirror_v)
        return found

    def _new_mirrors(self, chunk_specs: list[LayerSpec], batch: int) -> dict[int, tuple[Tensor, Tensor]]:
        """Every chunk layer's (K, V) mirror, carved from one exact-size host allocation (page-locked on CUDA)."""
        shapes = {s.layer: ((batch, self.num_chunks, self.chunk, s.kv_heads, s.head_dim), s.dtype) for s in chunk_specs}
        arena = HostArena.for_tensors([shape for shape in shapes.values() for _ in range(2)], self.device)
        return {layer: (arena.take(*shape), arena.take(*shape)) for layer, shape in shapes.items()}

    @property
    def recalled_chunks(self) -> int:
        """Chunks copied from the mirror into the pool so far (reads the device)."""
        return int(self._recalled)

    @property
    def written_back_chunks(self) -> int:
        return int(self._written_back)

    def _retire(self, reason: str) -> None:
        """Give up this store: wait for its copies, drop its device buffers, refuse further use."""
        self.synchronize()
        self.retired = reason
        self._pending = None
        for layer in self.layers.values():
            for name in layer.graph_tensors:
                setattr(layer, name, None)
            if isinstance(layer, ChunkLayer):
                layer.mirror_k = layer.mirror_v = None

    def _check_live(self) -> None:
        if self.retired:
            raise StoreError(f"this store is retired: {self.retired}")

    # -- sizing -------------------------------------------------------------------------------
    def _min_slots(self) -> int:
        c, cfg = self.chunk, self.config
        sink = math.ceil(cfg.sink_tokens / c) + 1 if cfg.sink_tokens else 0
        return sink + math.ceil((cfg.recent_tokens + cfg.interval + cfg.lag) / c) + 1

    def _plan_slots(self, chunk_specs: list[LayerSpec]) -> int:
        cfg, n, c = self.config, self.num_chunks, self.chunk
        if cfg.mode == "dense" or not chunk_specs:
            return n
        if isinstance(cfg.budget, int):
            slots = math.ceil(cfg.budget / c)
        else:
            # Byte budget per sequence: pool + index + tables + query tap + the manager's planned table
            # and availability map <= budget x dense, summed over layers.
            allowed = pool_chunk = fixed = 0.0
            for s in chunk_specs:
                es = torch.empty((), dtype=s.dtype).element_size()
                kv_token = 2 * s.kv_heads * s.head_dim * es
                allowed += cfg.budget * self.capacity * kv_token
                fixed += n * kv_token + n * 8 + n + s.q_heads * s.head_dim * es
                pool_chunk += c * kv_token + 8 + 8
            slots = math.floor((allowed - fixed) / pool_chunk)
        if slots >= n:
            return n
        need = self._min_slots()
        if slots < need:
            raise StoreError(
                f"budget {cfg.budget!r} leaves {max(slots, 0)} resident chunks of {c} tokens per sequence for a "
                f"{self.capacity}-token context, but sink_tokens={cfg.sink_tokens}, recent_tokens={cfg.recent_tokens}, "
                f"interval={cfg.interval} and recall_lag={cfg.lag} need {need}; raise the budget, or lower "
                "sink_tokens/recent_tokens/interval/recall_lag"
            )
        return slots

    # -- prefill ------------------------------------------------------------------------------
    def ingest(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Take one layer's prompt KV ``[B, Hkv, T, D]`` (positions 0..T-1) during prefill."""
        self._check_live()
        if self.steps or self.length:
            raise StoreError("the store takes one prefill per sequence batch; start a new generation for a new prompt")
        store = self.layers.get(layer)
        if store is None:
            return
        batch, heads, length, dim = k.shape
        if length > self.capacity:
            raise StoreError(f"prompt of {length} tokens exceeds the store capacity of {self.capacity}; raise LSAConfig.max_context")
        k = k.detach().transpose(1, 2)  # [B, T, Hkv, D]
        v = v.detach().transpose(1, 2)
        if isinstance(store, RingLayer):
            w = store.spec.window
            lo = max(0, length - w)
            slots = torch.arange(lo, length, device=k.device) % w
            store.k_ring[:, slots] = k[:, lo:].to(store.k_ring.dtype)
            store.v_ring[:, slots] = v[:, lo:].to(store.v_ring.dtype)
            return
        c = self.chunk
        chunks = math.ceil(length / c)
        padded = chunks * c
        kp = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, padded - length)).view(batch, chunks, c, heads, dim)
        vp = torch.nn.functional.pad(v, (0, 0, 0, 0, 0, padded - length)).view(batch, chunks, c, heads, dim)
        # Key bounds over the real tokens only (left padding and the unfilled tail are excluded).
        position = torch.arange(padded, device=k.device).view(1, chunks, c, 1, 1)
        start = torch.tensor(self.valid_start_host, device=k.device).view(batch, 1, 1, 1, 1)
        real = (position >= start) & (position < length)
        kf = kp.float()
        lo = torch.where(real, kf, torch.inf).amin(2)
        hi = torch.where(real, kf, -torch.inf).amax(2)
        empty = ~real.any(2)
        store.kmin[:, :chunks] = lo.masked_fill(empty, 0).to(store.kmin.dtype)
        store.kmax[:, :chunks] = hi.masked_fill(empty, 0).to(store.kmax.dtype)
        if self.all_resident:
            # Identity placement: chunk i lives in slot i of its sequence.
            pool_k = store.k_pool.view(batch, self.slots, c, heads, dim)
            pool_v = store.v_pool.view(batch, self.slots, c, heads, dim)
            pool_k[:, :chunks] = kp.to(pool_k.dtype)
            pool_v[:, :chunks] = vp.to(pool_v.dtype)
        else:
            # Straight into the (pinned) mirror; finish_prefill waits for these copies before reading it.
            store.mirror_k[:, :chunks].copy_(kp, non_blocking=True)
            store.mirror_v[:, :chunks].copy_(vp, non_blocking=True)
        store.available[:, :chunks] = True

    def finish_prefill(self, length: int) -> None:
        """Record the prompt length and place the first resident set (sink + newest chunks)."""
        if length >= self.capacity:
            raise StoreError(f"prompt of {length} tokens leaves no room to decode in a store of {self.capacity}; raise LSAConfig.max_context")
        self.length = self.synced = length
        self.next_selection = 1
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the prompt's copies into the mirror
        if self.all_resident:
            for store in self._chunk_layers():
                ids = torch.arange(self.slots, dtype=_INDEX, device=self.device)
                for table in (store.planned, store.slot_chunk, store.chunk_slot):
                    table.copy_(ids.expand(self.batch, -1))
                store.available.fill_(True)
            return
        keeps = torch.full((self.batch, self.slots), -1, dtype=_INDEX)
        for b in range(self.batch):
            must = self._must_keep(b, length)
            first = self.valid_start_host[b] // self.chunk  # chunks before it are all left padding
            rest = [c for c in range(math.ceil(length / self.chunk) - 1, first - 1, -1) if c not in must]
            keep = self._fill(must, rest)
            keeps[b, : len(keep)] = torch.tensor(keep, dtype=_INDEX)
        keeps = keeps.to(self.device).expand(len(self._chunk_layers()), -1, -1)
        self._apply(keeps, written=range(0), lag=0, evict=False)

    # -- decode -------------------------------------------------------------------------------
    def before_step(self) -> None:
        """Run between decode steps: selection when due, then set the position being decoded."""
        self._check_live()
        if self.length >= self.capacity:
            raise StoreError(
                f"sequence reached the store capacity of {self.capacity} tokens; raise LSAConfig.max_context "
                "or pass max_new_tokens to generate() so the store is sized for it"
            )
        if self._pending is not None and self.steps >= self._swap_at:
            self._swap()
        if not self.all_resident and self.steps == self.next_selection:
            self.select()
            self.next_selection += self.config.interval
        self.pos.fill_(self.length)

    def probe(self, run_step: Callable[[], object]) -> None:
        """Choose the first window's resident set with the real queries of the last prompt token.

        The prefill (the model's own attention) leaves no queries behind, so right after it
        ``run_step`` re-runs the decode step on the last prompt token (position T-1) over the
        initial resident set (sink + newest chunks). That fills every layer's ``q_tap``; what the step
        wrote at T-1 (K/V from approximate deeper layers, chunk bounds) is put back exactly as the
        prefill left it, and the first selection runs with those queries. The regular schedule then
        selects again before decode step 1 (with the first generated token's queries) and every
        ``interval`` steps after that.
        """
        if self.all_resident or not self._chunk_layers() or self.steps or not self.length:
            return
        pos = self.length - 1
        chunk = pos // self.chunk
        saved = []
        for store in self._chunk_layers():
            rows = self._row_seq[: self.batch, 0] * self.slots + store.chunk_slot[:, chunk]  # the last chunk is always resident
            saved.append((store, rows, store.k_pool[rows].clone(), store.v_pool[rows].clone(), store.kmin[:, chunk].clone(), store.kmax[:, chunk].clone()))
        self.pos.fill_(pos)
        run_step()
        for store, rows, k, v, lo, hi in saved:
            store.k_pool[rows] = k
            store.v_pool[rows] = v
            store.kmin[:, chunk] = lo
            store.kmax[:, chunk] = hi
        self.select(lag=0)
        self.next_selection = 1  # and again once the first generated token has its own queries

    def after_step(self) -> None:
        self.length += 1
        self.steps += 1

    def select(self, lag: int | None = None) -> None:
        """Choose and load the resident set for the next ``interval`` tokens, for every layer and sequence.

        Everything runs as device work queued on the current stream, with no host sync: scoring,
        masking and top-k, then the slot assignment (chunks that leave the pool leave the tables at
        once; incoming chunks take free slots). Write-back of the chunks decoded since the last
        selection and the recall copies run on a side stream (CUDA); the recalled chunks join the
        tables ``lag`` decode steps later (``LSAConfig.recall_lag``; 0: right here), after the main
        stream waits for the copies.
        """
        lag = self.lag if lag is None else lag
        if self._pending is not None:
            self._swap()
        layers = self._chunk_layers()
        if not layers:
            return
        pos, c = self.length, self.chunk
        written = range(self.synced // c, math.ceil(pos / c))
        chosen = self._choose(layers, pos)
        self._apply(chosen, written=written, lag=lag, evict=self.config.mode == "evict")
        self.synced = pos
        self.selections += 1

    def _choose(self, layers: list[ChunkLayer], pos: int) -> Tensor:
        """``[L, B, k]`` chunk ids to keep per layer (must-keep first, then by descending score; -1: none)."""
        c, n = self.chunk, self.num_chunks
        must = torch.zeros(self.batch, n, dtype=torch.bool)
        blocked = torch.zeros(self.batch, n, dtype=torch.bool)
        for b in range(self.batch):
            must[b, self._must_keep(b, pos)] = True
            blocked[b, math.ceil(pos / c) :] = True  # not yet written
            blocked[b, : self.valid_start_host[b] // c] = True  # left padding only
        must, blocked = self._to_device(must), self._to_device(blocked)
        score_fn = SELECTORS[self.config.selector]
        k = min(self.slots, n)
        scores = torch.stack([score_fn(s.q_tap, s.kmin, s.kmax, generator=self.generator).float() for s in layers])  # [L, B, N]
        gone = blocked if self.config.mode != "evict" else blocked | ~self.available  # dropped chunks
        scores = scores.nan_to_num(nan=-torch.finfo(torch.float32).max).masked_fill(gone, -torch.inf)
        values, ids = scores.masked_fill(must, torch.inf).topk(k, dim=2)  # sorted: must-keep first
        return ids.masked_fill(values == -torch.inf, -1)

    def _to_device(self, host: Tensor) -> Tensor:
        """A small host tensor on the store's device without making the host wait (pinned on CUDA)."""
        if self.device.type != "cuda":
            return host.to(self.device)
        return host.pin_memory().to(self.device, non_blocking=True)

    def _apply(self, chosen: Tensor, *, written: range, lag: int, evict: bool) -> None:
        """Install new resident sets ``[L, B, k]``: drops now, write-back + recall on the side stream, the rest after ``lag`` steps."""
        side = self._side
        main = torch.cuda.current_stream(self.device) if side is not None else None
        layers = self._chunk_layers()
        mirrored = layers[0].mirror_k is not None
        count = len(layers)
        write_back = self._written_rows(written) if mirrored and len(written) else None  # before the plan: current slots
        now, after, recall_dst, recall_src, recalled = self._plan(chosen, evict=evict, mirrored=mirrored)
        now_inv, after_inv = _inverse(now, self.num_chunks), _inverse(after, self.num_chunks)
        now, after = now.view(count, self.batch, -1), after.view(count, self.batch, -1)
        now_inv, after_inv = now_inv.view(count, self.batch, -1), after_inv.view(count, self.batch, -1)
        for i, store in enumerate(layers):
            store.slot_chunk.copy_(now[i])
            store.chunk_slot.copy_(now_inv[i])
        if side is not None:
            side.wait_stream(main)  # every step so far (their writes, their reads of the freed slots) and the plan
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            if side is not None:
                for t in (recall_dst, recall_src, *(write_back or ())):
                    t.record_stream(side)  # made on the main stream, read here
            if write_back is not None:
                dst, src, moved = write_back
                for i, store in enumerate(layers):
                    _copy(store.mirror_k, store.mirror_v, store.k_pool, store.v_pool, dst[i], src[i])
                self._written_back += moved
            if mirrored:
                for i, store in enumerate(layers):
                    _copy(store.k_pool, store.v_pool, store.mirror_k, store.mirror_v, recall_dst[i], recall_src[i])
                self._recalled += recalled
            done = torch.cuda.Event() if side is not None else None
            if done is not None:
                done.record(side)
        self._pending = ([(store, after[i], after_inv[i]) for i, store in enumerate(layers)], done)
        self._swap_at = self.steps + lag
        if evict and mirrored:
            if done is not None:
                done.synchronize()  # the staged prompt is read by the recall above
            self._drop_staging()
        if lag == 0:
            self._swap()

    def _plan(self, chosen: Tensor, *, evict: bool, mirrored: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Make ``chosen`` ``[L, B, k]`` the planned resident sets of every layer and sequence, in one pass.

        Chunks left out give up their slots; chunks coming in take free slots in ``chosen``'s order
        (at most S are chosen, so they always fit). Returns device tensors ``(now, after, dst, src,
        count)``: the ``[L*B, S]`` slot -> chunk tables to install at once (kept chunks, plus incoming
        chunks with nothing to copy: those the coming window writes), the tables once the recall
        copies are done, the copies per layer as pool rows / mirror rows ``[L, B*k]`` (-1: no copy),
        and how many copies.
        """
        layers, batch, k = chosen.shape
        slots, n = self.slots, self.num_chunks
        chosen = chosen.reshape(layers * batch, k)
        current = self.planned.view(layers * batch, slots)  # == the live tables: select() installs a pending swap first
        available = self.available.view(layers * batch, n)
        valid = chosen >= 0
        ids = chosen.clamp_min(0)
        keep = _scatter_spare(torch.zeros_like(available), torch.where(valid, chosen, n), True, n)
        held = current >= 0
        stays = held & keep.gather(1, current.clamp_min(0))
        now = torch.where(stays, current, -1)
        if evict:
            gone = held & ~stays
            available &= ~_scatter_spare(torch.zeros_like(available), torch.where(gone, current, n), True, n)
            self.dropped += gone.view(layers, -1).sum(1)
        resident = _scatter_spare(torch.zeros_like(available), torch.where(held, current, n), True, n)
        incoming = valid & ~resident.gather(1, ids)  # [R, k]
        # the j-th incoming chunk takes the j-th free slot (free slots in slot order)
        free_first = torch.sort((now >= 0).to(torch.int8), dim=1, stable=True).indices  # [R, S]
        rank = (incoming.cumsum(1) - 1).clamp(0, slots - 1)
        target = torch.where(incoming, free_first.gather(1, rank), slots)  # [R, k]; `slots`: the spare column
        copy = incoming & available.gather(1, ids) if mirrored else torch.zeros_like(incoming)
        after = _scatter_spare(now, target, chosen, slots)
        now = _scatter_spare(now, torch.where(copy, slots, target), chosen, slots)  # nothing to copy: mapped at once
        available |= _scatter_spare(torch.zeros_like(available), torch.where(incoming, ids, n), True, n)
        current.copy_(after)
        seq = self._row_seq
        dst = torch.where(copy, seq * slots + target, -1).view(layers, -1)
        src = torch.where(copy, seq * n + ids, -1).view(layers, -1)
        return now, after, dst, src, copy.sum()

    def _written_rows(self, chunks: range) -> tuple[Tensor, Tensor, Tensor]:
        """Mirror rows, pool rows ``[L, B*W]`` (-1: not resident) and count: what a write-back copies."""
        rows = self.planned.shape[0] * self.batch
        ids = torch.arange(chunks.start, chunks.stop, device=self.device).expand(rows, -1)  # [R, W]
        slot = _inverse(self.planned.view(rows, -1), self.num_chunks).gather(1, ids)
        there = slot >= 0
        dst = torch.where(there, self._row_seq * self.num_chunks + ids, -1).view(self.planned.shape[0], -1)
        src = torch.where(there, self._row_seq * self.slots + slot, -1).view(self.planned.shape[0], -1)
        return dst, src, there.sum()

    def _drop_staging(self) -> None:
        """Evict mode, first selection: staged prompt chunks left out of the pool are gone."""
        rows, n = self.planned.shape[0] * self.batch, self.num_chunks
        planned = self.planned.view(rows, -1)
        resident = _scatter_spare(torch.zeros(rows, n, dtype=torch.bool, device=self.device), torch.where(planned >= 0, planned, n), True, n)
        available = self.available.view(rows, n)
        self.dropped += (available & ~resident).view(self.planned.shape[0], -1).sum(1)
        available &= resident
        for store in self._chunk_layers():
            store.mirror_k = store.mirror_v = None

    def _swap(self) -> None:
        """Install the tables of the last selection once its recall copies are done (on the main stream)."""
        assert self._pending is not None
        tables, done = self._pending
        self._pending = None
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)  # the GPU waits; the host does not
        for store, slot_chunk, chunk_slot in tables:
            store.slot_chunk.copy_(slot_chunk)
            store.chunk_slot.copy_(chunk_slot)

    def synchronize(self) -> None:
        """Wait for outstanding recall and write-back copies (e.g. before reading the mirror)."""
        if self._side is not None:
            self._side.synchronize()

    def _must_keep(self, b: int, pos: int) -> list[int]:
        """Sink chunks, recent tail, and every chunk written during the next window."""
        cfg, c = self.config, self.chunk
        start = self.valid_start_host[b]
        keep: list[int] = []
        if cfg.sink_tokens:
            keep += range(start // c, (min(start + cfg.sink_tokens, pos) - 1) // c + 1)
        last = min(pos + cfg.interval + self.lag - 1, self.capacity - 1) // c
        keep += range(max(0, pos - max(cfg.recent_tokens, 1)) // c, last + 1)  # the last token's chunk at least
        return list(dict.fromkeys(keep))

    def _fill(self, must: list[int], ranked: list[int]) -> list[int]:
        keep = list(must)
        chosen = set(keep)
        for ch in ranked:
            if len(keep) >= self.slots:
                break
            if ch not in chosen:
                keep.append(ch)
                chosen.add(ch)
        return keep[: self.slots]

    def _chunk_layers(self) -> list[ChunkLayer]:
        return [s for s in self.layers.values() if isinstance(s, ChunkLayer)]

    # -- graph binding ------------------------------------------------------------------------
    def tensor(self, layer: int | None, name: str) -> Tensor:
        """The device tensor a rewritten graph binds to placeholder ``(layer, name)``."""
        if layer is None:
            return getattr(self, name)
        return getattr(self.layers[layer], name)

    def device_tensors(self) -> list[Tensor]:
        """Every tensor the store holds on the device: the graph's inputs and the manager's state."""
        out = [self.pos, self.valid_start, self._row_seq, self._recalled, self._written_back]
        for store in self.layers.values():
            out.extend(store.device_tensors().values())
        return out

    # -- accounting ---------------------------------------------------------------------------
    def footprint(self) -> dict[str, float | int]:
        """Accelerator-side bytes held against what a dense cache holds for the same sequences."""
        resident = sum(_nbytes(t) for t in self.device_tensors())
        dense = pools = index = mirror = 0
        tokens = max(self.length, 1)
        dropped = 0
        for store in self.layers.values():
            s = store.spec
            es = torch.empty((), dtype=s.dtype).element_size()
            held = tokens if s.window is None else min(tokens, s.window)
            dense += self.batch * held * 2 * s.kv_heads * s.head_dim * es
            if isinstance(store, ChunkLayer):
                pools += _nbytes(store.k_pool) + _nbytes(store.v_pool)
                index += store.index_bytes
                mirror += store.mirror_bytes
                dropped += store.dropped_chunks
            else:
                pools += _nbytes(store.k_ring) + _nbytes(store.v_ring)
        return {
            "resident_kv_bytes": resident,
            "dense_kv_bytes": dense,
            "ratio": resident / dense if dense else 0.0,
            "pool_bytes": pools,
            "index_bytes": index,
            "table_bytes": resident - pools - index,
            "mirror_bytes": mirror,
            "dropped_chunks": dropped,
            "tokens": self.length,
            "capacity_tokens": self.capacity,
            "slots_per_sequence": self.slots,
            "selections": self.selections,
        }
