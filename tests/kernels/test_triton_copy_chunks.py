"""Chunk copies (``copy_chunks_triton``, the op and ``copy_chunks_ref``) on CPU tensors under Triton's interpreter.

Fresh random pool and mirror per case; the destination is poisoned (NaN) first, and every row the
copy does not name must come out untouched.
"""

from __future__ import annotations

import zlib

from triton_interpreter import interpreted_kernels  # noqa: F401  (sets TRITON_INTERPRET=1 first)

import pytest  # noqa: E402
import torch  # noqa: E402

from lsa_rewrite.kernels import copy_chunks, copy_chunks_ref, copy_chunks_triton  # noqa: E402

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}

# (batch, slots, num_chunks, chunk, kv_heads, head_dim, copies, dtype, block, programs): a row smaller
# than a block, rows spanning several blocks with a partial last one, one copy, none; persistent
# programs that each loop over several blocks (3, 1), the default, and one program per block (None).
CASES = [
    (1, 4, 9, 4, 2, 8, 3, "f32", 4096, 16),
    (2, 5, 11, 8, 2, 16, 7, "bf16", 64, 3),
    (3, 3, 6, 4, 1, 24, 5, "f16", 128, None),
    (1, 2, 3, 2, 1, 4, 1, "f32", 4096, 1),
    (2, 3, 4, 2, 1, 4, 0, "f32", 4096, 16),
    (2, 4, 7, 8, 2, 8, 6, "f32", 32, 1),
]


def problem(case, gen):
    batch, slots, num_chunks, chunk, heads, dim, copies, dtype_id, _, _ = case
    dtype = DTYPES[dtype_id]
    pool_k = torch.randn(batch * slots, chunk, heads, dim, generator=gen).to(dtype)
    pool_v = torch.randn(batch * slots, chunk, heads, dim, generator=gen).to(dtype)
    mirror_k = torch.randn(batch, num_chunks, chunk, heads, dim, generator=gen).to(dtype)
    mirror_v = torch.randn(batch, num_chunks, chunk, heads, dim, generator=gen).to(dtype)
    pool_rows = torch.randperm(batch * slots, generator=gen)[:copies]  # distinct destinations
    mirror_rows = torch.randint(0, batch * num_chunks, (copies,), generator=gen)  # sources may repeat
    return pool_k, pool_v, mirror_k, mirror_v, pool_rows, mirror_rows


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}-s{c[1]}-n{c[2]}-c{c[3]}-h{c[4]}-d{c[5]}-m{c[6]}-{c[7]}-blk{c[8]}-p{c[9]}")
def test_recall_matches_reference(case):
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    pool_k, pool_v, mirror_k, mirror_v, pool_rows, mirror_rows = problem(case, gen)
    untouched = torch.ones(pool_k.shape[0], dtype=torch.bool)
    untouched[pool_rows] = False
    want_k, want_v = pool_k.clone(), pool_v.clone()
    copy_chunks_ref(want_k, want_v, mirror_k, mirror_v, pool_rows, mirror_rows)
    got_k, got_v = pool_k.clone(), pool_v.clone()
    got_k[pool_rows] = float("nan")
    got_v[pool_rows] = float("nan")

    copy_chunks_triton(got_k, got_v, mirror_k, mirror_v, pool_rows, mirror_rows, block=case[8], programs=case[9])

    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)  # bit-exact, NaN poison gone
    assert torch.equal(got_k[untouched], pool_k[untouched]) and torch.equal(got_v[untouched], pool_v[untouched])
    flat = mirror_k.view(-1, *mirror_k.shape[2:])
    for dst, src in zip(pool_rows.tolist(), mirror_rows.tolist()):
        assert torch.equal(got_k[dst], flat[src])


@pytest.mark.parametrize("programs", [1, 4, None])
def test_negative_rows_are_skipped(programs):
    """Fixed-size index tensors with -1 where nothing moves: those rows stay exactly as they were."""
    gen = torch.Generator().manual_seed(11)
    pool_k, pool_v, mirror_k, mirror_v, pool_rows, mirror_rows = problem((2, 5, 11, 8, 2, 16, 8, "bf16", 64, None), gen)
    pool_rows[[1, 4]] = -1
    mirror_rows[[4, 6]] = -1
    moving = (pool_rows >= 0) & (mirror_rows >= 0)
    want_k, want_v = pool_k.clone(), pool_v.clone()
    want_k[pool_rows[moving]] = mirror_k.view(-1, *mirror_k.shape[2:])[mirror_rows[moving]]
    want_v[pool_rows[moving]] = mirror_v.view(-1, *mirror_v.shape[2:])[mirror_rows[moving]]
    got_k, got_v = pool_k.clone(), pool_v.clone()

    copy_chunks_triton(got_k, got_v, mirror_k, mirror_v, pool_rows, mirror_rows, block=64, programs=programs)

    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    ref_k, ref_v = pool_k.clone(), pool_v.clone()
    copy_chunks_ref(ref_k, ref_v, mirror_k, mirror_v, pool_rows, mirror_rows)
    assert torch.equal(ref_k, want_k) and torch.equal(ref_v, want_v)


@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: f"b{c[0]}-s{c[1]}-n{c[2]}-{c[7]}")
def test_write_back_matches_reference(case):
    """The same kernel scattering pool rows into the mirror (the write-back direction)."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()) + 1)
    pool_k, pool_v, mirror_k, mirror_v, _, _ = problem(case, gen)
    copies = min(case[6], pool_k.shape[0])
    mirror_rows = torch.randperm(mirror_k.shape[0] * mirror_k.shape[1], generator=gen)[:copies]
    pool_rows = torch.randint(0, pool_k.shape[0], (copies,), generator=gen)
    want_k, want_v = mirror_k.clone(), mirror_v.clone()
    copy_chunks_ref(want_k, want_v, pool_k, pool_v, mirror_rows, pool_rows)
    got_k, got_v = mirror_k.clone(), mirror_v.clone()
    got_k.view(-1, *got_k.shape[2:])[mirror_rows] = float("nan")

    copy_chunks_triton(got_k, got_v, pool_k, pool_v, mirror_rows, pool_rows, block=64, programs=case[9])

    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)


def test_op_on_cpu_copies_exactly_the_listed_rows():
    """The op against a row-by-row copy written here (not the reference it dispatches to), K and V."""
    gen = torch.Generator().manual_seed(7)
    pool_k, pool_v, mirror_k, mirror_v, pool_rows, mirror_rows = problem(CASES[1], gen)
    want_k, want_v = pool_k.clone(), pool_v.clone()
    src_k, src_v = mirror_k.flatten(0, 1), mirror_v.flatten(0, 1)  # [B * N, C, Hkv, D] chunk rows
    copied = 0
    for dst, src in zip(pool_rows.tolist(), mirror_rows.tolist()):
        if dst >= 0 and src >= 0:
            want_k[dst], want_v[dst] = src_k[src], src_v[src]
            copied += 1
    assert copied > 0 and not torch.equal(want_k, pool_k), "the case copies nothing"
    copy_chunks(pool_k, pool_v, mirror_k, mirror_v, pool_rows, mirror_rows)
    assert torch.equal(pool_k, want_k) and torch.equal(pool_v, want_v)


def test_bad_operands_say_what_is_wrong():
    pool = torch.zeros(4, 2, 1, 8)
    mirror = torch.zeros(1, 3, 2, 1, 8)
    rows = torch.tensor([0])
    with pytest.raises(ValueError, match="one dtype"):
        copy_chunks_ref(pool, pool.clone(), mirror.half(), mirror.half(), rows, rows)
    with pytest.raises(ValueError, match="chunk rows differ"):
        copy_chunks_ref(pool, pool.clone(), torch.zeros(1, 3, 4, 1, 8), torch.zeros(1, 3, 4, 1, 8), rows, rows)
    with pytest.raises(ValueError, match="int64"):
        copy_chunks_ref(pool, pool.clone(), mirror, mirror.clone(), rows.int(), rows)
    with pytest.raises(IndexError, match="src_rows holds rows 3..3, but that side has 3 chunk rows"):
        copy_chunks_ref(pool, pool.clone(), mirror, mirror.clone(), rows, torch.tensor([3]))
    with pytest.raises(ValueError, match="contiguous"):
        wide = torch.zeros(1, 3, 2, 8, 2)[..., 0:1].transpose(3, 4)  # the right shape, strided
        copy_chunks_ref(pool, pool.clone(), wide, wide, rows, rows)


@pytest.mark.skipif(not hasattr(torch.library, "opcheck"), reason="torch.library.opcheck needs torch >= 2.4")
def test_opcheck():
    """Schema, fake implementation and mutation annotations of lsa::copy_chunks agree with what it does."""
    gen = torch.Generator().manual_seed(13)
    pool_k, pool_v, mirror_k, mirror_v, pool_rows, mirror_rows = problem(CASES[1], gen)
    torch.library.opcheck(torch.ops.lsa.copy_chunks.default, (pool_k, pool_v, mirror_k, mirror_v, pool_rows, mirror_rows))
