"""The fused decode step of a sparse layer (``sparse_decode_attention_append_triton``: attention with the
token's append, chunk-bound update and query tap in its merge kernel) against its PyTorch reference
(``append_kv_ref`` + ``update_chunk_index_ref`` + the tap + ``sparse_decode_attention_ref``), on CPU
tensors under Triton's interpreter.

Fresh random inputs per case; the output, the query tap and the split-K workspace are poisoned (NaN)
before each call. The pool row at ``pos`` holds a stale NaN (what a reused slot may hold): the split
programs must not read it, since the merge adds the token itself. Everything else that must not take
part holds large garbage. After the call the attention output is compared within tolerance, and the
pools, the chunk bounds and the tap bit for bit: a chunk with no slot (-1) for the new token (its write
dropped, the token not attended), left padding, and a position that opens a new chunk (its bounds reset).
"""

from __future__ import annotations

import importlib
import zlib

from triton_interpreter import interpreted_kernels  # noqa: F401  (sets TRITON_INTERPRET=1 first)

import pytest  # noqa: E402
import torch  # noqa: E402

from lsa_rewrite.kernels import (  # noqa: E402
    append_kv,
    sparse_decode_attention,
    sparse_decode_attention_append,
    sparse_decode_attention_append_ref,
    sparse_decode_attention_append_triton,
    tap,
    update_chunk_index,
)

decode = importlib.import_module("lsa_rewrite.kernels.decode_attention")

GARBAGE = 50.0
TOL = {
    torch.float32: dict(atol=2e-5, rtol=1e-4),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
}
DTYPE_IDS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
STATE = ("k_pool", "v_pool", "kmin", "kmax", "q_tap")


def append_case(*, batch, kv_heads, group, head_dim, chunk, dtype, seed, opens_chunk=False, dropped=(), num_chunks=7, slots=5):
    """A store one token before ``pos``: random pool with empty slots, per-sequence left padding, the
    chunk of ``pos`` resident except for the sequences in ``dropped`` (``chunk_slot`` -1 there), consistent
    ``slot_chunk``/``chunk_slot`` tables, random chunk bounds (garbage for the chunk of ``pos`` when the
    token opens it). Returns the op's operands as a dict."""
    gen = torch.Generator().manual_seed(seed)
    tail = int(torch.randint(2, num_chunks - 1, (1,), generator=gen))
    pos = tail * chunk + (0 if opens_chunk else int(torch.randint(1, chunk, (1,), generator=gen)))
    valid_start = [0] + sorted(int(v) for v in torch.randint(1, pos // 2 + 2, (batch - 1,), generator=gen))

    shape = (batch * slots, chunk, kv_heads, head_dim)
    k_pool = torch.randn(shape, generator=gen)
    v_pool = torch.randn(shape, generator=gen)
    slot_chunk = torch.full((batch, slots), -1, dtype=torch.long)
    chunk_slot = torch.full((batch, num_chunks), -1, dtype=torch.long)
    for b in range(batch):
        others = [c for c in torch.randperm(num_chunks, generator=gen).tolist() if c != tail]
        chunks = ([] if b in dropped else [tail]) + others[: slots - 2 + (b % 2)]  # 1 to 3 empty slots
        where = torch.randperm(slots, generator=gen)[: len(chunks)]
        slot_chunk[b, where] = torch.tensor(chunks)
        chunk_slot[b, torch.tensor(chunks)] = where
        for s in range(slots):
            c = int(slot_chunk[b, s])
            positions = c * chunk + torch.arange(chunk)
            dead = (c < 0) | (positions > pos) | (positions < valid_start[b])
            k_pool[b * slots + s, dead] = torch.randn(int(dead.sum()), kv_heads, head_dim, generator=gen) * GARBAGE
            v_pool[b * slots + s, dead] = torch.randn(int(dead.sum()), kv_heads, head_dim, generator=gen) * GARBAGE
            stale = positions == pos  # the row the token goes to: never read by the split programs
            k_pool[b * slots + s, stale] = float("nan")
            v_pool[b * slots + s, stale] = float("nan")
    kmin = torch.randn(batch, num_chunks, kv_heads, head_dim, generator=gen)
    kmax = kmin + torch.rand(kmin.shape, generator=gen)
    if opens_chunk:  # bounds of an earlier use of the chunk id: must be reset, not folded
        kmin[:, tail] = -GARBAGE
        kmax[:, tail] = GARBAGE
    q = torch.randn(batch, kv_heads * group, head_dim, generator=gen)
    k_new = torch.randn(batch, kv_heads, head_dim, generator=gen)
    v_new = torch.randn(batch, kv_heads, head_dim, generator=gen)
    return dict(
        q=q.to(dtype), k_pool=k_pool.to(dtype), v_pool=v_pool.to(dtype), slot_chunk=slot_chunk, pos=torch.tensor([pos]),
        valid_start=torch.tensor(valid_start), k_new=k_new.to(dtype), v_new=v_new.to(dtype), chunk_slot=chunk_slot,
        kmin=kmin.to(dtype), kmax=kmax.to(dtype), q_tap=torch.full_like(q, float("nan")).to(dtype),
    )


def operands(case: dict) -> tuple:
    names = ("q", "k_pool", "v_pool", "slot_chunk", "pos", "valid_start", "k_new", "v_new", "chunk_slot", "kmin", "kmax", "q_tap")
    return tuple(case[n] for n in names)


def cloned(case: dict) -> dict:
    return {name: (t.clone() if name in STATE else t) for name, t in case.items()}


def run_both(case: dict, *, scale: float, softcap: float = 0.0, **launch):
    """(Triton output, Triton state, reference output, reference state), each on its own copy of the store."""
    expected = cloned(case)
    ref = sparse_decode_attention_append_ref(*operands(expected), scale=scale, softcap=softcap)
    got = cloned(case)
    out = sparse_decode_attention_append_triton(
        *operands(got), scale=scale, softcap=softcap, out=torch.full_like(case["q"], float("nan")), **launch
    )
    return out, got, ref, expected


def assert_same_state(got: dict, expected: dict) -> None:
    for name in STATE:
        assert got[name].dtype == expected[name].dtype
        torch.testing.assert_close(got[name], expected[name], atol=0, rtol=0, equal_nan=True, msg=f"{name} differs")
    assert torch.isfinite(got["q_tap"]).all(), "the query tap was not written"


def assert_matches_reference(out, ref, dtype):
    assert out.dtype == dtype
    assert torch.isfinite(out).all(), "an output element was not written (or went non-finite)"
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


# (group, head_dim, chunk, batch, softcap, dtype, num_splits, opens_chunk, dropped): GQA groups 1/2/4/16,
# head_dim 16/64/256, chunk 16/32/64 (16 and 32: a block spans several slots), batch 1/3, softcap on/off,
# fp32/bf16/fp16, one to many splits, mid-chunk and chunk-opening positions, the token's chunk without
# a slot in one sequence.
CASES = [
    (1, 16, 16, 1, 0.0, torch.float32, None, False, ()),
    (2, 16, 32, 3, 30.0, torch.float32, 3, True, (1,)),
    (4, 64, 16, 3, 0.0, torch.bfloat16, None, False, (2,)),
    (2, 64, 32, 1, 0.0, torch.bfloat16, 4, True, ()),
    (1, 64, 32, 3, 30.0, torch.float16, 2, False, (0,)),
    (16, 16, 16, 3, 0.0, torch.bfloat16, 2, True, ()),
    (4, 32, 64, 3, 0.0, torch.float32, 64, False, (1,)),
    (1, 256, 64, 1, 0.0, torch.float32, 3, False, ()),
]


def _case_id(case):
    group, head_dim, chunk, batch, softcap, dtype, splits, opens, dropped = case
    return (f"g{group}-d{head_dim}-c{chunk}-b{batch}-{'cap' if softcap else 'nocap'}-{DTYPE_IDS[dtype]}-s{splits}"
            f"-{'opens' if opens else 'mid'}-drop{''.join(map(str, dropped)) or 'none'}")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_fused_append_matches_reference(case):
    group, head_dim, chunk, batch, softcap, dtype, splits, opens, dropped = case
    store = append_case(batch=batch, kv_heads=2, group=group, head_dim=head_dim, chunk=chunk, dtype=dtype,
                        seed=zlib.crc32(repr(case).encode()), opens_chunk=opens, dropped=dropped)
    out, got, ref, expected = run_both(store, scale=1.3 * head_dim**-0.5, softcap=softcap, num_splits=splits)
    assert_matches_reference(out, ref, dtype)
    assert_same_state(got, expected)
    # the token really went in (or, for a chunk without a slot, nowhere)
    pos, slots = int(store["pos"]), store["slot_chunk"].shape[1]
    for b in range(batch):
        slot = int(store["chunk_slot"][b, pos // chunk])
        if slot >= 0:
            assert torch.equal(got["k_pool"][b * slots + slot, pos % chunk], store["k_new"][b])
            assert torch.equal(got["v_pool"][b * slots + slot, pos % chunk], store["v_new"][b])
        else:
            assert b in dropped
            torch.testing.assert_close(got["k_pool"][b * slots:(b + 1) * slots], store["k_pool"][b * slots:(b + 1) * slots],
                                       atol=0, rtol=0, equal_nan=True)


def test_fused_append_merges_in_tiles_and_head_dim_slices():
    """300 splits: two merge tiles and two 16-wide slices of the head dim, so the token is written by
    two programs per kv head (one per slice), and only by the first query head of each group."""
    splits = 300
    assert decode._merge_tiles(splits, 32) == (256, 16)
    store = append_case(batch=2, kv_heads=2, group=4, head_dim=32, chunk=16, dtype=torch.float32, seed=splits,
                        num_chunks=320, slots=300, dropped=(1,))
    out, got, ref, expected = run_both(store, scale=0.3, num_splits=splits, min_block_tokens=16)
    assert_matches_reference(out, ref, torch.float32)
    assert_same_state(got, expected)


def test_fused_append_with_nothing_else_to_attend():
    """A sequence whose only valid position is the new token (left padding up to ``pos``) attends to it
    alone; one padded past ``pos`` gets zeros (the reference: NaN), and its token is still written."""
    store = append_case(batch=3, kv_heads=2, group=2, head_dim=16, chunk=16, dtype=torch.float32, seed=7)
    pos = int(store["pos"])
    store["valid_start"] = torch.tensor([0, pos, pos + 1])
    out, got, ref, expected = run_both(store, scale=0.25)
    torch.testing.assert_close(out[:2], ref[:2], **TOL[torch.float32])
    group_v = store["v_new"][1].repeat_interleave(2, dim=0)  # [Hq, D]: each query head's kv head
    torch.testing.assert_close(out[1], group_v, **TOL[torch.float32])
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert_same_state(got, expected)


def test_fused_append_reads_strided_operands():
    """Non-contiguous q and token (head slices of wider buffers), as the captured graph may pass them."""
    store = append_case(batch=3, kv_heads=2, group=2, head_dim=16, chunk=16, dtype=torch.float32, seed=11)
    strided = dict(store)
    for name in ("q", "k_new", "v_new"):
        wide = torch.randn(store[name].shape[0], store[name].shape[1] * 2, store[name].shape[2])
        wide[:, ::2] = store[name]
        strided[name] = wide[:, ::2]
        assert not strided[name].is_contiguous()
    out, got, _, _ = run_both(strided, scale=0.25)
    _, _, ref, expected = run_both(store, scale=0.25)
    assert_matches_reference(out, ref, torch.float32)
    assert_same_state(got, expected)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(q_tap=torch.zeros(2, 8, 16)), r"q_tap"),
        (dict(k_new=torch.zeros(2, 2, 16, dtype=torch.float64)), r"k_new, v_new"),
        (dict(chunk_slot=torch.zeros(2, 4, dtype=torch.int32)), r"chunk_slot must be"),
        (dict(kmin=torch.zeros(2, 4, 1, 16)), r"bounds"),
    ],
    ids=["tap-shape", "token-float64", "table-int32", "bounds-shape"],
)
def test_fused_launcher_rejects_unsupported_operands(change, match):
    args = dict(
        q=torch.randn(2, 4, 16), k_pool=torch.randn(6, 16, 2, 16), v_pool=torch.randn(6, 16, 2, 16),
        slot_chunk=torch.zeros(2, 3, dtype=torch.long), pos=torch.tensor([3]), valid_start=torch.zeros(2, dtype=torch.long),
        k_new=torch.randn(2, 2, 16), v_new=torch.randn(2, 2, 16), chunk_slot=torch.zeros(2, 4, dtype=torch.long),
        kmin=torch.zeros(2, 4, 2, 16), kmax=torch.zeros(2, 4, 2, 16), q_tap=torch.zeros(2, 4, 16),
    )
    args.update(change)
    if "kmin" in change:
        args["kmax"] = torch.zeros_like(change["kmin"])
    with pytest.raises(ValueError, match=match):
        sparse_decode_attention_append_triton(**args, scale=0.25)


def test_op_on_cpu_is_the_unfused_ops_in_order():
    """The CPU op (the reference) does what the step did before the fusion: ``append_kv``,
    ``update_chunk_index``, ``tap``, then ``sparse_decode_attention``."""
    store = append_case(batch=3, kv_heads=2, group=2, head_dim=16, chunk=16, dtype=torch.float32, seed=5, dropped=(2,))
    # the reference attends to every resident position <= pos: no stale NaN at pos on this path
    for name in ("k_pool", "v_pool"):
        store[name] = torch.nan_to_num(store[name])
    fused, unfused = cloned(store), cloned(store)
    out = sparse_decode_attention_append(*operands(fused), 0.25, 30.0)
    q, k_pool, v_pool, slot_chunk, pos, valid_start, k_new, v_new, chunk_slot, kmin, kmax, q_tap = operands(unfused)
    append_kv(k_pool, v_pool, k_new, v_new, pos, chunk_slot)
    update_chunk_index(kmin, kmax, k_new, pos, k_pool.shape[1])
    tap(q_tap, q)
    expected = sparse_decode_attention(q, k_pool, v_pool, slot_chunk, pos, valid_start, 0.25, 30.0)
    assert torch.equal(out, expected)
    for name in STATE:
        assert torch.equal(fused[name], unfused[name]), name
