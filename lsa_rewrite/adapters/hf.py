"""``HFAdapter``: transformers causal LMs.

The decode step is traced with the model's own ``StaticCache`` (or ``DynamicCache``); the prefill
runs the model's own attention with an ``LSACache`` that hands each layer's KV to the store; decode
calls run the session's rewritten step. ``generate()`` works unchanged (it is wrapped only to learn
the final length the store must hold).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from ..config import LSAConfig
from ..hf_cache import LSACache
from ..runtime.store import StoreError
from ..passes import AttentionSite, Binding, CapturedStep, capture_step, locate
from ..session import model_device_dtype

_CAPTURE_PREFILL = 2  # tokens run through the capture cache before the traced decode step
_STATIC_CAPTURE_LEN = 8  # capture-cache length: small, the rewritten graph never reads it


def is_hf_model(model: torch.nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def hf_layer_windows(config: Any) -> dict[int, int]:
    """Sliding-window layers of an HF config: ``{layer: window}`` (declarative, from the config)."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return {}
    types = getattr(config, "layer_types", None)
    if types:
        return {i: int(window) for i, t in enumerate(types) if t == "sliding_attention"}
    if getattr(config, "use_sliding_window", True):
        return {i: int(window) for i in range(config.num_hidden_layers)}
    return {}


def left_padding(mask: torch.Tensor | None, batch: int, length: int) -> list[int]:
    """First real position of each row of a left-padded ``attention_mask`` ``[B, T]``."""
    if mask is None:
        return [0] * batch
    if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] != length:
        raise ValueError(f"attention_mask must be [batch, prompt length] = [{batch}, {length}] at prefill, got {tuple(mask.shape)}")
    mask = mask.to("cpu", torch.long)
    starts = []
    for row in mask:
        ones = torch.nonzero(row).flatten()
        start = int(ones[0]) if len(ones) else length
        if start >= length or not bool(row[start:].all()):
            raise ValueError("attention_mask must be left padding (zeros, then ones) with at least one token per row; pad on the left")
        starts.append(start)
    return starts


class HFAdapter:
    """How to trace, prefill and call a transformers causal LM."""

    input_names = ("input_ids", "position_ids")

    def __init__(self, model: torch.nn.Module, config: LSAConfig):
        self.model, self.config = model, config
        self.forward = model.forward  # the model's own forward, also after install() wraps it
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        if self.cache_kw not in params or "position_ids" not in params:
            raise ValueError(
                f"{type(model).__name__}.forward takes neither `cache` nor `past_key_values` with `position_ids`; "
                "lsa-rewrite converts causal LMs that decode with a KV cache"
            )
        self.num_layers = int(model.config.num_hidden_layers)
        self.windows = hf_layer_windows(model.config)
        self.output_type: type | None = None  # the model's output class, learnt at the first prefill
        self.cache_field: str = self.cache_kw  # the output field that carries the cache

    # -- tracing ------------------------------------------------------------------------------
    def capture(self, batch: int) -> CapturedStep:
        from transformers import DynamicCache, StaticCache

        model = self.model
        device, _ = model_device_dtype(model)
        if self.config.capture_cache == "static":
            cache = StaticCache(config=model.config, max_cache_len=_STATIC_CAPTURE_LEN)
        else:
            cache = DynamicCache(config=model.config)
        warm = torch.zeros(batch, _CAPTURE_PREFILL, dtype=torch.long, device=device)
        warm_pos = torch.arange(_CAPTURE_PREFILL, device=device).expand(batch, -1)
        forward = self.forward
        with torch.no_grad():
            forward(input_ids=warm, position_ids=warm_pos, use_cache=True, **{self.cache_kw: cache})
        cache_tensors: dict[int, Binding] = {}
        for i, layer in enumerate(cache.layers):
            for attr, value in vars(layer).items():
                if isinstance(value, torch.Tensor):
                    kind = "cache" if attr in ("keys", "values") else "cache_state"
                    cache_tensors[id(value)] = Binding(kind, attr, i)
        ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        pos = torch.full((batch, 1), _CAPTURE_PREFILL, dtype=torch.long, device=device)
        kw = self.cache_kw

        def step(input_ids, position_ids):
            return forward(input_ids=input_ids, position_ids=position_ids, use_cache=True, **{kw: cache}).logits

        return capture_step(step, (ids, pos), input_names=self.input_names, model=model, cache_tensors=cache_tensors)

    def trace(self) -> tuple[CapturedStep, list[AttentionSite]]:
        """Capture one decode step (batch 1) and locate its attention sites (the graph is not changed)."""
        step = self.capture(1)
        return step, locate(step, layer_windows=self.windows)

    def default_capacity(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 0)

    # -- running ------------------------------------------------------------------------------
    def install(self, session) -> None:
        """Wrap ``forward`` (prefill into the store, then the rewritten step) and ``generate`` (final length)."""
        model = self.model
        original = model.forward
        signature = inspect.signature(original)
        original_generate = model.generate

        @functools.wraps(original)
        def forward(*args, **kwargs):
            return self.call(session, original, signature, *args, **kwargs)

        @functools.wraps(original_generate)
        def generate(*args, **kwargs):
            _check_generation(model, kwargs)
            session.pending_capacity = _generation_length(model, args, kwargs)
            try:
                return original_generate(*args, **kwargs)
            finally:
                session.pending_capacity = None

        model.generate = generate
        model.forward = forward

    def call(self, session, original, signature: inspect.Signature, *args, **kwargs):
        names = [p for p in signature.parameters if signature.parameters[p].kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        kwargs.update(dict(zip(names, args)))
        cache = kwargs.get(self.cache_kw)
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError("a converted model needs input_ids (inputs_embeds is not supported)")
        if kwargs.get("labels") is not None:
            raise ValueError("a converted model serves decoding; compute losses on the original model")
        if kwargs.get("use_cache") is False:
            raise ValueError("a converted model always decodes from its KV store; call it without use_cache=False")
        if isinstance(cache, LSACache) and cache.store.length:
            store = cache.store
            if input_ids.shape[0] != store.batch:
                raise ValueError(f"this cache holds a batch of {store.batch} sequences; got input_ids for a batch of {input_ids.shape[0]}")
            if input_ids.shape[1] != 1:
                return self.continue_prefill(session, original, kwargs, cache)
            position_ids = kwargs.get("position_ids")
            if position_ids is None:
                position_ids = (store.length - store.valid_start).view(-1, 1)
            logits = session.decode({"input_ids": input_ids, "position_ids": position_ids[:, -1:]}, store)
            return self.output_type(logits=logits, **{self.cache_field: cache})
        if cache is not None and not isinstance(cache, LSACache) and cache.get_seq_length() > 0:
            raise ValueError(f"a converted model keeps its KV in the LSA store; got a {type(cache).__name__} that already holds tokens")
        batch, length = input_ids.shape
        valid_start = left_padding(kwargs.get("attention_mask"), batch, length)
        previous = session.store
        store = session.start_prefill(batch, prompt_len=length, valid_start=valid_start)
        lsa_cache = LSACache(store, self.num_layers)
        kwargs[self.cache_kw] = lsa_cache
        kwargs["use_cache"] = True
        try:
            with torch.no_grad():
                out = original(**kwargs)
        except BaseException:
            session.abort_prefill(store, previous)
            raise
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = (length - 1 - store.valid_start).view(-1, 1)
        session.finish_prefill(store, length, {"input_ids": input_ids[:, -1:], "position_ids": position_ids[:, -1:]})
        self.output_type = type(out)
        self.cache_field = next((k for k, v in out.items() if v is lsa_cache), self.cache_kw)
        out[self.cache_field] = lsa_cache
        return out


    def continue_prefill(self, session, original, kwargs: dict, cache: LSACache):
        """A later turn: prefill only the new tokens, attending exactly to the whole history (``hf_cache``).

        The conversation moves to a new store sized for it (``max_new_tokens`` of this ``generate()``
        included); ``cache`` is pointed at it, and the previous store is retired once this prefill is
        done. A failed prefill leaves the previous store and ``cache`` as they were.
        """
        old = cache.store
        if old.retired:
            raise StoreError(f"this cache can no longer be continued: {old.retired}")
        input_ids = kwargs["input_ids"]
        batch, new = input_ids.shape
        total = old.length + new
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2 or tuple(mask.shape) != (batch, total):
                raise ValueError(
                    f"attention_mask must cover the whole conversation, [batch, held + new tokens] = [{batch}, {total}], "
                    f"got {tuple(mask.shape)}"
                )
            if left_padding(mask, batch, total) != old.valid_start_host:
                raise ValueError("attention_mask of a later turn must keep the first turn's left padding, with ones for every new token")
        previous = session.store
        store = session.start_prefill(batch, prompt_len=total, valid_start=old.valid_start_host, share_mirror=False)
        extension = LSACache(store, self.num_layers, history=old)
        kwargs[self.cache_kw] = extension
        kwargs["use_cache"] = True
        try:
            with torch.no_grad():
                out = original(**kwargs)
        except BaseException:
            session.abort_prefill(store, previous)
            raise
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = (total - 1 - store.valid_start).view(-1, 1)
        session.finish_prefill(store, total, {"input_ids": input_ids[:, -1:], "position_ids": position_ids[:, -1:]})
        old.abandon("the conversation went on in a newer store (the cache now points at it)")
        cache.rebind(store)
        self.output_type = type(out)
        field = next((k for k, v in out.items() if v is extension), self.cache_field)
        out[field] = cache
        return out


def _check_generation(model, kwargs) -> None:
    """Refuse, before any prefill, what a converted model cannot generate with."""
    gen = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams", getattr(gen, "num_beams", 1)) or 1
    if int(beams) > 1:
        raise ValueError(f"beam search (num_beams={beams}) is not supported by lsa-rewrite: each sequence keeps its own resident set; use greedy or sampling")
    if kwargs.get("use_cache", getattr(gen, "use_cache", True)) is False:
        raise ValueError("use_cache=False: a converted model always decodes from its KV store; leave use_cache on")


def _generation_length(model, args, kwargs) -> int | None:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        return None
    gen = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    max_new = kwargs.get("max_new_tokens", getattr(gen, "max_new_tokens", None))
    if max_new is not None:
        return ids.shape[1] + int(max_new)
    max_length = kwargs.get("max_length", getattr(gen, "max_length", None))
    return int(max_length) if max_length else None
