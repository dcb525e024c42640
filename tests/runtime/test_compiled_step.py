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


def test_steps_compiled_with_settings_draw_distinct_random_numbers_and_restore_the_callers_state(llama):
    """Inductor names a tensor-parallel step's symmetric-memory buffers by draws from Python's global random
    generator, and Dynamo restores that generator after each compile: without a fresh state per compile, the
    steps for batch 2 and batch 1 drew the same name and the second failed on two H200s (NOTES run 82). The
    settings are in force while the step compiles, and neither they nor the caller's random stream leak out."""
    import random

    import torch._inductor.config as inductor_config

    seen = []

    def recorder(gm, example_inputs):
        seen.append((random.getrandbits(64), inductor_config.max_autotune_gemm))
        return gm.forward

    converted = converted_copy(llama, LSAConfig(budget=0.5, chunk_size=16, interval=8, sink_tokens=16, recent_tokens=16))
    settings = {"max_autotune_gemm": not inductor_config.max_autotune_gemm}
    random.seed(1234)
    with torch.no_grad():
        for batch in (2, 1):
            prompt = torch.randint(3, 250, (batch, 40), generator=torch.Generator().manual_seed(batch))
            out = converted(input_ids=prompt, use_cache=True)
            store = out[converted.lsa.adapter.cache_field].store
            program = converted.lsa.program(batch)
            step = CompiledStep(program, store, cuda_graph=False, backend=recorder, compile_config=settings)
            position = (store.length - store.valid_start).view(-1, 1).expand(batch, 1)
            store.before_step()
            inputs = {"input_ids": out.logits[:, -1:].argmax(-1), "position_ids": position}
            torch.testing.assert_close(step(inputs), program(inputs, store), rtol=0, atol=1e-5)
            store.after_step()
    assert len(seen) == 2
    assert seen[0][0] != seen[1][0], "both compiles drew the same number (the same symmetric-memory alloc_id)"
    assert all(flag == settings["max_autotune_gemm"] for _, flag in seen)
    assert inductor_config.max_autotune_gemm != settings["max_autotune_gemm"]
    assert random.random() == random.Random(1234).random()  # the caller's stream as if nothing had drawn
