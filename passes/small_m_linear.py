"""``LowerSmallMLinearPass``: the decode step's projections as ``lsa::small_m_linear`` (a Triton GEMV).

A decode step multiplies one token per sequence (a few rows) by every weight matrix of the model; on
CUDA ``lsa::small_m_linear`` streams each weight once (``kernels/small_m_linear.py``). Run on the bound
decode program (parameters are ``get_attr`` nodes), after ``VerifyRewritePass``; ``build_decode_program``
says which options it runs with and why.

A node is replaced when it is ``linear(x, W[, b])`` (``torch.nn.functional.linear``), or
``matmul(x, W.t())`` / ``x @ W.T`` over a transposed weight, and:
- ``W`` is a 2-D tensor attribute of the program (a model parameter, or a tensor-parallel rank's
  local shard) on a device of ``devices`` (CUDA by default) in fp16/bf16, and ``b`` is None or such a
  1-D attribute of W's dtype;
- ``x`` (its shape from tracing: static) has W's dtype and device type and at most ``max_rows`` rows
  (the product of its leading dimensions);
- with ``normed_inputs=False``, ``x`` is not a normalization's output (an ``rsqrt`` or a norm function
  a few pointwise ops upstream): Inductor computes such a norm inside its own lowering of the product,
  which the GEMV would leave to a kernel of its own. At the Llama-3-8B shape on an H200 (run 70) the
  step was 0.28 ms faster with only the o and down projections lowered, 0.04 ms slower with all of them
  (``benchmarks/step_breakdown.py`` variants ``cd_gemv_unnormed``, ``default``, ``cd_no_gemv``).
Everything else (CPU programs, fp32 weights, activations times activations, prefill-sized inputs) is
left alone: the CPU path and its exactness tests see the graph the rewrite made.

Before::

    linear = torch._C._nn.linear(x, model_layers_0_self_attn_q_proj_weight, None)   # x [1, 1, 4096]

After::

    small_m_linear = torch.ops.lsa.small_m_linear.default(x, model_layers_0_self_attn_q_proj_weight, None)
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx

from lsa_rewrite import kernels  # noqa: F401  (registers lsa::small_m_linear)
from lsa_rewrite.kernels.small_m_linear import MAX_ROWS, SUPPORTED_DTYPES

from .capture import example_value
from .locate import GraphPass

log = logging.getLogger("lsa_rewrite.passes")

OP = torch.ops.lsa.small_m_linear.default
_LINEAR = {torch.nn.functional.linear, torch._C._nn.linear}
_MATMUL = {torch.matmul, operator.matmul}
_TRANSPOSE_METHODS = {"t", "transpose"}
_TRANSPOSE_FUNCS = {torch.t, torch.transpose}


def _attr(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads (None for anything else)."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = gm
    for part in node.target.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value if isinstance(value, torch.Tensor) else None


_NORMS = {torch.rsqrt, torch.nn.functional.layer_norm, torch.layer_norm, torch.nn.functional.group_norm}
_NORMS |= {f for f in (getattr(torch.nn.functional, "rms_norm", None), getattr(torch, "rms_norm", None)) if f is not None}
_NORM_DEPTH = 6  # nodes walked back from x: a norm's output is a few pointwise ops after its rsqrt


def normed(x: fx.Node, depth: int = _NORM_DEPTH) -> bool:
    """Whether ``x`` is a normalization's output: an ``rsqrt`` or a norm function within ``depth`` nodes
    upstream, walking through anything but products (linear, matmul, the GEMV op) and custom ops."""
    frontier, seen = [x], set()
    for _ in range(depth + 1):
        following = []
        for node in frontier:
            if not isinstance(node, fx.Node) or node in seen or node.op not in ("call_function", "call_method"):
                continue
            seen.add(node)
            if node.target in _NORMS or node.target == "rsqrt":
                return True
            if node.target in _LINEAR or node.target in _MATMUL or isinstance(node.target, torch._ops.OpOverload):
                continue
            following += [a for a in node.all_input_nodes]
        frontier = following
    return False


def _transposed_weight(node) -> fx.Node | None:
    """``W`` when ``node`` is ``W.t()`` / ``W.transpose(0, 1)`` / ``torch.t(W)`` of a 2-D ``W``, else None."""
    if not isinstance(node, fx.Node):
        return None
    is_method = node.op == "call_method" and node.target in _TRANSPOSE_METHODS
    is_func = node.op == "call_function" and node.target in _TRANSPOSE_FUNCS
    if not (is_method or is_func) or not node.args:
        return None
    if node.target in ("transpose", torch.transpose) and sorted(d % 2 for d in node.args[1:3]) != [0, 1]:
        return None
    return node.args[0]


class LowerSmallMLinearPass(GraphPass):
    """Replace small-row linear layers over weight attributes with ``lsa::small_m_linear`` (see module docstring).

    ``max_rows``: the most rows of x lowered (the op takes up to ``MAX_ROWS``); ``devices``: device types
    whose weights are lowered (the op dispatches to Triton on CUDA only; a test may name ``"cpu"`` to see
    what the pass would do there); ``normed_inputs``: lower products whose x is a norm's output too.
    """

    def __init__(self, *, max_rows: int = MAX_ROWS, devices: tuple[str, ...] = ("cuda",), normed_inputs: bool = True):
        if not 1 <= max_rows <= MAX_ROWS:
            raise ValueError(f"LowerSmallMLinearPass: max_rows must be 1..{MAX_ROWS}, got {max_rows}")
        self.max_rows = max_rows
        self.devices = tuple(devices)
        self.normed_inputs = normed_inputs

    def _match(self, gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None, fx.Node | None] | None:
        """``(x, W, b, transpose node or None)`` when ``node`` is to be lowered."""
        if node.op != "call_function":
            return None
        transpose = None
        if node.target in _LINEAR:
            x = node.args[0] if node.args else node.kwargs.get("input")
            weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        elif node.target in _MATMUL and len(node.args) == 2 and not node.kwargs:
            x, transpose = node.args
            weight, bias = _transposed_weight(transpose), None
        else:
            return None
        w = _attr(gm, weight)
        if w is None or w.dim() != 2 or w.device.type not in self.devices or w.dtype not in SUPPORTED_DTYPES:
            return None
        if bias is not None:
            b = _attr(gm, bias)
            if b is None or b.dim() != 1 or b.shape[0] != w.shape[0] or b.dtype != w.dtype or b.device != w.device:
                return None
        xv = example_value(x) if isinstance(x, fx.Node) else None
        if not isinstance(xv, torch.Tensor) or xv.dim() < 1 or xv.dtype != w.dtype or xv.device.type != w.device.type:
            return None
        if xv.shape[-1] != w.shape[1] or not 1 <= xv.numel() // w.shape[1] <= self.max_rows:
            return None
        if not self.normed_inputs and normed(x):
            return None
        return x, weight, bias, transpose

    def __call__(self, gm: fx.GraphModule) -> int:
        """Lower the matching nodes of ``gm`` in place (recompiling it when any changed); returns how many."""
        graph = gm.graph
        lowered = 0
        for node in list(graph.nodes):
            found = self._match(gm, node)
            if found is None:
                continue
            x, weight, bias, transpose = found
            with graph.inserting_before(node):
                new = graph.call_function(OP, (x, weight, bias))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            if transpose is not None and not transpose.users:
                graph.erase_node(transpose)
            lowered += 1
        if lowered:
            graph.lint()
            gm.recompile()
        log.info("LowerSmallMLinearPass: %d linear layers lowered to lsa::small_m_linear", lowered)
        return lowered
