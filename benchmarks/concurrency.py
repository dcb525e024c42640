"""Benchmark: concurrency actually allocated: the largest batch of 128K sequences each mode holds on one GPU,
prefilled one sequence at a time into one store, then decoded together (issue 13, item 4).

Llama-3-8B shape (random bf16 weights, ``--layers`` of them), one GPU, one prompt length (default 128K).
Per mode, through the same conversion (``LSAConfig.mode``/``mirror`` are read at each prefill):

- ``runtime_dense``: ``LSAConfig(mode="dense")``: every chunk resident, the same rewritten step, Triton
  decode kernel, Inductor and CUDA graph as LSA (the strongest dense baseline here);
- ``lsa_exact``: budget 0.135, offload mode, the lossless host mirror in the model's dtype;
- ``lsa_fp8``: the same with ``mirror="fp8"`` (lossy, half the host bytes);
- ``lsa_evict``: evict mode: no mirror, no host memory per sequence.

For each mode: the bytes of one sequence are measured on a one-sequence store of the mode's sizing
(device: every tensor the store holds there; host: the mirror's arena, computed as ``HostArena``
sizes it); the largest ``N`` that fits is computed for the device (the GPU's free memory at the start
of the mode, less the prefill working set measured by a one-sequence pilot prefill and a margin,
divided by the device bytes per sequence) and for the host (``--host-fraction`` of ``MemAvailable``
divided by the host bytes per sequence), and the smaller one says which bound binds. Then ``N``
sequences are actually allocated: ``model(prompts [N, T])`` with ``LSAConfig(prefill_batch=1)``
prefills them one at a time into one store of batch ``N`` (the dense prefill's working set is one
sequence's), and they decode together for ``--steps`` steps (selections every 64 steps included).
Reported per mode: ``N``, the bound, prefill seconds per sequence, aggregate decode tokens/s,
ms/step, peak device memory (prefill and decode), device KV bytes, host bytes, host RSS; and each LSA
mode's aggregate against ``runtime_dense``'s at its own largest ``N``, side by side.

Filling the GPU takes time: ``N`` x one prefill (~12-15 s at 128K and 32 layers). Fewer layers
(``--layers``) make each prefill faster but let more sequences fit (weights and KV per sequence both
shrink), so the time to fill the device barely changes; what ``--layers`` changes is the ratio of
weights to KV per sequence (reported). ``--time-budget-s`` caps ``N`` to what the remaining time can
prefill (estimated from the pilot), and the bound then says ``time``; ``--modes`` with ``--merge JSON``
runs modes in separate device calls into one JSON (the earlier call's modes and pilot are kept, each
mode with its own date). An out-of-memory error is
caught and recorded, the mode is retried once at 85% of its ``N`` when time allows, and the next mode
runs (any other error is recorded with its traceback, and the next mode runs too). JSON is written after every mode.

    python benchmarks/concurrency.py --modes runtime_dense,lsa_exact,lsa_fp8 --time-budget-s 540 --out benchmarks/results/concurrency.json
    python benchmarks/concurrency.py --modes lsa_evict --merge benchmarks/results/concurrency.json --time-budget-s 520 \
        --out benchmarks/results/concurrency.json          # a second device call: evict fills the GPU for ~8 minutes
    python benchmarks/concurrency.py --tiny --out /tmp/concurrency_tiny.json     # the script itself, CPU, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEVICE, environment, release_store, sync, time_budget, timed_prefill, use_local_prefill, write_json  # noqa: E402
from e2e_decode import build_model, cache_kw, timed_store_methods  # noqa: E402
from host_memory import RssSampler, _meminfo_bytes  # noqa: E402

import lsa_rewrite  # noqa: E402
from lsa_rewrite import KVStore, LSAConfig  # noqa: E402
from lsa_rewrite.runtime.host_memory import _aligned  # noqa: E402
from lsa_rewrite.runtime.mover import mirror_layout  # noqa: E402

MODES = {
    "runtime_dense": dict(mode="dense"),
    "lsa_exact": dict(mode="offload", mirror="exact"),
    "lsa_fp8": dict(mode="offload", mirror="fp8"),
    "lsa_evict": dict(mode="evict", mirror="exact"),
}
GB = 1e9


class InjectedOOM(torch.OutOfMemoryError):
    """``--inject-oom``: an out-of-memory error raised on purpose (checks the recovery path on the CPU)."""


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def allocated() -> int:
    return torch.cuda.memory_allocated() if DEVICE == "cuda" else 0


def peak() -> int:
    return torch.cuda.max_memory_allocated() if DEVICE == "cuda" else 0


def reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def per_sequence_bytes(model, config: LSAConfig, capacity: int) -> dict:
    """Device and host bytes one sequence of ``config`` takes in a store of ``capacity`` tokens.

    Device: a one-sequence store of the mode's sizing is allocated (evict in place of offload, so no
    host mirror is pinned for it: the device tensors are the same) and its device tensors counted.
    Host: the mirror's arena for one sequence, computed as ``HostArena.for_tensors`` sizes it."""
    specs = model.lsa.layer_specs()
    sizing = dataclasses.replace(config, mode="evict", mirror="exact") if config.mode == "offload" else config
    before = allocated()
    store = KVStore(specs, sizing, batch=1, capacity=capacity, device=DEVICE)
    fp = store.footprint()
    device_alloc = allocated() - before
    slots, chunks = store.slots, store.num_chunks
    del store
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()  # the free memory the plan reads next must not miss this store's blocks
    host = 0
    if config.mode == "offload" and slots < chunks:
        for s in specs:
            if s.window is None:
                shape, dtype = mirror_layout(1, chunks, config.chunk_size, s.kv_heads, s.head_dim, s.dtype, config.mirror)
                host += 2 * _aligned(math.prod(shape) * dtype.itemsize)
    return {"device_bytes": fp["resident_kv_bytes"], "device_allocated_bytes": device_alloc, "host_bytes": host,
            "slots_per_sequence": slots, "chunks_per_sequence": chunks}


@torch.no_grad()
def pilot(model, prompt: torch.Tensor, base: LSAConfig, capacity: int) -> dict:
    """One sequence prefilled alone (evict sizing, step not compiled): the prefill's working set on
    the device (its peak above the weights and the store) and its seconds (model forward + ingest)."""
    runtime = model.lsa
    release_store(model)
    runtime.config = dataclasses.replace(base, mode="evict", mirror="exact", compile=False, prefill_batch=1)
    runtime.pending_capacity = capacity
    reset_peak()
    before = allocated()
    breakdown: dict[str, float] = {}
    with timed_store_methods(breakdown):
        t0 = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        sync()
        total = time.perf_counter() - t0
    del out
    store_bytes = runtime.store.footprint()["resident_kv_bytes"]
    working = peak() - before - store_bytes if DEVICE == "cuda" else 0
    release_store(model)
    runtime.pending_capacity = None
    forward = total - breakdown.get("store_init", 0.0) - breakdown.get("probe", 0.0)
    return {"prefill_s": round(total, 2), "forward_and_ingest_s": round(forward, 2), "breakdown_s": {k: round(v, 2) for k, v in breakdown.items()},
            "working_set_bytes": working, "note": "one sequence, evict sizing, decode step not compiled; working set = peak - (allocated before + store)"}


@torch.no_grad()
def run_mode(model, config: LSAConfig, prompt: torch.Tensor, steps: int, capacity: int, *, inject_oom: bool = False,
             on_prefill=None) -> dict:
    """Prefill ``prompt`` ``[N, T]`` through the converted model (``config.prefill_batch`` rows at a time)
    into one store, then decode the N sequences together for ``steps`` steps. ``on_prefill(partial)``:
    called with the prefill's measurements before the decode starts (a run stopped there keeps them)."""
    kw = cache_kw(model)
    runtime = model.lsa
    release_store(model)
    runtime.config = config
    runtime.pending_capacity = capacity
    n = prompt.shape[0]
    t0 = time.perf_counter()
    runtime.program(n)  # trace the decode step for this batch size now, so the prefill's time leaves it out
    capture_s = time.perf_counter() - t0
    reset_peak()
    start_alloc = allocated()
    breakdown: dict[str, float] = {}
    from torch._dynamo.utils import counters

    with RssSampler() as rss:
        with timed_store_methods(breakdown):
            if inject_oom:
                raise InjectedOOM("injected out-of-memory error (--inject-oom), before the store was allocated")
            cache, token, prefill_s = timed_prefill(model, prompt)
        prefill_peak = peak()
        store = cache.store
        fp_after_prefill = store.footprint()
        init_s, probe_s = breakdown.get("store_init", 0.0), breakdown.get("probe", 0.0)
        prefilled = {
            "n": n, "prefill_batch": config.prefill_batch, "capture_s": round(capture_s, 1),
            "prefill_s": round(prefill_s, 2), "prefill_breakdown_s": {k: round(v, 2) for k, v in breakdown.items()},
            "prefill_s_per_sequence": round((prefill_s - init_s - probe_s) / n, 2),
            "allocated_at_start_bytes": start_alloc, "peak_device_prefill_bytes": prefill_peak,
            "prefill_working_set_bytes": prefill_peak - start_alloc - fp_after_prefill["resident_kv_bytes"] if DEVICE == "cuda" else 0,
            "device_kv_bytes": fp_after_prefill["resident_kv_bytes"], "host_bytes": fp_after_prefill["host_bytes"],
            "mirror": fp_after_prefill["mirror"], "dense_kv_bytes": fp_after_prefill["dense_kv_bytes"],
            "slots_per_sequence": fp_after_prefill["slots_per_sequence"],
        }
        if on_prefill is not None:
            on_prefill(prefilled)
        reset_peak()
        t0 = time.perf_counter()
        for _ in range(3):  # compile (new batch size) and CUDA-graph capture; LSA compiled in the probe already
            token = model(input_ids=token, **{kw: cache}).logits[:, -1:].argmax(-1)
        sync()
        warm_s = time.perf_counter() - t0
        graphs_before = counters["stats"]["unique_graphs"]
        selections_before = store.selections
        t0 = time.perf_counter()
        for _ in range(steps):
            token = model(input_ids=token, **{kw: cache}).logits[:, -1:].argmax(-1)
        sync()
        decode_s = time.perf_counter() - t0
        decode_peak = peak()
    fp = lsa_rewrite.footprint(model)
    result = {
        **prefilled,
        "warmup_s": round(warm_s, 1), "steps": steps,
        "ms_per_step": round(decode_s / steps * 1e3, 3),
        "aggregate_tokens_per_s": round(n * steps / decode_s, 1),
        "tokens_per_s_per_sequence": round(steps / decode_s, 2),
        "selections_in_timed_loop": store.selections - selections_before,
        "recompiles_in_timed_loop": counters["stats"]["unique_graphs"] - graphs_before,
        "peak_device_decode_bytes": decode_peak, "peak_device_bytes": max(prefill_peak, decode_peak),
        "device_kv_bytes": fp["resident_kv_bytes"], "host_bytes": fp["host_bytes"], "dropped_chunks": fp["dropped_chunks"],
        "rss_peak_over_before_bytes": rss.peak - rss.before, "status": "done",
    }
    del cache, store, token
    release_store(model)
    runtime.pending_capacity = None
    return result


def plan(per_seq: dict, *, free_device: int | None, working_set: int, margin: int, host_available: int, host_fraction: float,
         max_n: int | None) -> dict:
    """The largest N each resource admits, and which one binds."""
    bounds = {}
    if free_device is not None:
        bounds["device"] = max(0, int((free_device - working_set - margin) // per_seq["device_bytes"]))
    if per_seq["host_bytes"]:
        bounds["host"] = max(0, int(host_fraction * host_available // per_seq["host_bytes"]))
    if max_n is not None:
        bounds["max_n"] = max_n
    if not bounds:
        raise SystemExit("nothing bounds N here (no GPU, no host mirror, no --max-n): pass --max-n")
    bound = min(bounds, key=bounds.get)
    return {"n": bounds[bound], "bound": bound, "n_by": bounds}


def compare(lsa: dict, dense: dict) -> dict:
    """An LSA mode against runtime_dense, each at its own N (> 1: LSA more)."""
    return {
        "n": round(lsa["n"] / dense["n"], 2),
        "aggregate_tokens_per_s": round(lsa["aggregate_tokens_per_s"] / dense["aggregate_tokens_per_s"], 2),
        "ms_per_step": round(lsa["ms_per_step"] / dense["ms_per_step"], 3),
        "device_kv_bytes_per_sequence": round((lsa["device_kv_bytes"] / lsa["n"]) / (dense["device_kv_bytes"] / dense["n"]), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=None, help="prompt tokens per sequence (default 131072; --tiny: 4096)")
    parser.add_argument("--steps", type=int, default=None, help="timed decode steps per mode (default 128; --tiny: 32)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 32, the 8B shape; --tiny: 2)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"which of {', '.join(MODES)} to run, in order")
    parser.add_argument("--prefill-batch", type=int, default=1, help="LSAConfig.prefill_batch: sequences per prefill forward (default 1)")
    parser.add_argument("--host-fraction", type=float, default=0.85, help="share of MemAvailable the mirrors may take (default 0.85)")
    parser.add_argument("--margin-gb", type=float, default=2.0,
                        help="device memory kept free beside weights, store and prefill working set: CUDA graph, allocator slack (default 2)")
    parser.add_argument("--max-n", type=int, default=None, help="cap N (default none; --tiny: 3)")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="plan N so every mode's prefill fits in this many seconds from the start (one device call is 10 minutes)")
    parser.add_argument("--mode-overhead-s", type=float, default=None,
                        help="seconds per mode besides the prefills, for --time-budget-s: store and mirror allocation, compile, decode (default 60; --tiny: 2)")
    parser.add_argument("--merge", default=None, metavar="JSON",
                        help="keep the other modes' results (and the pilot) of this earlier JSON of the same shape (e.g. an earlier device call's)")
    parser.add_argument("--inject-oom", default="", help="modes whose first attempt raises an out-of-memory error on purpose (checks the recovery)")
    parser.add_argument("--prefill-window", type=int, default=0,
                        help="run the prompts' attention over a local causal window of this many tokens (0: exact). The decode "
                             "measured here attends exactly; the KV stored is each layer's own projections of the prompt. Lets "
                             "the device fill with evict-mode sequences within one device call; prefill times are then not "
                             "a prefill measurement")
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU: checks the script in seconds (not a measurement)")
    parser.add_argument("--out", default="benchmarks/results/concurrency.json")
    args = parser.parse_args()
    started = time.perf_counter()
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"unknown --modes {unknown}; choose from {', '.join(MODES)}")
    if args.tiny and Path(args.out).resolve().is_relative_to(Path(__file__).resolve().parent / "results"):
        raise SystemExit("--tiny is a script check, not a measurement: write it outside benchmarks/results (e.g. --out /tmp/concurrency_tiny.json)")
    context = args.context or (4096 if args.tiny else 131072)
    steps = args.steps or (32 if args.tiny else 128)
    layers = args.layers or (2 if args.tiny else 32)
    max_n = args.max_n if args.max_n is not None else (3 if args.tiny else None)
    overhead = args.mode_overhead_s if args.mode_overhead_s is not None else (2.0 if args.tiny else 60.0)
    inject = set(filter(None, args.inject_oom.split(",")))

    model = build_model(layers, tiny=args.tiny)
    if args.prefill_window:
        use_local_prefill(model, args.prefill_window)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    base = LSAConfig(budget=0.135, chunk_size=64, interval=64, sink_tokens=64, recent_tokens=128, recall_lag=4, prefill_batch=args.prefill_batch)
    capacity = context + steps + 3 + 2 * base.interval + 1
    shape = {"context": context, "layers": layers, "steps": steps, "tiny": args.tiny, "capacity": capacity}
    payload = {
        "benchmark": "concurrency", "environment": environment(), **shape,
        "model": f"Llama-3-8B shape, random bf16 weights, {layers} layers" + (" (tiny: hidden 64, CPU check)" if args.tiny else ""),
        "weights_bytes": weights, "lsa_config": base.to_dict(),
        "prefill_attention": (f"local causal window of {args.prefill_window} tokens (decode exact; prefill seconds are not an "
                              "exact prefill's)") if args.prefill_window else "exact",
        "gpu_memory_total_bytes": torch.cuda.get_device_properties(0).total_memory if DEVICE == "cuda" else None,
        "host_memory_total_bytes": _meminfo_bytes("MemTotal"),
        "notes": {
            "n_by": "device: (free device memory at the mode's start - prefill working set (pilot) - margin) // device bytes per "
                    "sequence; host: host_fraction x MemAvailable at the mode's start // host bytes per sequence; time: what the "
                    "time budget leaves for this mode's prefills // the pilot's seconds per sequence; max_n: --max-n",
            "per_sequence": "device: every device tensor of a one-sequence store of the mode's sizing (footprint resident_kv_bytes); "
                            "host: the mirror arena of one sequence as HostArena sizes it",
            "prefill": "model(prompts [N, T]) with LSAConfig(prefill_batch): one model forward per piece into one store of batch N; "
                       "prefill_s_per_sequence leaves out the store's allocation (host mirror pinning) and the probe (compile + first selection)",
            "decode": "all N sequences decode together, one token each per step, selections every 64 steps included; "
                      "aggregate_tokens_per_s = N x steps / decode seconds",
            "weights_to_kv": "weights_bytes / device bytes per sequence: fewer layers keep the embedding and lm_head (2 x 1.05 GB "
                             "at the 8B shape) while per-sequence KV shrinks in proportion, so this ratio grows as layers drop",
        },
        "skipped": [], "results": {},
    }
    out_path = Path(args.out)
    if args.merge and not Path(args.merge).exists():
        raise SystemExit(f"--merge {args.merge}: no such file; pass the JSON an earlier call wrote, or leave --merge out")
    if args.merge:
        old = json.loads(Path(args.merge).read_text())
        if all(old.get(k) == v for k, v in shape.items()):
            payload["results"] = {k: v for k, v in old.get("results", {}).items() if k not in modes}
            if "pilot" in old:
                payload["pilot"] = {**old["pilot"], "from": old.get("environment", {}).get("date")}
        else:
            print(f"--merge: {args.merge} has another shape ({ {k: old.get(k) for k in shape} }); starting afresh", flush=True)
    due = time_budget(started, args.time_budget_s, payload["skipped"])

    def prompts(n: int) -> torch.Tensor:
        torch.manual_seed(context)  # every mode gets the same prompts: row i is the same sequence everywhere
        return torch.randint(0, model.config.vocab_size, (n, context), device=DEVICE)

    lsa_rewrite.convert(model, base)
    if "pilot" not in payload:
        payload["pilot"] = pilot(model, prompts(1), base, capacity)
        print("pilot", payload["pilot"], flush=True)
    seconds_per_sequence = payload["pilot"]["forward_and_ingest_s"]
    working_set = payload["pilot"]["working_set_bytes"]

    def record() -> None:
        results = payload["results"]
        dense = results.get("runtime_dense")
        for name, res in results.items():
            if name != "runtime_dense" and "aggregate_tokens_per_s" in res and dense and "aggregate_tokens_per_s" in dense:
                res["vs_runtime_dense"] = compare(res, dense)
        payload["elapsed_s"] = round(time.perf_counter() - started, 1)
        write_json(out_path, payload)

    for index, name in enumerate(modes):
        if not due(name):
            continue
        config = dataclasses.replace(base, **MODES[name])
        release_store(model)
        per_seq = per_sequence_bytes(model, config, capacity)
        free_device = torch.cuda.mem_get_info()[0] if DEVICE == "cuda" else None
        host_available = _meminfo_bytes("MemAvailable")
        sizing = plan(per_seq, free_device=free_device, working_set=working_set, margin=int(args.margin_gb * GB),
                      host_available=host_available, host_fraction=args.host_fraction, max_n=max_n)
        if args.time_budget_s is not None:
            # this mode's prefills get what is left after its own overhead and a minimal run (one
            # sequence) of every later mode
            later = len(modes) - index - 1
            left = args.time_budget_s - (time.perf_counter() - started) - overhead - later * (overhead + seconds_per_sequence)
            sizing["n_by"]["time"] = max(0, int(left // (seconds_per_sequence * (1.2 if per_seq["host_bytes"] else 1.0))))
            if sizing["n_by"]["time"] < sizing["n"]:
                sizing["n"], sizing["bound"] = sizing["n_by"]["time"], "time"
        res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "config": config.to_dict()["_data"], "per_sequence": per_seq, "free_device_bytes_at_start": free_device,
               "host_available_bytes_at_start": host_available, **sizing,
               "weights_to_kv_per_sequence": round(weights / per_seq["device_bytes"], 2), "attempts": []}
        payload["results"][name] = res
        print(name, "plan", sizing, "per sequence", per_seq, flush=True)
        n = sizing["n"]
        if n < 1:
            payload["skipped"].append(f"{name}: not run, N = 0 ({sizing['bound']} bound: {sizing['n_by']})")
        while n >= 1:
            try:
                def prefilled(partial: dict) -> None:
                    res.update(partial, status="prefilled; decode not finished")
                    record()

                measured = run_mode(model, config, prompts(n), steps, capacity, inject_oom=name in inject and not res["attempts"],
                                    on_prefill=prefilled)
            except Exception as exc:  # noqa: BLE001 - recorded; the next mode runs
                res["attempts"].append({"n": n, "error": f"{type(exc).__name__}: {str(exc)[:400]}"})
                if not is_oom(exc):
                    res["attempts"][-1]["traceback"] = traceback.format_exc()[-3000:]
                    res["n"], res["bound"], res["status"] = 0, f"failed at N = {n} ({type(exc).__name__})", "failed"
                    print(name, "failed:", res["attempts"][-1]["error"], flush=True)
                    break
                print(name, "out of memory at N =", n, flush=True)
            else:
                res["attempts"].append({"n": n, "ok": True})
                res.update(measured)
                break
            finally:
                release_store(model)
            retry = int(n * 0.85)
            elapsed = time.perf_counter() - started
            if len(res["attempts"]) >= 2 or retry < 1 or (
                args.time_budget_s is not None and elapsed + overhead + retry * seconds_per_sequence > args.time_budget_s
            ):
                res["n"], res["bound"], res["status"] = 0, f"out of memory at N = {n}", "failed"
                break
            n = retry
            res["n"], res["bound"] = n, f"out of memory at N = {res['attempts'][0]['n']}; retried at 85%"
        if "aggregate_tokens_per_s" in res:
            print(name, {k: res[k] for k in ("n", "bound", "prefill_s_per_sequence", "ms_per_step", "aggregate_tokens_per_s",
                                             "peak_device_bytes", "device_kv_bytes", "host_bytes")}, flush=True)
        record()
    record()
    print(f"\n{'mode':<14} {'N':>4} {'bound':<8} {'prefill s/seq':>13} {'ms/step':>8} {'agg tok/s':>9} {'peak GB':>8} {'KV GB':>7} {'host GB':>8} {'vs dense':>8}")
    for name, res in payload["results"].items():
        if "aggregate_tokens_per_s" not in res:
            print(f"{name:<14} {res.get('n', 0):>4} {str(res.get('bound')):<8} (no measurement: {res.get('attempts')})")
            continue
        vs = res.get("vs_runtime_dense", {}).get("aggregate_tokens_per_s", "")
        print(f"{name:<14} {res['n']:>4} {res['bound']:<8} {res['prefill_s_per_sequence']:>13.2f} {res['ms_per_step']:>8.2f} "
              f"{res['aggregate_tokens_per_s']:>9.1f} {res['peak_device_bytes'] / GB:>8.2f} {res['device_kv_bytes'] / GB:>7.2f} "
              f"{res['host_bytes'] / GB:>8.2f} {str(vs):>8}")
    if payload["skipped"]:
        print("skipped:", payload["skipped"])


if __name__ == "__main__":
    main()
