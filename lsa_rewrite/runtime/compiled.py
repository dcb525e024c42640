"""The decode step on CUDA: compiled by Inductor once per store shape, replayed as a CUDA graph.

``CompiledStep`` deep-copies the rewritten graph, compiles it with ``torch.compile`` (Inductor,
``fullgraph=True``, static shapes: the store's tensors have fixed shapes for its whole life, so the
step never recompiles as the context grows) and captures one call in a CUDA graph whose inputs are
the store's own tensors plus static buffers for the step inputs. Each step copies the new token and
positions into those buffers and replays the graph: no host sync and no allocation per step.

Capture needs the step to run a few times first (warm-up); the step is idempotent for a given
position (it rewrites the same token's K/V at the same slot), so warming up on the first real step is
harmless. Selection and recall stay outside the graph and only write the store's tensors in place.

Not here: CPU execution (the rewritten ``GraphModule`` runs as is there).
"""

from __future__ import annotations

import torch

from ..passes import DecodeProgram, clone_program


def compile_program(program: DecodeProgram, *, backend: str = "inductor"):
    """``torch.compile`` a deep copy of the rewritten graph (static shapes, one graph)."""
    return torch.compile(clone_program(program).module, backend=backend, fullgraph=True, dynamic=False)


class CompiledStep:
    """One store's compiled, graph-captured decode step: ``step(inputs) -> logits`` (a static buffer)."""

    def __init__(self, program: DecodeProgram, store, *, compiled=None, cuda_graph: bool = True, backend: str = "inductor"):
        self.program = program
        self.store = store
        # A compiled module is reused across stores of the same shapes (Dynamo guards on shapes).
        self.compiled = compiled if compiled is not None else compile_program(program, backend=backend)
        self.cuda_graph = cuda_graph
        self.static_inputs: dict[str, torch.Tensor] | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None

    def _args(self) -> list[torch.Tensor]:
        assert self.static_inputs is not None
        args = [self.static_inputs[name] for name in self.program.input_names]
        return args + [self.store.tensor(layer, name) for layer, name in self.program.store_keys]

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.static_inputs is None:
            self.static_inputs = {name: inputs[name].clone() for name in self.program.input_names}
        for name in self.program.input_names:
            self.static_inputs[name].copy_(inputs[name], non_blocking=True)
        if not self.cuda_graph:
            return self.compiled(*self._args())
        if self.graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # compile + autotune + settle allocations before capture
                    self.compiled(*self._args())
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.output = self.compiled(*self._args())
        self.graph.replay()
        return self.output
