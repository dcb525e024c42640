"""Attention for one piece of a pieced prefill (``LSAConfig.prefill_chunk``) without a materialised mask.

A piece of ``T`` prompt tokens attends to the ``P`` tokens before it and causally to itself: the
causal mask aligned to the bottom right of a ``[T, P + T]`` score matrix. transformers' SDPA path
cannot skip that mask (its ``is_causal`` shortcut is top-left aligned, so it applies only when the
query and key lengths match) and materialises it: ``T x (P + T)`` booleans per piece, 64 GiB for a
64K piece at the end of a million-token prompt, and an explicit mask keeps SDPA off its fused
kernels. During a pieced prefill the HF adapter switches a model that uses ``"sdpa"`` to the
attention registered here, for the prefill's forwards only:

- the mask function returns no mask exactly where the mask would be plain bottom-right causal (the
  model's causal mask function, no padding); anything else (sliding windows, padding, packed
  sequences) gets transformers' own SDPA mask;
- the attention function runs a piece with no mask through SDPA with
  ``torch.nn.attention.bias.causal_lower_right`` (a fused kernel, no mask in memory); everything else
  goes to transformers' SDPA function unchanged.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

PIECE_SDPA = "lsa_piece_sdpa"
_registered = False


def _sdpa(*args, **kwargs) -> torch.Tensor:
    """The SDPA call of a mask-free piece (one name, so a test can watch it)."""
    return F.scaled_dot_product_attention(*args, **kwargs)


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, causal_mask_function

    sdpa_mask = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]

    def piece_mask(*args, **kwargs):
        attention_mask = kwargs.get("attention_mask")
        plain = (
            not args
            and kwargs.get("mask_function") is causal_mask_function
            and kwargs.get("local_size") is None
            and (attention_mask is None or bool(attention_mask.all()))
        )
        return None if plain else sdpa_mask(*args, **kwargs)

    def piece_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        q_len, kv_len = query.shape[2], key.shape[2]
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if attention_mask is not None or q_len == 1 or q_len == kv_len or not causal or kv_len < q_len:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
        from torch.nn.attention.bias import causal_lower_right

        groups = query.shape[1] // key.shape[1]
        if groups > 1:
            key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        out = _sdpa(
            query, key, value, attn_mask=causal_lower_right(q_len, kv_len), dropout_p=dropout if module.training else 0.0, scale=scaling
        )
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(PIECE_SDPA, piece_attention)
    AttentionMaskInterface.register(PIECE_SDPA, piece_mask)
    _registered = True


def _sdpa_configs(config, seen: set[int] | None = None) -> list:
    """``config`` and its sub-configs (recursively) whose attention implementation is ``"sdpa"``."""
    seen = set() if seen is None else seen
    if config is None or id(config) in seen:
        return []
    seen.add(id(config))
    found = [config] if getattr(config, "_attn_implementation", None) == "sdpa" else []
    for key in getattr(config, "sub_configs", {}) or {}:
        found += _sdpa_configs(getattr(config, key, None), seen)
    return found


def _set(config, value: str) -> None:
    # the internal field: the public setter also rewrites every sub-config, whatever it used
    if hasattr(config, "_attn_implementation_internal"):
        config._attn_implementation_internal = value
    else:  # pragma: no cover - older transformers
        config._attn_implementation = value


@contextlib.contextmanager
def pieced_prefill_attention(config):
    """While active, every part of the model whose config uses ``"sdpa"`` attention runs the
    pieced-prefill attention above (other implementations are left alone); restored on exit, errors
    included."""
    configs = _sdpa_configs(config)
    if configs:
        _register()
    for c in configs:
        _set(c, PIECE_SDPA)
    try:
        yield
    finally:
        for c in configs:
            _set(c, "sdpa")
