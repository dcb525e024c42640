"""Shared bits of the GPU benchmarks: environment record, CUDA-graph timing, JSON output."""

from __future__ import annotations

import datetime
import gc
import json
import platform
import statistics
from pathlib import Path
from typing import Any, Callable

import torch

COPY_BANDWIDTH = 4.2e12  # bytes/s, H200 device-to-device copy measured here (shared/REFERENCE.md)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # scripts with a CPU check mode run there too


def sync() -> None:
    """Wait for the GPU (no-op on the CPU): around host-side timings."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def environment() -> dict[str, Any]:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover
        triton_version = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def time_cuda_graph(fn: Callable[[], Any], *, iters: int = 50, warmup: int = 5, repeats: int = 3) -> float:
    """Median milliseconds per call of ``fn`` replayed from a CUDA graph of ``iters`` calls.

    Replaying a graph removes launch overhead from the measurement, as in a CUDA-graph decode step.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def timed_prefill(model, prompt: torch.Tensor):
    """Prefill ``prompt`` through a converted HF model (the last position's logits only), the GPU synced
    before the clock stops: ``(cache, greedy next token [B, 1], seconds)``."""
    import time

    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    cache = out[model.lsa.adapter.cache_field]
    token = out.logits[:, -1:].argmax(-1)
    sync()
    return cache, token, time.perf_counter() - t0


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


def release_store(model) -> None:
    """Let a converted model's store (device tensors, host mirror) and its compiled step's CUDA graph go,
    so that the next run allocates from nothing (no-op for a model without a store)."""
    import gc

    runtime = getattr(model, "lsa", None)
    if runtime is not None:
        if runtime.store is not None:
            runtime.store.synchronize()
        runtime.store = None
        if runtime.compiled is not None:
            runtime.compiled.release()
        runtime.compiled = None
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def time_budget(started: float, budget_s: float | None, skipped: list[str]) -> Callable[[str], bool]:
    """``due(what)``: whether a run may start within ``budget_s`` seconds of ``started`` (``perf_counter``);
    a run that may not is listed in ``skipped`` (the JSON says what was left out) and announced."""
    import time

    def due(what: str) -> bool:
        elapsed = time.perf_counter() - started
        if budget_s is not None and elapsed > budget_s:
            skipped.append(f"{what}: not started, {elapsed:.0f} s of the {budget_s:.0f} s budget used")
            print("skipped", what, flush=True)
            return False
        return True

    return due


LOCAL_PREFILL = "lsa_bench_local_prefill"


def use_local_prefill(model, window: int) -> None:
    """Register and select an attention function that runs prompts (more than ``window`` query tokens)
    over a local causal window and anything shorter (the decode step, which convert() traces) through
    transformers' SDPA function unchanged."""
    import torch.nn.functional as F
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        t = query.shape[2]
        if t <= window or key.shape[2] != t:  # decode steps, short prompts, a later turn: exact
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        rep = query.shape[1] // key.shape[1]
        out = torch.empty_like(query)
        for s in range(0, t, window):
            e, ks = min(s + window, t), max(0, s - window)
            qi = torch.arange(s, e, device=query.device)[:, None]
            kj = torch.arange(ks, e, device=query.device)[None, :]
            k = key[:, :, ks:e].repeat_interleave(rep, 1)
            v = value[:, :, ks:e].repeat_interleave(rep, 1)
            out[:, :, s:e] = F.scaled_dot_product_attention(query[:, :, s:e], k, v, attn_mask=kj <= qi, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(LOCAL_PREFILL, attention)
    AttentionMaskInterface.register(LOCAL_PREFILL, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation(LOCAL_PREFILL)


def forget_compiled(model) -> None:
    """Drop a converted model's compiled decode step (CUDA graph and Dynamo caches) so that the next step compiles anew."""
    runtime = model.lsa
    if runtime.compiled is not None:
        runtime.compiled.release()
    runtime.compiled = None
    runtime.compiled_modules.clear()
    torch._dynamo.reset()
    gc.collect()
