"""Benchmark: what one selection costs (host time, GPU time, recall), without a model.

A ``KVStore`` of 32 layers with the Llama-3-8B KV layout (8 kv heads, head dim 128, bf16, 64-token
chunks, budget 13.5%, offload) is filled with random prompt KV; then selections run back to back
with the decode step left out, in two regimes:

- ``changing``: a fresh random query per layer before each selection (random weights: nearly the
  whole pool is recalled every window, the worst case);
- ``steady``: the same query every time (after the first, only the chunks the window moved past
  change: the best case, close to what a trained model's overlapping windows give).

Each in two forms, side by side in one run: ``eager`` (the selection queued op by op) and ``graph``
(the library's default on CUDA: captured once as CUDA graphs and replayed, ``runtime/selection_graph.py``).

Per selection: host milliseconds to queue it (``select()`` returns without waiting for the GPU), GPU
milliseconds until its main-stream work is done, and until its side-stream copies are done too;
chunks recalled per layer; the CUDA launches one selection issues, counted by the profiler (kernel
launches, graph launches, copies and memsets through the runtime and driver APIs); for ``graph``, the
host milliseconds of the selection that captured. Writes JSON with the GPU, versions and date. Far
quicker on the device than ``e2e_decode.py`` (no 16 GB model, no compile), so selection-cost changes
can be measured alone.

    python benchmarks/selection.py --contexts 32768,131072 --out benchmarks/results/selection.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEVICE, environment, sync, write_json  # noqa: E402

from lsa_rewrite import LSAConfig  # noqa: E402
from lsa_rewrite.runtime.store import KVStore, LayerSpec  # noqa: E402

def build_store(context: int, layers: int, heads: tuple[int, int, int], budget: float, capture: bool) -> KVStore:
    q_heads, kv_heads, head_dim = heads
    dtype = torch.bfloat16
    specs = [LayerSpec(layer=i, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype) for i in range(layers)]
    config = LSAConfig(budget=budget, chunk_size=64, interval=64, sink_tokens=64, recent_tokens=128, selector="query-aware")
    store = KVStore(specs, config, batch=1, capacity=context + 64 * 40, device=DEVICE, capture_selection=capture)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    for spec in specs:
        k = torch.randn(1, kv_heads, context, head_dim, generator=gen, device=DEVICE, dtype=dtype)
        v = torch.randn(1, kv_heads, context, head_dim, generator=gen, device=DEVICE, dtype=dtype)
        store.ingest(spec.layer, k, v)
    store.finish_prefill(context)
    return store


def run(store: KVStore, regime: str, selections: int, seed: int) -> dict:
    layers = store.chunk_layers
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    fixed = [torch.randn(layer.q_tap.shape, generator=gen, device=DEVICE).to(layer.q_tap.dtype) for layer in layers]
    host, main, total, recalled = [], [], [], []
    captured, capture_ms = store.selection_captured, None
    for i in range(selections + 1):
        for layer, q in zip(layers, fixed):
            layer.q_tap.copy_(q if regime == "steady" else torch.randn(q.shape, generator=gen, device=DEVICE).to(q.dtype))
        store.length += store.config.interval  # as if a window was decoded (its tokens are not written)
        store.steps = store.next_selection
        before = store.recalled_chunks
        sync()
        t0 = time.perf_counter()
        store.before_step()  # runs the selection (and installs a lag-0 swap; lag > 0 waits for later steps)
        t1 = time.perf_counter()
        if DEVICE == "cuda":
            torch.cuda.current_stream().synchronize()
        t2 = time.perf_counter()
        store.synchronize()
        t3 = time.perf_counter()
        store.steps += store.lag  # the swap step: install the recalled chunks before the next selection
        if store.lag:
            store.before_step()
        if not captured and store.selection_captured:
            captured, capture_ms = True, (t1 - t0) * 1e3  # this selection captured the graphs (and replayed them)
            continue
        if i == 0:
            continue  # the first selection of a regime moves from the previous regime's set
        host.append((t1 - t0) * 1e3)
        main.append((t2 - t0) * 1e3)
        total.append((t3 - t0) * 1e3)
        recalled.append((store.recalled_chunks - before) / len(layers))
    med = statistics.median
    out = {
        "host_ms": round(med(host), 2), "main_stream_done_ms": round(med(main), 2), "copies_done_ms": round(med(total), 2),
        "recalled_chunks_per_layer": round(med(recalled), 1), "slots_per_layer": store.slots, "selections": len(host),
        "captured": store.selection_captured, "launches": count_launches(store),
    }
    if capture_ms is not None:
        out["capture_selection_host_ms"] = round(capture_ms, 1)
    return out


LAUNCH_APIS = ("LaunchKernel", "GraphLaunch", "Memcpy", "Memset")


def count_launches(store: KVStore) -> dict[str, int]:
    """CUDA API calls that put work on a stream during one selection (and its swap), by API name."""
    if DEVICE != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile

    store.length += store.config.interval
    store.steps = store.next_selection
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        store.before_step()
        store.steps += store.lag
        if store.lag:
            store.before_step()
        sync()
    counts: dict[str, int] = {}
    for evt in prof.events():
        if evt.name.startswith("cu") and any(api in evt.name for api in LAUNCH_APIS):
            counts[evt.name] = counts.get(evt.name, 0) + 1
    counts["total"] = sum(counts.values())
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="32768,131072")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", default="32,8,128", help="q heads, kv heads, head dim")
    parser.add_argument("--budget", type=float, default=0.135)
    parser.add_argument("--selections", type=int, default=8)
    parser.add_argument("--variants", default="eager,graph", help="eager (op by op), graph (captured CUDA graphs), or both")
    parser.add_argument("--out", default="benchmarks/results/selection.json")
    args = parser.parse_args()
    heads = tuple(int(x) for x in args.heads.split(","))
    payload = {"benchmark": "selection", "environment": environment(), "layers": args.layers, "heads": heads,
               "budget": args.budget, "device": DEVICE, "results": {}}
    variants = args.variants.split(",")
    for context in (int(c) for c in args.contexts.split(",")):
        for variant in variants:
            t0 = time.perf_counter()
            store = build_store(context, args.layers, heads, args.budget, capture=variant == "graph")
            build_s = time.perf_counter() - t0
            for regime in ("changing", "steady"):
                res = run(store, regime, args.selections, seed=context)
                res["store_build_s"] = round(build_s, 1)
                payload["results"][f"{context}_{regime}_{variant}"] = res
                print(context, regime, variant, res, flush=True)
                write_json(args.out, payload)
            del store
            if DEVICE == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
