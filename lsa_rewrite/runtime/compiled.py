"""The compiled decode step: one ``torch.compile`` per batch size, reused by every store; on CUDA one
CUDA graph per store.

``compile_program`` deep-copies the rewritten graph and compiles it with ``torch.compile``
(``fullgraph=True``, static shapes but for the store's capacity dimensions). A store's tensors keep
their shapes for its whole life, so the step never recompiles as the context grows; across
generations only the slots per sequence ``S`` and the chunks per sequence ``N`` change with the
capacity (prompt + new tokens, or ``max_context``). ``CompiledStep`` marks exactly those dimensions
dynamic (the state contract names them: ``StateTensor.capacity_dims``), so a new prompt of another
length reuses the compiled module instead of recompiling it. Every other size (batch, heads, head dim,
chunk size, window, the model's own) stays static, and only the ``lsa::`` custom ops read the store's
tensors, so the code Inductor generates for the rest of the step is the same as with static shapes.
Where a capacity dimension is 1 (a store of a single chunk), Dynamo specializes it; the next store of
another size compiles once more, dynamically, and later stores reuse that.

On CUDA, ``CompiledStep`` also captures one call in a CUDA graph whose inputs are the store's own
tensors plus static buffers for the step inputs. Each step copies the new token and positions into
those buffers and replays the graph: no host sync and no allocation per step. Capture needs the step to
run a few times first (warm-up); the step is idempotent for a given position (it rewrites the same
token's K/V at the same slot), so warming up on the first real step is harmless. Selection and recall
stay outside the graph and only write the store's tensors in place. A new store captures a new graph
(its tensors are new), which takes milliseconds once the module is compiled.

Not here: whether to compile at all (``LSASession``, from ``LSAConfig.compile`` and the device).
"""

from __future__ import annotations

import contextlib
import os
import random
import time

import torch

from ..passes import DecodeProgram, clone_program
from .state import declared


# Inductor settings for the decode step. ``coordinate_descent_tuning`` makes Inductor lower a matmul
# with one row (every projection of a B=1 decode step) to a fused Triton reduction it tunes, instead of
# a cuBLAS call: on the H200, 8B shape, 128K, B=1, the step's GPU time went from 5.96 ms to 5.25-5.56
# ms across compiles (the projections read the weights at ~3.6 TB/s instead of 3.4, and the norms and
# activations fuse into them), at the cost of a longer first compile (~80 s against ~37 s; Inductor's
# on-disk caches keep later processes' compiles short). benchmarks/step_breakdown.py, NOTES runs 57-60.
INDUCTOR_OPTIONS = {"coordinate_descent_tuning": True}


def compile_program(program: DecodeProgram, *, backend: str = "inductor"):
    """``torch.compile`` a deep copy of the rewritten graph (one graph; static shapes except the
    dimensions ``CompiledStep`` marks dynamic on the store's tensors); Inductor with ``INDUCTOR_OPTIONS``."""
    options = dict(INDUCTOR_OPTIONS) if backend == "inductor" else None
    return torch.compile(clone_program(program).module, backend=backend, fullgraph=True, dynamic=False, options=options)


def capacity_dims(program: DecodeProgram) -> list[tuple[int, tuple[int, ...]]]:
    """``(index among the store inputs, dims)`` of every store input with dimensions that follow the capacity."""
    layouts = {site.layer: site.layout for site in program.sites}
    out = []
    for i, (layer, name) in enumerate(program.store_keys):
        dims = declared(None if layer is None else layouts[layer], name).capacity_dims()
        if dims:
            out.append((i, dims))
    return out


_WARMUP_STREAMS: dict[int, torch.cuda.Stream] = {}


def _warmup_stream(device: int) -> torch.cuda.Stream:
    """One side stream per device for every step's warm-up before capture. cuBLAS keeps a workspace
    (32 MiB on the H200) for each stream it has run on, for the life of the process: a new stream per
    store grew device memory by 32 MiB per generation (benchmarks/NOTES.md, run 47)."""
    if device not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[device] = torch.cuda.Stream(device)
    return _WARMUP_STREAMS[device]


class CompiledStep:
    """One store's compiled (and on CUDA graph-captured) decode step: ``step(inputs) -> logits``.

    ``compiled``: a module from ``compile_program`` for the same program, shared across stores;
    ``cuda_graph``: capture and replay one CUDA graph (CUDA only); the returned logits are then a
    static buffer the next step overwrites. ``setup_s``: wall seconds of the first call (compiling, when
    the module had not run yet, warm-up and capture), None before it.
    """

    def __init__(
        self, program: DecodeProgram, store, *, compiled=None, cuda_graph: bool = True, backend: str = "inductor",
        compile_config: dict | None = None,
    ):
        self.program = program
        self.store = store
        self.compiled = compiled if compiled is not None else compile_program(program, backend=backend)
        # Inductor settings in force while the step may compile (its warm-up and capture), e.g. a tensor-parallel
        # step's collective lowering (TensorParallelPlan.compile_options); set around those calls, so they reach
        # this step's compile and nothing else in the process.
        self.compile_config = dict(compile_config or {})
        self.cuda_graph = cuda_graph
        self.static_inputs: dict[str, torch.Tensor] | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None
        self.setup_s: float | None = None
        for i, dims in capacity_dims(program):
            layer, name = program.store_keys[i]
            # maybe_: a size-1 dimension may be specialized (see the module docstring) instead of failing the compile
            torch._dynamo.maybe_mark_dynamic(store.tensor(layer, name), dims)

    @contextlib.contextmanager
    def _settings(self):
        """``compile_config`` in force (nothing to do without one), and Python's global random generator in a
        fresh state while it is: Inductor names each symmetric-memory buffer of a step by a draw from that
        generator (its ``alloc_id``), and Dynamo restores the generator's state after every compile, so two
        steps compiled in one process (say batch 2, then batch 1) drew the same id and the second failed to
        allocate its buffer of another size (torch 2.11, benchmarks/NOTES.md run 82). The caller's state is
        restored afterwards."""
        if not self.compile_config:
            yield
            return
        import torch._inductor.config as inductor_config

        state = random.getstate()
        random.seed(os.urandom(16))
        try:
            with inductor_config.patch(self.compile_config):
                yield
        finally:
            random.setstate(state)

    def release(self) -> None:
        """Free what this step holds for its store: the CUDA graph (``reset`` returns its private memory
        pool, the intermediates of the captured step, to the allocator at once rather than whenever the
        last reference to the graph goes), the static input buffers and the store reference. The
        compiled module stays (the session reuses it)."""
        if self.graph is not None:
            self.graph.reset()
        self.graph = self.output = self.static_inputs = None
        self.store = None

    def _args(self) -> list[torch.Tensor]:
        # Looked up at each call, not held: a retired store's buffers must be freed with it.
        assert self.static_inputs is not None
        args = [self.static_inputs[name] for name in self.program.input_names]
        return args + [self.store.tensor(layer, name) for layer, name in self.program.store_keys]

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        first = self.static_inputs is None
        if first:
            started = time.perf_counter()
            # Fresh contiguous buffers: a clone keeps the strides of a view (the probe's last prompt token is
            # a [B, 1] slice with the prompt's length as its stride), and Dynamo guards on strides.
            self.static_inputs = {
                name: torch.empty_like(inputs[name], memory_format=torch.contiguous_format) for name in self.program.input_names
            }
        for name in self.program.input_names:
            self.static_inputs[name].copy_(inputs[name], non_blocking=True)
        if not self.cuda_graph:
            with self._settings():
                out = self.compiled(*self._args())
            if first:
                self.setup_s = time.perf_counter() - started
            return out
        if self.graph is None:
            side = _warmup_stream(torch.cuda.current_device())
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), self._settings():
                for _ in range(3):  # compile + autotune + settle allocations before capture
                    self.compiled(*self._args())
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph), self._settings():
                self.output = self.compiled(*self._args())
            torch.cuda.current_stream().synchronize()
            self.setup_s = time.perf_counter() - started
        self.graph.replay()
        return self.output
