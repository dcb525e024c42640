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
import os
from typing import Any

import torch

from . import handling
from .adapters import is_hf_model, make_adapter
from .config import LSAConfig
from .session import LSASession, build_program, model_device_dtype

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
        indexer: for ``selector="indexer"``: a trained indexer (``lsa_rewrite.indexer.LSAIndexer``) or the path
            of its ``.safetensors`` file; it must have been trained for this model and chunk size.

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
    adapter = make_adapter(model, config)
    indexer = _indexer(model, config, indexer)
    step, sites = adapter.trace()
    if indexer is not None and not is_hf_model(model):
        from .indexer import check_compatible
        from .indexer.calibrate import sites_signature

        # a plain decoder has no config: its signature comes from the traced step
        check_compatible(indexer, sites_signature(model, sites), config.to_dict())
    layers = tuple(indexer.config.target_layers) if indexer is not None else ()
    program = build_program(step, model, config, adapter.windows, layers)
    if indexer is not None:
        _check_indexer_taps(indexer, program)
    session = LSASession(model, config, adapter, program, indexer=indexer)
    log.info("converted %s: %s", type(model).__name__, ", ".join(f"L{s.layer}:{s.action}" for s in program.sites))
    adapter.install(session)
    model.lsa = session
    handling.install(model)
    return model


def _indexer(model: torch.nn.Module, config: LSAConfig, indexer: Any):
    """The indexer ``selector="indexer"`` uses, loaded and checked against the model (None otherwise)."""
    if indexer is None:
        if config.selector == "indexer":
            raise ValueError(
                "selector='indexer' needs a trained indexer: convert(model, LSAConfig(selector='indexer'), indexer=PATH) "
                "(train one with `lsa-rewrite calibrate` + `lsa-rewrite train`), or use selector='query-aware'"
            )
        return None
    if config.selector != "indexer":
        raise ValueError(f"an indexer was given but LSAConfig.selector={config.selector!r}; pass LSAConfig(selector='indexer')")
    from .indexer import LSAIndexer, check_compatible

    if isinstance(indexer, (str, os.PathLike)):
        indexer = LSAIndexer.load(indexer)
    if not isinstance(indexer, LSAIndexer):
        raise TypeError(f"indexer must be a path to a .safetensors indexer or an LSAIndexer, got {type(indexer).__name__}")
    if is_hf_model(model):  # a plain decoder's signature comes from its traced step: checked in convert()
        from .indexer.calibrate import model_signature

        check_compatible(indexer, model_signature(model), config.to_dict())
    device, _ = model_device_dtype(model)
    return indexer.to(device)


def _check_indexer_taps(indexer, program) -> None:
    """The graph's taps match what the indexer reads (hidden size, rotary or not), target layer by target layer."""
    cfg = indexer.config
    position = {layer: i for i, layer in enumerate(cfg.target_layers)}
    for site in program.sites:
        tap = site.indexer
        if tap is None or site.layer not in position:
            continue
        if tap.hidden != cfg.hidden_size:
            raise ValueError(f"indexer reads hidden states of size {cfg.hidden_size}, layer {site.layer}'s query projection takes {tap.hidden}")
        want = cfg.layer_rope(position[site.layer])
        if bool(tap.rotary) != want:
            has = "applies" if tap.rotary else "does not apply"
            raise ValueError(
                f"indexer was built with rope={want} at target layer {site.layer} (rope={cfg.rope}), but this model {has} rotary "
                f"embeddings to queries at layer {site.layer}; build the indexer for this model (indexer_from_model, or calibrate "
                "and train on it)"
            )
        if tap.rotary and tap.style != cfg.rope_style:
            raise ValueError(
                f"indexer rotates queries in the {cfg.rope_style!r} style, but this model's rotary at layer {site.layer} is "
                f"{tap.style!r}; build the indexer for this model (indexer_from_model, or calibrate and train on it)"
            )


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


_SUMMED = ("resident_kv_bytes", "dense_kv_bytes", "pool_bytes", "index_bytes", "table_bytes", "mirror_bytes", "host_bytes")


def footprint(model: torch.nn.Module, *, across_ranks: bool = False) -> dict[str, float | int]:
    """KV bytes a converted model holds on its device, against a dense cache for the same sequences.

    On a tensor-parallel model (transformers' ``tp_plan``) the bytes are this rank's (its KV heads
    only), and ``tp_rank``/``tp_size`` say which rank; ``across_ranks=True`` sums the byte counts over
    the tensor-parallel group instead (an all-reduce: call it on every rank at once).

    Keys: ``resident_kv_bytes`` (every device tensor of the store: pools + chunk index + tables and
    the memory manager's state), ``dense_kv_bytes``, ``ratio``, ``mirror_bytes`` (the host mirror's
    tensors), ``host_bytes`` (the host memory the store holds: the mirror's page-aligned allocation; 0
    in evict mode), ``mirror`` (``"exact"``, ``"fp8"`` or ``"none"``), ``index_bytes``, ``pool_bytes``, ``table_bytes`` (the rest of ``resident_kv_bytes``), ``dropped_chunks``,
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
    out = runtime.store.footprint()
    tp = getattr(runtime.adapter, "tp", None)
    if tp is None:
        if across_ranks:
            raise ValueError("footprint(across_ranks=True) needs a tensor-parallel model; this one is not sharded")
        return out
    out.update(tp_rank=tp.rank, tp_size=tp.size)
    if across_ranks:
        import torch.distributed as dist

        # on the store's device for NCCL (it has no CPU tensors), on the CPU for gloo
        device = runtime.store.device if dist.get_backend(tp.group) == "nccl" else torch.device("cpu")
        counts = torch.tensor([out[k] for k in _SUMMED], dtype=torch.float64, device=device)
        dist.all_reduce(counts, group=tp.group)
        out.update({k: int(v) for k, v in zip(_SUMMED, counts.cpu().tolist())})
        out["ratio"] = out["resident_kv_bytes"] / out["dense_kv_bytes"] if out["dense_kv_bytes"] else 0.0
        out["tp_rank"] = None
    return out
