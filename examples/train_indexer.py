"""Train your own lookahead indexer: calibrate (the model runs once), train (the model is never loaded),
convert with it.

    python examples/train_indexer.py --model path/to/model.gguf --out work/      # built-in texts and tasks
    python examples/train_indexer.py --short                                     # tiny random model, tiny docs

The same as the CLI:

    lsa-rewrite calibrate MODEL --out work/dump --chunk-size 16 --interval 16
    lsa-rewrite train work/dump --out work/indexer.safetensors
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from _tiny import load, random_prompt

import lsa_rewrite
from lsa_rewrite import LSAConfig
from lsa_rewrite.indexer.documents import ByteTokenizer, builtin_documents, calibration_tasks


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF directory or .gguf (default: a tiny random Llama, byte tokenizer)")
    parser.add_argument("--out", help="work directory (default: a temporary one)")
    parser.add_argument("--short", action="store_true", help="a few 300-token documents, 2 epochs")
    args = parser.parse_args(argv)
    work = Path(args.out or tempfile.mkdtemp(prefix="lsa-indexer-"))
    config = LSAConfig(chunk_size=16, interval=16, sink_tokens=16, recent_tokens=32, selector="indexer")
    model, tokenizer = load(args.model, layers=4)
    documents = None  # the built-in texts and tasks
    if tokenizer is None:  # the tiny model reads bytes
        tokenizer = ByteTokenizer()
        size = dict(min_tokens=300, max_tokens=400) if args.short else dict(min_tokens=800, max_tokens=1200)
        documents = builtin_documents(tokenizer, count=4, **size) + [
            t.to_document(tokenizer) for t in calibration_tasks(tokenizer, count=4, **size)
        ]
    dump = lsa_rewrite.calibrate(model, tokenizer, work / "dump", config=config, documents=documents, windows_per_document=8 if args.short else 16)
    indexer, metrics = lsa_rewrite.train_indexer(dump, out=work / "indexer.safetensors", epochs=2 if args.short else 8)
    print(f"indexer: {indexer.num_parameters():,} parameters, file {work / 'indexer.safetensors'}")
    for name in ("indexer", "untrained", "query_aware", "recency"):
        row = metrics.get(name)
        if row:
            print(f"  {name:12s} golden recall at 10% of chunks: {row['golden_recall']['0.1']:.3f}")
    converted = lsa_rewrite.convert(copy.deepcopy(model), LSAConfig(**{**config.to_dict()["_data"], "budget": 1.0}), indexer=indexer)
    ids = random_prompt(200, vocab=256) if args.model is None else tokenizer("Hello", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = converted.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    print(f"converted with the indexer; generated {out.shape[1] - ids.shape[1]} tokens")
    return metrics


if __name__ == "__main__":
    main()
