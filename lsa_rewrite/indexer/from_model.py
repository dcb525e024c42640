"""An untrained indexer built from a model's own query projections (``indexer_from_model``).

It traces one decode step (as ``convert`` does), finds each target layer's query projection with
``TapIndexerInputsPass`` and initialises the indexer from those weights (``LSAIndexer.from_query_weights``):
untrained, it ranks chunks by the model's own (low-rank) query against each chunk's key centre. This
module runs the model's tracing and so imports transformers; training (``train.py``) never imports it.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..config import LSAConfig
from .model import IndexerConfig, LSAIndexer, default_rank


def indexer_from_model(
    model: torch.nn.Module, config: LSAConfig | None = None, *, target_layers: Sequence[int] | None = None, rank: int | None = None,
) -> LSAIndexer:
    """An untrained ``LSAIndexer`` for ``model`` (query towers from its query projections).

    Args:
        model: the model to be converted (not converted yet), in eval mode.
        config: the ``LSAConfig`` it will be converted with (its chunk size is recorded).
        target_layers: sparsely attended layers to read (default: 3 spread over the depth).
        rank: the query tower's rank (default: ``default_rank(hidden_size)``).

    Example::

        >>> indexer = indexer_from_model(model, LSAConfig(chunk_size=16))
        >>> model = lsa_rewrite.convert(model, LSAConfig(chunk_size=16, selector="indexer"), indexer=indexer)
    """
    from ..adapters import is_hf_model, make_adapter
    from ..passes import TapIndexerInputsPass, locate
    from .calibrate import default_target_layers, model_signature, sites_signature

    config = config or LSAConfig()
    adapter = make_adapter(model, config)
    step, _ = adapter.trace()
    sites = locate(step, layer_windows=adapter.windows)
    sparse = [s.layer for s in sites if s.action == "rewrite"]
    if not sparse:
        raise ValueError(
            f"{type(model).__name__} has no sparsely attended layer (every layer is sliding-window, kept exact), so there "
            "is nothing for an indexer to select; convert it with the default selector"
        )
    layers = tuple(target_layers) if target_layers is not None else tuple(default_target_layers(sparse))
    TapIndexerInputsPass(layers)(step, sites)
    by_layer = {s.layer: s for s in sites}
    first = by_layer[layers[0]]
    rows = first.q_heads * first.head_dim
    weights = {layer: by_layer[layer].indexer.query_weight(model, rows).float() for layer in layers}
    hidden = first.indexer.hidden
    styles = {by_layer[layer].indexer.style for layer in layers if by_layer[layer].indexer.rotary}
    if len(styles) > 1:
        found = ", ".join(f"layer {layer}: {by_layer[layer].indexer.style}" for layer in layers if by_layer[layer].indexer.rotary)
        raise ValueError(f"target layers {list(layers)} rotate their queries in different styles ({found}); choose target layers of one style")
    cfg = IndexerConfig(
        hidden_size=hidden, q_heads=first.q_heads, kv_heads=first.kv_heads, head_dim=first.head_dim,
        rank=rank or default_rank(hidden, q_dim=rows), target_layers=layers,
        rope=tuple(bool(by_layer[layer].indexer.rotary) for layer in layers),  # per layer: SmolLM3 mixes rotary and none
        rope_style=styles.pop() if styles else "half",
    )
    indexer = LSAIndexer.from_query_weights(cfg, weights)
    indexer.signature = model_signature(model) if is_hf_model(model) else sites_signature(model, sites)
    indexer.lsa = {"chunk_size": config.chunk_size, "interval": config.interval}
    return indexer
