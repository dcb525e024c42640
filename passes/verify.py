"""``VerifyRewritePass``: the rewritten decode graph no longer touches a full-length cache.

Checks, after ``RewriteAttentionPass``:
- no node reads a cache placeholder (they must all be gone);
- no dense attention (SDPA / eager chain over a cache) remains;
- every site located was rewritten (``rewrite`` or ``ring``) and carries its reason;
- the graph lints (``graph.lint()``).
Raises ``VerifyError`` naming the offending nodes; a failure means nothing is converted.
"""

from __future__ import annotations

import logging

import torch.fx as fx

from .capture import CapturedStep
from .locate import SDPA_TARGETS, AttentionSite, GraphPass

log = logging.getLogger("lsa_rewrite.passes")


class VerifyError(RuntimeError):
    """The rewritten graph still depends on the dense cache or is malformed."""


class VerifyRewritePass(GraphPass):
    """Check the rewritten graph (see module docstring)."""

    def __call__(self, step: CapturedStep, sites: list[AttentionSite]) -> None:
        graph = step.graph_module.graph
        graph.lint()
        names = {n.name for n in graph.nodes}
        leftover = [s.k_source.name for s in sites if s.k_source.name in names] + [s.v_source.name for s in sites if s.v_source.name in names]
        if leftover:
            readers = {name: [u.format_node() for u in next(n for n in graph.nodes if n.name == name).users] for name in leftover}
            raise VerifyError(f"after rewriting, these cache inputs are still read: {readers}")
        cache_like = [n.name for n in graph.nodes if n.op == "placeholder" and step.bindings.get(n.name) is not None and step.bindings[n.name].kind in ("cache", "cache_state")]
        if cache_like:
            raise VerifyError(f"after rewriting, the graph still takes the capture cache's tensors {cache_like}")
        dense = [n.name for n in graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS]
        if dense:
            raise VerifyError(f"dense attention left in the rewritten graph: {dense}")
        for site in sites:
            if site.action not in ("rewrite", "ring") or not site.reason:
                raise VerifyError(f"layer {site.layer} was neither rewritten nor reported ({site.action!r})")
        log.info("VerifyRewritePass: %d sites verified, %d graph nodes", len(sites), len(graph.nodes))


def count_targets(graph: fx.Graph) -> dict[str, int]:
    """How often each call target appears: what tests and ``inspect`` look at."""
    counts: dict[str, int] = {}
    for n in graph.nodes:
        if n.op in ("call_function", "call_method"):
            key = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
            counts[str(key)] = counts.get(str(key), 0) + 1
    return counts
