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
- with ``fuse_norm=True``, a one-row product whose ``x`` is the output of a Llama-style RMSNorm (matched
  by the graph's structure, ``rms_norm_match``) becomes ``lsa::small_m_linear_rmsnorm`` reading the norm's
  input: the norm is computed in the GEMV's prologue, as Inductor computes it inside its own reduction.
  Each product of one norm (q, k and v) gets its own fused op; the norm's nodes go once nothing reads them.
  Other norm forms (Gemma's ``x * (1 + w)`` in fp32, LayerNorm) are not matched and fall to
  ``normed_inputs``. Off in the library: the 8B step was 0.38 ms slower with it (run 76, variant
  ``cd_gemv_norm``: the fused kernel's prologue is not hidden yet).
- with ``normed_concat=True`` (and ``normed_inputs=False``), a product of a norm's output whose weight is
  a ``ConcatSharedInputLinearPass`` buffer (``lsa_concat_*``, e.g. q/k/v as one ``[6144, 4096]`` product) is
  lowered all the same: the norm is then computed once for the group, by a kernel of its own (which
  Inductor can fuse with the residual add before it), not once inside each of three reductions.
Everything else (CPU programs, fp32 weights, activations times activations, prefill-sized inputs) is
left alone: the CPU path and its exactness tests see the graph the rewrite made.

Before::

    linear = torch._C._nn.linear(x, model_layers_0_self_attn_q_proj_weight, None)   # x [1, 1, 4096]

After::

    small_m_linear = torch.ops.lsa.small_m_linear.default(x, model_layers_0_self_attn_q_proj_weight, None)

With ``fuse_norm=True``, for ``hidden_states_2 = w * (h * rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(bf16)``,
``h = x.to(float32)``::

    linear = torch._C._nn.linear(hidden_states_2, model_layers_0_self_attn_q_proj_weight, None)
    -> small_m_linear_rmsnorm = torch.ops.lsa.small_m_linear_rmsnorm.default(x, w, eps, model_layers_0_self_attn_q_proj_weight, None)
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from lsa_rewrite import kernels  # noqa: F401  (registers lsa::small_m_linear)
from lsa_rewrite.kernels.small_m_linear import MAX_ROWS, SUPPORTED_DTYPES

from .capture import example_value
from .concat_linear import BUFFER_PREFIX as CONCAT_PREFIX
from .locate import GraphPass

log = logging.getLogger("lsa_rewrite.passes")

OP = torch.ops.lsa.small_m_linear.default
FUSED_OP = torch.ops.lsa.small_m_linear_rmsnorm.default
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


_MUL = {operator.mul, torch.mul}
_ADD = {operator.add, torch.add}
_POW = {operator.pow, torch.pow}


def _is(node, functions=(), method=None) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target == method


def _dtype_of(node) -> torch.dtype | None:
    value = example_value(node) if isinstance(node, fx.Node) else None
    return value.dtype if isinstance(value, torch.Tensor) else None


def _cast_to(node, dtype: torch.dtype) -> fx.Node | None:
    """The input of ``node`` when it is ``t.to(dtype)`` / ``t.float()`` (fp32) giving ``dtype``, else None."""
    if not isinstance(node, fx.Node) or node.op != "call_method" or _dtype_of(node) != dtype:
        return None
    if node.target == "float" and len(node.args) == 1 and not node.kwargs:
        return node.args[0]
    if node.target == "to":
        rest = list(node.args[1:]) + [v for key, v in node.kwargs.items() if key == "dtype"]
        if rest == [dtype] and set(node.kwargs) <= {"dtype"}:
            return node.args[0]
    return None


def _other(node: fx.Node, one) -> object | None:
    """The other operand of a binary ``node`` of which ``one`` is an operand (None when it is not)."""
    a, b = node.args[:2]
    return b if a is one else a if b is one else None


@dataclass
class RMSNormMatch:
    """A Llama-style RMSNorm found in the graph: ``output = weight * (h * rsqrt(mean(h^2) + eps)).to(dtype)``
    with ``h = source.to(float32)``; ``nodes``: its nodes from ``h`` to ``output``."""

    source: fx.Node
    weight: fx.Node
    eps: float
    output: fx.Node
    nodes: list[fx.Node]


def rms_norm_match(gm: fx.GraphModule, out: fx.Node) -> RMSNormMatch | None:
    """``out`` as the output of Hugging Face's ``LlamaRMSNorm`` (its Qwen2/Qwen3/Mistral copies alike), by
    the graph's structure: ``h = x.to(float32)``; ``v = h.pow(2).mean(-1, keepdim=True)``;
    ``h * rsqrt(v + eps)``; ``.to(x.dtype)``; times a 1-D weight attribute of x's dtype and length (either
    operand order). x must be fp16/bf16. Anything else (Gemma's ``h * (1 + w.float())``, a weight cast to
    fp32 first, LayerNorm) gives None."""
    if not _is(out, _MUL) or len(out.args) != 2 or out.kwargs:
        return None
    dtype = _dtype_of(out)
    if dtype not in SUPPORTED_DTYPES:
        return None
    for weight, cast in (out.args, out.args[::-1]):
        g = _attr(gm, weight)
        if g is None or g.dim() != 1 or g.dtype != dtype:
            continue
        scaled = _cast_to(cast, dtype)
        if scaled is None or not _is(scaled, _MUL) or len(scaled.args) != 2 or scaled.kwargs:
            continue
        for h, rsqrt in (scaled.args, scaled.args[::-1]):
            if not (_is(rsqrt, {torch.rsqrt}, "rsqrt") and len(rsqrt.args) == 1):
                continue
            add = rsqrt.args[0]
            if not (_is(add, _ADD) and len(add.args) == 2 and not add.kwargs):
                continue
            eps = next((a for a in add.args if isinstance(a, (int, float)) and not isinstance(a, bool)), None)
            mean = next((a for a in add.args if isinstance(a, fx.Node)), None)
            if eps is None or not _is(mean, {torch.mean}, "mean"):
                continue
            dims = mean.args[1] if len(mean.args) > 1 else mean.kwargs.get("dim")
            keep = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
            pow_ = mean.args[0] if mean.args else None
            if not (_is(pow_, _POW, "pow") and len(pow_.args) == 2 and pow_.args[0] is h and pow_.args[1] == 2):
                continue
            source = _cast_to(h, torch.float32)
            hv = example_value(h)
            if source is None or _dtype_of(source) != dtype or not isinstance(hv, torch.Tensor) or keep is not True:
                continue
            if isinstance(dims, (list, tuple)):
                dims = dims[0] if len(dims) == 1 else None
            if not isinstance(dims, int) or dims % hv.dim() != hv.dim() - 1 or g.shape[0] != hv.shape[-1]:
                continue
            return RMSNormMatch(source, weight, float(eps), out, [h, pow_, mean, add, rsqrt, scaled, cast, out])
    return None


def _row_slice(node) -> tuple | None:
    """The index of ``node`` when it is ``t[index]`` selecting rows only (slices, the last dimension whole):
    it commutes with a norm over the last dimension. None otherwise."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2):
        return None
    index = node.args[1]
    index = index if isinstance(index, tuple) else (index,)
    value = example_value(node.args[0])
    if not isinstance(value, torch.Tensor) or not index or not all(isinstance(i, slice) for i in index) or len(index) > value.dim():
        return None
    if len(index) == value.dim() and index[-1] != slice(None):
        return None
    return node.args[1]


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
    what the pass would do there); ``normed_inputs``: lower products whose x is a norm's output too;
    ``fuse_norm``: a one-row product of a Llama-style RMSNorm's output becomes ``lsa::small_m_linear_rmsnorm``
    of the norm's input (whatever ``normed_inputs`` says); ``normed_concat``: with ``normed_inputs=False``,
    lower a product of a norm's output anyway when its weight is a ``ConcatSharedInputLinearPass`` buffer
    (``lsa_concat_*``: q/k/v as one product, whose norm then is one kernel for the three).
    """

    def __init__(self, *, max_rows: int = MAX_ROWS, devices: tuple[str, ...] = ("cuda",), normed_inputs: bool = True,
                 fuse_norm: bool = False, normed_concat: bool = False):
        if not 1 <= max_rows <= MAX_ROWS:
            raise ValueError(f"LowerSmallMLinearPass: max_rows must be 1..{MAX_ROWS}, got {max_rows}")
        self.max_rows = max_rows
        self.devices = tuple(devices)
        self.normed_inputs = normed_inputs
        self.fuse_norm = fuse_norm
        self.normed_concat = normed_concat

    def _match(self, gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None, fx.Node | None, tuple | None] | None:
        """``(x, W, b, transpose node or None, norm)`` when ``node`` is to be lowered; ``norm``:
        ``(RMSNormMatch, row index or None)`` when it is to be fused with the norm that makes x."""
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
        if self.fuse_norm and xv.numel() == w.shape[1]:  # one row
            index = _row_slice(x)
            norm = rms_norm_match(gm, x.args[0] if index is not None else x)
            if norm is not None:
                return x, weight, bias, transpose, (norm, index)
        concatenated = self.normed_concat and weight.target.startswith(CONCAT_PREFIX)
        if not self.normed_inputs and not concatenated and normed(x):
            return None
        return x, weight, bias, transpose, None

    def __call__(self, gm: fx.GraphModule) -> int:
        """Lower the matching nodes of ``gm`` in place (recompiling it when any changed); returns how many."""
        graph = gm.graph
        lowered = fused = 0
        norm_nodes: set[fx.Node] = set()
        for node in list(graph.nodes):
            found = self._match(gm, node)
            if found is None:
                continue
            x, weight, bias, transpose, norm = found
            with graph.inserting_before(node):
                if norm is None:
                    new = graph.call_function(OP, (x, weight, bias))
                else:
                    match, index = norm
                    source = match.source
                    if index is not None:  # the rows the product reads, taken before the norm (row-wise)
                        source = graph.call_function(operator.getitem, (source, index))
                        source.meta = dict(x.meta)
                        norm_nodes.add(x)
                    new = graph.call_function(FUSED_OP, (source, match.weight, match.eps, weight, bias))
                    norm_nodes.update(match.nodes)
                    fused += 1
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            if transpose is not None and not transpose.users:
                graph.erase_node(transpose)
            lowered += 1
        # the norms' nodes nothing reads any more (a norm whose output has other users stays)
        for node in reversed(list(graph.nodes)):
            if node in norm_nodes and not node.users:
                graph.erase_node(node)
        if lowered:
            graph.lint()
            gm.recompile()
        log.info("LowerSmallMLinearPass: %d linear layers lowered to lsa::small_m_linear (%d with their RMSNorm: "
                 "lsa::small_m_linear_rmsnorm)", lowered, fused)
        return lowered
