"""``TapIndexerInputsPass``: find what the lookahead indexer reads at its target layers.

For each target site (a sparsely attended layer the indexer scores with) it finds, in the captured
decode step, the input of the layer's query projection (the hidden state after the layer's input
norm) and, where the model applies rotary embeddings to queries, the ``cos``/``sin`` it applies at
the decoded position. The rewrite then taps them into the store (``idx_x``, ``idx_cos``, ``idx_sin``
of the state contract) every step, so a selection runs the indexer's query tower on the latest token
without an extra forward pass (the tower runs once per window, outside the step, rather than at every
step, where only its last value would be read).

Query projection: the nearest ``linear(x, W)`` (or ``addmm(b, x, W)``, GPT-2's Conv1D) upstream of the
attention's query whose weight is a model parameter; the query rows are its first ``Hq * D`` output
features (``q_proj``, or the query part of a fused ``qkv_proj`` / ``c_attn``). Rotary embedding:
the query is ``add(mul(q, cos), mul(rotate_half(q), sin))`` (a ``cat`` holding a ``neg``), possibly
with a pass-through part concatenated (partial rotary). Before::

    q = linear(x, W_q).view(...).transpose(1, 2)
    q_rot = q * cos + cat(-q[..., D/2:], q[..., :D/2]) * sin
    attention(q_rot, ...)

After (``RewriteAttentionPass`` with this site's taps)::

    lsa.tap(idx_x, x); lsa.tap(idx_cos, cos); lsa.tap(idx_sin, sin)

No model class names: a graph whose query path has no parameter projection is refused with a
``LocateError`` naming the layer.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from .capture import CapturedStep, example_value
from .locate import AttentionSite, GraphPass, LocateError, _is_cat, _is_view

log = logging.getLogger("lsa_rewrite.passes")

_LINEAR = {torch.nn.functional.linear, torch._C._nn.linear}
_SEARCH_LIMIT = 64  # nodes visited walking back from a query


@dataclass
class IndexerTap:
    """What ``TapIndexerInputsPass`` found at one target layer."""

    x: fx.Node  # the query projection's input, [B, 1, hidden] (or [B, hidden])
    cos: fx.Node | None  # rotary cos/sin at the decoded position, [B, 1, 1, R] (None: no rotary)
    sin: fx.Node | None
    weight: str  # model parameter name of the projection weight
    transposed: bool  # weight is [in, out] (addmm / Conv1D), else [out, in]
    hidden: int = 0
    rotary: int = 0  # R: rotated channels per head (0: no rotary)

    def query_weight(self, model: torch.nn.Module, rows: int) -> torch.Tensor:
        """The model's query rows ``W_q`` ``[Hq * D, hidden]``."""
        weight = model.get_parameter(self.weight).detach()
        return weight[:, :rows].t() if self.transposed else weight[:rows]


def _is_mul(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in (torch.mul, operator.mul)


def _is_add(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in (torch.add, operator.add)


def _has_neg(node: fx.Node) -> bool:
    args = node.args[0] if node.args else ()
    return any(isinstance(a, fx.Node) and a.op == "call_function" and a.target in (torch.neg, operator.neg) for a in args)


def _rope(q: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """``(q_before_rotation, cos, sin)`` when ``q`` is a rotate-half rotary embedding, else None."""
    node, _ = _walk_views(q)
    if _is_cat(node):  # partial rotary: cat([rotated part, pass-through part])
        parts = node.args[0]
        node, _ = _walk_views(parts[0]) if parts else (node, [])
    if not _is_add(node) or not all(_is_mul(a) for a in node.args[:2]):
        return None
    plain = rotated = None
    for mul in node.args[:2]:
        if any(isinstance(a, fx.Node) and _is_cat(a) and _has_neg(a) for a in mul.args):
            rotated = mul
        else:
            plain = mul
    if plain is None or rotated is None:
        return None
    rot_input = next(a for a in rotated.args if isinstance(a, fx.Node) and _is_cat(a))
    sin = next(a for a in rotated.args if a is not rot_input)
    sources = set(_ancestors(rot_input, 8))
    q0 = next((a for a in plain.args if isinstance(a, fx.Node) and a in sources), None)
    if q0 is None:
        return None
    cos = next(a for a in plain.args if a is not q0)
    if not isinstance(cos, fx.Node) or not isinstance(sin, fx.Node):
        return None
    return q0, cos, sin


def _walk_views(node):
    passed = []
    while isinstance(node, fx.Node) and _is_view(node):
        passed.append(node)
        node = node.args[0]
    return node, passed


def _ancestors(node: fx.Node, depth: int) -> list[fx.Node]:
    out, frontier = [], [node]
    for _ in range(depth):
        frontier = [a for n in frontier for a in n.all_input_nodes]
        out.extend(frontier)
    return out


def _projection(q: fx.Node, params: set[str]) -> tuple[fx.Node, fx.Node, bool] | None:
    """``(projection node, its input x, transposed)``: the nearest parameter projection upstream of ``q``."""
    seen: set[fx.Node] = set()
    frontier = [q]
    while frontier and len(seen) < _SEARCH_LIMIT:
        node = frontier.pop(0)
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_function" and node.target in _LINEAR and len(node.args) >= 2:
            weight = node.args[1]
            if isinstance(weight, fx.Node) and weight.name in params:
                return node, node.args[0], False
        if node.op == "call_function" and node.target is torch.addmm and len(node.args) >= 3:
            weight = node.args[2]
            if isinstance(weight, fx.Node) and weight.name in params:
                return node, node.args[1], True
        frontier.extend(node.all_input_nodes)
    return None


class TapIndexerInputsPass(GraphPass):
    """Record, on each target site, the nodes the indexer taps (see module docstring)."""

    def __init__(self, target_layers: tuple[int, ...]):
        self.target_layers = tuple(target_layers)

    def __call__(self, step: CapturedStep, sites: list[AttentionSite]) -> None:
        by_layer = {s.layer: s for s in sites}
        params = {name for name, b in step.bindings.items() if b.kind == "param"}
        for layer in self.target_layers:
            site = by_layer.get(layer)
            if site is None or site.action != "rewrite":
                sparse = [s.layer for s in sites if s.action == "rewrite"]
                raise LocateError(f"indexer target layer {layer} is not a sparsely attended layer of this model; those are {sparse}")
            rope = _rope(site.q)
            q0 = rope[0] if rope else site.q
            found = _projection(q0, params)
            if found is None:
                raise LocateError(
                    f"layer {layer}: no query projection (linear or addmm with a model weight) found upstream of the attention's "
                    "query, so the indexer has no hidden state to read; use selector='query-aware' for this model"
                )
            _, x, transposed = found
            weight = step.bindings[found[0].args[2 if transposed else 1].name].name
            tap = IndexerTap(x=x, cos=rope[1] if rope else None, sin=rope[2] if rope else None, weight=weight, transposed=transposed)
            tap.hidden = example_value(x).numel() // site.batch
            if rope:
                tap.rotary = example_value(rope[1]).numel() // site.batch
            site.indexer = tap
        log.info("TapIndexerInputsPass: taps at layers %s", list(self.target_layers))
