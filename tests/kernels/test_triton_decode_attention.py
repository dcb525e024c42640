"""Triton decode attention (``sparse_decode_attention_triton``, ``ring_decode_attention_triton``) against
the PyTorch references, on CPU tensors under Triton's interpreter.

Inputs are fresh random values per case; the output and the split-K workspace are poisoned (NaN)
before each call, so an element that is not written fails. Everything that must not take part (empty
slots, tokens after ``pos``, left padding, resident chunks not yet written, ring slots outside the
window) holds large garbage, so reading it by mistake moves the output far. Shapes are tiny: the
interpreter runs every program in Python.
"""

from __future__ import annotations

import importlib
import zlib

from triton_interpreter import interpreted_kernels  # noqa: F401  (sets TRITON_INTERPRET=1 first)

import pytest  # noqa: E402
import torch  # noqa: E402

from lsa_rewrite.kernels import (  # noqa: E402
    ring_decode_attention_ref,
    ring_decode_attention_triton,
    sparse_decode_attention_ref,
    sparse_decode_attention_triton,
)

decode = importlib.import_module("lsa_rewrite.kernels.decode_attention")

GARBAGE = 50.0
TOL = {
    torch.float32: dict(atol=2e-5, rtol=1e-4),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
}
DTYPE_IDS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def poisoned_like(q):
    return torch.full_like(q, float("nan"))


def assert_matches_reference(out, ref, dtype):
    assert out.dtype == dtype
    assert torch.isfinite(out).all(), "an output element was not written (or went non-finite)"
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


def sparse_case(*, batch, kv_heads, group, head_dim, chunk, dtype, seed, num_chunks=7, slots=5):
    """Random pool with empty slots, a partial tail chunk, resident-but-unwritten chunks and per-sequence
    left padding. Returns (q, k_pool, v_pool, slot_chunk, pos, valid_start)."""
    gen = torch.Generator().manual_seed(seed)
    tail = int(torch.randint(2, num_chunks - 1, (1,), generator=gen))  # leaves chunks after pos
    pos = tail * chunk + int(torch.randint(0, chunk - 1, (1,), generator=gen))  # tail chunk partly written
    # sequence 0 unpadded; the others padded into (and past) their first chunks
    valid_start = [0] + sorted(int(v) for v in torch.randint(1, pos // 2 + 2, (batch - 1,), generator=gen))

    shape = (batch * slots, chunk, kv_heads, head_dim)
    k_pool = torch.randn(shape, generator=gen)
    v_pool = torch.randn(shape, generator=gen)
    slot_chunk = torch.full((batch, slots), -1, dtype=torch.long)
    for b in range(batch):
        others = [c for c in torch.randperm(num_chunks, generator=gen).tolist() if c != tail]
        chunks = [tail] + others[: slots - 2 + (b % 2)]  # 1 or 2 empty slots
        where = torch.randperm(slots, generator=gen)[: len(chunks)]
        slot_chunk[b, where] = torch.tensor(chunks)
        for s in range(slots):
            c = int(slot_chunk[b, s])
            positions = c * chunk + torch.arange(chunk)
            dead = (c < 0) | (positions > pos) | (positions < valid_start[b])
            k_pool[b * slots + s, dead] = torch.randn(int(dead.sum()), kv_heads, head_dim, generator=gen) * GARBAGE
            v_pool[b * slots + s, dead] = torch.randn(int(dead.sum()), kv_heads, head_dim, generator=gen) * GARBAGE
    q = torch.randn(batch, kv_heads * group, head_dim, generator=gen)
    return (q.to(dtype), k_pool.to(dtype), v_pool.to(dtype), slot_chunk, torch.tensor([pos]), torch.tensor(valid_start))


# (group, head_dim, chunk, batch, softcap, dtype, num_splits): GQA groups 1/2/4 (and 16: no padding
# of the dot's rows), head_dim 16/64 (and 256: a chunk takes two blocks), chunk 16/32/64 (16 and 32:
# a 64-token block spans 4 or 2 slots, the last block reaching past the table's 5 slots), batch 1/3,
# softcap on/off, fp32/bf16/fp16, one to many splits (None: the launcher's default).
SPARSE_CASES = [
    (1, 16, 16, 1, 0.0, torch.float32, None),
    (2, 16, 32, 3, 30.0, torch.float32, 3),
    (4, 64, 16, 3, 0.0, torch.float32, 1),
    (4, 16, 16, 3, 30.0, torch.bfloat16, None),
    (2, 64, 32, 1, 0.0, torch.bfloat16, 4),
    (1, 64, 32, 3, 30.0, torch.float16, 2),
    (4, 64, 32, 3, 30.0, torch.float32, 64),
    (2, 16, 16, 1, 30.0, torch.float16, 5),
    (16, 16, 16, 3, 0.0, torch.bfloat16, 2),
    (1, 256, 64, 1, 0.0, torch.float32, 3),
]


def _case_id(case):
    group, head_dim, chunk, batch, softcap, dtype, splits = case
    return f"g{group}-d{head_dim}-c{chunk}-b{batch}-{'cap' if softcap else 'nocap'}-{DTYPE_IDS[dtype]}-s{splits}"


@pytest.mark.parametrize("case", SPARSE_CASES, ids=_case_id)
def test_sparse_decode_matches_reference(case):
    group, head_dim, chunk, batch, softcap, dtype, splits = case
    args = sparse_case(
        batch=batch, kv_heads=2, group=group, head_dim=head_dim, chunk=chunk, dtype=dtype, seed=zlib.crc32(repr(case).encode())
    )
    scale = 1.3 * head_dim**-0.5

    out = sparse_decode_attention_triton(*args, scale=scale, softcap=softcap, num_splits=splits, out=poisoned_like(args[0]))

    ref = sparse_decode_attention_ref(*args, scale=scale, softcap=softcap)
    assert_matches_reference(out, ref, dtype)


def test_sparse_decode_merges_in_tiles_and_head_dim_slices():
    """300 splits, more than one merge step takes: two tiles of 256 (the last partial), two 16-wide
    slices of the head dim, and splits that attend to nothing (empty slots) among them."""
    splits = 300
    assert decode._merge_tiles(splits, 32) == (256, 16)
    args = sparse_case(
        batch=2, kv_heads=1, group=4, head_dim=32, chunk=16, dtype=torch.float32, seed=splits, num_chunks=320, slots=300
    )
    # one block per 16-token slot, so there are blocks enough for 300 splits
    out = sparse_decode_attention_triton(*args, scale=0.3, num_splits=splits, min_block_tokens=16, out=poisoned_like(args[0]))
    assert_matches_reference(out, sparse_decode_attention_ref(*args, scale=0.3), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse_decode_with_query_group_padded_to_64_rows(dtype):
    """A group of 32 padded to the 64 rows of Hopper's wgmma (what the launcher does on sm90 at batch 1):
    the 32 zero rows must not reach the output or disturb the real ones."""
    args = sparse_case(batch=2, kv_heads=1, group=32, head_dim=32, chunk=32, dtype=dtype, seed=64)
    assert decode.sparse_launch_plan(args[0], args[1], args[3], group_rows=64)["group_rows"] == 64
    out = sparse_decode_attention_triton(*args, scale=0.2, num_splits=3, group_rows=64, out=poisoned_like(args[0]))
    assert_matches_reference(out, sparse_decode_attention_ref(*args, scale=0.2), dtype)


def test_group_rows_and_pdl_choices(monkeypatch):
    """On sm90: 64 rows for 16-bit groups of 32 when every program has an SM (else, and for fp32, the
    group's own power of two); PDL from sm90 on; shapes decide."""
    monkeypatch.setattr(decode, "_sm_count", lambda index: 132)
    monkeypatch.setattr(decode, "_capability", lambda index: (9, 0))
    cuda = torch.device("cuda", 0)
    assert decode._group_rows(cuda, torch.bfloat16, 32, 123) == 64
    assert decode._group_rows(cuda, torch.float16, 32, 132) == 64
    assert decode._group_rows(cuda, torch.bfloat16, 32, 248) == 32  # two programs per SM: 112 KB each does not pay
    assert decode._group_rows(cuda, torch.float32, 32, 123) == 32
    assert decode._group_rows(cuda, torch.bfloat16, 4, 31) == 16
    assert decode._group_rows(cuda, torch.bfloat16, 64, 31) == 64
    assert decode._group_rows(torch.device("cpu"), torch.bfloat16, 32, 2) == 32
    # asked for: at least that many rows, never fewer than the group's own power of two
    assert decode._group_rows(cuda, torch.bfloat16, 32, 123, 16) == 32
    assert decode._group_rows(cuda, torch.float32, 4, 248, 64) == 64
    assert decode._use_pdl(cuda)
    assert not decode._use_pdl(torch.device("cpu"))
    monkeypatch.setattr(decode, "_capability", lambda index: (8, 0))
    assert decode._group_rows(cuda, torch.bfloat16, 32, 123) == 32
    assert not decode._use_pdl(cuda)


def test_sparse_decode_allocates_its_output_when_none_is_given():
    args = sparse_case(batch=3, kv_heads=2, group=2, head_dim=16, chunk=16, dtype=torch.float32, seed=1)
    out = sparse_decode_attention_triton(*args, scale=0.25)
    assert_matches_reference(out, sparse_decode_attention_ref(*args, scale=0.25), torch.float32)


def test_sparse_decode_never_reads_masked_entries():
    """Non-finite values in empty slots and stale tokens cannot reach the output (masked loads)."""
    q, k_pool, v_pool, slot_chunk, pos, valid_start = sparse_case(
        batch=3, kv_heads=2, group=2, head_dim=16, chunk=16, dtype=torch.float32, seed=2
    )
    clean = sparse_decode_attention_triton(q, k_pool, v_pool, slot_chunk, pos, valid_start, scale=0.25)
    slots = slot_chunk.shape[1]
    for b in range(q.shape[0]):
        for s in range(slots):
            positions = int(slot_chunk[b, s]) * k_pool.shape[1] + torch.arange(k_pool.shape[1])
            dead = (slot_chunk[b, s] < 0) | (positions > pos) | (positions < valid_start[b])
            k_pool[b * slots + s, dead] = float("inf")
            v_pool[b * slots + s, dead] = float("nan")
    dirty = sparse_decode_attention_triton(q, k_pool, v_pool, slot_chunk, pos, valid_start, scale=0.25)
    torch.testing.assert_close(dirty, clean, atol=0, rtol=0)


def test_sparse_decode_with_nothing_to_attend_writes_zeros():
    """Documented difference: the reference returns NaN for a sequence with no valid position."""
    q, k_pool, v_pool, slot_chunk, pos, _ = sparse_case(batch=3, kv_heads=2, group=2, head_dim=16, chunk=16, dtype=torch.float32, seed=3)
    valid_start = torch.tensor([0, int(pos) + 1, 0])  # sequence 1 is all padding
    out = sparse_decode_attention_triton(q, k_pool, v_pool, slot_chunk, pos, valid_start, scale=0.25, out=poisoned_like(q))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    ref = sparse_decode_attention_ref(q, k_pool, v_pool, slot_chunk, pos, valid_start, scale=0.25)
    torch.testing.assert_close(out[[0, 2]], ref[[0, 2]], **TOL[torch.float32])


def test_sparse_decode_reads_strided_operands():
    """Non-contiguous q (a head slice) and pools (every other kv head of a wider buffer)."""
    q, k_pool, v_pool, slot_chunk, pos, valid_start = sparse_case(
        batch=3, kv_heads=2, group=2, head_dim=16, chunk=16, dtype=torch.float32, seed=4
    )
    wide_q = torch.randn(q.shape[0], q.shape[1] * 2, q.shape[2])
    wide_q[:, ::2] = q
    wide_k = torch.randn(*k_pool.shape[:2], 4, k_pool.shape[3])
    wide_v = torch.randn_like(wide_k)
    wide_k[:, :, ::2], wide_v[:, :, ::2] = k_pool, v_pool
    strided = (wide_q[:, ::2], wide_k[:, :, ::2], wide_v[:, :, ::2])
    assert not any(t.is_contiguous() for t in strided)
    out = sparse_decode_attention_triton(*strided, slot_chunk, pos, valid_start, scale=0.25)
    ref = sparse_decode_attention_ref(q, k_pool, v_pool, slot_chunk, pos, valid_start, scale=0.25)
    assert_matches_reference(out, ref, torch.float32)


# -- ring ----------------------------------------------------------------------------------------


def ring_case(*, batch, kv_heads, group, head_dim, window, pos, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, window, kv_heads, head_dim)
    k_ring = torch.randn(shape, generator=gen)
    v_ring = torch.randn(shape, generator=gen)
    # unpadded, padded inside the window, padded anywhere up to pos
    valid_start = [0, max(0, pos - window // 2), int(torch.randint(0, pos + 1, (1,), generator=gen))][:batch]
    slot = torch.arange(window)
    positions = pos - torch.remainder(pos - slot, window)
    for b in range(batch):
        dead = (positions < 0) | (positions < valid_start[b])
        k_ring[b, dead] = torch.randn(int(dead.sum()), kv_heads, head_dim, generator=gen) * GARBAGE
        v_ring[b, dead] = torch.randn(int(dead.sum()), kv_heads, head_dim, generator=gen) * GARBAGE
    q = torch.randn(batch, kv_heads * group, head_dim, generator=gen)
    return q.to(dtype), k_ring.to(dtype), v_ring.to(dtype), torch.tensor([pos]), torch.tensor(valid_start)


# (group, head_dim, window, pos, softcap, dtype, num_splits): a window that is not a multiple of the
# block (masked tail block), a ring still filling (pos < W), exactly full, and wrapped many times.
RING_CASES = [
    (1, 16, 40, 5, 0.0, torch.float32, None),
    (4, 16, 40, 39, 30.0, torch.float32, 2),
    (2, 64, 16, 16, 0.0, torch.float32, 1),
    (2, 16, 40, 1000, 30.0, torch.bfloat16, 3),
    (4, 64, 64, 200, 0.0, torch.float16, None),
]


def _ring_id(case):
    group, head_dim, window, pos, softcap, dtype, splits = case
    return f"g{group}-d{head_dim}-w{window}-pos{pos}-{'cap' if softcap else 'nocap'}-{DTYPE_IDS[dtype]}-s{splits}"


@pytest.mark.parametrize("case", RING_CASES, ids=_ring_id)
def test_ring_decode_matches_reference(case):
    group, head_dim, window, pos, softcap, dtype, splits = case
    args = ring_case(
        batch=3, kv_heads=2, group=group, head_dim=head_dim, window=window, pos=pos, dtype=dtype,
        seed=zlib.crc32(repr(case).encode()),
    )
    scale = head_dim**-0.5

    out = ring_decode_attention_triton(*args, scale=scale, softcap=softcap, num_splits=splits, out=poisoned_like(args[0]))

    ref = ring_decode_attention_ref(*args, scale=scale, softcap=softcap)
    assert_matches_reference(out, ref, dtype)


# -- launcher checks and grid choice ---------------------------------------------------------------


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(k_pool=torch.randn(6, 24, 2, 16), v_pool=torch.randn(6, 24, 2, 16)), r"chunk size 24"),
        (dict(q=torch.randn(2, 4, 16, dtype=torch.float64)), r"dtypes"),
        (dict(v_pool=torch.randn(6, 16, 2, 8)), r"K/V"),
        (dict(slot_chunk=torch.zeros(2, 3, dtype=torch.int32)), r"slot_chunk must be"),
        (dict(valid_start=torch.zeros(3, dtype=torch.long)), r"valid_start"),
        (dict(out=torch.empty(2, 4, 8)), r"out must be like q"),
    ],
    ids=["chunk-not-pow2", "float64", "v-shape", "table-int32", "valid-start-shape", "out-shape"],
)
def test_sparse_launcher_rejects_unsupported_operands(change, match):
    args = dict(
        q=torch.randn(2, 4, 16), k_pool=torch.randn(6, 16, 2, 16), v_pool=torch.randn(6, 16, 2, 16),
        slot_chunk=torch.zeros(2, 3, dtype=torch.long), pos=torch.tensor([3]), valid_start=torch.zeros(2, dtype=torch.long),
    )
    out = change.pop("out", None)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        sparse_decode_attention_triton(**args, scale=0.25, out=out)


def test_split_count_depends_on_shapes_only(monkeypatch):
    """On CUDA: every split non-empty, at most _MAX_SPLITS, fixed per shape (graph replay), and no
    nearly empty last wave of programs."""
    monkeypatch.setattr(decode, "_sm_count", lambda index: 132)
    capacity = decode._SPLIT_WAVES * 132
    cuda = torch.device("cuda", 0)
    for programs, num_blocks in [(8, 277), (64, 277), (8, 3), (1, 10_000), (256, 40), (32, 277), (1, 277)]:
        splits, per_split = decode._decode_num_splits(cuda, programs, num_blocks, None)
        assert 1 <= splits <= min(decode._MAX_SPLITS, num_blocks)
        assert (splits - 1) * per_split < num_blocks <= splits * per_split
        assert decode._decode_num_splits(cuda, programs, num_blocks, None) == (splits, per_split)
        waves = programs * splits / capacity
        assert waves <= 1 or waves >= 1.5 or waves == int(waves), (programs, num_blocks, splits)
    # 32 sequences x 1 kv head over 277 blocks: 8 splits (256 programs, one wave), not 9 (288: two)
    assert decode._decode_num_splits(cuda, 32, 277, None)[0] == 8
    # batch 1, MQA: one program per SM, 3 blocks each (latency-bound: not two per SM with 2 blocks)
    assert decode._decode_num_splits(cuda, 1, 277, None) == (93, 3)
    # 8 kv heads at 128K: 18 blocks each at one program per SM is too long; two per SM, 9 blocks each
    assert decode._decode_num_splits(cuda, 8, 277, None) == (31, 9)
    assert decode._decode_num_splits(torch.device("cpu"), 8, 277, None)[0] == decode._INTERPRETER_SPLITS
    assert decode._decode_num_splits(cuda, 8, 277, 5) == (5, 56)


@pytest.mark.parametrize("chunk, splits", [(32, None), (32, 3), (16, None)])
def test_launch_plan_reports_what_the_launcher_runs(monkeypatch, chunk, splits):
    """``sparse_launch_plan`` (the benchmarks record it) names the block size, block count and split
    count the launcher then uses: its workspace of split partials is keyed by that split count."""
    monkeypatch.setattr(decode, "_WORKSPACES", {})
    args = sparse_case(batch=2, kv_heads=1, group=4, head_dim=16, chunk=chunk, dtype=torch.float32, seed=chunk,
                       num_chunks=12, slots=9)
    plan = decode.sparse_launch_plan(args[0], args[1], args[3], num_splits=splits, min_block_tokens=32)
    assert plan["block_tokens"] == 32 and plan["blocks"] == (9 if chunk == 32 else 5)  # 16-token slots: two per block
    assert plan["group_rows"] == 16 and plan["num_warps"] == 4 and plan["num_stages"] == 3 and plan["pdl"] is False
    out = sparse_decode_attention_triton(*args, scale=0.3, num_splits=splits, min_block_tokens=32, out=poisoned_like(args[0]))
    assert_matches_reference(out, sparse_decode_attention_ref(*args, scale=0.3), torch.float32)
    assert [key[3] for key in decode._WORKSPACES] == [plan["splits"]]
    assert plan["splits"] == (splits or decode._INTERPRETER_SPLITS)


def test_launch_plan_defaults():
    """Without options: 64-token blocks (a 16-token chunk's block spans 4 slots), the group's own rows
    off sm90, no PDL on the CPU."""
    args = sparse_case(batch=1, kv_heads=2, group=2, head_dim=16, chunk=16, dtype=torch.float32, seed=5, num_chunks=12, slots=9)
    plan = decode.sparse_launch_plan(args[0], args[1], args[3])
    assert plan == dict(block_tokens=64, blocks=3, splits=decode._INTERPRETER_SPLITS, group_rows=16,
                        num_warps=4, num_stages=3, pdl=False)


@pytest.mark.parametrize("option, bad, message", [
    ("min_block_tokens", 8, "min_block_tokens=8: give a power of two from 16 to 256"),
    ("min_block_tokens", 48, "min_block_tokens=48: give a power of two from 16 to 256"),
    ("min_block_tokens", 512, "min_block_tokens=512: give a power of two from 16 to 256"),
    ("min_block_tokens", "64", "min_block_tokens='64': give a power of two"),
    ("group_rows", 24, "group_rows=24: give a power of two from 16 to 128"),
    ("num_warps", 3, "num_warps=3: give a power of two from 1 to 16"),
    ("num_stages", 0, "num_stages=0: give a whole number from 1 to 8"),
    ("pdl", True, "pdl=True needs a CUDA GPU of compute capability 9.0 or later"),
])
def test_bad_launch_options_are_refused(option, bad, message):
    args = sparse_case(batch=1, kv_heads=1, group=2, head_dim=16, chunk=16, dtype=torch.float32, seed=3)
    with pytest.raises(ValueError, match=message):
        sparse_decode_attention_triton(*args, scale=0.3, **{option: bad})
    with pytest.raises(ValueError, match=message):
        decode.sparse_launch_plan(args[0], args[1], args[3], **{option: bad})
    if option != "min_block_tokens":
        ring = (args[0], args[1].view(1, -1, 1, 16), args[2].view(1, -1, 1, 16), args[4], args[5])
        with pytest.raises(ValueError, match=message):
            ring_decode_attention_triton(*ring, scale=0.3, **{option: bad})
