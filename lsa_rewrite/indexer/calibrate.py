"""Calibration: teacher-forced dense passes that record the indexer's inputs and targets (docs/indexer.md).

``calibrate(model, tokenizer, out_dir)`` runs an HF causal LM (transformers 5.x), or a plain decoder
(``model(input_ids, input_pos)`` with module-buffer caches), over long documents, one document per forward
pass (``torch.no_grad``; an HF model at batch 1 without a cache, a plain decoder with the document in every
row of the batch its caches were set up for). At sampled window starts ``t``
(at least two chunks in; multiples of the chunk size, except the last window of each document, which
ends at the document's end, and, for a task, windows at the start of its reply, see ``window_starts``)
it records:

- per target layer, the input of the query projection at ``t - 1`` (a forward pre-hook on ``q_proj``,
  on the fused ``qkv_proj`` of Phi-3 or ``query_key_value`` of GPT-NeoX and Falcon, or on GPT-2's
  ``c_attn``) and the post-rotary query there; and the rotary ``cos``/``sin`` the model multiplies its
  queries by at ``t - 1``, as the converted decode step applies them (``_GraphRotary``: the traced step's
  own ops run for that position; rotate-half or interleaved, whole or partial heads; none for GPT-2);
- per target layer, the key bounds ``kmin``/``kmax`` of the ``ceil(t / chunk)`` chunks before ``t``
  (elementwise min/max of the post-rotary keys over each chunk's tokens before ``t``, per KV head: what
  the runtime store's chunk index holds);
- per sparsely attended layer, the attention mass the queries of ``[t, t + interval)`` put on each of
  those chunks, and from it the golden label (``golden_labels``).

Post-rotary queries, keys and the real attention come from transformers' attention-function registry:
for the duration of the run the model's attention implementation is switched to a registered function
that computes the model's own attention (the implementation it had, with the mask that implementation
gets) and, for the sampled window rows only, the softmax over keys (module scaling, softcap, causal
mask, GQA, attention sinks). Attention modules that do not go through the registry but call
``torch.nn.functional.scaled_dot_product_attention`` themselves (Falcon) are recorded from that call
instead: when the first document leaves layers unrecorded, the model is switched to its ``"sdpa"``
implementation where it has one and each attention module's SDPA call is intercepted (``_CallRecording``);
a model without one (GPT-Neo, or a Falcon loaded eager) is recorded from the softmax over its ``q @ k^T``
scores, the probabilities themselves. The original implementation is restored afterwards, also on errors.

The dump is written with ``DumpWriter`` (``dump.py``): an interrupted run resumes, skipping the
documents already written.

Not here: the documents themselves (``documents.py``), the dump format (``dump.py``), training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
import os
import random
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..config import LSAConfig
from .documents import Document, Task, default_documents, load_documents
from .dump import MANIFEST, DumpWriter, golden_labels, label_rule, rule_name, selectable_chunks

log = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "lsa_calibrate"  # the name the recording attention function is registered under
QUERY_PROJECTIONS = ("q_proj", "qkv_proj", "c_attn", "query_key_value")  # separate, fused (Phi-3), GPT-2 Conv1D, fused (GPT-NeoX, Falcon)
DEFAULT_TARGET_COUNT = 3

_ACTIVE: "_Recorder | None" = None  # the recorder the registered attention function reports to


# ---------------------------------------------------------------- model facts


def _text_config(model: nn.Module) -> Any:
    config = model.config
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _sliding_layers(config: Any) -> dict[int, int]:
    from ..adapters.hf import hf_layer_windows

    return hf_layer_windows(config)


def _num_layers(config: Any) -> int:
    for name in ("num_hidden_layers", "n_layer"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"{type(config).__name__} has no num_hidden_layers: not a decoder config lsa-rewrite knows")


def sparse_layers(model: nn.Module) -> list[int]:
    """Layers that attend over the whole history (not sliding-window): those the indexer serves.

    Example::

        >>> sparse_layers(gemma3_270m)
        [5, 11, 17]
    """
    config = _text_config(model)
    windows = _sliding_layers(config)
    return [layer for layer in range(_num_layers(config)) if layer not in windows]


def default_target_layers(sparse: Sequence[int], count: int = DEFAULT_TARGET_COUNT) -> list[int]:
    """``count`` sparsely attended layers spread over the depth (at the quartiles for 3); all when fewer.

    Example::

        >>> default_target_layers(list(range(30)))
        [7, 15, 22]
    """
    sparse = sorted(sparse)
    if len(sparse) <= count:
        return sparse
    picks = [sparse[math.floor((i + 1) * (len(sparse) - 1) / (count + 1) + 0.5)] for i in range(count)]
    return sorted(set(picks))


def _shape(model: nn.Module) -> dict[str, int]:
    config = _text_config(model)
    hidden = int(getattr(config, "hidden_size", None) or config.n_embd)
    q_heads = int(getattr(config, "num_attention_heads", None) or config.n_head)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or q_heads)
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        kv_heads = 1  # multi-query attention whatever the head counts say (Falcon's first layout)
    head_dim = getattr(config, "head_dim", None) or hidden // q_heads
    return {"hidden": hidden, "q_heads": q_heads, "kv_heads": kv_heads, "head_dim": int(head_dim)}


def model_signature(model: nn.Module) -> dict[str, Any]:
    """What an indexer trained on this model's dump must match (docs/indexer.md, the dump manifest).

    An HF model's from its config; a plain decoder's (no config) from its traced decode step
    (``sites_signature``).

    Example::

        >>> model_signature(model)["sparse_layers"][:3]
        [0, 1, 2]
    """
    from ..adapters import is_hf_model, make_adapter

    if not is_hf_model(model):
        _, sites = make_adapter(model, LSAConfig()).trace()
        return sites_signature(model, sites)
    config = _text_config(model)
    shape = _shape(model)
    return {
        "class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "num_layers": _num_layers(config),
        "hidden_size": shape["hidden"],
        "q_heads": shape["q_heads"],
        "kv_heads": shape["kv_heads"],
        "head_dim": shape["head_dim"],
        "sparse_layers": sparse_layers(model),
        "vocab_size": int(getattr(config, "vocab_size", 0) or 0),
    }


def sites_signature(model: nn.Module, sites: Sequence[Any]) -> dict[str, Any]:
    """A plain decoder's model signature, from the attention sites of its traced decode step: its class, layer
    count, the head shape of its sparsely attended layers and which layers those are (``model_type`` None; no
    hidden or vocabulary size: the taps check the hidden size at ``convert``).

    Example::

        >>> sites_signature(decoder, make_adapter(decoder, LSAConfig()).trace()[1])["sparse_layers"]
        [0, 1]
    """
    sparse = [site.layer for site in sites if site.action == "rewrite"]
    ref = next((site for site in sites if site.action == "rewrite"), sites[0])
    return {
        "class": type(model).__name__,
        "model_type": None,
        "num_layers": len(sites),
        "q_heads": int(ref.q_heads),
        "kv_heads": int(ref.kv_heads),
        "head_dim": int(ref.head_dim),
        "sparse_layers": sparse,
    }


def _max_positions(model: nn.Module) -> int | None:
    config = _text_config(model)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of each layer, in layer order (a module holding a query projection)."""
    found = []
    for name, module in model.named_modules():
        if getattr(module, "is_cross_attention", False):
            continue
        if any(isinstance(getattr(module, attr, None), nn.Module) for attr in QUERY_PROJECTIONS):
            found.append((name, module))
    layers = _num_layers(_text_config(model))
    if len(found) != layers:
        raise ValueError(
            f"found {len(found)} attention modules with a query projection ({'/'.join(QUERY_PROJECTIONS)}) in "
            f"{type(model).__name__}, expected one per layer ({layers}); calibration supports decoders whose "
            "attention modules name their query projection like the HF Llama, Phi-3 or GPT-2 families"
        )
    indexed = [getattr(module, "layer_idx", None) for _, module in found]
    if all(isinstance(i, int) for i in indexed) and sorted(indexed) == list(range(layers)):
        found.sort(key=lambda item: item[1].layer_idx)
    return [module for _, module in found]


def _query_projection(module: nn.Module) -> nn.Module:
    for attr in QUERY_PROJECTIONS:
        proj = getattr(module, attr, None)
        if isinstance(proj, nn.Module):
            return proj
    raise AssertionError("unreachable: _attention_modules keeps only modules with a query projection")


# ---------------------------------------------------------------- recording


def window_masses(
    query: Tensor, key: Tensor, starts: Sequence[int], *, chunk: int, interval: int, scaling: float,
    softcap: float | None = None, sinks: Tensor | None = None,
) -> list[Tensor]:
    """Attention mass of each window's queries on the chunks before it.

    ``query`` [Hq, S, D], ``key`` [Hkv, S, D] (post-rotary, one sequence from position 0); for each start
    ``t``: the causal softmax of rows ``[t, t + interval)`` over keys ``[0, t + interval)``, summed over
    heads and rows, per chunk ``c < ceil(t / chunk)`` (over its keys before ``t``), divided by
    ``Hq * rows``: a float32 ``[ceil(t / chunk)]``. A window that runs past the sequence's end (an
    answer window near a document's end) has fewer rows, ``S - t``.

    Example::

        >>> window_masses(q, k, [128], chunk=64, interval=64, scaling=0.125)[0].shape
        torch.Size([2])
    """
    hq, length, d = query.shape
    hkv = key.shape[0]
    group = hq // hkv
    out = []
    full = interval
    for t in starts:
        if not 0 < t < length:
            raise ValueError(f"window start {t} is outside the sequence of {length} tokens")
        interval = min(full, length - t)
        end = t + interval
        rows = query[:, t:end].float().reshape(hkv, group * interval, d)  # [Hkv, G*I, D]; head h -> kv head h // G
        past = torch.matmul(rows, key[:, :t].float().transpose(1, 2)).mul_(scaling)  # [Hkv, G*I, t]
        own = torch.matmul(rows, key[:, t:end].float().transpose(1, 2)).mul_(scaling)  # [Hkv, G*I, I]
        if softcap:
            past = past.div_(softcap).tanh_().mul_(softcap)
            own = own.div_(softcap).tanh_().mul_(softcap)
        # Row i of the window (position t + i) sees the window's keys up to itself.
        causal = torch.ones(interval, interval, dtype=torch.bool, device=own.device).tril()
        own = own.view(hkv, group, interval, interval).masked_fill(~causal, -math.inf).view(hkv, group * interval, interval)
        top = torch.maximum(past.amax(-1), own.amax(-1))  # [Hkv, G*I]
        if sinks is not None:
            # Attention sinks (gpt-oss): one extra logit per head in the denominator, attending to nothing.
            sink = sinks.float().view(hkv, group, 1).expand(hkv, group, interval).reshape(hkv, group * interval)
            top = torch.maximum(top, sink)
        past = past.sub_(top.unsqueeze(-1)).exp_()
        total = past.sum(-1) + own.sub_(top.unsqueeze(-1)).exp_().sum(-1)
        if sinks is not None:
            total = total + (sink - top).exp()
        # Sum over the rows of each KV head's queries, each row divided by its softmax denominator.
        per_key = torch.matmul(total.reciprocal().unsqueeze(1), past).sum(dim=(0, 1))  # [t]
        n = -(-t // chunk)
        per_key = torch.nn.functional.pad(per_key, (0, n * chunk - t))  # a partial last chunk: its tokens before t
        out.append(per_key.view(n, chunk).sum(1) / (hq * interval))
    return out


def probability_masses(probs: Tensor, starts: Sequence[int], *, chunk: int, interval: int) -> list[Tensor]:
    """``window_masses`` from the attention probabilities themselves: ``probs`` [Hq, S, S_k] (rows: queries from
    position 0; keys from position 0, ``S_k >= S``, any beyond ``S`` masked out). Per start ``t``: the mass rows
    ``[t, t + interval)`` put on each chunk before ``t``, divided by ``Hq * rows``.

    Example::

        >>> probability_masses(torch.softmax(scores, -1), [64], chunk=16, interval=16)[0].shape
        torch.Size([4])
    """
    hq, length, _ = probs.shape
    out = []
    for t in starts:
        if not 0 < t < length:
            raise ValueError(f"window start {t} is outside the sequence of {length} tokens")
        rows = probs[:, t : min(t + interval, length), :t].float()
        n = -(-t // chunk)
        per_key = torch.nn.functional.pad(rows.sum(dim=(0, 1)), (0, n * chunk - t))
        out.append(per_key.view(n, chunk).sum(1) / (hq * rows.shape[1]))
    return out


class _Recorder:
    """Hooks and the recording attention function, installed on ``model`` for the calibration run."""

    def __init__(
        self, model: nn.Module, *, target_layers: Sequence[int], sparse: Sequence[int], chunk: int, interval: int,
        plain: "_PlainDecoder | None" = None,
    ):
        self.model = model
        # A plain decoder (no registry, no attention modules to name): its layers are its SDPA calls in order.
        self.plain = plain
        self.modules = _attention_modules(model) if plain is None else []
        self.layer_of = {id(m): i for i, m in enumerate(self.modules)}
        self.targets = list(target_layers)
        self.sparse = list(sparse)
        self.chunk, self.interval = chunk, interval
        # The target layers' rotary embedding as the decode step applies it (``_GraphRotary``); None: records
        # carry no cos/sin.
        self.rotary: _GraphRotary | None = None
        self.original: str | None = None
        self.handles: list[Any] = []
        self.inner: Any = None
        self.starts: list[int] = []
        self.seen: set[int] = set()
        # Recording from the model's own attention calls, SDPA or softmax (models whose attention bypasses the registry).
        self.own_calls = False
        self.current: int | None = None  # the layer whose attention module is running (SDPA recording only)
        self.kv_heads = _shape(model)["kv_heads"] if plain is None else plain.kv_heads
        self.calls = 0  # attention calls in the current forward (plain decoders)
        self.scores: tuple[Tensor, Tensor, torch.Size] | None = None  # the last 4-D matmul (query, key^T, its shape)
        self.probs_id: int | None = None  # the last softmax's output: the next matmul, if of it (probs @ v), is not kept
        self.buffers: dict[str, Tensor] = {}  # a plain decoder's buffers before the run (its caches are written)
        # Logits are not needed: keep the LM head to the last position (a [S, vocab] tensor otherwise).
        params = inspect.signature(model.forward).parameters
        self.forward_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self._reset()

    def _reset(self) -> None:
        self.hidden: dict[int, Tensor] = {}  # layer -> [W, hidden]
        self.query: dict[int, Tensor] = {}  # layer -> [W, Hq, D]
        self.bounds: dict[int, list[tuple[Tensor, Tensor]]] = {}  # layer -> W x ([N_w, Hkv, D], [N_w, Hkv, D])
        self.mass: dict[int, list[Tensor]] = {}  # layer -> W x [N_w]
        self.seen = set()

    # -- installation -------------------------------------------------------------------------

    def __enter__(self) -> "_Recorder":
        global _ACTIVE
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        if _ACTIVE is not None:
            raise RuntimeError("another calibration is already running in this process")
        if self.plain is not None:
            return self._enter_plain()
        config = self.model.config
        self.original = getattr(config, "_attn_implementation", None) or "eager"
        if not hasattr(self.model, "set_attn_implementation"):
            raise ValueError(f"{type(self.model).__name__} cannot switch its attention implementation (transformers >= 5 needed)")
        AttentionInterface.register(ATTN_IMPLEMENTATION, _recording_attention)
        mask_name = self.original if self.original in ALL_MASK_ATTENTION_FUNCTIONS else "sdpa"
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS[mask_name])
        self.inner = self._inner_function(self.original)
        try:
            for layer in self.targets:
                module = self.modules[layer]
                self.handles.append(_query_projection(module).register_forward_pre_hook(self._hidden_hook(layer)))
            _ACTIVE = self
            compatible = getattr(self.model, "is_backend_compatible", None)
            if callable(compatible) and not compatible():
                self._record_own_calls()  # the model says its attention bypasses the registry (Falcon)
            else:
                self.model.set_attn_implementation(ATTN_IMPLEMENTATION)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _enter_plain(self) -> "_Recorder":
        global _ACTIVE
        self.buffers = {name: b.clone() for name, b in self.model.named_buffers()}
        try:
            for layer in self.targets:
                self.handles.append(self.plain.projections[layer].register_forward_pre_hook(self._hidden_hook(layer)))
            _ACTIVE = self
            self.own_calls = True
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        global _ACTIVE
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        if _ACTIVE is self:
            _ACTIVE = None
        for name, value in self.buffers.items():  # a plain decoder's caches as they were
            module_name, _, leaf = name.rpartition(".")
            self.model.get_submodule(module_name)._buffers[leaf] = value
        self.buffers = {}
        if self.plain is not None:
            return
        if getattr(self.model.config, "_attn_implementation", None) != self.original and self.original is not None:
            self.model.set_attn_implementation(self.original)

    def _inner_function(self, name: str) -> Any:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if name != "eager" and name in ALL_ATTENTION_FUNCTIONS:
            return ALL_ATTENTION_FUNCTIONS[name]
        return None  # eager: each modelling file's own eager_attention_forward, looked up per module

    def attention(self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, mask: Any, **kwargs: Any) -> Any:
        inner = self.inner
        if inner is None:
            inner = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
            if inner is None:
                from transformers.integrations.sdpa_attention import sdpa_attention_forward as inner
        out = inner(module, query, key, value, mask, **kwargs)
        layer = self.layer_of.get(id(module))
        if layer is not None and self.starts:
            self.seen.add(layer)
            with torch.no_grad():
                self._record(layer, module, query, key, kwargs)
        return out

    # -- what is recorded ---------------------------------------------------------------------

    def _positions(self, device: torch.device) -> Tensor:
        return torch.tensor([t - 1 for t in self.starts], device=device)

    def _hidden_hook(self, layer: int) -> Any:
        def hook(_module: nn.Module, args: tuple) -> None:
            if self.starts:
                x = args[0]  # [1, S, hidden]
                self.hidden[layer] = x[0, self._positions(x.device)].detach().clone()

        return hook

    def _record(self, layer: int, module: nn.Module, query: Tensor, key: Tensor, kwargs: dict) -> None:
        if query.shape[0] != 1:
            raise ValueError(f"calibration runs one sequence at a time, got a batch of {query.shape[0]}")
        q, k = query[0], key[0]  # [Hq, S, D], [Hkv, S, D]
        if layer in self.targets:
            c = self.chunk
            chunks = max(self.starts) // c  # whole chunks before the last window
            hkv, _, d = k.shape
            blocks = k[:, : chunks * c].reshape(hkv, chunks, c, d)
            lo, hi = blocks.amin(2).transpose(0, 1), blocks.amax(2).transpose(0, 1)  # [chunks, Hkv, D]
            bounds = []
            for t in self.starts:
                whole = t // c
                if t % c:  # the chunk holding t - 1 is partial: bounds over its tokens before t
                    tail = k[:, whole * c : t]
                    bounds.append((torch.cat([lo[:whole], tail.amin(1)[None]]), torch.cat([hi[:whole], tail.amax(1)[None]])))
                else:
                    bounds.append((lo[:whole].clone(), hi[:whole].clone()))
            self.bounds[layer] = bounds
            self.query[layer] = q[:, self._positions(q.device)].transpose(0, 1).clone()  # [W, Hq, D]
        if layer in self.sparse and kwargs.get("probs") is not None:  # the model's own softmax (eager attention)
            self.mass[layer] = probability_masses(kwargs["probs"][0], self.starts, chunk=self.chunk, interval=self.interval)
        elif layer in self.sparse:
            scaling = kwargs.get("scaling")
            if scaling is None:
                scaling = getattr(module, "scaling", None) or q.shape[-1] ** -0.5
            softcap = kwargs.get("softcap")
            if softcap is None:
                softcap = getattr(module, "attn_logit_softcapping", None)
            self.mass[layer] = window_masses(
                q, k, self.starts, chunk=self.chunk, interval=self.interval, scaling=float(scaling),
                softcap=softcap, sinks=kwargs.get("s_aux"),
            )

    # -- one document -------------------------------------------------------------------------

    def run(self, ids: Tensor, starts: Sequence[int]) -> list[dict[str, Tensor]]:
        """One forward pass over ``ids`` [S]; the window records (without ``golden``/``meta``) of ``starts``."""
        self.starts = sorted(int(t) for t in starts)
        try:
            missing = self._forward(ids)
            if missing and not self.own_calls:
                # Some attention modules bypass the registry: record every layer's attention as the model computes it.
                self._record_own_calls()
                missing = self._forward(ids)
            if missing and self.plain is not None:
                raise ValueError(
                    f"{type(self.model).__name__} computed attention {self.calls} times in a forward (scaled_dot_product_attention "
                    f"calls, or softmaxes over a q @ k^T matmul), for {self.plain.num_layers} attention layers; calibration takes "
                    "a plain decoder's layers to be those, once each, in layer order"
                )
            if missing:
                raise ValueError(
                    f"layers {missing} of {type(self.model).__name__} neither called transformers' registered attention "
                    "function, nor torch.nn.functional.scaled_dot_product_attention, nor a softmax over a q @ k^T matmul "
                    "(torch.matmul or @), once per forward: calibration records attention from one of those; "
                    "lsa_rewrite.indexer.from_model.indexer_from_model(model, config) builds an untrained indexer instead"
                )
            return self._records()
        finally:
            self.starts = []

    def _forward(self, ids: Tensor) -> list[int]:
        """One forward pass over ``ids`` recording the windows; the layers that recorded nothing."""
        device = next(self.model.parameters()).device
        self._reset()
        self.calls, self.scores = 0, None
        try:
            with torch.no_grad(), (_CallRecording(self) if self.own_calls else contextlib.nullcontext()):
                if self.plain is not None:
                    # model(input_ids, input_pos) from position 0; the batch its cache buffers were set up for.
                    rows = ids.view(1, -1).to(device).expand(self.plain.batch, -1)
                    self.model(rows, torch.arange(ids.numel(), device=device))
                else:
                    self.model(input_ids=ids.view(1, -1).to(device), use_cache=False, **self.forward_kwargs)
        finally:
            self.scores, self.probs_id = None, None  # no [heads, S, S] tensor outlives the forward
        if self.plain is not None and self.calls != self.plain.num_layers:
            return sorted(set(self.targets) | set(self.sparse))
        return sorted((set(self.targets) | set(self.sparse)) - self.seen)

    def _record_own_calls(self) -> None:
        """Switch to recording the attention modules' own SDPA calls, under the model's ``"sdpa"`` implementation."""
        name = type(self.model).__name__
        current = getattr(self.model.config, "_attn_implementation", None)
        if current != "sdpa" and getattr(self.model, "_supports_sdpa", False):
            # SDPA where the model has it; else its own attention (matmul and softmax) is recorded as it runs
            try:
                self.model.set_attn_implementation("sdpa")
            except (ValueError, ImportError) as exc:
                log.info("%s: stays on its %r attention (switching to SDPA failed: %s)", name, current, exc)
        self.own_calls = True
        for layer, module in enumerate(self.modules):
            self.handles.append(module.register_forward_pre_hook(self._enter_layer(layer)))
            self.handles.append(module.register_forward_hook(self._leave_layer))
        log.info("%s: recording attention from each layer's own SDPA call or softmax", name)

    def _enter_layer(self, layer: int) -> Any:
        def hook(_module: nn.Module, _args: tuple) -> None:
            self.current = layer

        return hook

    def _leave_layer(self, _module: nn.Module, _args: tuple, _out: Any) -> None:
        self.current = None

    def matmul_called(self, a: Tensor, b: Tensor, out: Tensor) -> None:
        """A 4-D matmul while attention runs: kept as the scores ``query @ key^T`` a softmax may follow."""
        after_softmax, self.probs_id = self.probs_id, None  # only the matmul right after a softmax can be probs @ v
        if self.starts and (self.plain is not None or self.current is not None) and id(a) != after_softmax:
            self.scores = (a, b, out.shape)

    def softmax_called(self, probs: Tensor) -> None:
        """A 4-D softmax over the matmul just before it (eager attention): the layer's attention probabilities."""
        scores, self.scores, self.probs_id = self.scores, None, id(probs)
        if scores is None or scores[2] != probs.shape or not self.starts:
            return
        query, key_t, _ = scores
        self.attention_called(query, key_t.transpose(-1, -2), probs=probs)

    def sdpa_called(self, query: Tensor, key: Tensor, scale: float | None) -> None:
        """An attention module's own SDPA call (``_CallRecording``): record it for the running layer."""
        self.attention_called(query, key, scale=scale)

    def attention_called(self, query: Tensor, key: Tensor, *, scale: float | None = None, probs: Tensor | None = None) -> None:
        """One layer's attention, from an SDPA call or from eager matmul and softmax: record it for its layer."""
        if self.plain is not None:
            layer, self.calls = self.calls, self.calls + 1
            if layer >= self.plain.num_layers or not self.starts:
                return
            # One row of the batch; a module-buffer cache holds the keys of positions [0, S) first.
            length = query.shape[-2]
            query, key = query[:1], key[:1, :, :length]
            probs = None if probs is None else probs[:1, :, :, :length]
        else:
            layer = self.current
        if layer is None or not self.starts:
            return
        if layer in self.seen:
            raise ValueError(
                f"layer {layer} of {type(self.model).__name__} computed attention (SDPA, or a softmax over a matmul) more than "
                "once in a forward; calibration cannot tell which is its attention"
            )
        if query.dim() != 4 or key.dim() != 4 or key.shape[-2] != query.shape[-2]:
            raise ValueError(
                f"layer {layer}: attention over query {tuple(query.shape)} and key {tuple(key.shape)}; calibration records "
                "[batch, heads, tokens, head_dim] self-attention over the whole document"
            )
        key = self._kv_heads(layer, key)
        self.seen.add(layer)
        module = self.modules[layer] if self.plain is None else None
        with torch.no_grad():
            self._record(layer, module, query, key, {"scaling": scale if scale is not None else query.shape[-1] ** -0.5, "probs": probs})

    def _kv_heads(self, layer: int, key: Tensor) -> Tensor:
        """``key`` with the model's KV heads: a key expanded to the query heads before SDPA is folded back."""
        heads, kv = key.shape[1], self.kv_heads
        if heads == kv:
            return key
        if heads % kv == 0:
            folded = key.unflatten(1, (kv, heads // kv))  # head h -> KV head h // group, as repeat_kv expands
            if torch.equal(folded, folded[:, :, :1].expand_as(folded)):
                return folded[:, :, 0]
        raise ValueError(
            f"layer {layer}: the attention's keys have {heads} heads, and the model's config says "
            f"{kv} KV heads; calibration records keys per KV head, as the store keeps them"
        )

    def _records(self) -> list[dict[str, Tensor]]:
        unread = [layer for layer in self.targets if layer not in self.hidden]
        if unread:
            raise ValueError(
                f"target layers {unread} of {type(self.model).__name__}: the module owning the query projection did not run "
                "(its weight is used by another module's code), so calibration has no hidden state to record"
            )
        records = []
        rotary = self.rotary
        cos_sin = rotary.factors([t - 1 for t in self.starts]) if rotary is not None and rotary.rotates else None
        for w in range(len(self.starts)):
            record = {
                "hidden": torch.stack([self.hidden[layer][w] for layer in self.targets]),
                "query": torch.stack([self.query[layer][w] for layer in self.targets]),
                "kmin": torch.stack([self.bounds[layer][w][0] for layer in self.targets]),
                "kmax": torch.stack([self.bounds[layer][w][1] for layer in self.targets]),
                "mass": torch.stack([self.mass[layer][w] for layer in self.sparse]),
            }
            if cos_sin is not None:
                record["cos"], record["sin"] = cos_sin[0][w], cos_sin[1][w]
            records.append(record)
        return records


@dataclasses.dataclass
class _PlainDecoder:
    """What calibrating a plain decoder needs, from its traced decode step (``PlainDecoderAdapter``)."""

    batch: int  # the batch its cache buffers were set up for
    num_layers: int
    kv_heads: int
    projections: dict[int, nn.Module]  # target layer -> the module owning its query projection's weight


_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__}
_SOFTMAXES = {torch.softmax, F.softmax, torch.Tensor.softmax}


class _CallRecording(TorchFunctionMode):
    """Reports attention to the recorder as the model computes it itself: each ``scaled_dot_product_attention``
    call, and each softmax over the last axis of a 4-D matmul's output (eager attention: ``q @ k^T``, then
    the softmax of those scores, masked)."""

    def __init__(self, recorder: _Recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            bound = _SDPA_SIGNATURE.bind(*args, **kwargs)
            self.recorder.sdpa_called(bound.arguments["query"], bound.arguments["key"], bound.arguments.get("scale"))
        elif func in _MATMULS and len(args) >= 2 and all(isinstance(a, Tensor) and a.dim() == 4 for a in args[:2]):
            self.recorder.matmul_called(args[0], args[1], out)
        elif func in _SOFTMAXES and isinstance(out, Tensor) and out.dim() == 4:
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            if dim in (-1, 3):
                self.recorder.softmax_called(out)
        return out


_SDPA_SIGNATURE = inspect.Signature(
    [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default) for name, default in (
        ("query", inspect.Parameter.empty), ("key", inspect.Parameter.empty), ("value", inspect.Parameter.empty),
        ("attn_mask", None), ("dropout_p", 0.0), ("is_causal", False), ("scale", None), ("enable_gqa", False),
    )]
)


def _recording_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any, **kwargs: Any) -> Any:
    """The function registered as ``ATTN_IMPLEMENTATION``: the model's attention, plus the recording."""
    recorder = _ACTIVE
    if recorder is None:  # the implementation left set on some other model: behave like SDPA
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return recorder.attention(module, query, key, value, attention_mask, **kwargs)


# ---------------------------------------------------------------- documents, windows, splits


def _as_documents(documents: Iterable[Any], tokenizer: Any, chat: bool | None) -> list[Document]:
    out: list[Document] = []
    for i, item in enumerate(documents):
        if isinstance(item, Document):
            out.append(item)
        elif isinstance(item, Task):
            out.append(item.to_document(tokenizer, chat=chat))
        elif isinstance(item, os.PathLike):
            out += load_documents(item)
        elif isinstance(item, str):
            out.append(Document(id=f"text-{i}", source="text", text=item))
        else:
            raise ValueError(f"documents[{i}] is a {type(item).__name__}; pass Document, Task, str (a text) or a path")
    seen: set[str] = set()
    for doc in out:
        if doc.id in seen:
            raise ValueError(f"two documents share the id {doc.id!r}; ids key the dump and its resume")
        seen.add(doc.id)
    return out


def window_starts(
    length: int, *, chunk: int, interval: int, count: int, rng: random.Random, answer: int | None = None
) -> list[int]:
    """Sampled window starts ``t`` of a document of ``length`` tokens, sorted.

    The last window always ends at the document's end (``t = length - interval``), so its start need not
    be a multiple of ``chunk``: the chunk holding ``t - 1`` is then partial, as at a selection right after
    a prefill. The others are drawn without replacement among the multiples of ``chunk`` below it. Every
    start is ``>= 2 * chunk``. ``answer`` (a task's first reply token): windows also start there and a
    quarter and half an interval later, where a decode reads the answer out of the context (the first of
    them is what the selection right after the prompt's prefill sees); they may run past the document's
    end (``window_masses`` takes the rows there are).

    Example::

        >>> window_starts(1000, chunk=64, interval=64, count=4, rng=random.Random(0))[-1]
        936
    """
    last = length - interval
    extra: list[int] = []
    if answer is not None and 2 * chunk <= answer < length:
        extra = sorted({t for t in (answer, answer + interval // 4, answer + interval // 2) if t < length})
    if last < 2 * chunk:
        return extra
    candidates = [t for t in range(2 * chunk, last, chunk) if t not in extra]
    picked = rng.sample(candidates, min(count - 1, len(candidates))) + [last]
    return sorted(set(picked) | set(extra))


def _splits(docs: list[Document], fraction: float, seed: int) -> dict[str, str]:
    """``{id: "train" | "heldout"}``: ``fraction`` of each source kind held out, chosen under ``seed``."""
    groups: dict[str, list[str]] = {}
    for doc in docs:
        groups.setdefault(doc.source.split(":")[0], []).append(doc.id)
    split = {doc.id: "train" for doc in docs}
    rng = random.Random(f"split:{seed}")
    held = 0
    for kind in sorted(groups):
        ids = sorted(groups[kind])
        rng.shuffle(ids)
        k = round(fraction * len(ids))
        for doc_id in ids[:k]:
            split[doc_id] = "heldout"
        held += k
    if fraction > 0 and held == 0 and len(docs) >= 2:
        split[sorted(split)[random.Random(f"split:{seed}").randrange(len(split))]] = "heldout"
    return split


def _clear_dump(path: Path) -> None:
    for pattern in (MANIFEST, "shard-*.safetensors", ".*.tmp"):
        for f in path.glob(pattern):
            f.unlink()


class _progress:
    """A rich progress bar over the documents, advanced by tokens (nothing when disabled)."""

    def __init__(self, enabled: bool, total_tokens: int, documents: int) -> None:
        self.enabled, self.total, self.documents = enabled, total_tokens, documents
        self.bar: Any = None
        self.task: Any = None

    def __enter__(self) -> "_progress":
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.console import Console

            self.bar = Progress(
                TextColumn("[bold]calibrate[/] {task.description}"), BarColumn(),
                TextColumn("{task.completed:,.0f}/{task.total:,.0f} tokens"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=Console(stderr=True),  # stdout stays for results
            )
            self.bar.__enter__()
            self.task = self.bar.add_task(f"0/{self.documents} documents", total=max(1, self.total))
        return self

    def advance(self, tokens: int, done: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=tokens, description=f"{done}/{self.documents} documents")

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


# ---------------------------------------------------------------- the verb


def calibrate(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    *,
    config: LSAConfig | None = None,
    documents: Iterable[Document | Task | str | os.PathLike] | None = None,
    target_layers: Sequence[int] | None = None,
    windows_per_document: int = 6,
    heldout_fraction: float = 0.15,
    max_tokens: int | None = None,
    chat: bool | None = None,
    shard_windows: int = 64,
    seed: int = 0,
    tasks: int = 120,
    progress: bool = True,
    resume: bool = True,
) -> Path:
    """Record the indexer's inputs and targets over long documents into a calibration dump at ``out_dir``.

    Args:
        model: an HF causal LM (transformers 5.x), in eval mode, on any device and dtype; or a plain decoder
            called as ``model(input_ids, input_pos)`` with its module-buffer caches set up (documents are cut
            to their length), whose attention calls ``torch.nn.functional.scaled_dot_product_attention``
            once per layer; its buffers are put back afterwards.
        tokenizer: its tokenizer (``encode``; a chat template is used for tasks when it has one).
        out_dir: the dump directory (created; see docs/indexer.md for the format).
        config: the ``LSAConfig`` the indexer is for: its ``chunk_size`` and ``interval`` set the chunks and
            the lookahead window. ``None``: ``LSAConfig()``.
        documents: ``Document``, ``Task`` (rendered with the chat template when ``chat`` allows), ``str``
            (a text) or paths (``.txt``/``.jsonl`` files or directories). ``None``: 12 built-in standard-
            library texts of 1K-2K tokens and ``tasks`` calibration tasks of 0.8K-1.6K tokens (``default_documents``).
        target_layers: layers whose query-side inputs and key bounds are recorded; sparsely attended ones.
            ``None``: 3 spread over the depth (``default_target_layers``).
        windows_per_document: windows sampled per document; the last one always ends at the document's
            end (``window_starts``).
        heldout_fraction: share of the documents of each source kind marked ``"heldout"`` in the dump, kept
            out of indexer training to measure it (chosen under ``seed``). Unrelated to ``heldout_tasks``,
            whose seeds calibration never uses.
        max_tokens: documents are cut to this many tokens. ``None``: the model's maximum positions.
        chat: how tasks are rendered (``None``: the chat template when the tokenizer has one).
        shard_windows: windows per shard file (documents are never split across shards).
        seed: seeds the default documents, the window starts and the split.
        tasks: calibration tasks among the default documents (``documents=None`` only; >= 0). More tasks
            take proportionally longer (about 4.6 minutes for 120 on SmolLM2-135M, 2 CPU cores) and
            teach the indexer more needles: the shipped SmolLM2 indexer was trained on 360.
        progress: show a rich progress bar.
        resume: continue an interrupted dump in ``out_dir`` (documents already written are skipped; the
            model, config, target layers, label rule and shapes must be the same, else ``ValueError``).
            ``False``: delete the dump files found there (manifest and shards) and start over.

    Returns the dump directory. Documents too short for one window (``2 * chunk_size + interval``
    tokens) are skipped with a warning.

    Example::

        >>> model, tokenizer = load_model(find_smollm2_gguf())
        >>> dump = calibrate(model, tokenizer, "dumps/smollm2", config=LSAConfig(chunk_size=16, interval=16))
        >>> CalibrationDump(dump).target_layers
        [7, 15, 22]
    """
    config = LSAConfig() if config is None else config
    if not isinstance(config, LSAConfig):
        raise ValueError(f"config must be an LSAConfig, got {type(config).__name__}")
    if not isinstance(windows_per_document, int) or windows_per_document < 1:
        raise ValueError(f"windows_per_document must be an int >= 1, got {windows_per_document!r}")
    if not isinstance(heldout_fraction, (int, float)) or not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction!r}")
    chunk, interval = config.chunk_size, config.interval
    out = Path(out_dir)

    from ..adapters import is_hf_model, make_adapter

    adapter = None
    if is_hf_model(model):
        signature = model_signature(model)
    else:  # a plain decoder: its shape and sparse layers from its traced decode step
        adapter = make_adapter(model, config)
        _, sites = adapter.trace()
        signature = sites_signature(model, sites)
    sparse = signature["sparse_layers"]
    if not sparse:
        raise ValueError(f"{type(model).__name__} has no sparsely attended layers (all are sliding-window): nothing to calibrate")
    targets = default_target_layers(sparse) if target_layers is None else sorted({int(layer) for layer in target_layers})
    outside = [layer for layer in targets if layer not in sparse]
    if not targets or outside:
        raise ValueError(f"target_layers must be sparsely attended layers of the model {sparse}, got {list(target_layers or [])}")

    if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 0:
        raise ValueError(f"tasks must be an int >= 0 (calibration tasks among the default documents), got {tasks!r}")
    if documents is None:
        docs = default_documents(tokenizer, seed=seed, chat=chat, tasks=tasks)
    else:
        docs = _as_documents(documents, tokenizer, chat)
    if adapter is not None:  # a plain decoder runs over its cache buffers: documents fit them
        capacity = adapter.default_capacity()
        limit = min(max_tokens or capacity, capacity)
    else:
        limit = max_tokens or _max_positions(model) or 1 << 30
    min_length = 2 * chunk + interval
    tokenized: list[tuple[Document, Tensor]] = []
    for doc in docs:
        ids = torch.tensor(tokenizer.encode(doc.text, add_special_tokens=doc.add_special_tokens), dtype=torch.long)
        if len(ids) > limit:
            log.warning("document %s: %d tokens cut to %d", doc.id, len(ids), limit)
            ids = ids[:limit]
        if len(ids) < min_length:
            log.warning("document %s: %d tokens, fewer than one window needs (%d); skipped", doc.id, len(ids), min_length)
            continue
        tokenized.append((doc, ids))
    if not tokenized:
        raise ValueError(f"no document holds a window ({min_length} tokens: two chunks of {chunk} and an interval of {interval})")
    split = _splits([doc for doc, _ in tokenized], float(heldout_fraction), seed)

    rotary = _GraphRotary(model, config, targets)
    plain = None
    if adapter is None:
        shape = _shape(model)
    else:
        shape = {"hidden": rotary.taps[targets[0]].hidden, **{k: signature[k] for k in ("q_heads", "kv_heads", "head_dim")}}
        plain = _PlainDecoder(
            batch=adapter.batch, num_layers=signature["num_layers"], kv_heads=signature["kv_heads"],
            projections=_plain_projections(model, rotary.taps),
        )
    rope = rotary.rope[0] if len(set(rotary.rope)) == 1 else list(rotary.rope)  # one bool when every target layer agrees
    shapes = {**shape, "rope": rope}
    if rotary.style != "half":  # left out when it is the default, so dumps written before the field resume unchanged
        shapes["rope_style"] = rotary.style
    if rotary.rotates and rotary.dims != shape["head_dim"]:
        shapes["rotary_dims"] = rotary.dims  # partial rotary: cos/sin cover the leading channels of each head
    manifest = {
        "model": signature,
        "lsa_config": config.to_dict(),
        "target_layers": targets,
        "label": label_rule(len(sparse)),
        "shapes": shapes,
    }
    # The recorder first: a model whose attention cannot be recorded is refused before the dump is touched.
    with _Recorder(model, target_layers=targets, sparse=sparse, chunk=chunk, interval=interval, plain=plain) as recorder:
        recorder.rotary = rotary
        if not resume and out.exists():
            _clear_dump(out)
        writer = DumpWriter(out, manifest, shard_windows=shard_windows)
        label = writer.manifest["label"]
        todo = [(doc, ids) for doc, ids in tokenized if doc.id not in writer.finished]
        if len(todo) < len(tokenized):
            log.info("resuming %s: %d of %d documents already written", out, len(tokenized) - len(todo), len(tokenized))
        with _progress(progress, sum(len(ids) for _, ids in todo), len(tokenized)) as bar:
            done = len(tokenized) - len(todo)
            for doc, ids in todo:
                rng = random.Random(f"windows:{seed}:{doc.id}")
                answer = _answer_token(doc, tokenizer, len(ids))
                starts = window_starts(len(ids), chunk=chunk, interval=interval, count=windows_per_document, rng=rng, answer=answer)
                records = _run_document(recorder, ids, starts)
                index = writer.add_document(doc.id, source=doc.source, tokens=len(ids), split=split[doc.id], answer=answer)
                for t, record in zip(starts, records):
                    selectable = selectable_chunks(record["mass"].shape[1], t, manifest["lsa_config"])
                    record["golden"] = golden_labels(
                        record["mass"], label["top_p"], label["min_layers"], selectable=selectable, rule=rule_name(label)
                    )
                    record["meta"] = torch.tensor([index, t, t - 1], dtype=torch.long)
                    writer.add_window(record)
                done += 1
                bar.advance(len(ids), done)
    writer.close()
    return out


def _plain_projections(model: nn.Module, taps: dict[int, Any]) -> dict[int, nn.Module]:
    """Per target layer, the module owning its query projection's weight (its input is the recorded hidden state)."""
    from ..prefill_taps import projection_module

    found = {}
    for layer, tap in taps.items():
        module = projection_module(model, tap.weight)
        if module is None:
            raise ValueError(
                f"{type(model).__name__}: layer {layer}'s query projection weight {tap.weight!r} is not a parameter of a module that "
                "projects with it, so calibration cannot record its input; build the indexer with indexer_from_model (untrained)"
            )
        found[layer] = module
    return found


def _answer_token(doc: Document, tokenizer: Any, length: int) -> int | None:
    """The token index where a task document's reply starts (``meta["answer_char"]``), if it has one."""
    at = doc.meta.get("answer_char") if isinstance(doc.meta, dict) else None
    if at is None:
        return None
    token = len(tokenizer.encode(doc.text[:at], add_special_tokens=doc.add_special_tokens))
    return token if token < length else None


def _run_document(recorder: _Recorder, ids: Tensor, starts: Sequence[int]) -> list[dict[str, Tensor]]:
    return recorder.run(ids, starts)


class _GraphRotary:
    """The target layers' rotary embedding as the converted model's decode step applies it.

    The decode step is traced as ``convert`` traces it and ``TapIndexerInputsPass`` finds, per target
    layer, the rotary form the runtime's indexer taps read: whether the layer rotates its queries at all
    (SmolLM3's no-rope layers and Cohere2's full layers are handed cos/sin they do not apply), the style
    (rotate-half or interleaved pairs) and the rotated leading channels of each head (partial rotary). The
    ``cos``/``sin`` factors at any position come from running the step's own ops between its position
    input and those factors (``node_function``), so a dump holds exactly the factors the runtime taps at
    decode time, in the model's channel order, whatever shape its modelling code hands its attention.

    Attributes: ``rope`` (one bool per target layer), ``rotates`` (any of them), ``style`` (``"half"`` or
    ``"interleaved"``), ``dims`` (rotated channels per head; 0 without rotary).
    """

    def __init__(self, model: nn.Module, config: LSAConfig, targets: Sequence[int]):
        from ..adapters import make_adapter
        from ..passes import CaptureError, TapIndexerInputsPass, locate
        from ..passes.locate import node_function

        name = type(model).__name__
        adapter = make_adapter(model, config)
        try:
            step, _ = adapter.trace()
        except CaptureError:
            if config.capture_cache != "static":
                raise
            # Only the rotary is read from this trace: a model that traces over a DynamicCache only (BioGPT)
            # is traced that way, whatever the dump's config says.
            adapter = make_adapter(model, dataclasses.replace(config, capture_cache="dynamic"))
            step, _ = adapter.trace()
        sites = locate(step, layer_windows=adapter.windows)
        try:
            TapIndexerInputsPass(tuple(targets))(step, sites)
        except ValueError as err:
            raise ValueError(f"{name}: the indexer cannot read target layers {list(targets)}: {err}") from None
        taps = {site.layer: site.indexer for site in sites if site.layer in targets}
        self.taps = taps  # target layer -> IndexerTap (the query projection's input and weight)
        self.rope = tuple(taps[layer].cos is not None for layer in targets)
        self.rotates = any(self.rope)
        rotating = [layer for layer, rope in zip(targets, self.rope) if rope]
        forms = {(taps[layer].style, taps[layer].rotary) for layer in rotating}
        if len(forms) > 1:
            raise ValueError(
                f"{name}'s target layers {rotating} apply rotary embeddings of different forms {sorted(forms)} (style, rotated "
                "channels), and a calibration dump records one cos/sin per window; choose target layers of one attention type (target_layers=...)"
            )
        self.style, self.dims = forms.pop() if forms else ("half", 0)
        self.layers = rotating
        self._cache: dict[int, tuple[Tensor, Tensor]] = {}
        self._function = None
        if not rotating:
            return
        position = adapter.input_names[1]
        found = [n for n in step.graph_module.graph.nodes if n.op == "placeholder" and step.bindings[n.name].kind == "input"
                 and step.bindings[n.name].name == position]
        nodes = [node for layer in rotating for node in (taps[layer].cos, taps[layer].sin)]
        function = node_function(step, nodes, found) if found else None
        other = [] if function is None else [
            n.name for n in function.placeholders if step.bindings[n.name].kind not in ("param", "constant")
        ]
        if function is None or other:
            why = f"they also depend on {other}" if other else f"they are not a function of the step's {position!r} input alone"
            raise ValueError(
                f"{name}: calibration computes the rotary cos/sin at each recorded position from the decode step's ops, but {why}; "
                "build the indexer with indexer_from_model (untrained) for this model"
            )
        self._function = function
        self._position = step.examples[found[0].name]

    def factors(self, positions: Sequence[int]) -> tuple[Tensor, Tensor]:
        """``cos``, ``sin`` ``[W, dims]`` at ``positions`` (the query positions of the windows), as the model
        multiplies its queries by them; the same for every rotating target layer (checked)."""
        cos, sin = [], []
        for p in positions:
            if p not in self._cache:
                values = self._function(torch.full_like(self._position, int(p)))
                # every row of the traced batch is at position p: the first `dims` factors are the position's
                pairs = [(c.reshape(-1)[: self.dims], s.reshape(-1)[: self.dims]) for c, s in zip(values[::2], values[1::2])]
                first = pairs[0]
                for layer, pair in zip(self.layers[1:], pairs[1:]):
                    if not (torch.equal(pair[0], first[0]) and torch.equal(pair[1], first[1])):
                        raise ValueError(
                            f"target layers {self.layers} apply different rotary embeddings (layer {layer}'s cos/sin differ from layer "
                            f"{self.layers[0]}'s), and a calibration dump records one cos/sin per window; choose target layers of one "
                            "attention type (target_layers=...)"
                        )
                self._cache[p] = (first[0].detach().clone(), first[1].detach().clone())
            c, s = self._cache[p]
            cos.append(c)
            sin.append(s)
        return torch.stack(cos), torch.stack(sin)


__all__ = ["calibrate", "default_target_layers", "model_signature", "sparse_layers", "window_masses", "window_starts"]
