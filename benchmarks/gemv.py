"""Benchmark and GPU check: ``lsa::small_m_linear`` (the Triton GEMV) on the Llama-3-8B projection shapes.

Not a test (CI has no GPU): run it on the GPU machine. Per shape ``(N, K)`` (q/o 4096x4096, k/v
1024x4096, gate/up 14336x4096, down 4096x14336, lm head 128256x4096), bf16:

1. ceiling: a device-to-device copy of 2 GiB (bytes read + written over time);
2. one row (M=1): the library's launch (``default_config``) and the op checked against an fp32
   reference (poisoned output, every element written, split-K bit-reproducible), then a sweep of launch
   configurations, each checked the same way and timed; the fastest correct one goes into ``table``
   (what ``kernels/small_m_linear.py``'s ``TABLE`` should hold; ``step_breakdown.py --gemv-table FILE``
   measures the decode step with it); the best one again without PDL; cuBLAS (``F.linear``) and
   Inductor's lowering (``torch.compile`` with ``coordinate_descent_tuning``, as the decode step is
   compiled) on the same inputs;
3. a PDL chain in one CUDA graph: each GEMV reads an x that the kernel just before it wrote, GEMV after
   GEMV, split-K among them, replayed three times: every output against its reference;
4. four rows (M=4): the library's launch (the dot path) checked and timed, against cuBLAS and Inductor.

Timing: CUDA graph replay of back-to-back calls over enough weight copies to exceed the L2 cache
several times (as a decode step streams distinct weights), milliseconds per call, TB/s = weight bytes /
time. ``--time-budget-s`` skips what would start after it; the JSON is written after every shape.

    python benchmarks/gemv.py --out benchmarks/results/gemv.json --time-budget-s 170
    python benchmarks/gemv.py --shapes tp2 --out benchmarks/results/gemv_tp2.json   # one rank's shards at TP 2
    python benchmarks/gemv.py --shapes qkv --out benchmarks/results/gemv_qkv.json   # q/k/v as one product
    python benchmarks/gemv.py --tiny     # the script itself on tiny shapes, CPU, Triton's interpreter
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import math
import os
import sys
import time
from pathlib import Path

if "--tiny" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, time_cuda_graph, write_json  # noqa: E402

import lsa_rewrite.kernels  # noqa: E402, F401  (registers the op)

GEMV = importlib.import_module("lsa_rewrite.kernels.small_m_linear")  # the module, not the op the package exports
GemvConfig = GEMV.GemvConfig

SHAPES = {"q_o": (4096, 4096), "k_v": (1024, 4096), "gate_up": (14336, 4096), "down": (4096, 14336), "lm_head": (128256, 4096)}
# one rank's shards of the same model under tensor parallelism over 2 GPUs (benchmarks/e2e_tp.py): q, k/v,
# gate/up split by rows, o and down by columns
TP2_SHAPES = {"q_tp2": (2048, 4096), "k_v_tp2": (512, 4096), "o_tp2": (4096, 2048), "gate_up_tp2": (7168, 4096), "down_tp2": (4096, 7168)}
# q/k/v as one product (``ConcatSharedInputLinearPass`` on the q/k/v group, then the GEMV): one GPU and one rank at TP 2
QKV_SHAPES = {"qkv": (6144, 4096), "qkv_tp2": (3072, 4096)}
TINY_SHAPES = {"a": (40, 96), "b": (24, 200)}
DTYPE = torch.bfloat16
L2_BYTES = 60 * 1024 * 1024
TOL = 1e-2  # relative to the fp32 reference: bf16 output rounding is ~4e-3


def candidates(n: int, k: int, sms: int) -> list[GemvConfig]:
    """Launch configurations swept at one row: reduction-path tiles of 2-16K elements (4 or 8 warps), each with the
    smallest split reaching 2 programs per SM (the two 512-wide tiles with twice that too), and two
    dot-path tiles."""
    cap = 1 << max(4, (k - 1).bit_length())  # tiles no wider than K's power of two (tiny shapes)

    def split_for(blocks: int, tiles: int, per_sm: int) -> int:
        split = 1
        while blocks * split < per_sm * sms and tiles >= 2 * split:
            split *= 2
        return split

    out: list[GemvConfig] = []
    for bn, bk, warps, doubled in ((8, 512, 4, True), (16, 512, 4, True), (16, 256, 4, False), (32, 256, 8, False),
                                   (8, 1024, 4, False), (4, 1024, 4, False), (16, 512, 8, False), (32, 512, 8, False),
                                   # narrower and longer tiles (run 70's best were the narrowest swept, 4 x 1024)
                                   (2, 1024, 4, False), (2, 2048, 4, False), (2, 2048, 8, False), (4, 2048, 8, False),
                                   (1, 2048, 4, False), (1, 4096, 4, False), (1, 4096, 8, False)):
        bk = min(bk, cap)
        blocks, tiles = math.ceil(n / bn), math.ceil(k / bk)
        split = split_for(blocks, tiles, 2)
        for s in (split, 2 * split) if doubled and tiles >= 2 * split else (split,):
            out.append(GemvConfig(block_n=bn, block_k=bk, split_k=s, num_warps=warps))
    for bn, bk, warps, stages in ((64, 128, 4, 4), (128, 64, 8, 4)):
        bk = min(bk, cap)
        blocks, tiles = math.ceil(n / bn), math.ceil(k / bk)
        out.append(GemvConfig(block_n=bn, block_k=bk, split_k=split_for(blocks, tiles // 2, 2), num_warps=warps,
                              num_stages=stages, dot=True))
    return list(dict.fromkeys(out))


class Problem:
    """x, the weight copies (enough to exceed the L2 cache several times) and the fp32 reference of copy 0."""

    def __init__(self, rows: int, n: int, k: int, device: str, *, seed: int, copies: int | None = None):
        gen = torch.Generator(device=device).manual_seed(seed)
        weight_bytes = n * k * DTYPE.itemsize
        self.copies = copies or max(2, math.ceil(4 * L2_BYTES / weight_bytes))
        self.x = torch.randn(rows, k, generator=gen, device=device).to(DTYPE)
        self.weights = [(torch.randn(n, k, generator=gen, device=device) / math.sqrt(k)).to(DTYPE) for _ in range(self.copies)]
        self.want = self.x.float() @ self.weights[0].float().t()
        self.rows, self.n, self.k, self.weight_bytes = rows, n, k, weight_bytes

    def error(self, got: torch.Tensor) -> float:
        return ((got.float() - self.want).norm() / self.want.norm()).item()


def check(problem: Problem, run) -> dict:
    """``run(x, w, out)`` (which returns its result: ``out`` itself where it writes there) into a
    NaN-poisoned buffer: every element written, within TOL, same bits twice."""
    out = torch.full((problem.rows, problem.n), float("nan"), dtype=DTYPE, device=problem.x.device)
    out = run(problem.x, problem.weights[0], out).clone()
    again = torch.full_like(out, float("nan"))
    again = run(problem.x, problem.weights[0], again)
    written = not torch.isnan(out).any().item()
    error = problem.error(out)
    same = torch.equal(out, again)
    return {"written": written, "rel_err": error, "reproducible": same, "ok": written and error < TOL and same}


def time_calls(problem: Problem, run, *, cuda: bool, calls: int = 24, replays: int = 5) -> float:
    """Milliseconds per ``run(x, w_i, out_i)`` call, graph-replayed over the weight copies (CPU: one call, wall time)."""
    outs = [torch.empty(problem.rows, problem.n, dtype=DTYPE, device=problem.x.device) for _ in range(2)]
    if not cuda:
        t0 = time.perf_counter()
        run(problem.x, problem.weights[0], outs[0])
        return (time.perf_counter() - t0) * 1e3
    counter = itertools.count()

    def call() -> None:  # each captured call reads the next weight copy (out of L2) into the other output
        i = next(counter)
        run(problem.x, problem.weights[i % problem.copies], outs[i % 2])

    return time_cuda_graph(call, iters=max(calls, problem.copies), warmup=2, repeats=replays)


def gemv_runner(config: GemvConfig | None, pdl: bool | None = None):
    def run(x, w, out):
        return GEMV.small_m_linear_triton(x, w, config=config, pdl=pdl, out=out)
    return run


def cublas(x, w, out):
    return torch.mm(x, w.t(), out=out)


def op_runner(x, w, out):
    return torch.ops.lsa.small_m_linear(x, w)


_COMPILED = {}


def inductor_runner(rows: int, n: int, k: int):
    """``F.linear`` compiled by Inductor as the decode step is (``coordinate_descent_tuning``), one module per shape."""
    key = (rows, n, k)
    if key not in _COMPILED:
        def linear(x, w):
            return F.linear(x, w)
        _COMPILED[key] = torch.compile(linear, fullgraph=True, dynamic=False, options={"coordinate_descent_tuning": True})
    fn = _COMPILED[key]

    def run(x, w, out):
        return fn(x, w)  # its own output: a copy into ``out`` would add a kernel to the time
    return run


def record(rows: dict, what: str, problem: Problem, ms: float | None, **extra) -> dict:
    row = {"what": what, "rows": problem.rows, "n": problem.n, "k": problem.k, **extra}
    if ms is not None:
        row.update(ms=round(ms, 5), tb_per_s=round(problem.weight_bytes / (ms * 1e-3) / 1e12, 3))
    rows.setdefault("records", []).append(row)
    print({k: v for k, v in row.items()}, flush=True)
    return row


def pdl_chain(device: str, shapes: dict, *, cuda: bool) -> dict:
    """GEMVs in one CUDA graph, each reading an x written by the kernel just before it (``torch.add``) or
    following another GEMV on the same x; replayed three times, every output against its reference."""
    gen = torch.Generator(device=device).manual_seed(7)
    steps = []
    for i, (name, (n, k)) in enumerate(list(shapes.items()) * 2):
        source = torch.randn(1, k, generator=gen, device=device).to(DTYPE)
        w1 = (torch.randn(n, k, generator=gen, device=device) / math.sqrt(k)).to(DTYPE)
        w2 = (torch.randn(n, k, generator=gen, device=device) / math.sqrt(k)).to(DTYPE)
        xbuf = torch.empty(1, k, dtype=DTYPE, device=device)
        outs = [torch.empty(1, n, dtype=DTYPE, device=device) for _ in range(2)]
        want = [(source.float() + 0.5) @ w.float().t() for w in (w1, w2)]
        steps.append((name, source, xbuf, (w1, w2), outs, want))

    def run():
        for _, source, xbuf, (w1, w2), outs, _ in steps:
            torch.add(source, 0.5, out=xbuf)  # a kernel writes x right before the GEMV reads it
            GEMV.small_m_linear_triton(xbuf, w1, out=outs[0])
            GEMV.small_m_linear_triton(xbuf, w2, out=outs[1])  # a GEMV right after a GEMV

    run()
    failures = []
    if cuda:
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        for _, _, xbuf, _, outs, _ in steps:
            xbuf.fill_(float("nan"))
            for o in outs:
                o.fill_(float("nan"))
        with torch.cuda.graph(graph):
            run()
        replays = 3
    else:
        graph, replays = None, 1
    for r in range(replays):
        for _, _, _, _, outs, _ in steps:
            for o in outs:
                o.fill_(float("nan"))
        if graph is not None:
            graph.replay()
            torch.cuda.synchronize()
        else:
            run()
        for name, _, _, _, outs, want in steps:
            for j, (o, w) in enumerate(zip(outs, want)):
                err = ((o.float() - w).norm() / w.norm()).item()
                if not err < TOL:
                    failures.append(f"replay {r} {name} gemv {j}: rel err {err:.3g}")
    return {"gemvs": 2 * len(steps), "replays": replays, "pdl": GEMV._use_pdl(torch.device(device)), "failures": failures, "ok": not failures}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/gemv.json")
    parser.add_argument("--time-budget-s", type=float, default=None)
    parser.add_argument("--shapes", default="8b", choices=("8b", "tp2", "qkv"),
                        help="8b: the Llama-3-8B projections; tp2: one rank's shards of them under tensor parallelism over 2 GPUs; "
                             "qkv: q/k/v concatenated (6144x4096, and 3072x4096 at TP 2)")
    parser.add_argument("--no-inductor", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU under Triton's interpreter: checks the script")
    args = parser.parse_args()
    started = time.perf_counter()
    global DTYPE
    if args.tiny:
        DTYPE = torch.float16  # the interpreter multiplies bf16 dot operands' raw bits (tests/kernels/triton_interpreter.py)
    # one compiled linear per shape and row count: more recompiles of one function than Dynamo's default limit
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
            break
    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    sms = torch.cuda.get_device_properties(0).multi_processor_count if cuda else 4
    shapes = TINY_SHAPES if args.tiny else {"tp2": TP2_SHAPES, "qkv": QKV_SHAPES}.get(args.shapes, SHAPES)
    payload: dict = {"benchmark": "gemv", "environment": environment(), "dtype": str(DTYPE), "tiny": args.tiny, "shapes": args.shapes,
                     "skipped": [], "failures": [], "table": {}, "records": []}

    def due(what: str) -> bool:
        elapsed = time.perf_counter() - started
        if args.time_budget_s is not None and elapsed > args.time_budget_s:
            payload["skipped"].append(f"{what}: not started, {elapsed:.0f} s of the {args.time_budget_s:.0f} s budget used")
            return False
        return True

    def save() -> None:
        payload["elapsed_s"] = round(time.perf_counter() - started, 1)
        write_json(args.out, payload)

    if cuda:
        src = torch.empty(2 ** 30 // 2, dtype=DTYPE, device=device).normal_()
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / 10
        payload["copy_tb_per_s"] = round(2 * src.numel() * 2 / (ms * 1e-3) / 1e12, 3)
        print({"copy_tb_per_s": payload["copy_tb_per_s"]}, flush=True)
        del src, dst

    summary = []
    for name, (n, k) in shapes.items():
        if not due(f"{name} M=1"):
            continue
        problem = Problem(1, n, k, device, seed=n + k, copies=2 if args.tiny else None)
        library = GEMV.default_config(1, n, k, torch.device(device))
        for what, run in (("library", gemv_runner(None)), ("op", op_runner)):
            result = check(problem, run)
            ms = time_calls(problem, run, cuda=cuda) if what == "library" else None
            record(payload, what, problem, ms, shape=name, config=library.to_dict(), check=result)
            if not result["ok"]:
                payload["failures"].append(f"{name} M=1 {what}: {result}")
        best = None
        for config in candidates(n, k, sms):
            result = check(problem, gemv_runner(config))
            ms = time_calls(problem, gemv_runner(config), cuda=cuda)
            record(payload, "sweep", problem, ms, shape=name, config=config.to_dict(), check=result)
            if not result["ok"]:
                payload["failures"].append(f"{name} M=1 sweep {config}: {result}")
            elif best is None or ms < best[0]:
                best = (ms, config)
        if best is not None:
            payload["table"][f"{n},{k}"] = best[1].to_dict()
            ms_pdl_off = time_calls(problem, gemv_runner(best[1], pdl=False), cuda=cuda)
            record(payload, "best_without_pdl", problem, ms_pdl_off, shape=name, config=best[1].to_dict())
        ms_cublas = time_calls(problem, cublas, cuda=cuda)
        record(payload, "cublas", problem, ms_cublas, shape=name)
        ms_inductor = None
        if cuda and not args.no_inductor and due(f"{name} M=1 inductor"):
            run = inductor_runner(1, n, k)
            result = check(problem, run)
            ms_inductor = time_calls(problem, run, cuda=cuda)
            record(payload, "inductor_cd", problem, ms_inductor, shape=name, check=result)
        summary.append((name, 1, best, ms_cublas, ms_inductor, problem.weight_bytes))
        del problem
        save()

    # the sweep's choices from here on: the chain checks, and step_breakdown.py --gemv-table measures, these launches
    for key, config in payload["table"].items():
        n, k = (int(v) for v in key.split(","))
        GEMV.TABLE[(n, k)] = GemvConfig(**config)
    if due("pdl chain"):
        payload["pdl_chain"] = pdl_chain(device, shapes if not cuda else {k: v for k, v in shapes.items() if k != "lm_head"}, cuda=cuda)
        print({"pdl_chain": payload["pdl_chain"]}, flush=True)
        if not payload["pdl_chain"]["ok"]:
            payload["failures"].append(f"pdl chain: {payload['pdl_chain']['failures'][:4]}")
        save()

    for name, (n, k) in shapes.items():
        if not due(f"{name} M=4"):
            continue
        problem = Problem(4, n, k, device, seed=n + k + 4, copies=2 if args.tiny else None)
        library = GEMV.default_config(4, n, k, torch.device(device))
        result = check(problem, gemv_runner(None))
        ms = time_calls(problem, gemv_runner(None), cuda=cuda)
        record(payload, "library", problem, ms, shape=name, config=library.to_dict(), check=result)
        if not result["ok"]:
            payload["failures"].append(f"{name} M=4 library: {result}")
        ms_cublas = time_calls(problem, cublas, cuda=cuda)
        record(payload, "cublas", problem, ms_cublas, shape=name)
        ms_inductor = None
        if cuda and not args.no_inductor and due(f"{name} M=4 inductor"):
            run = inductor_runner(4, n, k)
            ms_inductor = time_calls(problem, run, cuda=cuda)
            record(payload, "inductor_cd", problem, ms_inductor, shape=name, check=check(problem, run))
        summary.append((name, 4, (ms, library), ms_cublas, ms_inductor, problem.weight_bytes))
        del problem
        save()

    save()
    print(f"\ncopy ceiling {payload.get('copy_tb_per_s')} TB/s; TB/s per shape (GEMV best / cuBLAS / Inductor cd):")
    for name, rows, best, ms_cublas, ms_inductor, nbytes in summary:
        def tb(ms):
            return f"{nbytes / (ms * 1e-3) / 1e12:6.3f}" if ms else "   -  "
        gemv_ms = best[0] if best else None
        print(f"  {name:8s} M={rows}: {tb(gemv_ms)} / {tb(ms_cublas)} / {tb(ms_inductor)}   {best[1] if best else ''}")
    print("table:", payload["table"])
    print("failures:", payload["failures"] or "none", "skipped:", payload["skipped"] or "none")
    return 1 if payload["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
