"""Check the lsa Triton kernels against their references on a CUDA GPU, then time them.

Not a test (CI has no GPU): run it by hand on the GPU machine.

    python benchmarks/check_kernels_gpu.py --out results.json [--sweep] [--no-compile]
    python benchmarks/check_kernels_gpu.py --only sparse_append --out FILE   # the fused attention + append alone

1. Correctness at realistic shapes (32 q / 8 kv heads, head_dim 128, bf16, 64-token chunks, a resident
   set of 13.5% of a 128K context, batch 1 and 8): every Triton launcher against its PyTorch reference
   on CUDA, through the ``torch.ops.lsa`` ops too, inside a captured CUDA graph (no host sync, nothing
   allocated per replay) and, unless ``--no-compile``, under ``torch.compile(mode="reduce-overhead")``.
   Exits non-zero if anything mismatches.
2. Timing: mean over 100 iterations after warm-up, with ``torch.cuda.Event``s, both as an eager Python
   loop (includes the launchers' host overhead) and as CUDA graph replays (device time only, which is
   what a compiled decode step pays). Inputs rotate over enough copies to exceed the L2 cache. A dense
   SDPA over the full 128K cache is timed as the baseline. One JSON line per kernel and shape on
   stdout; everything (with torch/triton versions, GPU, date) in ``--out``.
3. ``--sweep``: time split-kernel launch configurations (warps, stages, programs per SM) to choose the
   defaults in ``kernels/decode_attention.py``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import math
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

# shapes
Q_HEADS, KV_HEADS, HEAD_DIM, DTYPE = 32, 8, 128, torch.bfloat16
CONTEXT, RESIDENT_FRACTION = 128 * 1024, 0.135
WINDOW = 4096  # a sliding-window layer's ring (Mistral-style)
L2_BYTES = 60 * 1024 * 1024


def load_kernels():
    """``lsa_rewrite.kernels`` when installed; else the repo's ``kernels/`` package under another name."""
    try:
        return importlib.import_module("lsa_rewrite.kernels")
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "lsa_kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["lsa_kernels"] = module
        spec.loader.exec_module(module)
        return module


K = load_kernels()
DECODE = sys.modules[K.__name__ + ".decode_attention"]
FAILURES: list[str] = []
RECORDS: list[dict] = []


def emit(record: dict) -> None:
    RECORDS.append(record)
    print(json.dumps(record), flush=True)


# -- inputs ------------------------------------------------------------------------------------


def sparse_inputs(batch: int, chunk: int, *, seed: int, empty_fraction: float = 0.05):
    """Pool holding 13.5% of a 128K context in ``chunk``-token chunks, a few empty slots, the partial
    tail chunk resident, per-sequence left padding. Returns a dict of the op's operands."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    num_chunks = CONTEXT // chunk
    slots = math.ceil(RESIDENT_FRACTION * CONTEXT / chunk)
    pos = CONTEXT - chunk // 2 - 1  # the tail chunk is half written
    tail = pos // chunk
    shape = (batch * slots, chunk, KV_HEADS, HEAD_DIM)
    k_pool = torch.randn(shape, device="cuda", dtype=DTYPE, generator=gen)
    v_pool = torch.randn(shape, device="cuda", dtype=DTYPE, generator=gen)
    slot_chunk = torch.full((batch, slots), -1, dtype=torch.long)
    cpu_gen = torch.Generator().manual_seed(seed)
    filled = slots - max(1, int(empty_fraction * slots))
    for b in range(batch):
        others = torch.randperm(num_chunks - 1, generator=cpu_gen)[: filled - 1]
        chunks = torch.cat([torch.tensor([tail]), others[others != tail][: filled - 1]])
        where = torch.randperm(slots, generator=cpu_gen)[: len(chunks)]
        slot_chunk[b, where] = chunks
    valid_start = torch.tensor([0 if b % 2 == 0 else 1000 * b + 17 for b in range(batch)])
    q = torch.randn(batch, Q_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
    return dict(
        q=q, k_pool=k_pool, v_pool=v_pool, slot_chunk=slot_chunk.cuda(), pos=torch.tensor([pos], device="cuda"),
        valid_start=valid_start.cuda(),
    )


def sparse_bytes(inputs) -> int:
    """Bytes the kernel must read: K and V of every filled slot (q, table and output are noise)."""
    filled = int((inputs["slot_chunk"] >= 0).sum())
    k = inputs["k_pool"]
    return 2 * filled * k[0].numel() * k.element_size()


def ring_inputs(batch: int, *, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape = (batch, WINDOW, KV_HEADS, HEAD_DIM)
    return dict(
        q=torch.randn(batch, Q_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen),
        k_ring=torch.randn(shape, device="cuda", dtype=DTYPE, generator=gen),
        v_ring=torch.randn(shape, device="cuda", dtype=DTYPE, generator=gen),
        pos=torch.tensor([CONTEXT - 33], device="cuda"),
        valid_start=torch.tensor([0 if b % 2 == 0 else CONTEXT - WINDOW // 2 for b in range(batch)], device="cuda"),
    )


def bounds_inputs(batch: int, chunk: int, *, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    num_chunks = CONTEXT // chunk
    kmin = torch.randn(batch, num_chunks, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
    kmax = kmin + torch.rand(kmin.shape, device="cuda", dtype=DTYPE, generator=gen)
    q = torch.randn(batch, Q_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
    return dict(q=q, kmin=kmin, kmax=kmax)


def copies_for(nbytes: int) -> int:
    """Input copies to rotate over so that one pass over all of them is 4x the L2 cache."""
    return max(1, min(8, math.ceil(4 * L2_BYTES / max(nbytes, 1))))


# -- checks ------------------------------------------------------------------------------------


def check_close(name: str, out: torch.Tensor, ref: torch.Tensor, *, atol: float, rtol: float, rel_l2: float) -> dict:
    out, ref = out.float(), ref.float()
    finite = bool(torch.isfinite(out).all())
    err = (out - ref).norm() / ref.norm().clamp_min(1e-30)
    max_abs = float((out - ref).abs().max()) if finite else float("inf")
    ok = finite and float(err) <= rel_l2 and torch.allclose(out, ref, atol=atol, rtol=rtol)
    if not ok:
        FAILURES.append(f"{name}: rel_l2 {float(err):.3e}, max_abs {max_abs:.3e}, finite {finite}")
    return dict(check=name, ok=ok, rel_l2=float(err), max_abs=max_abs)


def check_equal(name: str, got: list[torch.Tensor], expected: list[torch.Tensor]) -> dict:
    ok = all(torch.equal(g, e) for g, e in zip(got, expected))
    if not ok:
        FAILURES.append(f"{name}: not bit-equal to the reference")
    return dict(check=name, ok=ok)


BF16 = dict(atol=2e-2, rtol=2e-2, rel_l2=1e-2)


def check_sparse(batch: int, chunk: int, softcap: float) -> None:
    x = sparse_inputs(batch, chunk, seed=batch * 100 + chunk)
    args = (x["q"], x["k_pool"], x["v_pool"], x["slot_chunk"], x["pos"], x["valid_start"])
    scale = HEAD_DIM**-0.5
    ref = K.sparse_decode_attention_ref(*args, scale=scale, softcap=softcap)
    out = torch.full_like(x["q"], float("nan"))
    K.sparse_decode_attention_triton(*args, scale=scale, softcap=softcap, out=out)
    tag = f"sparse B={batch} C={chunk} softcap={softcap}"
    emit(check_close(f"{tag} launcher", out, ref, **BF16))
    emit(check_close(f"{tag} op", torch.ops.lsa.sparse_decode_attention(*args, scale, softcap), ref, **BF16))
    for splits in (1, 7):
        got = K.sparse_decode_attention_triton(*args, scale=scale, softcap=softcap, num_splits=splits)
        emit(check_close(f"{tag} splits={splits}", got, ref, **BF16))


TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4, rel_l2=1e-5),
    torch.float16: dict(atol=5e-3, rtol=5e-3, rel_l2=2e-3),
    torch.bfloat16: BF16,
}


def check_coverage() -> None:
    """Every supported dtype x head_dim x chunk size compiles (shared memory fits) and is right, on a
    small pool; GQA groups 1, 4, 8 and softcap alternate across the combinations."""
    for i, (dtype, head_dim, chunk) in enumerate(
        (dt, d, c) for dt in TOLERANCES for d in (16, 32, 64, 128, 256) for c in (16, 32, 64, 128)
    ):
        gen = torch.Generator(device="cuda").manual_seed(i)
        batch, kv_heads, group, slots, softcap = 2, 2, (1, 4, 8)[i % 3], 6, (0.0, 20.0)[i % 2]
        num_chunks = 10
        k_pool = torch.randn(batch * slots, chunk, kv_heads, head_dim, device="cuda", generator=gen).to(dtype)
        v_pool = torch.randn(batch * slots, chunk, kv_heads, head_dim, device="cuda", generator=gen).to(dtype)
        q = torch.randn(batch, kv_heads * group, head_dim, device="cuda", generator=gen).to(dtype)
        slot_chunk = torch.stack([torch.randperm(num_chunks)[:slots] for _ in range(batch)]).cuda()
        slot_chunk[:, 0] = -1
        slot_chunk[:, 1] = 7  # the tail chunk
        pos = torch.tensor([7 * chunk + chunk // 3], device="cuda")
        valid_start = torch.tensor([0, chunk + 3], device="cuda")
        args = (q, k_pool, v_pool, slot_chunk, pos, valid_start)
        ref = K.sparse_decode_attention_ref(*args, scale=head_dim**-0.5, softcap=softcap)
        out = K.sparse_decode_attention_triton(*args, scale=head_dim**-0.5, softcap=softcap, num_splits=3)
        tag = f"coverage {str(dtype)[6:]} D={head_dim} C={chunk} G={group} softcap={softcap}"
        emit(check_close(tag, out, ref, **TOLERANCES[dtype]))
        window = 3 * chunk - 5
        k_ring = k_pool.view(batch, slots * chunk, kv_heads, head_dim)[:, :window]  # strided: a ring's view
        v_ring = v_pool.view(batch, slots * chunk, kv_heads, head_dim)[:, :window]
        ring = (q, k_ring, v_ring, pos, valid_start)
        ref = K.ring_decode_attention_ref(*ring, scale=head_dim**-0.5, softcap=softcap)
        out = K.ring_decode_attention_triton(*ring, scale=head_dim**-0.5, softcap=softcap)
        emit(check_close(f"{tag} ring W={window}", out, ref, **TOLERANCES[dtype]))
    # MQA groups of 32 at batch 1: on sm90 the launcher pads them to wgmma's 64 rows (16-bit inputs)
    for i, (dtype, head_dim) in enumerate((dt, d) for dt in TOLERANCES for d in (64, 128, 256)):
        gen = torch.Generator(device="cuda").manual_seed(100 + i)
        chunk, slots, softcap = (16, 64, 128)[i % 3], 6, (0.0, 20.0)[i % 2]
        k_pool = torch.randn(slots, chunk, 1, head_dim, device="cuda", generator=gen).to(dtype)
        v_pool = torch.randn(slots, chunk, 1, head_dim, device="cuda", generator=gen).to(dtype)
        q = torch.randn(1, 32, head_dim, device="cuda", generator=gen).to(dtype)
        slot_chunk = torch.tensor([[-1, 7, 2, 5, 0, 9]], device="cuda")
        pos = torch.tensor([7 * chunk + chunk // 3], device="cuda")
        args = (q, k_pool, v_pool, slot_chunk, pos, torch.tensor([3], device="cuda"))
        ref = K.sparse_decode_attention_ref(*args, scale=head_dim**-0.5, softcap=softcap)
        out = K.sparse_decode_attention_triton(*args, scale=head_dim**-0.5, softcap=softcap)
        rows = DECODE.sparse_launch_plan(q, k_pool, slot_chunk)["group_rows"]
        emit(check_close(f"coverage {str(dtype)[6:]} D={head_dim} C={chunk} G=32 rows={rows} softcap={softcap}", out, ref, **TOLERANCES[dtype]))
        ring = (q, k_pool.view(1, slots * chunk, 1, head_dim), v_pool.view(1, slots * chunk, 1, head_dim), pos, args[5])
        ref = K.ring_decode_attention_ref(*ring, scale=head_dim**-0.5, softcap=softcap)
        out = K.ring_decode_attention_triton(*ring, scale=head_dim**-0.5, softcap=softcap)
        emit(check_close(f"coverage {str(dtype)[6:]} D={head_dim} G=32 rows={rows} ring W={slots * chunk}", out, ref, **TOLERANCES[dtype]))
    for i, (kv_heads, group, head_dim, num_chunks) in enumerate(((8, 4, 128, 2048), (1, 64, 256, 300), (2, 3, 24, 77), (4, 1, 64, 5))):
        for dtype in TOLERANCES:
            gen = torch.Generator(device="cuda").manual_seed(100 + i)
            q = torch.randn(3, kv_heads * group, head_dim, device="cuda", generator=gen).to(dtype)
            kmin = torch.randn(3, num_chunks, kv_heads, head_dim, device="cuda", generator=gen).to(dtype)
            kmax = kmin + torch.rand(kmin.shape, device="cuda", generator=gen).to(dtype)
            ref = K.chunk_scores_ref(q, kmin, kmax)
            out = K.chunk_scores_triton(q, kmin, kmax)
            tag = f"coverage chunk_scores {str(dtype)[6:]} Hkv={kv_heads} G={group} D={head_dim} N={num_chunks}"
            emit(check_close(tag, out, ref, atol=1e-3, rtol=1e-4, rel_l2=1e-5))


def check_ring(batch: int) -> None:
    x = ring_inputs(batch, seed=batch)
    args = (x["q"], x["k_ring"], x["v_ring"], x["pos"], x["valid_start"])
    for softcap in (0.0, 50.0):
        ref = K.ring_decode_attention_ref(*args, scale=HEAD_DIM**-0.5, softcap=softcap)
        out = torch.full_like(x["q"], float("nan"))
        K.ring_decode_attention_triton(*args, scale=HEAD_DIM**-0.5, softcap=softcap, out=out)
        emit(check_close(f"ring B={batch} W={WINDOW} softcap={softcap} launcher", out, ref, **BF16))


def check_append(batch: int, chunk: int) -> None:
    x = sparse_inputs(batch, chunk, seed=7 + batch)
    b = bounds_inputs(batch, chunk, seed=8 + batch)
    pos = x["pos"]
    chunk_slot = torch.full((batch, CONTEXT // chunk), -1, dtype=torch.long, device="cuda")
    slots = x["slot_chunk"].shape[1]
    for row in range(batch):  # the inverse of slot_chunk
        filled = x["slot_chunk"][row] >= 0
        chunk_slot[row, x["slot_chunk"][row][filled]] = torch.arange(slots, device="cuda")[filled]
    k_new = torch.randn(batch, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    v_new = torch.randn_like(k_new)
    for offset_pos in (pos, (pos // chunk) * chunk):  # mid-chunk (fold) and chunk start (reset)
        expected = [t.clone() for t in (x["k_pool"], x["v_pool"], b["kmin"], b["kmax"])]
        K.append_kv_ref(expected[0], expected[1], k_new, v_new, offset_pos, chunk_slot)
        K.update_chunk_index_ref(expected[2], expected[3], k_new, offset_pos, chunk)
        got = [t.clone() for t in (x["k_pool"], x["v_pool"], b["kmin"], b["kmax"])]
        K.append_kv_triton(got[0], got[1], k_new, v_new, offset_pos, chunk_slot, kmin=got[2], kmax=got[3])
        emit(check_equal(f"append_kv+bounds B={batch} pos%C={int(offset_pos) % chunk}", got, expected))
        got = [t.clone() for t in (x["k_pool"], x["v_pool"], b["kmin"], b["kmax"])]
        torch.ops.lsa.append_kv(got[0], got[1], k_new, v_new, offset_pos, chunk_slot)
        torch.ops.lsa.update_chunk_index(got[2], got[3], k_new, offset_pos, chunk)
        emit(check_equal(f"append_kv, update_chunk_index ops B={batch} pos%C={int(offset_pos) % chunk}", got, expected))
    r = ring_inputs(batch, seed=9)
    expected = [r["k_ring"].clone(), r["v_ring"].clone()]
    K.ring_append_kv_ref(*expected, k_new, v_new, r["pos"])
    torch.ops.lsa.ring_append_kv(r["k_ring"], r["v_ring"], k_new, v_new, r["pos"])
    emit(check_equal(f"ring_append_kv op B={batch}", [r["k_ring"], r["v_ring"]], expected))


def append_store(batch: int, chunk: int, *, seed: int, opens_chunk: bool = False, drop_last: bool = False) -> dict:
    """``sparse_inputs`` plus what ``sparse_decode_attention_append`` writes: the inverse table
    ``chunk_slot``, random chunk bounds, the token and a poisoned query tap. ``opens_chunk``: ``pos`` is the
    first token of its chunk; ``drop_last``: the last sequence's chunk of ``pos`` has no slot (its write is
    dropped, the token not attended)."""
    x = sparse_inputs(batch, chunk, seed=seed)
    bounds = bounds_inputs(batch, chunk, seed=seed + 1)
    x.update(kmin=bounds["kmin"], kmax=bounds["kmax"])
    if opens_chunk:
        x["pos"] = (x["pos"] // chunk) * chunk
    tail = int(x["pos"]) // chunk
    if drop_last:
        x["slot_chunk"][batch - 1][x["slot_chunk"][batch - 1] == tail] = -1
    chunk_slot = torch.full((batch, CONTEXT // chunk), -1, dtype=torch.long, device="cuda")
    slots = x["slot_chunk"].shape[1]
    for row in range(batch):  # the inverse of slot_chunk
        filled = x["slot_chunk"][row] >= 0
        chunk_slot[row, x["slot_chunk"][row][filled]] = torch.arange(slots, device="cuda")[filled]
    x["chunk_slot"] = chunk_slot
    x["k_new"] = torch.randn(batch, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    x["v_new"] = torch.randn_like(x["k_new"])
    x["q_tap"] = torch.full_like(x["q"], float("nan"))
    return x


APPEND_OPERANDS = ("q", "k_pool", "v_pool", "slot_chunk", "pos", "valid_start", "k_new", "v_new", "chunk_slot", "kmin", "kmax", "q_tap")
APPEND_STATE = ("k_pool", "v_pool", "kmin", "kmax", "q_tap")


def check_sparse_append(batch: int, chunk: int) -> None:
    """The fused step of a sparse layer (attention + append + bounds + query tap) against its reference
    on the GPU: the output within bf16 tolerance, the store bit for bit; mid-chunk and chunk-opening
    positions, a sequence whose chunk of ``pos`` has no slot; the launcher and the op (PDL on sm90)."""
    scale = HEAD_DIM**-0.5
    for opens in (False, True):
        x = append_store(batch, chunk, seed=71 + batch, opens_chunk=opens, drop_last=batch > 1)
        tag = f"sparse+append B={batch} C={chunk} pos%C={int(x['pos']) % chunk}"
        expected = {k: (v.clone() if k in APPEND_STATE else v) for k, v in x.items()}
        ref = K.sparse_decode_attention_append_ref(*(expected[n] for n in APPEND_OPERANDS), scale=scale)
        for via in ("launcher", "op"):
            got = {k: (v.clone() if k in APPEND_STATE else v) for k, v in x.items()}
            args = [got[n] for n in APPEND_OPERANDS]
            if via == "launcher":
                out = torch.full_like(x["q"], float("nan"))
                K.sparse_decode_attention_append_triton(*args, scale=scale, out=out)
            else:
                out = torch.ops.lsa.sparse_decode_attention_append(*args, scale, 0.0)
            emit(check_close(f"{tag} {via}", out, ref, **BF16))
            emit(check_equal(f"{tag} {via} store and tap", [got[n] for n in APPEND_STATE], [expected[n] for n in APPEND_STATE]))


def check_scores(batch: int, chunk: int) -> None:
    x = bounds_inputs(batch, chunk, seed=11 + batch)
    ref = K.chunk_scores_ref(x["q"], x["kmin"], x["kmax"])
    out = torch.full_like(ref, float("nan"))
    K.chunk_scores_triton(x["q"], x["kmin"], x["kmax"], out=out)
    emit(check_close(f"chunk_scores B={batch} N={CONTEXT // chunk} launcher", out, ref, atol=1e-3, rtol=1e-4, rel_l2=1e-5))
    emit(check_close(f"chunk_scores B={batch} op", torch.ops.lsa.chunk_scores(x["q"], x["kmin"], x["kmax"]), ref, atol=1e-3, rtol=1e-4, rel_l2=1e-5))


class DecodeStep(torch.nn.Module):
    """What a rewritten layer does per decode step, over its store held as buffers: append the token
    (with its chunk bounds), attend over the resident chunks, score the chunks for the next selection."""

    def __init__(self, k_pool, v_pool, kmin, kmax, slot_chunk, chunk_slot, pos, valid_start):
        super().__init__()
        for name, value in dict(k_pool=k_pool, v_pool=v_pool, kmin=kmin, kmax=kmax, slot_chunk=slot_chunk,
                                chunk_slot=chunk_slot, pos=pos, valid_start=valid_start).items():
            self.register_buffer(name, value.clone())
        self.chunk = k_pool.shape[1]

    def forward(self, q, k_new, v_new):
        torch.ops.lsa.append_kv(self.k_pool, self.v_pool, k_new, v_new, self.pos, self.chunk_slot)
        torch.ops.lsa.update_chunk_index(self.kmin, self.kmax, k_new, self.pos, self.chunk)
        out = torch.ops.lsa.sparse_decode_attention(
            q, self.k_pool, self.v_pool, self.slot_chunk, self.pos, self.valid_start, HEAD_DIM**-0.5, 0.0
        )
        scores = torch.ops.lsa.chunk_scores(q, self.kmin, self.kmax)
        self.pos.add_(1)
        return out, scores


def state_of(step: DecodeStep) -> list[torch.Tensor]:
    return [step.k_pool, step.v_pool, step.kmin, step.kmax, step.pos]


def check_graph_and_compile(batch: int, chunk: int, *, compile_too: bool) -> None:
    """The decode step captured in a CUDA graph (a fresh shape: the capture itself is the first call, so
    the workspace is allocated inside it) and replayed on new inputs against eager; then the same step
    under torch.compile(mode="reduce-overhead", fullgraph=True)."""
    x = sparse_inputs(batch, chunk, seed=21)
    b = bounds_inputs(batch, chunk, seed=22)
    chunk_slot = torch.full((batch, CONTEXT // chunk), -1, dtype=torch.long, device="cuda")
    slots = x["slot_chunk"].shape[1]
    for row in range(batch):  # the inverse of slot_chunk
        filled = x["slot_chunk"][row] >= 0
        chunk_slot[row, x["slot_chunk"][row][filled]] = torch.arange(slots, device="cuda")[filled]
    store = (x["k_pool"], x["v_pool"], b["kmin"], b["kmax"], x["slot_chunk"], chunk_slot, x["pos"], x["valid_start"])
    eager, graphed = DecodeStep(*store), DecodeStep(*store)
    q = x["q"].clone()
    k_new = torch.randn(batch, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    v_new = torch.randn_like(k_new)

    def new_token():
        q.copy_(torch.randn_like(q))
        k_new.copy_(torch.randn_like(k_new))
        v_new.copy_(torch.randn_like(v_new))

    def compare(tag, got_out, got_scores, got_step):
        ref_out, ref_scores = eager(q, k_new, v_new)
        emit(check_close(f"{tag} attention", got_out, ref_out, atol=0, rtol=0, rel_l2=0))
        emit(check_close(f"{tag} scores", got_scores, ref_scores, atol=0, rtol=0, rel_l2=0))
        emit(check_equal(f"{tag} store and pos", state_of(got_step), state_of(eager)))

    DECODE._WORKSPACES.clear()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # capture records the kernels without running them
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out, static_scores = graphed(q, k_new, v_new)
    torch.cuda.current_stream().wait_stream(stream)
    cached = len(DECODE._WORKSPACES)
    emit(dict(check="no workspace cached from inside a capture", ok=cached == 0, cached=cached))
    if cached:
        FAILURES.append("a workspace allocated during CUDA graph capture was cached")
    for i in range(3):
        new_token()
        graph.replay()
        compare(f"cuda graph B={batch} step {i}", static_out, static_scores, graphed)
    if not compile_too:
        return

    compiled_step = DecodeStep(*state_of(eager)[:4], x["slot_chunk"], chunk_slot, eager.pos, x["valid_start"])
    compiled = torch.compile(compiled_step, mode="reduce-overhead", fullgraph=True)
    from torch._dynamo.utils import counters

    for i in range(4):  # warm-up, recording, replays
        new_token()
        out, scores = compiled(q, k_new, v_new)
        compare(f"torch.compile reduce-overhead B={batch} step {i}", out, scores, compiled_step)
    skips = dict(counters["inductor"]).get("cudagraph_skips", 0)
    emit(dict(check="torch.compile reduce-overhead used CUDA graphs", ok=skips == 0, cudagraph_skips=skips))
    if skips:
        FAILURES.append(f"torch.compile skipped CUDA graphs {skips} time(s)")


# -- timing ------------------------------------------------------------------------------------


def time_calls(calls, iters: int, warmup: int = 10) -> dict:
    """Mean ms per call: an eager loop and CUDA graph replays, cycling through ``calls`` (input copies)."""
    for i in range(warmup):
        calls[i % len(calls)]()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(iters):
        calls[i % len(calls)]()
    end.record()
    torch.cuda.synchronize()
    eager_ms = start.elapsed_time(end) / iters

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for call in calls:
                call()
    torch.cuda.current_stream().wait_stream(stream)
    replays = max(1, iters // len(calls))
    graph.replay()
    torch.cuda.synchronize()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return dict(eager_ms=eager_ms, graph_ms=start.elapsed_time(end) / (replays * len(calls)), copies=len(calls))


def with_bandwidth(record: dict, nbytes: int) -> dict:
    record["bytes"] = nbytes
    record["graph_TBps"] = nbytes / (record["graph_ms"] * 1e-3) / 1e12
    return record


def time_sparse(batch: int, chunk: int, iters: int) -> None:
    first = sparse_inputs(batch, chunk, seed=31)
    nbytes = sparse_bytes(first)
    sets = [first] + [sparse_inputs(batch, chunk, seed=31 + i) for i in range(1, copies_for(nbytes))]
    calls = [
        (lambda x=x: K.sparse_decode_attention_triton(
            x["q"], x["k_pool"], x["v_pool"], x["slot_chunk"], x["pos"], x["valid_start"], scale=HEAD_DIM**-0.5))
        for x in sets
    ]
    plan = DECODE.sparse_launch_plan(first["q"], first["k_pool"], first["slot_chunk"])
    record = dict(kernel="sparse_decode_attention", batch=batch, chunk=chunk, slots=first["slot_chunk"].shape[1], **plan)
    emit(with_bandwidth({**record, **time_calls(calls, iters)}, nbytes))
    del sets, calls


def time_ring(batch: int, iters: int) -> None:
    first = ring_inputs(batch, seed=41)
    nbytes = 2 * first["k_ring"].numel() * first["k_ring"].element_size()
    sets = [first] + [ring_inputs(batch, seed=41 + i) for i in range(1, copies_for(nbytes))]
    calls = [
        (lambda x=x: K.ring_decode_attention_triton(x["q"], x["k_ring"], x["v_ring"], x["pos"], x["valid_start"], scale=HEAD_DIM**-0.5))
        for x in sets
    ]
    emit(with_bandwidth({"kernel": "ring_decode_attention", "batch": batch, "window": WINDOW, **time_calls(calls, iters)}, nbytes))


def time_append(batch: int, chunk: int, iters: int) -> None:
    x = sparse_inputs(batch, chunk, seed=51)
    b = bounds_inputs(batch, chunk, seed=52)
    chunk_slot = torch.zeros(batch, CONTEXT // chunk, dtype=torch.long, device="cuda")
    k_new = torch.randn(batch, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    fused = lambda: K.append_kv_triton(x["k_pool"], x["v_pool"], k_new, k_new, x["pos"], chunk_slot, kmin=b["kmin"], kmax=b["kmax"])  # noqa: E731
    plain = lambda: K.append_kv_triton(x["k_pool"], x["v_pool"], k_new, k_new, x["pos"], chunk_slot)  # noqa: E731
    emit({"kernel": "append_kv+bounds (fused)", "batch": batch, **time_calls([fused], iters)})
    emit({"kernel": "append_kv", "batch": batch, **time_calls([plain], iters)})


def time_sparse_append(batch: int, chunk: int, iters: int, layers: int = 8) -> None:
    """A sparse layer's step as the rewrite emits it (``sparse_decode_attention_append``: two launches)
    against the ops it replaces (``append_kv``, ``update_chunk_index``, ``tap``, ``sparse_decode_attention``:
    five), over ``layers`` stores in turn (graph-replay time per layer)."""
    stores = [append_store(batch, chunk, seed=81 + i) for i in range(layers)]
    scale = HEAD_DIM**-0.5

    def fused(x):
        torch.ops.lsa.sparse_decode_attention_append(*(x[n] for n in APPEND_OPERANDS), scale, 0.0)

    def unfused(x):
        torch.ops.lsa.append_kv(x["k_pool"], x["v_pool"], x["k_new"], x["v_new"], x["pos"], x["chunk_slot"])
        torch.ops.lsa.update_chunk_index(x["kmin"], x["kmax"], x["k_new"], x["pos"], chunk)
        torch.ops.lsa.tap(x["q_tap"], x["q"])
        torch.ops.lsa.sparse_decode_attention(x["q"], x["k_pool"], x["v_pool"], x["slot_chunk"], x["pos"], x["valid_start"], scale, 0.0)

    nbytes = sparse_bytes(stores[0])
    for name, step in (("sparse+append fused (2 launches)", fused), ("sparse+append unfused (5 launches)", unfused)):
        calls = [(lambda x=x: step(x)) for x in stores]
        emit(with_bandwidth({"kernel": name, "batch": batch, "chunk": chunk, "layers": layers, **time_calls(calls, iters)}, nbytes))


def time_scores(batch: int, chunk: int, iters: int) -> None:
    first = bounds_inputs(batch, chunk, seed=61)
    nbytes = 2 * first["kmin"].numel() * first["kmin"].element_size()
    sets = [first] + [bounds_inputs(batch, chunk, seed=61 + i) for i in range(1, copies_for(nbytes))]
    calls = [(lambda x=x: K.chunk_scores_triton(x["q"], x["kmin"], x["kmax"])) for x in sets]
    emit(with_bandwidth({"kernel": "chunk_scores", "batch": batch, "chunks": CONTEXT // chunk, **time_calls(calls, iters)}, nbytes))


def time_dense_sdpa(batch: int, iters: int) -> None:
    """Baseline: SDPA of one query over the full 128K cache (what the sparse kernel replaces)."""
    q = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=DTYPE)
    k = torch.randn(batch, KV_HEADS, CONTEXT, HEAD_DIM, device="cuda", dtype=DTYPE)
    v = torch.randn_like(k)
    call = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
    nbytes = 2 * k.numel() * k.element_size()
    emit(with_bandwidth({"kernel": "dense_sdpa_baseline", "batch": batch, "context": CONTEXT, **time_calls([call], iters)}, nbytes))


def sweep(iters: int) -> None:
    """Split-kernel launch configurations for the sparse kernel at chunk 64 (graph-replay time)."""
    default_waves = DECODE._SPLIT_WAVES
    for batch in (1, 8):
        x = sparse_inputs(batch, 64, seed=71)
        nbytes = sparse_bytes(x)
        for waves in (1, 2, 4, 8):
            for warps in (2, 4, 8):
                for stages in (1, 2, 3, 4):
                    call = lambda w=warps, s=stages: K.sparse_decode_attention_triton(  # noqa: E731
                        x["q"], x["k_pool"], x["v_pool"], x["slot_chunk"], x["pos"], x["valid_start"], scale=HEAD_DIM**-0.5,
                        num_warps=w, num_stages=s)
                    DECODE._SPLIT_WAVES = waves  # the split heuristic's programs per SM: a private constant, swapped here only
                    try:
                        timing = time_calls([call], iters)
                    except Exception as exc:  # e.g. out of shared memory
                        emit(dict(sweep=True, batch=batch, waves=waves, warps=warps, stages=stages, error=repr(exc)[:200]))
                        continue
                    rec = dict(sweep=True, batch=batch, waves=waves, warps=warps, stages=stages, **timing)
                    emit(with_bandwidth(rec, nbytes))
    DECODE._SPLIT_WAVES = default_waves


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results.json"))
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--sweep", action="store_true", help="also time split-kernel launch configurations")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reduce-overhead) check")
    parser.add_argument("--only", choices=["sparse_append"], default=None,
                        help="sparse_append: only the fused attention + append op (check and time, batch 1 and 8)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this script checks and times the Triton kernels on a GPU", file=sys.stderr)
        return 2
    import triton

    props = torch.cuda.get_device_properties(0)
    meta = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        gpu=torch.cuda.get_device_name(0), sm_count=props.multi_processor_count, torch=torch.__version__,
        triton=triton.__version__, cuda=torch.version.cuda, python=platform.python_version(),
        shapes=dict(q_heads=Q_HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=str(DTYPE), context=CONTEXT,
                    resident_fraction=RESIDENT_FRACTION, window=WINDOW),
    )
    print(json.dumps(meta), flush=True)
    torch.manual_seed(0)

    if args.only == "sparse_append":
        with torch.inference_mode():
            for batch in (1, 8):
                check_sparse_append(batch, 64)
            for batch in (1, 8):
                time_sparse_append(batch, 64, args.iters)
        return report(args.out, meta)

    with torch.inference_mode():
        check_coverage()
        for batch in (1, 8):
            for chunk, softcap in ((64, 0.0), (64, 30.0), (16, 0.0), (128, 0.0)):
                check_sparse(batch, chunk, softcap)
            check_ring(batch)
            check_append(batch, 64)
            check_sparse_append(batch, 64)
            check_scores(batch, 64)
        check_graph_and_compile(2, 64, compile_too=False)
    if not args.no_compile:
        with torch.no_grad():  # torch.compile of custom ops without autograd formulas: no grad mode
            check_graph_and_compile(2, 64, compile_too=True)

    with torch.inference_mode():
        for batch in (1, 8):
            for chunk in (64, 16, 128):
                time_sparse(batch, chunk, args.iters)
            time_ring(batch, args.iters)
            time_append(batch, 64, args.iters)
            time_sparse_append(batch, 64, args.iters)
            time_scores(batch, 64, args.iters)
            time_dense_sdpa(batch, args.iters)
        if args.sweep:
            sweep(args.iters)

    return report(args.out, meta)


def report(out: Path, meta: dict) -> int:
    out.write_text(json.dumps(dict(meta=meta, failures=FAILURES, records=RECORDS), indent=1))
    summary = [r for r in RECORDS if "kernel" in r]
    print("\nkernel                          B    eager ms  graph ms  TB/s")
    for r in summary:
        print(f"{r['kernel'][:30]:30} {r['batch']:2}  {r['eager_ms']:9.4f} {r['graph_ms']:9.4f}  {r.get('graph_TBps', float('nan')):5.2f}")
    if FAILURES:
        print(f"\n{len(FAILURES)} MISMATCHES:", *FAILURES, sep="\n  ", file=sys.stderr)
        return 1
    print(f"\nall {sum('check' in r for r in RECORDS)} checks passed; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
