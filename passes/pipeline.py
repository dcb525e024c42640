"""The ordered pass pipeline: captured step -> verified, bound decode program.

``LocateAttentionPass`` -> (``TapIndexerInputsPass``) -> ``RewriteAttentionPass`` -> ``VerifyRewritePass`` -> bind
-> ``ConcatSharedInputLinearPass`` -> ``LowerSmallMLinearPass``. Binding turns parameter placeholders into
``get_attr`` of ``model.<name>`` (no copies: the program shares the model's parameters) and leaves as inputs
only the step inputs and the store tensors. The last two passes need the bound weights (their device and
dtype): in a batch-1 step whose weights are fp16/bf16 CUDA tensors, the products of one input by three or
more weights (Llama: q/k/v) become one product by their concatenation (the weights moved into one storage,
no copy), and that product and the projections that do not read a norm's output (Llama: o and down) are
lowered to ``lsa::small_m_linear``; a CPU program, a batched step and a tensor-parallel step are left as they
are (see ``build_decode_program``). Gate/up are not concatenated: as one product under Inductor they lose
the silu * up fusion (benchmarks/NOTES.md run 72).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.fx as fx

from lsa_rewrite.tensor_parallel import is_dtensor

from .capture import CapturedStep
from .concat_linear import ConcatSharedInputLinearPass
from .indexer_taps import TapIndexerInputsPass
from .locate import AttentionSite, LocateAttentionPass
from .rewrite import RewriteAttentionPass
from .small_m_linear import LowerSmallMLinearPass
from .verify import VerifyRewritePass


@dataclass
class DecodeProgram:
    """A rewritten decode step: ``module(*step_inputs, *store tensors) -> logits``."""

    module: fx.GraphModule
    input_names: list[str]
    store_keys: list[tuple[int | None, str]]
    sites: list[AttentionSite]
    batch: int

    def __call__(self, inputs: dict[str, torch.Tensor], store) -> torch.Tensor:
        args = [inputs[name] for name in self.input_names]
        args += [store.tensor(layer, name) for layer, name in self.store_keys]
        return self.module(*args)


def locate(step: CapturedStep, *, layer_windows: dict[int, int] | None = None) -> list[AttentionSite]:
    """Run ``LocateAttentionPass`` only (what ``inspect`` reports); the graph is not changed."""
    return LocateAttentionPass(layer_windows)(step)


def build_decode_program(
    step: CapturedStep, model: torch.nn.Module, *, layer_windows: dict[int, int] | None = None,
    indexer_layers: tuple[int, ...] = (),
) -> DecodeProgram:
    """Locate, (tap the indexer's inputs at ``indexer_layers``,) rewrite, verify and bind ``step`` (its graph
    is modified in place), then lower some projections of a CUDA fp16/bf16 batch-1 step to the GEMV op
    (q/k/v first concatenated into one product)."""
    sites = LocateAttentionPass(layer_windows)(step)
    if indexer_layers:
        TapIndexerInputsPass(indexer_layers)(step, sites)
    store_keys = RewriteAttentionPass()(step, sites)
    VerifyRewritePass()(step, sites)
    module, input_names = _bind(step, model)
    if not any(is_dtensor(p) for p in model.parameters()):
        # One row only, and only where x is not a norm's output: Inductor computes a norm inside the
        # reduction that reads it (the GEMV would need a kernel of its own for it), and at four rows its
        # lowering beat the GEMV's dot path (H200, benchmarks/NOTES.md run 70). Tensor-parallel steps are
        # left to Inductor: with o and down as the GEMV the two-GPU 512K step was 0.55 ms slower (run 73;
        # likely because their outputs feed the all-reduces, which Inductor lowers over symmetric memory
        # only on buffers it allocates itself; not checked). ``fuse_norm`` (q/k/v, gate/up and the lm head
        # as the GEMV with the RMSNorm in its prologue) is off: the step was 0.38 ms slower with it (run 76).
        # q/k/v are the exception: concatenated (memory-neutral) they are one 6144 x 4096 GEMV a layer at the
        # 8B shape, and their norm one kernel (fused with the residual add before it) instead of a part of
        # three reductions: the 128K step 0.12-0.21 ms faster (run 77, variant cd_gemv_qkv). Gate/up stay
        # Inductor's (their norm and silu * up fusions), as does the lm head.
        ConcatSharedInputLinearPass(min_group=3, max_rows=1)(module)
        LowerSmallMLinearPass(max_rows=1, normed_inputs=False, normed_concat=True)(module)
    batch = sites[0].batch
    return DecodeProgram(module, input_names, store_keys, sites, batch)


def _bind(step: CapturedStep, model: torch.nn.Module) -> tuple[fx.GraphModule, list[str]]:
    gm = step.graph_module
    graph = gm.graph
    # The rewritten graph reads parameters through ``model.<name>``; attach the model to the traced
    # module so get_attr nodes resolve, build the final module, then detach it again.
    gm.add_submodule("model", model)
    input_names: list[str] = []
    try:
        for node in list(graph.nodes):
            if node.op != "placeholder" or node.name.startswith("lsa_"):
                continue
            binding = step.bindings.get(node.name)
            if binding is None:
                raise RuntimeError(f"unbound graph input {node.name}")
            if binding.kind == "input":
                input_names.append(binding.name)
                continue
            if binding.kind == "param" and is_dtensor(_attr(model, binding.name)):
                # a tensor-parallel model traced on its local view (lsa_rewrite/tensor_parallel.py): the graph
                # reads the rank's shard, held by reference (the DTensor's own local tensor, no copy)
                target = f"lsa_local_{node.name}"
                gm.register_buffer(target, step.examples[node.name], persistent=False)
            elif binding.kind == "param":
                target = f"model.{binding.name}"
            else:  # constants seen at capture are kept by value
                target = f"lsa_const_{node.name}"
                gm.register_buffer(target, step.examples[node.name], persistent=False)
            with graph.inserting_before(node):
                attr = graph.get_attr(target)
            attr.meta = dict(node.meta)
            node.replace_all_uses_with(attr)
            graph.erase_node(node)
        graph.lint()
        module = fx.GraphModule(gm, graph, class_name="LSADecodeStep")
    finally:
        del gm._modules["model"]
    return module, input_names


def _attr(model: torch.nn.Module, name: str):
    owner, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, leaf)


def clone_program(program: DecodeProgram) -> DecodeProgram:
    """A deep copy of the graph (parameters shared), for handing to a compiler."""
    module = fx.GraphModule(program.module, copy.deepcopy(program.module.graph), class_name="LSADecodeStep")
    return DecodeProgram(module, list(program.input_names), list(program.store_keys), program.sites, program.batch)
