"""Convert a transformers causal LM to LSA and compare it with the dense model under ``generate()``.

    python examples/hf_model.py                       # a tiny random Llama (no download), 2K-token prompt
    python examples/hf_model.py --model path/to/model.gguf --prompt-file long.txt --budget 0.135
    python examples/hf_model.py --short               # what the smoke test runs

At a covering budget (``--budget 1.0``) the converted model gives the dense tokens; below it, only
the selected chunks (plus sink and tail) stay resident and ``footprint()`` says how many bytes that is.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from _tiny import load, random_prompt

import lsa_rewrite
from lsa_rewrite import LSAConfig


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF model directory or .gguf file (default: a tiny random Llama)")
    parser.add_argument("--prompt-file", help="a text file to use as the prompt (real models)")
    parser.add_argument("--tokens", type=int, default=2048, help="random prompt length (tiny model)")
    parser.add_argument("--budget", type=float, default=0.25, help="resident KV as a fraction of the context")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--short", action="store_true", help="a 600-token prompt and 8 new tokens")
    args = parser.parse_args(argv)
    if args.short:
        args.tokens, args.new_tokens = 600, 8

    model, tokenizer = load(args.model)
    if args.prompt_file and tokenizer is not None:
        ids = tokenizer(open(args.prompt_file).read(), return_tensors="pt")["input_ids"]
    else:
        ids = random_prompt(args.tokens, vocab=model.config.vocab_size)
    config = LSAConfig(budget=args.budget, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=32)
    converted = lsa_rewrite.convert(copy.deepcopy(model), config)  # the dense model stays as it was

    results = {}
    for name, m in (("dense", model), ("lsa", converted)):
        started = time.perf_counter()
        with torch.no_grad():
            out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens, do_sample=False)
        results[name] = {"tokens": out[0, ids.shape[1]:].tolist(), "seconds": round(time.perf_counter() - started, 2)}
        if tokenizer is not None:
            results[name]["text"] = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    fp = lsa_rewrite.footprint(converted)
    agree = sum(a == b for a, b in zip(results["dense"]["tokens"], results["lsa"]["tokens"]))
    print(f"prompt {ids.shape[1]} tokens; budget {args.budget}")
    print(f"dense  {results['dense'].get('text', results['dense']['tokens'])}  ({results['dense']['seconds']} s)")
    print(f"lsa    {results['lsa'].get('text', results['lsa']['tokens'])}  ({results['lsa']['seconds']} s)")
    print(f"tokens equal to dense: {agree}/{args.new_tokens}")
    print(f"device KV: {fp['resident_kv_bytes']:,} bytes = {fp['ratio']:.1%} of dense ({fp['dense_kv_bytes']:,}); "
          f"CPU mirror {fp['mirror_bytes']:,}; {fp['selections']} selections")
    return {"results": results, "footprint": fp}


if __name__ == "__main__":
    main()
