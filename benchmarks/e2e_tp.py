"""Benchmark: tensor-parallel decode of a Llama-3-8B-shaped model (random bf16 weights) on two GPUs.

Run with ``torchrun --nproc-per-node 2 benchmarks/e2e_tp.py``. Per prompt length and batch, in one run:

- ``lsa_tp``: the model sharded by transformers' tensor-parallel plan (``DistributedConfig(tp_size=2)``,
  DTensor weights, heads split across the ranks), converted with ``LSAConfig(budget=0.135)``; each
  rank's store holds its own KV heads, the ranks agree on one resident set (query-aware scores
  all-reduced at the selector seam), the decode step is Inductor-compiled and replayed as a CUDA graph
  with its all-reduces inside;
- ``dense_tp``: the same sharded model converted with ``LSAConfig(mode="dense")`` (every chunk
  resident; the same kernels, compile and CUDA graph): dense on the same two GPUs;
- ``lsa_1gpu``: the unsharded model on rank 0's GPU alone with the same LSA config (rank 1 waits).

The timing loop is ``benchmarks/e2e_decode.py``'s ``runtime_run`` on every rank (the ranks run the
same calls; each rank times its own loop, rank 0's figures are reported, both ranks' are kept). Per
path: ms/token, tokens/s, prefill seconds, peak GPU memory per GPU, KV bytes per GPU and in total, and
the bandwidth floor per GPU ``(local weights + local device KV) / 4.2 TB/s``. Ratios side by side:
LSA on 2 GPUs against LSA on 1 GPU and against dense on 2 GPUs (issue 14's goals at 512K: >= 1.7x
and >= 2.5x).

``--prefill-window W`` (used at 512K, where one exact prefill takes ~220 s on one GPU and the three
paths would not fit one 10-minute device call) runs the *prompt's* attention over a local causal
window of ``W`` tokens instead of the whole prefix: the KV written to the store is still every layer's
own projections of the prompt, and every decode step attends exactly (the decode timing is what this
benchmark measures); only the prefill time and the prompt's hidden states differ, and the JSON says so.
With random weights the KV carries no meaning either way.

``--tp-variants default,gemv,...``: after each ``lsa_tp`` path's run, its decode step is compiled again
with each named graph transform (``TP_VARIANTS``; ``default``: the library's step, re-timed the same way
for the A/B) and timed for ``--steps`` steps on the same store (no new prefill: the store is sized for
the extra steps), as ``variants`` in that path's result. Compare the variants with each other: in run 73
the re-timed default ran 0.28 ms/token above the path's own loop. The transforms live here, not in the
library, until one is measured faster. On two GPUs ``dense_tp`` runs before ``lsa_tp`` (it compiles the
step both share).

The random weights are saved once (rank 0, safetensors in ``--workdir``) so that every rank loads its
shard through ``from_pretrained`` as a user would. JSON is written by rank 0 after every path.

    torchrun --nproc-per-node 2 benchmarks/e2e_tp.py --contexts 131072 --batches 1,4
    torchrun --nproc-per-node 2 benchmarks/e2e_tp.py --contexts 524288 --batches 1
    torchrun --nproc-per-node 2 benchmarks/e2e_tp.py --contexts 524288 --prefill-window 4096 --allreduce library --recall-lag-max 63
    torchrun --nproc-per-node 2 benchmarks/e2e_tp.py --contexts 524288 --prefill-window 4096 --allreduce nccl,one-shot
    torchrun --nproc-per-node 2 benchmarks/e2e_tp.py --contexts 524288 --prefill-window 4096 --allreduce one-shot --tp-variants default,gemv
    torchrun --nproc-per-node 2 benchmarks/e2e_tp.py --contexts 524288 --prefill-window 4096 --allreduce one-shot --paths lsa_tp --profile-replays 20 --tp-variants default,nccl,gemv_qkv
    torchrun --nproc-per-node 2 benchmarks/e2e_tp.py --tiny      # the script on a tiny model, CPU (gloo)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import COPY_BANDWIDTH, DEVICE, environment, forget_compiled, release_store, time_budget, use_local_prefill, write_json  # noqa: E402
from e2e_decode import build_model, runtime_run  # noqa: E402

import e2e_decode  # noqa: E402
import lsa_rewrite  # noqa: E402
from lsa_rewrite import LSAConfig  # noqa: E402


def _gemv(normed_inputs: bool):
    def transform(program):
        from lsa_rewrite.passes import LowerSmallMLinearPass

        LowerSmallMLinearPass(max_rows=1, normed_inputs=normed_inputs, devices=(DEVICE,))(program.module)
        return program
    return transform


def _concat(program):
    from lsa_rewrite.passes.concat_linear import ConcatSharedInputLinearPass

    ConcatSharedInputLinearPass(local_shards=True, devices=(DEVICE,))(program.module)
    return program


def _gemv_qkv(program):
    """q/k/v shards concatenated (copies) and that one product lowered to the GEMV; o and down stay Inductor's
    (they feed the all-reduces: run 73's ``gemv`` was 0.55 ms slower)."""
    from lsa_rewrite.passes import LowerSmallMLinearPass
    from lsa_rewrite.passes.concat_linear import BUFFER_PREFIX, ConcatSharedInputLinearPass
    from lsa_rewrite.passes.small_m_linear import OP

    ConcatSharedInputLinearPass(min_group=3, local_shards=True, devices=(DEVICE,))(program.module)
    LowerSmallMLinearPass(max_rows=1, normed_inputs=False, normed_concat=True, devices=(DEVICE,))(program.module)
    graph = program.module.graph
    for node in graph.nodes:
        if node.op == "call_function" and node.target is OP and not node.args[1].target.startswith(BUFFER_PREFIX):
            node.target = torch._C._nn.linear  # same arguments (x, W, b)
    program.module.recompile()
    return program


class _Nccl:
    """A transform marker: the library's step with its all-reduces lowered to NCCL (Inductor's collective
    auto-selection off while it compiles), for an A/B against the one-shot lowering on the same store."""


# Graph transforms of a tensor-parallel rank's decode step (its weights are the rank's local shards), applied
# to the library's program before compiling (``--tp-variants``):
TP_VARIANTS = {
    "default": None,  # the library's step (no GEMV for tensor-parallel steps: passes/pipeline.py)
    # LowerSmallMLinearPass as the library ran it on one GPU in runs 70-76: the one-row products whose x is not a
    # norm's output (o and down: per rank 4096x2048 and 4096x7168) as lsa::small_m_linear
    "gemv": _gemv(False),
    "gemv_all": _gemv(True),  # every projection of the rank as the GEMV
    # q/k/v and gate/up shards concatenated (copies: the DTensors keep theirs; not memory-neutral)
    "concat": _concat,
    "gemv_concat": lambda program: _gemv(False)(_concat(program)),
    # q/k/v shards as one product (copies) lowered to the GEMV (3072x4096 per rank), o and down left to Inductor
    "gemv_qkv": _gemv_qkv,
    # the library's step with NCCL all-reduces (not the one-shot symmetric-memory kernels of --allreduce one-shot)
    "nccl": _Nccl,
}

ALL_REDUCE_TAGS = ("all_reduce", "allreduce", "one_shot", "two_shot", "nccl", "multimem", "all_gather", "allgather", "reduce_scatter")


def tp_kind_of(name: str) -> str:
    """A kernel's kind in a tensor-parallel step's profile: collectives first, then ``step_breakdown.kind_of``'s kinds
    with Inductor's reductions (the projections, norms) apart from its pointwise kernels."""
    from step_breakdown import kind_of

    low = name.lower()
    if low.startswith(("triton_red_", "triton_per_")) and "_mm_" in low and any(tag in low for tag in ALL_REDUCE_TAGS):
        return "inductor_product_into_collective"  # o, down, the lm head: Inductor names the collective its output feeds
    if any(tag in low for tag in ALL_REDUCE_TAGS):
        return "collective"
    if low.startswith(("triton_red_", "triton_per_")):
        return "inductor_reduction"
    if low.startswith("triton_poi_"):
        return "inductor_pointwise"
    return kind_of(name)


@torch.no_grad()
def profile_step(model, replays: int) -> dict | None:
    """This rank's compiled step (its CUDA graph, all-reduces inside) replayed back to back after a barrier
    (``replay_ms``), then a profile of ``replays`` replays: kernel time per step by kind, the largest kernels,
    the collectives' count and per-call times, and ``gap_ms`` = replay - kernel sum (idle between kernels on
    the step's one stream). Every rank must call it (the replays run the collectives)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    compiled = model.lsa.compiled
    graph = None if compiled is None else compiled.graph
    ok = graph is not None and DEVICE == "cuda"
    box = [None] * dist.get_world_size()
    dist.all_gather_object(box, ok)
    if not all(box):
        return None
    torch.cuda.synchronize()
    dist.barrier()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    calls = max(20, replays)
    start.record()
    for _ in range(calls):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    replay = start.elapsed_time(end) / calls
    dist.barrier()
    # the ranks enter the profiler at different times: a barrier inside it, before the recorded replays (in run
    # 78 the first collective waited 8 ms for the other rank; run 79's profiler schedule recorded its step
    # annotations as device events and ~5% more kernels than the replays)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        dist.barrier()
        torch.cuda.synchronize()
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    dist.barrier()
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    calls_us: dict[str, list[float]] = {}
    for evt in prof.key_averages():
        if evt.device_type == torch.autograd.DeviceType.CUDA and not evt.key.startswith("ProfilerStep"):
            totals[evt.key] = totals.get(evt.key, 0.0) + evt.self_device_time_total
            counts[evt.key] = counts.get(evt.key, 0) + evt.count
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA and tp_kind_of(evt.name) == "collective":
            calls_us.setdefault(evt.name, []).append(evt.time_range.elapsed_us())
    kinds: dict[str, float] = {}
    for name, us in totals.items():
        kind = tp_kind_of(name)
        kinds[kind] = kinds.get(kind, 0.0) + us / replays / 1e3
    kernel_sum = sum(kinds.values())
    collectives = {}
    for name, values in calls_us.items():
        values = sorted(values)
        collectives[name[:120]] = {"calls_per_step": round(len(values) / replays, 1), "min_us": round(values[0], 2),
                                   "median_us": round(values[len(values) // 2], 2), "p90_us": round(values[int(len(values) * 0.9)], 2),
                                   "max_us": round(values[-1], 2)}
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:24]
    return {
        "replay_ms": round(replay, 3), "kernels_sum_ms": round(kernel_sum, 3), "gap_ms": round(replay - kernel_sum, 3),
        "kernels_ms_per_step": {k: round(v, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "kernels_per_step": round(sum(counts.values()) / replays, 1), "collectives": collectives,
        "top_kernels": [{"kernel": n[:140], "kind": tp_kind_of(n), "ms_per_step": round(us / replays / 1e3, 4),
                         "calls_per_step": round(counts[n] / replays, 1)} for n, us in top],
    }


def profiled(model, replays: int, rank: int) -> list | None:
    """``profile_step`` on every rank, gathered (rank order); printed on rank 0."""
    mine = profile_step(model, replays) if replays else None
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if rank == 0 and gathered[0] is not None:
        for r, prof in enumerate(gathered):
            print(f"  rank {r} profile:", {k: prof[k] for k in ("replay_ms", "kernels_sum_ms", "gap_ms", "kernels_per_step", "kernels_ms_per_step")}, flush=True)
            for name, c in prof["collectives"].items():
                print(f"    {name[:90]}: {c}", flush=True)
    return gathered if gathered[0] is not None else None


@torch.no_grad()
def time_variant(model, cache, token: torch.Tensor, select, transform, steps: int) -> tuple[dict, torch.Tensor]:
    """The step recompiled with ``transform`` (None: the library's), then ``steps`` decode steps on the store
    ``cache`` holds, timed as ``runtime_run`` times them (3 untimed steps first: compile and capture);
    ``select``: the store's own selection (``runtime_run`` leaves one that syncs to time each window)."""
    from lsa_rewrite.runtime import compiled

    import torch._inductor.config as inductor_config

    kw = e2e_decode.cache_kw(model)
    forget_compiled(model)
    cache.store.select = select
    clone = compiled.clone_program
    auto_select = inductor_config._collective.auto_select
    tp = model.lsa.adapter.tp
    options = tp._options
    if transform is _Nccl:
        inductor_config._collective.auto_select = False
        tp._options = {}  # the library's own choice (TensorParallelPlan.compile_options) off too
    elif transform is not None:
        compiled.clone_program = lambda program: transform(clone(program))
    try:
        t0 = time.perf_counter()
        for _ in range(3):
            token = model(input_ids=token, **{kw: cache}).logits[:, -1:].argmax(-1)
        e2e_decode.sync()
        compile_s = time.perf_counter() - t0
    finally:
        compiled.clone_program = clone
        inductor_config._collective.auto_select = auto_select
        tp._options = options
    t0 = time.perf_counter()
    for _ in range(steps - 3):
        token = model(input_ids=token, **{kw: cache}).logits[:, -1:].argmax(-1)
    e2e_decode.sync()
    decode_s = time.perf_counter() - t0
    return {"ms_per_token": round(decode_s / (steps - 3) * 1e3, 3), "compile_s": round(compile_s, 1)}, token


def local_bytes(model: torch.nn.Module) -> int:
    """Bytes of this rank's parameters (a DTensor's local shard; a plain tensor whole)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


def use_one_shot_all_reduce(group_name: str) -> None:
    """Let Inductor lower the step's small all-reduces (<= 128 KB, sum) as PyTorch's one-shot all-reduce
    over symmetric memory (each rank reads its peers' buffers over NVLink, P2P, no multicast) instead of
    NCCL: ``_collective.auto_select`` with symmetric memory enabled for the tensor-parallel group."""
    import torch._inductor.config as inductor_config
    from torch.distributed._symmetric_memory import enable_symm_mem_for_group

    enable_symm_mem_for_group(group_name)
    inductor_config._collective.auto_select = True


def floor_of(res: dict, weights: int) -> None:
    res["weights_bytes_per_gpu"] = weights
    res["floor_bytes_per_gpu"] = weights + res["kv_gpu_bytes"]
    floor_ms = res["floor_bytes_per_gpu"] / COPY_BANDWIDTH * 1e3
    res["floor_ms"] = round(floor_ms, 3)
    res["x_floor"] = round(res["ms_per_token"] / floor_ms, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default=None, help="prompt lengths (default 131072; --tiny: 2048)")
    parser.add_argument("--batches", default="1", help="batch sizes per context, e.g. 1,4 (every path runs each)")
    parser.add_argument("--steps", type=int, default=None, help="decode steps per path (default 192; --tiny: 96)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 32, the 8B shape; --tiny: 2)")
    parser.add_argument("--paths", default="lsa_tp,dense_tp,lsa_1gpu", help="which of lsa_tp, dense_tp, lsa_1gpu to run")
    parser.add_argument("--time-budget-s", type=float, default=None, help="skip the runs that would start after this many seconds")
    parser.add_argument("--workdir", default=None, help="where rank 0 saves the random checkpoint (default: a temp folder, removed at the end)")
    parser.add_argument("--prefill-window", type=int, default=0,
                        help="run prompts' attention over a local causal window of this many tokens (0: exact; decode is always exact)")
    parser.add_argument("--allreduce", default="nccl",
                        help="how the compiled step's all-reduces are lowered, one or more in order: nccl (the library's choice set to NCCL), one-shot "
                             "(symmetric memory set globally, as before the library chose it; CUDA only), library (the library's own choice, "
                             "TensorParallelPlan.compile_options); paths named *_one_shot and *_library")
    parser.add_argument("--recall-lag-max", type=int, default=None,
                        help="LSAConfig.recall_lag_max of the LSA paths (recalled chunks join once their copies are done, by this step)")
    parser.add_argument("--tp-variants", default="default",
                        help=f"decode-step variants timed on each lsa_tp path's store after its run, in order: {','.join(TP_VARIANTS)} "
                             "(only 'default': none)")
    parser.add_argument("--profile-replays", type=int, default=0,
                        help="per rank, after each --tp-variants step (name 'default' for the library's): its CUDA graph replayed back "
                             "to back and a profile of this many replays, kernels by kind (collectives, Inductor reductions, attention, ...)")
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU with gloo: checks the script, not a measurement")
    parser.add_argument("--out", default="benchmarks/results/e2e_tp.json")
    args = parser.parse_args()
    started = time.perf_counter()
    backend = "nccl" if DEVICE == "cuda" else "gloo"
    # rank 1 waits through rank 0's single-GPU runs (minutes at 512K): a long collective timeout
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=40))
    rank, world = dist.get_rank(), dist.get_world_size()
    if DEVICE == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    contexts = [int(c) for c in (args.contexts or ("2048" if args.tiny else "131072")).split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    steps = args.steps or (96 if args.tiny else 192)
    layers = args.layers or (2 if args.tiny else 32)
    paths = args.paths.split(",")
    unknown = sorted(set(paths) - {"lsa_tp", "dense_tp", "lsa_1gpu"})
    if unknown:
        raise SystemExit(f"unknown --paths {unknown}; choose from lsa_tp, dense_tp, lsa_1gpu")
    allreduces = args.allreduce.split(",")
    if set(allreduces) - {"nccl", "one-shot", "library"} or len(set(allreduces)) != len(allreduces):
        raise SystemExit(f"--allreduce takes nccl, one-shot and/or library, got {args.allreduce!r}")
    if "one-shot" in allreduces and DEVICE != "cuda":
        raise SystemExit("--allreduce one-shot needs CUDA GPUs (symmetric memory); use --allreduce nccl or library on the CPU")
    tp_variants = args.tp_variants.split(",")
    if set(tp_variants) - set(TP_VARIANTS):
        raise SystemExit(f"unknown --tp-variants {sorted(set(tp_variants) - set(TP_VARIANTS))}; choose from {', '.join(TP_VARIANTS)}")
    if tp_variants == ["default"]:
        tp_variants = []
    chunk = 16 if args.tiny else 64
    lsa_config = LSAConfig(budget=0.135, chunk_size=chunk, interval=chunk, sink_tokens=chunk, recent_tokens=2 * chunk, recall_lag=4,
                           recall_lag_max=args.recall_lag_max)
    dense_config = dataclasses.replace(lsa_config, mode="dense")
    payload = {
        "benchmark": "e2e_tp", "environment": {**environment(), "gpus": world, "dist_backend": backend}, "tiny": args.tiny,
        "model": f"Llama-3-8B shape, random bf16 weights, {layers} layers" + (" (tiny: hidden 64, CPU check)" if args.tiny else ""),
        "layers": layers, "steps": steps, "lsa_config": lsa_config.to_dict(),
        "allreduce": allreduces, "tp_variants": tp_variants,
        "prefill_attention": (f"local causal window of {args.prefill_window} tokens (prompt KV = each layer's projections; decode exact; "
                              "prefill times not comparable with an exact prefill)") if args.prefill_window else "exact",
        "floor": f"per GPU: (this rank's weight bytes + its device KV bytes) / {COPY_BANDWIDTH / 1e12} TB/s",
        "skipped": [], "results": {},
    }
    due = time_budget(started, args.time_budget_s, payload["skipped"])
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir()) / "lsa_e2e_tp"

    def agree(flag: bool) -> bool:
        """Rank 0's decision, on every rank (the time budget must not split the ranks)."""
        box = [flag]
        dist.broadcast_object_list(box, src=0)
        return bool(box[0])

    def prompt_of(ctx: int, batch: int, vocab: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(ctx * 31 + batch)  # the same prompt for every path and rank
        return torch.randint(0, vocab, (batch, ctx), generator=g).to(DEVICE)

    def record(key: str, name: str, res: dict, weights: int, per_rank: list | None = None) -> None:
        floor_of(res, weights)
        if per_rank is not None:
            res["per_rank"] = per_rank
        row = payload["results"].setdefault(key, {})
        row[name] = {k: v for k, v in res.items() if k != "windows"} | {"windows": res.get("windows", [])[:4]}
        vs = row.setdefault("vs", {})
        for suffix in ("", "_one_shot"):
            lsa, dense = row.get("lsa_tp" + suffix), row.get("dense_tp" + suffix)
            if lsa and "lsa_1gpu" in row:
                vs[f"lsa_tp{suffix}_vs_lsa_1gpu_speedup"] = round(row["lsa_1gpu"]["ms_per_token"] / lsa["ms_per_token"], 2)
            if lsa and dense:
                vs[f"lsa_tp{suffix}_vs_dense_tp{suffix}_speedup"] = round(dense["ms_per_token"] / lsa["ms_per_token"], 2)
                vs[f"lsa_tp{suffix}_vs_dense_tp{suffix}_kv_fraction"] = round(lsa["kv_gpu_bytes"] / dense["kv_gpu_bytes"], 4)
            for variant, v in (lsa or {}).get("variants", {}).items():
                if "lsa_1gpu" in row:
                    vs[f"lsa_tp{suffix}@{variant}_vs_lsa_1gpu_speedup"] = round(row["lsa_1gpu"]["ms_per_token"] / v["ms_per_token"], 2)
                if dense:
                    vs[f"lsa_tp{suffix}@{variant}_vs_dense_tp{suffix}_speedup"] = round(dense["ms_per_token"] / v["ms_per_token"], 2)
        print(name, key, {k: v for k, v in res.items() if k not in ("windows", "footprint", "path", "per_rank")}, flush=True)
        payload["elapsed_s"] = round(time.perf_counter() - started, 1)
        write_json(args.out, payload)

    def guarded(name: str, fn):
        try:
            return fn()
        except torch.OutOfMemoryError as exc:
            free = torch.cuda.mem_get_info()[0] if DEVICE == "cuda" else 0
            payload["skipped"].append(f"{name}: out of memory on rank {rank} ({free / 1e9:.1f} GB free): {str(exc).splitlines()[0]}")
            print("OOM", name, flush=True)
            gc.collect()
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
            return None

    # 1. rank 0 builds the random model, saves it for the sharded loads, and runs the single-GPU path.
    if rank == 0:
        full = build_model(layers, tiny=args.tiny)
        full.generation_config.eos_token_id = None
        marker = workdir / "lsa_e2e_tp.json"  # a checkpoint this script saved with these layers is reused
        if not (marker.exists() and marker.read_text() == str(layers)):
            if workdir.exists():
                shutil.rmtree(workdir)
            t0 = time.perf_counter()
            full.save_pretrained(workdir)
            marker.write_text(str(layers))
            payload["save_s"] = round(time.perf_counter() - t0, 1)
        if args.prefill_window:  # after the save: the checkpoint names plain SDPA
            use_local_prefill(full, args.prefill_window)
        vocab = full.config.vocab_size
        if "lsa_1gpu" in paths:
            weights = local_bytes(full)
            lsa_rewrite.convert(full, lsa_config)
            for ctx in contexts:
                for batch in batches:
                    if due(f"lsa_1gpu {ctx} B{batch}"):
                        res = guarded(f"lsa_1gpu {ctx} B{batch}", lambda: runtime_run(full, prompt_of(ctx, batch, vocab), steps, lsa_config))
                        if res is not None:
                            res["batch"] = batch
                            res["kv_total_bytes"] = res["kv_gpu_bytes"]
                            record(f"{ctx}/B{batch}", "lsa_1gpu", res, weights)
            release_store(full)
        del full
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    dist.barrier()

    # 2. every rank loads its shard and runs the two-GPU paths.
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(workdir, distributed_config=DistributedConfig(tp_size=world), dtype=torch.bfloat16)
    model.generation_config.eos_token_id = None
    model.eval()
    if args.prefill_window:
        use_local_prefill(model, args.prefill_window)
    payload["tp_load_s"] = round(time.perf_counter() - t0, 1)
    weights = local_bytes(model)
    vocab = model.config.vocab_size
    lsa_rewrite.convert(model, lsa_config)
    suffix = {"nccl": "", "one-shot": "_one_shot", "library": "_library"}
    runs = [(ctx, batch, name + suffix[reduce], cfg, reduce)
            for reduce in allreduces for ctx in contexts for batch in batches
            for name, cfg in (("dense_tp", dense_config), ("lsa_tp", lsa_config)) if name in paths]
    lowering = "nccl"
    # The library lowers a CUDA step's all-reduces one-shot where it can (TensorParallelPlan.compile_options);
    # the nccl paths set that choice to NCCL, the one-shot paths let the library decide again.
    model.lsa.adapter.tp.use_nccl()
    # the lsa_tp paths with variants: a store sized for their extra steps, and the prefill's cache and token kept
    timed_prefill, prefilled, headroom = e2e_decode.timed_prefill, {}, [0]

    def prefill_keeping(model, prompt, *a, **k):
        if headroom[0]:
            model.lsa.pending_capacity += headroom[0]
        cache, token, seconds = timed_prefill(model, prompt, *a, **k)
        prefilled.update(cache=cache, token=token, select=cache.store.select)  # runtime_run leaves its timed select in place
        return cache, token, seconds

    e2e_decode.timed_prefill = prefill_keeping
    for ctx, batch, name, cfg, reduce in runs:
        key = f"{ctx}/B{batch}"
        if reduce != lowering:
            import torch._inductor.config as inductor_config

            if reduce == "nccl":
                model.lsa.adapter.tp.use_nccl()
                inductor_config._collective.auto_select = False
            else:  # both let the library decide again; one-shot also sets the global switch as before
                model.lsa.adapter.tp._options = None
                if reduce == "one-shot":
                    use_one_shot_all_reduce(model.lsa.adapter.tp.group_name)
                else:
                    inductor_config._collective.auto_select = False
            torch._dynamo.reset()  # the next compile lowers the step's all-reduces afresh
            model.lsa.compiled = None
            model.lsa.compiled_modules.clear()
            lowering = reduce
        if not agree(due(f"{name} {key}")):
            continue
        variants = tp_variants if name.startswith("lsa_tp") else []
        headroom[0] = len(variants) * (steps + 2 * cfg.interval)
        prefilled.clear()
        res = guarded(f"{name} {key}", lambda: runtime_run(model, prompt_of(ctx, batch, vocab), steps, cfg))
        if res is not None and variants:
            res["variants"] = {}
            token = prefilled["token"]
            for variant in variants:
                if not agree(due(f"{name} {key} @{variant}")):
                    continue
                out = guarded(f"{name} {key} @{variant}", lambda: time_variant(model, prefilled["cache"], token, prefilled["select"],
                                                                                  TP_VARIANTS[variant], steps))
                if out is None:
                    break
                res["variants"][variant], token = out
                print(f"{name} {key} @{variant}", res["variants"][variant], flush=True)
                if args.profile_replays:
                    prof = profiled(model, args.profile_replays, rank)
                    if prof is not None:
                        res["variants"][variant]["profile_per_rank"] = prof
            forget_compiled(model)  # the next path compiles the library's step
        prefilled.clear()
        gathered = [None] * world
        brief = None if res is None else {k: res[k] for k in ("ms_per_token", "prefill_s", "peak_gpu_gb", "decode_peak_gpu_gb", "kv_gpu_bytes")}
        dist.all_gather_object(gathered, brief)
        if not all(gathered):  # every rank sees the same list: all skip together
            release_store(model)
            continue
        total = lsa_rewrite.footprint(model, across_ranks=True)
        if rank == 0:
            res["batch"] = batch
            res["kv_total_bytes"] = total["resident_kv_bytes"]
            res["footprint_total"] = total
            res["ms_per_token_max_over_ranks"] = max(g["ms_per_token"] for g in gathered)
            record(key, name, res, weights, per_rank=gathered)
        release_store(model)
    if rank == 0:
        payload["elapsed_s"] = round(time.perf_counter() - started, 1)
        write_json(args.out, payload)
        print_table(payload)
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    dist.barrier()
    sys.stdout.flush()
    # The process group is not destroyed: after collectives captured in CUDA graphs the shutdown hung
    # in run 52 (tp_smoke_gpu.py) with the results already written; the OS reclaims everything.
    os._exit(0)


def print_table(payload: dict) -> None:
    print(f"\n{'ctx/batch':>12} {'path':<10} {'ms/tok':>8} {'floor':>7} {'x floor':>7} {'peak GB':>8} {'KV GB/GPU':>10} {'prefill s':>9}")
    for key, row in payload["results"].items():
        for name, res in row.items():
            if isinstance(res, dict) and "ms_per_token" in res:
                print(f"{key:>12} {name:<10} {res['ms_per_token']:>8.3f} {res['floor_ms']:>7.3f} {res['x_floor']:>7.2f} "
                      f"{res['peak_gpu_gb']:>8.2f} {res['kv_gpu_bytes'] / 1e9:>10.3f} {res['prefill_s']:>9.1f}")
        print(f"{key:>12} vs: {row.get('vs', {})}")
    if payload["skipped"]:
        print("skipped:", payload["skipped"])


if __name__ == "__main__":
    main()
