"""Benchmark: end-to-end decode of a Llama-3-8B-shaped model (random bf16 weights), LSA vs dense HF.

Per prompt length (32K, 128K), batch 1, 256 decode steps, in one run on one GPU:

- dense: transformers ``StaticCache`` sized prompt + steps, prefill eager, decode through
  ``torch.compile(mode="reduce-overhead")`` (HF's own compiled static-cache path);
- LSA: ``lsa_rewrite.convert(model, LSAConfig(budget=0.135))``; prefill is the model's own attention,
  decode runs the Inductor-compiled, CUDA-graph-replayed rewritten step; selection + recall every 64
  steps are included in the timing and also reported per window.

Reports decode tokens/s, peak GPU memory, KV bytes on the GPU (dense cache vs ``footprint()``), and
how many 128K-token sequences' KV fit beside the weights (from the measured per-sequence bytes).
Writes JSON with GPU, versions and date.

    python benchmarks/e2e_decode.py --contexts 32768,131072 --out benchmarks/results/e2e_decode.json
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
from common import DEVICE, environment, sync, write_json  # noqa: E402

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
def dense_run(model, prompt: torch.Tensor, steps: int) -> dict:
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
    step = torch.compile(lambda ids, pos: model(input_ids=ids, position_ids=pos, use_cache=True, **{kw: cache}).logits, mode="reduce-overhead" if DEVICE == "cuda" else None, fullgraph=True)
    pos = torch.full((1, 1), length, device=DEVICE, dtype=torch.long)
    t0 = time.perf_counter()
    for warm in range(3):  # compile + cudagraph record; positions advance as in real decoding
        token = step(token, pos).argmax(-1)
        pos += 1
    sync()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps - 3):
        token = step(token, pos)[:, -1:].argmax(-1)
        pos += 1
    sync()
    decode_s = time.perf_counter() - t0
    kv_bytes = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    result = {
        "prefill_s": round(prefill_s, 2), "compile_s": round(compile_s, 1),
        "ms_per_token": round(decode_s / (steps - 3) * 1e3, 3), "tokens_per_s": round((steps - 3) / decode_s, 2),
        "peak_gpu_gb": peak_gb(), "kv_gpu_bytes": kv_bytes,
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
def lsa_run(model, prompt: torch.Tensor, steps: int, config: LSAConfig) -> dict:
    kw = cache_kw(model)
    length = prompt.shape[1]
    runtime = model.lsa
    runtime.pending_capacity = length + steps + 2 * config.interval + 1
    reset_peak()
    breakdown: dict[str, float] = {}
    with timed_store_methods(breakdown):
        t0 = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        cache = out[runtime.adapter.cache_field]
        token = out.logits[:, -1:].argmax(-1)
        sync()
        prefill_s = time.perf_counter() - t0
    del out
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
    for _ in range(3):
        token = model(input_ids=token, **{kw: cache}).logits[:, -1:].argmax(-1)
    sync()
    compile_s = time.perf_counter() - t0
    from torch._dynamo.utils import counters

    graphs_before = counters["stats"]["unique_graphs"]
    store.select = original_select  # the timed loop runs selections untimed: their copies overlap decode
    selections_before = store.selections
    t0 = time.perf_counter()
    for _ in range(steps - 3):
        token = model(input_ids=token, **{kw: cache}).logits[:, -1:].argmax(-1)
    sync()
    decode_s = time.perf_counter() - t0
    recompiles = counters["stats"]["unique_graphs"] - graphs_before
    timed_selections = store.selections - selections_before
    # the per-window breakdown: a few more selections, each measured on its own (after the timed loop)
    store.select = timed_select
    for _ in range(2 * config.interval):
        token = model(input_ids=token, **{kw: cache}).logits[:, -1:].argmax(-1)
    sync()
    fp = lsa_rewrite.footprint(model)
    runtime.pending_capacity = None
    result = {
        "prefill_s": round(prefill_s, 2), "prefill_breakdown_s": {k: round(v, 2) for k, v in breakdown.items()},
        "compile_s": round(compile_s, 1),
        "ms_per_token": round(decode_s / (steps - 3) * 1e3, 3), "tokens_per_s": round((steps - 3) / decode_s, 2),
        "peak_gpu_gb": peak_gb(),
        "kv_gpu_bytes": fp["resident_kv_bytes"], "footprint": fp, "recall_lag": store.lag,
        "selections_in_timed_loop": timed_selections, "recompiles_in_timed_loop": recompiles,
        "windows": windows,
    }
    runtime.compiled = None  # the store stays: the next run of the same shape takes over its pinned mirror
    del cache, store
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="32768,131072")
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--skip-dense", action="store_true")
    parser.add_argument("--lags", default="4,0", help="recall_lag values run side by side at the largest context (first: all contexts)")
    parser.add_argument("--tiny", action="store_true", help="tiny model: checks the script itself (CPU works)")
    parser.add_argument("--out", default="benchmarks/results/e2e_decode.json")
    args = parser.parse_args()
    env = environment()
    model = build_model(args.layers, tiny=args.tiny)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    payload = {"benchmark": "e2e_decode", "environment": env, "layers": args.layers, "weights_bytes": weights, "steps": args.steps, "results": {}}
    contexts = [int(c) for c in args.contexts.split(",")]
    dense = {}
    if not args.skip_dense:
        for ctx in contexts:
            prompt = torch.randint(0, model.config.vocab_size, (1, ctx), device=DEVICE)
            dense[ctx] = dense_run(model, prompt, args.steps)
            print("dense", ctx, dense[ctx], flush=True)
            payload["results"][f"dense_{ctx}"] = dense[ctx]
            write_json(args.out, payload)
    lags = [int(x) for x in args.lags.split(",")]
    config = LSAConfig(budget=0.135, chunk_size=64, interval=64, sink_tokens=64, recent_tokens=128, recall_lag=lags[0])
    lsa_rewrite.convert(model, config)
    runs = [(ctx, lags[0]) for ctx in contexts] + [(max(contexts), lag) for lag in lags[1:]]
    for ctx, lag in runs:
        # same conversion, another recall lag: the store reads it from the runtime's config
        model.lsa.config = dataclasses.replace(config, recall_lag=lag)
        prompt = torch.randint(0, model.config.vocab_size, (1, ctx), device=DEVICE)
        res = lsa_run(model, prompt, args.steps, model.lsa.config)
        if ctx in dense:
            res["speedup_vs_dense"] = round(res["tokens_per_s"] / dense[ctx]["tokens_per_s"], 2)
            res["kv_gpu_fraction_of_dense"] = round(res["kv_gpu_bytes"] / dense[ctx]["kv_gpu_bytes"], 4)
        print("lsa", ctx, "lag", lag, res, flush=True)
        payload["results"][f"lsa_{ctx}" if lag == lags[0] else f"lsa_{ctx}_lag{lag}"] = res
        write_json(args.out, payload)
    # Concurrency at 128K: how many sequences' KV fit beside the weights (from the bytes measured above).
    total = torch.cuda.get_device_properties(0).total_memory if DEVICE == "cuda" else 0
    headroom = 0.9 * total - weights
    for ctx in contexts:
        if f"lsa_{ctx}" in payload["results"] and f"dense_{ctx}" in payload["results"]:
            lsa_seq = payload["results"][f"lsa_{ctx}"]["kv_gpu_bytes"]
            dense_seq = payload["results"][f"dense_{ctx}"]["kv_gpu_bytes"]
            payload["results"][f"concurrency_{ctx}"] = {
                "dense_sequences": int(headroom // dense_seq), "lsa_sequences": int(headroom // lsa_seq),
                "note": "KV bytes per sequence from this run; 90% of GPU memory minus weights; host mirror not counted",
            }
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
