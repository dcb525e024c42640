"""Benchmark: where a 128K prefill's time goes, one forward against pieces (issue 13, item 3).

One Llama-3-8B-shaped model (random bf16 weights), B=1, converted once; per path a warm-up prefill
(page-locks the mirror, loads kernels), then a second prefill under ``torch.profiler``: wall time,
GPU kernel time by kind (attention, GEMMs, host<->device copies, other), the GPU's busy time (the
union of its kernels' and copies' intervals, every stream) and idle time (wall minus busy), how much
of the host-to-device copies ran under other work, and the host's time blocked in synchronisation.
Paths: ``dense`` (``mode="dense"``, one forward), ``lsa`` (13.5%, one forward), ``lsa_chunkT``
(``prefill_chunk=T``). The decode step is not compiled (``compile=False``): this measures the prefill.

    python benchmarks/prefill_profile.py --context 131072 --prefill-chunk 16384
    python benchmarks/prefill_profile.py --tiny      # the script itself on the CPU, seconds
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEVICE, environment, release_store, sync, timed_prefill, write_json  # noqa: E402
from e2e_decode import build_model  # noqa: E402

import lsa_rewrite  # noqa: E402
from lsa_rewrite import LSAConfig  # noqa: E402


def kind_of(name: str) -> str:
    low = name.lower()
    if "flash" in low or "fmha" in low or "attention" in low or ("cutlass" in low and "attn" in low):
        return "attention"
    if "memcpy htod" in low or "memcpy dtoh" in low or "memcpy dtod" in low or "memset" in low:
        return low.split("(")[0].strip()
    if any(tag in low for tag in ("gemm", "gemv", "nvjet", "xmma", "sm90_", "cublas", "splitk")):
        return "gemm"
    if "copy" in low or "cat" in low or "index" in low or "gather" in low or "scatter" in low:
        return "copies/index"
    return "other"


def _merged(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _union_length(spans: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in _merged(spans))


def _overlap(a: float, b: float, merged: list[tuple[float, float]]) -> float:
    """Length of ``[a, b)`` covered by ``merged`` (sorted, disjoint)."""
    i = bisect.bisect_right(merged, (a, float("inf"))) - 1
    total = 0.0
    for lo, hi in merged[max(i, 0):]:
        if lo >= b:
            break
        total += max(0.0, min(b, hi) - max(a, lo))
    return total


@torch.no_grad()
def run(model, prompt: torch.Tensor, config: LSAConfig, trace: str | None = None) -> dict:
    from torch.profiler import ProfilerActivity, profile

    runtime = model.lsa
    runtime.config = config
    runtime.pending_capacity = prompt.shape[1] + 64
    if config.mode == "dense":
        release_store(model)  # (a sparse store of the same shape hands its page-locked mirror on)
    _, _, warm_s = timed_prefill(model, prompt)  # page-locks a new mirror, loads kernels
    if config.mode == "dense":
        release_store(model)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        logits = model(input_ids=prompt, use_cache=True, logits_to_keep=1).logits[:, -1].float()
        sync()
    wall = time.perf_counter() - t0
    if trace:
        prof.export_chrome_trace(trace)  # chrome://tracing or ui.perfetto.dev: every stream's kernels and copies
    kinds: dict[str, float] = defaultdict(float)
    blocked = 0.0
    for evt in prof.key_averages():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            kinds[kind_of(evt.key)] += evt.self_device_time_total / 1e6
        elif "Synchronize" in evt.key:
            blocked += evt.self_cpu_time_total / 1e6
    # Device intervals (kernels and copies, every stream): busy = their union; how much of the
    # host-to-device copies ran under other work (a side stream's reads overlapping the compute)
    spans = [(e.time_range.start, e.time_range.end, e.name.lower()) for e in prof.events()
             if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start]
    busy = _union_length([(a, b) for a, b, _ in spans]) / 1e6
    others = _merged([(a, b) for a, b, name in spans if "memcpy htod" not in name])
    htod_hidden = sum(_overlap(a, b, others) for a, b, name in spans if "memcpy htod" in name) / 1e6
    top = sorted(((e.key[:120], e.self_device_time_total / 1e6) for e in prof.key_averages()
                  if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda kv: -kv[1])[:10]
    from lsa_rewrite.adapters import piece_attention

    chosen = sorted({getattr(k, "__name__", None) for k in piece_attention._CHOSEN.values()} - {None})
    return {
        "last_logits": logits, "piece_kernels": chosen,
        "warm_prefill_s": round(warm_s, 2), "profiled_prefill_s": round(wall, 2),
        "gpu_busy_s": round(busy, 2), "gpu_idle_s": round(wall - busy, 2), "host_blocked_in_sync_s": round(blocked, 2),
        "kernel_time_sum_s": round(sum(kinds.values()), 2), "htod_under_other_work_s": round(htod_hidden, 3),
        "by_kind_s": {k: round(v, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top_kernels_s": [{"kernel": k, "s": round(v, 3)} for k, v in top],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=None, help="prompt tokens (default 131072; --tiny: 2048)")
    parser.add_argument("--prefill-chunk", type=int, default=None, help="piece size of the pieced path (default 16384; --tiny: 512)")
    parser.add_argument("--paths", default="dense,lsa,lsa_chunk")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--trace", default=None, help="folder for a Chrome trace of each path's profiled prefill (PATH.json)")
    parser.add_argument("--out", default="benchmarks/results/prefill_profile.json")
    args = parser.parse_args()
    ctx = args.context or (2048 if args.tiny else 131072)
    piece = args.prefill_chunk or (512 if args.tiny else 16384)
    model = build_model(args.layers or (2 if args.tiny else 32), tiny=args.tiny)
    base = LSAConfig(budget=0.135, chunk_size=64, interval=64, sink_tokens=64, recent_tokens=128, compile=False)
    lsa_rewrite.convert(model, base)
    torch.manual_seed(ctx)
    prompt = torch.randint(0, model.config.vocab_size, (1, ctx), device=DEVICE)
    reference = None
    configs = {"dense": dataclasses.replace(base, mode="dense"), "lsa": base, "lsa_chunk": dataclasses.replace(base, prefill_chunk=piece)}
    payload = {"benchmark": "prefill_profile", "environment": environment(), "tiny": args.tiny, "context": ctx, "prefill_chunk": piece,
               "model": f"Llama-3-8B shape, random bf16 weights, {args.layers or (2 if args.tiny else 32)} layers", "results": {}}
    for name in args.paths.split(","):
        trace = None
        if args.trace:
            Path(args.trace).mkdir(parents=True, exist_ok=True)
            trace = str(Path(args.trace) / f"{name}.json")
        res = run(model, prompt, configs[name], trace)
        logits = res.pop("last_logits")
        if name == "dense":
            reference = logits
        elif "dense" in payload["results"]:
            res["last_logits_max_abs_diff_vs_dense"] = round(float((logits - reference).abs().max()), 5)
            res["same_next_token_as_dense"] = bool(logits.argmax(-1).eq(reference.argmax(-1)).all())
        payload["results"][name] = res
        print(name, res, flush=True)
        write_json(args.out, payload)
    release_store(model)


if __name__ == "__main__":
    main()
