"""Converting a model keeps nothing of an earlier converted model alive (Dynamo's caches included)."""

from __future__ import annotations

import copy
import gc
import logging
import weakref

import torch

import lsa_rewrite
from lsa_rewrite import LSAConfig
from zoo import make_model


def test_a_dropped_converted_model_is_freed(caplog):
    base = make_model("llama").eval()
    refs = []
    # No log records while the models live, and none kept: pytest keeps every record of a test (with its
    # arguments, e.g. Dynamo's DEBUG trace of the tensors it fakes) until the test ends. A CI run on
    # 2026-11-30 found one of the three dropped models still referenced (never reproduced in ~10 runs of
    # this file or of the files before it); the records held by pytest are the suspect.
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
    gc.collect()
    alive = [r for r in refs if r() is not None]
    assert not alive, f"{len(alive)} of 3 dropped converted models' weights are still referenced"
