"""Converting a model keeps nothing of an earlier converted model alive (Dynamo's caches included)."""

from __future__ import annotations

import copy
import gc
import logging
import time
import weakref

import torch

import lsa_rewrite
from lsa_rewrite import LSAConfig
from zoo import make_model


def _holders(obj, depth: int = 6) -> str:
    """What keeps ``obj`` alive: a chain of referrer types (for the failure message)."""
    chain, seen = [], {id(obj)}
    for _ in range(depth):
        referrers = [r for r in gc.get_referrers(obj) if id(r) not in seen and r is not chain and type(r).__name__ != "frame"]
        if not referrers:
            break
        obj = referrers[0]
        seen.add(id(obj))
        desc = type(obj).__qualname__
        if isinstance(obj, dict):
            desc += f" keys={list(obj)[:6]}"
        chain.append(desc)
    return " <- ".join(chain)


def test_a_dropped_converted_model_is_freed(caplog):
    base = make_model("llama").eval()
    refs = []
    # No log records while the models live, and none kept: pytest keeps every record of a test (with its
    # arguments, e.g. Dynamo's DEBUG trace of the tensors it fakes) until the test ends.
    trace = logging.getLogger("torch.__trace")
    was = trace.disabled
    trace.disabled = True
    try:
        for _ in range(3):
            converted = lsa_rewrite.convert(copy.deepcopy(base), LSAConfig(mode="dense", chunk_size=16))
            converted.generate(torch.randint(3, 250, (1, 40)), max_new_tokens=2, do_sample=False)
            refs.append(weakref.ref(next(converted.parameters())))
            del converted
    finally:
        trace.disabled = was
    caplog.clear()
    # Freed within a second: a reference held for a moment (e.g. by a background thread) is not a leak;
    # a model still alive after that is, and the message names what holds it.
    for _ in range(10):
        gc.collect()
        alive = [r for r in refs if r() is not None]
        if not alive:
            break
        time.sleep(0.1)
    assert not alive, (
        f"{len(alive)} of 3 dropped converted models' weights are still referenced (model "
        f"{[refs.index(r) for r in alive]}): {_holders(alive[0]())}"
    )
