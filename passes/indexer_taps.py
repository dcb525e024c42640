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
from typing import Any

import torch
import torch.fx as fx

from .capture import CapturedStep, example_value
from .locate import CAT_FUNCS as _CAT_FUNCS
from .locate import AttentionSite, GraphPass, LocateError, _is_cat, _is_view, evaluate_nodes

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
    style: str = "half"  # how the R channels rotate (ROPE_STYLES); "half" where there is no rotary
    # The projection's output features that hold the query, in its (head, dim) order, where they are not
    # its first Hq * D (a fused qkv laid out per head or per KV group); None: the first ones.
    rows: torch.Tensor | None = None

    def query_weight(self, model: torch.nn.Module, rows: int) -> torch.Tensor:
        """The model's query rows ``W_q`` ``[Hq * D, hidden]``."""
        weight = model.get_parameter(self.weight).detach()
        index = self.rows.to(weight.device) if self.rows is not None and len(self.rows) == rows else slice(0, rows)
        return weight[:, index].t() if self.transposed else weight[index]


def _is_mul(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in (torch.mul, operator.mul)


def _is_add(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in (torch.add, operator.add)


def _is_sub(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in (torch.sub, operator.sub)


def _has_neg(node: fx.Node) -> bool:
    args = node.args[0] if node.args else ()
    return any(isinstance(a, fx.Node) and a.op == "call_function" and a.target in (torch.neg, operator.neg) for a in args)


ROPE_STYLES = ("half", "interleaved")  # rotate_half: cat(-x2, x1) of the two halves; interleaved: (-x1, x0) per channel pair


def _rotation(r: int) -> dict[str, torch.Tensor]:
    """The signed channel maps ``rotate(x)[j] = sign_j * x[perm_j]`` of each style over ``r`` channels, as
    ``sign * (perm + 1)`` (what the ops give for an index input ``1..r``)."""
    idx = torch.arange(1, r + 1, dtype=torch.float64)
    half = torch.cat([-idx[r // 2 :], idx[: r // 2]])
    interleaved = torch.stack([-idx[1::2], idx[0::2]], dim=-1).flatten()
    return {"half": half, "interleaved": interleaved}


def _rotation_style(step: CapturedStep, q0: fx.Node, rotated: fx.Node) -> str | None:
    """The style of ``rotated`` as a function of ``q0`` (a signed permutation of its last axis), found by
    running the ops between them on channel indices; None when it is neither style (or no permutation)."""
    value = example_value(q0)
    if not isinstance(value, torch.Tensor) or value.dim() < 1 or value.shape[-1] % 2:
        return None
    r = value.shape[-1]
    index = torch.arange(1, r + 1, dtype=torch.float64, device=value.device).expand(value.shape).contiguous()
    try:
        found = evaluate_nodes(step, [rotated], given={q0: index})
    except Exception:  # the ops between them do not run on an index tensor: not a channel permutation
        return None
    if not found or not isinstance(found[0], torch.Tensor) or tuple(found[0].shape) != tuple(value.shape):
        return None
    signed = found[0].reshape(-1, r).cpu()
    if not bool((signed == signed[:1]).all()):
        return None
    return next((style for style, want in _rotation(r).items() if torch.equal(signed[0], want)), None)


@dataclass
class _Rope:
    q0: fx.Node  # the query before rotation (the rotated channels only, under partial rotary)
    cos: fx.Node  # the factors the model multiplies q0 and its rotation by
    sin: fx.Node
    style: str  # one of ROPE_STYLES


def _match_rope(step: CapturedStep, node: fx.Node) -> _Rope | None:
    """``q0 * cos + rotate(q0) * sin`` (either order, either style) at ``node``, else None."""
    if not _is_add(node) or not all(_is_mul(a) for a in node.args[:2]):
        return None
    m1, m2 = node.args[:2]
    for plain, turned in ((m1, m2), (m2, m1)):
        for factor in (a for a in plain.args if isinstance(a, fx.Node)):
            for rotated in (b for b in turned.args if isinstance(b, fx.Node) and b is not factor):
                sources = set(_ancestors(rotated, 8))
                # the query, or the tensor it was converted from (ERNIE rotates ``q.float()`` and ``rotate_half(q).float()``)
                q0 = next((c for c in _conversions(factor) if c in sources), None)
                if q0 is None:
                    continue
                cos = next((a for a in plain.args if a is not factor), None)
                sin = next((b for b in turned.args if b is not rotated), None)
                if not isinstance(cos, fx.Node) or not isinstance(sin, fx.Node):
                    continue
                style = _rotation_style(step, q0, rotated)
                if style is not None:
                    return _Rope(q0, cos, sin, style)
    return None


def _rotate(x: torch.Tensor, style: str) -> torch.Tensor:
    """``rotate(x)`` of a style (ROPE_STYLES) over the last axis."""
    if style == "half":
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)
    return torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)


def _fake_like(reference: Any, value: torch.Tensor) -> torch.Tensor:
    """An example value for a node this pass adds: ``value``'s shape and dtype, in ``reference``'s fake mode."""
    mode = getattr(reference, "fake_mode", None)
    device = reference.device if isinstance(reference, torch.Tensor) else value.device
    if mode is not None:
        with mode:
            return torch.empty(value.shape, dtype=value.dtype, device=device)
    return torch.empty(value.shape, dtype=value.dtype, device="meta")


def _add_nodes(step: CapturedStep, after: fx.Node, build) -> list[fx.Node]:
    """Nodes ``build(graph, node)`` adds right after ``after`` (each call gets the previous node), with example values."""
    graph = step.graph_module.graph
    added: list[fx.Node] = []
    node = after
    for make in build:
        with graph.inserting_after(node):
            node = make(graph, node)
        added.append(node)
    values = evaluate_nodes(step, added)
    if values is None:
        _drop(step, added)
        return []
    for n, v in zip(added, values):
        n.meta["example_value"] = _fake_like(example_value(after), v)
    return added


def _drop(step: CapturedStep, nodes: list[fx.Node]) -> None:
    for n in reversed(nodes):
        if not n.users:
            step.graph_module.graph.erase_node(n)


def _match_split_rope(step: CapturedStep, node: fx.Node, projection: fx.Node | None) -> _Rope | None:
    """The rotation written on the two halves or the channel pairs of the query, as plain decoders write it:
    ``cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)`` (rotate-half; the halves ``x1``, ``x2`` and ``cos``/
    ``sin`` of half the channels) or ``stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], -1)`` flattened
    (interleaved pairs, gpt-fast). The factors the indexer taps are not nodes of the graph: this adds
    ``cat([cos, cos], -1)`` (``stack(...).flatten(-2)`` for pairs) after each, and checks on a random query that
    the model's rotation is ``q * cos + rotate(q) * sin`` with them (else removes them: None)."""
    if projection is None or node.op != "call_function" or node.target not in (*_CAT_FUNCS, torch.stack):
        return None
    parts = node.args[0] if node.args else None
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or not _is_sub(parts[0]) or not _is_add(parts[1]):
        return None
    muls = [*parts[0].args[:2], *parts[1].args[:2]]
    if not all(_is_mul(m) for m in muls):
        return None
    out = example_value(node)
    if not isinstance(out, torch.Tensor):
        return None
    stacked = node.target is torch.stack
    style = "interleaved" if stacked else "half"
    shape = (*out.shape[:-2], out.shape[-2] * 2) if stacked else tuple(out.shape)
    # q0: the nearest tensor of the rotated shape that both terms come from, on the query projection's path
    graph = step.graph_module.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    common = _upstream(parts[0], 24) & _upstream(parts[1], 24)
    after = _descendants(projection, common | {projection}) | {projection}
    candidates = [
        n for n in common & after
        if isinstance(example_value(n), torch.Tensor) and tuple(example_value(n).shape) == shape
    ]
    if not candidates:
        return None
    q0 = max(candidates, key=order.__getitem__)
    derived = _descendants(q0, _upstream(node, 24))

    def factor(m: fx.Node) -> fx.Node | None:
        others = [a for a in m.args[:2] if isinstance(a, fx.Node) and a not in derived and a is not q0]
        return others[0] if len(others) == 1 else None

    cos, sin = factor(muls[0]), factor(muls[1])  # x1 * cos - x2 * sin: the first product's factor is the cos
    if cos is None or sin is None:
        return None
    if stacked:
        build = [lambda g, f: g.call_function(torch.stack, ([f, f], -1)), lambda g, n: g.call_method("flatten", (n, -2))]
    else:
        build = [lambda g, f: g.call_function(torch.cat, ([f, f], -1))]
    cos_nodes = _add_nodes(step, cos, build)
    sin_nodes = _add_nodes(step, sin, build)
    added = cos_nodes + sin_nodes
    if not cos_nodes or not sin_nodes:
        _drop(step, added)
        return None
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(example_value(q0).device)
    try:
        found = evaluate_nodes(step, [node, cos_nodes[-1], sin_nodes[-1]], given={q0: x})
    except Exception:  # the ops between them do not run on a float64 query: not a rotation this pass can check
        found = None
    if found is not None:
        rotated, c, s = (v.double() for v in found)
        want = x * c + _rotate(x, style) * s
        # loose enough for a model that rounds inside the rotation (bf16), far below a wrong rotation's O(1) error
        if rotated.numel() == x.numel() and torch.allclose(rotated.reshape(shape), want, rtol=1e-2, atol=1e-2):
            return _Rope(q0, cos_nodes[-1], sin_nodes[-1], style)
    _drop(step, added)
    return None


_CONVERSIONS = {"float", "to", "type", "type_as", "contiguous"}


def _conversions(node: fx.Node) -> list[fx.Node]:
    """``node`` and what it was converted from by dtype conversions or views (nearest first)."""
    out = [node]
    while True:
        n = out[-1]
        if n.op == "call_method" and n.target in _CONVERSIONS and n.args and isinstance(n.args[0], fx.Node):
            out.append(n.args[0])
        elif _is_view(n):
            out.append(n.args[0])
        else:
            return out


def _rope(step: CapturedStep, q: fx.Node, projection: fx.Node | None) -> _Rope | None:
    """The rotary embedding applied to the attention's query ``q``: rotate-half or interleaved, over the
    whole head or its leading channels (partial: ``cat([rotated part, pass-through part])``), possibly
    followed by a norm (Hunyuan's q norm after rotary; the indexer then rotates the pre-norm query).
    The search upstream stops at the query's ``projection`` (an earlier layer's rotary is not this one's)."""
    node, _ = _walk_views(q)
    found = _match_split_rope(step, node, projection)  # the rotation as cat/stack of two terms (plain decoders)
    if found is not None:
        return found
    if _is_cat(node):  # partial rotary: cat([rotated part, pass-through part])
        parts = node.args[0]
        node, _ = _walk_views(parts[0]) if parts else (node, [])
    found = _match_rope(step, node) or _match_split_rope(step, node, projection)
    if found is not None:
        return found
    if _is_cat(node):
        return None
    if projection is None:
        return None
    # a norm (or another elementwise op) after the rotation: the nearest rotary form upstream
    seen, frontier = {projection}, [node]
    while frontier and len(seen) < _SEARCH_LIMIT:
        n = frontier.pop(0)
        if n in seen:
            continue
        seen.add(n)
        found = _match_rope(step, n) or _match_split_rope(step, n, projection)
        if found is not None:
            return found
        frontier.extend(n.all_input_nodes)
    return None


def _outside_factor(step: CapturedStep, q: fx.Node, projection: fx.Node) -> fx.Node | None:
    """A multiplication on the path from the query projection to ``q`` by a tensor that depends on the
    step's inputs (positions) and not on the projection: a rotary-like position factor. None if none."""
    inputs = {name for name, b in step.bindings.items() if b.kind != "param"}
    between: set[fx.Node] = set()
    frontier = [q]
    while frontier and len(between) < 4 * _SEARCH_LIMIT:
        n = frontier.pop()
        if n in between or n is projection:
            continue
        between.add(n)
        frontier.extend(n.all_input_nodes)
    downstream = _descendants(projection, between) | {projection}
    for n in between & downstream:
        if not _is_mul(n) and not (n.op == "call_method" and n.target == "mul"):
            continue
        for a in n.args:
            if not isinstance(a, fx.Node) or a in downstream:
                continue
            value = example_value(a)
            if not isinstance(value, torch.Tensor) or value.numel() <= 1:
                continue
            if any(x.op == "placeholder" and x.name in inputs for x in [a, *_ancestors(a, 12)]):
                return n
    return None


def _descendants(node: fx.Node, within: set[fx.Node]) -> set[fx.Node]:
    out, frontier = set(), [node]
    while frontier:
        n = frontier.pop()
        for user in n.users:
            if user in within and user not in out:
                out.add(user)
                frontier.append(user)
    return out


def _walk_views(node):
    passed = []
    while isinstance(node, fx.Node) and _is_view(node):
        passed.append(node)
        node = node.args[0]
    return node, passed


def _upstream(node: fx.Node, depth: int) -> set[fx.Node]:
    """The nodes ``node`` depends on, up to ``depth`` ops back (each once)."""
    seen: set[fx.Node] = set()
    frontier = [node]
    for _ in range(depth):
        frontier = [a for n in frontier for a in n.all_input_nodes if a not in seen]
        seen.update(frontier)
        if not frontier:
            break
    return seen


def _ancestors(node: fx.Node, depth: int) -> list[fx.Node]:
    out, frontier = [], [node]
    for _ in range(depth):
        frontier = [a for n in frontier for a in n.all_input_nodes]
        out.extend(frontier)
    return out


_MATMUL = {torch.matmul, operator.matmul}
_TRANSPOSES = {"t", "mT", "T"}


def _weight_operand(node: Any, params: set[str]) -> tuple[fx.Node, bool] | None:
    """``(weight placeholder, stored [out, in])`` when ``node`` is a model weight or its transpose."""
    if isinstance(node, fx.Node) and node.name in params:
        return node, False  # x @ W: W is [in, out]
    if isinstance(node, fx.Node):
        method = node.target if node.op == "call_method" else None
        transposed = method in _TRANSPOSES or (
            (method == "transpose" or (node.op == "call_function" and node.target is torch.transpose)) and sorted(a % 2 for a in node.args[1:3]) == [0, 1]
        ) or (node.op == "call_function" and node.target is getattr and node.args[1:] in (("T",), ("mT",)))
        base = node.args[0] if node.args else None
        if transposed and isinstance(base, fx.Node) and base.name in params:
            return base, True  # x @ W.T: W is [out, in], as in nn.Linear
    return None


def _projection(q: fx.Node, params: set[str]) -> tuple[fx.Node, fx.Node, bool] | None:
    """``(projection node, its input x, transposed)``: the nearest parameter projection upstream of ``q``:
    ``linear(x, W)``, ``addmm(b, x, W)`` or ``x @ W.T`` / ``x @ W`` (a hand-written linear, e.g. Falcon's)."""
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
        if ((node.op == "call_function" and node.target in _MATMUL) or (node.op == "call_method" and node.target == "matmul")) and len(node.args) >= 2:
            found = _weight_operand(node.args[1], params)
            if found is not None:
                return node, node.args[0], not found[1]
        frontier.extend(node.all_input_nodes)
    return None


def _weight_name(projection: fx.Node, transposed: bool) -> fx.Node:
    if projection.target in _LINEAR:
        return projection.args[1]
    if projection.target is torch.addmm:
        return projection.args[2]
    operand = projection.args[1]
    return operand if operand.op == "placeholder" else operand.args[0]


def _whole_query(q0: fx.Node, site: AttentionSite) -> fx.Node | None:
    """The query before rotary embedding, all ``D`` channels of every head (``[B, Hq, 1, D]``): ``q0`` itself,
    or, under partial rotary (``q0`` is the rotated channels only), the view ``q0`` was sliced from."""
    node = q0
    while isinstance(node, fx.Node):
        value = example_value(node)
        # [B, Hq, 1, D], or [B, 1, Hq, D] before the heads are moved forward (GPT-J, CodeGen)
        if isinstance(value, torch.Tensor) and tuple(value.shape) in (
            (site.batch, site.q_heads, 1, site.head_dim), (site.batch, 1, site.q_heads, site.head_dim)
        ):
            return node
        if not _is_view(node):
            return None
        node = node.args[0]
    return None


def _query_rows(step: CapturedStep, projection: fx.Node, q0: fx.Node, batch: int) -> torch.Tensor | None:
    """The projection's output features that hold the query ``q0`` ``[B, Hq, 1, D]``, in its (head, dim)
    order, when they are not simply the first ``Hq * D``: found by running the ops between them (views,
    slices, splits) on the features' indices in place of the projection's output. None when they are the
    first ones, or when the query is not a selection of the output (a norm after the projection)."""
    out = projection
    users = list(projection.users)
    if projection.target not in _LINEAR and projection.target is not torch.addmm and len(users) == 1:
        bias = users[0]  # x @ W.T + b
        if bias.op == "call_function" and bias.target in (torch.add, operator.add) and any(
            isinstance(a, fx.Node) and a.op == "placeholder" for a in bias.args
        ):
            out = bias
    value = example_value(out)
    if value is None or value.dim() < 1:
        return None
    features = value.shape[-1]
    index = torch.arange(features, dtype=torch.float64, device=value.device).expand(value.shape).contiguous()
    try:
        found = evaluate_nodes(step, [q0], given={out: index})
    except Exception:  # the ops between them do not run on a float64 index tensor: not a plain selection
        return None
    if not found:
        return None
    rows = found[0]
    if not isinstance(rows, torch.Tensor) or rows.dim() != 4 or rows.shape[0] != batch:
        return None
    rows = rows[0].reshape(-1).cpu()
    if not bool((rows == rows.round()).all()) or rows.min() < 0 or rows.max() >= features or len(rows.unique()) != len(rows):
        return None
    rows = rows.long()
    return None if torch.equal(rows, torch.arange(len(rows))) else rows


def _leading_channels(step: CapturedStep, query: fx.Node | None, q0: fx.Node, site: AttentionSite) -> bool | list[int] | str:
    """True when ``q0`` (the rotated channels) is the leading channels of each head of ``query`` (the whole
    pre-rotary query), else the channels it holds (or a description when they cannot be found)."""
    if query is None or query is q0:
        return True
    value = example_value(query)
    index = torch.arange(site.head_dim, dtype=torch.float64, device=value.device).expand(value.shape).contiguous()
    try:
        found = evaluate_nodes(step, [q0], given={query: index})
    except Exception:
        found = None
    if not found:
        return "that could not be traced to the head's channels"
    held = found[0].reshape(-1, found[0].shape[-1])[0].long().tolist()
    return True if held == list(range(len(held))) else held


def _batched_rotary(step: CapturedStep, tap: IndexerTap, site: AttentionSite) -> int:
    """The rotated channels ``R``; where the model's cos/sin are one row shared by the batch (a plain decoder's
    ``[T, R]`` table at one position), ``tap.cos``/``tap.sin`` become that row expanded to ``[B, R]`` (the tap copies
    ``B * R`` values)."""
    value = example_value(tap.cos)
    batch, last = site.batch, value.shape[-1]
    if value.numel() != last or batch == 1:
        return value.numel() // batch
    build = [lambda g, f: g.call_method("reshape", (f, 1, last)), lambda g, n: g.call_method("expand", (n, batch, last))]
    expanded = [_add_nodes(step, node, build) for node in (tap.cos, tap.sin)]
    if not all(expanded):
        raise LocateError(f"layer {site.layer}: the rotary cos/sin ({tuple(value.shape)}) could not be expanded to the batch of {batch}")
    tap.cos, tap.sin = expanded[0][-1], expanded[1][-1]
    return last


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
            nearest = _projection(site.q, params)
            rope = _rope(step, site.q, nearest[0] if nearest else None)
            q0 = rope.q0 if rope else site.q
            found = _projection(q0, params)
            if found is None:
                raise LocateError(
                    f"layer {layer}: no query projection (linear or addmm with a model weight) found upstream of the attention's "
                    "query, so the indexer has no hidden state to read; use selector='query-aware' for this model"
                )
            projection, x, transposed = found
            if rope is None:
                factor = _outside_factor(step, site.q, projection)
                if factor is not None:
                    raise LocateError(
                        f"layer {layer}: the query is multiplied by a position-dependent tensor (node {factor.name!r}: "
                        f"{factor.format_node()}) that is not a rotary embedding the indexer taps recognise (q * cos + "
                        "rotate(q) * sin with rotate-half or interleaved pairs over the leading channels of each head), "
                        "so the indexer cannot reproduce the query; use selector='query-aware' for this model"
                    )
            weight = step.bindings[_weight_name(projection, transposed).name].name
            tap = IndexerTap(x=x, cos=rope.cos if rope else None, sin=rope.sin if rope else None, weight=weight, transposed=transposed)
            query = _whole_query(q0, site)
            if rope is not None:
                tap.style = rope.style
                leading = _leading_channels(step, query, q0, site)
                if leading is not True:
                    raise LocateError(
                        f"layer {layer}: the rotary embedding rotates channels {leading} of each query head; the "
                        "indexer rotates the leading channels only; use selector='query-aware' for this model"
                    )
            tap.rows = _query_rows(step, projection, query, site.batch) if query is not None else None
            tap.hidden = example_value(x).numel() // site.batch
            if rope:
                tap.rotary = _batched_rotary(step, tap, site)
            site.indexer = tap
        log.info("TapIndexerInputsPass: taps at layers %s", list(self.target_layers))
