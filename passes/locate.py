"""``LocateAttentionPass``: pair each KV cache with the attention that reads it.

Works on the Dynamo graph of one decode step (``capture.py``), at the torch-function level:

- attention is ``scaled_dot_product_attention`` (SDPA) or the eager chain
  ``matmul(q, k^T) -> [scale | softcap | mask add] -> softmax -> [cast | dropout] -> matmul(p, v)``;
- walking back from attention's k/v through view-like ops (view, reshape, expand, transpose,
  getitem, repeat_interleave, casts ...) reaches the cache: a placeholder written in place by
  ``index_copy_`` / ``setitem`` / ``index_put_`` (static and module-buffer caches), or
  ``torch.cat((past, new), dim)`` whose ``past`` is a placeholder (dynamic caches);
- the write gives the new token's K/V and the sequence dim of the cache layout.

Each pairing becomes an ``AttentionSite``. Facts the graph cannot give (a layer's sliding window)
come declaratively from the HF config via ``layer_windows``. No model class names appear here.

Before (SDPA, static cache)::

    index_copy_(k_cache, 2, idx, k_new); index_copy_(v_cache, 2, idx, v_new)
    out = scaled_dot_product_attention(q, expand(k_cache), expand(v_cache), attn_mask=mask, scale=s)

After locating: ``AttentionSite(q=q, k_new=k_new, v_new=v_new, attn=out, scale=s, ...)``.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .capture import Binding, CapturedStep, example_value

log = logging.getLogger("lsa_rewrite.passes")


class LocateError(ValueError):
    """The graph's attention could not be paired with its KV-cache writes."""


SDPA_TARGETS = {torch.nn.functional.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
MATMUL_FUNCS = {torch.matmul, operator.matmul, torch.bmm}
SOFTMAX_FUNCS = {torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax}
# Ops that move or re-view data without mixing tokens: walked through between a cache and attention.
VIEW_METHODS = {
    "view", "reshape", "expand", "transpose", "permute", "contiguous", "to", "float", "half", "bfloat16",
    "type_as", "unsqueeze", "squeeze", "flatten", "repeat_interleave", "repeat", "clone", "detach", "type",
    "__getitem__", "mT",
}
VIEW_FUNCS = {
    torch.reshape, torch.transpose, torch.permute, torch.unsqueeze, torch.squeeze, torch.flatten,
    torch.repeat_interleave, operator.getitem, torch.Tensor.contiguous, torch.Tensor.to,
}
WRITE_METHODS = {"index_copy_", "index_put_"}
# Arithmetic on attention scores, out of place and in place (``scores /= sqrt(d)`` traces to ``itruediv``).
MUL_FUNCS = {operator.mul, torch.mul, operator.imul}
DIV_FUNCS = {operator.truediv, torch.div, operator.itruediv}
ADD_FUNCS = {operator.add, torch.add, operator.iadd}
MUL_METHODS = {"mul", "__mul__", "mul_", "__imul__"}
DIV_METHODS = {"div", "__truediv__", "div_", "__itruediv__"}
ADD_METHODS = {"add", "__add__", "add_", "__iadd__"}
MASK_FILL_METHODS = {"masked_fill", "masked_fill_"}
# A mask's values: 0 where attended, at most this where not (-inf, the dtype's min, -1e4 in older code).
MASKED_AT_MOST = -1e4
WRITE_FUNCS = {operator.setitem, torch.Tensor.index_copy_, torch.Tensor.index_put_}
CAT_FUNCS = {torch.cat, torch.concat, torch.concatenate}


@dataclass
class AttentionSite:
    """One attention over a KV cache, as found in the graph, and what will be done with it."""

    index: int  # order in the graph
    layer: int  # model layer (HF cache layer index, else graph order)
    form: str  # "sdpa" | "eager"
    cache_op: str  # "index_copy_" | "setitem" | "index_put_" | "cat"
    q: fx.Node
    attn: fx.Node  # node whose value is the attention output [B, Hq, 1, D]
    k_source: fx.Node  # cache placeholder
    v_source: fx.Node
    k_new: fx.Node  # the new token's key in the cache layout
    v_new: fx.Node
    seq_dim: int
    removable: list[fx.Node] = field(default_factory=list)  # writes / cats replaced by the store
    q_heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    batch: int = 0
    scale: float = 1.0
    softcap: float = 0.0
    gqa: str = "none"  # "none" | "repeat" | "enable_gqa"
    window: int | None = None
    action: str = "rewrite"  # "rewrite" (sparse) | "ring" (sliding window, kept exact)
    reason: str = ""
    dtype: torch.dtype = torch.float32
    indexer: Any = None  # IndexerTap (passes/indexer_taps.py) when the indexer reads this layer
    # What the dense attention masks its scores with, dropped by the rewrite (the store masks by position):
    # ("bias", x) added to the scores or SDPA's attn_mask, ("fill", x) the value masked scores are set to.
    masks: list[tuple[str, Any]] = field(default_factory=list)

    @property
    def layout(self) -> str:
        """The per-layer state contract this site's store layer follows (``runtime/state.py``)."""
        return "rewrite+indexer" if self.indexer is not None else self.action

    def describe(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "attention": self.form,
            "cache_write": self.cache_op,
            "q_heads": self.q_heads,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "gqa": self.gqa,
            "scale": self.scale,
            "softcap": self.softcap,
            "window": self.window,
            "action": self.action,
            "reason": self.reason,
        }


class GraphPass:
    """Base of lsa-rewrite's FX passes: a name for logs and a ``uuid()`` hashed from the source."""

    def uuid(self) -> str:
        return hashlib.sha256(inspect.getsource(type(self)).encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return type(self).__name__


def _method(node: fx.Node) -> str | None:
    return node.target if node.op == "call_method" else None


def _is_view(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in VIEW_METHODS
    return node.op == "call_function" and node.target in VIEW_FUNCS


def _is_matmul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in MATMUL_FUNCS) or _method(node) == "matmul"


def _is_softmax(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in SOFTMAX_FUNCS) or _method(node) == "softmax"


def _is_write(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in WRITE_METHODS) or (node.op == "call_function" and node.target in WRITE_FUNCS)


def _is_cat(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in CAT_FUNCS


def _walk_back(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """Follow the data operand back through view-like ops; return the source and the ops passed."""
    passed: list[fx.Node] = []
    while isinstance(node, fx.Node) and _is_view(node):
        passed.append(node)
        node = node.args[0]
    return node, passed


def _const(value: Any) -> float | None:
    """A Python number, or a node that builds a 0-d constant (torch.full([], c), torch.tensor(c))."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, fx.Node) and value.op == "call_function":
        if value.target is torch.full and len(value.args) >= 2 and list(value.args[0]) == []:
            return _const(value.args[1])
        if value.target is torch.tensor and value.args:
            return _const(value.args[0])
        if value.target in (math.sqrt,) and value.args:
            inner = _const(value.args[0])
            return None if inner is None else math.sqrt(inner)
    if isinstance(value, fx.Node) and _method(value) in ("to", "type_as"):
        return _const(value.args[0])
    return None


def _depends_on(node: Any, target: fx.Node, limit: int = 400) -> bool:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack and len(seen) < limit:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        if n is target:
            return True
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def _keeps_keys(before: fx.Node, after: fx.Node) -> bool:
    """Whether re-viewing scores ``before`` as ``after`` keeps the key axis last and the elements as they are."""
    a, b = example_value(before), example_value(after)
    return a is not None and b is not None and a.dim() >= 1 and b.dim() >= 1 and a.shape[-1] == b.shape[-1] and a.numel() == b.numel()


def _is_cache_input(node: Any, step: CapturedStep, writes: dict[fx.Node, list[fx.Node]]) -> bool:
    if not isinstance(node, fx.Node) or node.op != "placeholder":
        return False
    binding = step.bindings.get(node.name)
    return node in writes or (binding is not None and binding.kind == "cache")


def _refuse_derived_kv(attn: fx.Node, operand: Any, step: CapturedStep, placeholders, writes, limit: int = 200) -> None:
    """Raise when ``operand`` (an attention's keys or values) is computed from a KV cache rather than read
    from it through views and copies: the keys/values the attention uses are not what the cache holds
    (multi-head latent attention caches a latent that a projection expands; differential attention
    splits and rejoins cached values), so the store's chunks could not stand in for them."""
    if not isinstance(operand, fx.Node):
        return
    src, _ = _walk_back(operand)
    seen: set[fx.Node] = set()
    stack = [src]
    while stack and len(seen) < limit:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if _is_cache_input(n, step, writes):
            raise LocateError(
                f"attention {attn.name} reads the KV cache {n.name} through {src.format_node()}, not through views or copies: "
                "its keys or values are computed from what the cache holds (a latent expanded by a projection, as in the "
                "multi-head latent attention of DeepSeek-V2/V3 and MiniCPM3, or cached values split and recombined, as in "
                "differential attention). The sparse kernels attend over cached keys and values as they are, so lsa-rewrite "
                "cannot convert this model: run it unconverted"
            )
        stack.extend(n.all_input_nodes)


def _check_shared_caches(sites: list[AttentionSite]) -> None:
    """One attention per cache: layers that attend over another layer's cache (KV sharing) are refused."""
    by_layer: dict[int, AttentionSite] = {}
    for site in sites:
        first = by_layer.setdefault(site.layer, site)
        if first is not site:
            raise LocateError(
                f"attention sites {first.index} ({first.attn.name}) and {site.index} ({site.attn.name}) both read cache layer {site.layer}: "
                "a layer attends over another layer's keys and values (cross-layer KV sharing, as in Gemma-3n). "
                "lsa-rewrite keeps one store layer per attention and cannot convert this model: run it unconverted"
            )


def evaluate_nodes(step: CapturedStep, nodes: list[fx.Node], *, given: dict[fx.Node, torch.Tensor] | None = None) -> list[torch.Tensor] | None:
    """The values ``nodes`` took in the captured step, recomputed from the step's example inputs by
    running only the nodes they depend on (a mask is built from positions and lengths, a few ops);
    ``given`` replaces some nodes by values of the caller's (what they depend on is not run). None when
    that subgraph writes in place (its inputs were already updated by the capture run)."""
    given = given or {}
    function = node_function(step, nodes, list(given))
    return None if function is None else function(*given.values())


def node_function(step: CapturedStep, nodes: list[fx.Node], inputs: list[fx.Node]) -> "NodeFunction | None":
    """``nodes`` as a function of ``inputs`` (nodes of the step whose values the caller passes; what they
    depend on is not run): the subgraph that computes them, every other placeholder it needs taking its
    example value from the capture. None when that subgraph writes in place."""
    graph = step.graph_module.graph
    fed = set(inputs)
    needed: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        needed.add(n)
        if n not in fed:
            stack.extend(n.all_input_nodes)
    if any(_writes_in_place(n) for n in needed if n not in fed):
        return None
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in inputs:
        env[n] = sub.placeholder(f"given_{n.name}")
    fixed: list[Any] = []
    placeholders: list[fx.Node] = []
    for n in graph.nodes:
        if n in needed and n not in fed:
            env[n] = sub.node_copy(n, lambda a: env[a])
            if n.op == "placeholder":
                fixed.append(step.examples[n.name])
                placeholders.append(n)
    sub.output(tuple(env[n] for n in nodes))
    return NodeFunction(fx.GraphModule(step.graph_module, sub), fixed, placeholders)


class NodeFunction:
    """A subgraph of a captured step as a callable (``node_function``): ``f(*input_values) -> [values]``.
    ``placeholders``: the step's placeholders it reads at their captured example values."""

    def __init__(self, module: fx.GraphModule, fixed: list[Any], placeholders: list[fx.Node]):
        self.module, self.fixed, self.placeholders = module, fixed, placeholders

    def __call__(self, *values: Any) -> list[torch.Tensor]:
        with torch.no_grad():
            return list(self.module(*values, *self.fixed))


def _writes_in_place(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    if node.op == "call_function":
        if node.target in (operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv):
            return True
        schema = getattr(node.target, "_schema", None)
        return bool(schema is not None and schema.is_mutable)
    return False


def _check_masks(step: CapturedStep, sites: list[AttentionSite]) -> None:
    """What the rewrite drops from each attention must be a mask: added terms (or SDPA's ``attn_mask``)
    are booleans or 0 / very negative, and masked scores are set to a very negative constant. A position
    bias (ALiBi) or any other term that changes attended scores is refused: the store masks by position
    and adds nothing."""
    entries = [(site, kind, value) for site in sites for kind, value in site.masks]
    nodes = list(dict.fromkeys(value for _, _, value in entries if isinstance(value, fx.Node)))
    values = dict(zip(nodes, evaluate_nodes(step, nodes) or [])) if nodes else {}
    for site, kind, value in entries:
        tensor = values.get(value) if isinstance(value, fx.Node) else torch.tensor(float(value))
        if tensor is None or not isinstance(tensor, torch.Tensor) or tensor.dtype == torch.bool:
            continue
        tensor = tensor.detach().float()
        masked = tensor <= MASKED_AT_MOST
        ok = bool(masked.all()) if kind == "fill" else bool((masked | (tensor == 0)).all())
        if not ok:
            bad = tensor[~masked] if kind == "fill" else tensor[~(masked | (tensor == 0))]
            what = "sets masked scores to" if kind == "fill" else "adds to its scores"
            raise LocateError(
                f"the attention at layer {site.layer} ({site.attn.name}) {what} a term that is not a mask (values such as "
                f"{bad.flatten()[0].item():.4g}, where a mask holds 0 or at most {MASKED_AT_MOST:g}): a position bias such as "
                "ALiBi, or a learned bias. The sparse kernels mask by position and add no bias, so lsa-rewrite cannot "
                "convert this model: run it unconverted"
            )


class LocateAttentionPass(GraphPass):
    """Find every attention over a KV cache and pair it with the cache's writes.

    ``layer_windows`` maps a model layer to its sliding window (from the HF config); such layers are
    marked ``action="ring"``: kept exact over their window, never sparsified.
    """

    def __init__(self, layer_windows: dict[int, int] | None = None):
        self.layer_windows = layer_windows or {}

    def __call__(self, step: CapturedStep) -> list[AttentionSite]:
        graph = step.graph_module.graph
        placeholders = {n for n in graph.nodes if n.op == "placeholder"}
        writes: dict[fx.Node, list[fx.Node]] = {}
        for node in graph.nodes:
            if _is_write(node) and node.args and node.args[0] in placeholders:
                writes.setdefault(node.args[0], []).append(node)

        attentions = [n for n in graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS]
        attentions += [n for n in graph.nodes if _is_matmul(n) and self._cache_source(n.args[1], placeholders, writes) is not None]
        if not attentions:
            for node in graph.nodes:  # an eager chain whose keys are computed from a cache, not read from it
                if _is_softmax(node):
                    score, _ = _walk_back(node.args[0] if node.args else None)
                    while isinstance(score, fx.Node) and not _is_matmul(score) and score.all_input_nodes:
                        score = score.args[0] if isinstance(score.args[0], fx.Node) else score.all_input_nodes[0]
                    if isinstance(score, fx.Node) and _is_matmul(score):
                        _refuse_derived_kv(score, score.args[1], step, placeholders, writes)
            raise LocateError(
                "found no attention in the traced step (neither scaled_dot_product_attention nor a "
                "matmul -> softmax -> matmul chain over a cache); lsa-rewrite converts decoders whose "
                "attention reads a KV cache"
            )
        order = {n: i for i, n in enumerate(graph.nodes)}
        sites: list[AttentionSite] = []
        consumed: set[fx.Node] = set()  # the value matmul of an eager chain also reads a cache
        for node in sorted(attentions, key=order.__getitem__):
            if node in consumed:
                continue
            site = self._site(node, step, placeholders, writes, len(sites))
            if site is not None:
                sites.append(site)
                consumed.add(site.attn)
        if not sites:
            for node in attentions:
                _refuse_derived_kv(node, node.args[1], step, placeholders, writes)
            raise LocateError("found attention ops but none of them reads a KV cache written in this step; nothing to convert")
        _check_shared_caches(sites)
        _check_masks(step, sites)
        rewritten = sum(s.action == "rewrite" for s in sites)
        log.info("LocateAttentionPass: %d attention sites (%d sparse, %d sliding-window)", len(sites), rewritten, len(sites) - rewritten)
        return sites

    # -- helpers ------------------------------------------------------------------------------
    def _cache_source(self, operand: Any, placeholders: set[fx.Node], writes: dict[fx.Node, list[fx.Node]]):
        """(placeholder, new_value, seq_dim, cache_op, removable) if ``operand`` reads a KV cache."""
        if not isinstance(operand, fx.Node):
            return None
        src, _ = _walk_back(operand)
        if _is_cat(src):
            parts = src.args[0]
            dim = src.kwargs.get("dim", src.args[1] if len(src.args) > 1 else 0)
            if isinstance(parts, (list, tuple)) and len(parts) == 2:
                past, _ = _walk_back(parts[0])
                if past in placeholders:
                    ndim = len(example_value(src).shape)
                    return past, parts[1], dim % ndim, "cat", [src]
            return None
        if src in placeholders and src in writes:
            write = writes[src][-1]
            op = write.target if isinstance(write.target, str) else getattr(write.target, "__name__", str(write.target))
            ndim = len(example_value(src).shape)
            if op == "setitem" or write.target is operator.setitem:
                index = write.args[1]
                index = index if isinstance(index, tuple) else (index,)
                dims = [i for i, ix in enumerate(index) if isinstance(ix, fx.Node)]
                if len(dims) != 1 or Ellipsis in index:
                    return None
                return src, write.args[2], dims[0], "setitem", list(writes[src])
            if op == "index_copy_":
                return src, write.args[3], int(write.args[1]) % ndim, "index_copy_", list(writes[src])
            if op == "index_put_":
                indices = write.args[1]
                dims = [i for i, ix in enumerate(indices) if ix is not None]
                if len(dims) != 1:
                    return None
                return src, write.args[2], dims[0], "index_put_", list(writes[src])
        return None

    def _site(self, node, step, placeholders, writes, index) -> AttentionSite | None:
        if node.op == "call_function" and node.target in SDPA_TARGETS:
            form = "sdpa"
            q, k, v = node.args[:3]
            scale = node.kwargs.get("scale", node.args[6] if len(node.args) > 6 else None)
            gqa = "enable_gqa" if node.kwargs.get("enable_gqa", False) else "none"
            softcap = 0.0
            attn = node
            mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
            masks = [("bias", mask)] if mask is not None else []
            k_src = self._cache_source(k, placeholders, writes)
            v_src = self._cache_source(v, placeholders, writes)
            if k_src is None and v_src is None:
                _refuse_derived_kv(node, k, step, placeholders, writes)
                _refuse_derived_kv(node, v, step, placeholders, writes)
                return None
        else:
            form = "eager"
            k_src = self._cache_source(node.args[1], placeholders, writes)
            q = node.args[0]
            chain = self._eager_chain(node, placeholders, writes)
            attn, v, scale, softcap, masks = chain
            v_src = self._cache_source(v, placeholders, writes)
            gqa = "none"
        if k_src is None:
            _refuse_derived_kv(node, k if form == "sdpa" else node.args[1], step, placeholders, writes)
        if v_src is None:
            _refuse_derived_kv(node, v, step, placeholders, writes)
        if k_src is None or v_src is None:
            raise LocateError(
                f"attention {node.name} reads a KV cache for {'keys' if k_src else 'values'} only; "
                "lsa-rewrite needs both keys and values to come from caches written in the step"
            )
        k_ph, k_new, seq_dim, cache_op, k_rm = k_src
        v_ph, v_new, _, _, v_rm = v_src
        cache_val = example_value(k_ph)
        q_val = example_value(q)
        if q_val is None or q_val.dim() != 4 or q_val.shape[2] != 1:
            raise LocateError(
                f"attention {node.name}: query shape {None if q_val is None else tuple(q_val.shape)} is not [B, H, 1, D] (one decode "
                "token, heads apart from the batch; older code that folds heads into the batch, [B * H, 1, D], is not recognised). "
                "Try attn_implementation='sdpa' if the model has it; otherwise lsa-rewrite cannot convert this model: run it unconverted"
            )
        batch, q_heads, _, head_dim = q_val.shape
        if cache_val.dim() != 4 or seq_dim not in (1, 2):
            raise LocateError(f"cache {k_ph.name} has layout {tuple(cache_val.shape)} with sequence dim {seq_dim}; expected [B, H, S, D] or [B, S, H, D]")
        kv_heads = cache_val.shape[3 - seq_dim]
        if q_heads % kv_heads:
            raise LocateError(f"attention {node.name}: {q_heads} query heads are not a multiple of {kv_heads} kv heads")
        if gqa == "none" and kv_heads != q_heads:
            gqa = "repeat"
        if scale is None:
            scale = 1.0 / math.sqrt(head_dim)
        binding: Binding = step.bindings.get(k_ph.name, Binding("constant", k_ph.name))
        layer = binding.layer if binding.layer is not None else index
        window = self.layer_windows.get(layer)
        site = AttentionSite(
            index=index, layer=layer, form=form, cache_op=cache_op, q=q, attn=attn, k_source=k_ph, v_source=v_ph,
            k_new=k_new, v_new=v_new, seq_dim=seq_dim, removable=list(dict.fromkeys(k_rm + v_rm)),
            q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, batch=batch, scale=float(scale), softcap=float(softcap),
            gqa=gqa, window=window, dtype=cache_val.dtype, masks=masks,
        )
        if window is not None:
            site.action, site.reason = "ring", f"sliding window {window} already bounds its KV"
        else:
            site.reason = "full attention over the whole cache"
        return site

    def _eager_chain(self, score: fx.Node, placeholders, writes):
        """From ``matmul(q, k^T)`` to ``matmul(p, v)``: returns (output node, v operand, scale, softcap, masks)."""
        node = score
        factors: list[tuple[str, float]] = []
        masks: list[tuple[str, Any]] = []
        saw_softmax = False
        while True:
            users = list(node.users)
            if len(users) != 1:
                raise LocateError(f"eager attention at {score.name}: {node.name} has {len(users)} users, expected a single chain to softmax")
            nxt = users[0]
            method = _method(nxt)
            func = nxt.target if nxt.op == "call_function" else None
            if _is_matmul(nxt) and saw_softmax:
                if nxt.args[0] is not node:
                    raise LocateError(f"eager attention at {score.name}: probabilities are not the left operand of {nxt.name}")
                return nxt, nxt.args[1], self._scale(factors, score), self._softcap(factors), masks
            if _is_softmax(nxt):
                saw_softmax = True
            elif func in MUL_FUNCS or func in DIV_FUNCS or method in MUL_METHODS or method in DIV_METHODS:
                other = nxt.args[1] if nxt.args[0] is node else nxt.args[0]
                value = _const(other)
                if value is None:
                    raise LocateError(f"eager attention at {score.name}: {nxt.name} scales scores by a non-constant; cannot read the scale")
                divides = func in DIV_FUNCS or method in DIV_METHODS
                if saw_softmax:
                    raise LocateError(f"eager attention at {score.name}: {nxt.name} rescales probabilities after softmax")
                factors.append(("div" if divides else "mul", value))
            elif func in ADD_FUNCS or method in ADD_METHODS:
                other = nxt.args[1] if nxt.args[0] is node else nxt.args[0]
                if _depends_on(other, score):
                    raise LocateError(f"eager attention at {score.name}: {nxt.name} adds a score-dependent term; not a mask")
                if saw_softmax:
                    raise LocateError(f"eager attention at {score.name}: {nxt.name} modifies probabilities after softmax")
                masks.append(("bias", other))
            elif method in MASK_FILL_METHODS or func is torch.where:
                # scores.masked_fill(cond, value) or torch.where(cond, scores, value): positions set to a constant
                if func is torch.where:
                    cond, kept, fill = nxt.args[0], nxt.args[1], nxt.args[2]
                    if kept is not node:  # where(cond, value, scores): the mask is the inverse condition
                        kept, fill = fill, kept
                else:
                    kept, cond, fill = nxt.args[0], nxt.args[1], nxt.args[2]
                if kept is not node or _depends_on(cond, score) or _depends_on(fill, score):
                    raise LocateError(f"eager attention at {score.name}: {nxt.format_node()} mixes scores in a way that is not a mask")
                if saw_softmax:
                    raise LocateError(f"eager attention at {score.name}: {nxt.name} modifies probabilities after softmax")
                masks.append(("fill", fill))
            elif (func in (torch.tanh,)) or method == "tanh":
                factors.append(("tanh", 0.0))
            elif func in (torch.nn.functional.dropout,):
                if nxt.kwargs.get("training", nxt.args[2] if len(nxt.args) > 2 else True) and (nxt.kwargs.get("p", nxt.args[1] if len(nxt.args) > 1 else 0.5) or 0) > 0:
                    raise LocateError(f"eager attention at {score.name}: dropout is active; convert a model in eval mode")
            elif _is_view(nxt) and method in ("to", "float", "half", "bfloat16", "type_as", "contiguous", "type", None) and func is not torch.reshape:
                pass
            elif (method in ("view", "reshape") or func is torch.reshape) and _keeps_keys(node, nxt):
                pass  # scores re-viewed ([B*H, 1, S] <-> [B, H, 1, S]); the key axis stays last
            elif _is_cat(nxt):
                raise LocateError(
                    f"eager attention at {score.name}: {nxt.format_node()} joins extra logits to the scores before softmax "
                    "(attention sinks, as in gpt-oss); the sparse kernels normalise over the cached keys only, so "
                    "lsa-rewrite cannot convert this model: run it unconverted"
                )
            else:
                raise LocateError(
                    f"eager attention at {score.name}: unsupported op {nxt.format_node()} between scores and values (lsa-rewrite "
                    "recognises scaling, softcapping, masks, casts and dropout there). Try attn_implementation='sdpa' if the model "
                    "has it; otherwise lsa-rewrite cannot convert this model: run it unconverted"
                )
            node = nxt

    @staticmethod
    def _scale(factors: list[tuple[str, float]], score: fx.Node) -> float:
        scale = 1.0
        if any(op == "tanh" for op, _ in factors):
            cut = [op for op, _ in factors].index("tanh")
            pre = factors[:cut]
            # softcap: ... / cap -> tanh -> * cap ; the last division before tanh is the cap
            pre = pre[:-1] if pre and pre[-1][0] == "div" else pre
            factors = pre
        for op, value in factors:
            scale = scale * value if op == "mul" else scale / value
        return scale

    @staticmethod
    def _softcap(factors: list[tuple[str, float]]) -> float:
        ops = [op for op, _ in factors]
        if "tanh" not in ops:
            return 0.0
        cut = ops.index("tanh")
        if cut == 0 or factors[cut - 1][0] != "div" or cut + 1 >= len(factors) or factors[cut + 1] != ("mul", factors[cut - 1][1]):
            raise LocateError("eager attention: tanh on scores is not the soft-capping pattern (x / cap -> tanh -> * cap)")
        return factors[cut - 1][1]
