"""``convert()``: give a decoder Lookahead Sparse Attention; ``inspect_model()`` and ``footprint()``.

One pipeline for every model kind: the adapter (``lsa_rewrite.adapters``) captures one decode step,
the passes locate attention and cache writes, rewrite them to the LSA ops against the per-layer state
contract, verify, bind; the model-agnostic ``LSASession`` (``model.lsa``) then serves it, driven by
the adapter.

Everything that can fail (capture, passes, contract checks) runs before the model is touched: on
error the model is left as it was and the error says what was found and what to do.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .adapters import make_adapter
from .config import LSAConfig
from .session import LSASession, build_program

log = logging.getLogger("lsa_rewrite")


def convert(model: torch.nn.Module, config: LSAConfig | None = None, *, indexer: Any = None) -> torch.nn.Module:
    """Give ``model`` Lookahead Sparse Attention during decode; returns the converted model.

    The model is converted in place and returned: its decode steps run a rewritten graph whose
    attention reads only the resident KV chunks, and ``generate()`` (HF) or ``forward`` (plain
    decoders) keep working. ``model.lsa`` holds the runtime (``report()``, current ``store``).

    Args:
        model: a transformers causal LM, or a plain decoder called as ``model(input_ids, input_pos)``
            with module-buffer KV caches.
        config: an ``LSAConfig`` (default: ``LSAConfig()``).
        indexer: a trained indexer for ``selector="indexer"``.

    Raises:
        ValueError (and subclasses ``LocateError``, ...): the model cannot be converted; the message says
        what was found and what to do. The model is left untouched.

    Example::

        >>> from transformers import AutoModelForCausalLM
        >>> model = lsa_rewrite.convert(AutoModelForCausalLM.from_pretrained(path), LSAConfig(budget=0.135))
        >>> out = model.generate(ids, max_new_tokens=64)
        >>> lsa_rewrite.footprint(model)["ratio"]
    """
    config = config or LSAConfig()
    if not isinstance(config, LSAConfig):
        raise TypeError(f"config must be an LSAConfig, got {type(config).__name__}")
    if getattr(model, "lsa", None) is not None:
        raise ValueError("this model is already converted (it has `model.lsa`); convert the original model once")
    if config.selector == "indexer" or indexer is not None:
        raise ValueError(
            "selector='indexer' needs a trained LSA indexer, which this version cannot load yet; "
            "use selector='query-aware' (the training-free default)"
        )
    adapter = make_adapter(model, config)
    step, _ = adapter.trace()
    program = build_program(step, model, config, adapter.windows)
    session = LSASession(model, config, adapter, program)
    log.info("converted %s: %s", type(model).__name__, ", ".join(f"L{s.layer}:{s.action}" for s in program.sites))
    adapter.install(session)
    model.lsa = session
    return model


def inspect_model(model: torch.nn.Module, config: LSAConfig | None = None) -> list[dict[str, Any]]:
    """Trace ``model``'s decode step and report every attention site, without converting anything.

    Returns one dict per site: layer, attention form (sdpa/eager), cache write op, q/kv heads, head
    dim, GQA form, scale, softcap, sliding window, action (``rewrite`` or ``ring``) and the reason.
    Raises the same errors as :func:`convert` when the model cannot be converted.

    Example::

        >>> rows = lsa_rewrite.inspect_model(model)
        >>> sum(r["action"] == "rewrite" for r in rows)
        30
    """
    config = config or LSAConfig()
    _, sites = make_adapter(model, config).trace()
    return [s.describe() for s in sites]


def footprint(model: torch.nn.Module) -> dict[str, float | int]:
    """KV bytes a converted model holds on its device, against a dense cache for the same sequences.

    Keys: ``resident_kv_bytes`` (every device tensor of the store: pools + chunk index + tables and
    the memory manager's state), ``dense_kv_bytes``, ``ratio``, ``mirror_bytes`` (host),
    ``index_bytes``, ``pool_bytes``, ``table_bytes`` (the rest of ``resident_kv_bytes``), ``dropped_chunks``,
    ``tokens``, ``capacity_tokens``, ``slots_per_sequence``, ``selections``.

    Example::

        >>> model.generate(ids, max_new_tokens=64)
        >>> lsa_rewrite.footprint(model)["ratio"]   # e.g. 0.14
    """
    runtime = getattr(model, "lsa", None)
    if not isinstance(runtime, LSASession):
        raise ValueError("footprint() needs a converted model: call lsa_rewrite.convert(model) first")
    if runtime.store is None:
        raise ValueError("the converted model holds no sequences yet: run generate() (or a prefill) first")
    return runtime.store.footprint()
