"""``HFAdapter``: transformers causal LMs.

The decode step is traced with the model's own ``StaticCache`` (or ``DynamicCache``); the prefill
runs the model's own attention with an ``LSACache`` that hands each layer's KV to the store; decode
calls run the session's rewritten step. ``generate()`` works unchanged (it is wrapped only to learn
the final length the store must hold).

A one-token decode call whose cache is a transformers cache (``DynamicCache``, ``StaticCache``) that
already holds a prompt, such as the first, dense call of a ``torch.compile(backend="lsa")`` model
leaves, is adopted: that KV goes into a new store as a prefill's would, the dense cache is emptied,
and decoding goes on with an ``LSACache`` (returned in the output's cache field, as after a prefill).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from typing import Any

import torch

from ..config import LSAConfig
from ..hf_cache import LSACache
from ..runtime.store import StoreError
from ..passes import AttentionSite, Binding, CapturedStep, CaptureError, capture_step, locate
from ..session import DensePrefill, join_rows, model_device_dtype, split_rows
from ..tensor_parallel import TensorParallelPlan
from .piece_attention import pieced_prefill_attention

_CAPTURE_PREFILL = 2  # tokens run through the capture cache before the traced decode step
_STATIC_CAPTURE_LEN = 8  # capture-cache length: small, the rewritten graph never reads it


def is_hf_model(model: torch.nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


# Layer types (transformers' ``config.layer_types`` / ``get_layer_types_and_kwargs``) lsa-rewrite converts:
# softmax attention over the whole cache (rewritten to sparse) or over a sliding window (kept as an exact ring),
# and layers that keep no cache of their own ("dummy": no attention, or a layer that reuses another's cache,
# which the passes refuse when they find it).
_FULL_TYPES = {"full_attention", "attention", "global", "global_attention"}
_SLIDING_TYPES = {"sliding_attention", "local_attention", "reference_sliding_attention"}
_CACHELESS_TYPES = {"dummy", "moe", "mlp"}
_REFUSED_TYPES = {
    "chunked_attention": "attend within fixed chunks of the sequence (chunked attention, as in Llama 4), a mask "
    "neither the sparse kernels nor the sliding-window ring apply",
    "linear_attention": "keep a recurrent state instead of a KV cache (linear attention or state-space layers)",
    "conv": "keep a convolution state instead of a KV cache (short-convolution layers)",
    "hybrid": "run a state-space mixer beside their attention and keep its recurrent state in the cache",
    "hybrid_sliding": "run a state-space mixer beside their attention and keep its recurrent state in the cache",
    "indexed_attention": "select their keys with a learned indexer of their own (DeepSeek sparse attention)",
    "heavily_compressed_attention": "attend over compressed keys and values",
    "compressed_sparse_attention": "attend over compressed keys and values",
}


def _hf_layer_types(config: Any) -> list[tuple[str, int | None]] | None:
    """``(layer type, sliding window)`` per layer, as transformers builds its caches from the config (None
    where this transformers has no such helper)."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
    except ImportError:  # pragma: no cover - older transformers: the config fields below
        return None
    getter = getattr(config, "get_text_config", None)
    text = getter(decoder=True) if callable(getter) else config
    try:
        types, kwargs = get_layer_types_and_kwargs(text)
    except (AttributeError, TypeError, KeyError):  # pragma: no cover - a config the helper does not read
        return None
    if isinstance(kwargs, dict):
        # transformers 5.17 (the H200 image's; 5.24 gives one dict per layer): one kwargs dict for every layer (its
        # one sliding window), and the layers that share another layer's KV (Gemma3n) left off the end of the
        # list instead of typed "dummy"
        window = kwargs.get("sliding_window")
        out = [(str(t), window if str(t) in _SLIDING_TYPES else None) for t in types]
        return out + [("dummy", None)] * max(0, int(getattr(text, "num_hidden_layers", len(out))) - len(out))
    return [(str(t), kw.get("sliding_window")) for t, kw in zip(types, kwargs)]


def hf_layer_windows(config: Any) -> dict[int, int]:
    """Sliding-window layers of an HF config: ``{layer: window}`` (declarative, from the config).

    The layer types come from transformers' own reading of the config (``layer_types``, per-layer
    ``sliding_window``) where this transformers has it, else from ``layer_types`` / ``sliding_window`` /
    ``use_sliding_window``; GPT-Neo's ``attention_layers`` / ``window_size`` ("local" layers) are read too.
    A layer that is not softmax attention over a KV cache (chunked attention, linear attention, state-space
    or convolution layers, ...) raises ``ValueError`` naming it: no layer is ever converted as full
    attention when the model attends otherwise.
    """
    local = getattr(config, "attention_layers", None)
    if getattr(config, "layer_types", None) is None and isinstance(local, (list, tuple)) and "local" in local:
        window = getattr(config, "window_size", None)
        if not window:
            raise ValueError(f"{type(config).__name__} has local attention layers but no window_size; cannot tell their window")
        return {i: int(window) for i, t in enumerate(local) if t == "local"}
    layers = _hf_layer_types(config)
    if layers is None:
        return _config_windows(config)
    windows: dict[int, int] = {}
    refused: dict[str, list[int]] = {}
    for i, (kind, window) in enumerate(layers):
        if kind in _SLIDING_TYPES and window:
            windows[i] = int(window)
        elif kind not in _FULL_TYPES | _CACHELESS_TYPES and not (kind in _SLIDING_TYPES and not window):
            refused.setdefault(kind, []).append(i)
    if refused:
        kind, where = next(iter(refused.items()))
        why = _REFUSED_TYPES.get(kind, "are a kind of layer lsa-rewrite does not know")
        raise ValueError(
            f"{type(config).__name__}: layers {where} are {kind!r} layers (config.layer_types), which {why}. lsa-rewrite "
            "converts decoders whose layers are softmax attention over a KV cache (full or sliding-window), so it cannot "
            "convert this model: run it unconverted"
        )
    return windows


def _config_windows(config: Any) -> dict[int, int]:
    window = getattr(config, "sliding_window", None)
    if not window:
        return {}
    types = getattr(config, "layer_types", None)
    if types:
        return {i: int(window) for i, t in enumerate(types) if t == "sliding_attention"}
    if getattr(config, "use_sliding_window", True):
        return {i: int(window) for i in range(config.num_hidden_layers)}
    return {}


def _refuse_alibi(model: torch.nn.Module) -> None:
    """A config that says its attention adds ALiBi position biases (``alibi``, ``attn_config.alibi``,
    ``position_embedding_type="alibi"``) is refused before anything is traced: the sparse kernels add no
    bias. (The passes also refuse any non-mask term added to attention scores that they find in the graph.)"""
    config = model.config
    attn_config = getattr(config, "attn_config", None)
    flags = (
        getattr(config, "alibi", None),
        attn_config.get("alibi") if isinstance(attn_config, dict) else getattr(attn_config, "alibi", None),
        getattr(config, "position_embedding_type", None) == "alibi" or None,
    )
    if any(flag is True for flag in flags):
        raise ValueError(
            f"{type(model).__name__}'s config adds ALiBi position biases to its attention scores; the sparse kernels mask "
            "by position and add no bias, so lsa-rewrite cannot convert this model: run it unconverted (or use a variant "
            "of the model with rotary or learned position embeddings)"
        )


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
        if self.cache_kw not in params:
            raise ValueError(
                f"{type(model).__name__}.forward takes neither `cache` nor `past_key_values`; "
                "lsa-rewrite converts causal LMs that decode with a KV cache"
            )
        if "position_ids" not in params:
            raise ValueError(
                f"{type(model).__name__}.forward takes no `position_ids`: lsa-rewrite runs every decode step with the token's "
                "position as an input. Decoders without one place tokens by other means, typically ALiBi biases on the "
                "attention scores (BLOOM, MPT), which the sparse kernels do not apply; lsa-rewrite cannot convert this "
                "model: run it unconverted"
            )
        self.num_layers = int(model.config.num_hidden_layers)
        _refuse_alibi(model)
        self.windows = hf_layer_windows(model.config)
        self.output_type: type | None = None  # the model's output class, learnt at the first prefill
        self.cache_field: str = self.cache_kw  # the output field that carries the cache
        self.dense_prefill: DensePrefill | None = None  # a first call that runs the model's own code (backend)
        # DTensor weights (transformers' tp_plan): checked here, before anything is converted; the step is
        # traced on the rank's local view (tensor_parallel.py)
        self.tp: TensorParallelPlan | None = TensorParallelPlan.from_model(model)

    # -- tracing ------------------------------------------------------------------------------
    def capture(self, batch: int) -> CapturedStep:
        if self.tp is None:
            return self._capture(batch)
        with self.tp.local_view(self.model):
            return self._capture(batch)

    def _capture(self, batch: int) -> CapturedStep:
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
        try:
            with torch.no_grad():
                forward(input_ids=warm, position_ids=warm_pos, use_cache=True, **{self.cache_kw: cache})
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # the model's own code, before any tracing: say what was run
            other = "dynamic" if self.config.capture_cache == "static" else "static"
            raise CaptureError(
                f"{type(model).__name__}'s own forward failed on a {_CAPTURE_PREFILL}-token prompt with a {type(cache).__name__} "
                f"(what lsa-rewrite fills before tracing one decode step): {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}. Try LSAConfig(capture_cache={other!r}); if that fails too, "
                "this model does not decode with a transformers KV cache as lsa-rewrite needs"
            ) from exc
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

        try:
            return capture_step(step, (ids, pos), input_names=self.input_names, model=model, cache_tensors=cache_tensors)
        except CaptureError as exc:
            if self.config.capture_cache != "static":
                raise
            # Some models cannot be traced over a StaticCache (positions read back from a mask, a length that
            # becomes data-dependent) but can over a DynamicCache: say so.
            raise CaptureError(f"{exc}. It was traced with a StaticCache: try LSAConfig(capture_cache='dynamic')") from exc

    def trace(self) -> tuple[CapturedStep, list[AttentionSite]]:
        """Capture one decode step (batch 1) and locate its attention sites (the graph is not changed)."""
        step = self.capture(1)
        sites = locate(step, layer_windows=self.windows)
        if self.tp is not None:
            self.tp.check_heads(sites, self.model.config)
        return step, sites

    def default_capacity(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 0)

    # -- running ------------------------------------------------------------------------------
    def install(self, session) -> None:
        """Wrap ``forward`` (prefill into the store, then the rewritten step) and ``generate`` (final length)."""
        model = self.model
        original = model.forward
        signature = inspect.signature(original)
        original_generate = model.generate

        # Dynamo must not trace the wrapper (host-side bookkeeping) when the model runs under
        # torch.compile: the decode step it runs is already a compiled graph.
        @torch._dynamo.disable
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
        if cache is not None and not isinstance(cache, LSACache) and int(cache.get_seq_length()) > 0:
            if input_ids.shape[1] != 1:
                raise ValueError(
                    f"a converted model keeps its KV in the LSA store; got a {type(cache).__name__} that already holds tokens "
                    f"with {input_ids.shape[1]} new ones. It adopts such a cache only at a one-token decode call right after "
                    "the dense prefill that filled it; otherwise start without a cache (generate() makes its own)"
                )
            cache = self.adopt(session, kwargs, cache)
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
        self._drop_dense_prefill()  # a converted prefill supersedes a dense one that was never adopted
        batch, length = input_ids.shape
        valid_start = left_padding(kwargs.get("attention_mask"), batch, length)
        previous = session.store
        store = session.start_prefill(batch, prompt_len=length, valid_start=valid_start)
        lsa_cache = LSACache(store, self.num_layers)
        out = self._prefill(session, original, kwargs, lsa_cache, previous, length)
        self.output_type = type(out)
        self.cache_field = next((k for k, v in out.items() if v is lsa_cache), self.cache_kw)
        out[self.cache_field] = lsa_cache
        return out


    # -- a dense prefill (torch.compile backend) ----------------------------------------------
    def expect_dense_prefill(self, args: tuple, kwargs: dict, *, capacity: int | None = None) -> None:
        """The model's own code is about to prefill ``model(*args, **kwargs)`` (the backend's first call):
        keep its last token for the probe and the length ``generate()`` will reach, for the adoption."""
        try:
            bound = inspect.signature(self.forward).bind(*args, **kwargs).arguments
        except TypeError:
            bound = {}
        ids, pos = bound.get("input_ids"), bound.get("position_ids")
        last = None
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            last = {"input_ids": ids[:, -1:]}
            if isinstance(pos, torch.Tensor) and pos.dim() == 2 and pos.shape == ids.shape:
                last["position_ids"] = pos[:, -1:]
        self.dense_prefill = DensePrefill(length=ids.shape[1] if last else None, last_token=last, capacity=capacity)

    def _drop_dense_prefill(self) -> None:
        pending, self.dense_prefill = self.dense_prefill, None
        if pending is not None:
            pending.done()

    def adopt(self, session, kwargs: dict, cache) -> LSACache:
        """Move the prompt a transformers cache holds (a dense prefill's) into a new store; returns its ``LSACache``.

        As a prefill into the store would: the store is sized by ``start_prefill``, takes every
        layer's KV, places the first resident set and probes with the last prompt token (when the
        dense prefill ran through ``torch.compile(backend="lsa")``, which keeps it). The dense cache
        is emptied. Checked before anything changes: a refused cache is left as it was.
        """
        input_ids = kwargs["input_ids"]
        batch = input_ids.shape[0]
        length = int(cache.get_seq_length())
        layers = self._dense_layers(session, cache, batch, length)
        valid_start = self._held_padding(kwargs.get("attention_mask"), batch, length)
        pending = self.dense_prefill or DensePrefill()
        previous, pending_capacity = session.store, session.pending_capacity
        session.pending_capacity = pending_capacity or pending.capacity
        try:
            store = session.start_prefill(batch, prompt_len=length, valid_start=valid_start)
        finally:
            session.pending_capacity = pending_capacity
        try:
            with torch.no_grad():
                for i, (layer, held) in enumerate(layers):
                    k, v = layer.keys[..., :held, :], layer.values[..., :held, :]
                    if held < length:  # a sliding-window layer keeps only its last tokens; earlier ones are never read
                        pad = (0, 0, length - held, 0)
                        k, v = torch.nn.functional.pad(k, pad), torch.nn.functional.pad(v, pad)
                    store.ingest(i, k, v)
                last = pending.probe_inputs(length)
                if last is not None and "position_ids" not in last:
                    last = {**last, "position_ids": (length - 1 - store.valid_start).view(-1, 1)}
                session.finish_prefill(store, length, last)
        except BaseException:
            session.abort_prefill(store, previous)
            raise
        self._drop_dense_prefill()
        for layer, _ in layers:  # the dense KV now lives in the store
            layer.keys = layer.values = None
            layer.is_initialized = False
            layer.reset()
        if self.output_type is None:
            self.output_type, self.cache_field = _output_type(type(self.model), self.cache_kw)
        return LSACache(store, self.num_layers)

    def _held_padding(self, mask: Any, batch: int, length: int) -> list[int]:
        """Left padding of the ``length`` held tokens, read from a decode call's ``attention_mask``: 2D
        (``[B, length + 1]``, as ``generate()`` passes it), or the 4D mask (or ``{attention type: mask}``)
        that ``generate()`` builds for a ``StaticCache`` (its last query row: True or 0 where attended)."""
        if isinstance(mask, dict):
            mask = mask.get("full_attention")
        elif isinstance(mask, torch.Tensor) and mask.dim() == 4 and len(self.windows) == self.num_layers and length >= min(self.windows.values()):
            mask = None  # a sliding-window mask: its first attended key is the window's, not the padding's
        else:
            mask = mask if mask is not None else torch.ones(batch, length, dtype=torch.long)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return left_padding(mask[:, :length] if mask.shape[-1] == length + 1 else mask, batch, length)
        if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[0] == batch and mask.shape[-1] >= length:
            row = mask[:, 0, -1, :length]
            return left_padding((row if row.dtype == torch.bool else row == 0).long(), batch, length)
        raise ValueError(
            f"cannot adopt this cache: the left padding of its {length} tokens cannot be read from this attention_mask; "
            "pass a 2D attention_mask [batch, held + new tokens], or generate() with the default DynamicCache"
        )

    def _dense_layers(self, session, cache, batch: int, length: int) -> list[tuple[Any, int]]:
        """``(layer, tokens it holds)`` for every layer of a dense cache, checked against the model."""
        from transformers.cache_utils import CacheLayerMixin

        layers = list(getattr(cache, "layers", None) or [])
        if len(layers) != self.num_layers or not all(isinstance(layer, CacheLayerMixin) for layer in layers):
            raise ValueError(
                f"cannot adopt this {type(cache).__name__}: it has {len(layers)} attention cache layers for a model of "
                f"{self.num_layers} layers; pass the cache the model's own prefill filled, or start without one"
            )
        sites = {s.layer: s for s in session.sites}
        out = []
        for i, layer in enumerate(layers):
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor) or keys.dim() != 4:
                raise ValueError(f"cannot adopt this {type(cache).__name__}: its layer {i} holds no KV tensors")
            held = min(length, keys.shape[-2])
            window = self.windows.get(i)
            needed = length if window is None else min(length, window - 1)
            site = sites.get(i)
            expected = (batch, site.kv_heads, site.head_dim) if site is not None else (batch, keys.shape[1], keys.shape[-1])
            found = (keys.shape[0], keys.shape[1], keys.shape[-1])
            if held < needed or found != expected or values.shape != keys.shape:
                raise ValueError(
                    f"cannot adopt this {type(cache).__name__}: layer {i} holds {held} of the {length} tokens as "
                    f"[batch, kv heads, head dim] = {list(found)}, the model needs {needed} as {list(expected)}; "
                    "it was not filled by this model's prefill of this batch"
                )
            out.append((layer, held))
        return out

    def _prefill(self, session, original, kwargs: dict, lsa_cache: LSACache, previous, length: int, *, history=None):
        """Run the model's own forward with ``lsa_cache`` (its layers hand their KV to the new store), then
        the session's prefill bookkeeping (first resident set, probe) for ``length`` held tokens. A failed
        forward drops the new store and gives ``previous`` back.

        With ``LSAConfig.prefill_batch`` below the batch, the forward runs once per piece of rows, each
        with its own ``LSACache`` of those rows (``history``: a later turn's previous store), and the
        pieces' outputs are joined into the batch's (their cache field is ``lsa_cache``)."""
        store = lsa_cache.store
        batch = store.batch
        kwargs["use_cache"] = True
        try:
            with torch.no_grad(), session.prefill_taps(batch) as taps:
                parts = []
                size = session.config.prefill_chunk
                for rows in session.prefill_pieces(batch):
                    taps.rows = rows
                    whole = rows.stop - rows.start == batch
                    piece = dict(kwargs) if whole else {k: split_rows(v, rows, batch) for k, v in kwargs.items()}
                    if size is not None and history is None and length > size:
                        out = self._prefill_in_pieces(original, piece, store, None if whole else rows, length, size)
                    else:
                        cache = lsa_cache if whole else LSACache(store, self.num_layers, history=history, rows=rows)
                        piece[self.cache_kw] = cache
                        out = original(**piece)
                    for key in [k for k, v in out.items() if isinstance(v, LSACache)]:
                        out[key] = lsa_cache
                    parts.append(out)
                    del piece, out
                out = join_rows(parts)
                del parts
        except BaseException:
            session.abort_prefill(store, previous)
            raise
        input_ids, position_ids = kwargs["input_ids"], kwargs.get("position_ids")
        if position_ids is None:
            position_ids = (length - 1 - store.valid_start).view(-1, 1)
        session.finish_prefill(store, length, {"input_ids": input_ids[:, -1:], "position_ids": position_ids[:, -1:]}, taps)
        return out

    def _prefill_in_pieces(self, original, kwargs: dict, store, rows: slice | None, length: int, size: int):
        """One prefill forward per ``size`` tokens of the prompt (``LSAConfig.prefill_chunk``), in order:
        each piece's layers put its KV into the store and attend over the earlier pieces read back from
        it (``LSACache(piece=...)``). The output is the last piece's, with the logits the caller asked
        for (``logits_to_keep``: the last ones come from the last piece; 0 or absent: every piece's,
        joined). The pieces run the model's SDPA attention without a materialised mask
        (``piece_attention.py``)."""
        takes_keep = "logits_to_keep" in inspect.signature(original).parameters
        keep = kwargs.get("logits_to_keep", 0) if takes_keep else 0
        last_start = (length - 1) // size * size
        every = not (isinstance(keep, int) and 0 < keep <= length - last_start)  # all positions' logits, joined
        logits: list[torch.Tensor] = []
        with pieced_prefill_attention(self.model.config):
            out = self._run_pieces(original, kwargs, store, rows, length, size, every, keep, takes_keep, logits)
        if every:
            joined = torch.cat(logits, dim=1)
            del logits
            if isinstance(keep, int) and keep > 0:
                joined = joined[:, -keep:]
            elif isinstance(keep, torch.Tensor):
                joined = joined[:, keep]
            out["logits"] = joined
        return out

    def _run_pieces(self, original, kwargs: dict, store, rows, length: int, size: int, every: bool, keep, takes_keep: bool, logits: list):
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        position_ids, cache_position = kwargs.get("position_ids"), kwargs.get("cache_position")
        out = None
        for start in range(0, length, size):
            end = min(start + size, length)
            piece = dict(kwargs)
            piece["input_ids"] = ids[:, start:end]
            if isinstance(mask, torch.Tensor):
                piece["attention_mask"] = mask[:, :end]
            if isinstance(position_ids, torch.Tensor):
                piece["position_ids"] = position_ids[:, start:end]
            if isinstance(cache_position, torch.Tensor):
                piece["cache_position"] = cache_position[start:end]
            if takes_keep:
                piece["logits_to_keep"] = 0 if every else (keep if end == length else 1)
            piece[self.cache_kw] = LSACache(store, self.num_layers, rows=rows, piece=(start, length))
            del out
            out = original(**piece)
            if every:
                logits.append(out.logits)
            del piece
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
        out = self._prefill(session, original, kwargs, extension, previous, total, history=old)
        old.abandon("the conversation went on in a newer store (the cache now points at it)")
        cache.rebind(store)
        self.output_type = type(out)
        field = next((k for k, v in out.items() if v is extension), self.cache_field)
        out[field] = cache
        return out


def _output_type(model_class: type, cache_kw: str) -> tuple[type, str]:
    """The output class ``model_class.forward`` declares and its cache field (before any converted prefill ran)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    try:
        declared = typing.get_type_hints(model_class.forward).get("return")
    except Exception:  # unresolvable annotations: fall back to the common class
        declared = None
    options = [declared, *typing.get_args(declared)]
    output = next((t for t in options if isinstance(t, type) and dataclasses.is_dataclass(t) and "logits" in {f.name for f in dataclasses.fields(t)}), CausalLMOutputWithPast)
    names = {f.name for f in dataclasses.fields(output)}
    field = next((n for n in (cache_kw, "cache", "past_key_values") if n in names), cache_kw)
    return output, field


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
