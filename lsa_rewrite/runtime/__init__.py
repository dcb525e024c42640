"""Runtime of a converted model: the KV store and the memory manager that fills it between steps."""

from .host_memory import HostArena
from .store import ChunkLayer, KVStore, LayerSpec, RingLayer, StoreError

__all__ = ["ChunkLayer", "HostArena", "KVStore", "LayerSpec", "RingLayer", "StoreError"]
