"""Unit tests for ``KVStore``: sizing, lossless offload, evict accounting, resident-set invariants, rings.

Decode is simulated the way a rewritten step drives the store: ``before_step()``, then the LSA ops write
the token (``append_kv`` + ``update_chunk_index`` for chunk layers, ``ring_append_kv`` for rings), then
``after_step()``. Every layer's full K/V history is drawn up front, so what the store holds can be
compared bit for bit with what was written.
"""

from __future__ import annotations

import gc
import math

import pytest
import torch

import lsa_rewrite.kernels  # noqa: F401  (registers torch.ops.lsa.*)
from lsa_rewrite.config import LSAConfig
from lsa_rewrite.kernels import pack_fp8, unpack_fp8
from lsa_rewrite.runtime.host_memory import HostArena
from lsa_rewrite.runtime.policy import min_slots
from lsa_rewrite.runtime.store import ChunkLayer, KVStore, LayerSpec, LSABudgetWarning, RingLayer, StoreError

OPS = torch.ops.lsa
C = 8  # chunk_size in every test here

FULL = LayerSpec(layer=0, q_heads=4, kv_heads=2, head_dim=16, dtype=torch.float32)
FULL_BF16 = LayerSpec(layer=3, q_heads=2, kv_heads=1, head_dim=8, dtype=torch.bfloat16)
RING = LayerSpec(layer=1, q_heads=4, kv_heads=2, head_dim=16, dtype=torch.float32, window=8)
SPECS = [FULL, RING, FULL_BF16]


def config(**overrides) -> LSAConfig:
    fields = dict(budget=48, chunk_size=C, interval=4, sink_tokens=8, recent_tokens=8, mode="offload", selector="random")
    fields.update(overrides)
    return LSAConfig(**fields)


def kv_token_bytes(spec: LayerSpec) -> int:
    return 2 * spec.kv_heads * spec.head_dim * torch.empty((), dtype=spec.dtype).element_size()


def draw_history(specs, *, batch, capacity, gen, signature=0.0):
    """Per layer, K/V [B, Hkv, capacity, D] for every position the test may write.

    ``signature`` > 0 adds that much to key dimension ``position // C`` so a query along that
    dimension singles out one chunk (used to steer the query-aware selector).
    """
    hist = {}
    for s in specs:
        k = torch.randn(batch, s.kv_heads, capacity, s.head_dim, generator=gen)
        v = torch.randn(batch, s.kv_heads, capacity, s.head_dim, generator=gen)
        if signature:
            chunk_of = torch.arange(capacity) // C
            k[:, :, torch.arange(capacity), chunk_of] += signature
        hist[s.layer] = (k.to(s.dtype), v.to(s.dtype))
    return hist


def prefill(store: KVStore, hist, length: int) -> None:
    for layer, (k, v) in hist.items():
        store.ingest(layer, k[:, :, :length], v[:, :, :length])
    store.finish_prefill(length)


def decode(store: KVStore, hist, steps: int, *, on_selection=None, before=None) -> None:
    """Run ``steps`` decode steps; ``before(store)`` runs first in each (e.g. to write q_tap),
    ``on_selection(store)`` right after a before_step() that selected."""
    for _ in range(steps):
        if before is not None:
            before(store)
        selections = store.selections
        store.before_step()
        assert int(store.pos) == store.length
        if store.selections != selections and on_selection is not None:
            on_selection(store)
        write_token(store, hist)
        store.after_step()


def write_token(store: KVStore, hist) -> None:
    """What the rewritten step writes for the token at ``store.length``, every layer."""
    p = store.length
    for layer, layer_store in store.layers.items():
        k, v = hist[layer]
        k_tok, v_tok = k[:, :, p], v[:, :, p]  # [B, Hkv, D]
        if isinstance(layer_store, ChunkLayer):
            OPS.append_kv(layer_store.k_pool, layer_store.v_pool, k_tok, v_tok, store.pos, layer_store.chunk_slot)
            OPS.update_chunk_index(layer_store.kmin, layer_store.kmax, k_tok, store.pos, store.chunk)
        else:
            OPS.ring_append_kv(layer_store.k_ring, layer_store.v_ring, k_tok, v_tok, store.pos)


def chunk_layers(store: KVStore) -> dict[int, ChunkLayer]:
    return {layer: s for layer, s in store.layers.items() if isinstance(s, ChunkLayer)}


def resident_sets(store: KVStore) -> dict[tuple[int, int], set[int]]:
    return {(layer, b): {c for c in s.slot_chunk[b].tolist() if c >= 0} for layer, s in chunk_layers(store).items() for b in range(store.batch)}


def check_resident_set(store: KVStore, hist, *, ahead_to: int | None = None) -> None:
    """Invariants that hold after finish_prefill() and after every selection, for every layer and sequence.

    ``ahead_to``: the end of the positions that must have slots (default: the coming window and the lag).
    """
    cfg, pos = store.config, store.length
    ahead_to = pos + cfg.interval + cfg.lag if ahead_to is None else ahead_to
    for layer, s in chunk_layers(store).items():
        k_hist, v_hist = hist[layer]
        assert s.slot_chunk.shape == (store.batch, store.slots) and s.chunk_slot.shape == (store.batch, store.num_chunks)
        for b in range(store.batch):
            row = s.slot_chunk[b].tolist()
            held = [c for c in row if c >= 0]
            assert len(held) == len(set(held)), f"layer {layer} seq {b}: a chunk sits in two slots: {row}"
            assert all(0 <= c < store.num_chunks for c in held)
            # chunk_slot is the inverse of slot_chunk
            for slot, c in enumerate(row):
                if c >= 0:
                    assert int(s.chunk_slot[b, c]) == slot
            assert set(torch.nonzero(s.chunk_slot[b] >= 0).flatten().tolist()) == set(held)
            # always resident: sink, recent tail, and the chunks the next window writes
            start = store.valid_start_host[b]
            sink = {p // C for p in range(start, min(start + cfg.sink_tokens, pos))}
            recent = {p // C for p in range(max(0, pos - cfg.recent_tokens), pos)}
            window = {p // C for p in range(pos, min(ahead_to, store.capacity))}
            missing = (sink | recent | window) - set(held)
            assert not missing, f"layer {layer} seq {b} at pos {pos}: chunks {sorted(missing)} must be resident"
            # under a budget, no slot goes to a chunk that holds nothing yet and is not written in the
            # coming window (when everything fits, chunk i simply lives in slot i)
            unwritten = {c for c in held if c * C >= pos} - window
            assert store.all_resident or not unwritten, f"layer {layer} seq {b} at pos {pos}: unwritten chunks {sorted(unwritten)} are resident"
            # every resident chunk holds exactly what was written at its positions so far
            for slot, c in enumerate(row):
                written = min(C, pos - c * C)
                if c < 0 or written <= 0:
                    continue
                pool_row = b * store.slots + slot
                expected_k = k_hist[b, :, c * C : c * C + written].transpose(0, 1)  # [n, Hkv, D]
                expected_v = v_hist[b, :, c * C : c * C + written].transpose(0, 1)
                assert torch.equal(s.k_pool[pool_row, :written], expected_k), f"layer {layer} seq {b}: chunk {c} K differs"
                assert torch.equal(s.v_pool[pool_row, :written], expected_v), f"layer {layer} seq {b}: chunk {c} V differs"


def check_mirror(store: KVStore, hist, upto: int) -> None:
    """The mirror holds the full history of every position below ``upto``."""
    for layer, s in chunk_layers(store).items():
        k_hist, v_hist = hist[layer]
        n = math.ceil(upto / C)
        mirror_k = s.mirror_k[:, :n].flatten(1, 2)[:, :upto]  # [B, upto, Hkv, D]
        mirror_v = s.mirror_v[:, :n].flatten(1, 2)[:, :upto]
        assert torch.equal(mirror_k, k_hist[:, :, :upto].transpose(1, 2)), f"layer {layer}: mirror K differs"
        assert torch.equal(mirror_v, v_hist[:, :, :upto].transpose(1, 2)), f"layer {layer}: mirror V differs"


def check_chunk_index(store: KVStore, hist) -> None:
    """kmin/kmax of every chunk with real (non-padding) tokens are the bounds over those tokens."""
    for layer, s in chunk_layers(store).items():
        k_hist = hist[layer][0]
        for b in range(store.batch):
            for c in range(math.ceil(store.length / C)):
                lo, hi = max(c * C, store.valid_start_host[b]), min((c + 1) * C, store.length)
                if lo >= hi:
                    continue
                tokens = k_hist[b, :, lo:hi]  # [Hkv, n, D]
                assert torch.equal(s.kmin[b, c], tokens.amin(1)), f"layer {layer} seq {b}: kmin of chunk {c}"
                assert torch.equal(s.kmax[b, c], tokens.amax(1)), f"layer {layer} seq {b}: kmax of chunk {c}"


# -- sizing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("specs", [[FULL], SPECS], ids=["one-layer", "mixed"])
@pytest.mark.parametrize("budget", [0.3, 0.5])
def test_float_budget_bounds_the_resident_bytes(budget, specs):
    batch, capacity = 2, 512
    gen = torch.Generator().manual_seed(int(budget * 10))
    store = KVStore(specs, config(budget=budget), batch=batch, capacity=capacity)
    prefill(store, draw_history(specs, batch=batch, capacity=capacity, gen=gen), capacity - 1)

    fp = store.footprint()
    assert fp["resident_kv_bytes"] == sum(t.numel() * t.element_size() for t in store.device_tensors())
    pool_names = ("k_pool", "v_pool", "k_ring", "v_ring")
    pools = sum(t.numel() * t.element_size() for s in store.layers.values() for n, t in s.device_tensors().items() if n in pool_names)
    assert fp["pool_bytes"] == pools
    dense = sum(batch * (capacity - 1 if s.window is None else s.window) * kv_token_bytes(s) for s in specs)
    assert fp["dense_kv_bytes"] == dense
    assert fp["ratio"] == pytest.approx(fp["resident_kv_bytes"] / dense)
    one_chunk = batch * C * sum(kv_token_bytes(s) for s in specs) / dense  # one pool chunk (ring: one window) per layer
    assert budget - one_chunk <= fp["ratio"] <= budget + one_chunk
    assert C * store.slots < capacity, "a fraction of the context must not keep everything resident"
    assert fp["mirror_bytes"] > 0


@pytest.mark.parametrize("specs", [[FULL], [FULL, FULL_BF16], SPECS], ids=["one-layer", "two-dtypes", "mixed"])
@pytest.mark.parametrize("capacity", [512, 1000])
@pytest.mark.parametrize("budget", [0.3, 0.37, 0.5, 0.77])
def test_float_budget_takes_as_many_slots_as_fit(budget, capacity, specs):
    """Per sequence, pool + chunk index + tables + query tap of the chunk layers fit in budget x their
    dense cache at full capacity, and one more slot would not."""
    batch = 2
    store = KVStore(specs, config(budget=budget), batch=batch, capacity=capacity)
    layers = chunk_layers(store).values()
    held = sum(t.numel() * t.element_size() for s in layers for t in s.device_tensors().values())
    one_more_slot = batch * sum(C * kv_token_bytes(s.spec) + 16 for s in layers)  # pool chunk + slot_chunk and planned entries
    allowed = budget * batch * capacity * sum(kv_token_bytes(s.spec) for s in layers)
    assert held <= allowed < held + one_more_slot
    assert store.slots < store.num_chunks


@pytest.mark.parametrize("budget, slots", [(48, 6), (50, 7), (41, 6), (64, 8)])
def test_int_budget_counts_resident_tokens(budget, slots):
    batch, capacity = 3, 256
    store = KVStore([FULL, RING], config(budget=budget), batch=batch, capacity=capacity)
    fp = store.footprint()
    assert store.slots == fp["slots_per_sequence"] == slots == math.ceil(budget / C)
    layer = store.layers[FULL.layer]
    assert layer.k_pool.shape == (batch * slots, C, FULL.kv_heads, FULL.head_dim)
    assert layer.slot_chunk.shape == (batch, slots)
    assert fp["mirror_bytes"] == batch * (capacity // C) * C * kv_token_bytes(FULL)


@pytest.mark.parametrize("overrides", [dict(mode="dense", budget=0.01), dict(budget=100_000)], ids=["dense", "int-over-capacity"])
def test_budget_covering_the_context_keeps_every_chunk_resident(overrides):
    batch, capacity, prompt = 2, 96, 37
    gen = torch.Generator().manual_seed(1)
    store = KVStore(SPECS, config(**overrides), batch=batch, capacity=capacity, valid_start=[0, 6])
    hist = draw_history(SPECS, batch=batch, capacity=capacity, gen=gen)
    prefill(store, hist, prompt)

    assert store.slots == store.num_chunks == capacity // C
    assert store.footprint()["mirror_bytes"] == 0
    for s in chunk_layers(store).values():
        assert s.mirror_k is None and s.mirror_v is None
        assert torch.equal(s.slot_chunk, torch.arange(store.num_chunks).expand(batch, -1))
        assert torch.equal(s.chunk_slot, torch.arange(store.num_chunks).expand(batch, -1))
    check_resident_set(store, hist)
    decode(store, hist, capacity - prompt)
    assert store.selections == 0
    check_resident_set(store, hist)  # every chunk, every written token
    check_chunk_index(store, hist)


@pytest.mark.parametrize("budget", [16, 32], ids=["int-2-slots", "int-4-slots"])
def test_budget_too_small_for_sink_recent_interval(budget):
    with pytest.raises(StoreError) as err:
        KVStore([FULL], config(budget=budget), batch=1, capacity=512)
    message = str(err.value)
    for part in ("sink_tokens=8", "recent_tokens=8", "interval=4", "raise the budget"):
        assert part in message


def test_a_fraction_too_small_for_sink_recent_interval_takes_the_minimum():
    cfg = config(budget=0.2)
    with pytest.warns(LSABudgetWarning, match="are kept resident instead") as caught:
        store = KVStore([FULL], cfg, batch=1, capacity=512)
    assert len(caught) == 1 and store.slots == min_slots(cfg) < store.num_chunks
    for part in ("sink_tokens=8", "recent_tokens=8", "interval=4"):
        assert part in store.budget_note


def test_valid_start_must_match_the_batch():
    with pytest.raises(StoreError, match="valid_start has 1 entries for a batch of 2"):
        KVStore([FULL], config(), batch=2, capacity=64, valid_start=[0])


# -- capacity ----------------------------------------------------------------------------------


def test_decoding_past_capacity_says_what_to_raise():
    batch, capacity, prompt = 1, 64, 50
    gen = torch.Generator().manual_seed(2)
    store = KVStore([FULL, RING], config(), batch=batch, capacity=capacity)
    hist = draw_history([FULL, RING], batch=batch, capacity=capacity, gen=gen)
    prefill(store, hist, prompt)
    decode(store, hist, capacity - prompt)  # fills the store exactly
    assert store.length == capacity
    with pytest.raises(StoreError, match=r"capacity of 64 tokens; raise LSAConfig\.max_context"):
        store.before_step()


def test_prompt_longer_than_capacity_says_what_to_raise():
    store = KVStore([FULL], config(), batch=1, capacity=64)
    k = torch.randn(1, FULL.kv_heads, 65, FULL.head_dim)
    with pytest.raises(StoreError, match=r"65 tokens exceeds the store capacity of 64; raise LSAConfig\.max_context"):
        store.ingest(FULL.layer, k, k)
    with pytest.raises(StoreError, match=r"raise LSAConfig\.max_context"):
        store.finish_prefill(64)  # no room left to decode


def test_second_prefill_is_refused():
    gen = torch.Generator().manual_seed(3)
    store = KVStore([FULL], config(), batch=1, capacity=128)
    hist = draw_history([FULL], batch=1, capacity=128, gen=gen)
    prefill(store, hist, 20)
    with pytest.raises(StoreError, match="one prefill"):
        store.ingest(FULL.layer, hist[0][0][:, :, :20], hist[0][1][:, :, :20])


# -- offload: lossless eviction and recall -----------------------------------------------------


# two prompt lengths so that selections land on every position modulo the chunk size
@pytest.mark.parametrize("seed, prompt", [(0, 43), (1, 46)])
def test_offload_recall_is_lossless(seed, prompt):
    batch, capacity, steps = 2, 128, 80
    gen = torch.Generator().manual_seed(100 + seed)
    store = KVStore(SPECS, config(seed=seed), batch=batch, capacity=capacity, valid_start=[0, 5])
    hist = draw_history(SPECS, batch=batch, capacity=capacity, gen=gen)
    prefill(store, hist, prompt)
    check_resident_set(store, hist)
    log = [resident_sets(store)]

    def on_selection(store):
        check_resident_set(store, hist)
        log.append(resident_sets(store))

    decode(store, hist, steps, on_selection=on_selection)

    selecting_steps = [i for i in range(steps) if i >= 1 and (i - 1) % store.config.interval == 0]
    assert store.selections == len(log) - 1 == len(selecting_steps)
    # the schedule must actually have evicted and recalled chunks, prompt and decoded ones
    recalled_prompt = recalled_decoded = 0
    for key in log[0]:
        seen_then_gone: set[int] = set()
        for before, after in zip(log, log[1:]):
            came_back = (after[key] - before[key]) & seen_then_gone
            recalled_prompt += sum(c * C < prompt for c in came_back)
            recalled_decoded += sum(c * C >= prompt for c in came_back)
            seen_then_gone |= before[key] - after[key]
    assert recalled_prompt > 0 and recalled_decoded > 0, (recalled_prompt, recalled_decoded)
    # the mirror holds the whole history up to the last selection's write-back
    check_mirror(store, hist, store.synced)
    assert store.synced == prompt + selecting_steps[-1]
    check_chunk_index(store, hist)
    assert store.footprint()["dropped_chunks"] == 0


@pytest.mark.parametrize("lag", [1, 3, 7])
def test_recall_lag_drops_at_once_and_adds_recalled_chunks_lag_steps_later(lag):
    """With ``recall_lag``, a selection removes the chunks it drops from the live table at once and
    installs the chunks it recalls exactly ``lag`` steps later, bit-identical to their history; the
    chunk being written always has a slot, and nothing is lost."""
    batch, capacity, prompt, steps, interval = 2, 160, 51, 90, 8
    gen = torch.Generator().manual_seed(40 + lag)
    store = KVStore(SPECS, config(budget=64, interval=interval, recall_lag=lag, seed=lag), batch=batch, capacity=capacity, valid_start=[0, 3])
    hist = draw_history(SPECS, batch=batch, capacity=capacity, gen=gen)
    prefill(store, hist, prompt)
    check_resident_set(store, hist)
    live = resident_sets(store)
    waiting: dict = {}  # (layer, b) -> chunks planned but not yet in the live table
    selected_at = None
    recalled = 0

    def on_step(store):
        nonlocal live, waiting, selected_at, recalled
        now = resident_sets(store)
        for layer, s in chunk_layers(store).items():  # the token about to be written has a slot
            for b in range(batch):
                assert int(s.chunk_slot[b, store.length // C]) >= 0, (layer, b, store.length)
        if store.steps == selected_at:  # selection just ran: drops only, plus unwritten incoming chunks
            for key, held in now.items():
                planned = set(chunk_layers(store)[key[0]].host_slot_chunk[key[1]]) - {-1}
                assert held <= planned
                assert held - live[key] <= {c for c in planned if c * C >= store.length}, "a recalled chunk joined before its copy"
                waiting[key] = planned - held
            recalled += sum(len(w) for w in waiting.values())
        elif selected_at is not None and store.steps == selected_at + lag:  # the swap
            for key, held in now.items():
                assert waiting[key] <= held, f"{key}: recalled chunks {sorted(waiting[key] - held)} missing after the lag"
            check_resident_set(store, hist, ahead_to=store.length - lag + interval + lag)
        elif selected_at is not None and store.steps < selected_at + lag:
            for key, held in now.items():
                assert not (waiting[key] & held), "the table changed between the selection and the swap"
        live = now

    for _ in range(steps):
        if store.steps == store.next_selection:
            selected_at = store.steps
        store.before_step()
        on_step(store)
        write_token(store, hist)
        store.after_step()

    assert recalled > 0 and store.recalled_chunks > 0
    check_mirror(store, hist, store.synced)
    check_chunk_index(store, hist)


def test_recall_lag_is_checked_against_the_interval():
    assert LSAConfig(interval=64).lag == 4 and LSAConfig(interval=8).lag == 0
    assert LSAConfig(interval=8, recall_lag=7).lag == 7
    for bad in (8, -1, 1.5, True):
        with pytest.raises(ValueError, match="recall_lag must be None or an int in \\[0, interval=8\\)"):
            LSAConfig(interval=8, recall_lag=bad)


def test_query_aware_selection_follows_the_query_per_sequence():
    """Steer the query-aware selector through q_tap: a prompt chunk and a decoded chunk are evicted and
    recalled bit-identical, and the two sequences of the batch follow different queries."""
    spec = LayerSpec(layer=2, q_heads=2, kv_heads=1, head_dim=32, dtype=torch.float32)
    batch, capacity, prompt, steps = 2, 128, 48, 72
    gen = torch.Generator().manual_seed(5)
    store = KVStore([spec], config(selector="query-aware"), batch=batch, capacity=capacity, valid_start=[0, 3])
    hist = draw_history([spec], batch=batch, capacity=capacity, gen=gen, signature=30.0)
    prefill(store, hist, prompt)
    layer = store.layers[spec.layer]

    def plan(b, pos):  # -> (wanted chunk, unwanted chunk)
        schedule = {
            0: [(69, 1, 2), (85, 2, 6), (101, 6, 1), (capacity, 1, 6)],
            1: [(69, 2, 3), (85, 3, 2), (101, 7, 2), (capacity, 2, 7)],
        }[b]
        return next((want, avoid) for until, want, avoid in schedule if pos < until)

    def steer(store):
        layer.q_tap.zero_()
        for b in range(batch):
            want, avoid = plan(b, store.length)
            layer.q_tap[b, :, want] = 1.0
            layer.q_tap[b, :, avoid] = -1.0

    def on_selection(store):
        check_resident_set(store, hist)
        for b in range(batch):
            want, avoid = plan(b, store.length)
            held = layer.slot_chunk[b].tolist()
            assert want in held and avoid not in held, (b, store.length, want, avoid, held)
            # the wanted chunk's slot is bit-identical to its whole history once it is fully written
            if (want + 1) * C <= store.length:
                row = b * store.slots + held.index(want)
                assert torch.equal(layer.k_pool[row], hist[2][0][b, :, want * C : (want + 1) * C].transpose(0, 1))
                assert torch.equal(layer.v_pool[row], hist[2][1][b, :, want * C : (want + 1) * C].transpose(0, 1))
        both = [set(layer.slot_chunk[b].tolist()) for b in range(batch)]
        if store.length < 69:  # sequence 1 wants chunk 2, which sequence 0 avoids
            assert 2 in both[1] and 2 not in both[0]

    assert 1 not in layer.slot_chunk[0].tolist()  # the first placement keeps the newest chunks
    decode(store, hist, steps, before=steer, on_selection=on_selection)
    # every phase of the plan ran, so decoded chunks 6 (sequence 0) and 7 (sequence 1) were evicted
    # (avoided) and later recalled (wanted), as were prompt chunks 1 and 2
    assert store.selections == 18 and prompt + 1 + 4 * 17 >= 101


# -- evict -------------------------------------------------------------------------------------


def test_evict_mode_drops_for_good():
    """No host copy at any point: the prefill keeps the first resident set in the pool and the rest of the
    prompt is gone (and counted) at once; later, every chunk that leaves the pool is gone for good."""
    batch, capacity, prompt, steps = 2, 128, 75, 50  # more prompt chunks than slots: some are dropped at the prefill
    gen = torch.Generator().manual_seed(7)
    store = KVStore(SPECS, config(mode="evict", seed=3), batch=batch, capacity=capacity, valid_start=[0, 5])
    hist = draw_history(SPECS, batch=batch, capacity=capacity, gen=gen)
    prefill(store, hist, prompt)
    check_resident_set(store, hist)
    fp = store.footprint()
    assert fp["mirror_bytes"] == 0 and fp["host_bytes"] == 0 and fp["mirror"] == "none"

    prompt_chunks = set(range(math.ceil(prompt / C)))
    held = resident_sets(store)
    assert all(prompt_chunks - h for h in held.values())
    ever = {key: prompt_chunks | h for key, h in held.items()}
    gone = {key: prompt_chunks - h for key, h in held.items()}
    assert fp["dropped_chunks"] == sum(len(g) for g in gone.values()) > 0

    def on_selection(store):
        check_resident_set(store, hist)
        assert store.footprint()["host_bytes"] == 0
        for key, held in resident_sets(store).items():
            assert not (held & gone[key]), f"{key}: dropped chunks {sorted(held & gone[key])} came back"
            ever[key] |= held
            gone[key] = ever[key] - held

    decode(store, hist, steps, on_selection=on_selection)

    dropped = store.footprint()["dropped_chunks"]
    assert dropped > fp["dropped_chunks"]
    assert dropped == sum(len(g) for g in gone.values())
    assert all(s.mirror_k is None for s in chunk_layers(store).values())


def live_host_arenas() -> int:
    gc.collect()
    return sum(type(o) is HostArena for o in gc.get_objects())


@pytest.mark.parametrize("mode", ["evict", "offload"])
def test_host_bytes_against_the_context(mode):
    """Evict mode allocates no host memory for KV at any point (during the prompt's ingest included),
    whatever the context; offload's mirror grows with it, and footprint() reports its allocation."""
    host = {}
    for capacity in (256, 2048):
        gen = torch.Generator().manual_seed(capacity)
        arenas = live_host_arenas()
        store = KVStore(SPECS, config(mode=mode, seed=1), batch=2, capacity=capacity)
        hist = draw_history(SPECS, batch=2, capacity=capacity, gen=gen)
        prompt = capacity - 40
        seen = [store.footprint()["host_bytes"]]
        for layer, (k, v) in hist.items():
            store.ingest(layer, k[:, :, :prompt], v[:, :, :prompt])
            seen.append(store.footprint()["host_bytes"])
        store.finish_prefill(prompt)
        decode(store, hist, 12)
        seen.append(store.footprint()["host_bytes"])
        assert store.selections >= 2 and len(set(seen)) == 1, seen
        host[capacity] = seen[0]
        if mode == "evict":
            assert live_host_arenas() == arenas, "evict mode allocated a host arena"
        else:
            arena = chunk_layers(store)[FULL.layer].mirror_k._lsa_host_arena
            assert host[capacity] == arena.nbytes >= store.footprint()["mirror_bytes"] > 0
        del store
    if mode == "evict":
        assert host == {256: 0, 2048: 0}
    else:
        assert host[2048] > 7 * host[256]


# -- the fp8 mirror ----------------------------------------------------------------------------


def test_fp8_mirror_halves_or_quarters_the_host_bytes():
    """Per token and head, D fp8 codes and a scale byte: (D + 1) / (2 D) of bf16, (D + 1) / (4 D) of fp32."""
    for dtype, share in ((torch.bfloat16, 2), (torch.float16, 2), (torch.float32, 4)):
        specs = [LayerSpec(layer=i, q_heads=8, kv_heads=2, head_dim=128, dtype=dtype) for i in range(2)]
        fp = {}
        for mirror in ("exact", "fp8"):
            store = KVStore(specs, config(mirror=mirror), batch=2, capacity=1024)
            fp[mirror] = store.footprint()
            assert fp[mirror]["mirror"] == mirror
        assert fp["fp8"]["mirror_bytes"] * share * 128 == fp["exact"]["mirror_bytes"] * 129
        assert fp["fp8"]["host_bytes"] / fp["exact"]["host_bytes"] <= 129 / (128 * share) + 1e-3
        # the device side is the same: resident chunks stay in the model's dtype
        assert fp["fp8"]["resident_kv_bytes"] == fp["exact"]["resident_kv_bytes"]


def test_fp8_mirror_recalls_within_the_fp8_bound_and_history_is_dequantised():
    """Decode with a random selector over the fp8 mirror: every resident chunk is either exact (it never
    left the pool) or exactly the dequantised mirror copy (it was recalled), which is within fp8's bound;
    the mirror holds the packed history; history() gives resident chunks exactly and the rest dequantised."""
    batch, capacity, prompt, steps = 2, 160, 75, 60
    gen = torch.Generator().manual_seed(5)
    store = KVStore(SPECS, config(mirror="fp8", seed=4), batch=batch, capacity=capacity, valid_start=[0, 5])
    hist = draw_history(SPECS, batch=batch, capacity=capacity, gen=gen)
    prefill(store, hist, prompt)
    lossy = 0

    def check(store):
        nonlocal lossy
        pos = store.length
        for layer, s in chunk_layers(store).items():
            k_hist, v_hist = hist[layer]
            for b in range(batch):
                for slot, c in enumerate(s.slot_chunk[b].tolist()):
                    written = min(C, pos - c * C)
                    if c < 0 or written <= 0:
                        continue
                    for pool, full in ((s.k_pool, k_hist), (s.v_pool, v_hist)):
                        got = pool[b * store.slots + slot, :written]
                        want = full[b, :, c * C : c * C + written].transpose(0, 1)
                        if not torch.equal(got, want):
                            assert torch.equal(got, unpack_fp8(pack_fp8(want), want.dtype)), f"layer {layer} seq {b} chunk {c}"
                            lossy += 1

    decode(store, hist, steps, on_selection=check)
    assert store.recalled_chunks > 0 and lossy > 0, "nothing came back through the fp8 mirror"
    store.synchronize()
    n = store.synced // C
    for layer, s in chunk_layers(store).items():
        k_hist, v_hist = hist[layer]
        assert s.mirror_k.dtype == torch.uint8 and s.mirror_k.shape[-1] == s.spec.head_dim + 1
        want = pack_fp8(k_hist[:, :, : n * C].transpose(1, 2).reshape(batch, n, C, s.spec.kv_heads, s.spec.head_dim))
        assert torch.equal(s.mirror_k[:, :n], want)
        # history(): resident chunks as the pool holds them (exact, or dequantised when they were recalled),
        # the others dequantised from the mirror
        k, v = store.history(layer)
        length, from_mirror = store.length, 0
        for b in range(batch):
            resident = {c for c in s.slot_chunk[b].tolist() if c >= 0}
            for c in range(math.ceil(length / C)):
                got = k[b, :, c * C : min((c + 1) * C, length)]
                exact = k_hist[b, :, c * C : min((c + 1) * C, length)]
                rounded = unpack_fp8(pack_fp8(exact.transpose(0, 1)), exact.dtype).transpose(0, 1)
                if c in resident:
                    row = b * store.slots + int(s.chunk_slot[b, c])
                    assert torch.equal(got, s.k_pool[row, : got.shape[1]].transpose(0, 1))
                else:
                    assert torch.equal(got, rounded) and not torch.equal(got, exact)
                    from_mirror += 1
        assert from_mirror > 0


# -- rings -------------------------------------------------------------------------------------


# -- rings -------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [5, 8, 21])
def test_ring_holds_the_last_window(prompt):
    batch, capacity = 2, 64
    gen = torch.Generator().manual_seed(prompt)
    store = KVStore(SPECS, config(), batch=batch, capacity=capacity, valid_start=[0, 2])
    hist = draw_history(SPECS, batch=batch, capacity=capacity, gen=gen)
    ring = store.layers[RING.layer]
    assert isinstance(ring, RingLayer)
    before_k = ring.k_ring.clone()
    prefill(store, hist, prompt)

    def check(length):
        k, v = hist[RING.layer]
        w = RING.window
        for p in range(max(0, length - w), length):
            assert torch.equal(ring.k_ring[:, p % w], k[:, :, p]) and torch.equal(ring.v_ring[:, p % w], v[:, :, p])
        for slot in range(length, w):  # never written
            assert torch.equal(ring.k_ring[:, slot], before_k[:, slot])

    check(prompt)
    decode(store, hist, 13)
    check(prompt + 13)


# -- left padding ------------------------------------------------------------------------------


def test_selection_never_spends_a_slot_on_a_padding_only_chunk():
    spec = LayerSpec(layer=0, q_heads=2, kv_heads=1, head_dim=16, dtype=torch.float32)
    batch, capacity, prompt, padding = 2, 128, 64, 30  # sequence 1: chunks 0..2 are all padding
    store = KVStore([spec], config(selector="query-aware"), batch=batch, capacity=capacity, valid_start=[0, padding])
    gen = torch.Generator().manual_seed(4)
    k = torch.rand(batch, 1, capacity, 16, generator=gen) + 0.5  # every real key positive ...
    v = torch.randn(batch, 1, capacity, 16, generator=gen)
    hist = {spec.layer: (k, v)}
    prefill(store, hist, prompt)
    layer = store.layers[spec.layer]
    decode(store, hist, 1)
    layer.q_tap.fill_(-1.0)  # ... so every real chunk's bound is negative; a padding chunk's is 0
    decode(store, hist, 1)
    assert store.selections == 1
    held = set(layer.slot_chunk[1].tolist())
    assert not held & set(range(padding // C)), f"padding-only chunks resident: {sorted(held & set(range(padding // C)))}"


def test_selection_never_reads_device_values_on_the_host(monkeypatch):
    """A selection is device work only (no .item()/.tolist()/bool()/int() of a tensor, which would
    sync with the GPU): every such read raises while it runs. The copies it queues are recorded and
    applied afterwards, and the result is checked as usual."""
    batch, capacity, prompt, interval = 2, 160, 60, 8
    gen = torch.Generator().manual_seed(9)
    store = KVStore(SPECS, config(budget=64, interval=interval, recall_lag=2, selector="query-aware"), batch=batch, capacity=capacity, valid_start=[0, 3])
    hist = draw_history(SPECS, batch=batch, capacity=capacity, gen=gen)
    prefill(store, hist, prompt)
    decode(store, hist, 1 + interval)  # the next before_step() runs the second scheduled selection
    assert store.steps == store.next_selection

    import lsa_rewrite.runtime.mover as store_module

    queued = []
    real_copy = store_module._copy
    monkeypatch.setattr(store_module, "_copy", lambda *args: queued.append(args))

    def host_read(*_args, **_kwargs):
        raise AssertionError("the selection read a tensor's value on the host")

    selections = store.selections
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"):
            m.setattr(torch.Tensor, name, host_read)
        store.before_step()
    assert store.selections == selections + 1
    for args in queued:  # what the side stream would have done
        real_copy(*args)
    assert queued, "the selection queued no copies"
    monkeypatch.undo()
    # decode through the lag (the first step writes at the selection's position) and check the set it planned
    for _ in range(store.lag):
        write_token(store, hist)
        store.after_step()
        store.before_step()
    check_resident_set(store, hist, ahead_to=store.length - store.lag + interval + store.lag)


def test_state_contract_device_check_accepts_an_unindexed_device():
    """``KVStore(device="cuda")`` allocates on ``cuda:0``: the contract check must accept that (GPU run 36)."""
    from lsa_rewrite.runtime.state import same_device

    assert same_device(torch.device("cuda", 0), torch.device("cuda"))
    assert same_device(torch.device("cuda", 1), torch.device("cuda", 1))
    assert not same_device(torch.device("cuda", 1), torch.device("cuda", 0))
    assert not same_device(torch.device("cpu"), torch.device("cuda"))


def test_recall_lag_max_is_checked_against_lag_and_interval():
    assert LSAConfig(interval=8, recall_lag=2).lag_max == 2
    assert LSAConfig(interval=8, recall_lag=2, recall_lag_max=7).lag_max == 7
    for bad in (1, 8, 1.5, True):
        with pytest.raises(ValueError, match="recall_lag_max must be None or an int in \\[recall_lag=2, interval=8\\)"):
            LSAConfig(interval=8, recall_lag=2, recall_lag_max=bad)


class _CopiesDoneAt:
    """Stands in for the recall copies' CUDA event: ``query()`` is True once ``clock[0] >= at``."""

    def __init__(self, clock: list[int], at: int):
        self.clock, self.at = clock, at

    def query(self) -> bool:
        return self.clock[0] >= self.at


@pytest.mark.parametrize("done_at, expected", [(3, 3), (5, 5), (99, 6)])
def test_recall_lag_max_swaps_once_the_copies_are_done(done_at, expected):
    """Between ``recall_lag`` and ``recall_lag_max`` steps after a selection, the recalled chunks join at
    the first step whose copies are done (a non-blocking query), and at ``recall_lag_max`` at the latest."""
    store = KVStore(SPECS, config(budget=64, interval=8, recall_lag=2, recall_lag_max=6), batch=2, capacity=160, valid_start=[0, 3])
    hist = draw_history(SPECS, batch=2, capacity=160, gen=torch.Generator().manual_seed(5))
    prefill(store, hist, 51)
    mover = store.mover
    mover.apply(store.policy.choose(store.chunk_layers, mover.available, store.length), written=range(0), lag=2, lag_max=6, evict=False, step=0)
    clock = [0]
    mover.pending = (mover.pending[0], _CopiesDoneAt(clock, done_at))
    due = []
    for step in range(10):
        clock[0] = step
        due.append(mover.swap_due(step))
    assert due.index(True) == max(2, min(expected, 6))
    assert all(due[due.index(True):])


def test_recall_lag_max_without_a_side_stream_is_the_lag():
    """Where copies finish at the selection (no CUDA side stream), ``recall_lag_max`` changes nothing:
    the same tables at every step as with ``recall_lag`` alone."""
    tables = []
    for lag_max in (None, 6):
        store = KVStore(SPECS, config(budget=64, interval=8, recall_lag=2, recall_lag_max=lag_max, seed=3), batch=2, capacity=160, valid_start=[0, 3])
        hist = draw_history(SPECS, batch=2, capacity=160, gen=torch.Generator().manual_seed(6))
        prefill(store, hist, 51)
        seen = []
        for _ in range(40):
            store.before_step()
            seen.append({key: sorted(v) for key, v in resident_sets(store).items()})
            write_token(store, hist)
            store.after_step()
        tables.append(seen)
    assert tables[0] == tables[1]
