"""The README's supported-models table: a sweep of decoder families on the CPU, from the test zoo (``tests/zoo.py``).

For every zoo family (tiny random-weight float32 models built from each architecture's HF config: the
original seven, the sweep's other families, and the plain buffer-cache decoder), under each attention
implementation HF offers for it (SDPA and eager; eager only where HF has no SDPA path):

- convert it and report what the passes found (layers rewritten to sparse decode attention, sliding-window
  layers kept as an exact ring);
- covering budget: greedy decoding (8 steps after a 40-token prompt) gives the dense model's tokens and
  logits (max abs diff <= 1e-4), with every chunk resident from the start (``covering``) and with a store
  sized for twice the context, so that selection, the mirror and recall run while every chunk still fits
  (``covering_selected``);
- sparse budget (96 tokens, a 200-token prompt, 40 steps): selections happen and the resident pool holds
  no more than the budget.

Families ``convert()`` refuses (``zoo.REFUSED``, and a few older ones tried here only) get a row with
``status: "refused"``, the error, and whether the refused model still generates its tokens as before. A
family the installed transformers lacks, or cannot build, gets ``status: "skipped"``. Every row has a
``status``: ``"works"`` (every check above holds), ``"FAILED"`` (it converts but a check fails: a bug),
``"refused"`` or ``"skipped"``. Writes JSON (``--out``) and prints the Markdown table.

    python benchmarks/supported_models.py --out benchmarks/results/supported_models.json
    python benchmarks/supported_models.py --only gemma2 falcon --out /tmp/some.json
"""

from __future__ import annotations

import argparse
import dataclasses
import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402
from helpers import buffer_greedy, hf_greedy, no_eos  # noqa: E402
from zoo import (  # noqa: E402
    _GPT,
    DYNAMIC_CAPTURE_ONLY,
    MAX_POSITIONS,
    REFUSED,
    ZOO_NAMES,
    _auto,
    attn_implementations,
    make_model,
)

import lsa_rewrite  # noqa: E402
from lsa_rewrite import LSAConfig  # noqa: E402
from lsa_rewrite.passes import CaptureError  # noqa: E402

PROMPT, NEW, CHUNK = 40, 8, 16
SPARSE_PROMPT, SPARSE_NEW, SPARSE_BUDGET = 200, 40, 96
TOL = 1e-4
_COMMON = dict(chunk_size=CHUNK, interval=16, sink_tokens=16, recent_tokens=16)
COVERING = LSAConfig(budget=4096, **_COMMON)
COVERING_SELECTED = LSAConfig(budget=PROMPT + NEW + CHUNK, max_context=2 * (PROMPT + NEW), **_COMMON)
SPARSE = LSAConfig(budget=SPARSE_BUDGET, recall_lag=0, **_COMMON)

# Older families tried by this sweep only (no test), under each attention implementation HF has for them;
# BioGPT (tests/zoo.py DYNAMIC_CAPTURE_ONLY) converts with capture_cache="dynamic" only.
TRIED = {
    "xglm": _auto("xglm", d_model=64, ffn_dim=128, num_layers=2, attention_heads=4, max_position_embeddings=MAX_POSITIONS,
                  init_std=0.2, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                  **{k: v for k, v in _GPT.items() if k != "initializer_range"}),
    **DYNAMIC_CAPTURE_ONLY,
    "dbrx": _auto("dbrx", d_model=64, n_layers=2, n_heads=4, max_seq_len=MAX_POSITIONS, attn_config={"kv_n_heads": 2},
                  ffn_config={"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2}, **_GPT),
}


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _greedy(model, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(model, "generate"):
        return hf_greedy(model, ids, steps)
    return buffer_greedy(model, ids, steps)


def _same(dense, converted) -> tuple[bool, float]:
    (seq_d, logits_d), (seq_c, logits_c) = dense, converted
    diff = float((logits_c - logits_d).abs().max()) if logits_c.shape == logits_d.shape else float("inf")
    return bool(torch.equal(seq_c, seq_d)) and diff <= TOL, diff


def _checks(model, capture_cache: str) -> tuple[dict, list[dict]]:
    ids = torch.randint(3, 250, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    long_ids = torch.randint(3, 250, (1, SPARSE_PROMPT), generator=torch.Generator().manual_seed(1))
    configs = [dataclasses.replace(c, capture_cache=capture_cache) for c in (COVERING, COVERING_SELECTED, SPARSE)]
    dense = _greedy(copy.deepcopy(model), ids, NEW)
    covering = lsa_rewrite.convert(copy.deepcopy(model), configs[0])
    covering_ok, covering_diff = _same(dense, _greedy(covering, ids, NEW))
    report = covering.lsa.report()
    selected = lsa_rewrite.convert(copy.deepcopy(model), configs[1])
    selected_ok, selected_diff = _same(dense, _greedy(selected, ids, NEW))
    sparse = lsa_rewrite.convert(copy.deepcopy(model), configs[2])
    _greedy(sparse, long_ids, SPARSE_NEW)
    fp = lsa_rewrite.footprint(sparse)
    found = dict(covering_ok=covering_ok, covering_diff=covering_diff, selected_ok=selected_ok, selected_diff=selected_diff, fp=fp)
    return found, report


def works_row(name: str, attn: str, build=None) -> dict:
    """Convert family ``name`` (a zoo model, or ``build()``'s config) under attention ``attn`` and check it."""
    from transformers import AutoModelForCausalLM

    out = {"family": name, "attention": attn, "class": None}
    try:
        if build is None:
            model = no_eos(make_model(name, attn_implementation=attn))
        else:
            torch.manual_seed(0)
            model = no_eos(AutoModelForCausalLM.from_config(build(), attn_implementation=attn).to(torch.float32).eval())
    except Exception as exc:  # a family this transformers cannot build
        return {**out, "status": "skipped", "error": f"could not build the model: {_first_line(exc)}"}
    if not hasattr(model, "generate"):
        model.setup_caches(1, 256)  # a plain decoder's cache buffers (batch, length) come before convert()
    out["class"] = type(model).__name__
    capture = "static"
    try:
        try:
            found, report = _checks(model, capture)
        except CaptureError as exc:  # a model that traces only over a DynamicCache (the error says to try it)
            if "capture_cache='dynamic'" not in str(exc):
                raise
            torch._dynamo.reset()
            capture = "dynamic"
            found, report = _checks(model, capture)
    except Exception as exc:  # refused (or broken): the row says which
        torch._dynamo.reset()
        return {**out, "status": "refused", "error": _first_line(exc)}
    torch._dynamo.reset()
    fp = found["fp"]
    covering_ok, covering_diff = found["covering_ok"], found["covering_diff"]
    selected_ok, selected_diff = found["selected_ok"], found["selected_diff"]
    rewritten = sum(r["action"] == "rewrite" for r in report)
    # Sliding-window layers keep an exact ring of their window, whatever the budget: only a model with
    # sparsely attended layers has a pool the budget sizes, and selections to make.
    within = rewritten == 0 or fp["slots_per_sequence"] * CHUNK <= -(-SPARSE_BUDGET // CHUNK) * CHUNK
    selects = fp["selections"] > 0 or rewritten == 0
    if capture != "static":
        out["capture_cache"] = capture
    out.update(
        rewritten=rewritten,
        ring=sum(r["action"] == "ring" for r in report),
        layers=len(report),
        covering_equals_dense=covering_ok,
        covering_max_logit_diff=covering_diff,
        covering_selected_equals_dense=selected_ok,
        covering_selected_max_logit_diff=selected_diff,
        sparse_selections=fp["selections"],
        sparse_ratio=round(fp["ratio"], 3),
        sparse_resident_tokens=fp["slots_per_sequence"] * CHUNK if rewritten else None,
        sparse_within_budget=within,
    )
    out["status"] = "works" if covering_ok and selected_ok and within and selects else "FAILED"
    return out


def refused_row(name: str, build_config, expected: str | None) -> dict:
    from transformers import AutoModelForCausalLM

    out = {"family": name, "attention": "eager", "class": None}
    try:
        torch.manual_seed(0)
        model = no_eos(AutoModelForCausalLM.from_config(build_config(), attn_implementation="eager").to(torch.float32).eval())
    except Exception as exc:
        return {**out, "status": "skipped", "error": f"could not build the model: {_first_line(exc)}"}
    out["class"] = type(model).__name__
    ids = torch.randint(3, 250, (1, 24), generator=torch.Generator().manual_seed(0))
    try:
        before = hf_greedy(model, ids, 6)[0]
    except Exception as exc:  # the dense model itself does not generate here
        return {**out, "status": "skipped", "error": f"the dense model does not generate: {_first_line(exc)}"}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        lsa_rewrite.convert(model, LSAConfig(chunk_size=CHUNK))
    except Exception as exc:
        unchanged = getattr(model, "lsa", None) is None and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
        unchanged = unchanged and torch.equal(hf_greedy(model, ids, 6)[0], before)
        out.update(status="refused", error=_first_line(exc), left_unchanged=bool(unchanged))
        if expected is not None:
            out["error_names_feature"] = expected in str(exc)
    else:
        out.update(status="FAILED", error="convert() accepted a model it should refuse")
    torch._dynamo.reset()
    return out


def markdown(rows: list[dict]) -> str:
    lines = [
        "| family | class | attention | status | layers rewritten / ring | covering budget = dense | sparse run |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] in ("refused", "skipped"):
            lines.append(f"| {r['family']} | {r['class'] or '-'} | {r['attention']} | {r['status']} | - | - | {r['error']} |")
            continue
        covering = "yes" if r["covering_equals_dense"] and r["covering_selected_equals_dense"] else "NO"
        sparse = f"{r['sparse_selections']} selections, {r['sparse_ratio']:.0%} of dense KV" if r["rewritten"] else "ring only"
        if not r["sparse_within_budget"]:
            sparse += " (OVER BUDGET)"
        status = r["status"] + (f" ({r['capture_cache']} capture)" if "capture_cache" in r else "")
        lines.append(
            f"| {r['family']} | {r['class']} | {r['attention']} | {status} | {r['rewritten']} / {r['ring']} | {covering} | {sparse} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/supported_models.json")
    parser.add_argument("--only", nargs="*", help="families to run (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    wanted = set(args.only) if args.only else None
    rows = []
    for name in ZOO_NAMES:
        if wanted is not None and name not in wanted:
            continue
        for attn in attn_implementations(name) if name != "buffer" else ("sdpa",):
            rows.append(works_row(name, attn))
            print(rows[-1], flush=True)
    for name, (build, expected) in REFUSED.items():
        if wanted is None or name in wanted:
            rows.append(refused_row(name, build, expected))
            print(rows[-1], flush=True)
    for name, build in TRIED.items():
        if wanted is None or name in wanted:
            for attn in ("sdpa", "eager"):
                row = works_row(name, attn, build)
                if attn == "sdpa" and row["status"] == "skipped":
                    continue  # no SDPA path in HF for this family
                rows.append(row)
                print(rows[-1], flush=True)
    write_json(args.out, {"benchmark": "supported_models", "environment": environment(), "command": "python " + " ".join(sys.argv), "rows": rows})
    print(markdown(rows))


if __name__ == "__main__":
    main()
