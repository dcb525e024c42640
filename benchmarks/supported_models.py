"""The README's supported-models table, generated from the test zoo (``tests/zoo.py``), on the CPU.

For every zoo family (tiny random-weight models built from each architecture's HF config, and the
plain buffer-cache decoder), under SDPA and eager attention: convert it, report what the passes found
(layers rewritten to sparse decode attention, sliding-window layers kept as an exact ring), and check
that a covering budget decodes the dense tokens (greedy, 8 steps after a 40-token prompt) and that a
sparse budget runs selections. Writes JSON (``--out``) and prints the Markdown table.

    python benchmarks/supported_models.py --out benchmarks/results/supported_models.json
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402
from helpers import buffer_greedy, hf_greedy, no_eos  # noqa: E402
from zoo import ZOO_NAMES, make_model  # noqa: E402

import lsa_rewrite  # noqa: E402
from lsa_rewrite import LSAConfig  # noqa: E402

COVERING = LSAConfig(budget=4096, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=16)
SPARSE = LSAConfig(budget=96, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=16, recall_lag=0)


def decode(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    if hasattr(model, "generate"):
        return hf_greedy(model, ids, steps)[0]
    return buffer_greedy(model, ids, steps)[0]


def row(name: str, attn: str) -> dict:
    model = no_eos(make_model(name, attn_implementation=attn))
    if not hasattr(model, "generate"):
        model.setup_caches(1, 256)  # a plain decoder's cache buffers (batch, length) come before convert()
    architecture = type(model).__name__
    ids = torch.randint(3, 250, (1, 40), generator=torch.Generator().manual_seed(0))
    long_ids = torch.randint(3, 250, (1, 200), generator=torch.Generator().manual_seed(1))
    out = {"family": name, "attention": attn, "class": architecture}
    try:
        dense = decode(copy.deepcopy(model), ids, 8)
        covering = lsa_rewrite.convert(copy.deepcopy(model), COVERING)
        if not hasattr(model, "generate"):
            covering_out = buffer_greedy(covering, ids, 8)[0]
        else:
            covering_out = hf_greedy(covering, ids, 8)[0]
        report = covering.lsa.report()
        sparse = lsa_rewrite.convert(copy.deepcopy(model), SPARSE)
        if hasattr(model, "generate"):
            hf_greedy(sparse, long_ids, 40)
        else:
            buffer_greedy(sparse, long_ids, 40)
        fp = lsa_rewrite.footprint(sparse)
        out.update(
            rewritten=sum(r["action"] == "rewrite" for r in report),
            ring=sum(r["action"] == "ring" for r in report),
            layers=len(report),
            covering_equals_dense=bool(torch.equal(dense, covering_out)),
            sparse_selections=fp["selections"],
            sparse_ratio=round(fp["ratio"], 3),
        )
    except Exception as exc:  # a family the passes cannot convert: the table says why
        out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    torch._dynamo.reset()
    return out


def markdown(rows: list[dict]) -> str:
    lines = [
        "| family | class | attention | layers rewritten / ring | covering budget = dense | sparse run |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['family']} | {r['class']} | {r['attention']} | - | - | {r['error']} |")
            continue
        lines.append(
            f"| {r['family']} | {r['class']} | {r['attention']} | {r['rewritten']} / {r['ring']} | "
            f"{'yes' if r['covering_equals_dense'] else 'NO'} | {r['sparse_selections']} selections, {r['sparse_ratio']:.0%} of dense KV |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/supported_models.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in ZOO_NAMES:
        for attn in ("sdpa", "eager") if name != "buffer" else ("sdpa",):
            rows.append(row(name, attn))
            print(rows[-1], flush=True)
    write_json(args.out, {"benchmark": "supported_models", "environment": environment(), "command": "python " + " ".join(sys.argv), "rows": rows})
    print(markdown(rows))


if __name__ == "__main__":
    main()
