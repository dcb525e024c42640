"""Benchmark: where an LSA decode step's time goes, against its bandwidth floor (issue 13, item 2).

One Llama-3-8B-shaped model (random bf16 weights), B=1, LSA 13.5% (chunk 64, interval 64, the
``e2e_decode.py`` config), per context and recall lag, after one prefill:

- ``loop``: the decode loop as ``e2e_decode.py`` times it (selection + recall every 64 steps included);
- ``loop_no_select``: the same loop with the store's selection turned off (the resident set stays):
  the step and its per-token host work; ``loop - loop_no_select`` is what the windows cost per token;
- ``loop_eager_select`` (when the store replays its selection as CUDA graphs, the default on CUDA):
  the same loop with the selection queued op by op instead;
- ``replay``: the compiled step's CUDA graph replayed back to back: the step's GPU time alone;
- ``kernels``: a profile of 10 replays, kernel time per step by kind (GEMMs, decode attention, KV
  append, other Inductor kernels, the rest) with the bandwidth each achieves (weights / GEMM time,
  resident KV / attention time);
- ``window``: a profile of one whole window of the loop (64 steps and its selection): GPU time of the
  recall copies, of the selection's own kernels, and of the steps, against 64 replays;
- ``variants`` (first context and lag only): the same step compiled with other Inductor settings
  (``--variants``), each timed by replay and by the loop. These switches live here, not in the
  library, until one wins;
- ``--lag-max`` and ``--copy-programs``: every context and lag is measured again with the store's
  ``recall_lag_max`` (``LSAConfig.recall_lag_max``; ``none``: the lag) and the recall copy kernel's
  program count (``kernels/copy_chunks.py``) set to each value (no new prefill, no recompile).

Floors: (weights + resident KV bytes) / 4.2 TB/s; the input embedding is gathered, not read, so the
step's true floor is lower by its bytes / 4.2 TB/s (``floor_ms_without_embedding``).

    python benchmarks/step_breakdown.py --contexts 131072 --lags 4,8 --variants default,inductor_defaults,max_autotune_gemm
    python benchmarks/step_breakdown.py --contexts 131072,524288 --lag-max none,63 --copy-programs 16,8 --prefill-window 4096
    python benchmarks/step_breakdown.py --contexts 524288 --prefill-window 4096
    python benchmarks/step_breakdown.py --lag-max 63 --prefill-window 4096 --variants default,cd_unfused_append
    python benchmarks/step_breakdown.py --lag-max 63 --prefill-window 4096 --variants default,cd_no_gemv,cd_gemv_all
    python benchmarks/step_breakdown.py --lag-max 63 --prefill-window 4096 --variants default,cd_freezing,cd_concat,cd_concat_qkv
    python benchmarks/step_breakdown.py --lag-max 63 --prefill-window 4096 --variants default,cd_gemv_table,default --gemv-table gemv.json
    python benchmarks/step_breakdown.py --lag-max 63 --prefill-window 4096 --variants default,cd_gemv_norm,cd_gemv_norm_nolmhead
    python benchmarks/step_breakdown.py --lag-max 63 --prefill-window 4096 --variants default,cd_gemv_od,default   # q/k/v as one GEMV (default) or three Inductor products
    python benchmarks/step_breakdown.py --tiny      # the script itself on a tiny model, CPU, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import COPY_BANDWIDTH, DEVICE, environment, forget_compiled, release_store, sync, time_budget, timed_prefill, use_local_prefill, write_json  # noqa: E402
from e2e_decode import build_model, cache_kw  # noqa: E402

import lsa_rewrite  # noqa: E402
from lsa_rewrite import LSAConfig  # noqa: E402

GRAPH = "lsa_graph"  # a variant key handled by `recompile` (a rewrite of the step's graph), not passed to Inductor
VARIANTS = {  # Inductor settings the decode step is compiled with, in place of the library's INDUCTOR_OPTIONS
    "default": None,  # the library's own (lsa_rewrite/runtime/compiled.py)
    "inductor_defaults": {},  # Inductor's defaults: cuBLAS for the projections (the library's choice before run 57)
    "coordinate_descent": {"coordinate_descent_tuning": True},
    "max_autotune_gemm": {"max_autotune_gemm": True},
    "cd_all_directions": {"coordinate_descent_tuning": True, "coordinate_descent_check_all_directions": True},
    "cd_radius2": {"coordinate_descent_tuning": True, "coordinate_descent_search_radius": 2},
    "cd_autotune_pointwise": {"coordinate_descent_tuning": True, "max_autotune_pointwise": True},
    # weights folded as constants: Inductor's freezing passes concatenate the projections that share an input
    # (q/k/v, gate/up) into one matmul each; keeps a second copy of those weights (~9 GB at the 8B shape)
    "cd_freezing": {"coordinate_descent_tuning": True, "freezing": True},
    # the store writes (K/V append, chunk bounds, taps) as the kernels' PyTorch references instead of the
    # custom ops, so Inductor sees indexed stores it can fuse with the kernels making K/V (not an Inductor
    # setting: `recompile` rewrites the graph it compiles)
    "cd_visible_writes": {"coordinate_descent_tuning": True, GRAPH: "visible_writes"},
    # the step as the rewrite emitted it before run 68: `append_kv`, `update_chunk_index`, `tap` and
    # `sparse_decode_attention` per sparse layer (five launches) instead of the fused
    # `sparse_decode_attention_append` (two)
    "cd_unfused_append": {"coordinate_descent_tuning": True, GRAPH: "unfused_append"},
    # the step without `LowerSmallMLinearPass`: every `lsa::small_m_linear` back to `F.linear`, which Inductor
    # lowers itself (the library's step before run 70)
    "cd_no_gemv": {"coordinate_descent_tuning": True, GRAPH: "no_gemv"},
    # the GEMV only where x is not a norm's output (`LowerSmallMLinearPass(normed_inputs=False)`: o and down
    # at the Llama shape); q/k/v, gate/up and the lm head as `F.linear`, whose Inductor lowering computes
    # the norm inside the product's kernel. Since run 70 the library's own choice, so the same as `default`
    "cd_gemv_unnormed": {"coordinate_descent_tuning": True, GRAPH: "gemv_unnormed"},
    # every projection as the GEMV, norm inputs included (run 70's `default`: slower)
    "cd_gemv_all": {"coordinate_descent_tuning": True, GRAPH: "gemv_all"},
    # the products sharing an input as one product by the concatenated weights, split
    # (`ConcatSharedInputLinearPass`: q/k/v and gate/up; the weights moved into one storage per group, no copy)
    "cd_concat": {"coordinate_descent_tuning": True, GRAPH: "concat"},
    # the same for groups of three or more only: q/k/v (gate/up stay two products, silu * up fused into up's kernel)
    "cd_concat_qkv": {"coordinate_descent_tuning": True, GRAPH: "concat_qkv"},
    # q/k/v as one product (`ConcatSharedInputLinearPass(min_group=3)`) lowered to the GEMV (one 6144 x 4096 launch
    # a layer at the 8B shape; `LowerSmallMLinearPass(normed_concat=True)`), o and down as in the library; the
    # norm before q/k/v is then a kernel of its own (fused with the residual add before it), gate/up stay Inductor's
    "cd_gemv_qkv": {"coordinate_descent_tuning": True, GRAPH: "gemv_qkv"},
    # q/k/v as three products again under Inductor (each with its norm inside), only o and down as the GEMV:
    # the library's step of runs 70-76 (since run 77 the library concatenates q/k/v into one GEMV)
    "cd_gemv_od": {"coordinate_descent_tuning": True, GRAPH: "gemv_od"},
    # the library's step with the GEMV launch table of `--gemv-table` (which then applies to this variant only)
    "cd_gemv_table": {"coordinate_descent_tuning": True},
    # the library's step (o and down as the GEMV) with every product of a Llama-style RMSNorm's output (q/k/v,
    # gate/up, the lm head) as `lsa::small_m_linear_rmsnorm`: the GEMV with the norm in its prologue
    # (`LowerSmallMLinearPass(fuse_norm=True)`), so no norm kernel of its own
    "cd_gemv_norm": {"coordinate_descent_tuning": True, GRAPH: "gemv_norm"},
    # the same but the lm head left to Inductor (its norm + product as the op's PyTorch reference)
    "cd_gemv_norm_nolmhead": {"coordinate_descent_tuning": True, GRAPH: "gemv_norm_nolmhead"},
}


def kind_of(name: str) -> str:
    low = name.lower()
    # Inductor's kernels first: their names list the ops they were fused from, which may include an
    # lsa op's name (the K/V projection feeding the append); until run 68 those counted as kv_append
    if low.startswith(("triton_red_", "triton_per_", "triton_poi_", "triton_tem_")):
        return "inductor_triton"
    if "copy_chunks" in low or "unpack_chunks" in low or "pack_chunks" in low:
        return "recall_copies"
    if "decode" in low and ("attn" in low or "attention" in low or "merge" in low or "split" in low):
        return "decode_attention"
    if "append" in low:
        return "kv_append"
    if any(tag in low for tag in ("gemm", "gemv", "nvjet", "cutlass", "xmma", "sm90_", "sm100_", "splitk", "cublas")):
        return "gemm"
    if low.startswith("triton_"):
        return "inductor_triton"
    if "memcpy" in low or "memset" in low:
        return "memcpy_memset"
    return "other"


def kernel_times(prof) -> dict[str, float]:
    """Kernel name -> total device microseconds in a profile (CUDA kernels and memcpys only)."""
    out: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            out[evt.key] += evt.self_device_time_total
    return dict(out)


def profile(fn, *, cuda: bool) -> dict[str, float]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        fn()
        sync()
    return kernel_times(prof) if cuda else {}


def by_kind(times: dict[str, float], per: int) -> dict[str, float]:
    kinds: dict[str, float] = defaultdict(float)
    for name, us in times.items():
        kinds[kind_of(name)] += us / per / 1e3
    return {k: round(v, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}


def top_kernels(times: dict[str, float], per: int, n: int = 12) -> list[dict]:
    rows = sorted(times.items(), key=lambda kv: -kv[1])[:n]
    return [{"kernel": name[:160], "kind": kind_of(name), "ms_per_step": round(us / per / 1e3, 4)} for name, us in rows]


def timed_loop(model, kw: str, cache, token: torch.Tensor, steps: int) -> tuple[float, torch.Tensor]:
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        token = model(input_ids=token, **{kw: cache}).logits[:, -1:].argmax(-1)
    sync()
    return (time.perf_counter() - t0) / steps * 1e3, token


def replay_ms(graph, calls: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(calls):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


@torch.no_grad()
def measure(model, kw: str, cache, token: torch.Tensor, steps: int, interval: int, weights: int, embedding: int) -> tuple[dict, torch.Tensor]:
    runtime = model.lsa
    store = cache.store
    cuda = DEVICE == "cuda"
    res: dict = {}
    res["loop_ms"], token = timed_loop(model, kw, cache, token, steps)
    res["selection_captured"] = store.selection_captured
    if store.selection_captured:
        # The same store selecting op by op (its captured graphs kept): what the capture saves per token.
        width, store._graph_width = store._graph_width, 0
        try:
            res["loop_eager_select_ms"], token = timed_loop(model, kw, cache, token, steps)
        finally:
            store._graph_width = width
        res["loop_eager_select_ms"] = round(res["loop_eager_select_ms"], 3)
    # Last: its steps install any recall still pending, so the replays below run on full tables.
    original = store.select
    store.select = lambda *a, **k: None
    try:
        res["loop_no_select_ms"], token = timed_loop(model, kw, cache, token, steps)
    finally:
        store.select = original
    res["windows_ms_per_token"] = round(res["loop_ms"] - res["loop_no_select_ms"], 3)
    fp = lsa_rewrite.footprint(model)
    kv = fp["resident_kv_bytes"]
    floor = (weights + kv) / COPY_BANDWIDTH * 1e3
    res.update(kv_gpu_bytes=kv, floor_ms=round(floor, 3), floor_ms_without_embedding=round(floor - embedding / COPY_BANDWIDTH * 1e3, 3))
    if cuda and runtime.compiled is not None and runtime.compiled.graph is not None:
        graph = runtime.compiled.graph
        res["replay_ms"] = round(replay_ms(graph, steps), 3)
        reps = 10
        times = profile(lambda: [graph.replay() for _ in range(reps)], cuda=True)
        kinds = by_kind(times, reps)
        res["kernels_ms_per_step"] = kinds
        res["kernels_sum_ms"] = round(sum(kinds.values()), 3)
        res["top_kernels"] = top_kernels(times, reps, 48)
        gemm = kinds.get("gemm", 0.0)
        attn = kinds.get("decode_attention", 0.0)
        res["gemm_tb_per_s"] = round((weights - embedding) / (gemm * 1e-3) / 1e12, 2) if gemm else None
        res["attention_tb_per_s"] = round(kv / (attn * 1e-3) / 1e12, 2) if attn else None
        step_kernels = set(times)
        # one whole window of the loop: its steps, its selection, its recall copies
        def window():
            nonlocal token
            for _ in range(interval):
                token = model(input_ids=token, **{kw: cache}).logits[:, -1:].argmax(-1)
        sync()
        t0 = time.perf_counter()
        wtimes = profile(window, cuda=True)
        wall = (time.perf_counter() - t0) * 1e3
        copies = sum(us for n, us in wtimes.items() if kind_of(n) == "recall_copies") / 1e3
        selection = sum(us for n, us in wtimes.items() if n not in step_kernels and kind_of(n) != "recall_copies") / 1e3
        steps_gpu = sum(us for n, us in wtimes.items() if n in step_kernels) / 1e3
        res["window"] = {
            "wall_ms_profiled": round(wall, 1), "steps_kernels_ms": round(steps_gpu, 2),
            "steps_kernels_ms_per_step": round(steps_gpu / interval, 3), "recall_copies_ms": round(copies, 2),
            "selection_kernels_ms": round(selection, 2), "replay_ms_x_interval": round(res["replay_ms"] * interval, 2),
            "selection_top": top_kernels({n: us for n, us in wtimes.items() if n not in step_kernels}, 1, 8),
        }
    res["x_floor"] = round(res["loop_ms"] / floor, 3)
    for key in ("loop_ms", "loop_no_select_ms"):
        res[key] = round(res[key], 3)
    return res, token


@torch.no_grad()
def prefill(model, prompt: torch.Tensor, config: LSAConfig, steps: int, measures: int):
    runtime = model.lsa
    release_store(model)
    runtime.config = config
    # each measurement decodes three loops and a window (plus a step per recompile)
    runtime.pending_capacity = prompt.shape[1] + measures * (3 * steps + 2 * config.interval) + 4 * config.interval
    cache, token, prefill_s = timed_prefill(model, prompt)
    kw = cache_kw(model)
    t0 = time.perf_counter()
    for _ in range(3):
        token = model(input_ids=token, **{kw: cache}).logits[:, -1:].argmax(-1)
    sync()
    return cache, token, round(prefill_s, 2), round(time.perf_counter() - t0, 2)


@torch.no_grad()
def recompile(model, kw: str, cache, token: torch.Tensor, options: dict | None) -> tuple[torch.Tensor, float]:
    """Throw the compiled step away and compile it again with Inductor ``options`` (None: the library's)."""
    from lsa_rewrite.runtime import compiled

    forget_compiled(model)
    library, clone = compiled.INDUCTOR_OPTIONS, compiled.clone_program
    options = None if options is None else dict(options)
    transform = None if options is None else GRAPH_TRANSFORMS[options.pop(GRAPH)] if GRAPH in options else None
    if transform is not None:
        compiled.clone_program = lambda program: transform(clone(program))
    compiled.INDUCTOR_OPTIONS = library if options is None else options
    t0 = time.perf_counter()
    try:
        token = model(input_ids=token, **{kw: cache}).logits[:, -1:].argmax(-1)
        sync()
    finally:
        compiled.INDUCTOR_OPTIONS, compiled.clone_program = library, clone
    return token, round(time.perf_counter() - t0, 1)


def _tap_ref(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src.reshape(dst.shape))


def _append_visible(q, k_pool, v_pool, slot_chunk, pos, valid_start, k_new, v_new, chunk_slot, kmin, kmax, q_tap, scale, softcap=0.0):
    """``lsa::sparse_decode_attention_append`` with its writes as PyTorch references, the attention as its op."""
    import lsa_rewrite.kernels as K

    K.append_kv_ref(k_pool, v_pool, k_new, v_new, pos, chunk_slot)
    K.update_chunk_index_ref(kmin, kmax, k_new, pos, k_pool.shape[1])
    _tap_ref(q_tap, q)
    return torch.ops.lsa.sparse_decode_attention(q, k_pool, v_pool, slot_chunk, pos, valid_start, scale, softcap)


def _append_unfused(q, k_pool, v_pool, slot_chunk, pos, valid_start, k_new, v_new, chunk_slot, kmin, kmax, q_tap, scale, softcap=0.0):
    """``lsa::sparse_decode_attention_append`` as the four ops the rewrite emitted before it (five launches)."""
    ops = torch.ops.lsa
    ops.append_kv(k_pool, v_pool, k_new, v_new, pos, chunk_slot)
    ops.update_chunk_index(kmin, kmax, k_new, pos, k_pool.shape[1])
    ops.tap(q_tap, q)
    return ops.sparse_decode_attention(q, k_pool, v_pool, slot_chunk, pos, valid_start, scale, softcap)


def _swap_targets(program, swap: dict):
    gm = program.module
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in swap:
            node.target = swap[node.target]
    gm.recompile()
    return program


def visible_writes(program):
    """``program`` (a clone) with the store-writing custom ops replaced by their PyTorch references."""
    import lsa_rewrite.kernels as K

    ops = torch.ops.lsa
    return _swap_targets(program, {
        ops.sparse_decode_attention_append.default: _append_visible, ops.ring_append_kv.default: K.ring_append_kv_ref,
        ops.tap.default: _tap_ref,
    })


def unfused_append(program):
    """``program`` (a clone) with each fused sparse layer step as the separate ops (the rewrite before run 68)."""
    return _swap_targets(program, {torch.ops.lsa.sparse_decode_attention_append.default: _append_unfused})


def no_gemv(program):
    """``program`` (a clone) with every ``lsa::small_m_linear`` (``LowerSmallMLinearPass``) back to ``F.linear``."""
    return _swap_targets(program, {torch.ops.lsa.small_m_linear.default: torch.nn.functional.linear})


def gemv_unnormed(program):
    """``program`` (a clone) with the GEMV ops whose x is a norm's output back to ``F.linear`` (what
    ``LowerSmallMLinearPass(normed_inputs=False)`` leaves)."""
    from lsa_rewrite.passes.small_m_linear import normed

    gm = program.module
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.lsa.small_m_linear.default and normed(node.args[0]):
            node.target = torch.nn.functional.linear
    gm.recompile()
    return program


def gemv_od(program):
    """``program`` (a clone) with q/k/v as three products again (each ``lsa_concat_*`` GEMV and its split as
    ``F.linear`` of x by the buffer's row blocks, which Inductor lowers with the norm inside): only o and down as
    the GEMV, the library's step of runs 70-76."""
    gm = program.module
    graph = gm.graph
    op = torch.ops.lsa.small_m_linear.default
    for node in list(graph.nodes):
        if not (node.op == "call_function" and node.target is op and node.args[1].op == "get_attr"
                and node.args[1].target.startswith("lsa_concat_")):
            continue
        x, w_node = node.args[0], node.args[1]
        cat = getattr(gm, w_node.target)
        (split,) = node.users
        sizes = split.args[1]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        for item in list(split.users):
            i = item.args[1]
            name = f"{w_node.target}_rows{i}"
            gm.register_buffer(name, cat[starts[i]:starts[i] + sizes[i]], persistent=False)
            with graph.inserting_before(item):
                part = graph.get_attr(name)
                product = graph.call_function(torch.nn.functional.linear, (x, part))
            product.meta = dict(item.meta)
            item.replace_all_uses_with(product)
            graph.erase_node(item)
        graph.erase_node(split)
        graph.erase_node(node)
        if not w_node.users:
            graph.erase_node(w_node)
    graph.lint()
    gm.recompile()
    return program


def gemv_all(program):
    """``program`` (a clone) with every projection of a batch-1 to 16 step lowered to ``lsa::small_m_linear``."""
    from lsa_rewrite.passes import LowerSmallMLinearPass

    LowerSmallMLinearPass(normed_inputs=True)(program.module)
    return program


def gemv_norm(program, lm_head: bool = True):
    """``program`` (a clone) with the one-row products of an RMSNorm's output as ``lsa::small_m_linear_rmsnorm``
    (``LowerSmallMLinearPass(max_rows=1, normed_inputs=False, fuse_norm=True)`` after the library's passes);
    ``lm_head=False``: the last of them (the lm head) back to the op's reference, which Inductor lowers itself."""
    from lsa_rewrite.kernels.small_m_linear import small_m_linear_rmsnorm_ref
    from lsa_rewrite.passes import LowerSmallMLinearPass

    fused_op = torch.ops.lsa.small_m_linear_rmsnorm.default
    lowered = LowerSmallMLinearPass(max_rows=1, normed_inputs=False, fuse_norm=True)(program.module)
    fused = [n for n in program.module.graph.nodes if n.op == "call_function" and n.target is fused_op]
    if not lm_head and fused:
        fused[-1].target = small_m_linear_rmsnorm_ref
        program.module.recompile()
    TRANSFORM_NOTES.clear()
    TRANSFORM_NOTES.update(gemv_lowered=lowered, gemv_norm_fused=len(fused) - (0 if lm_head else 1))
    print("gemv_norm:", TRANSFORM_NOTES, flush=True)
    return program


TRANSFORM_NOTES: dict = {}  # what the last graph transform reported (the concat variants: groups, memory)


def concat(program, min_group: int = 2):
    """``program`` (a clone) with ``ConcatSharedInputLinearPass(min_group=...)`` applied (after the library's
    passes); the model's grouped weights move into one storage per group (values unchanged, kept after the variant)."""
    from lsa_rewrite.passes.concat_linear import ConcatSharedInputLinearPass

    cuda = DEVICE == "cuda"
    before = torch.cuda.memory_allocated() if cuda else 0
    replaced = ConcatSharedInputLinearPass(min_group=min_group, devices=(DEVICE,))(program.module)
    if cuda:
        torch.cuda.synchronize()
    TRANSFORM_NOTES.clear()
    TRANSFORM_NOTES.update(concat_products=replaced, concat_min_group=min_group,
                           memory_allocated_change_bytes=(torch.cuda.memory_allocated() - before) if cuda else None)
    print("concat:", TRANSFORM_NOTES, flush=True)
    return program


def gemv_qkv(program):
    """``program`` (a clone) with q/k/v concatenated (``concat(program, 3)``) and that product lowered to
    ``lsa::small_m_linear`` (``LowerSmallMLinearPass(max_rows=1, normed_inputs=False, normed_concat=True)``)."""
    from lsa_rewrite.passes import LowerSmallMLinearPass

    concat(program, 3)
    notes = dict(TRANSFORM_NOTES)
    lowered = LowerSmallMLinearPass(max_rows=1, normed_inputs=False, normed_concat=True, devices=(DEVICE,))(program.module)
    TRANSFORM_NOTES.update(notes, gemv_lowered=lowered)
    print("gemv_qkv:", TRANSFORM_NOTES, flush=True)
    return program


GRAPH_TRANSFORMS = {
    "visible_writes": visible_writes, "unfused_append": unfused_append, "no_gemv": no_gemv, "gemv_unnormed": gemv_unnormed,
    "gemv_all": gemv_all, "concat": concat, "concat_qkv": lambda program: concat(program, 3),
    "gemv_qkv": gemv_qkv, "gemv_od": gemv_od, "gemv_norm": gemv_norm, "gemv_norm_nolmhead": lambda program: gemv_norm(program, lm_head=False),
}


def _gemv_module():
    import importlib

    return importlib.import_module("lsa_rewrite.kernels.small_m_linear")  # the module, not the op the package exports


LIBRARY_GEMV_TABLE = dict(_gemv_module().TABLE)


def set_gemv_table(table: dict | None) -> None:
    """The GEMV's ``TABLE``: the library's, updated with ``table`` (a ``benchmarks/gemv.py`` JSON's ``table``)."""
    gemv = _gemv_module()
    gemv.TABLE.clear()
    gemv.TABLE.update(LIBRARY_GEMV_TABLE)
    for key, config in (table or {}).items():
        n, k = (int(v) for v in key.split(","))
        gemv.TABLE[(n, k)] = gemv.GemvConfig(**config)


def load_gemv_table(path: str, *, apply: bool = True) -> dict:
    """The launch table that ``benchmarks/gemv.py`` chose (its JSON's ``table``), put into the GEMV's ``TABLE``
    for this process unless ``apply`` is false; returns it (nothing, with a message, when the file is missing)."""
    import json

    try:
        table = json.loads(Path(path).read_text())["table"]
    except (OSError, KeyError, ValueError) as exc:
        print(f"--gemv-table {path}: not loaded ({type(exc).__name__}: {exc}); the library's table is used", flush=True)
        return {}
    if apply:
        set_gemv_table(table)
    print(f"--gemv-table {path}: {table}" + ("" if apply else " (variant cd_gemv_table only)"), flush=True)
    return table


def set_copy_programs(programs: int) -> int:
    """Set the recall copy kernel's default program count; returns the previous one."""
    import importlib

    copy_chunks = importlib.import_module("lsa_rewrite.kernels.copy_chunks")  # the module, not the op the package exports
    previous = copy_chunks.copy_chunks_triton.__kwdefaults__["programs"]
    copy_chunks.copy_chunks_triton.__kwdefaults__["programs"] = programs
    return previous


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default=None, help="prompt lengths (default 131072; --tiny: 4096)")
    parser.add_argument("--lags", default="4", help="recall_lag values, one prefill each (the first: the variants too)")
    parser.add_argument("--variants", default="default", help=f"Inductor settings for the step, first context and lag: {','.join(VARIANTS)}")
    parser.add_argument("--lag-max", default="none", help="recall_lag_max values measured on every store (none: the lag)")
    parser.add_argument("--copy-programs", default=None, help="recall copy kernel program counts measured on every store (default: the library's)")
    parser.add_argument("--steps", type=int, default=None, help="timed decode steps per loop (default 256; --tiny: 128)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 32)")
    parser.add_argument("--prefill-window", type=int, default=None,
                        help="run the prompts' attention over a local window of this many tokens (prefill time only; decode exact)")
    parser.add_argument("--time-budget-s", type=float, default=None)
    parser.add_argument("--gemv-table", default=None,
                        help="a benchmarks/gemv.py JSON whose launch table replaces the GEMV's own for this run "
                             "(for the cd_gemv_table variant only, when that variant is named)")
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU: checks the script, not a measurement")
    parser.add_argument("--out", default="benchmarks/results/step_breakdown.json")
    args = parser.parse_args()
    started = time.perf_counter()
    table_variant = "cd_gemv_table" in args.variants.split(",")
    gemv_table = load_gemv_table(args.gemv_table, apply=not table_variant) if args.gemv_table else None
    contexts = [int(c) for c in (args.contexts or ("4096" if args.tiny else "131072")).split(",")]
    lags = [int(x) for x in args.lags.split(",")]
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown --variants {unknown}; choose from {sorted(VARIANTS)}")
    lag_maxes = [None if x == "none" else int(x) for x in args.lag_max.split(",")]
    copy_programs = [int(x) for x in args.copy_programs.split(",")] if args.copy_programs else [None]
    steps = args.steps or (128 if args.tiny else 256)
    layers = args.layers or (2 if args.tiny else 32)
    model = build_model(layers, tiny=args.tiny)
    if args.prefill_window:
        use_local_prefill(model, args.prefill_window)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    embedding = emb.numel() * emb.element_size()
    base = LSAConfig(budget=0.135, chunk_size=64, interval=64, sink_tokens=64, recent_tokens=128, recall_lag=lags[0])
    lsa_rewrite.convert(model, base)
    kw = cache_kw(model)
    payload = {
        "benchmark": "step_breakdown", "environment": environment(), "tiny": args.tiny,
        "model": f"Llama-3-8B shape, random bf16 weights, {layers} layers", "weights_bytes": weights, "embedding_bytes": embedding,
        "batch": 1, "steps": steps, "lsa_config": base.to_dict(), "prefill_window": args.prefill_window,
        "floor": f"(weights_bytes + kv_gpu_bytes) / {COPY_BANDWIDTH / 1e12} TB/s", "skipped": [], "results": [],
        "gemv_table": gemv_table,
    }
    due = time_budget(started, args.time_budget_s, payload["skipped"])
    for ci, ctx in enumerate(contexts):
        torch.manual_seed(ctx)
        prompt = torch.randint(0, model.config.vocab_size, (1, ctx), device=DEVICE)
        for li, lag in enumerate(lags):
            if not due(f"{ctx} lag {lag}"):
                continue
            config = dataclasses.replace(base, recall_lag=lag)
            names = variants if (ci == 0 and li == 0) else ["default"]
            cache, token, prefill_s, first_steps_s = prefill(model, prompt, config, steps, len(names) * len(lag_maxes) * len(copy_programs))
            for vi, name in enumerate(names):
                if vi and not due(f"{ctx} lag {lag} {name}"):
                    continue
                compile_s = None
                TRANSFORM_NOTES.clear()
                if table_variant:  # the launches are captured in the step's CUDA graph when it is compiled
                    set_gemv_table(gemv_table if name == "cd_gemv_table" else None)
                if vi or name != "default":
                    try:
                        token, compile_s = recompile(model, kw, cache, token, VARIANTS[name])
                    except Exception as exc:  # one variant failing to compile must not lose the others
                        payload["skipped"].append(f"{ctx} lag {lag} {name}: {type(exc).__name__}: {str(exc)[:500]}")
                        print("variant failed:", payload["skipped"][-1], flush=True)
                        forget_compiled(model)
                        continue
                notes = dict(TRANSFORM_NOTES)
                for lag_max in lag_maxes:
                    for programs in copy_programs:
                        if not due(f"{ctx} lag {lag} {name} lag_max {lag_max} programs {programs}"):
                            continue
                        cache.store.lag_max = lag if lag_max is None else max(lag, min(lag_max, config.interval - 1))
                        previous = set_copy_programs(programs) if programs else None
                        try:
                            res, token = measure(model, kw, cache, token, steps, config.interval, weights, embedding)
                        finally:
                            if previous is not None:
                                set_copy_programs(previous)
                        res.update(context=ctx, recall_lag=lag, recall_lag_max=cache.store.lag_max, copy_programs=programs,
                                   variant=name, inductor=VARIANTS[name], prefill_s=prefill_s, first_steps_s=first_steps_s,
                                   recompile_s=compile_s, transform=notes or None,
                                   gemv_in_step=any("small_m_gemv" in k["kernel"] for k in res.get("top_kernels", [])) if "top_kernels" in res else None)
                        payload["results"].append(res)
                        print({k: v for k, v in res.items() if k not in ("top_kernels", "window")}, flush=True)
                        if "window" in res:
                            print("  window:", {k: v for k, v in res["window"].items() if k != "selection_top"}, flush=True)
                        payload["elapsed_s"] = round(time.perf_counter() - started, 1)
                        write_json(args.out, payload)
                cache.store.lag_max = config.lag_max
            if any(name != "default" for name in names):  # the next prefill compiles its step afresh, by default
                forget_compiled(model)
            del cache
    release_store(model)
    payload["elapsed_s"] = round(time.perf_counter() - started, 1)
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
