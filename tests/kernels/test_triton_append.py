"""Triton store writes (``append_kv_triton``, its fused chunk-bounds form, ``update_chunk_index_triton``,
``ring_append_kv_triton``) against the PyTorch references, on CPU tensors under Triton's interpreter.

Every destination starts as random values (poison) and the whole tensor after the call must equal what
the reference leaves, so a write to the wrong place, a missing write or a write too many fails.
"""

from __future__ import annotations

import zlib

from triton_interpreter import interpreted_kernels  # noqa: F401  (sets TRITON_INTERPRET=1 first)

import pytest  # noqa: E402
import torch  # noqa: E402

from lsa_rewrite.kernels import (  # noqa: E402
    append_kv_ref,
    append_kv_triton,
    ring_append_kv_ref,
    ring_append_kv_triton,
    update_chunk_index_ref,
    update_chunk_index_triton,
)

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def chunk_table(batch, num_chunks, slots, gen, *, holding):
    """chunk_slot [B, N]: chunk ``holding`` and slots-1 random others mapped to a random permutation of slots."""
    table = torch.full((batch, num_chunks), -1, dtype=torch.long)
    for b in range(batch):
        others = [c for c in torch.randperm(num_chunks, generator=gen).tolist() if c != holding]
        table[b, [holding] + others[: slots - 1]] = torch.randperm(slots, generator=gen)
    return table


def clones(*tensors):
    return [t.clone() for t in tensors]


def assert_all_equal(got, expected):
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


# (batch, head_dim, chunk, offset in chunk, dtype, bounds dtype or None): the first token of a chunk
# (bounds reset), one in the middle, the last; head_dim not a power of two (masked lanes).
APPEND_CASES = [
    (1, 16, 16, 0, "f32", None),
    (3, 16, 16, 7, "bf16", "bf16"),
    (3, 64, 32, 31, "f32", "f32"),
    (2, 24, 16, 0, "f16", "f32"),
    (3, 64, 32, 13, "bf16", "f32"),
]


@pytest.mark.parametrize("case", APPEND_CASES, ids=lambda c: f"b{c[0]}-d{c[1]}-c{c[2]}-off{c[3]}-{c[4]}-bounds{c[5]}")
def test_append_kv_matches_reference(case):
    batch, head_dim, chunk, offset, dtype_id, bounds_id = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    dtype, kv_heads, slots, num_chunks = DTYPES[dtype_id], 2, 4, 9
    logical = int(torch.randint(num_chunks, (1,), generator=gen))
    pos = torch.tensor([logical * chunk + offset])
    table = chunk_table(batch, num_chunks, slots, gen, holding=logical)
    k_pool = torch.randn(batch * slots, chunk, kv_heads, head_dim, generator=gen).to(dtype)
    v_pool = torch.randn(batch * slots, chunk, kv_heads, head_dim, generator=gen).to(dtype)
    # the new token comes as a strided view (as from a projection's output), in fp32
    k_new = torch.randn(batch, head_dim, kv_heads, generator=gen).transpose(1, 2)
    v_new = torch.randn(batch, head_dim, kv_heads, generator=gen).transpose(1, 2)
    expected = clones(k_pool, v_pool)
    append_kv_ref(*expected, k_new, v_new, pos, table)
    if bounds_id is None:
        append_kv_triton(k_pool, v_pool, k_new, v_new, pos, table)
        assert_all_equal((k_pool, v_pool), expected)
        return

    kmin = torch.randn(batch, num_chunks, kv_heads, head_dim, generator=gen).to(DTYPES[bounds_id])
    kmax = kmin + torch.rand(kmin.shape, generator=gen).to(kmin.dtype)
    expected += clones(kmin, kmax)
    update_chunk_index_ref(expected[2], expected[3], k_new, pos, chunk)

    append_kv_triton(k_pool, v_pool, k_new, v_new, pos, table, kmin=kmin, kmax=kmax)

    assert_all_equal((k_pool, v_pool, kmin, kmax), expected)


def test_append_kv_fills_a_chunk_token_by_token_with_its_bounds():
    gen = torch.Generator().manual_seed(5)
    batch, slots, chunk, kv_heads, head_dim, num_chunks = 2, 3, 16, 2, 16, 5
    table = torch.tensor([[-1, 2, 0, -1, 1], [1, -1, -1, 0, 2]])
    k_pool = torch.randn(batch * slots, chunk, kv_heads, head_dim, generator=gen)
    v_pool = torch.randn(batch * slots, chunk, kv_heads, head_dim, generator=gen)
    kmin = torch.randn(batch, num_chunks, kv_heads, head_dim, generator=gen)
    kmax = torch.randn(batch, num_chunks, kv_heads, head_dim, generator=gen)
    expected = clones(k_pool, v_pool, kmin, kmax)
    k_hist = torch.randn(batch, chunk, kv_heads, head_dim, generator=gen)
    v_hist = torch.randn(batch, chunk, kv_heads, head_dim, generator=gen)
    logical = 4
    for j in range(chunk):
        pos = torch.tensor([logical * chunk + j])
        append_kv_triton(k_pool, v_pool, k_hist[:, j], v_hist[:, j], pos, table, kmin=kmin, kmax=kmax)
        append_kv_ref(expected[0], expected[1], k_hist[:, j], v_hist[:, j], pos, table)
        update_chunk_index_ref(expected[2], expected[3], k_hist[:, j], pos, chunk)
    assert_all_equal((k_pool, v_pool, kmin, kmax), expected)
    assert torch.equal(kmin[:, logical], k_hist.amin(1)) and torch.equal(kmax[:, logical], k_hist.amax(1))


def test_append_kv_to_a_chunk_without_slot_writes_nowhere():
    """Documented difference: the reference writes such a token into slot 0 of its sequence; the kernel
    drops it (the manager guarantees a slot, so this only limits the damage of a broken table)."""
    gen = torch.Generator().manual_seed(6)
    k_pool = torch.randn(2 * 3, 16, 1, 16, generator=gen)
    v_pool = torch.randn(2 * 3, 16, 1, 16, generator=gen)
    table = torch.tensor([[0, -1, 1], [2, 0, -1]])
    before = clones(k_pool, v_pool)
    k_new, v_new = torch.randn(2, 1, 16, generator=gen), torch.randn(2, 1, 16, generator=gen)

    append_kv_triton(k_pool, v_pool, k_new, v_new, torch.tensor([16 + 3]), table)  # chunk 1: no slot for b=0

    assert torch.equal(k_pool[:3], before[0][:3]) and torch.equal(v_pool[:3], before[1][:3])
    assert torch.equal(k_pool[3 + 0, 3], k_new[1]) and torch.equal(v_pool[3 + 0, 3], v_new[1])


def test_append_kv_at_a_far_position():
    """Chunk ids and offsets stay right far into a long context (int64 positions)."""
    gen = torch.Generator().manual_seed(8)
    chunk, num_chunks, slots = 64, 4096, 3
    pos = torch.tensor([4000 * chunk + 37])
    table = torch.full((2, num_chunks), -1, dtype=torch.long)
    table[0, [5, 4000, 4095]] = torch.tensor([2, 0, 1])
    table[1, [4000, 7, 3999]] = torch.tensor([1, 0, 2])
    k_pool = torch.randn(2 * slots, chunk, 1, 16, generator=gen)
    v_pool = torch.randn(2 * slots, chunk, 1, 16, generator=gen)
    k_new, v_new = torch.randn(2, 1, 16, generator=gen), torch.randn(2, 1, 16, generator=gen)
    expected = clones(k_pool, v_pool)
    append_kv_ref(*expected, k_new, v_new, pos, table)
    append_kv_triton(k_pool, v_pool, k_new, v_new, pos, table)
    assert_all_equal((k_pool, v_pool), expected)


@pytest.mark.parametrize("dtype_id", ["f32", "bf16"])
def test_update_chunk_index_matches_reference(dtype_id):
    gen = torch.Generator().manual_seed(17)
    dtype = DTYPES[dtype_id]
    batch, num_chunks, kv_heads, head_dim, chunk = 3, 6, 2, 16, 8
    kmin = torch.randn(batch, num_chunks, kv_heads, head_dim, generator=gen).to(dtype)  # poison
    kmax = torch.randn(batch, num_chunks, kv_heads, head_dim, generator=gen).to(dtype)
    expected = clones(kmin, kmax)
    keys = torch.randn(batch, 2 * chunk + 3, kv_heads, head_dim, generator=gen).to(dtype)
    for i in range(keys.shape[1]):  # chunks 2, 3 and the start of 4: resets and folds
        pos = torch.tensor([2 * chunk + i])
        update_chunk_index_triton(kmin, kmax, keys[:, i], pos, chunk)
        update_chunk_index_ref(*expected, keys[:, i], pos, chunk)
        assert_all_equal((kmin, kmax), expected)


@pytest.mark.parametrize("pos", [0, 3, 39, 40, 1001])
def test_ring_append_kv_matches_reference(pos):
    gen = torch.Generator().manual_seed(pos)
    batch, window, kv_heads, head_dim = 3, 40, 2, 16
    k_ring = torch.randn(batch, window, kv_heads, head_dim, generator=gen).bfloat16()
    v_ring = torch.randn(batch, window, kv_heads, head_dim, generator=gen).bfloat16()
    k_new = torch.randn(batch, kv_heads, head_dim, generator=gen)
    v_new = torch.randn(batch, kv_heads, head_dim, generator=gen)
    expected = clones(k_ring, v_ring)
    ring_append_kv_ref(*expected, k_new, v_new, torch.tensor([pos]))
    ring_append_kv_triton(k_ring, v_ring, k_new, v_new, torch.tensor([pos]))
    assert_all_equal((k_ring, v_ring), expected)


def test_launchers_reject_unsupported_operands():
    pool = torch.randn(2, 16, 1, 16)
    token = torch.randn(1, 1, 16)
    with pytest.raises(ValueError, match=r"int64"):
        append_kv_triton(pool, pool.clone(), token, token, torch.tensor([3], dtype=torch.int32), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match=r"both kmin and kmax"):
        append_kv_triton(pool, pool.clone(), token, token, torch.tensor([3]), torch.tensor([[0, 1]]), kmin=torch.randn(1, 2, 1, 16))
    with pytest.raises(ValueError, match=r"fp16, bf16 or fp32"):
        update_chunk_index_triton(torch.randn(1, 2, 1, 16).double(), torch.randn(1, 2, 1, 16).double(), token, torch.tensor([3]), 16)
