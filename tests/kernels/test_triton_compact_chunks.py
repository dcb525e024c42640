"""The compact (fp8) mirror's format and copies: ``pack_fp8``/``unpack_fp8``, ``lsa::pack_chunks`` (write-back)
and ``lsa::unpack_chunks`` (recall: the Triton kernel under Triton's interpreter, and its reference).

Fresh random inputs per case, spread over several orders of magnitude per token and head (as keys and
values are); every destination is poisoned (NaN, or 0xFF bytes: an e4m3 NaN) before the call, and rows
the copy does not name must come out untouched.

The error bound (derived in ``kernels/compact_chunks.py``): the scale of a token and head is the power
of two ``s`` with ``amax / s`` in (224, 448], so ``x / s`` is exact and e4m3's rounding to nearest is
the only error: at most half a unit in the last of its 3 mantissa bits, ``2**-4 * |x|``, in its normal
range, and half the subnormal spacing, ``2**-10 * s < 2**-9 * amax / 448``, below it.
"""

from __future__ import annotations

import zlib

from triton_interpreter import interpreted_kernels  # noqa: F401  (sets TRITON_INTERPRET=1 first)

import pytest  # noqa: E402
import torch  # noqa: E402

from lsa_rewrite.kernels import pack_chunks, pack_fp8, unpack_chunks, unpack_chunks_ref, unpack_chunks_triton, unpack_fp8  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}

# (batch, slots, num_chunks, chunk, kv_heads, head_dim, copies, dtype, block, programs): vectors of a row
# in one block and over several with a partial last one, a head_dim that is not a power of two, one
# copy, none; persistent programs looping over several blocks, and one program per block (None).
CASES = [
    (1, 4, 9, 4, 2, 8, 3, "f32", 4096, 16),
    (2, 5, 11, 8, 2, 16, 7, "bf16", 64, 3),
    (3, 3, 6, 4, 1, 24, 5, "f16", 128, None),
    (1, 2, 3, 2, 1, 4, 1, "bf16", 4096, 1),
    (2, 3, 4, 2, 1, 4, 0, "f32", 4096, 16),
]


def spread(shape, gen) -> torch.Tensor:
    """Normal values times a per-vector magnitude over ~6 orders of magnitude (and a few exact zeros)."""
    x = torch.randn(shape, generator=gen) * torch.exp(4 * torch.randn(*shape[:-1], 1, generator=gen))
    x.view(-1)[:: 97] = 0.0
    return x


def fp8_bound(x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return xf.abs() * 2.0**-4 + xf.abs().amax(-1, keepdim=True) * 2.0**-9 / 448


def problem(case, gen):
    batch, slots, num_chunks, chunk, heads, dim, copies, dtype_id, _, _ = case
    dtype = DTYPES[dtype_id]
    pool_k = spread((batch * slots, chunk, heads, dim), gen).to(dtype)
    pool_v = spread((batch * slots, chunk, heads, dim), gen).to(dtype)
    exact_k = spread((batch, num_chunks, chunk, heads, dim), gen).to(dtype)  # what was written back
    exact_v = spread((batch, num_chunks, chunk, heads, dim), gen).to(dtype)
    pool_rows = torch.randperm(batch * slots, generator=gen)[:copies]  # distinct destinations
    mirror_rows = torch.randint(0, batch * num_chunks, (copies,), generator=gen)  # sources may repeat
    return pool_k, pool_v, exact_k, exact_v, pool_rows, mirror_rows


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_round_trip_within_the_fp8_bound(dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(str(dtype).encode()))
    x = spread((64, 3, 4, 32), gen).to(dtype)
    packed = pack_fp8(x)
    assert packed.dtype == torch.uint8 and packed.shape == (64, 3, 4, 33)
    y = unpack_fp8(packed, dtype)
    assert y.dtype == dtype and y.shape == x.shape
    err = (y.float() - x.float()).abs()
    assert bool((err <= fp8_bound(x)).all()), f"max error / bound {(err / fp8_bound(x)).max():.3f}"
    assert bool((y.float() == 0)[x.float() == 0].all())
    assert (err > 0).float().mean() > 0.5, "nothing was rounded: not an 8-bit format"
    # the dequantised values lie on the grid: packing them again changes nothing
    assert torch.equal(unpack_fp8(pack_fp8(y), dtype), y)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}-s{c[1]}-n{c[2]}-c{c[3]}-h{c[4]}-d{c[5]}-m{c[6]}-{c[7]}-blk{c[8]}-p{c[9]}")
def test_recall_matches_reference_and_bound(case):
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    pool_k, pool_v, exact_k, exact_v, pool_rows, mirror_rows = problem(case, gen)
    mirror_k, mirror_v = pack_fp8(exact_k), pack_fp8(exact_v)
    untouched = torch.ones(pool_k.shape[0], dtype=torch.bool)
    untouched[pool_rows] = False
    want_k, want_v = pool_k.clone(), pool_v.clone()
    want_k[pool_rows], want_v[pool_rows] = float("nan"), float("nan")
    unpack_chunks_ref(want_k, want_v, mirror_k, mirror_v, pool_rows, mirror_rows)
    got_k, got_v = pool_k.clone(), pool_v.clone()
    got_k[pool_rows], got_v[pool_rows] = float("nan"), float("nan")

    unpack_chunks_triton(got_k, got_v, mirror_k, mirror_v, pool_rows, mirror_rows, block=case[8], programs=case[9])

    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)  # bit-exact, NaN poison gone
    assert torch.equal(got_k[untouched], pool_k[untouched]) and torch.equal(got_v[untouched], pool_v[untouched])
    for got, exact in ((got_k, exact_k), (got_v, exact_v)):
        src = exact.flatten(0, 1)[mirror_rows]
        err = (got[pool_rows].float() - src.float()).abs()
        assert bool((err <= fp8_bound(src)).all())


@pytest.mark.parametrize("programs", [1, None])
def test_negative_rows_are_skipped(programs):
    gen = torch.Generator().manual_seed(11)
    pool_k, pool_v, exact_k, exact_v, pool_rows, mirror_rows = problem((2, 5, 11, 8, 2, 16, 8, "bf16", 64, None), gen)
    mirror_k, mirror_v = pack_fp8(exact_k), pack_fp8(exact_v)
    pool_rows[[1, 4]] = -1
    mirror_rows[[4, 6]] = -1
    moving = (pool_rows >= 0) & (mirror_rows >= 0)
    want_k, want_v = pool_k.clone(), pool_v.clone()
    want_k[pool_rows[moving]] = unpack_fp8(mirror_k.flatten(0, 1)[mirror_rows[moving]], torch.bfloat16)
    want_v[pool_rows[moving]] = unpack_fp8(mirror_v.flatten(0, 1)[mirror_rows[moving]], torch.bfloat16)
    got_k, got_v = pool_k.clone(), pool_v.clone()
    unpack_chunks_triton(got_k, got_v, mirror_k, mirror_v, pool_rows, mirror_rows, block=64, programs=programs)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    ref_k, ref_v = pool_k.clone(), pool_v.clone()
    unpack_chunks_ref(ref_k, ref_v, mirror_k, mirror_v, pool_rows, mirror_rows)
    assert torch.equal(ref_k, want_k) and torch.equal(ref_v, want_v)


@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: f"b{c[0]}-s{c[1]}-n{c[2]}-{c[7]}")
def test_write_back_packs_exactly_the_listed_rows(case):
    """Pool rows -> packed mirror rows (negative pairs skipped); packed bytes equal pack_fp8 of the row."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()) + 1)
    pool_k, pool_v, _, _, _, _ = problem(case, gen)
    batch, _, num_chunks, chunk, heads, dim = case[:6]
    mirror_k = torch.full((batch, num_chunks, chunk, heads, dim + 1), 0xFF, dtype=torch.uint8)  # 0xFF: an e4m3 NaN
    mirror_v = mirror_k.clone()
    copies = min(case[6], pool_k.shape[0])
    mirror_rows = torch.randperm(batch * num_chunks, generator=gen)[:copies]
    pool_rows = torch.randint(0, pool_k.shape[0], (copies,), generator=gen)
    if copies > 1:
        pool_rows[0] = -1  # skipped
    before_k = mirror_k.clone()

    pack_chunks(mirror_k, mirror_v, pool_k, pool_v, mirror_rows, pool_rows)

    flat_k, flat_v = mirror_k.flatten(0, 1), mirror_v.flatten(0, 1)
    for dst, src in zip(mirror_rows.tolist(), pool_rows.tolist()):
        if src < 0:
            assert torch.equal(flat_k[dst], before_k.flatten(0, 1)[dst])
            continue
        assert torch.equal(flat_k[dst], pack_fp8(pool_k[src])) and torch.equal(flat_v[dst], pack_fp8(pool_v[src]))
    named = torch.zeros(batch * num_chunks, dtype=torch.bool)
    named[mirror_rows] = True
    assert torch.equal(flat_k[~named], before_k.flatten(0, 1)[~named])


def test_op_on_cpu_recalls_through_the_reference():
    gen = torch.Generator().manual_seed(7)
    pool_k, pool_v, exact_k, exact_v, pool_rows, mirror_rows = problem(CASES[1], gen)
    mirror_k, mirror_v = pack_fp8(exact_k), pack_fp8(exact_v)
    want_k, want_v = pool_k.clone(), pool_v.clone()
    for dst, src in zip(pool_rows.tolist(), mirror_rows.tolist()):
        want_k[dst] = unpack_fp8(mirror_k.flatten(0, 1)[src], pool_k.dtype)
        want_v[dst] = unpack_fp8(mirror_v.flatten(0, 1)[src], pool_v.dtype)
    unpack_chunks(pool_k, pool_v, mirror_k, mirror_v, pool_rows, mirror_rows)
    assert torch.equal(pool_k, want_k) and torch.equal(pool_v, want_v)


def test_bad_operands_say_what_is_wrong():
    pool = torch.zeros(4, 2, 1, 8)
    mirror = torch.zeros(1, 3, 2, 1, 9, dtype=torch.uint8)
    rows = torch.tensor([0])
    with pytest.raises(ValueError, match="packed bytes"):
        unpack_chunks_ref(pool, pool.clone(), mirror.float(), mirror.float(), rows, rows)
    with pytest.raises(ValueError, match=r"packed as \[2, 1, 9\]"):
        unpack_chunks_ref(pool, pool.clone(), torch.zeros(1, 3, 2, 1, 8, dtype=torch.uint8), torch.zeros(1, 3, 2, 1, 8, dtype=torch.uint8), rows, rows)
    with pytest.raises(ValueError, match="int64"):
        pack_chunks(mirror, mirror.clone(), pool, pool.clone(), rows.int(), rows)
    with pytest.raises(IndexError, match="src_rows holds rows 3..3, but that side has 3 chunk rows"):
        unpack_chunks_ref(pool, pool.clone(), mirror, mirror.clone(), rows, torch.tensor([3]))


@pytest.mark.skipif(not hasattr(torch.library, "opcheck"), reason="torch.library.opcheck needs torch >= 2.4")
def test_opcheck():
    gen = torch.Generator().manual_seed(13)
    pool_k, pool_v, exact_k, exact_v, pool_rows, mirror_rows = problem(CASES[1], gen)
    mirror_k, mirror_v = pack_fp8(exact_k), pack_fp8(exact_v)
    torch.library.opcheck(torch.ops.lsa.unpack_chunks.default, (pool_k, pool_v, mirror_k, mirror_v, pool_rows, mirror_rows))
    torch.library.opcheck(torch.ops.lsa.pack_chunks.default, (mirror_k, mirror_v, pool_k, pool_v, mirror_rows, pool_rows))
