"""``torch.compile(model, backend="lsa")``: lsa-rewrite as a torch.compile backend.

The backend is a thin wrapper over ``convert()``: when Dynamo hands it the first graph of a model's
call, it finds the model being compiled, converts it (the same capture, passes and runtime as
``lsa_rewrite.convert``) and lets Dynamo run the graphs of that one call as they are. So:

- the first call after ``torch.compile`` runs the model's own code, densely: for ``generate()`` the
  prefill fills transformers' ``DynamicCache``/``StaticCache``, for a plain decoder its cache buffers;
- every later call goes through the converted forward (which Dynamo does not trace). The first
  decode call adopts the cache that prefill filled into a new KV store (as a converted prefill
  would), frees the dense cache, and decodes over the resident chunks from there on (HF: with an
  ``LSACache`` that ``generate()`` passes on).

On CUDA the rewritten decode step is compiled by Inductor and replayed as a CUDA graph
(``LSAConfig.compile``, ``runtime/compiled.py``); on the CPU it runs as a ``GraphModule``.

The model is the module torch.compile was given (``torch.compile(model)``, or the module of a
compiled method such as ``model.forward``); failing that, the innermost module on the call stack
that owns the graph's weights. A compiled function that merely calls a model is refused.
``torch.compile(hf_model).generate(...)`` runs the original module (transformers' ``generate``
calls the uncompiled ``__call__``): for ``generate()`` compile ``model.forward``.

Not here: the passes and the runtime (``convert``, ``session``, ``adapters``).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .config import LSAConfig

_IDENTIFY = (
    "compile the model module itself (torch.compile(model, backend='lsa'), or for generate() "
    "model.forward = torch.compile(model.forward, backend='lsa')), or convert it with lsa_rewrite.convert(model, config)"
)


class LSABackend:
    """A torch.compile backend that converts the compiled model to LSA (see the module docstring).

    Example::

        >>> model.forward = torch.compile(model.forward, backend=lsa_rewrite.backend(LSAConfig(budget=0.25)))
        >>> out = model.generate(ids, max_new_tokens=64)   # prefill dense, then LSA decode
        >>> lsa_rewrite.footprint(model)["ratio"]
    """

    def __init__(self, config: LSAConfig | None = None, *, indexer: Any = None):
        if config is not None and not isinstance(config, LSAConfig):
            raise TypeError(f"config must be an LSAConfig, got {type(config).__name__}")
        self.config = config or LSAConfig()
        self.indexer = indexer

    def __repr__(self) -> str:
        indexer = "" if self.indexer is None else f", indexer={self.indexer!r}" if isinstance(self.indexer, str) else f", indexer={type(self.indexer).__name__}"
        return f"lsa_rewrite.backend({self.config!r}{indexer})"

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]):
        modules = _modules_on_stack()
        owned = {id(t) for t in example_inputs if isinstance(t, torch.Tensor)}
        roots = [m for m, _, root in modules if root]
        owners = [m for m, _, _ in modules if any(id(t) in owned for t in _tensors(m))]
        converted = next((m for m in roots + owners if getattr(m, "lsa", None) is not None), None)
        if converted is not None:
            # The rest of a converted model's first (dense) call, or a converted model compiled again:
            # its own code, as Dynamo traced it.
            first_call = getattr(getattr(converted.lsa.adapter, "dense_prefill", None), "on_done", None)
            if isinstance(first_call, _FirstCall):
                first_call.codes.append(_compiled_code())
            return gm.forward
        model = (roots or owners or [None])[0]
        if model is None:
            raise ValueError(f"backend 'lsa' could not tell which model this graph belongs to (no nn.Module on the call stack owns its weights); {_IDENTIFY}")
        args, kwargs = _call_arguments(model, modules)
        capacity = _generation_length(model, modules)
        compiled_forward = model.__dict__.get("forward")
        if compiled_forward is not None and getattr(compiled_forward, "_torchdynamo_orig_callable", None) is not None:
            del model.__dict__["forward"]  # convert() traces the model's own forward, not this compiled one
        else:
            compiled_forward = None
        from .convert import convert

        try:
            convert(model, self.config, indexer=self.indexer)
        except Exception as exc:
            if compiled_forward is not None:
                model.__dict__["forward"] = compiled_forward
            raise ValueError(f"backend 'lsa' could not convert {type(model).__name__} (the module being compiled): {exc}") from exc
        model.lsa.adapter.expect_dense_prefill(args, kwargs, capacity=capacity)
        model.lsa.adapter.dense_prefill.on_done = _FirstCall([_compiled_code()])
        # This call goes on through Dynamo's graphs of the model's own code (a SkipFrame would mark the
        # frame's code object skipped for every later torch.compile in the process); later calls find
        # the converted forward, which Dynamo does not trace.
        return gm.forward


class _FirstCall:
    """The code objects Dynamo compiled for a converted model's first (dense) call.

    Their cache entries are never run again once the model is converted, but each one counts toward
    Dynamo's recompile limit of that code object (8 by default): every model compiled after the 8th
    would silently stay dense. Once the converted model has adopted (or superseded) that prefill, a
    code object whose entries all came from this backend is reset; one that other backends also
    compiled is left alone.
    """

    def __init__(self, codes: list):
        self.codes = codes

    def __call__(self) -> None:
        from torch._dynamo.eval_frame import reset_code

        try:
            from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
        except ImportError:  # pragma: no cover - older torch: leave the entries
            return
        for code in {id(c): c for c in self.codes if c is not None}.values():
            entries = _debug_get_cache_entry_list(code)
            if entries and all(_is_ours(getattr(e, "backend", None)) for e in entries):
                reset_code(code)
        self.codes.clear()


def _is_ours(backend: Any) -> bool:
    backend = getattr(backend, "compiler_fn", backend)  # torch.compile wraps the backend it is given
    return isinstance(backend, LSABackend) or backend is lsa_backend


def _compiled_code():
    """The code object of the frame Dynamo is compiling (None if torch does not say)."""
    try:
        tx = torch._dynamo.symbolic_convert.InstructionTranslator.current_tx()
        return tx.output.root_tx.f_code
    except Exception:  # torch internals; the cleanup is skipped without them
        return None


def backend(config: LSAConfig | None = None, *, indexer: Any = None) -> LSABackend:
    """A ``torch.compile`` backend that converts the model to LSA with ``config`` (and ``indexer``).

    ``torch.compile(model, backend="lsa")`` is the same with the default ``LSAConfig()``. The first
    call runs the model's own code (dense prefill); the converted model adopts the cache it filled at
    the next decode call. On CUDA the rewritten decode step runs through Inductor and CUDA graphs.

    Example::

        >>> model.forward = torch.compile(model.forward, backend=lsa_rewrite.backend(LSAConfig(budget=0.25)))
        >>> model.generate(ids, max_new_tokens=64)               # HF: generate() as usual
        >>> decoder = torch.compile(decoder, backend=lsa_rewrite.backend(LSAConfig(budget=0.25)))
        >>> logits = decoder(prompt, torch.arange(T))            # plain decoder: its own loop
    """
    return LSABackend(config, indexer=indexer)


def lsa_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]):
    """``torch.compile(model, backend="lsa")`` (the ``torch_dynamo_backends`` entry point): the default ``LSAConfig()``."""
    return _DEFAULT(gm, example_inputs)


_DEFAULT = LSABackend()


def _tensors(module: torch.nn.Module):
    yield from module.parameters()
    yield from module.buffers()


def _modules_on_stack() -> list[tuple[torch.nn.Module, Any, bool]]:
    """``(module, frame, root)`` for each nn.Module running on the Python stack, innermost first, each
    once: a frame's ``self``, or the module of the function a torch.compile wrapper calls (``fn``).
    ``root``: the module torch.compile was given (through an ``OptimizedModule`` or a compiled method)."""
    from torch._dynamo.eval_frame import OptimizedModule

    found: list[tuple[torch.nn.Module, Any, bool]] = []
    frame = inspect.currentframe()
    try:
        frame = frame.f_back if frame is not None else None
        while frame is not None:
            local = frame.f_locals
            for value, root in ((local.get("self"), False), (getattr(local.get("fn"), "__self__", None), True)):
                if isinstance(value, OptimizedModule):
                    value, root = value._orig_mod, True
                if not isinstance(value, torch.nn.Module):
                    continue
                seen = next((i for i, (m, _, _) in enumerate(found) if m is value), None)
                if seen is None:
                    found.append((value, frame, root))
                elif root and not found[seen][2]:
                    found[seen] = (value, found[seen][1], True)
            frame = frame.f_back
    finally:
        del frame
    return found


def _frames_of(model: torch.nn.Module, modules: list[tuple[torch.nn.Module, Any, bool]]):
    """Frames (innermost first) whose ``self`` is ``model`` (or an OptimizedModule around it)."""
    frame = next((f for m, f, _ in modules if m is model), None)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if owner is model or getattr(owner, "_orig_mod", None) is model:
            yield frame
        frame = frame.f_back


def _call_arguments(model: torch.nn.Module, modules) -> tuple[tuple, dict]:
    """The arguments of the model call being compiled (its ``nn.Module.__call__`` frame), or empty."""
    for frame in _frames_of(model, modules):
        args, kwargs = frame.f_locals.get("args"), frame.f_locals.get("kwargs")
        if isinstance(args, tuple) and isinstance(kwargs, dict):
            return args, kwargs
    return (), {}


def _generation_length(model: torch.nn.Module, modules) -> int | None:
    """The final length of the ``generate()`` running this call (its generation config), if any."""
    for frame in _frames_of(model, modules):
        length = getattr(frame.f_locals.get("generation_config"), "max_length", None)
        if isinstance(length, int):
            return length
    return None
