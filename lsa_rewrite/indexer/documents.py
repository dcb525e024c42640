"""Long documents and synthetic long-context tasks for calibrating (and evaluating) the indexer, offline.

Three sources, all without network access:

- ``builtin_documents``: long real texts that every CPython install carries: the standard library's
  own sources (code) and its prose (``pydoc_data/topics.py``, the language reference shown by
  ``help()``; ``LICENSE.txt``; IDLE's text files), concatenated and cut to a token length drawn in a
  range, deterministic under a seed.
- Synthetic retrieval tasks (``make_task``, ``calibration_tasks``, ``heldout_tasks``): a single pass key,
  multi-key needles, a key-value lookup in a JSON object, variable tracking and a two-hop lookup, hidden
  in filler text of a requested token length, with the question at the end. A ``Task`` renders as a
  chat prompt (the tokenizer's chat template) or a completion prompt (ending in an answer cue such as
  "The pass key is"), and as a ``Document`` (prompt + answer) for teacher-forced calibration.
- User files (``load_documents``): ``.txt`` (one document per file) and ``.jsonl`` (a ``text`` field
  per line), or directories of them.

Seeds: every task has its own seed, ``task_seed(split, seed, index)``. Calibration tasks take seeds in
``CALIBRATION_SEEDS`` and held-out (evaluation) tasks in ``HELDOUT_SEEDS``; the two ranges are disjoint,
so a benchmark built with ``heldout_tasks`` never sees a pass key, needle or filler draw that
calibration saw. (The dump's own train/held-out ``split`` is a different thing: a share of the
*calibration* documents kept out of indexer training to measure it; see ``calibrate``.)

Not here: tokenising for the model, sampling windows, running the model (``calibrate.py``).
"""

from __future__ import annotations

import functools
import json
import random
import re
import sysconfig
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASK_KINDS = ("passkey", "multikey", "kv", "vartrack", "multihop")
# Kinds that calibration never generates (its default is ``TASK_KINDS``): the same retrieval of a number
# by its key, phrased in ways the indexer was not trained on, to measure how it carries to unseen prompts.
UNSEEN_KINDS = ("vault", "extension", "catalogue")
ALL_TASK_KINDS = TASK_KINDS + UNSEEN_KINDS
FILLERS = ("sentences", "text")

# Disjoint seed ranges: calibration tasks draw from the first, held-out evaluation tasks from the second.
CALIBRATION_SEEDS = range(0, 2**31)
HELDOUT_SEEDS = range(2**31, 2**32)
_PER_SEED = 100_000  # tasks per user seed; task i of user seed s gets base + s * _PER_SEED + i
_MAX_USER_SEED = 2**31 // _PER_SEED - 1


@dataclass(frozen=True)
class Document:
    """One text to run the model over, teacher-forced.

    Args:
        id: unique name within a calibration (it keys resume).
        source: where it comes from, e.g. ``"stdlib:prose"``, ``"task:passkey"``, ``"file:notes.txt"``.
        text: the whole text.
        add_special_tokens: whether the tokenizer adds its special tokens (BOS); ``False`` for texts that
            already carry them (a chat-templated prompt).
        meta: anything else worth keeping (a task's answer, its seed).

    Example::

        >>> Document(id="notes", source="file:notes.txt", text="...").source
        'file:notes.txt'
    """

    id: str
    source: str
    text: str
    add_special_tokens: bool = True
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Task:
    """A synthetic long-context retrieval task: context with facts hidden in filler, then a question.

    Args:
        kind: one of ``TASK_KINDS`` (what calibration generates) or ``UNSEEN_KINDS`` (evaluation only).
        prompt_text: context and question, untemplated.
        answer: the expected answer (for ``vartrack``, variable names joined by ``", "``).
        needle_spans: ``(start, end)`` character spans in ``prompt_text`` of the facts the answer needs.
        cue: completion-style answer prefix (``"The pass key is"``) used when the prompt is not a chat.
        seed: the task's own seed (see ``task_seed``).
        id: a name, ``"{kind}-{seed}"``.

    Example::

        >>> task = make_task("passkey", ByteTokenizer(), tokens=500, seed=task_seed("heldout", 0, 0))
        >>> task.answer in task.prompt_text, task.render(chat=False).endswith("The pass key is")
        (True, True)
    """

    kind: str
    prompt_text: str
    answer: str
    needle_spans: tuple[tuple[int, int], ...] = ()
    cue: str = ""
    seed: int = 0
    id: str = ""

    def render(
        self, tokenizer: Any = None, *, chat: bool | None = None, template: Callable[["Task"], str] | None = None
    ) -> str:
        """The prompt the model answers.

        ``template`` (a hook) wins when given. Otherwise ``chat=None`` picks the chat form when the
        tokenizer has a chat template: the tokenizer's template around one user turn, with the generation
        prompt; the completion form is ``prompt_text``, a newline and the answer cue.
        """
        if template is not None:
            return template(self)
        if chat is None:
            chat = bool(getattr(tokenizer, "chat_template", None))
        if chat:
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise ValueError(f"task {self.id}: chat=True needs a tokenizer with a chat template")
            messages = [{"role": "user", "content": self.prompt_text}]
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return f"{self.prompt_text}\n{self.cue}"

    def to_document(
        self, tokenizer: Any = None, *, chat: bool | None = None, template: Callable[["Task"], str] | None = None
    ) -> Document:
        """The rendered prompt followed by an answer, for teacher-forced calibration.

        In the chat form the reply is a sentence, the cue and the answer (``"The pass key is 94448."``),
        as instruction-tuned models answer; the completion form ends in the cue already and takes the
        answer alone. ``meta["answer_char"]``: where the reply starts in ``text``, so calibration can
        place windows where the answer is read out of the context.
        """
        if template is None and chat is None:
            chat = bool(getattr(tokenizer, "chat_template", None))
        prompt = self.render(tokenizer, chat=chat, template=template)
        if chat and template is None:
            reply = f"{self.cue} {self.answer}." if self.cue else self.answer
        else:
            reply = self.answer if template is not None else " " + self.answer
        return Document(
            id=self.id,
            source=f"task:{self.kind}",
            text=prompt + reply,
            add_special_tokens=not (chat or template is not None),
            meta={"answer": self.answer, "seed": self.seed, "kind": self.kind, "answer_char": len(prompt)},
        )


class ByteTokenizer:
    """A tokenizer of UTF-8 bytes (ids 0-255), for tiny test models and doctests; no chat template.

    Example::

        >>> ByteTokenizer().encode("hi")
        [104, 105]
    """

    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], **_: Any) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="ignore")


# ---------------------------------------------------------------- tokens


def count_tokens(tokenizer: Any, text: str) -> int:
    """Number of tokens of ``text`` without special tokens."""
    return len(tokenizer.encode(text, add_special_tokens=False))


def cut_to_tokens(tokenizer: Any, text: str, n: int) -> str:
    """The longest prefix of ``text`` that holds at most ``n`` tokens (cut at a token boundary)."""
    if n <= 0:
        return ""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except Exception:  # noqa: BLE001 - tokenizers without offsets (slow or custom ones)
        offsets = None
    if offsets is not None:
        if len(offsets) <= n:
            return text
        return text[: offsets[n - 1][1]]
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) <= n:
        return text
    return tokenizer.decode(ids[:n])


# ---------------------------------------------------------------- built-in real texts


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


@functools.lru_cache(maxsize=1)
def _prose_texts() -> tuple[tuple[str, str], ...]:
    """``(name, text)`` of the English prose shipped with CPython, in a fixed order."""
    out: list[tuple[str, str]] = []
    try:
        from pydoc_data.topics import topics  # the language reference behind help("TOPIC")

        out += [(f"pydoc_data/topics.py:{name}", topics[name]) for name in sorted(topics) if len(topics[name]) > 2000]
    except Exception:  # noqa: BLE001 - some distributions strip pydoc_data
        pass
    root = _stdlib_dir()
    for rel in ("LICENSE.txt", "idlelib/NEWS.txt", "idlelib/HISTORY.txt", "idlelib/README.txt", "idlelib/CREDITS.txt"):
        text = _read(root / rel)
        if len(text) > 2000:
            out.append((rel, text))
    return tuple(out)


@functools.lru_cache(maxsize=1)
def _code_texts() -> tuple[tuple[str, str], ...]:
    """``(name, text)`` of the standard library's top-level modules larger than 8 KB, sorted by name."""
    root = _stdlib_dir()
    out = []
    for path in sorted(root.glob("*.py")):
        try:
            if path.stat().st_size > 8_000:
                out.append((path.name, _read(path)))
        except OSError:
            continue
    return tuple(out)


def _concatenated(texts: Sequence[tuple[str, str]], start: int, offset: int, chars: int) -> tuple[str, str]:
    """``chars`` characters from text ``start`` at ``offset``, running on into the following texts."""
    name = texts[start][0]
    parts, have, i = [], 0, start
    while have < chars:
        text = texts[i % len(texts)][1][offset if i == start else 0 :]
        parts.append(text)
        have += len(text) + 2
        i += 1
        if i - start > 2 * len(texts):
            break
    return "\n\n".join(parts), name


def builtin_documents(
    tokenizer: Any, *, min_tokens: int = 1024, max_tokens: int = 4096, count: int = 16, seed: int = 0
) -> list[Document]:
    """``count`` long real texts from the Python install, each of a token length drawn in the range.

    Even-numbered documents are prose (the language reference of ``pydoc_data``, licence and IDLE texts),
    odd-numbered ones are standard-library source code. Texts run on into the next file until long
    enough and are cut at a token boundary. The same tokenizer, arguments and Python install give the
    same documents.

    Example::

        >>> docs = builtin_documents(tokenizer, min_tokens=1024, max_tokens=4096, count=8, seed=0)
        >>> [d.source for d in docs[:2]]
        ['stdlib:prose', 'stdlib:code']
    """
    if not (isinstance(min_tokens, int) and isinstance(max_tokens, int) and 1 <= min_tokens <= max_tokens):
        raise ValueError(f"need 1 <= min_tokens <= max_tokens, got min_tokens={min_tokens!r}, max_tokens={max_tokens!r}")
    if not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be an int >= 0, got {count!r}")
    pools = {"prose": _prose_texts(), "code": _code_texts()}
    if not any(pools.values()):
        raise RuntimeError(f"found no standard-library texts under {_stdlib_dir()}; pass documents explicitly")
    docs = []
    for i in range(count):
        rng = random.Random(f"builtin:{seed}:{i}")
        kind = ("prose", "code")[i % 2]
        texts = pools[kind] or pools["prose" if kind == "code" else "code"]
        target = rng.randint(min_tokens, max_tokens)
        start = rng.randrange(len(texts))
        offset = rng.randrange(max(1, len(texts[start][1]) // 2))
        # Skip to a line start so documents do not open mid-word.
        offset = texts[start][1].find("\n", offset) + 1
        chars = target * 6
        while True:
            text, name = _concatenated(texts, start, offset, chars)
            if count_tokens(tokenizer, text) >= target or chars > target * 64:
                break
            chars *= 2
        docs.append(
            Document(
                id=f"builtin-{seed}-{i}",
                source=f"stdlib:{kind}",
                text=cut_to_tokens(tokenizer, text, target),
                meta={"file": name, "tokens": target},
            )
        )
    return docs


# ---------------------------------------------------------------- user files


def load_documents(paths: str | Path | Iterable[str | Path]) -> list[Document]:
    """Documents from user files: ``.txt`` (one per file), ``.jsonl`` (a ``text`` field per line).

    A directory contributes its ``.txt`` and ``.jsonl`` files (recursively, sorted). A ``.jsonl`` line
    may carry an ``id``; otherwise the id is ``"{file}:{line}"``. Empty texts are skipped.

    Example::

        >>> docs = load_documents(["book.txt", "corpus.jsonl"])
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for p in paths:
        path = Path(p).expanduser()
        if path.is_dir():
            files += sorted(f for f in path.rglob("*") if f.suffix.lower() in (".txt", ".jsonl") and f.is_file())
        elif path.is_file():
            if path.suffix.lower() not in (".txt", ".jsonl"):
                raise ValueError(f"{str(path)!r}: documents are read from .txt or .jsonl files (a `text` field per line)")
            files.append(path)
        else:
            raise FileNotFoundError(f"no document file or directory at {str(path)!r}")
    docs = []
    for path in files:
        if path.suffix.lower() == ".txt":
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                docs.append(Document(id=str(path), source=f"file:{path.name}", text=text))
            continue
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not a JSON object ({e.msg})") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise ValueError(f"{path}:{line_no}: each .jsonl line needs a string field `text`")
                if row["text"].strip():
                    doc_id = str(row.get("id", f"{path}:{line_no}"))
                    docs.append(Document(id=doc_id, source=f"file:{path.name}", text=row["text"]))
    return docs


# ---------------------------------------------------------------- synthetic tasks

_NOUNS = (
    "garden river mountain village teacher window harbor forest library market bridge meadow lantern "
    "painter farmer kitchen valley island orchard castle journey morning evening season traveler letter "
    "mirror candle shadow station ladder blanket basket compass feather pebble cottage tower"
).split()
_ADJECTIVES = "quiet bright old small gentle distant warm narrow green patient calm busy simple wide golden".split()
_VERBS = "watches follows crosses remembers paints visits carries finds passes reaches greets opens".split()
_PLACES = "by the shore|near the hill|after the rain|before dawn|in the valley|along the road|under the trees".split("|")
_NAMES = (
    "Alice Bruno Clara Daniel Elena Felix Greta Hugo Irene Jonas Karin Leon Mira Nadia Oscar Paula Quentin "
    "Rosa Stefan Tilda Ugo Vera Walter Xenia Yusuf Zora"
).split()
_WORDS = (
    "amber basil cedar delta ember falcon garnet harbor indigo juniper kestrel lotus marble nectar onyx "
    "pepper quartz raven saffron tundra umber violet willow yarrow zephyr cobalt maple thistle sparrow"
).split()


def task_seed(split: str, seed: int, index: int) -> int:
    """The seed of task ``index`` of a ``split`` (``"calibration"`` or ``"heldout"``) under user ``seed``.

    Calibration seeds lie in ``CALIBRATION_SEEDS``, held-out ones in ``HELDOUT_SEEDS``: disjoint ranges.

    Example::

        >>> task_seed("calibration", 0, 3), task_seed("heldout", 0, 3)
        (3, 2147483651)
    """
    if split not in ("calibration", "heldout"):
        raise ValueError(f"split must be 'calibration' or 'heldout', got {split!r}")
    if not isinstance(seed, int) or not 0 <= seed <= _MAX_USER_SEED:
        raise ValueError(f"seed must be an int in [0, {_MAX_USER_SEED}], got {seed!r}")
    if not isinstance(index, int) or not 0 <= index < _PER_SEED:
        raise ValueError(f"task index must be an int in [0, {_PER_SEED}), got {index!r}")
    base = CALIBRATION_SEEDS.start if split == "calibration" else HELDOUT_SEEDS.start
    return base + seed * _PER_SEED + index


def _filler_sentences(rng: random.Random, tokenizer: Any, tokens: int) -> list[str]:
    """Generated neutral sentences (no digits) adding up to about ``tokens`` tokens."""
    out, have = [], 0
    while have < tokens:
        s = (
            f"The {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} the "
            f"{rng.choice(_NOUNS)} {rng.choice(_PLACES)}."
        )
        out.append(s)
        have += count_tokens(tokenizer, " " + s)
    return out


_PROSE_CACHE: list[str] = []


def _filler_text(rng: random.Random, tokenizer: Any, tokens: int) -> list[str]:
    """A run of real prose (the Python language reference), split in sentences, about ``tokens`` tokens."""
    if not _PROSE_CACHE:
        prose = "\n\n".join(text for _, text in _prose_texts())
        # Keep sentence-like runs; drop the reference's code samples and tables where digits and symbols pile up.
        sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", prose)]
        _PROSE_CACHE.extend(" ".join(s.split()) for s in sentences if 20 <= len(s) <= 400 and s[0].isupper())
        if not _PROSE_CACHE:
            _PROSE_CACHE.append("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.")
    start = rng.randrange(len(_PROSE_CACHE))
    out, have, i = [], 0, start
    while have < tokens:
        s = _PROSE_CACHE[i % len(_PROSE_CACHE)]
        n = count_tokens(tokenizer, " " + s)
        if have + n > tokens:  # the reference's sentences run long: cut the last one to the budget
            s = cut_to_tokens(tokenizer, s, tokens - have)
            if not s:
                break
        out.append(s)
        have += n
        i += 1
    return out


def _assemble(filler: list[str], needles: list[tuple[float, str]], question: str) -> tuple[str, list[tuple[int, int]]]:
    """Filler sentences with each needle inserted at its depth (a fraction); the question last."""
    slots: dict[int, list[tuple[int, str]]] = {}
    for order, (depth, text) in enumerate(needles):
        at = min(len(filler), max(0, round(depth * len(filler))))
        slots.setdefault(at, []).append((order, text))
    parts: list[str] = []
    spans: list[tuple[int, int] | None] = [None] * len(needles)
    pos = 0

    def put(text: str) -> tuple[int, int]:
        nonlocal pos
        if parts:
            parts.append(" ")
            pos += 1
        parts.append(text)
        span = (pos, pos + len(text))
        pos += len(text)
        return span

    for i in range(len(filler) + 1):
        for order, text in slots.get(i, []):
            spans[order] = put(text)
        if i < len(filler):
            put(filler[i])
    parts.append("\n\n" + question)
    return "".join(parts), [s for s in spans if s is not None]


def _number(rng: random.Random, digits: int = 5) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _hex(rng: random.Random, n: int = 8) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(n))


def _var(rng: random.Random, used: set[str]) -> str:
    while True:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in used:
            used.add(name)
            return name


def _task_parts(kind: str, rng: random.Random) -> tuple[list[tuple[float, str]], list[int], str, str, str]:
    """``(needles with depths, indices of the needles the answer needs, question, cue, answer)``."""
    if kind == "passkey":
        key = _number(rng)
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        return [(rng.random(), needle)], [0], "What is the pass key? Answer with the number only.", "The pass key is", key
    if kind == "multikey":
        words = rng.sample(_WORDS, rng.randint(3, 6))
        values = [_number(rng, 7) for _ in words]
        needles = [(rng.random(), f"One of the special magic numbers for {w} is: {v}.") for w, v in zip(words, values)]
        q = rng.randrange(len(words))
        question = f"What is the special magic number for {words[q]} mentioned in the text? Answer with the number only."
        return needles, [q], question, f"The special magic number for {words[q]} is", values[q]
    if kind == "kv":
        n = rng.randint(8, 24)
        pairs = [(_hex(rng), _hex(rng)) for _ in range(n)]
        q = rng.randrange(n)
        # The needle the answer needs is the queried pair; the JSON object is placed as one block.
        body = ", ".join(f'"{k}": "{v}"' for k, v in pairs)
        block = "JSON data: {" + body + "}"
        depth = rng.random()
        question = (
            f'In the JSON object above, what is the value associated with the key "{pairs[q][0]}"? '
            "Answer with the value only."
        )
        return [(depth, block)], [0], question, f'The value associated with the key "{pairs[q][0]}" is', pairs[q][1]
    if kind == "vartrack":
        used: set[str] = set()
        value = _number(rng)
        chain = [_var(rng, used) for _ in range(rng.randint(3, 5))]
        other_value = _number(rng)
        while other_value == value:
            other_value = _number(rng)
        other = [_var(rng, used) for _ in range(rng.randint(2, 3))]
        depths = sorted(rng.random() for _ in chain)
        needles = [(depths[0], f"VAR {chain[0]} = {value}.")]
        needles += [(d, f"VAR {b} = VAR {a}.") for d, a, b in zip(depths[1:], chain, chain[1:])]
        other_depths = sorted(rng.random() for _ in other)
        distractors = [(other_depths[0], f"VAR {other[0]} = {other_value}.")]
        distractors += [(d, f"VAR {b} = VAR {a}.") for d, a, b in zip(other_depths[1:], other, other[1:])]
        question = (
            f"Find all variables that are assigned the value {value} in the text above. "
            "Answer with the variable names separated by commas."
        )
        return needles + distractors, list(range(len(chain))), question, f"The variables assigned the value {value} are:", ", ".join(chain)
    if kind == "multihop":
        k = rng.randint(3, 5)
        people = rng.sample(_NAMES, k)
        lockers = rng.sample(_WORDS, k)
        numbers = [_number(rng) for _ in range(k)]
        first = [(rng.random(), f"{p} keeps the key to the {w} locker.") for p, w in zip(people, lockers)]
        second = [(rng.random(), f"The {w} locker holds the number {n}.") for w, n in zip(lockers, numbers)]
        q = rng.randrange(k)
        question = f"What number is in the locker whose key {people[q]} keeps? Answer with the number only."
        return first + second, [q, k + q], question, "The number is", numbers[q]
    if kind == "vault":
        words = rng.sample(_WORDS, rng.randint(2, 4))
        codes = [_number(rng, 6) for _ in words]
        needles = [(rng.random(), f"Security memo: the {w} vault opens with code {c}; do not share it.") for w, c in zip(words, codes)]
        q = rng.randrange(len(words))
        question = f"Which code opens the {words[q]} vault? Reply with the code only."
        return needles, [q], question, f"The {words[q]} vault opens with code", codes[q]
    if kind == "extension":
        people = rng.sample(_NAMES, rng.randint(3, 5))
        numbers = [_number(rng, 4) for _ in people]
        needles = [(rng.random(), f"Staff directory entry: {p} can be reached on extension {n}.") for p, n in zip(people, numbers)]
        q = rng.randrange(len(people))
        question = f"On which phone extension can {people[q]} be reached? Give just the extension."
        return needles, [q], question, f"{people[q]} can be reached on extension", numbers[q]
    if kind == "catalogue":
        items = [_hex(rng, 6).upper() for _ in range(rng.randint(3, 6))]
        prices = [_number(rng, 5) for _ in items]
        needles = [(rng.random(), f"Catalogue line: article {i} is priced at {p} credits.") for i, p in zip(items, prices)]
        q = rng.randrange(len(items))
        question = f"How many credits does article {items[q]} cost according to the catalogue? Only the number, please."
        return needles, [q], question, f"Article {items[q]} costs", prices[q]
    raise ValueError(f"unknown task kind {kind!r}; choose one of {ALL_TASK_KINDS}")


def make_task(kind: str, tokenizer: Any, *, tokens: int, seed: int, filler: str = "sentences") -> Task:
    """One synthetic task whose untemplated prompt holds about ``tokens`` tokens.

    ``filler``: ``"sentences"`` (generated neutral sentences without digits) or ``"text"`` (a run of
    real prose from the Python language reference). Facts are placed at seeded random depths; the
    question comes last. The same arguments give the same task.

    Example::

        >>> task = make_task("multihop", tokenizer, tokens=2000, seed=task_seed("heldout", 0, 7))
        >>> task.answer.isdigit()
        True
    """
    if kind not in ALL_TASK_KINDS:
        raise ValueError(f"unknown task kind {kind!r}; choose one of {ALL_TASK_KINDS}")
    if filler not in FILLERS:
        raise ValueError(f"filler must be one of {FILLERS}, got {filler!r}")
    if not isinstance(tokens, int) or tokens < 64:
        raise ValueError(f"tokens must be an int >= 64, got {tokens!r}")
    rng = random.Random(f"task:{kind}:{seed}")
    needles, needed, question, cue, answer = _task_parts(kind, rng)
    fixed = sum(count_tokens(tokenizer, " " + text) for _, text in needles) + count_tokens(tokenizer, "\n\n" + question)
    make_filler = _filler_sentences if filler == "sentences" else _filler_text
    sentences = make_filler(rng, tokenizer, max(0, tokens - fixed))
    text, spans = _assemble(sentences, needles, question)
    if kind == "kv":
        # The fact the answer needs is the queried pair, not the whole JSON block.
        start = spans[0][0]
        pair = question.split('"')[1]
        at = text.index(f'"{pair}": "{answer}"', start)
        spans[0] = (at, at + len(f'"{pair}": "{answer}"'))
    return Task(
        kind=kind,
        prompt_text=text,
        answer=answer,
        needle_spans=tuple(spans[i] for i in needed),
        cue=cue,
        seed=seed,
        id=f"{kind}-{seed}",
    )


def _tasks(
    split: str, tokenizer: Any, *, count: int, min_tokens: int, max_tokens: int, seed: int,
    kinds: Sequence[str], filler: str | None,
) -> list[Task]:
    if isinstance(kinds, str) or not kinds or any(k not in ALL_TASK_KINDS for k in kinds):
        raise ValueError(f"kinds must be a non-empty sequence of task kinds from {ALL_TASK_KINDS}, got {kinds!r}")
    if not (isinstance(min_tokens, int) and isinstance(max_tokens, int) and 64 <= min_tokens <= max_tokens):
        raise ValueError(f"need 64 <= min_tokens <= max_tokens, got min_tokens={min_tokens!r}, max_tokens={max_tokens!r}")
    out = []
    for i in range(count):
        s = task_seed(split, seed, i)
        rng = random.Random(f"length:{s}")
        length = rng.randint(min_tokens, max_tokens)
        fill = filler or FILLERS[(i // len(kinds)) % len(FILLERS)]
        out.append(make_task(kinds[i % len(kinds)], tokenizer, tokens=length, seed=s, filler=fill))
    return out


def calibration_tasks(
    tokenizer: Any, *, count: int = 20, min_tokens: int = 1024, max_tokens: int = 4096, seed: int = 0,
    kinds: Sequence[str] = TASK_KINDS, filler: str | None = None,
) -> list[Task]:
    """``count`` tasks for calibration, kinds in turn, seeds from ``CALIBRATION_SEEDS``.

    ``filler=None`` alternates generated sentences and real prose (by rounds of ``kinds``).

    Example::

        >>> tasks = calibration_tasks(tokenizer, count=10, seed=0)
        >>> sorted({t.kind for t in tasks}) == sorted(TASK_KINDS)
        True
    """
    return _tasks("calibration", tokenizer, count=count, min_tokens=min_tokens, max_tokens=max_tokens, seed=seed, kinds=kinds, filler=filler)


def heldout_tasks(
    tokenizer: Any, *, count: int = 20, min_tokens: int = 1024, max_tokens: int = 4096, seed: int = 0,
    kinds: Sequence[str] = TASK_KINDS, filler: str | None = None,
) -> list[Task]:
    """``count`` evaluation tasks with seeds from ``HELDOUT_SEEDS``, never used by calibration.

    Example::

        >>> tasks = heldout_tasks(tokenizer, count=21, min_tokens=1000, max_tokens=1400)
        >>> prompt = tasks[0].render(tokenizer, chat=True)
    """
    return _tasks("heldout", tokenizer, count=count, min_tokens=min_tokens, max_tokens=max_tokens, seed=seed, kinds=kinds, filler=filler)


def default_documents(
    tokenizer: Any, *, texts: int = 12, tasks: int = 120, min_tokens: int = 1024, max_tokens: int = 2048,
    task_tokens: tuple[int, int] | None = (800, 1600), seed: int = 0, chat: bool | None = None,
) -> list[Document]:
    """What ``calibrate`` runs over by default: built-in texts and calibration tasks, interleaved.

    Texts of ``min_tokens``-``max_tokens`` tokens; tasks of ``task_tokens`` (``None``: the texts' range).
    Many short tasks rather than a few long ones: what the indexer must learn to find (the chunk an
    answer is read from) shows up once per task, in the windows at its reply, so the number of tasks,
    not their length, is what it generalises from (docs/indexer_results.md).

    Example::

        >>> docs = default_documents(tokenizer, texts=4, tasks=4, min_tokens=512, max_tokens=1024)
        >>> len(docs)
        8
    """
    lo, hi = task_tokens if task_tokens is not None else (min_tokens, max_tokens)
    real = builtin_documents(tokenizer, min_tokens=min_tokens, max_tokens=max_tokens, count=texts, seed=seed)
    synthetic = [
        t.to_document(tokenizer, chat=chat)
        for t in calibration_tasks(tokenizer, count=tasks, min_tokens=lo, max_tokens=hi, seed=seed)
    ]
    out: list[Document] = []
    for i in range(max(len(real), len(synthetic))):
        out += real[i : i + 1] + synthetic[i : i + 1]
    return out
