"""The memory mover: slots, the CPU mirror, recall and write-back copies, streams and events.

Given the chunks a selection keeps (``[L, B, k]`` chunk ids per layer and sequence, from
``runtime/policy.py``), the mover assigns slots for all layers and sequences in one pass of device
tensor ops (no host sync), takes the chunks that leave out of the tables at once, writes back the
chunks decoded since the last selection to the mirror, and recalls the incoming ones from the mirror
(``lsa::copy_chunks``, on a side stream on CUDA). The tables take the recalled chunks ``lag`` steps
later, after the main stream waits for the copies' event.

With the compact mirror (``LSAConfig(mirror="fp8")``) the write-back packs chunks to fp8 on the
device before they cross to the host (``lsa::pack_chunks``) and the recall unpacks them on the way
into the pool (``lsa::unpack_chunks``); the resident pool always holds the model's dtype.

It knows nothing of selection policy (which chunks, why) or of the model; it owns the manager state
the contract declares (``planned``, ``available``, ``dropped``: stacked ``[L, B, ...]`` here, each
layer holds views) and the copy counters.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from ..kernels.compact_chunks import pack_chunks_impl, unpack_chunks_impl
from ..kernels.copy_chunks import copy_chunks_problem, copy_chunks_ref, copy_chunks_triton
from .host_memory import HostArena
from .state import INDEX_DTYPE

if TYPE_CHECKING:  # pragma: no cover
    from .store import ChunkLayer, LayerSpec


def _copy(dst_k: Tensor, dst_v: Tensor, src_k: Tensor, src_v: Tensor, dst_rows: Tensor, src_rows: Tensor) -> None:
    """Chunk rows ``src`` -> ``dst`` (pool <-> mirror): one Triton launch on the current stream on CUDA."""
    operands = (dst_k, dst_v, src_k, src_v, dst_rows, src_rows)
    if (dst_k.is_cuda or src_k.is_cuda) and copy_chunks_problem(operands) is None:
        copy_chunks_triton(*operands)
    else:
        copy_chunks_ref(*operands)


def scatter_spare(values: Tensor, index: Tensor, src: Tensor | float | bool, width: int) -> Tensor:
    """``values`` ``[R, width]`` with ``src`` scattered at ``index`` along dim 1; index ``width`` is a spare
    column (dropped) that masked-out entries aim at."""
    spare = values.new_full((values.shape[0], 1), -1 if values.dtype != torch.bool else False)
    return torch.cat([values, spare], 1).scatter_(1, index, src)[:, :width]


def inverse_table(slot_chunk: Tensor, num_chunks: int) -> Tensor:
    """``[R, S]`` slot -> chunk tables to ``[R, N]`` chunk -> slot tables (-1: not resident)."""
    rows, slots = slot_chunk.shape
    ids = torch.arange(slots, device=slot_chunk.device).expand(rows, slots)
    table = torch.full((rows, num_chunks), -1, dtype=INDEX_DTYPE, device=slot_chunk.device)
    return scatter_spare(table, torch.where(slot_chunk >= 0, slot_chunk, num_chunks), ids, num_chunks)


def mirror_layout(batch: int, num_chunks: int, chunk: int, kv_heads: int, head_dim: int, dtype: torch.dtype, mirror: str) -> tuple[tuple[int, ...], torch.dtype]:
    """(shape, dtype) of one layer's K (or V) mirror: ``[B, N, C, Hkv, D]`` in the model's dtype
    (``"exact"``), or ``[B, N, C, Hkv, D + 1]`` packed bytes (``"fp8"``: ``kernels/compact_chunks.py``)."""
    if mirror == "fp8":
        return (batch, num_chunks, chunk, kv_heads, head_dim + 1), torch.uint8
    return (batch, num_chunks, chunk, kv_heads, head_dim), dtype


def new_mirrors(shapes: dict[int, tuple[tuple[int, ...], torch.dtype]], device: torch.device) -> dict[int, tuple[Tensor, Tensor]]:
    """Every chunk layer's (K, V) mirror, carved from one exact-size host allocation (page-locked on CUDA)."""
    arena = HostArena.for_tensors([shape for shape in shapes.values() for _ in range(2)], device)
    return {layer: (arena.take(*shape), arena.take(*shape)) for layer, shape in shapes.items()}


def reusable_mirrors(layers_of_other: dict | None, shapes: dict[int, tuple[tuple[int, ...], torch.dtype]]) -> dict[int, tuple[Tensor, Tensor]]:
    """The mirrors of another store's chunk layers when all have exactly ``shapes``, else none."""
    if not layers_of_other:
        return {}
    found = {}
    for layer, (shape, dtype) in shapes.items():
        other = layers_of_other.get(layer)
        mirror_k = getattr(other, "mirror_k", None)
        if mirror_k is None or tuple(mirror_k.shape) != tuple(shape) or mirror_k.dtype != dtype:
            return {}
        found[layer] = (other.mirror_k, other.mirror_v)
    return found


def install_tables(layers: list["ChunkLayer"], plan: "SelectionPlan") -> None:
    """Each layer's slot -> chunk and chunk -> slot tables from ``plan`` (after its recall copies)."""
    for i, layer in enumerate(layers):
        layer.slot_chunk.copy_(plan.after[i])
        layer.chunk_slot.copy_(plan.after_inv[i])


@dataclass
class SelectionPlan:
    """What ``MemoryMover.plan`` leaves for later: the tables ``[L, B, S]``/``[L, B, N]`` once the recall is
    in; the write-back and recall copies as (destination rows, source rows ``[L, M]``, -1: no copy; count)."""

    after: Tensor
    after_inv: Tensor
    write_back: tuple[Tensor, Tensor, Tensor] | None
    recall: tuple[Tensor, Tensor, Tensor] | None

    def copy_operands(self) -> list[Tensor]:
        return [t for rows in (self.write_back, self.recall) if rows is not None for t in rows]

    def after_tables(self) -> list[Tensor]:
        return [self.after, self.after_inv]


class MemoryMover:
    """Slot assignment and chunk copies for the chunk layers of one store.

    Args:
        num_layers: chunk layers it will serve; the store appends each to ``layers`` (pools, tables,
            mirrors) in planning order, giving it the views of ``layer_state(i)``.
        batch, slots, num_chunks: store sizes.
        device: the store's device.
        side_stream: run write-back and recall on a CUDA side stream (CUDA only).
        mirror: the mirror's format, ``"exact"`` (bitwise copies) or ``"fp8"`` (write-back packs,
            recall unpacks: ``kernels/compact_chunks.py``).
    """

    def __init__(
        self, num_layers: int, *, batch: int, slots: int, num_chunks: int, device: torch.device, side_stream: bool, mirror: str = "exact"
    ):
        self.layers: list[ChunkLayer] = []
        self.compact = mirror == "fp8"
        self.batch, self.slots, self.num_chunks, self.device = batch, slots, num_chunks, device
        count = num_layers
        # The manager's state of every chunk layer, stacked [L, B, ...]: a selection plans all at once.
        self.planned = torch.full((count, batch, slots), -1, dtype=INDEX_DTYPE, device=device)
        self.available = torch.zeros(count, batch, num_chunks, dtype=torch.bool, device=device)
        self.dropped = torch.zeros(count, dtype=INDEX_DTYPE, device=device)
        self.row_seq = torch.arange(count * batch, device=device).view(-1, 1) % batch  # [L*B, 1]: the sequence of each row
        # chunk copies mirror -> pool and pool -> mirror (summed over layers and sequences), on the device
        self.recalled = torch.zeros((), dtype=INDEX_DTYPE, device=device)
        self.written_back = torch.zeros((), dtype=INDEX_DTYPE, device=device)
        # Recall copies run on a side stream (CUDA); the tables they complete wait in `pending` (install,
        # copies' event, the tensors it holds) until decode step `swap_at`, when the main stream waits for
        # the event and installs the tables.
        self.side = torch.cuda.Stream(device) if side_stream and device.type == "cuda" else None
        self.pending: tuple[Callable[[], None], object, list[Tensor]] | None = None
        self.swap_at = self.swap_by = -1

    def layer_state(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        """Views of layer ``i``'s manager state: (planned [B, S], available [B, N], dropped [])."""
        return self.planned[i], self.available[i], self.dropped[i]

    def device_tensors(self) -> list[Tensor]:
        """The mover's own device tensors (the per-layer views of the stacked state are the layers'),
        including the tables a pending recall installs later."""
        out = [self.row_seq, self.recalled, self.written_back]
        if self.pending is not None:
            out += self.pending[2]
        return out

    @property
    def mirrored(self) -> bool:
        return bool(self.layers) and self.layers[0].mirror_k is not None

    # -- installing a selection ---------------------------------------------------------------
    def apply(
        self, chosen: Tensor, *, written: range, lag: int, evict: bool, step: int, recall: bool = True, lag_max: int | None = None,
        width: int = 0,
    ) -> None:
        """Install new resident sets ``[L, B, k]``: drops now, write-back + recall on the side stream, the rest after ``lag`` steps.

        ``written``: chunks decoded since the last selection (written back to the mirror first);
        ``step``: the current decode step (the tables of the recall join at ``step + lag``, or, with
        ``lag_max`` > ``lag``, at the first step from then on whose copies are done, and at
        ``step + lag_max`` at the latest: ``swap_due``);
        ``recall=False``: the incoming chunks are in their slots already (the first placement after a
        prefill, which wrote them there), so nothing is copied from the mirror;
        ``width``: the write-back looks at ``max(len(written), width)`` chunks (the rest masked out), even
        with none written: a captured selection's width (``SelectionGraphs``), so that an eager selection
        runs, and warms up, every kernel the captured one runs.
        """
        write = (written.start, written.stop, max(len(written), width)) if len(written) or width else None
        plan = self.plan(chosen, written=write, evict=evict, recall=recall)
        side = self.side
        main = torch.cuda.current_stream(self.device) if side is not None else None
        if side is not None:
            side.wait_stream(main)  # every step so far (their writes, their reads of the freed slots) and the plan
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            if side is not None:
                for t in plan.copy_operands():
                    t.record_stream(side)  # made on the main stream, read here
            self.copies(plan)
            done = torch.cuda.Event() if side is not None else None
            if done is not None:
                done.record(side)
        # (a function of the layers and the plan, not a method: `pending` holds no reference back to the mover)
        self.defer(functools.partial(install_tables, self.layers, plan), done, plan.after_tables(), step=step, lag=lag, lag_max=lag_max)

    def plan(self, chosen: Tensor, *, written: tuple | None, evict: bool, recall: bool = True) -> SelectionPlan:
        """Plan the slots of ``chosen`` ``[L, B, k]`` and install the tables that change at once (kept chunks
        stay, dropped ones leave, chunks with nothing to copy come in), as device work on the current
        stream. ``written``: ``(first, stop, width)``: chunk ids ``first`` .. ``stop - 1`` (ints or ``[]``
        device tensors; ``width``, an int >= stop - first, chunks looked at) decoded since the last
        selection, to write back; None: none. Returns the copies and the tables to install once they
        are done (``copies``, ``install``)."""
        layers = self.layers
        mirrored = self.mirrored
        count, batch = len(layers), self.batch
        write_back = self._written_rows(*written) if mirrored and written is not None else None  # before the plan: current slots
        now, after, recall_dst, recall_src, recalled = self._plan(chosen, evict=evict, mirrored=mirrored and recall)
        now_inv, after_inv = inverse_table(now, self.num_chunks), inverse_table(after, self.num_chunks)
        # `after` tables wait `lag` steps: compact copies (scatter_spare's results are slices of a wider tensor)
        after, after_inv = after.contiguous(), after_inv.contiguous()
        now, after = now.view(count, batch, -1), after.view(count, batch, -1)
        now_inv, after_inv = now_inv.view(count, batch, -1), after_inv.view(count, batch, -1)
        for i, layer in enumerate(layers):
            layer.slot_chunk.copy_(now[i])
            layer.chunk_slot.copy_(now_inv[i])
        recall_rows = (recall_dst, recall_src, recalled) if mirrored and recall else None
        return SelectionPlan(after=after, after_inv=after_inv, write_back=write_back, recall=recall_rows)

    def copies(self, plan: SelectionPlan) -> None:
        """The plan's write-back (pool -> mirror) and recall (mirror -> pool) copies, on the current stream."""
        layers = self.layers
        if plan.write_back is not None:
            dst, src, moved = plan.write_back
            write = pack_chunks_impl if self.compact else _copy
            for i, layer in enumerate(layers):
                write(layer.mirror_k, layer.mirror_v, layer.k_pool, layer.v_pool, dst[i], src[i])
            self.written_back += moved
        if plan.recall is not None:
            dst, src, recalled = plan.recall
            copy = unpack_chunks_impl if self.compact else _copy
            for i, layer in enumerate(layers):
                copy(layer.k_pool, layer.v_pool, layer.mirror_k, layer.mirror_v, dst[i], src[i])
            self.recalled += recalled

    def install(self, plan: SelectionPlan) -> None:
        """The plan's tables once its recall copies are in (on the current stream)."""
        install_tables(self.layers, plan)

    def defer(self, install: Callable[[], None], done, tensors: list[Tensor], *, step: int, lag: int, lag_max: int | None) -> None:
        """Hold ``install`` (the tables of a selection's recall) until decode step ``step + lag`` (``swap_due``),
        the main stream waiting first for ``done`` (the copies' event; None: nothing to wait for).
        ``tensors``: the device tensors it holds until then (counted by ``device_tensors``)."""
        self.pending = (install, done, tensors)
        self.swap_at = step + lag
        self.swap_by = step + max(lag, lag if lag_max is None else lag_max)
        if lag == 0:
            self.swap()

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
        current = self.planned.view(layers * batch, slots)  # == the live tables: a pending swap is installed first
        available = self.available.view(layers * batch, n)
        valid = chosen >= 0
        ids = chosen.clamp_min(0)
        keep = scatter_spare(torch.zeros_like(available), torch.where(valid, chosen, n), True, n)
        held = current >= 0
        stays = held & keep.gather(1, current.clamp_min(0))
        now = torch.where(stays, current, -1)
        if evict:
            gone = held & ~stays
            available &= ~scatter_spare(torch.zeros_like(available), torch.where(gone, current, n), True, n)
            self.dropped += gone.view(layers, -1).sum(1)
        resident = scatter_spare(torch.zeros_like(available), torch.where(held, current, n), True, n)
        incoming = valid & ~resident.gather(1, ids)  # [R, k]
        # the j-th incoming chunk takes the j-th free slot (free slots in slot order)
        free_first = torch.sort((now >= 0).to(torch.int8), dim=1, stable=True).indices  # [R, S]
        rank = (incoming.cumsum(1) - 1).clamp(0, slots - 1)
        target = torch.where(incoming, free_first.gather(1, rank), slots)  # [R, k]; `slots`: the spare column
        copy = incoming & available.gather(1, ids) if mirrored else torch.zeros_like(incoming)
        after = scatter_spare(now, target, chosen, slots)
        now = scatter_spare(now, torch.where(copy, slots, target), chosen, slots)  # nothing to copy: mapped at once
        available |= scatter_spare(torch.zeros_like(available), torch.where(incoming, ids, n), True, n)
        current.copy_(after)
        seq = self.row_seq
        dst = torch.where(copy, seq * slots + target, -1).view(layers, -1)
        src = torch.where(copy, seq * n + ids, -1).view(layers, -1)
        return now, after, dst, src, copy.sum()

    def _written_rows(self, first: int | Tensor, stop: int | Tensor, width: int) -> tuple[Tensor, Tensor, Tensor]:
        """Mirror rows, pool rows ``[L, B*width]`` (-1: no copy) and count: what a write-back copies, for
        chunks ``first`` .. ``stop - 1`` (ints or ``[]`` device tensors) of those resident."""
        count = self.planned.shape[0]
        rows = count * self.batch
        ids = first + torch.arange(width, device=self.device)
        inside = ids < stop
        ids = ids.clamp(max=self.num_chunks - 1).expand(rows, -1)  # [R, W]
        slot = inverse_table(self.planned.view(rows, -1), self.num_chunks).gather(1, ids)
        there = (slot >= 0) & inside
        dst = torch.where(there, self.row_seq * self.num_chunks + ids, -1).view(count, -1)
        src = torch.where(there, self.row_seq * self.slots + slot, -1).view(count, -1)
        return dst, src, there.sum()

    def place_identity(self) -> None:
        """Every chunk in its own slot (everything resident): chunk i lives in slot i of its sequence."""
        ids = torch.arange(self.slots, dtype=INDEX_DTYPE, device=self.device)
        for layer in self.layers:
            for table in (layer.planned, layer.slot_chunk, layer.chunk_slot):
                table.copy_(ids.expand(self.batch, -1))
        self.available.fill_(True)

    def swap_due(self, step: int) -> bool:
        """Whether the pending tables go in before decode step ``step``: from ``swap_at`` on once the
        recall copies are done (a non-blocking query of their event), at ``swap_by`` in any case."""
        if self.pending is None or step < self.swap_at:
            return False
        done = self.pending[1]
        return step >= self.swap_by or done is None or done.query()

    def swap(self) -> None:
        """Install the tables of the last selection once its recall copies are done (on the main stream)."""
        if self.pending is None:
            return
        install, done, _ = self.pending
        self.pending = None
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)  # the GPU waits; the host does not
        install()

    def synchronize(self) -> None:
        """Wait for outstanding recall and write-back copies (e.g. before reading the mirror on the host)."""
        if self.side is not None:
            self.side.synchronize()

    def wait_on_current_stream(self) -> None:
        """Make the current stream wait for outstanding recall and write-back copies (the host does not)."""
        if self.side is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.side)
