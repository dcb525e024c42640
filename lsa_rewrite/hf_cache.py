"""``LSACache``: the transformers ``Cache`` a converted HF model hands to ``generate()``.

It carries the sequence batch's ``KVStore`` through HF's generation loop. During the dense prefill
(the model's own attention) each layer's ``update`` passes the prompt KV to the store and returns it
unchanged for that layer's attention, so no dense cache outlives its layer. Decode steps never call
``update``: they run the rewritten graph over the store.

A later turn (``generate(torch.cat([out.sequences, next_turn], 1), cache=out.cache)``) prefills only
the new tokens into a new store sized for the longer conversation: each layer's ``update`` reads the
whole history back from the previous store (its resident pool and CPU mirror, exactly), appends the
new tokens' KV, hands that to the new store and to the layer's attention, so the new tokens attend to
everything that came before. One layer's full KV is the working buffer, freed after the layer. The
cache object the user holds is then pointed at the new store (``rebind``).

A batch prefilled a few prompts at a time (``LSAConfig.prefill_batch``) runs one forward per piece,
each with an ``LSACache`` of the piece's ``rows``: its layers hand their KV (and read their history)
for those sequences only.

A prompt prefilled a piece at a time (``LSAConfig.prefill_chunk``) runs one forward per piece, each
with an ``LSACache`` of the piece's position: its layers hand the piece's KV to the store and attend
over the earlier pieces read back from the store (the mirror, or the pool in dense mode) and the
piece, one layer's history at a time.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .runtime.store import KVStore, StoreError


class _LSALayer(CacheLayerMixin):
    is_compileable = False
    is_sliding = False

    def __init__(self, store: KVStore, layer: int, history: KVStore | None = None, rows: slice | None = None,
                 piece: tuple[int, int] | None = None):
        super().__init__()
        self.store = store
        self.layer = layer
        self.history = history  # the previous turn's store, while a later turn's tokens are prefilled
        self.rows = rows  # the sequences of the store's batch this prefill forward runs (None: all)
        self.piece = piece  # (first position, prompt length) of a prompt prefilled a piece at a time

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.store.length:
            raise StoreError(
                "a converted model decodes one token per call through its rewritten step; "
                f"got {key_states.shape[-2]} new tokens after {self.store.length} outside a converted model's forward"
            )
        if self.piece is not None:
            # A piece of a prompt: it goes into the store after the pieces before it, and the layer's
            # attention runs over those (read back from the store) and this piece.
            # The history is read before the piece goes in: a sliding-window layer's ring would otherwise
            # have the piece's tokens written over the last ones before it.
            start, prompt_len = self.piece
            old = self.store.history(self.layer, rows=self.rows, length=start) if start else None
            self.store.ingest(self.layer, key_states, value_states, rows=self.rows, start=start, prompt_len=prompt_len)
            if old is not None:
                key_states = torch.cat([old[0].to(key_states.dtype), key_states], dim=-2)
                value_states = torch.cat([old[1].to(value_states.dtype), value_states], dim=-2)
            return key_states, value_states
        if self.history is not None:
            old_k, old_v = self.history.history(self.layer, rows=self.rows)
            key_states = torch.cat([old_k.to(key_states.dtype), key_states], dim=-2)
            value_states = torch.cat([old_v.to(value_states.dtype), value_states], dim=-2)
        self.store.ingest(self.layer, key_states, value_states, rows=self.rows)
        return key_states, value_states

    @property
    def held(self) -> int:
        """Tokens before the ones being run: the store's, the previous turn's during a later turn's prefill,
        or the earlier pieces' while a prompt is prefilled a piece at a time."""
        if self.piece is not None:
            return self.piece[0]
        return self.history.length if self.history is not None else self.store.length

    def get_mask_sizes(self, query_length, *args, **kwargs) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # older transformers pass cache_position
            query_length = query_length.shape[0]
        return self.held + query_length, 0

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.held

    def get_max_length(self) -> int:
        return self.store.capacity

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search is not supported by lsa-rewrite; use greedy or sampling")


class LSACache(Cache):
    """A transformers ``Cache`` backed by an LSA ``KVStore`` (one per generation).

    Example::

        >>> out = model.generate(ids, max_new_tokens=32)   # model = lsa_rewrite.convert(hf_model)
        >>> isinstance(model.lsa.store, KVStore)
        True
    """

    def __init__(self, store: KVStore, num_layers: int, *, history: KVStore | None = None, rows: slice | None = None,
                 piece: tuple[int, int] | None = None):
        """``history``: the previous turn's store (a later turn's prefill); ``rows``: the sequences of the
        store's batch a prefill forward with this cache runs (``LSAConfig.prefill_batch``; None: all);
        ``piece``: ``(first position, prompt length)`` when the forward runs one piece of a prompt
        (``LSAConfig.prefill_chunk``)."""
        super().__init__(layers=[_LSALayer(store, i, history, rows, piece) for i in range(num_layers)])
        self.store = store

    def rebind(self, store: KVStore) -> None:
        """Point this cache at ``store`` (a later turn's), so the object the caller holds keeps working."""
        self.store = store
        for layer in self.layers:
            layer.store, layer.history, layer.rows, layer.piece = store, None, None, None

    def __repr__(self) -> str:
        return f"LSACache(tokens={self.store.length}, capacity={self.store.capacity}, batch={self.store.batch})"
