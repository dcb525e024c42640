"""lsa-rewrite: Lookahead Sparse Attention for any traced decoder, by FX graph rewriting.

Public API:
- ``LSAConfig``: what stays resident and how it is chosen.
- ``convert(model, config, *, indexer=None)``: rewrite a decoder's decode step to attend over a
  budget-sized resident set of KV chunks (full history in a CPU mirror).
- ``footprint(model)``: resident KV bytes against a dense cache (per rank, or summed with
  ``across_ranks=True``, for a tensor-parallel model: transformers' ``tp_plan``, docs/serving.md).
- ``from_pretrained(path)``: load a directory written by a converted model's ``save_pretrained``
  (or ``lsa-rewrite convert``) and convert it with the saved settings; returns ``(model, tokenizer)``.
- ``calibrate(model, tokenizer, out_dir, ...)`` and ``train_indexer(dump, ...)``: record a calibration
  dump, then train the lookahead indexer from it alone (``lsa_rewrite.indexer``).
- ``backend(config, *, indexer=None)``: a ``torch.compile`` backend that converts the model it
  compiles (``torch.compile(model, backend="lsa")`` is the default ``LSAConfig()``).

Example::

    >>> import lsa_rewrite
    >>> model = lsa_rewrite.convert(model, lsa_rewrite.LSAConfig(budget=0.25))
    >>> out = model.generate(ids, max_new_tokens=64)
    >>> lsa_rewrite.footprint(model)["ratio"] <= 0.25
    >>> model.save_pretrained("model-lsa")            # dense weights + lsa_config.json
    >>> model, tokenizer = lsa_rewrite.from_pretrained("model-lsa")
    >>> model.forward = torch.compile(model.forward, backend=lsa_rewrite.backend(LSAConfig(budget=0.25)))
"""

import sys
import types
from typing import Any

from . import kernels  # noqa: F401  (registers the lsa:: custom ops)
from .config import LSAConfig
from .runtime.store import KVStore, LSABudgetWarning, StoreError
from .selectors import AllReduceSelector, PerLayerSelector, SelectionWindow, Selector
from .session import LSASession
from .tensor_parallel import TensorParallelError, TensorParallelPlan

# The conversion entry points import transformers (HF adapter); they load on first use, so that
# `lsa_rewrite.indexer` (backbone-free training) imports in a process without transformers.
_LAZY = {
    "convert": "convert", "footprint": "convert", "inspect_model": "convert", "from_pretrained": "pretrained", "backend": "backend",
    "calibrate": "indexer.calibrate", "train_indexer": "indexer.train",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lsa_rewrite' has no attribute {name!r}")


class _Package(types.ModuleType):
    """Importing a submodule sets the package attribute of its name, so the first import of
    ``lsa_rewrite.convert`` (by ``footprint``, ``from_pretrained`` or the CLI) would make
    ``lsa_rewrite.convert`` the module instead of the function; the function keeps the name."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return  # the submodule stays importable through sys.modules
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "AllReduceSelector", "KVStore", "LSABudgetWarning", "LSAConfig", "LSASession", "PerLayerSelector", "SelectionWindow", "Selector", "StoreError",
    "TensorParallelError", "TensorParallelPlan", "backend", "calibrate",
    "convert", "footprint", "from_pretrained", "inspect_model", "train_indexer",
]
__version__ = "0.1.0"
