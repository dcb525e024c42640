"""Calibration and training on CUDA give the CPU's dump and a working indexer (a check, not a speed test).

``lsa_rewrite.calibrate`` runs the model on whatever device it is on; every record is moved to the CPU
before it is written. This runs the four ways calibration records attention (docs/indexer.md, "Which
models calibrate") on CUDA and on the CPU over the same documents and compares every recorded tensor (float ones within 1e-4; golden labels may flip at the nucleus'
edge, at most 1% of them):

- ``llama``: transformers' attention registry;
- ``falcon``: its own ``scaled_dot_product_attention`` call (outside the registry);
- ``gpt_neo``: eager attention, the softmax over its ``q @ k^T`` scores;
- ``buffer``: the plain buffer-cache decoder (its SDPA calls in layer order, its cache buffers put back).

Tiny random-weight float32 models from the test zoo (``tests/zoo.py``), the byte tokenizer, four short
documents. Then ``train_indexer(..., device="cuda")`` on the CUDA dump (one epoch) and ``convert`` on CUDA at a
covering budget: the dense greedy tokens. Writes JSON (``--out``).

    python benchmarks/calibrate_gpu.py --out benchmarks/results/calibrate_gpu.json
    python benchmarks/calibrate_gpu.py --device cpu --out /tmp/dry.json   # the script itself, on the CPU
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402
from zoo import make_model  # noqa: E402

import lsa_rewrite  # noqa: E402
from lsa_rewrite import LSAConfig  # noqa: E402
from lsa_rewrite.indexer.calibrate import calibrate  # noqa: E402
from lsa_rewrite.indexer.documents import ByteTokenizer, builtin_documents, calibration_tasks  # noqa: E402
from lsa_rewrite.indexer.dump import CalibrationDump  # noqa: E402
from lsa_rewrite.indexer.train import train_indexer  # noqa: E402

FAMILIES = {"llama": "sdpa", "falcon": "sdpa", "gpt_neo": "eager", "buffer": None}
CONFIG = LSAConfig(chunk_size=16, interval=16)
COVERING = LSAConfig(mode="dense", chunk_size=16, interval=16, selector="indexer")
TOL = 1e-4


def documents():
    tok = ByteTokenizer()
    tasks = calibration_tasks(tok, count=2, min_tokens=150, max_tokens=260, seed=0)
    return tok, builtin_documents(tok, min_tokens=150, max_tokens=260, count=2, seed=0) + [t.to_document(tok) for t in tasks]


def build(family: str, device: str) -> torch.nn.Module:
    model = make_model(family, attn_implementation=FAMILIES[family]).eval()
    if family == "buffer":
        model.setup_caches(max_batch_size=1, max_seq_length=512)
    return model.to(device)


@torch.no_grad()
def greedy(model, ids: torch.Tensor, new: int, plain: bool) -> torch.Tensor:
    if not plain:
        return model.generate(ids, max_new_tokens=new, do_sample=False)
    tokens = [ids]
    logits = model(ids, torch.arange(ids.shape[1], device=ids.device))[:, -1]
    for pos in range(ids.shape[1], ids.shape[1] + new):
        tokens.append(logits.argmax(-1, keepdim=True))
        if pos < ids.shape[1] + new - 1:
            logits = model(tokens[-1], torch.tensor([pos], device=ids.device))[:, -1]
    return torch.cat(tokens, 1)


def row(family: str, device: str) -> dict:
    tok, docs = documents()
    out: dict = {"family": family, "device": device}
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            dumps = {}
            for where in (device, "cpu"):
                model = build(family, where)
                before = {name: b.clone() for name, b in model.named_buffers()}
                dumps[where] = calibrate(model, tok, Path(tmp) / where, documents=docs, config=CONFIG, windows_per_document=3,
                                         progress=False, heldout_fraction=0.25)
                out.setdefault("buffers_restored", True)
                out["buffers_restored"] &= all(torch.equal(before[name], b) for name, b in model.named_buffers())
            got, want = (list(CalibrationDump(dumps[w]).windows()) for w in (device, "cpu"))
            diff, names, flipped, labels = 0.0, set(), 0, 0
            for a, b in zip(got, want):
                for name, value in a.items():
                    if not isinstance(value, torch.Tensor):
                        continue
                    names.add(name)
                    if name == "golden":  # a label at the nucleus' edge may flip with the last bits of a mass
                        flipped += int((value != b[name]).sum())
                        labels += value.numel()
                    elif value.numel():
                        diff = max(diff, float((value.double() - b[name].double()).abs().max()))
            out.update(windows=len(got), same_windows=len(got) == len(want), tensors=sorted(names), max_abs_diff=diff,
                       golden_flipped=flipped, golden_labels=labels)
            indexer, metrics = train_indexer(dumps[device], epochs=1, progress=False, device=device)
        model = build(family, device)
        ids = torch.randint(3, 250, (1, 80), generator=torch.Generator().manual_seed(0)).to(device)
        want_tokens = greedy(model, ids, 8, family == "buffer")
        converted = lsa_rewrite.convert(copy.deepcopy(model), COVERING, indexer=indexer)
        out["dense_tokens"] = bool(torch.equal(greedy(converted, ids, 8, family == "buffer"), want_tokens))
        out["ok"] = (out["same_windows"] and diff <= TOL and flipped <= 0.01 * labels and out["dense_tokens"]
                     and out["buffers_restored"])
    except Exception as exc:  # reported with the other rows
        out.update(error=f"{type(exc).__name__}: {exc}", ok=False)
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/calibrate_gpu.json")
    parser.add_argument("--device", default="cuda", help="cuda (the check), or cpu (a dry run of the script)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("calibrate_gpu.py needs CUDA (or --device cpu for a dry run)")
    warnings.filterwarnings("ignore")
    rows = []
    for family in FAMILIES:
        rows.append(row(family, args.device))
        print(rows[-1], flush=True)
    write_json(args.out, {"benchmark": "calibrate_gpu", "environment": environment(), "rows": rows,
                          "passed": sum(r["ok"] for r in rows), "total": len(rows)})
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
