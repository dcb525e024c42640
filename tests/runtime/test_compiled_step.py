"""The compiled decode step has fixed shapes: it compiles once per store, not once per token."""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters
from zoo import make_model

import lsa_rewrite
from lsa_rewrite import LSAConfig
from lsa_rewrite.runtime.compiled import CompiledStep


def test_compiled_step_does_not_recompile_as_the_context_grows():
    model = make_model("llama")
    converted = lsa_rewrite.convert(model, LSAConfig(budget=0.5, chunk_size=16, interval=8, sink_tokens=16, recent_tokens=16, max_context=256))
    prompt = torch.randint(3, 250, (1, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = converted(input_ids=prompt, use_cache=True)
    cache = out[converted.lsa.adapter.cache_field]
    store = cache.store
    program = converted.lsa.program(1)
    step = CompiledStep(program, store, cuda_graph=False, backend="aot_eager")
    token = out.logits[:, -1:].argmax(-1)
    counters.clear()
    reference = []
    with torch.no_grad():
        for _ in range(40):  # crosses chunk boundaries and five selections
            position = (store.length - store.valid_start).view(1, 1)
            store.before_step()
            inputs = {"input_ids": token, "position_ids": position}
            eager = program(inputs, store)  # idempotent: the compiled step rewrites the same token
            logits = step(inputs)
            store.after_step()
            reference.append((logits - eager).abs().max().item())
            token = logits[:, -1:].argmax(-1)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert max(reference) <= 1e-5
    assert store.selections >= 4
