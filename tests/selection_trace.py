"""Watching a converted model's resident sets step by step, through the public API only.

A sparse run is judged by what its selections did, not only by its tokens: ``ResidentTrace`` (a
``LogitsProcessor`` for HF ``generate()``, or called by hand after each plain-decoder step) records,
after every forward, which chunks each rewritten layer holds for each sequence (``slot_chunk`` of
``model.lsa.store.layers``). ``churn`` then says which chunks left the pool and which came back from
the mirror, so a test can require that selection actually moved chunks beyond the always-resident
sink and tail. ``hf_decode`` / ``buffer_decode`` run greedy or sampled decoding with the trace.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList


def resident_sets(store) -> dict[int, list[frozenset[int]]]:
    """``{layer: [chunks resident for sequence b]}`` for every chunk layer of ``store`` (rings are skipped)."""
    out = {}
    for layer, state in store.layers.items():
        table = getattr(state, "slot_chunk", None)
        if table is None:
            continue
        out[layer] = [frozenset(c for c in row if c >= 0) for row in table.tolist()]
    return out


class ResidentTrace(LogitsProcessor):
    """Records ``resident_sets`` of ``model.lsa.store`` after every forward (prefill first).

    Use as ``model.generate(..., logits_processor=LogitsProcessorList([trace]))``, or call
    ``trace.record()`` after each step of a plain decoder. ``on_step(model)`` runs at every record.
    """

    def __init__(self, model, *, on_step=None):
        self.model = model
        self.on_step = on_step
        self.sets: list[dict[int, list[frozenset[int]]]] = []
        self.selections: list[int] = []

    def record(self) -> None:
        store = self.model.lsa.store
        self.sets.append(resident_sets(store))
        self.selections.append(store.selections)
        if self.on_step is not None:
            self.on_step(self.model)

    def __call__(self, input_ids, scores):
        self.record()
        return scores

    def processors(self) -> LogitsProcessorList:
        return LogitsProcessorList([self])

    def sequence(self, layer: int, b: int, *, shift: int = 0) -> list[frozenset[int]]:
        """Sequence ``b``'s resident chunks of ``layer`` at every step, chunk ids minus ``shift``."""
        return [frozenset(c - shift for c in step[layer][b]) for step in self.sets]


@dataclass
class Churn:
    """What selection did to one layer and sequence over a trace."""

    dropped: set[int] = field(default_factory=set)  # chunks that left the pool at some step
    came_back: set[int] = field(default_factory=set)  # chunks that left and later were resident again
    ever: set[int] = field(default_factory=set)


def churn(history: list[frozenset[int]]) -> Churn:
    out = Churn()
    gone: set[int] = set()
    for before, after in zip(history, history[1:]):
        out.came_back |= after & gone
        left = before - after
        out.dropped |= left
        gone |= left
        out.ever |= before | after
    return out


def total_churn(trace: ResidentTrace) -> tuple[int, int]:
    """(chunks dropped, chunks that came back), summed over layers and sequences."""
    dropped = came_back = 0
    for layer in trace.sets[0]:
        for b in range(len(trace.sets[0][layer])):
            c = churn(trace.sequence(layer, b))
            dropped += len(c.dropped)
            came_back += len(c.came_back)
    return dropped, came_back


def cache_kw(model) -> str:
    """The keyword an HF model's forward takes its cache by (``cache`` in transformers >= 5.2x, else ``past_key_values``)."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def hf_decode(model, ids: torch.Tensor, steps: int, *, trace: ResidentTrace | None = None, **prefill_kwargs):
    """Greedy decoding by hand through the HF forward (prefill, then one token per call).

    Returns (generated tokens [B, steps], logits [steps, B, V], the cache). Equal to ``generate()`` for
    greedy decoding; used where a test must act between steps.
    """
    kw = cache_kw(model)
    out = model(input_ids=ids, use_cache=True, **prefill_kwargs)
    cache = out[kw]
    logits = [out.logits[:, -1]]
    tokens = [logits[-1].argmax(-1, keepdim=True)]
    if trace is not None:
        trace.record()
    for _ in range(steps - 1):
        out = model(input_ids=tokens[-1], use_cache=True, **{kw: cache})
        logits.append(out.logits[:, -1])
        tokens.append(logits[-1].argmax(-1, keepdim=True))
        if trace is not None:
            trace.record()
    return torch.cat(tokens, 1), torch.stack(logits), cache


def hf_step(model, cache, token: torch.Tensor) -> torch.Tensor:
    """One decode call of an HF model with its cache; returns the next greedy token [B, 1]."""
    with torch.no_grad():
        out = model(input_ids=token, use_cache=True, **{cache_kw(model): cache})
    return out.logits[:, -1].argmax(-1, keepdim=True)


@torch.no_grad()
def buffer_decode(model, ids: torch.Tensor, steps: int, *, trace: ResidentTrace | None = None, sample: bool = False, temperature: float = 0.8):
    """Prefill + ``steps`` tokens of a plain decoder (greedy, or sampled with ``torch.multinomial`` on the global RNG).

    Returns (generated tokens [B, steps], logits [steps, B, V]).
    """
    length = ids.shape[1]
    logits = [model(ids, torch.arange(length))[:, -1].float()]

    def pick(row_logits):
        if sample:
            return torch.multinomial(torch.softmax(row_logits / temperature, -1), 1)
        return row_logits.argmax(-1, keepdim=True)

    tokens = [pick(logits[-1])]
    if trace is not None:
        trace.record()
    for pos in range(length, length + steps - 1):
        logits.append(model(tokens[-1], torch.tensor([pos]))[:, -1].float())
        tokens.append(pick(logits[-1]))
        if trace is not None:
            trace.record()
    return torch.cat(tokens, 1), torch.stack(logits)


def replay_sampling(scores: torch.Tensor, seed: int) -> torch.Tensor:
    """The tokens ``torch.multinomial`` draws from ``scores`` [steps, B, V] (as logits) after ``manual_seed(seed)``.

    A sampler that draws one multinomial per step from the global RNG gives exactly these, unless
    something else (a selector) drew from the global RNG between its draws.
    """
    torch.manual_seed(seed)
    return torch.cat([torch.multinomial(torch.softmax(step, -1), 1) for step in scores], 1)
