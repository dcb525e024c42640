"""The selection's device-side window and its capture in CUDA graphs (``runtime/selection_graph.py``).

On the CPU: the device masks a captured selection replays equal the host-side chunk rules at every
position; the span rule's free-slot test decided on the device equals the host's; a write-back wider
than the chunks decoded (the captured width) changes nothing; capture is refused where it cannot run.
On CUDA: a store whose selections replay CUDA graphs keeps the same resident sets, pools, mirror and
counters as one that selects op by op, for every selector marked graph-safe, both mirrors, evict mode,
recall lags, and a left-padded batch.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import lsa_rewrite.kernels  # noqa: F401  (registers torch.ops.lsa.*)
from lsa_rewrite.config import LSAConfig, always_resident_chunks
from lsa_rewrite.indexer import IndexerConfig, LSAIndexer
from lsa_rewrite.indexer.model import spread_neighbours
from lsa_rewrite.kernels import unpack_fp8
from lsa_rewrite.runtime.policy import SelectionPolicy
from lsa_rewrite.runtime.selection_graph import write_back_width
from lsa_rewrite.runtime.store import ChunkLayer, KVStore, LayerSpec, StoreError
from lsa_rewrite.selectors import (
    AllReduceSelector, IndexerSelector, QueryAwareSelector, RandomSelector, RecencySelector, make_selector,
)

OPS = torch.ops.lsa
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@pytest.mark.parametrize("chunk, interval, lag, sink, recent", [(4, 4, 0, 4, 8), (8, 8, 2, 0, 1), (4, 12, 3, 9, 0), (16, 16, 0, 16, 32)])
def test_window_masks_match_the_host_chunk_rules(chunk, interval, lag, sink, recent):
    """At every window start of a store (its first token to past its capacity), for sequences with and
    without left padding: the device masks give the host's sink and tail, must-keep chunks, selectable
    chunks, unwritten chunks and free slots."""
    capacity = 13 * chunk - 3  # not a multiple of the chunk: the last chunk is short
    n = math.ceil(capacity / chunk)
    valid = [0, chunk + 3, 2 * chunk]
    config = LSAConfig(budget=capacity, chunk_size=chunk, interval=interval, recall_lag=lag, sink_tokens=sink, recent_tokens=recent)
    policy = SelectionPolicy(
        config, RecencySelector(), batch=len(valid), slots=9, num_chunks=n, capacity=capacity, valid_start=valid, device=torch.device("cpu"),
    )
    for pos in range(0, capacity + 1):
        policy.position.fill_(pos)
        masks = policy.masks()
        host = policy.window(pos)  # no masks: the host-side rules
        device = policy.window(pos, masks)
        for b, vs in enumerate(valid):
            resident = always_resident_chunks(pos, chunk_size=chunk, sink_tokens=sink, recent_tokens=recent, valid_start=vs)
            assert masks.resident[b].nonzero().flatten().tolist() == sorted(resident), (pos, b)
            assert (masks.resident[b] | masks.window[b]).nonzero().flatten().tolist() == sorted(policy.must_keep(b, pos)), (pos, b)
        assert torch.equal(device.selectable(n), host.selectable(n)), pos
        assert torch.equal(device.unwritten(n), torch.arange(n) >= host.written_chunks), pos
        assert int(device.free_slots_tensor()) == host.free_slots, pos


def test_span_rule_with_a_device_slot_count_equals_the_host_count():
    logits = torch.randn(2, 3, 20, generator=torch.Generator().manual_seed(0))
    lenders = torch.rand(3, 20, generator=torch.Generator().manual_seed(1)) > 0.3
    for slots in range(0, 8):
        want = spread_neighbours(logits, 0.4, slots=slots, min_slots=4, lenders=lenders, top=2)
        got = spread_neighbours(logits, 0.4, slots=torch.tensor(slots), min_slots=4, lenders=lenders, top=2)
        assert torch.equal(got, want), slots
    assert not torch.equal(spread_neighbours(logits, 0.4, slots=torch.tensor(4), min_slots=4), logits)


def test_graph_safe_marks_the_selectors_that_can_be_captured():
    indexer = LSAIndexer(IndexerConfig(hidden_size=8, q_heads=4, kv_heads=2, head_dim=16, rank=4, target_layers=(0,)))
    assert QueryAwareSelector.graph_safe and RecencySelector.graph_safe and IndexerSelector(indexer).graph_safe
    assert not getattr(RandomSelector(0), "graph_safe", False)  # draws on the host
    assert not IndexerSelector(indexer, group=object()).graph_safe  # all-reduces its scores
    assert not AllReduceSelector.graph_safe  # a collective per selection, whatever it wraps


def test_capture_is_refused_where_it_cannot_run():
    spec = LayerSpec(layer=0, q_heads=4, kv_heads=2, head_dim=16, dtype=torch.float32)
    config = LSAConfig(budget=64, chunk_size=8, interval=8, sink_tokens=8, recent_tokens=8)
    with pytest.raises(StoreError, match="capture_selection=True needs a CUDA store and a graph_safe selector, but the store is on cpu"):
        KVStore([spec], config, batch=1, capacity=512, capture_selection=True)
    store = KVStore([spec], config, batch=1, capacity=512)  # the default: off the GPU, op by op
    assert not store.selection_captured and not store._graph_width
    if torch.cuda.is_available():
        with pytest.raises(StoreError, match="selector 'random' is not graph_safe"):
            KVStore([spec], config, batch=1, capacity=512, device="cuda", selector=make_selector("random"), capture_selection=True)


# -- decode harness -------------------------------------------------------------------------------

SPECS = [
    LayerSpec(layer=0, q_heads=4, kv_heads=2, head_dim=16, dtype=torch.float32, indexer_hidden=24, indexer_rotary=16),
    LayerSpec(layer=1, q_heads=4, kv_heads=2, head_dim=16, dtype=torch.float32, window=16),
    LayerSpec(layer=2, q_heads=4, kv_heads=1, head_dim=16, dtype=torch.bfloat16),
]


def _history(batch, capacity, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = {}
    for s in SPECS:
        k = torch.randn(batch, s.kv_heads, capacity, s.head_dim, generator=g)
        v = torch.randn(batch, s.kv_heads, capacity, s.head_dim, generator=g)
        out[s.layer] = (k.to(device, s.dtype), v.to(device, s.dtype))
    return out


def _indexer(device, groups=False):
    cfg = IndexerConfig(
        hidden_size=24, q_heads=4, kv_heads=2, head_dim=16, rank=8, target_layers=(0,), neighbour_margin=0.1, neighbour_min_free=2, neighbour_top=1,
        **(dict(ensemble="group", layer_groups=((0, 2),), group_shared=0.5) if groups else {}),
    )
    torch.manual_seed(0)
    return LSAIndexer(cfg).to(device)


def _drive(store: KVStore, hist, prompt: int, steps: int, seed: int, check=None) -> None:
    """Prefill ``prompt`` tokens, then ``steps`` decode steps (``_decode``)."""
    for layer, (k, v) in hist.items():
        store.ingest(layer, k[:, :, :prompt], v[:, :, :prompt])
    store.finish_prefill(prompt)
    g = torch.Generator(device="cpu").manual_seed(seed)
    _taps(store, g)
    store.probe(lambda: None)
    _decode(store, hist, steps, g, check)


def _taps(store: KVStore, g: torch.Generator) -> None:
    """Random query and indexer taps (the same for every store given the same generator state)."""
    for layer in store.chunk_layers:
        layer.q_tap.copy_(torch.randn(layer.q_tap.shape, generator=g).to(layer.q_tap))
        if layer.spec.indexer_hidden:
            layer.idx_x.copy_(torch.randn(layer.idx_x.shape, generator=g).to(layer.idx_x))
            angle = torch.rand(layer.idx_cos.shape, generator=g)
            layer.idx_cos.copy_(angle.cos().to(layer.idx_cos))
            layer.idx_sin.copy_(angle.sin().to(layer.idx_sin))


def _decode(store: KVStore, hist, steps: int, g: torch.Generator, check=None) -> None:
    """``steps`` decode steps with fresh taps, writing each token as the rewritten step does;
    ``check(store)`` after each."""
    for _ in range(steps):
        _taps(store, g)
        store.before_step()
        p = store.length
        for layer, s in store.layers.items():
            k, v = hist[layer]
            if isinstance(s, ChunkLayer):
                OPS.append_kv(s.k_pool, s.v_pool, k[:, :, p], v[:, :, p], store.pos, s.chunk_slot)
                OPS.update_chunk_index(s.kmin, s.kmax, k[:, :, p], store.pos, store.chunk)
            else:
                OPS.ring_append_kv(s.k_ring, s.v_ring, k[:, :, p], v[:, :, p], store.pos)
        store.after_step()
        if check is not None:
            check(store)


def _state(store: KVStore) -> dict[str, torch.Tensor]:
    """Everything a selection decides or moves: tables, resident rows, the mirror, counters."""
    store.synchronize()
    out = {"recalled": store.mover.recalled.clone(), "written_back": store.mover.written_back.clone(), "widened": store.policy.widened.clone()}
    for i, layer in enumerate(store.chunk_layers):
        out[f"{i}.slot_chunk"] = layer.slot_chunk.clone()
        out[f"{i}.chunk_slot"] = layer.chunk_slot.clone()
        out[f"{i}.planned"] = layer.planned.clone()
        out[f"{i}.available"] = layer.available.clone()
        out[f"{i}.dropped"] = layer.dropped.clone()
        held = layer.slot_chunk.reshape(-1) >= 0  # the rows of resident chunks (a freed slot keeps stale bytes)
        out[f"{i}.k_pool"] = layer.k_pool[held].clone()
        out[f"{i}.v_pool"] = layer.v_pool[held].clone()
        if layer.mirror_k is not None:
            # The positions written back so far. Beyond them: uninitialised host memory, and the rest of the
            # last chunk, which the write-back copies while the next step writes it (written back again later).
            # (A packed fp8 row keeps its tokens' scale bytes at its end: unpacked first, then cut per token.)
            for name in ("mirror_k", "mirror_v"):
                mirror = getattr(layer, name)
                tokens = unpack_fp8(mirror, torch.float32) if store.mirror == "fp8" else mirror
                out[f"{i}.{name}"] = tokens.flatten(1, 2)[:, : store.synced].clone()
    return out


def _assert_same(a: dict, b: dict, where: str) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{where}: {key} differs"


def test_a_wider_write_back_changes_nothing():
    """The eager selection looks at the captured width of chunks for its write-back (so that it warms
    the captured kernels up): the tables, pools, mirror and counters are those of the exact width."""
    config = LSAConfig(budget=0.3, chunk_size=8, interval=8, sink_tokens=8, recent_tokens=8, recall_lag=2)
    batch, capacity, prompt = 2, 400, 300
    hist = _history(batch, capacity, "cpu")
    plain = KVStore(SPECS, config, batch=batch, capacity=capacity, valid_start=[0, 13])
    wide = KVStore(SPECS, config, batch=batch, capacity=capacity, valid_start=[0, 13])
    wide.mover.apply = functools.partial(wide.mover.apply, width=7)
    states = []
    for store in (plain, wide):
        seen = []
        _drive(store, hist, prompt, 60, seed=1, check=lambda s: seen.append(_state(s)) if s.steps % 4 == 0 else None)
        states.append(seen)
    assert plain.written_back_chunks > 0 and plain.recalled_chunks > 0
    for i, (a, b) in enumerate(zip(*states)):
        _assert_same(a, b, f"check {i}")


@cuda
@pytest.mark.parametrize(
    "selector, mode, mirror, lag",
    [
        ("query-aware", "offload", "exact", 0),
        ("query-aware", "offload", "exact", 3),
        ("query-aware", "offload", "fp8", 2),
        ("query-aware", "evict", "exact", 0),
        ("indexer", "offload", "exact", 2),
        ("indexer groups shared", "offload", "exact", 2),
        ("recency", "offload", "exact", 1),
    ],
)
def test_captured_selection_matches_the_eager_one(selector, mode, mirror, lag):
    """Two stores fed the same prompt, taps and tokens, one selecting op by op and one replaying its
    captured selection: after every decode step the same tables, resident rows, mirror and counters."""
    device = torch.device("cuda")
    batch, capacity, prompt, steps = 2, 1200, 900, 150
    groups = selector == "indexer groups shared"  # per-layer sets, half of each selection from the shared ranking
    selector = "indexer" if groups else selector
    config = LSAConfig(
        budget=240, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=32, recall_lag=lag, mode=mode, mirror=mirror, selector=selector,
        fallback_budget=360 if selector == "indexer" else None,
    )
    hist = _history(batch, capacity, device)
    stores = []
    for capture in (False, True):
        chosen = IndexerSelector(_indexer(device, groups=groups)) if selector == "indexer" else None
        stores.append(KVStore(SPECS, config, batch=batch, capacity=capacity, valid_start=[0, 37], device=device, selector=chosen, capture_selection=capture))
    states = []
    for store in stores:
        seen = []
        _drive(store, hist, prompt, steps, seed=2, check=lambda s: seen.append(_state(s)))
        states.append(seen)
    eager, captured = stores
    assert captured.selection_captured and not eager.selection_captured
    assert captured.selections == eager.selections >= steps // config.interval
    if selector != "recency" and mode != "evict":  # recency keeps the newest chunks: nothing to recall
        assert eager.recalled_chunks > 0 and eager.written_back_chunks > 0
    for i, (a, b) in enumerate(zip(*states)):
        _assert_same(a, b, f"after step {i + 1}")


@cuda
def test_an_irregular_window_runs_eagerly_and_the_capture_goes_on():
    """A selection with more chunks decoded since the last one than the captured write-back covers
    (``select()`` called off the schedule, here after the length moved on by 60 tokens unwritten, as
    benchmarks/selection.py moves it) runs op by op, with the result of a store that never captured;
    the captured one replays again at the next regular window, with the same result too."""
    device = torch.device("cuda")
    config = LSAConfig(budget=320, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=32, recall_lag=0)
    hist = _history(1, 1600, device)
    stores = [KVStore(SPECS, config, batch=1, capacity=1600, device=device, capture_selection=c) for c in (False, True)]
    for store in stores:
        _drive(store, hist, 900, 80, seed=3)
    assert stores[1].selection_captured
    replays = stores[1]._graphs
    for store in stores:
        store.length += 60  # 4-5 chunks to write back, more than the captured width
        assert len(range(store.synced // 16, math.ceil(store.length / 16))) > write_back_width(16, 16)
        store.select()
    _assert_same(_state(stores[0]), _state(stores[1]), "after the irregular selection")
    for store in stores:
        _decode(store, hist, 40, torch.Generator().manual_seed(4))
    assert stores[1]._graphs is replays  # the same capture, replayed again
    _assert_same(_state(stores[0]), _state(stores[1]), "after regular windows again")


def test_a_store_with_a_recall_pending_is_freed_without_a_gc_pass():
    """The mover's pending install (the tables of a recall not yet in) holds no reference back to the mover or
    the store: a finished generation's store, pools and mirror go when the last reference to it does, not at
    the next cyclic garbage collection (device and pinned host memory would linger between generations)."""
    import gc
    import weakref

    config = LSAConfig(budget=0.3, chunk_size=8, interval=8, sink_tokens=8, recent_tokens=8, recall_lag=3)
    hist = _history(1, 400, "cpu")
    store = KVStore(SPECS, config, batch=1, capacity=400)
    _drive(store, hist, 300, 10, seed=5)  # the selection at step 9 installs its recall at step 12
    assert store.mover.pending is not None
    refs = [weakref.ref(x) for x in (store, store.mover, store.chunk_layers[0])]
    gc.disable()
    try:
        del store
        assert [r() for r in refs] == [None, None, None]
    finally:
        gc.enable()
