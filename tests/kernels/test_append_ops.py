"""Tests for the in-place store writes: ``lsa::append_kv``, ``lsa::update_chunk_index``,
``lsa::ring_append_kv`` and ``lsa::tap``.

Every destination starts as random values (poison), and the whole tensor after the call is compared
with what an independent computation expects, so a write to the wrong place or a write too many fails.
"""

from __future__ import annotations

import pytest
import torch

import lsa_rewrite.kernels  # noqa: F401  (registers torch.ops.lsa.*)

OPS = torch.ops.lsa


def random_chunk_table(batch, num_chunks, slots, gen, *, holding):
    """chunk_slot [B, N]: each sequence maps chunk `holding` and slots-1 random others to a random
    permutation of its slots (-1 elsewhere)."""
    chunk_slot = torch.full((batch, num_chunks), -1, dtype=torch.long)
    for b in range(batch):
        others = [c for c in torch.randperm(num_chunks, generator=gen).tolist() if c != holding]
        chunk_slot[b, [holding] + others[: slots - 1]] = torch.randperm(slots, generator=gen)
    return chunk_slot


# -- append_kv ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("batch", [1, 3])
def test_append_kv_writes_one_token_per_sequence_and_nothing_else(batch, dtype):
    gen = torch.Generator().manual_seed(batch)
    slots, chunk, kv_heads, head_dim, num_chunks = 5, 8, 2, 16, 12
    for _ in range(20):
        # the written chunk is resident for every sequence (the manager guarantees it for the window)
        logical = int(torch.randint(num_chunks, (1,), generator=gen))
        chunk_slot = random_chunk_table(batch, num_chunks, slots, gen, holding=logical)
        pos = logical * chunk + int(torch.randint(chunk, (1,), generator=gen))

        k_pool = torch.randn(batch * slots, chunk, kv_heads, head_dim, generator=gen).to(dtype)
        v_pool = torch.randn(batch * slots, chunk, kv_heads, head_dim, generator=gen).to(dtype)
        k_new = torch.randn(batch, kv_heads, head_dim, generator=gen).to(dtype)
        v_new = torch.randn(batch, kv_heads, head_dim, generator=gen).to(dtype)
        expected_k, expected_v = k_pool.clone(), v_pool.clone()
        for b in range(batch):
            row = b * slots + int(chunk_slot[b, logical])
            expected_k[row, pos % chunk] = k_new[b]
            expected_v[row, pos % chunk] = v_new[b]

        OPS.append_kv(k_pool, v_pool, k_new, v_new, torch.tensor([pos]), chunk_slot)

        assert torch.equal(k_pool, expected_k)
        assert torch.equal(v_pool, expected_v)


def test_append_kv_at_a_far_position():
    """Offsets and chunk ids stay right far into a long context (int64 arithmetic, no wrap-around)."""
    gen = torch.Generator().manual_seed(8)
    chunk, num_chunks, slots = 64, 4096, 3
    pos = 4000 * chunk + 37
    chunk_slot = torch.full((2, num_chunks), -1, dtype=torch.long)
    chunk_slot[0, [5, 4000, 4095]] = torch.tensor([2, 0, 1])
    chunk_slot[1, [4000, 7, 3999]] = torch.tensor([1, 0, 2])
    k_pool = torch.randn(2 * slots, chunk, 1, 4, generator=gen)
    v_pool = torch.randn(2 * slots, chunk, 1, 4, generator=gen)
    k_new, v_new = torch.randn(2, 1, 4, generator=gen), torch.randn(2, 1, 4, generator=gen)
    expected_k, expected_v = k_pool.clone(), v_pool.clone()
    expected_k[[0, slots + 1], 37] = k_new
    expected_v[[0, slots + 1], 37] = v_new
    OPS.append_kv(k_pool, v_pool, k_new, v_new, torch.tensor([pos]), chunk_slot)
    assert torch.equal(k_pool, expected_k) and torch.equal(v_pool, expected_v)


def test_append_kv_casts_the_token_to_the_pool_dtype():
    k_pool = torch.randn(2, 4, 1, 8).bfloat16()
    v_pool = torch.randn(2, 4, 1, 8).bfloat16()
    k_new, v_new = torch.randn(1, 1, 8), torch.randn(1, 1, 8)
    OPS.append_kv(k_pool, v_pool, k_new, v_new, torch.tensor([6]), torch.tensor([[-1, 0]]))
    assert torch.equal(k_pool[0, 2], k_new[0].bfloat16())
    assert torch.equal(v_pool[0, 2], v_new[0].bfloat16())


def test_append_kv_fills_a_chunk_token_by_token():
    """Appending positions c*C .. c*C+C-1 leaves the slot equal to the chunk's history."""
    gen = torch.Generator().manual_seed(5)
    batch, slots, chunk, kv_heads, head_dim = 2, 3, 4, 2, 8
    chunk_slot = torch.tensor([[-1, 2, 0, -1, 1], [1, -1, -1, 0, 2]])
    k_pool = torch.randn(batch * slots, chunk, kv_heads, head_dim, generator=gen)
    v_pool = torch.randn(batch * slots, chunk, kv_heads, head_dim, generator=gen)
    before_k, before_v = k_pool.clone(), v_pool.clone()
    k_hist = torch.randn(batch, chunk, kv_heads, head_dim, generator=gen)
    v_hist = torch.randn(batch, chunk, kv_heads, head_dim, generator=gen)
    logical = 4  # slot 1 of sequence 0, slot 2 of sequence 1
    for j in range(chunk):
        OPS.append_kv(k_pool, v_pool, k_hist[:, j], v_hist[:, j], torch.tensor([logical * chunk + j]), chunk_slot)
    rows = [0 * slots + 1, 1 * slots + 2]
    assert torch.equal(k_pool[rows], k_hist) and torch.equal(v_pool[rows], v_hist)
    untouched = [r for r in range(batch * slots) if r not in rows]
    assert torch.equal(k_pool[untouched], before_k[untouched]) and torch.equal(v_pool[untouched], before_v[untouched])


# -- update_chunk_index ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_update_chunk_index_tracks_min_max_of_tokens_so_far(dtype):
    gen = torch.Generator().manual_seed(17)
    batch, num_chunks, kv_heads, head_dim, chunk = 3, 6, 2, 16, 8
    kmin = torch.randn(batch, num_chunks, kv_heads, head_dim, generator=gen).to(dtype)  # poison
    kmax = torch.randn(batch, num_chunks, kv_heads, head_dim, generator=gen).to(dtype)
    keys = torch.randn(batch, 3 * chunk, kv_heads, head_dim, generator=gen).to(dtype)  # chunks 2, 3, 4
    first = 2
    for i in range(keys.shape[1]):
        pos = first * chunk + i
        c, j = divmod(pos, chunk)
        before_min, before_max = kmin.clone(), kmax.clone()

        OPS.update_chunk_index(kmin, kmax, keys[:, i], torch.tensor([pos]), chunk)

        so_far = keys[:, (c - first) * chunk : i + 1]  # this chunk's tokens up to pos; the first resets
        assert so_far.shape[1] == j + 1
        expected_min, expected_max = before_min.clone(), before_max.clone()
        expected_min[:, c] = torch.amin(so_far, dim=1)
        expected_max[:, c] = torch.amax(so_far, dim=1)
        assert torch.equal(kmin, expected_min), f"kmin wrong after pos {pos}"
        assert torch.equal(kmax, expected_max), f"kmax wrong after pos {pos}"


def test_update_chunk_index_mid_chunk_folds_into_existing_bounds():
    """A token that does not open its chunk keeps bounds from earlier tokens (e.g. the prompt's)."""
    gen = torch.Generator().manual_seed(2)
    kmin = torch.randn(2, 4, 1, 8, generator=gen)
    kmax = kmin + torch.rand(2, 4, 1, 8, generator=gen)
    key = torch.randn(2, 1, 8, generator=gen) * 3
    expected_min, expected_max = kmin.clone(), kmax.clone()
    expected_min[:, 2] = torch.minimum(kmin[:, 2], key)
    expected_max[:, 2] = torch.maximum(kmax[:, 2], key)
    OPS.update_chunk_index(kmin, kmax, key, torch.tensor([2 * 16 + 5]), 16)
    assert torch.equal(kmin, expected_min) and torch.equal(kmax, expected_max)


# -- ring_append_kv ----------------------------------------------------------------------------


@pytest.mark.parametrize("pos", [0, 3, 7, 8, 29, 1000])
def test_ring_append_kv_writes_slot_pos_mod_window(pos):
    gen = torch.Generator().manual_seed(pos)
    batch, window, kv_heads, head_dim = 3, 8, 2, 16
    k_ring = torch.randn(batch, window, kv_heads, head_dim, generator=gen)
    v_ring = torch.randn(batch, window, kv_heads, head_dim, generator=gen)
    k_new = torch.randn(batch, kv_heads, head_dim, generator=gen)
    v_new = torch.randn(batch, kv_heads, head_dim, generator=gen)
    expected_k, expected_v = k_ring.clone(), v_ring.clone()
    expected_k[:, pos % window] = k_new
    expected_v[:, pos % window] = v_new

    OPS.ring_append_kv(k_ring, v_ring, k_new, v_new, torch.tensor([pos]))

    assert torch.equal(k_ring, expected_k) and torch.equal(v_ring, expected_v)


def test_ring_holds_the_last_window_after_many_appends():
    gen = torch.Generator().manual_seed(9)
    batch, window, kv_heads, head_dim, steps = 2, 4, 1, 8, 11
    k_ring = torch.randn(batch, window, kv_heads, head_dim, generator=gen)
    v_ring = torch.randn(batch, window, kv_heads, head_dim, generator=gen)
    k_hist = torch.randn(batch, steps, kv_heads, head_dim, generator=gen)
    v_hist = torch.randn(batch, steps, kv_heads, head_dim, generator=gen)
    for p in range(steps):
        OPS.ring_append_kv(k_ring, v_ring, k_hist[:, p], v_hist[:, p], torch.tensor([p]))
    for p in range(steps - window, steps):
        assert torch.equal(k_ring[:, p % window], k_hist[:, p]) and torch.equal(v_ring[:, p % window], v_hist[:, p])


# -- tap ---------------------------------------------------------------------------------------


def test_tap_copies_and_reshapes():
    gen = torch.Generator().manual_seed(4)
    dst = torch.randn(2, 4, 8, generator=gen)
    src = torch.randn(2, 4, 1, 8, generator=gen)  # q.select(2, 0) of [B, Hq, 1, D] has this many elements
    OPS.tap(dst, src)
    assert torch.equal(dst, src.reshape(2, 4, 8))


def test_tap_casts_to_the_destination_dtype():
    dst = torch.zeros(3, 5, dtype=torch.bfloat16)
    src = torch.randn(3, 5)
    OPS.tap(dst, src)
    assert torch.equal(dst, src.bfloat16())


def test_tap_size_mismatch_raises_value_error():
    dst = torch.randn(2, 4)
    before = dst.clone()
    with pytest.raises(ValueError, match=r"tap: destination \(2, 4\) and source \(3, 3\) differ in size"):
        OPS.tap(dst, torch.randn(3, 3))
    assert torch.equal(dst, before)


# -- bad shapes --------------------------------------------------------------------------------


def _append_args():
    k_pool = torch.randn(2 * 3, 4, 2, 8)
    k_new = torch.randn(2, 2, 8)
    chunk_slot = torch.tensor([[0, 1, -1, 2], [2, -1, 0, 1]])
    return [k_pool, k_pool.clone(), k_new, k_new.clone(), torch.tensor([5]), chunk_slot]


@pytest.mark.parametrize(
    "index, value, match",
    [
        (1, torch.randn(2 * 3, 4, 2, 9), r"k_pool/v_pool must be"),
        (0, torch.randn(6, 4, 16), r"k_pool/v_pool must be"),
        (3, torch.randn(2, 2, 9), r"k_new/v_new must be \[B, Hkv, D\]"),
        (5, torch.tensor([[0, 1, -1, 2]]), r"chunk_slot .* does not match batch"),
        (5, torch.tensor([[0, 1], [2, 0], [1, 2]]), r"chunk_slot .* does not match batch"),
        (2, torch.randn(2, 1, 8), r"k_new/v_new must be"),
        (4, torch.tensor([5, 6]), r"pos must hold one position"),
    ],
    ids=["v-pool", "pool-3d", "v-new", "table-batch", "table-rows", "k-v-new-differ", "pos"],
)
def test_append_kv_bad_shapes_raise_value_error(index, value, match):
    args = _append_args()
    args[index] = value
    with pytest.raises(ValueError, match=match):
        OPS.append_kv(*args)


def test_append_kv_heads_mismatch_raises_value_error():
    args = _append_args()
    args[2], args[3] = torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    with pytest.raises(ValueError, match=r"differ from the pool's"):
        OPS.append_kv(*args)


def test_update_chunk_index_bad_shapes_raise_value_error():
    kmin = torch.randn(2, 4, 2, 8)
    with pytest.raises(ValueError, match=r"update_chunk_index: bounds .* do not fit key"):
        OPS.update_chunk_index(kmin, kmin.clone(), torch.randn(2, 2, 4), torch.tensor([3]), 4)
    with pytest.raises(ValueError, match=r"update_chunk_index"):
        OPS.update_chunk_index(kmin, torch.randn(2, 5, 2, 8), torch.randn(2, 2, 8), torch.tensor([3]), 4)


def test_ring_append_kv_bad_shapes_raise_value_error():
    ring = torch.randn(2, 4, 2, 8)
    with pytest.raises(ValueError, match=r"ring_append_kv: ring .* does not fit token"):
        OPS.ring_append_kv(ring, ring.clone(), torch.randn(3, 2, 8), torch.randn(3, 2, 8), torch.tensor([3]))
    with pytest.raises(ValueError, match=r"ring_append_kv"):
        OPS.ring_append_kv(ring, torch.randn(2, 5, 2, 8), torch.randn(2, 2, 8), torch.randn(2, 2, 8), torch.tensor([3]))


# -- schema / fake implementations -------------------------------------------------------------


def _opcheck_cases():
    k_pool = torch.randn(2 * 3, 4, 2, 8)
    k_new = torch.randn(2, 2, 8)
    chunk_slot = torch.tensor([[0, 1, -1, 2], [2, -1, 0, 1]])
    kmin = torch.randn(2, 4, 2, 8)
    ring = torch.randn(2, 4, 2, 8)
    return {
        "append_kv": (k_pool, k_pool.clone(), k_new, k_new.clone(), torch.tensor([5]), chunk_slot),
        "update_chunk_index": (kmin, kmin + 1, k_new, torch.tensor([5]), 4),
        "ring_append_kv": (ring, ring.clone(), k_new, k_new.clone(), torch.tensor([5])),
        "tap": (torch.zeros(2, 16), k_new),
    }


@pytest.mark.skipif(not hasattr(torch.library, "opcheck"), reason="torch.library.opcheck needs torch >= 2.4")
@pytest.mark.parametrize("op", ["append_kv", "update_chunk_index", "ring_append_kv", "tap"])
def test_opcheck(op):
    torch.library.opcheck(getattr(OPS, op).default, _opcheck_cases()[op])


def test_append_to_a_chunk_without_a_slot_writes_nothing():
    """The store guarantees a slot for every chunk written in a window; if one is missing, nothing is corrupted."""
    gen = torch.Generator().manual_seed(11)
    k_pool = torch.randn(2 * 3, 8, 2, 4, generator=gen)
    v_pool = torch.randn(2 * 3, 8, 2, 4, generator=gen)
    before_k, before_v = k_pool.clone(), v_pool.clone()
    table = torch.full((2, 5), -1, dtype=torch.long)
    table[0, 2] = 1  # sequence 0 holds chunk 2 in slot 1; sequence 1 does not hold it
    k_new, v_new = torch.randn(2, 2, 4, generator=gen), torch.randn(2, 2, 4, generator=gen)
    torch.ops.lsa.append_kv(k_pool, v_pool, k_new, v_new, torch.tensor([19]), table)  # chunk 2, offset 3
    before_k[1, 3], before_v[1, 3] = k_new[0], v_new[0]
    assert torch.equal(k_pool, before_k) and torch.equal(v_pool, before_v)
