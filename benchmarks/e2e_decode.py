"""Benchmark: end-to-end decode of a Llama-3-8B-shaped model (random bf16 weights): LSA against two dense paths.

Per prompt length (default 128K, then 32K), batch 1, 256 decode steps, in one run on one GPU:

- ``hf_static``: transformers ``StaticCache`` sized prompt + steps, prefill eager, decode through
  ``torch.compile(mode="reduce-overhead")`` (HF's own compiled static-cache path);
- ``runtime_dense``: our runtime in ``LSAConfig(mode="dense")``: the same conversion, rewritten graph,
  Triton decode-attention kernel, Inductor compile and CUDA-graph replay as LSA, with every chunk
  resident (no selection, no mirror): the strongest dense baseline this repo has;
- ``lsa``: ``LSAConfig(budget=0.135)``; decode runs the Inductor-compiled, CUDA-graph-replayed
  rewritten step; selection + recall every 64 steps are included in the timing and also reported per
  window (``recall_lag`` 4; at the largest context also ``lsa_lag0``, the copies waited for).

Per path: ms/token, tokens/s, peak GPU memory (the whole path, prefill included, and the decode loop
alone), KV bytes on the device, and the bandwidth floor ``(weights + device KV bytes) / 4.2 TB/s``
(the measured H200 copy bandwidth) with how far the path is from it. Per context, the ratios of LSA
against each dense path, side by side. The runtime paths share one conversion: ``mode`` only changes
how the store is sized (it is read from ``model.lsa.config`` at each prefill). Writes JSON with GPU,
versions and date after every path, so a run stopped early keeps what it measured.

    python benchmarks/e2e_decode.py --contexts 131072,32768 --out benchmarks/results/e2e_decode.json
    python benchmarks/e2e_decode.py --tiny      # the script itself on a tiny model, CPU, seconds
    python benchmarks/e2e_decode.py --contexts 131072 --paths runtime_dense,lsa --lags 4 --also-prefill-chunk 16384
                                                # prefill in 16K pieces against the one-forward prefills (item 3's 1.1x)
    python benchmarks/e2e_decode.py --contexts 1048576 --paths lsa --lags 4 --prefill-chunk 65536 --mirror fp8 --layers 8
                                                # a million tokens, prefilled 64K at a time (issue 13 item 3)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import COPY_BANDWIDTH, DEVICE, environment, sync, time_budget, timed_prefill, write_json  # noqa: E402

import lsa_rewrite  # noqa: E402
from lsa_rewrite import LSAConfig  # noqa: E402

def peak_gb() -> float:
    return round(torch.cuda.max_memory_allocated() / 1e9, 2) if DEVICE == "cuda" else 0.0


def reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def llama3_8b_config(layers: int, *, tiny: bool = False):
    from transformers import LlamaConfig

    if tiny:  # a script check on the CPU, not a measurement
        return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=262144)
    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=262144, rope_theta=500000.0,
    )


def build_model(layers: int, *, tiny: bool = False):
    from transformers import LlamaForCausalLM

    config = llama3_8b_config(layers, tiny=tiny)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval()


def cache_kw(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def hf_static_run(model, prompt: torch.Tensor, steps: int) -> dict:
    """HF's compiled static-cache decode (``torch.compile`` reduce-overhead on CUDA; Dynamo with the
    eager backend on the CPU, which checks the script, not speed)."""
    from transformers import StaticCache

    kw = cache_kw(model)
    length = prompt.shape[1]
    reset_peak()
    cache = StaticCache(config=model.config, max_cache_len=length + steps)
    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{kw: cache})
    token = out.logits[:, -1:].argmax(-1)
    sync()
    prefill_s = time.perf_counter() - t0
    del out
    compile_kw = {"mode": "reduce-overhead"} if DEVICE == "cuda" else {"backend": "eager"}
    step = torch.compile(lambda ids, pos: model(input_ids=ids, position_ids=pos, use_cache=True, **{kw: cache}).logits, fullgraph=True, **compile_kw)
    pos = torch.full((1, 1), length, device=DEVICE, dtype=torch.long)
    t0 = time.perf_counter()
    for warm in range(3):  # compile + cudagraph record; positions advance as in real decoding
        token = step(token, pos).argmax(-1)
        pos += 1
    sync()
    compile_s = time.perf_counter() - t0
    setup_peak = peak_gb()
    reset_peak()
    t0 = time.perf_counter()
    for _ in range(steps - 3):
        token = step(token, pos)[:, -1:].argmax(-1)
        pos += 1
    sync()
    decode_s = time.perf_counter() - t0
    decode_peak = peak_gb()
    kv_bytes = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    result = {
        "path": "HF StaticCache (prompt + steps) + torch.compile(mode='reduce-overhead'), SDPA over the whole static cache",
        "prefill_s": round(prefill_s, 2), "compile_s": round(compile_s, 1),
        "ms_per_token": round(decode_s / (steps - 3) * 1e3, 3), "tokens_per_s": round((steps - 3) / decode_s, 2),
        "peak_gpu_gb": max(setup_peak, decode_peak), "decode_peak_gpu_gb": decode_peak, "kv_gpu_bytes": kv_bytes,
    }
    del cache, step
    torch._dynamo.reset()
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return result


@contextlib.contextmanager
def timed_store_methods(into: dict[str, float]):
    """Time the store's prefill-side methods (GPU synced around each): where LSA prefill time goes.

    ``store_init``: allocation (pool, tables, the pinned mirror); ``ingest``: chunk bounds + copies
    into the mirror, summed over layers; ``finish_prefill``: first placement; ``probe``: the decode
    step on the last prompt token (its first call compiles and captures the step) + first selection.
    """
    from lsa_rewrite.runtime.store import KVStore

    names = {"__init__": "store_init", "ingest": "ingest", "finish_prefill": "finish_prefill", "probe": "probe"}
    originals = {name: getattr(KVStore, name) for name in names}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            sync()
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                into[names[name]] = into.get(names[name], 0.0) + time.perf_counter() - t
        return wrapper

    for name, fn in originals.items():
        setattr(KVStore, name, timed(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(KVStore, name, fn)


@torch.no_grad()
def runtime_run(model, prompt: torch.Tensor, steps: int, config: LSAConfig) -> dict:
    """Our runtime with ``config`` (``mode="dense"``: every chunk resident; else LSA) on a converted model."""
    kw = cache_kw(model)
    length = prompt.shape[1]
    runtime = model.lsa
    runtime.config = config  # same conversion: the next prefill sizes its store from this config
    runtime.pending_capacity = length + steps + 2 * config.interval + 1
    previous = runtime.store
    if previous is not None and (previous.all_resident or config.mode == "dense" or previous.capacity != runtime.pending_capacity):
        # Nothing of it will be reused (only a mirrored store of the same shape hands its mirror on), but
        # the session keeps its last store until the next prefill replaces it, so both would sit on the
        # device during this prefill and inflate its peak: let it go first.
        previous.synchronize()
        runtime.store = None
    del previous
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    reset_peak()
    breakdown: dict[str, float] = {}
    with timed_store_methods(breakdown):
        cache, token, prefill_s = timed_prefill(model, prompt)
    store = cache.store
    windows: list[dict] = []
    original_select = store.select
    layers = max(1, len(store.chunk_layers))

    def timed_select(*args, **kwargs):
        # host: the selection's own time, GPU idle before it (its one transfer waits for nothing);
        # wall: until its recall copies are done too (they normally overlap the next decode steps)
        sync()
        recalled = store.recalled_chunks
        s = time.perf_counter()
        original_select(*args, **kwargs)
        host = time.perf_counter() - s
        store.synchronize()
        sync()
        wall = time.perf_counter() - s
        windows.append({"host_ms": round(host * 1e3, 2), "wall_ms": round(wall * 1e3, 2),
                        "recalled_chunks_per_layer": round((store.recalled_chunks - recalled) / layers / store.batch, 1)})

    store.select = timed_select
    t0 = time.perf_counter()
    for _ in range(3):  # dense mode compiles and captures here (LSA did in the prefill's probe)
        token = model(input_ids=token, **{kw: cache}).logits[:, -1:].argmax(-1)
    sync()
    compile_s = time.perf_counter() - t0
    from torch._dynamo.utils import counters

    setup_peak = peak_gb()
    reset_peak()
    graphs_before = counters["stats"]["unique_graphs"]
    store.select = original_select  # the timed loop runs selections untimed: their copies overlap decode
    selections_before = store.selections
    t0 = time.perf_counter()
    for _ in range(steps - 3):
        token = model(input_ids=token, **{kw: cache}).logits[:, -1:].argmax(-1)
    sync()
    decode_s = time.perf_counter() - t0
    decode_peak = peak_gb()
    recompiles = counters["stats"]["unique_graphs"] - graphs_before
    timed_selections = store.selections - selections_before
    if not store.all_resident:
        # the per-window breakdown: a few more selections, each measured on its own (after the timed loop)
        store.select = timed_select
        for _ in range(2 * config.interval):
            token = model(input_ids=token, **{kw: cache}).logits[:, -1:].argmax(-1)
        sync()
    fp = lsa_rewrite.footprint(model)
    runtime.pending_capacity = None
    result = {
        "path": (f"lsa-rewrite runtime, mode={config.mode!r}" + ("" if config.mode == "dense" else f", budget {config.budget}, recall_lag {config.lag}"))
        + ": rewritten step, Triton decode attention, Inductor + CUDA graph",
        "prefill_s": round(prefill_s, 2), "prefill_breakdown_s": {k: round(v, 2) for k, v in breakdown.items()},
        "compile_s": round(compile_s, 1),
        "ms_per_token": round(decode_s / (steps - 3) * 1e3, 3), "tokens_per_s": round((steps - 3) / decode_s, 2),
        "peak_gpu_gb": max(setup_peak, decode_peak), "decode_peak_gpu_gb": decode_peak,
        "kv_gpu_bytes": fp["resident_kv_bytes"], "footprint": fp, "recall_lag": None if store.all_resident else store.lag,
        "selections_in_timed_loop": timed_selections, "recompiles_in_timed_loop": recompiles,
        "windows": windows,
    }
    runtime.compiled = None  # the store stays: the next run of the same shape takes over its pinned mirror
    del cache, store
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return result


def add_floor(res: dict, weights: int) -> None:
    """The bandwidth floor of one decode step: the weights and the device KV read once at 4.2 TB/s."""
    res["floor_bytes"] = weights + res["kv_gpu_bytes"]
    floor_ms = res["floor_bytes"] / COPY_BANDWIDTH * 1e3
    res["floor_ms"] = round(floor_ms, 3)
    res["x_floor"] = round(res["ms_per_token"] / floor_ms, 2)
    res["ms_over_floor"] = round(res["ms_per_token"] - floor_ms, 3)


def compare(lsa: dict, dense: dict) -> dict:
    """LSA against one dense path of the same run and context (> 1: LSA better)."""
    return {
        "speedup": round(dense["ms_per_token"] / lsa["ms_per_token"], 2),
        "kv_gpu_fraction": round(lsa["kv_gpu_bytes"] / dense["kv_gpu_bytes"], 4),
        "peak_gpu_ratio": round(lsa["peak_gpu_gb"] / dense["peak_gpu_gb"], 3) if dense["peak_gpu_gb"] else None,
        "decode_peak_gpu_ratio": round(lsa["decode_peak_gpu_gb"] / dense["decode_peak_gpu_gb"], 3) if dense["decode_peak_gpu_gb"] else None,
        "floor_ratio": round(dense["floor_bytes"] / lsa["floor_bytes"], 2),
        "prefill_time_ratio": round(lsa["prefill_s"] / dense["prefill_s"], 3) if lsa.get("prefill_s") and dense.get("prefill_s") else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default=None, help="prompt lengths, most important first (default 131072,32768; --tiny: 8192)")
    parser.add_argument("--steps", type=int, default=None, help="decode steps per path (default 256; --tiny: 160)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 32, the 8B shape; --tiny: 2)")
    parser.add_argument("--paths", default="hf_static,runtime_dense,lsa", help="which of hf_static, runtime_dense, lsa to run")
    parser.add_argument("--lags", default="4,0", help="recall_lag values run side by side at the largest context (first: all contexts)")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="skip the runs that would start after this many seconds (one device call is 10 minutes)")
    parser.add_argument("--prefill-chunk", type=int, default=None,
                        help="LSAConfig.prefill_chunk for the runtime paths: prompt tokens per prefill forward (a multiple of 64); "
                             "default: the prompt in one forward")
    parser.add_argument("--also-prefill-chunk", type=int, default=None,
                        help="also run LSA with this prefill_chunk at every context (path lsa_chunkT), beside the one-forward "
                             "prefill: prefill time against the dense prefill in one run")
    parser.add_argument("--recall-lag-max", type=int, default=None,
                        help="LSAConfig.recall_lag_max of the LSA paths (recalled chunks join once their copies are done, by this step)")
    parser.add_argument("--mirror", default="exact", help="LSAConfig.mirror of the LSA paths: exact or fp8 (a 1M-token exact mirror "
                                                           "of the 8B shape, 131 GB, exceeds a 128 GB host)")
    parser.add_argument("--tiny", action="store_true", help="tiny model: checks the script itself on the CPU in seconds (not a measurement)")
    parser.add_argument("--out", default="benchmarks/results/e2e_decode.json")
    args = parser.parse_args()
    started = time.perf_counter()
    contexts = [int(c) for c in (args.contexts or ("8192" if args.tiny else "131072,32768")).split(",")]
    steps = args.steps or (160 if args.tiny else 256)
    layers = args.layers or (2 if args.tiny else 32)
    paths = args.paths.split(",")
    unknown = sorted(set(paths) - {"hf_static", "runtime_dense", "lsa"})
    if unknown:
        raise SystemExit(f"unknown --paths {unknown}; choose from hf_static, runtime_dense, lsa")
    lags = [int(x) for x in args.lags.split(",")]
    env = environment()
    model = build_model(layers, tiny=args.tiny)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    lsa_config = LSAConfig(budget=0.135, chunk_size=64, interval=64, sink_tokens=64, recent_tokens=128, recall_lag=lags[0],
                           prefill_chunk=args.prefill_chunk, mirror=args.mirror, recall_lag_max=args.recall_lag_max)
    payload = {
        "benchmark": "e2e_decode", "environment": env, "tiny": args.tiny,
        "model": f"Llama-3-8B shape, random bf16 weights, {layers} layers" + (" (tiny: hidden 64, CPU check)" if args.tiny else ""),
        "layers": layers, "weights_bytes": weights, "batch": 1, "steps": steps, "lsa_config": lsa_config.to_dict(),
        "floor": (f"(weights_bytes + kv_gpu_bytes) / {COPY_BANDWIDTH / 1e12} TB/s (H200 device-to-device copy bandwidth measured here); "
                  f"the input embedding ({embedding.numel() * embedding.element_size()} bytes) is gathered, not read, so the "
                  f"true floor is {embedding.numel() * embedding.element_size() / COPY_BANDWIDTH * 1e3:.3f} ms lower"),
        "skipped": [], "results": {},
    }

    due = time_budget(started, args.time_budget_s, payload["skipped"])

    def record(ctx: int, name: str, res: dict) -> None:
        add_floor(res, weights)
        row = payload["results"].setdefault(str(ctx), {})
        row[name] = res
        for dense in ("hf_static", "runtime_dense"):
            for lsa_name in [k for k in row if k.startswith("lsa")]:
                if dense in row:
                    row.setdefault("vs", {})[f"{lsa_name}_vs_{dense}"] = compare(row[lsa_name], row[dense])
        if "hf_static" in row and "runtime_dense" in row:
            row.setdefault("vs", {})["runtime_dense_vs_hf_static"] = compare(row["runtime_dense"], row["hf_static"])
        brief = {k: v for k, v in res.items() if k not in ("windows", "footprint", "path")}
        print(name, ctx, brief, flush=True)
        payload["elapsed_s"] = round(time.perf_counter() - started, 1)
        write_json(args.out, payload)

    def prompt_of(ctx: int) -> torch.Tensor:
        torch.manual_seed(ctx)  # the same prompt for every path at this context
        return torch.randint(0, model.config.vocab_size, (1, ctx), device=DEVICE)

    if "hf_static" in paths:
        for ctx in contexts:
            if due(f"hf_static {ctx}"):
                record(ctx, "hf_static", hf_static_run(model, prompt_of(ctx), steps))
    lsa_rewrite.convert(model, lsa_config)
    runs = []  # (context, name, config): the largest context's three-way first, then its lag 0, then the rest
    for i, ctx in enumerate(contexts):
        if "runtime_dense" in paths:
            runs.append((ctx, "runtime_dense", dataclasses.replace(lsa_config, mode="dense")))
        if "lsa" in paths:
            runs.append((ctx, "lsa", lsa_config))
            if args.also_prefill_chunk:
                runs.append((ctx, f"lsa_chunk{args.also_prefill_chunk}", dataclasses.replace(lsa_config, prefill_chunk=args.also_prefill_chunk)))
            if i == 0:
                runs += [(ctx, f"lsa_lag{lag}", dataclasses.replace(lsa_config, recall_lag=lag)) for lag in lags[1:]]
    for ctx, name, config in runs:
        if due(f"{name} {ctx}"):
            record(ctx, name, runtime_run(model, prompt_of(ctx), steps, config))
    # How many sequences' KV fit beside the weights (from the bytes measured above; not allocated).
    total = torch.cuda.get_device_properties(0).total_memory if DEVICE == "cuda" else 0
    headroom = 0.9 * total - weights
    for ctx in contexts:
        row = payload["results"].get(str(ctx), {})
        if headroom > 0 and row:
            row["concurrency"] = {name: int(headroom // row[name]["kv_gpu_bytes"]) for name in ("hf_static", "runtime_dense", "lsa") if name in row}
            row["concurrency"]["note"] = "sequences whose device KV fits in 90% of GPU memory minus weights, from this run's bytes; host mirror not counted"
    payload["elapsed_s"] = round(time.perf_counter() - started, 1)
    write_json(args.out, payload)
    print_table(payload)


def print_table(payload: dict) -> None:
    print(f"\n{'ctx':>7} {'path':<14} {'ms/tok':>8} {'tok/s':>8} {'floor':>7} {'x floor':>7} {'peak GB':>8} {'KV GB':>7}")
    for ctx, row in payload["results"].items():
        for name, res in row.items():
            if isinstance(res, dict) and "ms_per_token" in res:
                print(f"{ctx:>7} {name:<14} {res['ms_per_token']:>8.3f} {res['tokens_per_s']:>8.1f} {res['floor_ms']:>7.3f} "
                      f"{res['x_floor']:>7.2f} {res['peak_gpu_gb']:>8.2f} {res['kv_gpu_bytes'] / 1e9:>7.3f}")
        for name, v in row.get("vs", {}).items():
            print(f"{ctx:>7} {name}: speedup {v['speedup']}x, KV {v['kv_gpu_fraction']:.4f}, floors {v['floor_ratio']}x")
    if payload["skipped"]:
        print("skipped:", payload["skipped"])


if __name__ == "__main__":
    main()
