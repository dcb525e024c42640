"""Benchmark: new prompt lengths reuse the compiled decode step, and a 10,000-step soak (issue 13, item 5).

A Llama-3.2-1B-shaped model with random bf16 weights (16 layers, hidden 2048, 32 query / 8 KV heads of
64), batch 1, driven through ``generate()`` as a user would. Each path is its own conversion (or the
plain model), run one after the other in one process:

- ``lsa``: ``LSAConfig(budget=0.135)``, the Inductor-compiled, CUDA-graph-replayed rewritten step;
- ``runtime_dense``: the same runtime in ``LSAConfig(mode="dense")`` (every chunk resident, same kernels,
  same compile and CUDA graph): the strong dense baseline;
- ``hf``: the plain model, ``generate(cache_implementation="static")``: transformers compiles the
  forward itself on CUDA (``CompileConfig``: reduce-overhead, ``dynamic=None``) and sizes the static
  cache prompt + new tokens per generation.

**Lengths.** Per path, three generations of other prompt lengths and ``max_new_tokens`` (so three
store capacities / static cache sizes). Per generation: time to the first token (prefill; for LSA
also the probe step, which compiles the step in the first generation), to the second token (the first
decode step: where the dense runtime and HF compile), decode ms/token after that, Dynamo's compile
seconds and graphs compiled during the generation, and for the runtime paths the compiled step's
setup (``CompiledStep.setup_s``: compile when the module is new, warm-up, CUDA-graph capture).
Inductor's caches are disabled (``--warm-caches`` keeps them), so each path's first compile is a
real one, not a hit on the previous path's identical graph.

**Soak.** ``--soak-steps`` decode tokens (default 10,000) for LSA (``--soak-paths``), as
``--soak-generations`` generations whose prompt lengths alternate between two values unlike the
lengths phase's. Every ``--sample-every`` tokens: device memory allocated and reserved, process RSS,
Dynamo graphs compiled. Checks (the JSON's ``soak.<path>.checks``; exit status 1 when one fails, after
the JSON is written): no graph compiled during the soak; within each generation, device memory
allocated grows by at most ``--device-slack-mib`` from the first sample to the last (generate()'s
growing token tensor is a few bytes per token); generations of the same prompt length peak at the
same device memory (within the slack), and their RSS at the same token differs by at most
``--rss-slack-mib``.

Writes JSON with GPU, versions and date after each path and phase, so a run stopped early keeps what
it measured.

    python benchmarks/recompile_soak.py --out benchmarks/results/recompile_soak.json     # H200: ~5 minutes
    python benchmarks/recompile_soak.py --tiny      # the script on the CPU in seconds, to /tmp/recompile_soak_tiny.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEVICE, environment, sync, time_budget, write_json  # noqa: E402

import lsa_rewrite  # noqa: E402
from lsa_rewrite import LSAConfig  # noqa: E402

MIB = 1 << 20
PATHS = ("lsa", "runtime_dense", "hf")


def llama_1b_config(*, tiny: bool = False):
    from transformers import LlamaConfig

    if tiny:  # a script check on the CPU, not a measurement
        return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=65536)
    return LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
    )


def build_model(*, tiny: bool = False):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM._from_config(llama_1b_config(tiny=tiny), dtype=torch.bfloat16, attn_implementation="sdpa")
    model.generation_config.eos_token_id = None  # random weights: every generation runs its full length
    model.generation_config.pad_token_id = 0
    return model.eval()


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; elsewhere the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_bytes() -> tuple[int, int]:
    if DEVICE != "cuda":
        return 0, 0
    return torch.cuda.memory_allocated(), torch.cuda.memory_reserved()


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def dynamo_compile_s() -> float:
    """Seconds Dynamo has spent compiling frames in this process so far (tracing + backend)."""
    from torch._dynamo.utils import compilation_time_metrics

    return float(sum(compilation_time_metrics.get("_compile.compile_inner", ())))


class Clock:
    """A ``generate()`` streamer: timestamps each new token (the first ``put`` is the prompt) after the
    device is done with it, and calls ``every(k)`` on each ``sample_every``-th token."""

    def __init__(self, sample_every: int = 0, every=None):
        self.times: list[float] = []
        self.calls = 0
        self.sample_every, self.every = sample_every, every

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 1:
            return
        sync()  # generate() reads the token on the host for its stopping check anyway
        self.times.append(time.perf_counter())
        if self.every is not None and (len(self.times) == 1 or len(self.times) % self.sample_every == 0):
            self.every(len(self.times))

    def end(self) -> None:
        pass


def prompt_of(length: int, vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(length)
    return torch.randint(3, vocab, (1, length), generator=generator).to(DEVICE)


@torch.no_grad()
def generate(model, path: str, length: int, new: int, clock: Clock) -> float:
    ids = prompt_of(length, model.config.vocab_size)
    kwargs = {"cache_implementation": "static"} if path == "hf" else {}
    sync()
    t0 = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False, streamer=clock, **kwargs)
    return t0


def store_row(model) -> dict | None:
    session = getattr(model, "lsa", None)
    if session is None or session.store is None:
        return None
    store, compiled = session.store, session.compiled
    return {
        "capacity_tokens": store.capacity, "chunks_per_sequence": store.num_chunks, "slots_per_sequence": store.slots,
        "all_resident": store.all_resident, "selections": store.selections,
        "kv_gpu_bytes": lsa_rewrite.footprint(model)["resident_kv_bytes"],
        "compiled_step_setup_s": None if compiled is None or compiled.setup_s is None else round(compiled.setup_s, 3),
        "compiled_modules": len(session.compiled_modules),
    }


def lengths_run(model, path: str, lengths: list[tuple[int, int]]) -> list[dict]:
    """Three generations of other prompt lengths and max_new_tokens, each timed token by token."""
    rows = []
    for length, new in lengths:
        graphs, compile_s = graphs_compiled(), dynamo_compile_s()
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
        clock = Clock()
        t0 = generate(model, path, length, new, clock)
        t = clock.times
        after = dynamo_compile_s()
        row = {
            "prompt_tokens": length, "new_tokens": new, "wall_s": round(t[-1] - t0, 3),
            "ttft_s": round(t[0] - t0, 3), "second_token_s": round(t[1] - t[0], 3),
            "decode_ms_per_token": round((t[-1] - t[1]) / (len(t) - 2) * 1e3, 3),
            "graphs_compiled": graphs_compiled() - graphs,
            "dynamo_compile_s": round(after - compile_s, 2),
            "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3) if DEVICE == "cuda" else None,
            "store": store_row(model),
        }
        rows.append(row)
        print(path, {k: v for k, v in row.items() if k != "store"}, row["store"] and {k: row["store"][k] for k in ("capacity_tokens", "slots_per_sequence", "compiled_step_setup_s")}, flush=True)
    return rows


def soak_run(model, path: str, *, steps: int, generations: int, prompts: list[int], sample_every: int,
             device_slack: int, rss_slack: int) -> dict:
    """``steps`` decode tokens over ``generations`` generations; memory and compiles sampled as they go."""
    per = steps // generations
    samples: list[dict] = []
    gens: list[dict] = []
    graphs_at_start = graphs_compiled()
    started = time.perf_counter()
    for g in range(generations):
        length = prompts[g % len(prompts)]
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()

        def sample(token: int, g=g, length=length) -> None:
            allocated, reserved = device_bytes()
            samples.append({"generation": g, "prompt_tokens": length, "token": token, "allocated": allocated, "reserved": reserved,
                            "rss": rss_bytes(), "graphs_compiled": graphs_compiled() - graphs_at_start,
                            "s": round(time.perf_counter() - started, 2)})

        clock = Clock(sample_every, sample)
        t0 = generate(model, path, length, per, clock)
        t = clock.times
        gens.append({"generation": g, "prompt_tokens": length, "new_tokens": per, "wall_s": round(t[-1] - t0, 2),
                     "decode_ms_per_token": round((t[-1] - t[0]) / (len(t) - 1) * 1e3, 3),
                     "peak_allocated": torch.cuda.max_memory_allocated() if DEVICE == "cuda" else 0, "store": store_row(model)})
        print(path, "soak", gens[-1]["generation"], {k: v for k, v in gens[-1].items() if k != "store"}, flush=True)
    return {"steps": per * generations, "generations": gens, "samples": samples,
            **soak_checks(gens, samples, device_slack=device_slack, rss_slack=rss_slack)}


def soak_checks(gens: list[dict], samples: list[dict], *, device_slack: int, rss_slack: int, warmup: int = 1) -> dict:
    """No compiles; no device growth within a generation; across generations of the same prompt length, no
    growth of peak/sampled device memory or RSS. The first ``warmup`` generations are left out of the
    across-generation check: they make one-time allocations (on the H200 the warm-up stream's cuBLAS
    workspace, 32 MiB, and Inductor's buffers: run 48 peaked 41 MB lower in generation 0 than in 2 and 4,
    which were within 0.5 MB of each other)."""
    checks = {}
    checks["no_compiles"] = {"graphs_compiled": samples[-1]["graphs_compiled"] if samples else 0}
    checks["no_compiles"]["ok"] = checks["no_compiles"]["graphs_compiled"] == 0
    within = []
    for g in gens:
        mine = [s for s in samples if s["generation"] == g["generation"]]
        if len(mine) >= 2:
            within.append({"generation": g["generation"], "allocated_growth": mine[-1]["allocated"] - mine[0]["allocated"],
                           "rss_growth": mine[-1]["rss"] - mine[0]["rss"]})
    checks["within_generation"] = {"rows": within, "slack_bytes": device_slack,
                                   "ok": all(r["allocated_growth"] <= device_slack for r in within)}
    across = []
    for length in sorted({g["prompt_tokens"] for g in gens}):
        same = [g for g in gens if g["prompt_tokens"] == length and g["generation"] >= warmup]
        if len(same) < 2:
            continue
        first, last = same[0], same[-1]
        at = {s["token"]: s for s in samples if s["generation"] == first["generation"]}
        pairs = [(at[s["token"]], s) for s in samples if s["generation"] == last["generation"] and s["token"] in at]
        across.append({
            "prompt_tokens": length, "generations": [first["generation"], last["generation"]],
            "peak_allocated_growth": last["peak_allocated"] - first["peak_allocated"],
            "allocated_growth_max": max((b["allocated"] - a["allocated"] for a, b in pairs), default=0),
            "rss_growth_max": max((b["rss"] - a["rss"] for a, b in pairs), default=0),
        })
    checks["across_generations"] = {
        "rows": across, "device_slack_bytes": device_slack, "rss_slack_bytes": rss_slack, "warmup_generations": warmup,
        "ok": all(r["peak_allocated_growth"] <= device_slack and r["allocated_growth_max"] <= device_slack
                  and r["rss_growth_max"] <= rss_slack for r in across),
    }
    return {"checks": checks, "ok": all(c["ok"] for c in checks.values())}


def convert_for(base, path: str, config: LSAConfig):
    if path == "hf":
        return copy.deepcopy(base)
    return lsa_rewrite.convert(copy.deepcopy(base), config if path == "lsa" else dataclasses.replace(config, mode="dense"))


def quiesce(model) -> None:
    """Wait for a converted model's outstanding copies, before it is dropped."""
    session = getattr(model, "lsa", None)
    if session is not None and session.store is not None:
        session.store.synchronize()


def free_memory() -> None:
    """Collect what the dropped models held (Dynamo's caches stay: the kept models' steps live there)."""
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", default=",".join(PATHS), help=f"which of {', '.join(PATHS)} run the lengths phase")
    parser.add_argument("--lengths", default=None, help="PROMPT:NEW,... for the lengths phase (default 30000:128,20000:96,25000:160; --tiny 700:24,430:16,560:40)")
    parser.add_argument("--soak-paths", default="lsa", help="which paths run the soak (empty: none)")
    parser.add_argument("--soak-steps", type=int, default=None, help="decode tokens in the soak (default 10000; --tiny 400)")
    parser.add_argument("--soak-generations", type=int, default=5, help="the soak's tokens are split over this many generations")
    parser.add_argument("--soak-prompts", default=None, help="prompt lengths the soak alternates between (default 24576,16384; --tiny 600,450)")
    parser.add_argument("--sample-every", type=int, default=None, help="tokens between memory samples (default 250; --tiny 20)")
    parser.add_argument("--device-slack-mib", type=float, default=1.0, help="device memory growth tolerated by the soak's checks")
    parser.add_argument("--rss-slack-mib", type=float, default=64.0, help="process RSS growth tolerated between generations of one prompt length")
    parser.add_argument("--compile", default=None,
                        help="LSAConfig.compile for the runtime paths (default True: Inductor + CUDA graph on CUDA; --tiny: aot_eager, "
                             "so the CPU check compiles too)")
    parser.add_argument("--warm-caches", action="store_true", help="keep Inductor's caches (default: off, so every path compiles for real)")
    parser.add_argument("--time-budget-s", type=float, default=None, help="skip the runs that would start after this many seconds")
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU: checks the script in seconds (not a measurement)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/recompile_soak.json; --tiny /tmp/recompile_soak_tiny.json)")
    args = parser.parse_args()
    started = time.perf_counter()
    args.out = args.out or ("/tmp/recompile_soak_tiny.json" if args.tiny else "benchmarks/results/recompile_soak.json")
    if args.tiny and Path(args.out).resolve().is_relative_to(Path(__file__).resolve().parent / "results"):
        raise SystemExit("--tiny is a script check, not a measurement: write it outside benchmarks/results (e.g. --out /tmp/recompile_soak_tiny.json)")
    paths = [p for p in args.paths.split(",") if p]
    soak_paths = [p for p in args.soak_paths.split(",") if p]
    unknown = sorted(set(paths + soak_paths) - set(PATHS))
    if unknown:
        raise SystemExit(f"unknown path(s) {unknown}; choose from {', '.join(PATHS)}")
    lengths = [tuple(int(x) for x in item.split(":")) for item in (args.lengths or ("700:24,430:16,560:40" if args.tiny else "30000:128,20000:96,25000:160")).split(",")]
    soak_steps = args.soak_steps or (400 if args.tiny else 10000)
    soak_prompts = [int(x) for x in (args.soak_prompts or ("600,450" if args.tiny else "24576,16384")).split(",")]
    sample_every = args.sample_every or (20 if args.tiny else 250)
    compile_choice = args.compile or ("aot_eager" if args.tiny else "True")
    compile_value = {"True": True, "False": False}.get(compile_choice, compile_choice)
    if not args.warm_caches:
        import torch._inductor.config

        torch._inductor.config.force_disable_caches = True

    if args.tiny:
        torch.set_num_threads(1)  # a second OpenMP thread on a shared 2-core CPU stalls every small op
    base = build_model(tiny=args.tiny)
    if args.tiny:  # smaller chunks, so the tiny prompts are long enough to decode sparsely
        config = LSAConfig(budget=0.135, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=32, recall_lag=1, compile=compile_value)
    else:
        config = LSAConfig(budget=0.135, chunk_size=64, interval=64, sink_tokens=64, recent_tokens=128, recall_lag=4, compile=compile_value)
    payload = {
        "benchmark": "recompile_soak", "environment": environment(), "tiny": args.tiny,
        "model": "Llama-3.2-1B shape, random bf16 weights, 16 layers" + (" (tiny: hidden 64, 2 layers, CPU check)" if args.tiny else ""),
        "batch": 1, "lsa_config": config.to_dict(), "inductor_caches": "warm" if args.warm_caches else "disabled",
        "lengths": {}, "soak": {}, "skipped": [],
    }

    due = time_budget(started, args.time_budget_s, payload["skipped"])

    def save() -> None:
        payload["elapsed_s"] = round(time.perf_counter() - started, 1)
        write_json(args.out, payload)

    # The lengths phase for every path first, then the soaks on the models kept from it (their step is
    # compiled already: a soak that compiled would fail its check).
    kept = {}
    for path in PATHS:
        if path not in paths and path not in soak_paths:
            continue
        if not due(path):
            continue
        model = convert_for(base, path, config)
        if path in paths:
            rows = lengths_run(model, path, lengths)
            payload["lengths"][path] = {
                "generations": rows,
                "first_generation_compile_s": rows[0]["dynamo_compile_s"],
                "graphs_compiled_after_the_first_generation": sum(r["graphs_compiled"] for r in rows[1:]),
            }
            save()
        if path in soak_paths:
            kept[path] = model
        else:
            quiesce(model)
        del model
        free_memory()
    for path, model in list(kept.items()):
        if due(f"{path} soak"):
            if path not in paths:  # compile before the soak, on a length of its own
                lengths_run(model, path, lengths[:1])
            payload["soak"][path] = soak_run(
                model, path, steps=soak_steps, generations=args.soak_generations, prompts=soak_prompts, sample_every=sample_every,
                device_slack=int(args.device_slack_mib * MIB), rss_slack=int(args.rss_slack_mib * MIB),
            )
            save()
        quiesce(model)
        del kept[path], model
        free_memory()
    save()
    print_summary(payload)
    failed = [path for path, res in payload["soak"].items() if not res["ok"]]
    if failed:
        raise SystemExit(f"soak checks failed for {failed}: see soak.<path>.checks in {args.out}")


def print_summary(payload: dict) -> None:
    print(f"\n{'path':<14} {'prompt':>7} {'new':>5} {'TTFT s':>8} {'2nd tok s':>9} {'ms/tok':>8} {'graphs':>6} {'dynamo s':>9} {'setup s':>8}")
    for path, res in payload["lengths"].items():
        for r in res["generations"]:
            setup = r["store"]["compiled_step_setup_s"] if r["store"] else None
            print(f"{path:<14} {r['prompt_tokens']:>7} {r['new_tokens']:>5} {r['ttft_s']:>8.3f} {r['second_token_s']:>9.3f} "
                  f"{r['decode_ms_per_token']:>8.3f} {r['graphs_compiled']:>6} {r['dynamo_compile_s']:>9.2f} {str(setup):>8}")
    for path, res in payload["soak"].items():
        c = res["checks"]
        print(f"soak {path}: {res['steps']} steps, ok={res['ok']}; graphs compiled {c['no_compiles']['graphs_compiled']}; "
              f"within-generation device growth max {max((r['allocated_growth'] for r in c['within_generation']['rows']), default=0)} B; "
              f"across generations {[(r['prompt_tokens'], r['peak_allocated_growth'], r['rss_growth_max']) for r in c['across_generations']['rows']]}")
    if payload["skipped"]:
        print("skipped:", payload["skipped"])


if __name__ == "__main__":
    main()
