"""``HostArena``: the CPU mirror's single exact-size host allocation (page-locking itself needs CUDA:
the GPU benchmarks check it; here the carving, bounds and lifetime)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from lsa_rewrite.config import LSAConfig
from lsa_rewrite.runtime.host_memory import HostArena
from lsa_rewrite.runtime.store import KVStore, LayerSpec

CPU = torch.device("cpu")


def test_tensors_are_disjoint_page_aligned_and_exactly_sized():
    wants = [((3, 5, 7), torch.float32), ((4,), torch.bfloat16), ((2, 1000), torch.int64)]
    arena = HostArena.for_tensors(wants, CPU)
    taken = [arena.take(shape, dtype) for shape, dtype in wants]
    base = arena.buffer.data_ptr()
    spans = []
    for t, (shape, dtype) in zip(taken, wants):
        assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
        assert (t.data_ptr() - base) % 4096 == 0
        spans.append((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()))
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    assert spans[-1][1] <= base + arena.nbytes
    # 420 B, 8 B, 16000 B: three pages' worth of alignment, not a power-of-two rounding
    assert arena.nbytes == 4096 + 4096 + 16384
    for i, t in enumerate(taken):  # writing one leaves the others alone
        t.fill_(i + 1)
    assert [float(t.flatten()[0]) for t in taken] == [1.0, 2.0, 3.0]
    assert not arena.pinned  # no CUDA device asked for


def test_take_past_the_end_says_how_much_is_left():
    arena = HostArena(4096, CPU)
    arena.take((1000,), torch.float32)  # 4000 B, rounded to the page
    with pytest.raises(ValueError, match="has 0 left, 4 asked"):
        arena.take((1,), torch.float32)
    with pytest.raises(ValueError, match=">= 0 bytes"):
        HostArena(-1, CPU)


def test_every_tensor_taken_keeps_its_arena_alive():
    arena = HostArena(8192, CPU)
    t = arena.take((16,), torch.float32)
    ref = weakref.ref(arena)
    del arena
    gc.collect()
    assert ref() is not None  # the registration (on CUDA) must outlive the tensor
    del t
    gc.collect()
    assert ref() is None


def test_store_mirrors_share_one_exact_allocation():
    specs = [LayerSpec(layer=i, q_heads=4, kv_heads=2, head_dim=16, dtype=dt) for i, dt in enumerate([torch.float32, torch.bfloat16, torch.float32])]
    cfg = LSAConfig(budget=48, chunk_size=8, interval=4, sink_tokens=8, recent_tokens=8, mode="offload", selector="random")
    store = KVStore(specs, cfg, batch=2, capacity=200, device="cpu")
    mirrors = [t for layer in store.layers.values() for t in (layer.mirror_k, layer.mirror_v)]
    storages = {t.untyped_storage().data_ptr() for t in mirrors}
    assert len(storages) == 1
    arena = mirrors[0]._lsa_host_arena
    need = sum(t.numel() * t.element_size() for t in mirrors)
    assert need <= arena.nbytes < need + len(mirrors) * 4096
    assert store.footprint()["mirror_bytes"] == need
