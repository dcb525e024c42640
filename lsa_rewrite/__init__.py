"""lsa-rewrite: Lookahead Sparse Attention for any traced decoder, by FX graph rewriting.

Public API:
- ``LSAConfig``: what stays resident and how it is chosen.
- ``convert(model, config, *, indexer=None)``: rewrite a decoder's decode step to attend over a
  budget-sized resident set of KV chunks (full history in a CPU mirror).
- ``footprint(model)``: resident KV bytes against a dense cache.

Example::

    >>> import lsa_rewrite
    >>> model = lsa_rewrite.convert(model, lsa_rewrite.LSAConfig(budget=0.25))
    >>> out = model.generate(ids, max_new_tokens=64)
    >>> lsa_rewrite.footprint(model)["ratio"] <= 0.25
"""

from . import kernels  # noqa: F401  (registers the lsa:: custom ops)
from .config import LSAConfig
from .convert import convert, footprint, inspect_model
from .runtime.store import KVStore, StoreError
from .selectors import PerLayerSelector, SelectionWindow, Selector
from .session import LSASession

__all__ = [
    "KVStore", "LSAConfig", "LSASession", "PerLayerSelector", "SelectionWindow", "Selector", "StoreError", "convert", "footprint",
    "inspect_model",
]
__version__ = "0.1.0"
