"""Adapters: how a converted model of each kind is traced, prefilled and called; each drives the
model-agnostic ``LSASession``.

- ``HFAdapter``: transformers causal LMs (``generate()`` works unchanged);
- ``PlainDecoderAdapter``: plain PyTorch decoders called as ``model(input_ids, input_pos)`` that keep
  their KV cache in module buffers (gpt-fast style).
"""

from __future__ import annotations

import torch

from ..config import LSAConfig
from .hf import HFAdapter, hf_layer_windows, is_hf_model
from .plain import PlainDecoderAdapter


def make_adapter(model: torch.nn.Module, config: LSAConfig):
    """The adapter for ``model`` (checks that it can be converted at all; touches nothing)."""
    if model.training:
        raise ValueError("convert a model in eval mode (call model.eval() first): decode runs without dropout or gradients")
    return HFAdapter(model, config) if is_hf_model(model) else PlainDecoderAdapter(model, config)


__all__ = ["HFAdapter", "PlainDecoderAdapter", "hf_layer_windows", "is_hf_model", "make_adapter"]
