"""``LSASession``: the one model-agnostic runtime a converted model carries (``model.lsa``).

It owns the decode programs (one rewritten graph per batch size), the current ``KVStore`` and, on
CUDA (or wherever ``LSAConfig.compile`` names a backend), the compiled step: compiled once per batch
size and reused by every later store, whatever its capacity. It runs the prefill bookkeeping (new
store, first resident set, probe) and every decode step (selection when due, the step, position
update). Adapters (``lsa_rewrite.adapters``: HF ``generate()``, a plain decoder's own loop) decide
how the model is called and how the prompt's KV reaches the store, and drive the session through
``start_prefill``, ``finish_prefill`` and ``decode``; the session never asks which adapter drives it.
A batch of prompts is prefilled in pieces of ``LSAConfig.prefill_batch`` rows (``prefill_pieces``:
one forward of the model per piece, each piece's KV into its rows of the one store sized for the
whole batch; ``split_rows`` / ``join_rows`` cut a call's arguments and join its outputs), then
decodes as one batch.

An adapter provides: ``windows`` (sliding-window layers ``{layer: window}``), ``capture(batch)``
(trace one decode step for that batch, or raise ``ValueError`` when it cannot), ``default_capacity()``,
``install(session)``, and ``expect_dense_prefill(args, kwargs, capacity=...)``: the torch.compile
backend (``lsa_rewrite.backend``) converts a model during its first call, which then runs the model's
own code; the adapter keeps what that call was given (``DensePrefill``) and, at the next decode call,
adopts the KV cache it filled into a new store.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .config import LSAConfig
from .passes import AttentionSite, DecodeProgram, build_decode_program
from .prefill_taps import PrefillTaps
from .runtime.compiled import CompiledStep
from .runtime.state import check_program_inputs
from .runtime.store import KVStore, LayerSpec, StoreError
from .selectors import AllReduceSelector, IndexerSelector, make_selector

log = logging.getLogger("lsa_rewrite")


def model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters(), None)
    if p is None:
        raise ValueError(f"{type(model).__name__} has no parameters; nothing to convert")
    return p.device, p.dtype


def build_program(
    step, model: torch.nn.Module, config: LSAConfig, windows: dict[int, int], indexer_layers: tuple[int, ...] = ()
) -> DecodeProgram:
    """Locate, rewrite, verify and bind a captured step, and check its store inputs against the state contract."""
    program = build_decode_program(step, model, layer_windows=windows, indexer_layers=indexer_layers)
    check_program_inputs(program.store_keys, {s.layer: s.layout for s in program.sites})
    return program


def split_rows(value: Any, rows: slice, batch: int) -> Any:
    """``value`` cut to the sequences ``rows`` of a ``batch``: tensors of two or more dims whose first
    is ``batch`` (input ids, attention masks, position ids), inside tuples, lists and dicts too; anything
    else (``cache_position`` ``[T]``, flags, caches) as it is."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.dim() >= 2 and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(split_rows(v, rows, batch) for v in value)
    if isinstance(value, dict):
        return {k: split_rows(v, rows, batch) for k, v in value.items()}
    return value


def join_rows(parts: list[Any]) -> Any:
    """The outputs of a batch's prefill pieces as one batch's: tensors concatenated along the batch
    dimension (inside tuples, lists and dicts too, a model output's fields included); anything else
    from the first piece."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat(parts, 0) if first.dim() >= 1 else first
    if isinstance(first, dict):  # plain dicts and transformers' ModelOutput (an OrderedDict)
        joined = {k: join_rows([p[k] for p in parts]) for k in first.keys()}
        return type(first)(**joined) if type(first) is not dict else joined
    if isinstance(first, (tuple, list)):
        return type(first)(join_rows(list(vs)) for vs in zip(*parts))
    return first


@dataclass
class DensePrefill:
    """A prefill that ran the model's own code (the first call of a ``torch.compile(backend="lsa")`` model).

    ``length``: prompt tokens it was given (None when unknown); ``last_token``: step inputs of its last
    token, for the probe (None when unknown: the first selection then waits for decode step 1);
    ``capacity``: tokens the store must hold (``generate()``'s final length, None when unknown).
    The adapter calls ``done()`` once the prefill is adopted or a new prefill supersedes it.
    """

    length: int | None = None
    last_token: dict[str, torch.Tensor] | None = None
    capacity: int | None = None
    on_done: Callable[[], None] | None = None  # run once the prefill is adopted or superseded (the backend's cleanup)

    def done(self) -> None:
        if self.on_done is not None:
            self.on_done()

    def probe_inputs(self, length: int) -> dict[str, torch.Tensor] | None:
        """The last prompt token's step inputs, when this prefill is the one that left ``length`` tokens."""
        return self.last_token if self.length == length else None


class LSASession:
    """What a converted model carries (``model.lsa``): config, decode programs, the current store.

    Example::

        >>> model = lsa_rewrite.convert(model, LSAConfig(budget=0.25))
        >>> [row["action"] for row in model.lsa.report()]    # one row per attention site
        ['rewrite', 'rewrite', ...]
        >>> model.generate(ids, max_new_tokens=32); model.lsa.store.selections
    """

    def __init__(self, model: torch.nn.Module, config: LSAConfig, adapter, program: DecodeProgram, *, indexer=None):
        self.model, self.config, self.adapter = model, config, adapter
        self.indexer = indexer  # LSAIndexer for selector="indexer"
        self.programs: dict[int, DecodeProgram] = {program.batch: program}
        self.sites: list[AttentionSite] = program.sites
        self.store: KVStore | None = None
        self.compiled: CompiledStep | None = None  # the current store's compiled step (when compiling)
        # (batch, backend) -> torch.compile'd decode module; every store of that batch reuses it (its
        # capacity dimensions are dynamic: runtime/compiled.py), whatever the prompt length
        self.compiled_modules: dict[tuple[int, str], Any] = {}
        self.pending_capacity: int | None = None  # set by a generation wrapper that knows its final length

    def report(self) -> list[dict[str, Any]]:
        """One row per attention site: layer, attention form, cache write, heads, window, action."""
        return [s.describe() for s in self.sites]

    def program(self, batch: int) -> DecodeProgram:
        """The rewritten decode step for ``batch`` sequences (traced on first use)."""
        if batch not in self.programs:
            step = self.adapter.capture(batch)
            self.programs[batch] = build_program(step, self.model, self.config, self.adapter.windows, self.indexer_layers)
        return self.programs[batch]

    @property
    def indexer_layers(self) -> tuple[int, ...]:
        return tuple(self.indexer.config.target_layers) if self.indexer is not None else ()

    def layer_specs(self) -> list[LayerSpec]:
        return [
            LayerSpec(
                s.layer, s.q_heads, s.kv_heads, s.head_dim, s.dtype, s.window if s.action == "ring" else None,
                indexer_hidden=s.indexer.hidden if s.indexer is not None else 0,
                indexer_rotary=s.indexer.rotary if s.indexer is not None else 0,
            )
            for s in self.sites
        ]

    # -- prefill ------------------------------------------------------------------------------
    def prefill_pieces(self, batch: int) -> list[slice]:
        """The rows of a ``batch``-prompt prefill, one model forward each (``LSAConfig.prefill_batch``;
        None: all rows in one forward)."""
        size = self.config.prefill_batch or batch
        return [slice(start, min(start + size, batch)) for start in range(0, batch, size)]

    def start_prefill(self, batch: int, *, prompt_len: int, valid_start: list[int], share_mirror: bool = True) -> KVStore:
        """A new store for ``batch`` sequences about to take a ``prompt_len``-token prefill.

        ``share_mirror=False``: never take over the current store's CPU mirror (a later turn of a
        conversation reads its history from there while it prefills)."""
        capacity = self.config.max_context or self.pending_capacity or self.adapter.default_capacity()
        if capacity <= prompt_len:
            raise StoreError(
                f"the store would hold {capacity} tokens but the prompt has {prompt_len}; set LSAConfig(max_context=...) "
                "or pass max_new_tokens to generate()"
            )
        device, _ = model_device_dtype(self.model)
        self.program(batch)  # trace before allocating, so a failure leaves nothing behind
        if self.store is not None:
            self.store.synchronize()  # its side-stream copies must not outlive its buffers
        # A store of the same shape hands over its CPU mirror (pinning tens of GB takes seconds per
        # generation); the old store is retired and refuses further use.
        self.store = KVStore(
            self.layer_specs(), self.config, batch=batch, capacity=capacity, valid_start=valid_start, device=device,
            reuse=self.store if share_mirror else None,
            selector=self.selector(),
        )
        return self.store

    def selector(self):
        """A fresh selector for a new store. Under tensor parallelism (``adapter.tp``) the query-aware
        scores are all-reduced (max) and the indexer's per-head score sums (sum) so every rank keeps the
        resident set the unsharded model would; recency and random scores are already the same on every rank."""
        tp = getattr(self.adapter, "tp", None)
        if tp is not None and tp.size > 1 and self.config.selector == "indexer":
            per_rank = self.indexer.config.kv_heads // tp.size  # colwise shards: contiguous head ranges
            return IndexerSelector(self.indexer, kv_heads=slice(tp.rank * per_rank, (tp.rank + 1) * per_rank), group=tp.group)
        selector = make_selector(self.config.selector, seed=self.config.seed, indexer=self.indexer)
        if tp is not None and tp.size > 1 and self.config.selector == "query-aware":
            selector = AllReduceSelector(selector, group=tp.group, op="max")
        return selector

    def abort_prefill(self, store: KVStore, previous: KVStore | None) -> None:
        """A prefill into ``store`` failed: drop it, and give the running generation back its store when
        the failed prefill had not written yet (a store it took the mirror from is retired at that point)."""
        self.store = previous if previous is not None and not previous.retired else None
        store.abandon("its prefill failed")

    def prefill_taps(self, batch: int) -> PrefillTaps:
        """Hooks that record the indexer's inputs at the last prompt token while the model's own prefill
        of ``batch`` sequences runs (a context manager; ``lsa_rewrite.prefill_taps``); pass it to
        ``finish_prefill``. Without the indexer it records nothing."""
        return PrefillTaps(self.model, self.sites, batch)

    def finish_prefill(
        self, store: KVStore, length: int, last_token: dict[str, torch.Tensor] | None, taps: PrefillTaps | None = None
    ) -> None:
        """The prompt's KV is in the store: place the first resident set and select with real queries.

        ``last_token``: step inputs of the last prompt token (the probe re-runs the step on it); None
        when they are unknown (a dense prefill adopted without them): the first decode step then runs
        over the first resident set (sink + newest chunks) and the first selection before step 1.
        ``taps``: what ``prefill_taps`` recorded during the prefill; the probe's selection reads the
        indexer's inputs from there (exact) rather than from its own step (approximate past the first
        sparse layer).
        """
        store.finish_prefill(length)
        if last_token is not None:
            store.probe(lambda: self.step(last_token, store), taps=taps.values() if taps is not None else None)

    # -- decode -------------------------------------------------------------------------------
    def decode(self, inputs: dict[str, torch.Tensor], store: KVStore) -> torch.Tensor:
        """One decode token for every sequence: selection when due, the step, position update."""
        store.before_step()
        logits = self.step(inputs, store)
        store.after_step()
        return logits

    def compile_backend(self, device: torch.device) -> str | None:
        """The ``torch.compile`` backend the decode step runs through on ``device`` (None: the ``GraphModule``)."""
        choice = self.config.compile
        if choice is True:
            return "inductor" if device.type == "cuda" else None
        return choice or None

    def step(self, inputs: dict[str, torch.Tensor], store: KVStore) -> torch.Tensor:
        """One run of the rewritten decode step at ``store.pos`` (compiled, and a CUDA graph on CUDA, per
        ``LSAConfig.compile``)."""
        program = self.program(store.batch)
        backend = self.compile_backend(store.device)
        with torch.no_grad():
            if backend is None:
                return program(inputs, store)
            if self.compiled is None or self.compiled.store is not store:
                if self.compiled is not None:
                    self.compiled.release()  # the previous store's graph (on CUDA its memory pool goes back now)
                self.compiled = self._compiled_step(program, store, backend)
                if self.compiled.compile_config and self.compiled.setup_s is None:
                    try:
                        return self._run_compiled(inputs)
                    except Exception as exc:  # the settings' lowering failed to compile: the step without them
                        log.warning(
                            "compiling the tensor-parallel decode step with %s failed (%s: %s); compiling it with NCCL "
                            "all-reduces instead", self.compiled.compile_config, type(exc).__name__, exc,
                        )
                        log.debug("the failed compile of the tensor-parallel decode step", exc_info=True)
                        self.adapter.tp.use_nccl()
                        self.compiled.release()
                        self.compiled_modules.pop((store.batch, backend), None)
                        self.compiled = self._compiled_step(program, store, backend)
            return self._run_compiled(inputs)

    def _compiled_step(self, program, store: KVStore, backend: str) -> CompiledStep:
        """The store's compiled step (the compiled module shared by every store of the batch size)."""
        key = (store.batch, backend)
        tp = getattr(self.adapter, "tp", None)
        settings = tp.compile_options(store.device) if tp is not None else None  # Inductor's settings (inert for other backends)
        compiled = CompiledStep(
            program, store, compiled=self.compiled_modules.get(key), cuda_graph=store.device.type == "cuda", backend=backend,
            compile_config=settings,
        )
        self.compiled_modules[key] = compiled.compiled
        return compiled

    def _run_compiled(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.compiled.cuda_graph:
            return self.compiled(inputs).clone()  # the graph's output buffer is reused by the next step
        return self.compiled(inputs)
