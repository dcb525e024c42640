"""``PlainDecoderAdapter``: plain PyTorch decoders with module-buffer KV caches (gpt-fast style).

The model is called as ``model(input_ids [B, T], input_pos [T])`` and keeps its KV cache in module
buffers written by index assignment. ``install`` releases those buffers (a converted model must not
hold the dense cache); each prefill re-creates them, runs the model's own forward, moves the KV to the
store and releases them again (with ``LSAConfig.prefill_batch``, once per piece of rows, with buffers
of the piece's batch, so the dense cache of the whole batch never exists). A decode call (one token,
at the next position) runs the session's rewritten step.

Under ``torch.compile(model, backend="lsa")`` the first call (the prefill) runs the model's own code:
the backend converts the model, puts the cache buffers back for that call (``expect_dense_prefill``),
and the next decode call adopts what the prefill wrote into them, then releases them.
"""

from __future__ import annotations

import functools
import inspect

import torch

from ..config import LSAConfig
from ..tensor_parallel import TensorParallelError, is_dtensor
from ..passes import AttentionSite, CapturedStep, CaptureError, LocateError, capture_step, locate
from ..session import DensePrefill, join_rows, model_device_dtype, split_rows

_CAPTURE_POS = 2  # position of the traced decode step


class PlainDecoderAdapter:
    """How to trace, prefill and call a plain decoder with module-buffer KV caches."""

    input_names = ("input_ids", "input_pos")
    tp = None  # tensor parallelism is read from transformers' tp_plan (HF models only)

    def __init__(self, model: torch.nn.Module, config: LSAConfig):
        if any(is_dtensor(p) for p in model.parameters()):
            raise TensorParallelError(
                f"{type(model).__name__} has DTensor (sharded) parameters; lsa-rewrite converts tensor-parallel models "
                "loaded by transformers with a tp_plan only. Convert the unsharded decoder, one per process"
            )
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
        self.batch: int | None = None  # the batch its cache buffers were set up for (found by tracing)
        self.dense_prefill: DensePrefill | None = None  # a first call that runs the model's own code (backend)

    # -- tracing ------------------------------------------------------------------------------
    def capture(self, batch: int) -> CapturedStep:
        if self.batch is not None and batch != self.batch:
            raise ValueError(
                f"this plain decoder was converted for batch {self.batch} (the batch of its cache buffers); got batch {batch}. "
                "Set up its caches for that batch before convert()"
            )
        return self._capture(batch)

    def _capture(self, batch: int) -> CapturedStep:
        model = self.model
        device, _ = model_device_dtype(model)
        ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        pos = torch.tensor([_CAPTURE_POS], dtype=torch.long, device=device)
        forward = self.forward
        return capture_step(lambda a, b: forward(a, b), (ids, pos), input_names=self.input_names, model=model)

    def trace(self) -> tuple[CapturedStep, list[AttentionSite]]:
        """Trace with the batch the cache buffers were set up for (found by trying batch 1, then theirs).

        Tracing writes into the model's cache buffers: every buffer is put back afterwards.
        """
        model = self.model
        snapshot = {name: b.clone() for name, b in model.named_buffers()}
        try:
            batches = [1] + sorted({b.shape[0] for b in model.buffers() if b.dim() == 4 and b.is_floating_point()} - {1})
            error: Exception | None = None
            for batch in batches:
                try:
                    step = self._capture(batch)
                    sites = locate(step)
                except (CaptureError, LocateError) as exc:
                    error = error or exc
                    continue
                if all(step.examples[s.k_source.name].shape[0] == batch for s in sites):
                    self._remember(step, sites, batch)
                    return step, sites
            assert error is not None
            raise error
        finally:
            for name, value in snapshot.items():
                module_name, _, leaf = name.rpartition(".")
                model.get_submodule(module_name)._buffers[leaf] = value

    def _remember(self, step: CapturedStep, sites: list[AttentionSite], batch: int) -> None:
        """Record the cache buffers the passes found (before the graph is rewritten)."""
        self._bindings = dict(step.bindings)
        self.sites = sites
        self.batch = batch
        for site in sites:
            for node in (site.k_source, site.v_source):
                binding = step.bindings[node.name]
                if binding.kind != "param":
                    raise ValueError(f"cache {node.name} of a plain decoder is not a module buffer ({binding.kind})")
                t = step.examples[node.name]
                self.cache_buffers[binding.name] = (t.shape, t.dtype, t.device)

    def default_capacity(self) -> int:
        lengths = {self.cache_buffers[self.buffer_name(site.k_source)][0][site.seq_dim] for site in self.sites}
        return min(lengths) if lengths else 0

    def buffer_name(self, node) -> str:
        """The module-buffer name of a cache placeholder found by the passes."""
        return self._bindings[node.name].name

    def set_cache_buffers(self, materialize: bool, *, batch: int | None = None) -> dict[str, torch.Tensor]:
        """Re-create (zeros) or release (empty) the model's cache buffers; returns what is set.
        ``batch``: re-create them for that many sequences (a prefill piece) instead of their own batch."""
        return self.materialize_cache_buffers(self.model, self.cache_buffers, materialize=materialize, batch=batch)

    @staticmethod
    def materialize_cache_buffers(model: torch.nn.Module, buffers: dict, *, materialize: bool = True, batch: int | None = None) -> dict[str, torch.Tensor]:
        """Set ``model``'s cache buffers ``{name: (shape, dtype, device)}`` to zeros (or release them);
        ``batch``: with that many rows along their first (batch) dimension instead of ``shape``'s."""
        out = {}
        for name, (shape, dtype, device) in buffers.items():
            module_name, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_name)
            if batch is not None:
                shape = (batch, *shape[1:])
            value = torch.zeros(shape, dtype=dtype, device=device) if materialize else torch.empty(0, dtype=dtype, device=device)
            module._buffers[leaf] = value
            out[name] = value
        return out

    def restore_cache_buffers(self) -> None:
        """The model's own (zeroed) cache buffers again, as before ``convert`` (``lsa_rewrite.handling.unconvert``)."""
        self.set_cache_buffers(materialize=True)

    # -- running ------------------------------------------------------------------------------
    def install(self, session) -> None:
        """Release the dense cache buffers and wrap ``forward``."""
        self.set_cache_buffers(materialize=False)
        original = self.model.forward

        # Dynamo must not trace the wrapper (host-side bookkeeping) when the model runs under
        # torch.compile: the decode step it runs is already a compiled graph.
        @torch._dynamo.disable
        @functools.wraps(original)
        def forward(*args, **kwargs):
            return self.call(session, original, *args, **kwargs)

        self.model.forward = forward

    def expect_dense_prefill(self, args: tuple, kwargs: dict, *, capacity: int | None = None) -> None:
        """The model's own code is about to prefill ``model(*args, **kwargs)`` (the backend's first call):
        give it its cache buffers back, and keep its last token for the probe at the adoption."""
        self.set_cache_buffers(materialize=True)
        ids, pos = (list(args) + [None, None])[:2]
        last = None
        if isinstance(ids, torch.Tensor) and isinstance(pos, torch.Tensor) and ids.dim() == 2 and pos.dim() == 1:
            last = {"input_ids": ids[:, -1:], "input_pos": pos[-1:]}
        self.dense_prefill = DensePrefill(length=ids.shape[1] if last else None, last_token=last, capacity=capacity)

    def call(self, session, original, input_ids: torch.Tensor, input_pos: torch.Tensor, *args, **kwargs):
        batch, length = input_ids.shape
        if self.dense_prefill is not None:
            if length == 1 and int(input_pos[0]) > 0:
                store = self.adopt(session, batch, int(input_pos[0]))
                return session.decode({"input_ids": input_ids, "input_pos": input_pos}, store)
            if int(input_pos[0]) == 0:  # a new prefill: the dense one is not needed any more
                self._drop_dense_prefill()
                self.set_cache_buffers(materialize=False)
        store = session.store
        decoding = store is not None and store.length and length == 1 and not (input_pos.device.type == "cpu" and int(input_pos[0]) == 0)
        if decoding:
            if batch != store.batch:
                raise ValueError(f"this plain decoder holds a batch of {store.batch} sequences; got input_ids for a batch of {batch}")
            if input_pos.device.type == "cpu" and int(input_pos[0]) != store.length:
                raise ValueError(f"decode position {int(input_pos[0])} does not follow the {store.length} tokens held; positions must advance by one")
            return session.decode({"input_ids": input_ids, "input_pos": input_pos}, store)
        if int(input_pos[0]) != 0:
            raise ValueError(f"a prefill must start at position 0, got {int(input_pos[0])}")
        chunk = session.config.prefill_chunk
        if chunk is not None and length > chunk:
            raise ValueError(
                f"LSAConfig(prefill_chunk={chunk}) prefills a prompt a piece at a time on HF models only; this plain decoder "
                f"prefills its {length} tokens through its own cache buffers in one forward: convert it with prefill_chunk=None"
            )
        previous = session.store
        store = session.start_prefill(batch, prompt_len=length, valid_start=[0] * batch)
        try:
            parts = []
            with torch.no_grad(), session.prefill_taps(batch) as taps:
                # One forward per piece of rows (LSAConfig.prefill_batch), each with cache buffers of
                # its own batch, re-created for it and released after its KV is in the store.
                for rows in session.prefill_pieces(batch):
                    taps.rows = rows
                    size = rows.stop - rows.start
                    buffers = self.set_cache_buffers(materialize=True, batch=None if size == batch else size)
                    if size == batch:
                        parts.append(original(input_ids, input_pos, *args, **kwargs))
                    else:
                        parts.append(original(input_ids[rows], input_pos, *split_rows(args, rows, batch), **split_rows(kwargs, rows, batch)))
                    self._ingest(store, buffers, length, rows=None if size == batch else rows)
                    del buffers
                    self.set_cache_buffers(materialize=False)
                logits = join_rows(parts)
                del parts
        except BaseException:
            session.abort_prefill(store, previous)
            raise
        finally:
            self.set_cache_buffers(materialize=False)
        session.finish_prefill(store, length, {"input_ids": input_ids[:, -1:], "input_pos": input_pos[-1:]}, taps)
        return logits

    def _ingest(self, store, buffers: dict[str, torch.Tensor], length: int, *, rows: slice | None = None) -> None:
        """Every rewritten layer's first ``length`` tokens of the cache buffers into the store (``rows``:
        the sequences of the store's batch those buffers hold; None: all)."""
        for site in self.sites:
            k = buffers[self.buffer_name(site.k_source)].narrow(site.seq_dim, 0, length)
            v = buffers[self.buffer_name(site.v_source)].narrow(site.seq_dim, 0, length)
            if site.seq_dim == 1:  # [B, T, H, D] -> [B, H, T, D]
                k, v = k.transpose(1, 2), v.transpose(1, 2)
            store.ingest(site.layer, k, v, rows=rows)

    def adopt(self, session, batch: int, length: int):
        """The decode call after a dense prefill (the backend's first call): what that prefill wrote into
        the cache buffers (positions ``0..length-1``) goes into a new store as a prefill's would; the
        buffers are released. Checked before anything changes: a refused call leaves the prefill adoptable."""
        if batch != self.batch:
            raise ValueError(f"this plain decoder holds a batch of {self.batch} sequences; got input_ids for a batch of {batch}")
        pending = self.dense_prefill
        if pending.length is not None and length != pending.length:
            raise ValueError(
                f"decode position {length} does not follow the {pending.length}-token prefill that ran before it; "
                "positions must advance by one"
            )
        buffers = {name: self.model.get_buffer(name) for name in self.cache_buffers}
        previous, pending_capacity = session.store, session.pending_capacity
        session.pending_capacity = pending_capacity or pending.capacity
        try:
            store = session.start_prefill(batch, prompt_len=length, valid_start=[0] * batch)
        finally:
            session.pending_capacity = pending_capacity
        try:
            with torch.no_grad():
                self._ingest(store, buffers, length)
            session.finish_prefill(store, length, pending.probe_inputs(length))
        except BaseException:
            session.abort_prefill(store, previous)
            raise
        self._drop_dense_prefill()
        self.set_cache_buffers(materialize=False)
        return store

    def _drop_dense_prefill(self) -> None:
        pending, self.dense_prefill = self.dense_prefill, None
        if pending is not None:
            pending.done()
