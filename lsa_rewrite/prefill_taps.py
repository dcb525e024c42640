"""``PrefillTaps``: the indexer's inputs at the last prompt token, recorded while the model's own prefill runs.

The first selection after a prefill (``KVStore.probe``) needs the indexer's taps of the last prompt
token: the input of the query projection at each target layer (``idx_x``) and the rotary cos/sin of
its position. The probe re-runs the decode step on that token to fill them, but that step attends over
the first resident set only (the sink and the newest chunks), so from the first sparsely attended layer
on its hidden states are not the dense model's: at a deep target layer the indexer then reads an input
unlike any it was calibrated on (calibration records the dense model's, ``indexer/calibrate.py``). The
model's own prefill computes the exact one. While the adapter runs that prefill, ``PrefillTaps`` holds a
forward pre-hook on each target layer's query projection (the module owning the weight the rewrite found,
``IndexerTap.weight``) that keeps the input at the last position, and the probe writes those values into
``idx_x`` after its step (the cos/sin the step tapped are exact: they depend on the position only).

It is there because the indexer was trained on the dense model's inputs, not for a measured task gain
(docs/indexer.md gives the measurement).

Where a prefill does not run the model's modules (the dense prefill the ``torch.compile`` backend adopts
runs Dynamo's graph of the model's code), or a hook sees an input it cannot read (not ``[batch, tokens,
hidden]``, a sharded DTensor), that layer keeps the probe step's tap: the selection is the one it was
before, never a wrong one.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

log = logging.getLogger("lsa_rewrite")


def projection_module(model: torch.nn.Module, weight: str) -> torch.nn.Module | None:
    """The module that owns parameter ``weight`` (a qualified name) directly, or None."""
    path, _, attr = weight.rpartition(".")
    try:
        module = model.get_submodule(path) if path else model
    except AttributeError:
        return None
    return module if isinstance(module._parameters.get(attr), torch.nn.Parameter) else None


class PrefillTaps:
    """Forward pre-hooks on the indexer's query projections for the duration of one prefill.

    ``sites``: the decode program's attention sites (those with an ``indexer`` tap are read). Use as a
    context manager around the prefill's forwards; ``rows`` says which sequences of the batch the next
    forward holds (``LSAConfig.prefill_batch`` pieces). A forward over a piece of the prompt's tokens
    (``LSAConfig.prefill_chunk``) overwrites the earlier pieces' values, so after the last piece each
    row holds its last prompt token's. ``values()`` gives ``{layer: [batch, hidden]}`` for the layers
    recorded for every row.

    Example::

        >>> with PrefillTaps(model, session.sites, batch) as taps:
        ...     model_forward(...)
        >>> taps.values()   # {9: tensor [B, 576], 18: ..., 27: ...}
    """

    def __init__(self, model: torch.nn.Module, sites: list, batch: int):
        self.batch = batch
        self.rows = slice(0, batch)
        self._targets: dict[int, tuple[torch.nn.Module, int]] = {}
        for site in sites:
            tap = getattr(site, "indexer", None)
            if tap is None:
                continue
            module = projection_module(model, tap.weight)
            if module is None:
                log.debug("prefill taps: no module owns %s (layer %d); its probe keeps the step's tap", tap.weight, site.layer)
                continue
            self._targets[site.layer] = (module, tap.hidden)
        self._values: dict[int, torch.Tensor] = {}
        self._covered: dict[int, list[bool]] = {}
        self._unreadable: set[int] = set()
        self._hooks: list[Any] = []

    def __enter__(self) -> "PrefillTaps":
        for layer, (module, hidden) in self._targets.items():
            hook = functools.partial(self._record, layer, hidden)
            self._hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def _record(self, layer: int, hidden: int, module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else next(iter(kwargs.values()), None)
        x = _local(x)
        rows = self.rows
        count = rows.stop - rows.start
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[0] != count or x.shape[-1] != hidden:
            if layer not in self._unreadable:
                log.debug("prefill taps: layer %d's query projection got %s; its probe keeps the step's tap",
                          layer, tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__)
            self._unreadable.add(layer)
            return
        if layer not in self._values:
            self._values[layer] = torch.zeros(self.batch, hidden, dtype=x.dtype, device=x.device)
            self._covered[layer] = [False] * self.batch
        self._values[layer][rows] = x[:, -1].detach()
        self._covered[layer][rows] = [True] * count

    def values(self) -> dict[int, torch.Tensor]:
        """``{layer: [batch, hidden]}``: the query projection's input at the last prompt token, for each
        target layer that every row's forward recorded in a readable form."""
        return {
            layer: value for layer, value in self._values.items()
            if layer not in self._unreadable and all(self._covered[layer])
        }


def _local(x: Any) -> Any:
    """A replicated DTensor's local tensor (a tensor-parallel model hands its projections the full hidden
    state); anything else as it is (a sharded DTensor is then refused by the shape check)."""
    placements = getattr(x, "placements", None)
    if placements is not None and hasattr(x, "to_local"):
        if all(type(p).__name__ == "Replicate" for p in placements):
            return x.to_local()
        return None
    return x
