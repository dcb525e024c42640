"""Shared bits of the GPU benchmarks: environment record, CUDA-graph timing, JSON output."""

from __future__ import annotations

import datetime
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


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


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
