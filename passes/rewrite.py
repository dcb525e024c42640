"""``RewriteAttentionPass``: splice the LSA store ops into a located decode graph.

For every ``AttentionSite``:

Before::

    index_copy_(k_cache, 2, idx, k_new)            # or setitem / index_put_ / cat((past, k_new))
    out = attention(q, k_cache..., v_cache...)      # SDPA or the eager matmul-softmax-matmul chain

After (``action="rewrite"``)::

    lsa.tap(idx_x, x); lsa.tap(idx_cos, cos); lsa.tap(idx_sin, sin)   # indexer target layers only
    out = lsa.sparse_decode_attention_append(
        q.select(2, 0), k_pool, v_pool, slot_chunk, pos, valid_start,
        k_new.select(seq, 0), v_new.select(seq, 0), chunk_slot, kmin, kmax, q_tap, scale, softcap,
    ).unsqueeze(2)

One op per sparse layer does what ``lsa.append_kv``, ``lsa.update_chunk_index`` (the pool's chunk size),
``lsa.tap(q_tap, q)`` and ``lsa.sparse_decode_attention`` do in that order; on CUDA it is the attention's
two launches alone (the token is added, written and tapped in the merge kernel: no launch of its own).

After (``action="ring"``, sliding-window layers)::

    lsa.ring_append_kv(k_ring, v_ring, k_new.select(seq, 0), v_new.select(seq, 0), pos)
    out = lsa.ring_decode_attention(q.select(2, 0), k_ring, v_ring, pos, valid_start, scale, softcap).unsqueeze(2)

The store's tensors become new placeholders after the step's own inputs, one per graph input the
per-layer state contract (``lsa_rewrite.runtime.state``) declares, named ``lsa_<layer>_<tensor>``
(``lsa_<tensor>`` for the store-wide ``pos`` and ``valid_start``); ``store_keys`` lists their
``(layer, tensor)`` in order. The original cache writes, the cache placeholders, everything only
they fed (mask construction, repeat_kv) and the cache outputs are removed; the graph returns the
logits alone. Parameters become ``get_attr`` of ``model.<name>``.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx

from lsa_rewrite import kernels  # noqa: F401  (registers the lsa:: ops used below)

from lsa_rewrite.runtime.state import graph_inputs, store_graph_inputs

from .capture import CapturedStep
from .locate import AttentionSite, GraphPass

log = logging.getLogger("lsa_rewrite.passes")

OPS = torch.ops.lsa


class RewriteAttentionPass(GraphPass):
    """Replace cache writes and dense attention with LSA store ops (see module docstring)."""

    def __call__(self, step: CapturedStep, sites: list[AttentionSite]) -> list[tuple[int | None, str]]:
        graph = step.graph_module.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        store_keys: list[tuple[int | None, str]] = []
        anchor = placeholders[-1]

        def new_input(layer: int | None, name: str) -> fx.Node:
            nonlocal anchor
            with graph.inserting_after(anchor):
                node = graph.placeholder(f"lsa_{name}" if layer is None else f"lsa_{layer}_{name}")
            anchor = node
            store_keys.append((layer, name))
            return node

        # Placeholders for exactly the graph inputs the state contract declares (runtime/state.py).
        store_inputs = {n: new_input(None, n) for n in store_graph_inputs()}
        pos, valid_start = store_inputs["pos"], store_inputs["valid_start"]
        for site in sites:
            tensors = {n: new_input(site.layer, n) for n in graph_inputs(site.layout)}
            with graph.inserting_before(site.attn):
                k_tok = graph.call_method("select", (site.k_new, site.seq_dim, 0))  # [B, Hkv, D]
                v_tok = graph.call_method("select", (site.v_new, site.seq_dim, 0))
                q_tok = graph.call_method("select", (site.q, 2, 0))  # [B, Hq, D]
                if site.action == "ring":
                    graph.call_function(OPS.ring_append_kv.default, (tensors["k_ring"], tensors["v_ring"], k_tok, v_tok, pos))
                    out = graph.call_function(
                        OPS.ring_decode_attention.default,
                        (q_tok, tensors["k_ring"], tensors["v_ring"], pos, valid_start, site.scale, site.softcap),
                    )
                else:
                    if site.indexer is not None:
                        graph.call_function(OPS.tap.default, (tensors["idx_x"], site.indexer.x))
                        if site.indexer.cos is not None:
                            graph.call_function(OPS.tap.default, (tensors["idx_cos"], site.indexer.cos))
                            graph.call_function(OPS.tap.default, (tensors["idx_sin"], site.indexer.sin))
                    out = graph.call_function(
                        OPS.sparse_decode_attention_append.default,
                        (q_tok, tensors["k_pool"], tensors["v_pool"], tensors["slot_chunk"], pos, valid_start,
                         k_tok, v_tok, tensors["chunk_slot"], tensors["kmin"], tensors["kmax"], tensors["q_tap"],
                         site.scale, site.softcap),
                    )
                out4 = graph.call_method("unsqueeze", (out, 2))  # [B, Hq, 1, D]
            site.attn.replace_all_uses_with(out4)
            out4.meta["lsa_site"] = site.layer

        # The graph now returns only the logits; cache outputs (dynamic caches) go with it.
        output = next(n for n in graph.nodes if n.op == "output")
        results = output.args[0]
        results = results if isinstance(results, (tuple, list)) else (results,)
        output.args = (results[step.logits_index],)

        removable = [n for site in sites for n in site.removable]
        for node in reversed(removable):
            if node in graph.nodes and not node.users:
                graph.erase_node(node)
        _erase_dead(graph, keep=set(n for n in graph.nodes if n.op == "placeholder" and n.name.startswith("lsa_")))
        log.info("RewriteAttentionPass: rewrote %d sites (%d sparse, %d ring)", len(sites), sum(s.action == "rewrite" for s in sites), sum(s.action == "ring" for s in sites))
        return store_keys


def _is_inplace(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    if node.op == "call_function":
        if node.target is operator.setitem:
            return True
        schema = getattr(node.target, "_schema", None)
        return bool(schema is not None and schema.is_mutable)
    return False


def _erase_dead(graph: fx.Graph, keep: set[fx.Node]) -> None:
    """Remove nodes whose results nobody reads, and in-place updates of tensors nobody reads.

    ``lsa`` ops are kept. An in-place update with no users is removed only when its target has no
    reader left other than in-place updates: such a target is cache bookkeeping (e.g. a length
    counter of the capture cache), not part of the computation. Unused placeholders not in ``keep``
    are removed.
    """
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if node.op == "output" or node in keep or node.users:
                continue
            if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "lsa":
                continue
            if _is_inplace(node):
                target = node.args[0]
                if isinstance(target, fx.Node) and any(u is not node and not _is_inplace(u) for u in target.users):
                    continue
            graph.erase_node(node)
            changed = True
