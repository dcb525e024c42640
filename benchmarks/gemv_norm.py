"""GPU check and timing: ``lsa::small_m_linear_rmsnorm`` (the one-row GEMV with an RMSNorm prologue) on the
Llama-3-8B normed products: q 4096x4096, k/v 1024x4096, gate/up 14336x4096, lm head 128256x4096, bf16.

Not a test (CI has no GPU). Per shape: the library's launch (``TABLE``) into a NaN-poisoned output, against
an fp32 reference of norm + linear (``rel_err``) and against the op's PyTorch reference, which rounds the
normed x to bf16 where Hugging Face's ``LlamaRMSNorm`` does (``rel_err_model``); the op through
``torch.ops``; the same bits twice. Then time per call, CUDA graph replay of back-to-back calls over
weight copies 4x the L2 cache: the fused op, the plain GEMV (``lsa::small_m_linear``) on an already
normed x, and with ``--inductor`` Inductor's lowering of norm + linear (``coordinate_descent_tuning``).

    python benchmarks/gemv_norm.py --out gemv_norm.json
    python benchmarks/gemv_norm.py --tiny      # the script itself on tiny shapes, CPU, Triton's interpreter
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import math
import os
import sys
import time
from pathlib import Path

if "--tiny" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, time_cuda_graph, write_json  # noqa: E402

import lsa_rewrite.kernels  # noqa: E402, F401

GEMV = importlib.import_module("lsa_rewrite.kernels.small_m_linear")
DTYPE = torch.bfloat16
L2_BYTES = 60 * 1024 * 1024
EPS = 1e-5
TOL = 1e-2
SHAPES = {"q": (4096, 4096), "kv": (1024, 4096), "gate_up": (14336, 4096), "lm_head": (128256, 4096)}
TINY = {"q": (40, 96), "lm_head": (300, 64)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inductor", action="store_true", help="time Inductor's norm + linear too (compiles per shape)")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/gemv_norm.json")
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    cuda = device == "cuda"
    payload = {"benchmark": "gemv_norm", "environment": environment(), "eps": EPS, "results": []}
    all_ok = True
    for name, (n, k) in (TINY if args.tiny else SHAPES).items():
        gen = torch.Generator(device=device).manual_seed(n + k)
        copies = max(1, math.ceil(4 * L2_BYTES / (n * k * 2)))
        x = (3 * torch.randn(1, 1, k, generator=gen, device=device)).to(DTYPE)
        g = (1 + 0.3 * torch.randn(k, generator=gen, device=device)).to(DTYPE)
        ws = [(torch.randn(n, k, generator=gen, device=device) / math.sqrt(k)).to(DTYPE) for _ in range(copies)]
        h = x.float()
        want = F.linear(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * g.float(), ws[0].float())
        model = GEMV.small_m_linear_rmsnorm_ref(x, g, EPS, ws[0]).float()  # bf16 rounding as the model's norm
        out = torch.full((1, n), float("nan"), dtype=DTYPE, device=device)
        got = GEMV.small_m_linear_rmsnorm_triton(x, g, EPS, ws[0], out=out).float()
        via_op = torch.ops.lsa.small_m_linear_rmsnorm(x, g, EPS, ws[0])
        again = GEMV.small_m_linear_rmsnorm_triton(x, g, EPS, ws[0])
        if cuda:
            torch.cuda.synchronize()
        err = lambda a, b: ((a.float() - b).norm() / b.norm()).item()  # noqa: E731
        res = {"shape": name, "n": n, "k": k, "config": GEMV.default_config(1, n, k, x.device).to_dict(),
               "written": not torch.isnan(out).any().item(), "rel_err": err(got, want), "rel_err_model": err(got, model),
               "model_vs_fp32": err(model, want), "op_equal": torch.equal(via_op.view(1, n), out),
               "reproducible": torch.equal(again.view(1, n), out)}
        res["ok"] = res["written"] and res["rel_err"] < TOL and res["reproducible"] and (res["op_equal"] or not cuda)  # CPU: the op runs its reference
        all_ok &= res["ok"]
        if cuda:
            normed = GEMV.small_m_linear_rmsnorm_ref(x, g, EPS, torch.eye(k, dtype=DTYPE, device=device))  # rough: the normed x
            runs = {
                "fused": lambda w, o: GEMV.small_m_linear_rmsnorm_triton(x, g, EPS, w, out=o),
                "gemv_plain": lambda w, o: GEMV.small_m_linear_triton(normed, w, out=o),
            }
            if args.inductor:
                compiled = torch.compile(GEMV.small_m_linear_rmsnorm_ref, options={"coordinate_descent_tuning": True})
                runs["inductor"] = lambda w, o: compiled(x, g, EPS, w)
            outs = [torch.empty(1, n, dtype=DTYPE, device=device) for _ in range(2)]
            for label, run in runs.items():
                counter = itertools.count()

                def call(run=run):
                    i = next(counter)
                    run(ws[i % copies], outs[i % 2])

                ms = time_cuda_graph(call, iters=max(24, copies), warmup=2, repeats=5)
                res[f"{label}_us"] = round(ms * 1e3, 2)
                res[f"{label}_tbs"] = round(n * k * 2 / (ms * 1e-3) / 1e12, 3)
        payload["results"].append(res)
        print(res, flush=True)
        ws.clear()  # free the weight copies before the next shape
    payload["all_ok"] = all_ok
    write_json(args.out, payload)
    print("ALL OK" if all_ok else "CHECK FAILED", flush=True)


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"elapsed {time.perf_counter() - started:.1f} s")
