"""Benchmark: host memory per sequence and decode speed of the three host-memory options, 8B shape.

Per option, at one context (default 128K), batch 1, on a Llama-3-8B-shaped model with random bf16
weights, through the same runtime path as ``e2e_decode.py`` (its ``runtime_run``: the model's own
prefill into the store, Inductor + CUDA graph decode, selections every 64 steps with recall_lag 4):

- ``offload_exact``: ``LSAConfig(mode="offload")``, the lossless mirror in the model's dtype;
- ``offload_fp8``: ``LSAConfig(mode="offload", mirror="fp8")``, the lossy compact mirror (half the bytes);
- ``evict``: ``LSAConfig(mode="evict")``: no mirror; the prompt is never staged on the host.

Reported per option: ``host_bytes`` (``footprint()``: the mirror's page-locked allocation, per
sequence), the process's resident host memory sampled every 20 ms during the option's whole run
(prefill included) as a peak above the level before it, decode ms/token, selection windows (host and
wall ms, recalled chunks), device KV bytes, and how many such sequences the host's memory and the
GPU's memory would each admit (computed from those bytes, not allocated). A warm-up run at the same
context compiles the decode step first (the three options share one store shape), so compilation's
host memory is not charged to the first option.

    python benchmarks/host_memory.py --out benchmarks/results/host_memory.json          # H200, ~4 minutes
    python benchmarks/host_memory.py --tiny --out /tmp/host_memory_tiny.json            # CPU check of the script
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEVICE, environment, release_store, write_json  # noqa: E402
from e2e_decode import add_floor, build_model, runtime_run  # noqa: E402

import lsa_rewrite  # noqa: E402
from lsa_rewrite import LSAConfig  # noqa: E402

OPTIONS = {
    "offload_exact": dict(mode="offload", mirror="exact"),
    "offload_fp8": dict(mode="offload", mirror="fp8"),
    "evict": dict(mode="evict", mirror="exact"),
}


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (0 where there is no /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _meminfo_bytes(field: str) -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class RssSampler:
    """Peak resident host memory of this process while the ``with`` block runs (sampled every 20 ms: a
    read of /proc costs ~50 us of the GIL, 0.25% of the decode loop it runs beside)."""

    def __init__(self, period_s: float = 0.02):
        self.period_s = period_s
        self.before = self.peak = self.after = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_kib("VmRSS") * 1024)
            self._stop.wait(self.period_s)

    def __enter__(self) -> "RssSampler":
        self.before = self.peak = _status_kib("VmRSS") * 1024
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.after = _status_kib("VmRSS") * 1024
        self.peak = max(self.peak, self.after)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=None, help="prompt tokens (default 131072; --tiny: 4096)")
    parser.add_argument("--steps", type=int, default=None, help="decode steps per option (default 256; --tiny: 96)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 32, the 8B shape; --tiny: 2)")
    parser.add_argument("--options", default=",".join(OPTIONS), help=f"which of {', '.join(OPTIONS)} to run, in order")
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up run that compiles the decode step first")
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU: checks the script in seconds (not a measurement)")
    parser.add_argument("--out", default="benchmarks/results/host_memory.json")
    args = parser.parse_args()
    options = args.options.split(",")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise SystemExit(f"unknown --options {unknown}; choose from {', '.join(OPTIONS)}")
    if args.tiny and Path(args.out).resolve().is_relative_to((Path(__file__).resolve().parent / "results")):
        raise SystemExit("--tiny is a script check, not a measurement: write it outside benchmarks/results (e.g. --out /tmp/host_memory_tiny.json)")
    context = args.context or (4096 if args.tiny else 131072)
    steps = args.steps or (96 if args.tiny else 256)
    layers = args.layers or (2 if args.tiny else 32)
    started = time.perf_counter()
    model = build_model(layers, tiny=args.tiny)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    base = LSAConfig(budget=0.135, chunk_size=64, interval=64, sink_tokens=64, recent_tokens=128, recall_lag=4)
    host_total, host_available = _meminfo_bytes("MemTotal"), _meminfo_bytes("MemAvailable")
    gpu_total = torch.cuda.get_device_properties(0).total_memory if DEVICE == "cuda" else 0
    payload = {
        "benchmark": "host_memory", "environment": environment(), "tiny": args.tiny,
        "model": f"Llama-3-8B shape, random bf16 weights, {layers} layers" + (" (tiny: hidden 64, CPU check)" if args.tiny else ""),
        "layers": layers, "weights_bytes": weights, "batch": 1, "context": context, "steps": steps,
        "lsa_config": base.to_dict(), "host_memory_total_bytes": host_total, "host_memory_available_bytes_at_start": host_available,
        "gpu_memory_total_bytes": gpu_total,
        "notes": {
            "host_bytes": "footprint()['host_bytes']: the mirror's host allocation (page-locked on CUDA), per sequence (batch 1)",
            "rss": "this process's resident host memory, sampled every 20 ms over the option's run (prefill, decode, selections); "
                   "peak minus the level before the run",
            "sequences_by_host": "floor(0.9 * MemAvailable at start / host_bytes): 128K sequences whose mirror the host could hold; "
                                 "null where the option holds no host memory per sequence",
            "sequences_by_gpu": "floor((0.9 * GPU memory - weights) / kv_gpu_bytes), as e2e_decode.py computes it",
        },
        "results": {},
    }

    def prompt_of(ctx: int) -> torch.Tensor:
        torch.manual_seed(ctx)
        return torch.randint(0, model.config.vocab_size, (1, ctx), device=DEVICE)

    lsa_rewrite.convert(model, base)
    if not args.no_warmup:
        # compiles (Inductor + CUDA graph) the decode step of this store shape; the three options share it
        # (the same steps: the store's capacity, so its shape, follows from them)
        runtime_run(model, prompt_of(context), steps, dataclasses.replace(base, mode="evict"))
        release_store(model)
        payload["warmup_s"] = round(time.perf_counter() - started, 1)
    for name in options:
        config = dataclasses.replace(base, **OPTIONS[name])
        release_store(model)
        with RssSampler() as rss:
            res = runtime_run(model, prompt_of(context), steps, config)
            host_bytes = res["footprint"]["host_bytes"]
        add_floor(res, weights)
        res.update({
            "option": OPTIONS[name], "host_bytes_per_sequence": host_bytes,
            "rss_before_bytes": rss.before, "rss_peak_over_before_bytes": rss.peak - rss.before, "rss_after_over_before_bytes": rss.after - rss.before,
            "sequences_by_host": int(0.9 * host_available // host_bytes) if host_bytes and host_available else None,
            "sequences_by_gpu": int((0.9 * gpu_total - weights) // res["kv_gpu_bytes"]) if gpu_total else None,
        })
        payload["results"][name] = res
        payload["elapsed_s"] = round(time.perf_counter() - started, 1)
        print(name, {k: res[k] for k in ("ms_per_token", "host_bytes_per_sequence", "rss_peak_over_before_bytes", "kv_gpu_bytes", "prefill_s")}, flush=True)
        write_json(args.out, payload)
    release_store(model)
    exact = payload["results"].get("offload_exact")
    for name, res in payload["results"].items():
        if exact is not None and name != "offload_exact":
            res["vs_offload_exact"] = {
                "host_bytes": round(res["host_bytes_per_sequence"] / exact["host_bytes_per_sequence"], 4),
                "ms_per_token": round(res["ms_per_token"] / exact["ms_per_token"], 3),
            }
    payload["elapsed_s"] = round(time.perf_counter() - started, 1)
    write_json(args.out, payload)
    print(f"\n{'option':<14} {'ms/tok':>8} {'host GB/seq':>11} {'RSS peak +GB':>12} {'KV GPU GB':>9} {'seq by host':>11} {'seq by GPU':>10}")
    for name, res in payload["results"].items():
        print(f"{name:<14} {res['ms_per_token']:>8.3f} {res['host_bytes_per_sequence'] / 1e9:>11.3f} {res['rss_peak_over_before_bytes'] / 1e9:>12.3f} "
              f"{res['kv_gpu_bytes'] / 1e9:>9.3f} {str(res['sequences_by_host']):>11} {str(res['sequences_by_gpu']):>10}")


if __name__ == "__main__":
    main()
