"""Converting a model keeps nothing of an earlier converted model alive (Dynamo's caches included)."""

from __future__ import annotations

import copy
import gc
import weakref

import torch

import lsa_rewrite
from lsa_rewrite import LSAConfig
from zoo import make_model


def test_a_dropped_converted_model_is_freed():
    base = make_model("llama").eval()
    refs = []
    for _ in range(3):
        converted = lsa_rewrite.convert(copy.deepcopy(base), LSAConfig(mode="dense", chunk_size=16))
        converted.generate(torch.randint(3, 250, (1, 40)), max_new_tokens=2, do_sample=False)
        refs.append(weakref.ref(next(converted.parameters())))
        del converted
    gc.collect()
    alive = [r for r in refs if r() is not None]
    assert not alive, f"{len(alive)} of 3 dropped converted models' weights are still referenced"
