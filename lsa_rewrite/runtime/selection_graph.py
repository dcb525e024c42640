"""A store's selection captured as CUDA graphs, so that each window's selection is a handful of launches.

Queued op by op, a selection is a few hundred kernel launches (the selector's scores per layer, the
policy's masks and ranking, the mover's slot plan, a table copy and two chunk copies per layer), a
few milliseconds of host time per window. Everything in it is device work on tensors at fixed
addresses once the window's start is on the device (``WindowMasks``), so it is captured once per
store, as three graphs, and replayed for every later window:

- ``plan`` (the main stream): scores, ranking, slot plan, and the tables that change at once;
- ``copies`` (the mover's side stream, behind the steps already queued): the write-back of the chunks
  decoded since the last selection and the recall of the incoming ones;
- ``install`` (the main stream, ``recall_lag`` steps later, after the copies' event): the tables with
  the recalled chunks.

Per window: two scalar fills (the window's start, the first chunk not yet written back), the three
replays, a stream wait and an event record. The results are those of the eager selection, which also
runs the first selections of a store (the warm-up: Triton compiles, allocator settles) and any window
the capture does not cover (more chunks decoded since the last selection than its write-back width:
an irregular call of ``KVStore.select``).

Only selectors marked ``graph_safe`` are captured (``lsa_rewrite.selectors.Selector``). The graphs'
private memory pools hold the selection's intermediates for the store's lifetime (``release``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .mover import MemoryMover
    from .store import KVStore


def write_back_width(interval: int, chunk_size: int) -> int:
    """Chunks a regular window's write-back can touch: ``interval`` tokens decoded since the last
    selection span at most ``ceil(interval / C) + 1`` chunks."""
    return math.ceil(interval / chunk_size) + 1


def _capture(fn, device: torch.device) -> tuple[torch.cuda.CUDAGraph, object]:
    """``fn``'s device work captured in a new CUDA graph (nothing runs now), and what ``fn`` returned.

    Captured on a stream of its own with nothing queued on it, without ``torch.cuda.graph``'s device
    synchronize, garbage collection and cache flush: the capture is taken in the middle of a decode
    loop, and the steps already queued keep the GPU busy while the host captures. Its allocations come
    from the graph's private pool, so they never alias memory that queued work still uses.
    ``thread_local``: another thread's CUDA calls (a read-ahead, a logger) do not invalidate it.
    """
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(torch.cuda.Stream(device)):
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            out = fn()
        finally:
            graph.capture_end()
    return graph, out


class SelectionGraphs:
    """One store's selection, captured (``__init__``, on CUDA) and replayed (``run``).

    Args:
        store: a CUDA ``KVStore`` whose eager selection has run at least once with the write-back width
            below (its kernels are warm: nothing compiles or autotunes during the capture).
        width: chunks the write-back looks at (``write_back_width``); a window with more runs eagerly.

    Example::

        >>> graphs = SelectionGraphs(store, width=2)   # after one eager store.select()
        >>> graphs.run(store.mover, pos=store.length, first=store.synced // store.chunk, step=store.steps, lag=4, lag_max=4)
    """

    def __init__(self, store: "KVStore", *, width: int):
        # Only tensors and graphs are held, not the store or its mover: the mover's pending install holds this
        # object's graph, and a reference back would keep a finished generation's pools alive until a GC pass.
        mover, policy, c, device = store.mover, store.policy, store.chunk, store.device
        self.position, self.device, self.width = policy.position, device, width
        self.first = torch.zeros((), dtype=torch.long, device=device)  # first chunk not yet written back
        evict = store.config.mode == "evict"
        pos = store.length  # the host-side window start at capture (graph-safe selectors do not read it)

        def plan():
            chosen = policy.choose(mover.layers, mover.available, pos, set_position=False)
            stop = (policy.position + c - 1) // c  # chunks holding a token before the window
            return mover.plan(chosen, written=(self.first, stop, width), evict=evict)

        self.plan_graph, self.plan = _capture(plan, device)
        self.copies_graph, _ = _capture(lambda: mover.copies(self.plan), device)
        self.install_graph, _ = _capture(lambda: mover.install(self.plan), device)

    def run(self, mover: "MemoryMover", *, pos: int, first: int, step: int, lag: int, lag_max: int | None) -> None:
        """Select for the window starting at ``pos`` (chunks from ``first`` on were decoded since the last
        selection), as ``KVStore.select`` does eagerly: plan now, copies on ``mover``'s side stream (the
        store's mover, which the graphs were captured from), the tables of the recall ``lag`` steps later
        (``MemoryMover.defer``)."""
        self.position.fill_(pos)
        self.first.fill_(first)
        self.plan_graph.replay()
        side = mover.side
        done = None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(self.device))  # the steps so far and the plan
            with torch.cuda.stream(side):
                self.copies_graph.replay()
                done = torch.cuda.Event()
                done.record(side)
        else:
            self.copies_graph.replay()
        mover.defer(self.install_graph.replay, done, [], step=step, lag=lag, lag_max=lag_max)  # tables counted in tensors()

    def tensors(self) -> list[torch.Tensor]:
        """The device tensors the graphs keep between replays (counted by ``KVStore.footprint``): the plan's
        tables and copy rows, and the write-back's first chunk. Not counted: the selection's intermediates
        (scores, masks, ranks: a few ``[L, B, N]`` tensors) in the graphs' private pools."""
        plan = self.plan
        rows = [t for copy in (plan.write_back, plan.recall) if copy is not None for t in copy]
        return [self.first, plan.after, plan.after_inv, *rows]

    def release(self) -> None:
        """Return the graphs' private memory pools to the allocator now."""
        for graph in (self.plan_graph, self.copies_graph, self.install_graph):
            graph.reset()
        self.plan = None
