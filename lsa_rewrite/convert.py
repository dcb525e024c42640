"""``convert()``: give a decoder Lookahead Sparse Attention, and the runtime that serves it.

One pipeline for every model kind: capture one decode step (``passes.capture``), locate attention and
cache writes, rewrite them to the LSA ops, verify, bind. What differs per model kind is only how a
step is called and how the prompt's KV reaches the store; that lives in two adapters:

- ``HFAdapter``: transformers models. The decode step is traced with the model's own
  ``StaticCache`` (or ``DynamicCache``); the prefill runs the model's own attention with an
  ``LSACache`` that hands each layer's KV to the store. ``generate()`` works unchanged.
- ``BufferAdapter``: plain PyTorch decoders called as ``model(input_ids [B, T], input_pos [T])`` that
  keep their KV cache as module buffers written by index assignment (gpt-fast style). Their cache
  buffers are released by ``convert``; each prefill re-creates them, runs the model's own forward,
  moves the KV to the store and releases them again.

Everything that can fail (capture, passes, checks) runs before the model is touched: on error the
model is left as it was and the error says what was found and what to do.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from typing import Any

import torch

from .config import LSAConfig
from .hf_cache import LSACache
from .passes import AttentionSite, Binding, CapturedStep, CaptureError, DecodeProgram, LocateError, build_decode_program, capture_step, locate
from .runtime.compiled import CompiledStep
from .runtime.store import KVStore, LayerSpec, StoreError

log = logging.getLogger("lsa_rewrite")

_CAPTURE_PREFILL = 2  # tokens run through the capture cache before the traced decode step
_STATIC_CAPTURE_LEN = 8  # capture-cache length: small, the rewritten graph never reads it


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters(), None)
    if p is None:
        raise ValueError(f"{type(model).__name__} has no parameters; nothing to convert")
    return p.device, p.dtype


def _is_hf(model: torch.nn.Module) -> bool:
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


class HFAdapter:
    """How to trace, prefill and call a transformers causal LM."""

    kind = "hf"
    input_names = ("input_ids", "position_ids")

    def __init__(self, model: torch.nn.Module, config: LSAConfig):
        self.model, self.config = model, config
        self.forward = model.forward  # the model's own forward, also after convert() wraps it
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        if self.cache_kw not in params or "position_ids" not in params:
            raise ValueError(
                f"{type(model).__name__}.forward takes neither `cache` nor `past_key_values` with `position_ids`; "
                "lsa-rewrite converts causal LMs that decode with a KV cache"
            )
        self.num_layers = int(model.config.num_hidden_layers)
        self.windows = hf_layer_windows(model.config)

    def capture(self, batch: int) -> CapturedStep:
        from transformers import DynamicCache, StaticCache

        model = self.model
        device, _ = _model_device_dtype(model)
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

    def default_capacity(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 0)


class BufferAdapter:
    """How to trace, prefill and call a plain decoder with module-buffer KV caches."""

    kind = "buffer"
    input_names = ("input_ids", "input_pos")

    def __init__(self, model: torch.nn.Module, config: LSAConfig):
        self.model, self.config = model, config
        self.forward = model.forward
        params = [p for p in inspect.signature(model.forward).parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(params) < 2:
            raise ValueError(
                f"{type(model).__name__} is not a transformers model, and its forward takes {len(params)} positional "
                "arguments; plain decoders must be called as model(input_ids [B, T], input_pos [T]) and keep their KV "
                "cache in module buffers"
            )
        self.windows: dict[int, int] = {}
        self.cache_buffers: dict[str, tuple[torch.Size, torch.dtype, torch.device]] = {}
        self.sites: list[AttentionSite] = []

    def capture(self, batch: int) -> CapturedStep:
        model = self.model
        device, _ = _model_device_dtype(model)
        ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        pos = torch.tensor([_CAPTURE_PREFILL], dtype=torch.long, device=device)
        forward = self.forward
        return capture_step(lambda a, b: forward(a, b), (ids, pos), input_names=self.input_names, model=model)

    def capture_and_locate(self) -> tuple[CapturedStep, list[AttentionSite]]:
        """Trace with the batch the cache buffers were set up for (found by trying batch 1, then theirs)."""
        batches = [1] + sorted({b.shape[0] for b in self.model.buffers() if b.dim() == 4 and b.is_floating_point()} - {1})
        error: Exception | None = None
        for batch in batches:
            try:
                step = self.capture(batch)
                sites = locate(step)
            except (CaptureError, LocateError) as exc:
                error = error or exc
                continue
            if all(step.examples[s.k_source.name].shape[0] == batch for s in sites):
                return step, sites
        assert error is not None
        raise error

    def default_capacity(self) -> int:
        lengths = {shape[seq] for shape, seq in self._layouts()}
        return min(lengths) if lengths else 0

    def _layouts(self):
        for site in self.sites:
            shape = self.cache_buffers[self.buffer_name(site.k_source)][0]
            yield shape, site.seq_dim

    def buffer_name(self, node) -> str:
        """The module-buffer name of a cache placeholder found by the passes."""
        return self._bindings[node.name].name

    def remember(self, step: CapturedStep, sites: list[AttentionSite]) -> None:
        """Record the cache buffers the passes found (before the graph is rewritten)."""
        self._bindings = dict(step.bindings)
        self.sites = sites
        for site in sites:
            for node in (site.k_source, site.v_source):
                binding = step.bindings[node.name]
                if binding.kind != "param":
                    raise ValueError(f"cache {node.name} of a plain decoder is not a module buffer ({binding.kind})")
                t = step.examples[node.name]
                self.cache_buffers[binding.name] = (t.shape, t.dtype, t.device)

    def set_cache_buffers(self, materialize: bool) -> dict[str, torch.Tensor]:
        """Re-create (zeros) or release (empty) the model's cache buffers; returns what is set."""
        out = {}
        for name, (shape, dtype, device) in self.cache_buffers.items():
            module_name, _, leaf = name.rpartition(".")
            module = self.model.get_submodule(module_name)
            value = torch.zeros(shape, dtype=dtype, device=device) if materialize else torch.empty(0, dtype=dtype, device=device)
            module._buffers[leaf] = value
            out[name] = value
        return out


class LSARuntime:
    """What a converted model carries (``model.lsa``): config, decode programs, the current store.

    Example::

        >>> model = lsa_rewrite.convert(model, LSAConfig(budget=0.25))
        >>> [row["action"] for row in model.lsa.report()]    # one row per attention site
        ['rewrite', 'rewrite', ...]
        >>> model.generate(ids, max_new_tokens=32); model.lsa.store.selections
    """

    def __init__(self, model: torch.nn.Module, config: LSAConfig, adapter, program: DecodeProgram):
        self.model, self.config, self.adapter = model, config, adapter
        self.programs: dict[int, DecodeProgram] = {program.batch: program}
        self.sites: list[AttentionSite] = program.sites
        self.store: KVStore | None = None
        self.compiled: CompiledStep | None = None  # CUDA: the current store's compiled step
        self.compiled_modules: dict[int, Any] = {}  # batch -> torch.compile'd decode module
        self.pending_capacity: int | None = None
        self.output_type: type | None = None
        self.cache_field: str | None = None

    def report(self) -> list[dict[str, Any]]:
        """One row per attention site: layer, attention form, cache write, heads, window, action."""
        return [s.describe() for s in self.sites]

    def program(self, batch: int) -> DecodeProgram:
        if batch not in self.programs:
            if self.adapter.kind == "buffer":
                raise ValueError(f"this plain decoder was converted for batch {next(iter(self.programs))}; got batch {batch}")
            step = self.adapter.capture(batch)
            self.programs[batch] = build_decode_program(step, self.model, chunk_size=self.config.chunk_size, layer_windows=self.adapter.windows)
        return self.programs[batch]

    def new_store(self, batch: int, *, prompt_len: int, valid_start: list[int]) -> KVStore:
        capacity = self.config.max_context or self.pending_capacity or self.adapter.default_capacity()
        if capacity <= prompt_len:
            raise StoreError(
                f"the store would hold {capacity} tokens but the prompt has {prompt_len}; set LSAConfig(max_context=...) "
                "or pass max_new_tokens to generate()"
            )
        device, _ = _model_device_dtype(self.model)
        specs = [LayerSpec(s.layer, s.q_heads, s.kv_heads, s.head_dim, s.dtype, s.window if s.action == "ring" else None) for s in self.sites]
        self.program(batch)  # trace before allocating, so a failure leaves nothing behind
        if self.store is not None:
            self.store.synchronize()  # its side-stream copies must not outlive its buffers
        # A store of the same shape hands over its CPU mirror (pinning tens of GB takes seconds per
        # generation); the old store is retired and refuses further use.
        self.store = KVStore(specs, self.config, batch=batch, capacity=capacity, valid_start=valid_start, device=device, reuse=self.store)
        return self.store

    def decode(self, inputs: dict[str, torch.Tensor], store: KVStore) -> torch.Tensor:
        store.before_step()
        logits = self._step(inputs, store)
        store.after_step()
        return logits

    def _step(self, inputs: dict[str, torch.Tensor], store: KVStore) -> torch.Tensor:
        """One run of the rewritten decode step at ``store.pos`` (compiled + CUDA graph on CUDA)."""
        program = self.program(store.batch)
        with torch.no_grad():
            if store.device.type == "cuda" and self.config.compile:
                if self.compiled is None or self.compiled.store is not store:
                    module = self.compiled_modules.get(store.batch)
                    self.compiled = CompiledStep(program, store, compiled=module)
                    self.compiled_modules[store.batch] = self.compiled.compiled
                return self.compiled(inputs).clone()  # the graph's output buffer is reused by the next step
            return program(inputs, store)

    def _finish_prefill(self, store: KVStore, length: int, last_token: dict[str, torch.Tensor]) -> None:
        store.finish_prefill(length)
        store.probe(lambda: self._step(last_token, store))

    # -- HF forward ---------------------------------------------------------------------------
    def hf_forward(self, original, signature: inspect.Signature, *args, **kwargs):
        names = [p for p in signature.parameters if signature.parameters[p].kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        kwargs.update(dict(zip(names, args)))
        cache_kw = self.adapter.cache_kw
        cache = kwargs.get(cache_kw)
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError("a converted model needs input_ids (inputs_embeds is not supported)")
        if kwargs.get("labels") is not None:
            raise ValueError("a converted model serves decoding; compute losses on the original model")
        if isinstance(cache, LSACache) and cache.store.length:
            store = cache.store
            if input_ids.shape[1] != 1:
                raise ValueError(f"after the prefill a converted model decodes one token per call; got {input_ids.shape[1]} tokens")
            position_ids = kwargs.get("position_ids")
            if position_ids is None:
                position_ids = (store.length - store.valid_start).view(-1, 1)
            logits = self.decode({"input_ids": input_ids, "position_ids": position_ids[:, -1:]}, store)
            return self.output_type(logits=logits, **{self.cache_field: cache})
        if cache is not None and not isinstance(cache, LSACache) and cache.get_seq_length() > 0:
            raise ValueError(f"a converted model keeps its KV in the LSA store; got a {type(cache).__name__} that already holds tokens")
        batch, length = input_ids.shape
        valid_start = _left_padding(kwargs.get("attention_mask"), batch, length)
        store = self.new_store(batch, prompt_len=length, valid_start=valid_start)
        lsa_cache = LSACache(store, self.adapter.num_layers)
        kwargs[cache_kw] = lsa_cache
        kwargs["use_cache"] = True
        with torch.no_grad():
            out = original(**kwargs)
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = (length - 1 - store.valid_start).view(-1, 1)
        self._finish_prefill(store, length, {"input_ids": input_ids[:, -1:], "position_ids": position_ids[:, -1:]})
        self.output_type = type(out)
        self.cache_field = next((k for k, v in out.items() if v is lsa_cache), cache_kw)
        out[self.cache_field] = lsa_cache
        return out

    # -- plain decoder forward ----------------------------------------------------------------
    def buffer_forward(self, original, input_ids: torch.Tensor, input_pos: torch.Tensor, *args, **kwargs):
        batch, length = input_ids.shape
        store = self.store
        decoding = store is not None and store.length and length == 1 and not (input_pos.device.type == "cpu" and int(input_pos[0]) == 0)
        if decoding:
            if input_pos.device.type == "cpu" and int(input_pos[0]) != store.length:
                raise ValueError(f"decode position {int(input_pos[0])} does not follow the {store.length} tokens held; positions must advance by one")
            return self.decode({"input_ids": input_ids, "input_pos": input_pos}, store)
        if int(input_pos[0]) != 0:
            raise ValueError(f"a prefill must start at position 0, got {int(input_pos[0])}")
        store = self.new_store(batch, prompt_len=length, valid_start=[0] * batch)
        buffers = self.adapter.set_cache_buffers(materialize=True)
        try:
            with torch.no_grad():
                logits = original(input_ids, input_pos, *args, **kwargs)
                for site in self.adapter.sites:
                    k = buffers[self.adapter.buffer_name(site.k_source)].narrow(site.seq_dim, 0, length)
                    v = buffers[self.adapter.buffer_name(site.v_source)].narrow(site.seq_dim, 0, length)
                    if site.seq_dim == 1:  # [B, T, H, D] -> [B, H, T, D]
                        k, v = k.transpose(1, 2), v.transpose(1, 2)
                    store.ingest(site.layer, k, v)
        finally:
            self.adapter.set_cache_buffers(materialize=False)
        self._finish_prefill(store, length, {"input_ids": input_ids[:, -1:], "input_pos": input_pos[-1:]})
        return logits


def _left_padding(mask: torch.Tensor | None, batch: int, length: int) -> list[int]:
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


def convert(model: torch.nn.Module, config: LSAConfig | None = None, *, indexer: Any = None) -> torch.nn.Module:
    """Give ``model`` Lookahead Sparse Attention during decode; returns the converted model.

    The model is converted in place and returned: its decode steps run a rewritten graph whose
    attention reads only the resident KV chunks, and ``generate()`` (HF) or ``forward`` (plain
    decoders) keep working. ``model.lsa`` holds the runtime (``report()``, current ``store``).

    Args:
        model: a transformers causal LM, or a plain decoder called as ``model(input_ids, input_pos)``
            with module-buffer KV caches.
        config: an ``LSAConfig`` (default: ``LSAConfig()``).
        indexer: a trained indexer for ``selector="indexer"``.

    Raises:
        ValueError (and subclasses ``LocateError``, ...): the model cannot be converted; the message says
        what was found and what to do. The model is left untouched.

    Example::

        >>> from transformers import AutoModelForCausalLM
        >>> model = lsa_rewrite.convert(AutoModelForCausalLM.from_pretrained(path), LSAConfig(budget=0.135))
        >>> out = model.generate(ids, max_new_tokens=64)
        >>> lsa_rewrite.footprint(model)["ratio"]
    """
    config = config or LSAConfig()
    if not isinstance(config, LSAConfig):
        raise TypeError(f"config must be an LSAConfig, got {type(config).__name__}")
    if getattr(model, "lsa", None) is not None:
        raise ValueError("this model is already converted (it has `model.lsa`); convert the original model once")
    if config.selector == "indexer" or indexer is not None:
        raise ValueError(
            "selector='indexer' needs a trained LSA indexer, which this version cannot load yet; "
            "use selector='query-aware' (the training-free default)"
        )
    adapter = _adapter(model, config)
    with _restoring_buffers(model, adapter):
        step, _ = _trace(adapter)
        program = build_decode_program(step, model, chunk_size=config.chunk_size, layer_windows=adapter.windows)
    runtime = LSARuntime(model, config, adapter, program)
    log.info("converted %s: %s", type(model).__name__, ", ".join(f"L{s.layer}:{s.action}" for s in program.sites))
    _install(model, runtime)
    return model


def _adapter(model: torch.nn.Module, config: LSAConfig):
    if model.training:
        raise ValueError("convert a model in eval mode (call model.eval() first): decode runs without dropout or gradients")
    return HFAdapter(model, config) if _is_hf(model) else BufferAdapter(model, config)


def _trace(adapter) -> tuple[CapturedStep, list[AttentionSite]]:
    """Capture one decode step and locate its attention sites (the graph is not changed)."""
    if adapter.kind == "buffer":
        step, sites = adapter.capture_and_locate()
        adapter.remember(step, sites)
        return step, sites
    step = adapter.capture(1)
    return step, locate(step, layer_windows=adapter.windows)


@contextlib.contextmanager
def _restoring_buffers(model: torch.nn.Module, adapter):
    """Tracing a plain decoder writes into its cache buffers: put every buffer back afterwards."""
    if adapter.kind != "buffer":
        yield
        return
    snapshot = {name: b.clone() for name, b in model.named_buffers()}
    try:
        yield
    finally:
        for name, value in snapshot.items():
            module_name, _, leaf = name.rpartition(".")
            model.get_submodule(module_name)._buffers[leaf] = value


def inspect_model(model: torch.nn.Module, config: LSAConfig | None = None) -> list[dict[str, Any]]:
    """Trace ``model``'s decode step and report every attention site, without converting anything.

    Returns one dict per site: layer, attention form (sdpa/eager), cache write op, q/kv heads, head
    dim, GQA form, scale, softcap, sliding window, action (``rewrite`` or ``ring``) and the reason.
    Raises the same errors as :func:`convert` when the model cannot be converted.

    Example::

        >>> rows = lsa_rewrite.inspect_model(model)
        >>> sum(r["action"] == "rewrite" for r in rows)
        30
    """
    config = config or LSAConfig()
    adapter = _adapter(model, config)
    with _restoring_buffers(model, adapter):
        _, sites = _trace(adapter)
    return [s.describe() for s in sites]


def _install(model: torch.nn.Module, runtime: LSARuntime) -> None:
    original = model.forward
    signature = inspect.signature(original)
    if runtime.adapter.kind == "hf":

        @functools.wraps(original)
        def forward(*args, **kwargs):
            return runtime.hf_forward(original, signature, *args, **kwargs)

        original_generate = model.generate

        @functools.wraps(original_generate)
        def generate(*args, **kwargs):
            runtime.pending_capacity = _generation_length(model, args, kwargs)
            try:
                return original_generate(*args, **kwargs)
            finally:
                runtime.pending_capacity = None

        model.generate = generate
    else:
        runtime.adapter.set_cache_buffers(materialize=False)

        @functools.wraps(original)
        def forward(*args, **kwargs):
            return runtime.buffer_forward(original, *args, **kwargs)

    model.forward = forward
    model.lsa = runtime


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


def footprint(model: torch.nn.Module) -> dict[str, float | int]:
    """KV bytes a converted model holds on its device, against a dense cache for the same sequences.

    Keys: ``resident_kv_bytes`` (every device tensor of the store: pools + chunk index + tables and
    the memory manager's state), ``dense_kv_bytes``, ``ratio``, ``mirror_bytes`` (host),
    ``index_bytes``, ``pool_bytes``, ``table_bytes`` (the rest of ``resident_kv_bytes``), ``dropped_chunks``,
    ``tokens``, ``capacity_tokens``, ``slots_per_sequence``, ``selections``.

    Example::

        >>> model.generate(ids, max_new_tokens=64)
        >>> lsa_rewrite.footprint(model)["ratio"]   # e.g. 0.14
    """
    runtime = getattr(model, "lsa", None)
    if not isinstance(runtime, LSARuntime):
        raise ValueError("footprint() needs a converted model: call lsa_rewrite.convert(model) first")
    if runtime.store is None:
        raise ValueError("the converted model holds no sequences yet: run generate() (or a prefill) first")
    return runtime.store.footprint()
