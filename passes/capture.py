"""Capture one step of a decoder as a Dynamo FX graph, with every placeholder bound.

The step is traced by Dynamo (``fullgraph=True``, static shapes) with a capturing backend, using the
model's own cache mechanism. Each placeholder is then bound by *identity* of the tensor Dynamo handed
the backend: a model parameter/buffer (later a ``get_attr``), a step input, a tensor of the capture
cache (``keys``/``values``/other state of HF cache layer i), or an unknown tensor (kept as a constant).
Nothing here depends on model class names or on Dynamo's source naming.

Not here: deciding what is a KV cache (``LocateAttentionPass``), changing the graph (rewrite).
"""

from __future__ import annotations

import itertools
import types

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx


class CaptureError(RuntimeError):
    """The step could not be traced as one FX graph."""


@dataclass(frozen=True)
class Binding:
    """What a placeholder of the captured graph stands for.

    kind: ``"param"`` (``name`` = qualified name in the model), ``"input"`` (``name`` = step input),
    ``"cache"`` (``name`` = ``"keys"``/``"values"``, ``layer`` = cache layer), ``"cache_state"``
    (other tensors of the capture cache), ``"constant"`` (anything else; kept by value).
    """

    kind: str
    name: str
    layer: int | None = None


@dataclass
class CapturedStep:
    """A traced step: the graph, its placeholders' bindings and which output is the logits."""

    graph_module: fx.GraphModule
    bindings: dict[str, Binding]  # placeholder node name -> binding
    examples: dict[str, Any]  # placeholder node name -> the real tensor seen at capture
    logits_index: int


_captures = itertools.count()


def _fresh(fn: Callable[..., Any]) -> Callable[..., Any]:
    # Dynamo caches compiled frames per code object: a code object of its own per capture (a copy of
    # the trampoline's, renamed) keeps every capture independent of earlier ones and of the recompile
    # limit. It stays in this file: Dynamo runs functions from files it skips (such as exec'd
    # "<string>" code) through one shared wrapper frame, whose recompiles would all count together.
    def trampoline(*args):
        return fn(*args)

    name = f"_lsa_capture_step_{next(_captures)}"
    code = trampoline.__code__.replace(co_name=name)
    return types.FunctionType(code, trampoline.__globals__, name, None, trampoline.__closure__)


def _forget(trampoline: Callable[..., Any]) -> None:
    """Drop Dynamo's cache entry for a capture's frame: with ``captured.clear()`` in ``capture_step``,
    nothing Dynamo keeps holds the traced graph and its example inputs (the model's weights; without
    this every conversion kept a copy of its model alive)."""
    reset_code = getattr(torch._dynamo.eval_frame, "reset_code", None)
    if reset_code is not None:
        reset_code(trampoline.__code__)


def capture_step(
    fn: Callable[..., torch.Tensor],
    args: tuple[torch.Tensor, ...],
    *,
    input_names: tuple[str, ...],
    model: torch.nn.Module,
    cache_tensors: dict[int, Binding] | None = None,
) -> CapturedStep:
    """Trace ``fn(*args) -> logits`` into one FX graph and bind its placeholders.

    ``input_names`` names ``args`` (e.g. ``("input_ids", "position_ids")``); ``cache_tensors`` maps
    ``id(tensor)`` of the capture cache's tensors to their bindings.
    """
    captured: dict[str, Any] = {}

    def backend(gm: fx.GraphModule, example_inputs: list[Any]):
        captured["gm"] = gm
        captured["examples"] = list(example_inputs)

        def run(*inputs: Any):
            out = gm.forward(*inputs)
            captured["outputs"] = out
            return out

        return run

    trampoline = _fresh(fn)
    compiled = torch.compile(trampoline, backend=backend, fullgraph=True, dynamic=False)
    try:
        with torch.no_grad():
            logits = compiled(*args)
    except Exception as exc:  # Dynamo raises many types; all mean "not one traceable graph"
        raise CaptureError(
            f"could not trace one decode step of {type(model).__name__} as a single graph "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "lsa-rewrite needs a decode step without graph breaks"
        ) from exc
    finally:
        _forget(trampoline)
    if "gm" not in captured:
        raise CaptureError("Dynamo produced no graph for the decode step (was it already compiled elsewhere?)")
    gm: fx.GraphModule = captured["gm"]
    outputs = captured["outputs"]
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    logits_index = next((i for i, o in enumerate(outputs) if o is logits), None)
    if logits_index is None:
        raise CaptureError("the traced graph does not return the step's logits directly; wrap the model so it returns a tensor")

    by_id: dict[int, Binding] = {}
    for name, t in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(t), Binding("param", name))
    for name, t in model.named_buffers(remove_duplicate=False):
        by_id.setdefault(id(t), Binding("param", name))
    for name, t in zip(input_names, args):
        by_id[id(t)] = Binding("input", name)
    by_id.update(cache_tensors or {})

    bindings: dict[str, Binding] = {}
    examples: dict[str, Any] = {}
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(phs) != len(captured["examples"]):
        raise CaptureError(f"graph has {len(phs)} inputs but Dynamo passed {len(captured['examples'])}")
    for node, example in zip(phs, captured["examples"]):
        if not isinstance(example, torch.Tensor):
            raise CaptureError(f"graph input {node.name} is not a tensor ({type(example).__name__}); capture with static shapes")
        bindings[node.name] = by_id.get(id(example), Binding("constant", node.name))
        examples[node.name] = example
    # An input the graph does not read (e.g. positions of a model without RoPE) is fine: binding skips it.
    captured.clear()  # Dynamo's compiled function keeps the backend's closure: drop the graph and its inputs from it
    return CapturedStep(gm, bindings, examples, logits_index)


def example_value(node: fx.Node) -> Any:
    """The fake tensor Dynamo recorded for ``node`` (``None`` if unknown)."""
    return node.meta.get("example_value", node.meta.get("val"))
