"""``LSACache``: the transformers ``Cache`` a converted HF model hands to ``generate()``.

It carries the sequence batch's ``KVStore`` through HF's generation loop. During the dense prefill
(the model's own attention) each layer's ``update`` passes the prompt KV to the store and returns it
unchanged for that layer's attention, so no dense cache outlives its layer. Decode steps never call
``update``: they run the rewritten graph over the store.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .runtime.store import KVStore, StoreError


class _LSALayer(CacheLayerMixin):
    is_compileable = False
    is_sliding = False

    def __init__(self, store: KVStore, layer: int):
        super().__init__()
        self.store = store
        self.layer = layer

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.store.length:
            raise StoreError(
                "a converted model takes one prefill per generation and then decodes one token per call; "
                f"got {key_states.shape[-2]} new tokens after {self.store.length} (start a new generation instead)"
            )
        self.store.ingest(self.layer, key_states, value_states)
        return key_states, value_states

    def get_mask_sizes(self, query_length, *args, **kwargs) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # older transformers pass cache_position
            query_length = query_length.shape[0]
        return self.store.length + query_length, 0

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.store.length

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

    def __init__(self, store: KVStore, num_layers: int):
        super().__init__(layers=[_LSALayer(store, i) for i in range(num_layers)])
        self.store = store

    def __repr__(self) -> str:
        return f"LSACache(tokens={self.store.length}, capacity={self.store.capacity}, batch={self.store.batch})"
