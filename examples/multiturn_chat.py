"""Multi-turn over the lossless CPU mirror: HF's cache-reuse pattern on a converted model.

    out = model.generate(ids, return_dict_in_generate=True)
    out = model.generate(torch.cat([out.sequences, next_turn], 1), cache=out.cache)   # or past_key_values=

Only the new turn's tokens are prefilled; they attend exactly to the whole conversation (the history
is read back from the store's pool and CPU mirror), while the device keeps only the budget. With a
real chat model (``--model``, e.g. SmolLM2's GGUF), two questions about different keys of one long
context are asked in turn.

    python examples/multiturn_chat.py --model $(python -c 'from lsa_rewrite.loading import find_smollm2_gguf as f; print(f())')
    python examples/multiturn_chat.py --short     # tiny random model: turn 2 equals dense at a covering budget
"""

from __future__ import annotations

import argparse
import copy
import inspect

import torch
from _tiny import load, random_prompt

import lsa_rewrite
from lsa_rewrite import LSAConfig


def cache_kw(model) -> str:
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def conversation(model, turns: list[torch.Tensor], new_tokens: int) -> list[torch.Tensor]:
    """Each turn's reply tokens; every turn after the first reuses the previous cache."""
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True)
    out = model.generate(turns[0], **kwargs)
    replies = [out.sequences[:, turns[0].shape[1]:]]
    for ids in turns[1:]:
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        history = torch.cat([out.sequences, ids], 1)
        out = model.generate(history, **kwargs, **{cache_kw(model): cache})
        replies.append(out.sequences[:, history.shape[1]:])
    return replies


def chat_turns(tokenizer, context: str, questions: list[str]) -> list[torch.Tensor]:
    """The chat-template tokens of each user turn (the first carries the context)."""
    turns, messages, prefix = [], [], ""
    for i, q in enumerate(questions):
        messages.append({"role": "user", "content": (context + "\n" if i == 0 else "") + q})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        turns.append(tokenizer(text[len(prefix):], return_tensors="pt", add_special_tokens=False)["input_ids"])
        messages.append({"role": "assistant", "content": "{reply}"})
        prefix = tokenizer.apply_chat_template(messages, tokenize=False).split("{reply}")[0]
        messages.pop()
    return turns


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a chat model (HF directory or .gguf); default: a tiny random Llama")
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--short", action="store_true")
    args = parser.parse_args(argv)
    model, tokenizer = load(args.model)
    if tokenizer is None or args.short:
        budget = 1.0  # covering: the converted conversation must equal the dense one
        turns = [random_prompt(300 if args.short else 1200, seed=0), random_prompt(20, seed=1), random_prompt(12, seed=2)]
        new_tokens = 6
    else:
        budget = args.budget
        filler = " ".join(f"Note {i}: the weather was mild and the trains ran on time." for i in range(60))
        context = f"{filler[:1500]} The code for the red door is 4417. {filler[1500:]} The code for the blue door is 9082."
        turns = chat_turns(tokenizer, context, ["What is the code for the red door?", "And the code for the blue door?"])
        new_tokens = 24
    converted = lsa_rewrite.convert(
        copy.deepcopy(model), LSAConfig(budget=budget, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=32)
    )
    dense = conversation(model, turns, new_tokens)
    ours = conversation(converted, turns, new_tokens)
    for i, (d, o) in enumerate(zip(dense, ours)):
        show = (lambda t: tokenizer.decode(t[0], skip_special_tokens=True)) if tokenizer is not None else (lambda t: t[0].tolist())
        print(f"turn {i + 1}: dense {show(d)!r}\n        lsa   {show(o)!r}")
    fp = lsa_rewrite.footprint(converted)
    print(f"store holds {fp['tokens']} tokens; device KV {fp['ratio']:.1%} of dense; CPU mirror {fp['mirror_bytes']:,} bytes")
    if budget >= 1.0:
        assert all(torch.equal(d, o) for d, o in zip(dense, ours)), "a covering budget must give the dense conversation"


if __name__ == "__main__":
    main()
