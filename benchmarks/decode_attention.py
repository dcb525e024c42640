"""Benchmark: one layer of LSA sparse decode attention against dense SDPA over the full cache.

For each head layout (Llama-3-8B: 32 q / 8 kv heads, and MQA: 32 q / 1 kv head; head dim 128, bf16),
batch 1 / 8 / 32 and context 32K / 128K / 512K, with 13.5% of the context resident in 64-token chunks:

- ``lsa_ms``: ``lsa::sparse_decode_attention`` (Triton on CUDA) over the resident pool;
- ``dense_ms``: ``F.scaled_dot_product_attention`` over the full cache (q_len 1, enable_gqa);
- ``floor_ms``: the bytes LSA must read (resident K+V + chunk table + q/out) at 4.2 TB/s.

Both are timed replaying CUDA graphs (no launch overhead), after a correctness check of the kernel
against the PyTorch reference on the same GPU. Writes JSON with GPU, versions and date.

    python benchmarks/decode_attention.py --out benchmarks/results/decode_attention.json
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import COPY_BANDWIDTH, environment, time_cuda_graph, write_json  # noqa: E402

import lsa_rewrite  # noqa: E402,F401  (registers lsa:: ops)
from lsa_rewrite.kernels import sparse_decode_attention_ref  # noqa: E402

OPS = torch.ops.lsa
CHUNK = 64
BUDGET = 0.135


def make_case(batch: int, context: int, q_heads: int, kv_heads: int, head_dim: int, *, dtype=torch.bfloat16, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    num_chunks = context // CHUNK
    slots = max(2, math.ceil(BUDGET * num_chunks))
    q = torch.randn(batch, q_heads, head_dim, device="cuda", dtype=dtype, generator=gen)
    k_pool = torch.randn(batch * slots, CHUNK, kv_heads, head_dim, device="cuda", dtype=dtype, generator=gen)
    v_pool = torch.randn(batch * slots, CHUNK, kv_heads, head_dim, device="cuda", dtype=dtype, generator=gen)
    # Resident chunks: the last (the partially written tail) plus a random choice of the rest.
    rows = []
    for _ in range(batch):
        pick = torch.randperm(num_chunks - 1, generator=torch.Generator().manual_seed(seed))[: slots - 1]
        rows.append(torch.cat([pick, torch.tensor([num_chunks - 1])])[torch.randperm(slots)])
    slot_chunk = torch.stack(rows).to("cuda")
    pos = torch.tensor([context - CHUNK // 2], device="cuda")  # tail chunk half full
    valid_start = torch.zeros(batch, dtype=torch.long, device="cuda")
    return q, k_pool, v_pool, slot_chunk, pos, valid_start


def check(case, scale: float) -> float:
    q, k_pool, v_pool, slot_chunk, pos, valid_start = case
    out = torch.full_like(q, float("nan"))
    out.copy_(OPS.sparse_decode_attention(q, k_pool, v_pool, slot_chunk, pos, valid_start, scale, 0.0))
    ref = sparse_decode_attention_ref(q.float(), k_pool.float(), v_pool.float(), slot_chunk, pos, valid_start, scale=scale)
    err = (out.float() - ref).abs().max().item()
    if not err < 2e-2:
        raise SystemExit(f"sparse_decode_attention mismatch vs reference: max abs err {err}")
    return err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/decode_attention.json")
    parser.add_argument("--contexts", default="32768,131072,524288")
    parser.add_argument("--batches", default="1,8,32")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    head_dim = 128
    scale = head_dim ** -0.5
    layouts = {"llama3-8b (32q/8kv)": (32, 8), "mqa (32q/1kv)": (32, 1)}
    checks = {}
    for name, (hq, hkv) in layouts.items():
        for batch, context in ((1, 131072), (8, 32768), (3, 4096)):
            checks[f"{name} B{batch} L{context}"] = check(make_case(batch, context, hq, hkv, head_dim), scale)
    print("correctness:", checks)
    rows = []
    for name, (hq, hkv) in layouts.items():
        for batch in map(int, args.batches.split(",")):
            for context in map(int, args.contexts.split(",")):
                dense_bytes = 2 * batch * context * hkv * head_dim * 2
                if dense_bytes > 80e9:
                    continue
                case = make_case(batch, context, hq, hkv, head_dim)
                q, k_pool, v_pool, slot_chunk, pos, valid_start = case
                lsa_ms = time_cuda_graph(lambda: OPS.sparse_decode_attention(q, k_pool, v_pool, slot_chunk, pos, valid_start, scale, 0.0))
                lsa_bytes = sum(t.numel() * t.element_size() for t in (k_pool, v_pool, slot_chunk)) + 2 * q.numel() * q.element_size()
                del case, k_pool, v_pool
                kd = torch.randn(batch, hkv, context, head_dim, device="cuda", dtype=torch.bfloat16)
                vd = torch.randn_like(kd)
                q4 = q.unsqueeze(2)
                dense_ms = time_cuda_graph(lambda: F.scaled_dot_product_attention(q4, kd, vd, scale=scale, enable_gqa=hkv != hq))
                del kd, vd
                torch.cuda.empty_cache()
                floor_ms = lsa_bytes / COPY_BANDWIDTH * 1e3
                row = {
                    "layout": name, "batch": batch, "context": context, "resident_fraction": BUDGET, "chunk": CHUNK,
                    "lsa_ms": round(lsa_ms, 4), "dense_ms": round(dense_ms, 4), "floor_ms": round(floor_ms, 4),
                    "speedup_vs_dense": round(dense_ms / lsa_ms, 2), "lsa_over_floor": round(lsa_ms / floor_ms, 2),
                }
                rows.append(row)
                print(row, flush=True)
    write_json(args.out, {"benchmark": "decode_attention", "environment": environment(), "correctness_max_abs_err": checks, "results": rows})


if __name__ == "__main__":
    main()
