"""Benchmark: one layer of LSA sparse decode attention against dense SDPA over the full cache.

For each head layout (Llama-3-8B: 32 q / 8 kv heads, and MQA: 32 q / 1 kv head; head dim 128, bf16),
batch 1 / 8 / 32 and context 32K / 128K / 512K, with 13.5% of the context resident in 64-token chunks:

- ``lsa_ms``: ``lsa::sparse_decode_attention`` (Triton on CUDA) over the resident pool;
- ``dense_ms``: ``F.scaled_dot_product_attention`` over the full cache (q_len 1, enable_gqa);
- ``floor_ms``: the bytes LSA must read (resident K+V + chunk table + q/out) at 4.2 TB/s;
- ``plain_read_ms``: the fastest one-launch Triton read (a sum) of that many bytes, over grid, tile and
  warps: what merely reading them costs on this GPU, launch and the L2 included (a buffer smaller
  than the L2 stays partly resident across graph replays, for the kernel and this read alike).

All are timed replaying CUDA graphs (no launch overhead), after a correctness check of the kernel
against the PyTorch reference on the same GPU; an empty kernel's replay time is recorded too.
Writes JSON with GPU, versions and date.

``--sweep-splits`` instead times the kernel at a list of split counts per case (the launcher's
default and 1-4 programs per SM too) with 3 and with 2 pipeline stages; at the default count
without the programmatic dependent launch of the merge, at 4 or 8 warps x 2-4 pipeline stages;
with 64- and 128-token blocks (a block spanning two slots); and the merge alone: the data behind
the launch heuristics in ``kernels/decode_attention.py``. ``--sweep-variants`` times kernel variants
side by side at each case (query group padded to 16 / 64 rows, 4 / 8 warps, 2-4 stages, one and
two programs per SM, 128-token blocks; with ``--chunk`` under 64, blocks of 32 / 64 / 128 tokens;
the split kernel alone and over empty slots), each checked against the reference first.

    python benchmarks/decode_attention.py --out benchmarks/results/decode_attention.json
    python benchmarks/decode_attention.py --sweep-splits --out benchmarks/results/decode_splits.json
    python benchmarks/decode_attention.py --sweep-variants --out benchmarks/results/decode_variants.json
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import COPY_BANDWIDTH, environment, time_cuda_graph, write_json  # noqa: E402

import lsa_rewrite  # noqa: E402,F401  (registers lsa:: ops)
from lsa_rewrite.kernels import decode_attention as DECODE  # noqa: E402
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


def check(case, scale: float, **options) -> float:
    """Max abs error against the reference: of the op, or with ``options`` (launch options of
    ``sparse_decode_attention_triton``) of the launcher."""
    q, k_pool, v_pool, slot_chunk, pos, valid_start = case
    out = torch.full_like(q, float("nan"))
    if options:
        DECODE.sparse_decode_attention_triton(q, k_pool, v_pool, slot_chunk, pos, valid_start, scale=scale, out=out, **options)
    else:
        out.copy_(OPS.sparse_decode_attention(q, k_pool, v_pool, slot_chunk, pos, valid_start, scale, 0.0))
    ref = sparse_decode_attention_ref(q.float(), k_pool.float(), v_pool.float(), slot_chunk, pos, valid_start, scale=scale)
    err = (out.float() - ref).abs().max().item()
    if not err < 2e-2:
        raise SystemExit(f"sparse_decode_attention mismatch vs reference: max abs err {err}")
    return err


def default_splits(q, k_pool, slot_chunk) -> int:
    return DECODE.sparse_launch_plan(q, k_pool, slot_chunk)["splits"]


SWEEP_SPLITS = (4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 200, 264, 396, 528)


def sweep_case(name: str, batch: int, context: int, hq: int, hkv: int, scale: float) -> dict:
    q, k_pool, v_pool, slot_chunk, pos, valid_start = make_case(batch, context, hq, hkv, 128)
    blocks = slot_chunk.shape[1]
    chosen = default_splits(q, k_pool, slot_chunk)
    floor_ms = (2 * k_pool.numel() * k_pool.element_size() + slot_chunk.numel() * 8) / COPY_BANDWIDTH * 1e3
    out = torch.empty_like(q)

    def run(splits: int | None, **options) -> None:
        DECODE.sparse_decode_attention_triton(
            q, k_pool, v_pool, slot_chunk, pos, valid_start, scale=scale, num_splits=splits, out=out, **options)

    programs = batch * hkv
    sms = DECODE._sm_count(q.device.index)
    per_sm = {max(1, w * sms // programs) for w in (1, 2, 3, 4)}  # 1-4 programs per SM
    split_list = sorted({*(x for x in (*SWEEP_SPLITS, *per_sm) if x <= blocks), chosen})
    times = {splits: round(time_cuda_graph(functools.partial(run, splits)), 4) for splits in split_list}
    # two pipeline stages: 52 KB of shared memory instead of 77, so three programs fit on an SM
    times_s2 = {splits: round(time_cuda_graph(functools.partial(run, splits, num_stages=2)), 4) for splits in split_list}
    # blocks of 64 / 128 tokens (128: a block spans two 64-token slots) x 2 / 3 stages, each at
    # its own default split count, each checked against the reference first
    by_block = {}
    for tokens in (64, 128):
        try:
            err = check((q, k_pool, v_pool, slot_chunk, pos, valid_start), scale, min_block_tokens=tokens)
            for stages in (2, 3):
                by_block[f"t{tokens}s{stages}"] = {
                    "ms": round(time_cuda_graph(functools.partial(run, None, min_block_tokens=tokens, num_stages=stages)), 4),
                    "max_abs_err": err}
        except (Exception, SystemExit) as exc:  # recorded, not fatal
            by_block[f"t{tokens}"] = repr(exc)[:200]
    no_pdl = round(time_cuda_graph(functools.partial(run, chosen, pdl=False)), 4)
    by_config = {}
    for warps in (4, 8):
        for stages in (2, 3, 4):
            try:
                by_config[f"w{warps}s{stages}"] = round(time_cuda_graph(functools.partial(run, chosen, num_warps=warps, num_stages=stages)), 4)
            except Exception as exc:  # a configuration that does not fit (shared memory) is recorded, not fatal
                by_config[f"w{warps}s{stages}"] = repr(exc)[:120]
    ws = DECODE._workspace(q.device, batch, hq, chosen, 128)
    merge_only = round(time_cuda_graph(functools.partial(DECODE._launch_merge, ws, out, chosen)), 4)
    best = min(times, key=times.get)
    return {
        "layout": name, "batch": batch, "context": context, "blocks": blocks, "floor_ms": round(floor_ms, 4),
        "default_splits": chosen, "default_ms": times[chosen], "default_no_pdl_ms": no_pdl,
        "ms_by_block_tokens_stages": by_block, "ms_by_splits_2_stages": {str(k): v for k, v in times_s2.items()},
        "merge_only_ms": merge_only, "best_splits": best, "best_ms": times[best],
        "ms_by_splits": {str(k): v for k, v in times.items()},
        "ms_by_warps_stages": by_config,
    }


def variants_case(name: str, batch: int, context: int, hq: int, hkv: int, scale: float) -> dict:
    """Kernel variants side by side, each checked against the reference first: the launcher's
    default (timed first and last: the run-to-run spread); the query group padded to 16 / 64 rows
    (64: Hopper's wgmma), 64 rows at 8 warps; 2 / 4 pipeline stages; one and two programs per SM;
    blocks of 128 tokens (spanning two slots), and with chunks under 64 tokens of 32 / 128."""
    case = make_case(batch, context, hq, hkv, 128)
    q, k_pool, v_pool, slot_chunk, pos, valid_start = case
    out = torch.empty_like(q)
    floor_ms = (2 * k_pool.numel() * k_pool.element_size() + slot_chunk.numel() * 8) / COPY_BANDWIDTH * 1e3
    plan = DECODE.sparse_launch_plan(q, k_pool, slot_chunk)
    sms = DECODE._sm_count(q.device.index)
    one_per_sm = min(plan["blocks"], max(1, sms // (batch * hkv)))
    two_per_sm = min(plan["blocks"], max(1, 2 * sms // (batch * hkv)))

    def timed(splits=None, table=slot_chunk, **options) -> float:
        return round(time_cuda_graph(lambda: DECODE.sparse_decode_attention_triton(
            q, k_pool, v_pool, table, pos, valid_start, scale=scale, num_splits=splits, out=out, **options)), 4)

    # name: (launch options of sparse_decode_attention_triton, splits); None: the launcher's choice
    variants = {"default": ({}, None), "rows16": ({"group_rows": 16}, None), "rows64": ({"group_rows": 64}, None),
                "rows64_w8": ({"group_rows": 64, "num_warps": 8}, None),
                "s2": ({"num_stages": 2}, None), "s4": ({"num_stages": 4}, None),
                "1_per_sm": ({}, one_per_sm), "2_per_sm": ({}, two_per_sm),
                "t128": ({"min_block_tokens": 128}, None), "t128_s3": ({"min_block_tokens": 128, "num_stages": 3}, None)}
    if CHUNK < 64:
        variants.update({"t128_rows16": ({"min_block_tokens": 128, "group_rows": 16}, None), "t32": ({"min_block_tokens": 32}, None)})
    times, errors = {}, {}
    for key, (options, splits) in variants.items():
        try:
            errors[key] = check(case, scale, **options)
            times[key] = timed(splits, **options)
        except (Exception, SystemExit) as exc:  # recorded, not fatal (e.g. shared memory does not fit)
            times[key] = repr(exc)[:200]
    times["default_again"] = timed()
    # where the time goes: the split kernel without the merge, and both over a table of empty slots
    # (every K/V load masked off: the same instructions and launches without the reads)
    empty = torch.full_like(slot_chunk, -1)
    times["empty_table"] = timed(table=empty)
    merge = DECODE._launch_merge
    try:
        DECODE._launch_merge = lambda *a, **k: None
        times["split_only"] = timed()
        times["split_only_empty_table"] = timed(table=empty)
    finally:
        DECODE._launch_merge = merge
    return {"layout": name, "batch": batch, "context": context, "chunk": CHUNK, "floor_ms": round(floor_ms, 4),
            "plan": plan, "one_per_sm_splits": one_per_sm, "two_per_sm_splits": two_per_sm, "ms": times, "max_abs_err": errors}


# -- the read floor: the plainest one-launch read of the same bytes --------------------------------

if DECODE.triton is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _stream_read_kernel(src_ptr, out_ptr, n, per_program, BLOCK: tl.constexpr):
        """Sum of a contiguous stretch of ``src`` per program: the plainest read of those bytes."""
        start = tl.program_id(0).to(tl.int64) * per_program
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], tl.float32)
        for first in range(start, tl.minimum(start + per_program, n), BLOCK):
            acc += tl.load(src_ptr + first + offs, mask=first + offs < n, other=0.0).to(tl.float32)
        tl.store(out_ptr + tl.program_id(0), tl.sum(acc, 0))

    @triton.jit
    def _empty_kernel(out_ptr):
        tl.store(out_ptr + tl.program_id(0), 0.0)


def read_floor(nbytes: int) -> dict:
    """Fastest plain read of ``nbytes`` (bf16) by a one-launch Triton kernel, over grid / tile / warps,
    and ``torch.sum`` of the same buffer: what reading those bytes costs on this GPU, launch included."""
    n = nbytes // 2
    # ones: each program's sum must equal its element count (to fp32 rounding, well under the 2048
    # elements of one tile), so every byte was read
    buf = torch.ones(n, device="cuda", dtype=torch.bfloat16)
    best = None
    for programs in (132, 264, 528, 1056):
        for block in (2048, 8192):
            for warps in (4, 8):
                per = -(-n // programs)
                per = -(-per // block) * block
                grid = -(-n // per)
                out = torch.empty(grid, device="cuda", dtype=torch.float32)
                _stream_read_kernel[(grid,)](buf, out, n, per, BLOCK=block, num_warps=warps)
                expected = (n - torch.arange(grid, device="cuda", dtype=torch.float64) * per).clamp(max=per)
                if not bool(((out.double() - expected).abs() <= expected * 2.0 ** -20).all()):
                    raise SystemExit(f"plain read of {nbytes} bytes ({grid} x {per}): a program's sum is off its element count")
                ms = time_cuda_graph(lambda: _stream_read_kernel[(grid,)](buf, out, n, per, BLOCK=block, num_warps=warps))
                if best is None or ms < best[0]:
                    best = (ms, {"programs": grid, "block": block, "warps": warps})
    torch_sum = time_cuda_graph(lambda: buf.sum(dtype=torch.float32))
    return {"bytes": nbytes, "read_ms": round(best[0], 4), "read_config": best[1], "read_tb_s": round(nbytes / best[0] / 1e9, 2),
            "torch_sum_ms": round(torch_sum, 4)}


def sweep_splits(layouts: dict, batches: list[int], contexts: list[int], scale: float) -> list[dict]:
    rows = []
    for name, (hq, hkv) in layouts.items():
        for batch in batches:
            for context in contexts:
                if 2 * batch * context * hkv * 128 * 2 * BUDGET > 40e9:
                    continue
                rows.append(sweep_case(name, batch, context, hq, hkv, scale))
                print(rows[-1], flush=True)
                torch.cuda.empty_cache()
    return rows


def main() -> None:
    global CHUNK
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/decode_attention.json")
    parser.add_argument("--contexts", default="32768,131072,524288")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--sweep-splits", action="store_true", help="time a list of split counts per case instead")
    parser.add_argument("--sweep-variants", action="store_true", help="time kernel variants side by side per case instead")
    parser.add_argument("--chunk", type=int, default=CHUNK, help="tokens per chunk of the pool (default 64)")
    parser.add_argument("--layouts", default="all", help="all, or a comma list of llama3 / mqa")
    args = parser.parse_args()
    CHUNK = args.chunk
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    head_dim = 128
    scale = head_dim ** -0.5
    layouts = {"llama3-8b (32q/8kv)": (32, 8), "mqa (32q/1kv)": (32, 1)}
    if args.layouts != "all":
        layouts = {k: v for k, v in layouts.items() if k.split(" ")[0].startswith(tuple(args.layouts.split(",")))}
        if not layouts:
            raise SystemExit(f"--layouts {args.layouts!r}: give all, or a comma list of llama3 / mqa")
    checks = {}
    for name, (hq, hkv) in layouts.items():
        for batch, context in ((1, 131072), (8, 32768), (3, 4096)):
            checks[f"{name} B{batch} L{context}"] = check(make_case(batch, context, hq, hkv, head_dim), scale)
    print("correctness:", checks)
    if args.sweep_variants:
        rows = []
        for name, (hq, hkv) in layouts.items():
            for batch in map(int, args.batches.split(",")):
                for context in map(int, args.contexts.split(",")):
                    if 2 * batch * context * hkv * 128 * 2 * BUDGET > 40e9:
                        continue
                    rows.append(variants_case(name, batch, context, hq, hkv, scale))
                    print(rows[-1], flush=True)
                    torch.cuda.empty_cache()
        write_json(args.out, {"benchmark": "decode_attention_variants", "environment": environment(),
                              "correctness_max_abs_err": checks, "results": rows})
        return
    if args.sweep_splits:
        rows = sweep_splits(layouts, [int(b) for b in args.batches.split(",")], [int(c) for c in args.contexts.split(",")], scale)
        write_json(args.out, {"benchmark": "decode_attention_split_sweep", "environment": environment(),
                              "correctness_max_abs_err": checks, "results": rows})
        return
    empty_out = torch.empty(132, device="cuda")
    launch = {"empty_kernel_1_program_ms": round(time_cuda_graph(lambda: _empty_kernel[(1,)](empty_out)), 4),
              "empty_kernel_132_programs_ms": round(time_cuda_graph(lambda: _empty_kernel[(132,)](empty_out)), 4)}
    print("graph-replayed empty launch:", launch, flush=True)
    rows = []
    for name, (hq, hkv) in layouts.items():
        for batch in map(int, args.batches.split(",")):
            for context in map(int, args.contexts.split(",")):
                dense_bytes = 2 * batch * context * hkv * head_dim * 2
                if dense_bytes > 80e9:
                    continue
                case = make_case(batch, context, hq, hkv, head_dim)
                q, k_pool, v_pool, slot_chunk, pos, valid_start = case
                splits = default_splits(q, k_pool, slot_chunk)
                lsa_ms = time_cuda_graph(functools.partial(OPS.sparse_decode_attention, q, k_pool, v_pool, slot_chunk, pos, valid_start, scale, 0.0))
                lsa_bytes = sum(t.numel() * t.element_size() for t in (k_pool, v_pool, slot_chunk)) + 2 * q.numel() * q.element_size()
                del case, k_pool, v_pool
                read = read_floor(lsa_bytes)
                kd = torch.randn(batch, hkv, context, head_dim, device="cuda", dtype=torch.bfloat16)
                vd = torch.randn_like(kd)
                q4 = q.unsqueeze(2)
                dense_ms = time_cuda_graph(functools.partial(F.scaled_dot_product_attention, q4, kd, vd, scale=scale, enable_gqa=hkv != hq))
                del kd, vd
                torch.cuda.empty_cache()
                floor_ms = lsa_bytes / COPY_BANDWIDTH * 1e3
                row = {
                    "layout": name, "batch": batch, "context": context, "resident_fraction": BUDGET, "chunk": CHUNK, "splits": splits,
                    "lsa_ms": round(lsa_ms, 4), "dense_ms": round(dense_ms, 4), "floor_ms": round(floor_ms, 4),
                    "speedup_vs_dense": round(dense_ms / lsa_ms, 2), "lsa_over_floor": round(lsa_ms / floor_ms, 2),
                    "plain_read_ms": read["read_ms"], "lsa_over_plain_read": round(lsa_ms / read["read_ms"], 2),
                    "plain_read": read,
                }
                rows.append(row)
                print(row, flush=True)
    write_json(args.out, {"benchmark": "decode_attention", "environment": environment(), "correctness_max_abs_err": checks,
                          "empty_launch": launch, "results": rows})


if __name__ == "__main__":
    main()
