"""Benchmark: recall (pinned CPU mirror -> GPU pool) and write-back with ``lsa::copy_chunks``, and its overlap with decode.

One layer of the Llama-3-8B layout (8 kv heads, head dim 128, bf16, 64-token chunks) at a 128K context:
the mirror ``[1, 2048, 64, 8, 128]`` is pinned host memory, the pool holds 13.5% of the chunks.

1. Correctness first: the Triton kernel reading the pinned mirror through unified addressing (and
   writing it, for write-back) against the reference, destination poisoned, bit-exact.
2. Recall bandwidth for a whole pool's worth of chunks (K and V): the kernel, one ``copy_`` per chunk
   (``cudaMemcpyAsync`` each; host time reported too), and one contiguous pinned -> device copy of
   the same bytes (the link's ceiling).
3. Overlap: a bandwidth-bound decode stand-in (sparse decode attention at 128K, 32 q / 8 kv heads,
   replayed from a CUDA graph) alone, then with 32 layers' recall running on a side stream, for
   several program counts of the copy kernel: how much of the shorter one hides under the other.

    python benchmarks/recall.py --out benchmarks/results/recall.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402

from lsa_rewrite.kernels import copy_chunks_ref, copy_chunks_triton, sparse_decode_attention_triton  # noqa: E402
from lsa_rewrite.kernels.copy_chunks import copy_chunks_problem  # noqa: E402

CHUNK, HKV, HQ, D, DT = 64, 8, 32, 128, torch.bfloat16
PROGRAMS = (4, 8, 16, 32, 64, None)  # persistent copy programs (None: one per block)
REPLAYS = 10  # of a 200-call attention graph


def layer(num_chunks: int, slots: int, *, seed: int):
    gen = torch.Generator().manual_seed(seed)
    mirror_k = torch.empty(1, num_chunks, CHUNK, HKV, D, dtype=DT, pin_memory=True)
    mirror_v = torch.empty_like(mirror_k, pin_memory=True)
    torch.manual_seed(seed)
    mirror_k.copy_(torch.randn(mirror_k.shape, device="cuda", dtype=DT))
    mirror_v.copy_(torch.randn(mirror_v.shape, device="cuda", dtype=DT))
    pool_k = torch.empty(slots, CHUNK, HKV, D, dtype=DT, device="cuda")
    pool_v = torch.empty_like(pool_k)
    return mirror_k, mirror_v, pool_k, pool_v, gen


def gpu_ms(fn, *, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--layers", type=int, default=32, help="layers recalled at once in the overlap test")
    parser.add_argument("--out", default="benchmarks/results/recall.json")
    args = parser.parse_args()
    num_chunks = args.context // CHUNK
    slots = int(0.135 * num_chunks)
    payload = {"benchmark": "recall", "environment": environment(), "context": args.context, "chunk": CHUNK,
               "kv_heads": HKV, "head_dim": D, "dtype": "bf16", "slots": slots, "results": {}}
    res = payload["results"]
    mirror_k, mirror_v, pool_k, pool_v, gen = layer(num_chunks, slots, seed=0)
    operands = (pool_k, pool_v, mirror_k, mirror_v)
    res["kernel_path"] = copy_chunks_problem((*operands, torch.zeros(1, dtype=torch.long, device="cuda"))) or "triton"

    # 1. correctness, both directions; index tensors pinned (as the store passes them) and on the device
    for where in ("pinned", "cuda"):
        dst = torch.randperm(slots, generator=gen)
        src = torch.randperm(num_chunks, generator=gen)[:slots]
        rows = (dst.pin_memory(), src.pin_memory()) if where == "pinned" else (dst.cuda(), src.cuda())
        pool_k.fill_(float("nan"))
        pool_v.fill_(float("nan"))
        copy_chunks_triton(pool_k, pool_v, mirror_k, mirror_v, *rows)
        torch.cuda.synchronize()
        want_k = torch.empty_like(pool_k)
        want_v = torch.empty_like(pool_v)
        copy_chunks_ref(want_k, want_v, mirror_k, mirror_v, dst, src)
        recall_ok = torch.equal(pool_k, want_k) and torch.equal(pool_v, want_v)
        back_k, back_v = mirror_k.clone().pin_memory(), mirror_v.clone().pin_memory()
        back_k.view(num_chunks, -1)[src] = float("nan")
        copy_chunks_triton(back_k, back_v, pool_k, pool_v, src.pin_memory() if where == "pinned" else src.cuda(), dst.pin_memory() if where == "pinned" else dst.cuda())
        torch.cuda.synchronize()
        write_back_ok = torch.equal(back_k, mirror_k) and torch.equal(back_v, mirror_v)
        res[f"correct_recall_rows_{where}"] = recall_ok
        res[f"correct_write_back_rows_{where}"] = write_back_ok
        print(where, "recall exact:", recall_ok, "write-back exact:", write_back_ok, flush=True)
        del back_k, back_v

    # 2. bandwidth of one layer's full-pool recall (K and V): the kernel at several program counts
    dst = torch.randperm(slots, generator=gen).pin_memory()
    src = torch.randperm(num_chunks, generator=gen)[:slots].pin_memory()
    nbytes = 2 * slots * pool_k[0].numel() * pool_k.element_size()
    sweep = {}
    for programs in PROGRAMS:
        ms = gpu_ms(lambda: copy_chunks_triton(pool_k, pool_v, mirror_k, mirror_v, dst, src, programs=programs))
        sweep[str(programs)] = {"ms": round(ms, 3), "gb_s": round(nbytes / ms / 1e6, 1)}
    flat_k, flat_v = mirror_k.view(num_chunks, CHUNK, HKV, D), mirror_v.view(num_chunks, CHUNK, HKV, D)
    pairs = list(zip(dst.tolist(), src.tolist()))

    def per_chunk():
        for d, s in pairs:
            pool_k[d].copy_(flat_k[s], non_blocking=True)
            pool_v[d].copy_(flat_v[s], non_blocking=True)

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    per_chunk()
    host_ms = (time.perf_counter() - t0) * 1e3
    per_chunk_ms = gpu_ms(per_chunk)
    staging = torch.empty(nbytes // 2, dtype=torch.uint8, pin_memory=True)
    device_buf = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")

    def contiguous():
        device_buf.copy_(staging, non_blocking=True)
        device_buf.copy_(staging, non_blocking=True)

    contiguous_ms = gpu_ms(contiguous)
    res["one_layer_full_pool"] = {
        "bytes": nbytes, "chunks": slots, "kernel_by_programs": sweep,
        "per_chunk_copy_ms": round(per_chunk_ms, 3), "per_chunk_copy_gb_s": round(nbytes / per_chunk_ms / 1e6, 1),
        "per_chunk_copy_host_ms": round(host_ms, 2),
        "contiguous_copy_ms": round(contiguous_ms, 3), "contiguous_copy_gb_s": round(nbytes / contiguous_ms / 1e6, 1),
    }
    print(res["one_layer_full_pool"], flush=True)

    # 3. overlap: decode attention replayed from a CUDA graph (GPU-bound, as the compiled step is) on
    # the main stream while 32 layers' recall runs on a side stream
    q = torch.randn(1, HQ, D, dtype=DT, device="cuda")
    attn_pool_k = torch.randn(slots, CHUNK, HKV, D, dtype=DT, device="cuda")
    attn_pool_v = torch.randn_like(attn_pool_k)
    slot_chunk = torch.randperm(num_chunks, device="cuda")[:slots].view(1, slots)
    pos = torch.tensor([args.context - 1], device="cuda")
    valid_start = torch.zeros(1, dtype=torch.long, device="cuda")
    out = torch.empty_like(q)

    def call():
        sparse_decode_attention_triton(q, attn_pool_k, attn_pool_v, slot_chunk, pos, valid_start, scale=D**-0.5, out=out)

    warm = torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(warm)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(200):
            call()

    def attention():
        for _ in range(REPLAYS):
            graph.replay()

    layers = [layer(num_chunks, slots, seed=1 + i)[:4] for i in range(min(args.layers, 4))]  # 4 distinct mirrors, reused
    side = torch.cuda.Stream()
    attention_ms = gpu_ms(attention)
    overlap = {"attention_calls": 200 * REPLAYS, "attention_alone_ms": round(attention_ms, 3), "recall_layers": args.layers,
               "recall_bytes": nbytes * args.layers, "by_programs": {}}
    for programs in PROGRAMS:
        def recall_all():
            for i in range(args.layers):
                mk, mv, pk, pv = layers[i % len(layers)]
                copy_chunks_triton(pk, pv, mk, mv, dst, src, programs=programs)

        def both():
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                recall_all()
            attention()
            torch.cuda.current_stream().wait_stream(side)

        recall_ms = gpu_ms(recall_all)
        both_ms = gpu_ms(both)
        overlap["by_programs"][str(programs)] = {
            "recall_alone_ms": round(recall_ms, 3), "recall_gb_s": round(nbytes * args.layers / recall_ms / 1e6, 1),
            "together_ms": round(both_ms, 3), "serial_ms": round(attention_ms + recall_ms, 3),
            "hidden_fraction": round((attention_ms + recall_ms - both_ms) / min(attention_ms, recall_ms), 3),
        }
        print(programs, overlap["by_programs"][str(programs)], flush=True)
    res["overlap"] = overlap
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
