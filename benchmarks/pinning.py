"""Benchmark: how fast can the CPU mirror be pinned? (The first LSA store of a shape pins 2 x N chunks.)

Each method runs in a fresh process (the host allocator reads its settings once) and allocates
``--gib`` GiB of pinned host memory, then copies 1 GiB of it to the GPU to check that it is pinned
(pageable memory copies at a fraction of the pinned rate):

- ``default``: ``torch.empty(..., pin_memory=True)`` (``cudaHostAlloc``);
- ``host_register``: the same with ``PYTORCH_CUDA_ALLOC_CONF=pinned_use_cuda_host_register:True,
  pinned_num_register_threads:8`` (malloc, pages touched by 8 threads, then ``cudaHostRegister``);
- ``register_after_touch``: a pageable tensor, zero-filled, then ``cudaHostRegister`` on it;
- ``arena``: ``lsa_rewrite.runtime.HostArena`` (what the store's mirror uses: ``cudaHostRegister`` on
  one pageable allocation, untouched).

``rss_gib``: how much the process's resident memory grew: with a size that is not a power of two it
shows whether the allocator rounded the request up.

    python benchmarks/pinning.py --gib 8.25 --out benchmarks/results/pinning.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

METHODS = {
    "default": {},
    "host_register": {"PYTORCH_CUDA_ALLOC_CONF": "pinned_use_cuda_host_register:True,pinned_num_register_threads:8"},
    "register_after_touch": {},
    "arena": {},
}


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(method: str, gib: float) -> dict:
    import torch

    from lsa_rewrite.runtime import HostArena  # imported before the clock starts

    torch.cuda.init()
    torch.empty(1, device="cuda")
    nbytes = int(gib * 2**30)
    rss_before = rss_bytes()
    start = time.perf_counter()
    if method == "arena":
        arena = HostArena(nbytes, torch.device("cuda"))
        host = arena.take((nbytes,), torch.uint8)
        extra = {}
    elif method == "register_after_touch":
        host = torch.zeros(nbytes, dtype=torch.uint8)
        touched = time.perf_counter()
        rc = torch.cuda.cudart().cudaHostRegister(host.data_ptr(), nbytes, 0)
        if int(rc) != 0:
            raise RuntimeError(f"cudaHostRegister failed: {rc}")
        extra = {"touch_s": round(touched - start, 2)}
    else:
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        extra = {}
    alloc_s = time.perf_counter() - start
    extra["rss_gib"] = round((rss_bytes() - rss_before) / 2**30, 2)
    device = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    for _ in range(2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        device.copy_(host[: 2**30], non_blocking=True)
        torch.cuda.synchronize()
        copy_s = time.perf_counter() - t0
    return {"method": method, "gib": gib, "pin_s": round(alloc_s, 2), "gib_per_s": round(gib / alloc_s, 2),
            "is_pinned": bool(host.is_pinned()), "h2d_gb_per_s": round(2**30 / copy_s / 1e9, 1), **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=8.25)
    parser.add_argument("--out", default="benchmarks/results/pinning.json")
    parser.add_argument("--method", choices=sorted(METHODS), help=argparse.SUPPRESS)  # one child process
    args = parser.parse_args()
    if args.method:
        print(json.dumps(measure(args.method, args.gib)))
        return
    from common import environment, write_json

    rows = []
    for method, env in METHODS.items():
        proc = subprocess.run(
            [sys.executable, __file__, "--method", method, "--gib", str(args.gib)],
            env={**os.environ, **env}, capture_output=True, text=True,
        )
        if proc.returncode != 0:
            row = {"method": method, "error": proc.stderr.strip().splitlines()[-1:]}
        else:
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(row, flush=True)
    write_json(args.out, {"benchmark": "pinning", "environment": environment(), "results": rows})


if __name__ == "__main__":
    main()
