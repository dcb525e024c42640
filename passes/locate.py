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
            raise LocateError("found attention ops but none of them reads a KV cache written in this step; nothing to convert")
        layers = [s.layer for s in sites]
        if len(set(layers)) != len(layers):
            raise LocateError(f"two attention sites claim the same cache layer ({layers}); cannot convert this graph safely")
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
            k_src = self._cache_source(k, placeholders, writes)
            v_src = self._cache_source(v, placeholders, writes)
            if k_src is None and v_src is None:
                return None
        else:
            form = "eager"
            k_src = self._cache_source(node.args[1], placeholders, writes)
            q = node.args[0]
            chain = self._eager_chain(node, placeholders, writes)
            attn, v, scale, softcap = chain
            v_src = self._cache_source(v, placeholders, writes)
            gqa = "none"
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
            raise LocateError(f"attention {node.name}: query shape {None if q_val is None else tuple(q_val.shape)} is not [B, H, 1, D] (one decode token)")
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
            gqa=gqa, window=window, dtype=cache_val.dtype,
        )
        if window is not None:
            site.action, site.reason = "ring", f"sliding window {window} already bounds its KV"
        else:
            site.reason = "full attention over the whole cache"
        return site

    def _eager_chain(self, score: fx.Node, placeholders, writes):
        """From ``matmul(q, k^T)`` to ``matmul(p, v)``: returns (output node, v operand, scale, softcap)."""
        node = score
        factors: list[tuple[str, float]] = []
        saw_softmax = False
        while True:
            users = list(node.users)
            if len(users) != 1:
                raise LocateError(f"eager attention at {score.name}: {node.name} has {len(users)} users, expected a single chain to softmax")
            nxt = users[0]
            if _is_matmul(nxt) and saw_softmax:
                if nxt.args[0] is not node:
                    raise LocateError(f"eager attention at {score.name}: probabilities are not the left operand of {nxt.name}")
                return nxt, nxt.args[1], self._scale(factors, score), self._softcap(factors)
            if _is_softmax(nxt):
                saw_softmax = True
            elif nxt.op == "call_function" and nxt.target in (operator.mul, torch.mul, operator.truediv, torch.div) or _method(nxt) in ("mul", "div", "__mul__", "__truediv__"):
                other = nxt.args[1] if nxt.args[0] is node else nxt.args[0]
                value = _const(other)
                if value is None:
                    raise LocateError(f"eager attention at {score.name}: {nxt.name} scales scores by a non-constant; cannot read the scale")
                divides = nxt.target in (operator.truediv, torch.div) or _method(nxt) in ("div", "__truediv__")
                if saw_softmax:
                    raise LocateError(f"eager attention at {score.name}: {nxt.name} rescales probabilities after softmax")
                factors.append(("div" if divides else "mul", value))
            elif nxt.op == "call_function" and nxt.target in (operator.add, torch.add) or _method(nxt) in ("add", "masked_fill"):
                other = nxt.args[1] if nxt.args[0] is node else nxt.args[0]
                if _depends_on(other, score):
                    raise LocateError(f"eager attention at {score.name}: {nxt.name} adds a score-dependent term; not a mask")
                if saw_softmax:
                    raise LocateError(f"eager attention at {score.name}: {nxt.name} modifies probabilities after softmax")
            elif (nxt.op == "call_function" and nxt.target in (torch.tanh,)) or _method(nxt) == "tanh":
                factors.append(("tanh", 0.0))
            elif nxt.op == "call_function" and nxt.target in (torch.nn.functional.dropout,):
                if nxt.kwargs.get("training", nxt.args[2] if len(nxt.args) > 2 else True) and (nxt.kwargs.get("p", nxt.args[1] if len(nxt.args) > 1 else 0.5) or 0) > 0:
                    raise LocateError(f"eager attention at {score.name}: dropout is active; convert a model in eval mode")
            elif _is_view(nxt) and _method(nxt) in ("to", "float", "half", "bfloat16", "type_as", "contiguous", "type", None):
                pass
            else:
                raise LocateError(f"eager attention at {score.name}: unsupported op {nxt.format_node()} between scores and values")
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
