"""The compiled decode step: it compiles once per batch size, neither once per token nor once per
store, so a new prompt of another length (another store capacity) reuses it."""

from __future__ import annotations

import pytest
import torch
from helpers import converted_copy, hf_greedy, no_eos
from torch._dynamo.utils import counters
from zoo import make_model

import lsa_rewrite
from lsa_rewrite import LSAConfig
from lsa_rewrite.runtime.compiled import CompiledStep

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama():
    return no_eos(make_model("llama"))


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


# (prompt tokens, max_new_tokens): three store capacities, so three sizes of N (and of S when sparse)
LENGTHS = [(100, 20), (173, 9), (262, 33)]


def test_new_prompt_lengths_reuse_the_compiled_step_at_a_covering_budget(llama):
    """Three generations of other prompt lengths and max_new_tokens: one compile, the dense tokens."""
    config = LSAConfig(budget=1.0, chunk_size=16, interval=8, sink_tokens=16, recent_tokens=16, compile="aot_eager")
    converted = no_eos(converted_copy(llama, config))
    counters.clear()
    chunks = []
    for i, (length, new) in enumerate(LENGTHS):
        ids = torch.randint(3, 250, (1, length), generator=torch.Generator().manual_seed(i))
        want, want_logits = hf_greedy(llama, ids, new)
        got, logits = hf_greedy(converted, ids, new)
        assert torch.equal(got, want), f"prompt of {length}: tokens differ from the dense model's"
        assert float((logits - want_logits).abs().max()) <= 1e-4
        store = converted.lsa.store
        assert store.all_resident and converted.lsa.compiled.store is store
        chunks.append(store.num_chunks)
    assert len(set(chunks)) == len(LENGTHS), f"the stores did not change shape: {chunks}"
    assert counters["stats"]["unique_graphs"] == 1, f"the decode step compiled again: {dict(counters['stats'])}"
    assert list(converted.lsa.compiled_modules) == [(1, "aot_eager")]


def test_new_prompt_lengths_reuse_the_compiled_step_when_sparse(llama):
    """Sparse stores of three capacities (pool slots and chunks both change): one compile, and the
    compiled step decodes what the uncompiled GraphModule (the CPU default) decodes."""
    base = dict(budget=0.25, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=32, recall_lag=0)
    compiled = no_eos(converted_copy(llama, LSAConfig(**base, compile="aot_eager")))
    eager = no_eos(converted_copy(llama, LSAConfig(**base)))
    counters.clear()
    shapes = []
    for i, (length, new) in enumerate([(600, 20), (777, 40), (905, 12)]):
        ids = torch.randint(3, 250, (1, length), generator=torch.Generator().manual_seed(10 + i))
        want, want_logits = hf_greedy(eager, ids, new)
        got, logits = hf_greedy(compiled, ids, new)
        assert torch.equal(got, want) and float((logits - want_logits).abs().max()) <= 1e-5
        store = compiled.lsa.store
        assert not store.all_resident and store.selections >= 2
        shapes.append((store.slots, store.num_chunks))
    assert eager.lsa.compiled is None, "the CPU default (compile=True) should run the GraphModule"
    assert len({s for s, _ in shapes}) == 3 and len({n for _, n in shapes}) == 3, shapes
    assert counters["stats"]["unique_graphs"] == 1, f"the decode step compiled again: {dict(counters['stats'])}"
