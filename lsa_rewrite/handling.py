"""What a converted model does under ``copy.deepcopy``, ``.to()``, ``torch.save`` and ``save_pretrained``.

A converted model carries its session (``model.lsa``) and wrapped ``forward``/``generate`` as instance
attributes, and its rewritten graph is traced for its parameters' dtype and device. So:

- ``copy.deepcopy(model)`` copies the model without its session and converts the copy with the
  same ``LSAConfig`` (and indexer): a fresh converted model that holds no sequences;
- ``model.to(...)`` / ``.cuda()`` / ``.cpu()`` / ``.half()`` / ``.float()`` / ``.bfloat16()`` /
  ``.double()`` undo the conversion, move or cast the model, and convert it again (the sequences it
  held are dropped); a call that changes nothing (``model.to("cpu")`` on the CPU) keeps everything;
- ``torch.save(model)`` (pickling) is refused at once: the session holds host memory and compiled
  code that do not pickle. Save ``model.state_dict()`` (or the original model) and convert after
  loading;
- ``model.save_pretrained(dir)`` (HF models) writes the dense model as transformers does, with the
  session set aside for the call, then the LSA settings (``lsa_config.json``) and the indexer
  (``pretrained.py``); the model keeps its conversion and sequences. ``lsa_rewrite.from_pretrained``
  loads and converts such a directory.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch

from .adapters import is_hf_model

_WRAPPED = ("forward", "generate")
_MOVES = ("to", "cuda", "cpu", "half", "float", "bfloat16", "double")
_HANDLERS = ("__deepcopy__", "__reduce_ex__", "save_pretrained", *_MOVES)


def install(model: torch.nn.Module) -> None:
    """Give a converted ``model`` the behaviours in the module docstring."""
    model.__dict__["__deepcopy__"] = functools.partial(_deepcopy, model)
    model.__dict__["__reduce_ex__"] = functools.partial(_refuse_pickle, model)
    for name in _MOVES:
        model.__dict__[name] = functools.partial(_move, model, name)
    if is_hf_model(model):
        model.__dict__["save_pretrained"] = functools.partial(_save_pretrained, model)


def unconvert(model: torch.nn.Module) -> tuple[Any, Any]:
    """Undo ``convert`` in place (the current sequences are dropped); returns ``(config, indexer)``."""
    session = model.lsa
    if session.store is not None:
        session.store.synchronize()
    _detached(model)
    restore = getattr(session.adapter, "restore_cache_buffers", None)
    if restore is not None:
        restore()
    return session.config, session.indexer


def _detached(model: torch.nn.Module) -> dict[str, Any]:
    return {name: model.__dict__.pop(name) for name in (*_WRAPPED, *_HANDLERS, "lsa") if name in model.__dict__}


def _deepcopy(model: torch.nn.Module, memo: dict) -> torch.nn.Module:
    from .convert import convert

    session = model.lsa
    held = _detached(model)
    try:
        clone = copy.deepcopy(model, memo)
    finally:
        model.__dict__.update(held)
    restore = getattr(type(session.adapter), "materialize_cache_buffers", None)
    if restore is not None:
        restore(clone, session.adapter.cache_buffers)
    indexer = copy.deepcopy(session.indexer) if session.indexer is not None else None
    return convert(clone, session.config, indexer=indexer)


_CASTS = {"half": torch.float16, "float": torch.float32, "bfloat16": torch.bfloat16, "double": torch.float64}


def _changes(model: torch.nn.Module, name: str, args: tuple, kwargs: dict) -> bool:
    """Whether ``model.<name>(*args, **kwargs)`` would change its parameters' device or dtype."""
    param = next(model.parameters())
    if name in _CASTS:
        return param.dtype != _CASTS[name]
    if name == "cpu":
        return param.device.type != "cpu"
    if name == "cuda":
        return True  # which CUDA device is resolved by the call itself
    device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
    moves = device is not None and not (device.type == param.device.type and device.index in (None, param.device.index))
    casts = dtype is not None and dtype != param.dtype
    return moves or casts


def _move(model: torch.nn.Module, name: str, *args: Any, **kwargs: Any) -> torch.nn.Module:
    from .convert import convert

    if not _changes(model, name, args, kwargs):
        return model  # already there: the conversion and the sequences it holds stay
    config, indexer = unconvert(model)
    getattr(type(model), name)(model, *args, **kwargs)
    if indexer is not None:
        device = next(model.parameters()).device
        indexer = indexer.to(device)
    return convert(model, config, indexer=indexer)


def _save_pretrained(model: torch.nn.Module, save_directory: Any, *args: Any, **kwargs: Any) -> None:
    from .pretrained import save_dense, write_lsa_files

    if kwargs.get("push_to_hub"):
        raise ValueError(
            "save_pretrained(push_to_hub=True) of a converted model would upload the weights without lsa_config.json; "
            "save to a directory, then upload the whole directory"
        )
    held = _detached(model)  # transformers sees the model as it was before convert()
    try:
        save_dense(model, save_directory, *args, **kwargs)
    finally:
        model.__dict__.update(held)
    if kwargs.get("is_main_process", True):
        write_lsa_files(model, save_directory)


def _refuse_pickle(model: torch.nn.Module, protocol: int) -> Any:
    raise TypeError(
        f"a converted {type(model).__name__} does not pickle (torch.save): its LSA session holds host memory and compiled "
        "code. Save model.state_dict() (or the original model) and call lsa_rewrite.convert() again after loading; an HF model "
        "saves with model.save_pretrained(DIR) and loads converted with lsa_rewrite.from_pretrained(DIR)"
    )
