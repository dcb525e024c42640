"""Runtime of a converted model: the per-layer state contract, the KV store, and the memory manager
(selection policy + memory mover) that fills it between steps."""

from .host_memory import HostArena
from .mover import MemoryMover
from .policy import SelectionPolicy
from .state import StateContractError, StateTensor
from .store import ChunkLayer, KVStore, LayerSpec, RingLayer, StoreError

__all__ = [
    "ChunkLayer", "HostArena", "KVStore", "LayerSpec", "MemoryMover", "RingLayer", "SelectionPolicy", "StateContractError",
    "StateTensor", "StoreError",
]
