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
- the attention function runs a piece with no mask as two fused attentions merged by their
  log-sum-exps: the piece's queries over the history (no mask at all) and over the piece itself (the
  square causal mask every fused kernel has). Only the private ATen ops return the log-sum-exp:
  cuDNN's on CUDA (the kernel SDPA picks for a one-forward causal prefill on the H200; PyTorch's own
  flash kernel, which the bottom-right causal bias dispatches to, took 13.3 s against cuDNN's 8.1 s for
  a 128K prompt's attention: benchmarks/NOTES.md run 60), then PyTorch's flash kernel, and the CPU
  flash kernel. Each is checked once per device, dtype and head size against a small reference
  before it is used; where none passes (or on other devices) a piece runs SDPA with
  ``torch.nn.attention.bias.causal_lower_right`` (fused, no mask in memory). Everything else goes to
  transformers' SDPA function unchanged.
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


def _cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float):
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    return out[0], out[1]


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float):
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return out[0], out[1]


def _flash_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float):
    out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out[0], out[1]


_KERNELS = {"cuda": (_cudnn, _flash), "cpu": (_flash_cpu,)}
_CHOSEN: dict[tuple, object] = {}


def _passes(kernel, device: torch.device, dtype: torch.dtype, dim: int) -> bool:
    """Whether ``kernel`` runs here and returns the attention and its natural-log log-sum-exp, against
    a float32 reference on a small random problem (history part and causal part)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, dim, generator=gen).to(device, dtype) for n in (64, 192, 192))
    scale = dim**-0.5
    try:
        for causal, keys in ((False, slice(None)), (True, slice(128, None))):
            kk, vv = k[:, :, keys], v[:, :, keys]
            out, lse = kernel(q, kk, vv, causal, scale)
            scores = (q.float() @ kk.float().transpose(-1, -2)) * scale
            if causal:
                scores = scores.masked_fill(torch.ones(64, 64, dtype=torch.bool, device=device).triu(1), float("-inf"))
            want_lse = scores.logsumexp(-1)
            want = scores.softmax(-1) @ vv.float()
            lse = lse.float().reshape(want_lse.shape)
            if not (torch.allclose(lse, want_lse, atol=2e-2, rtol=0) and torch.allclose(out.float(), want, atol=3e-2, rtol=0)):
                return False
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    return True


def _kernel_for(query: torch.Tensor):
    key = (query.device, query.dtype, query.shape[-1])
    if key not in _CHOSEN:
        _CHOSEN[key] = next((kern for kern in _KERNELS.get(query.device.type, ()) if _passes(kern, *key)), None)
    return _CHOSEN[key]


def attend_piece(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor | None:
    """Attention of a piece's ``T`` queries over ``P`` history keys (all visible) and its own ``T`` keys
    (causal): ``query`` ``[B, H, T, D]``, ``key``/``value`` ``[B, Hkv, P + T, D]`` (``H`` a multiple of
    ``Hkv``: grouped queries, head ``h`` reading KV head ``h // (H / Hkv)``), computed as two fused
    attentions merged by their log-sum-exps. The history is never repeated per query head: with no
    mask, a KV head's group of query heads is one longer query block (``[B, Hkv, g * T, D]``); only the
    piece's own ``T`` keys are repeated for the causal part. None where no fused kernel with a
    log-sum-exp passes its check here (the caller then uses the causal bias)."""
    kernel = _kernel_for(query)
    if kernel is None:
        return None
    b, h, t, d = query.shape
    kv_heads = key.shape[1]
    if h % kv_heads:
        raise ValueError(f"attend_piece: {h} query heads do not share {kv_heads} KV heads evenly")
    g = h // kv_heads
    p = key.shape[2] - t
    folded = query.reshape(b, kv_heads, g * t, d)
    past, past_lse = kernel(folded, key[:, :, :p], value[:, :, :p], False, scale)
    past = past.reshape(b, h, t, d)
    own_k, own_v = key[:, :, p:], value[:, :, p:]
    if g > 1:
        own_k, own_v = own_k.repeat_interleave(g, 1), own_v.repeat_interleave(g, 1)
    own, own_lse = kernel(query, own_k, own_v, True, scale)
    past_lse = past_lse.float().reshape(query.shape[:-1])
    own_lse = own_lse.float().reshape(query.shape[:-1])
    top = torch.maximum(past_lse, own_lse)
    w_past, w_own = (past_lse - top).exp(), (own_lse - top).exp()
    total = (w_past + w_own).unsqueeze(-1)
    out = past.float() * (w_past.unsqueeze(-1) / total) + own.float() * (w_own.unsqueeze(-1) / total)
    return out.to(query.dtype)


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
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        out = None if (module.training and dropout) else attend_piece(query, key, value, scale)
        if out is None:
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
