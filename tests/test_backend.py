"""``torch.compile(model, backend="lsa")`` and ``lsa_rewrite.backend(config)`` (issue 12 item 5).

The backend converts the model during its first call, which runs the model's own code (a dense
prefill); the converted model adopts the cache that prefill filled at the next decode call. Checked
here: HF ``generate()`` through a compiled ``forward`` and a plain decoder's own loop through a
compiled module equal the dense model at a covering budget; a sparse budget runs sparse after the
adoption, exactly as a model converted by ``convert()``; the backend resolves by name (entry point);
what it cannot handle fails with an error that says so, leaving the model as it was.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import inspect
import warnings
from pathlib import Path

import pytest
import torch
from helpers import buffer_greedy, converted_copy, hf_greedy, no_eos
from torch import nn
from transformers import DynamicCache
from zoo import make_model

import lsa_rewrite
from lsa_rewrite import LSABudgetWarning, LSAConfig
from lsa_rewrite.hf_cache import LSACache

pytestmark = pytest.mark.usefixtures("one_thread")

COVERING = LSAConfig(budget=4096, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=16)
SPARSE = LSAConfig(budget=96, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=16, recall_lag=0)
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "compile_backend.py"


def _tokens(length: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, 250, (batch, length), generator=torch.Generator().manual_seed(seed))


def _cache_kw(model) -> str:
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def _compiled_forward(model, backend):
    """HF's pattern: ``generate()`` calls ``model(...)``, which calls the compiled ``forward``."""
    model.forward = torch.compile(model.forward, backend=backend)
    return model


# -- HF generate() -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_generate_through_a_compiled_forward_equals_dense(family):
    """gemma3: the adopted DynamicCache keeps only the last window - 1 tokens of its sliding layers."""
    model = no_eos(make_model(family))
    ids = _tokens(70, 0)
    dense_seq, dense_logits = hf_greedy(model, ids, 20)
    compiled = _compiled_forward(no_eos(copy.deepcopy(model)), lsa_rewrite.backend(COVERING))
    out = compiled.generate(ids, max_new_tokens=20, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, dense_seq)
    torch.testing.assert_close(torch.stack(out.logits), dense_logits, atol=1e-4, rtol=0)
    assert compiled.lsa.config == COVERING and isinstance(out.cache, LSACache)
    assert out.cache.store is compiled.lsa.store and compiled.lsa.store.length == 70 + 20 - 1
    # Later generations go through the converted model from their prefill on.
    again, again_logits = hf_greedy(compiled, ids, 20)
    assert torch.equal(again, dense_seq)
    torch.testing.assert_close(again_logits, dense_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_generate_with_a_static_cache(family):
    """The dense prefill fills a StaticCache; the adoption call gets generate()'s 4D mask (gemma3: one
    per attention type), from which the left padding is read."""
    model = no_eos(make_model(family))
    ids = _tokens(60, 11)
    dense_seq, dense_logits = hf_greedy(model, ids, 8, cache_implementation="static")
    compiled = _compiled_forward(no_eos(copy.deepcopy(model)), lsa_rewrite.backend(COVERING))
    seq, logits = hf_greedy(compiled, ids, 8, cache_implementation="static")
    assert torch.equal(seq, dense_seq)
    torch.testing.assert_close(logits, dense_logits, atol=1e-4, rtol=0)
    assert compiled.lsa.store.length == 60 + 8 - 1


def test_sparse_budget_after_adoption_runs_as_a_converted_model():
    """The adopted prefill is a converted prefill: same store size, same probe and selections, same tokens."""
    model = no_eos(make_model("llama"))
    ids = _tokens(200, 1)
    reference = no_eos(converted_copy(model, SPARSE))
    ref_seq, ref_logits = hf_greedy(reference, ids, 40)
    compiled = _compiled_forward(no_eos(copy.deepcopy(model)), lsa_rewrite.backend(SPARSE))
    seq, logits = hf_greedy(compiled, ids, 40)
    store = compiled.lsa.store
    assert store.capacity == reference.lsa.store.capacity == 240  # sized by generate()'s length, as convert() sizes it
    assert store.selections == reference.lsa.store.selections > 0
    fp = lsa_rewrite.footprint(compiled)
    assert fp["ratio"] < 1.0 and store.slots < store.num_chunks and fp["tokens"] == 239
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)


def test_compiled_hf_module_called_by_hand():
    """``torch.compile(model)``: the caller's own loop; the dense prefill's DynamicCache is adopted and
    freed, and the output carries the LSACache from then on."""
    model = no_eos(make_model("llama"))
    kw = _cache_kw(model)
    ids = _tokens(50, 2)
    compiled_module = torch.compile(copy.deepcopy(model), backend=lsa_rewrite.backend(COVERING))
    converted = compiled_module._orig_mod
    dense_cache, cache = DynamicCache(config=model.config), DynamicCache(config=model.config)
    with torch.no_grad():
        dense = model(input_ids=ids, use_cache=True, **{kw: dense_cache})
        first = compiled_module(input_ids=ids, use_cache=True, **{kw: cache})
        torch.testing.assert_close(first.logits, dense.logits, atol=1e-5, rtol=0)
        token = dense.logits[:, -1:].argmax(-1)
        for _ in range(5):
            dense = model(input_ids=token, use_cache=True, **{kw: dense_cache})
            step = compiled_module(input_ids=token, use_cache=True, **{kw: cache})
            torch.testing.assert_close(step.logits, dense.logits, atol=1e-4, rtol=0)
            cache = getattr(step, kw)
            token = dense.logits[:, -1:].argmax(-1)
    assert isinstance(cache, LSACache) and cache.store is converted.lsa.store and cache.store.length == 55


# -- plain decoder ------------------------------------------------------------------------------


def test_plain_decoder_loop_through_torch_compile_equals_dense():
    model = make_model("buffer")
    model.setup_caches(1, 256)
    ids = _tokens(70, 3)
    dense_seq, dense_logits = buffer_greedy(model, ids, 30)
    converted = copy.deepcopy(model)
    compiled = torch.compile(converted, backend=lsa_rewrite.backend(COVERING))
    seq, logits = buffer_greedy(compiled, ids, 30)
    assert torch.equal(seq, dense_seq)
    torch.testing.assert_close(logits, dense_logits, atol=1e-4, rtol=0)
    assert converted.lsa.store.length == 70 + 30 - 1
    # The dense cache buffers were released at the adoption: decode holds only the store.
    assert all(b.numel() == 0 for name, b in converted.named_buffers() if name.endswith(("k_cache", "v_cache")))
    # A new prompt is a converted prefill.
    seq, logits = buffer_greedy(compiled, ids, 30)
    assert torch.equal(seq, dense_seq)


def test_plain_decoder_sparse_after_adoption_runs_as_a_converted_model():
    model = make_model("buffer")
    model.setup_caches(1, 256)
    ids = _tokens(200, 4)
    reference = converted_copy(model, SPARSE)
    ref_seq, ref_logits = buffer_greedy(reference, ids, 40)
    converted = copy.deepcopy(model)
    seq, logits = buffer_greedy(torch.compile(converted, backend=lsa_rewrite.backend(SPARSE)), ids, 40)
    assert converted.lsa.store.selections == reference.lsa.store.selections > 0
    assert lsa_rewrite.footprint(converted)["ratio"] < 1.0
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)


def test_more_models_than_dynamos_recompile_limit_are_each_converted():
    """Each model's first call leaves Dynamo cache entries on the model class's code; they are dropped
    once the converted model adopts its prefill, so they never reach the recompile limit (past it,
    Dynamo would stop calling the backend and the model would silently stay dense)."""
    model = make_model("buffer")
    model.setup_caches(1, 64)
    ids = _tokens(20, 12)
    dense_seq, _ = buffer_greedy(model, ids, 3)
    with torch._dynamo.config.patch(recompile_limit=2):
        for _ in range(3):
            converted = copy.deepcopy(model)
            seq, _ = buffer_greedy(torch.compile(converted, backend=lsa_rewrite.backend(COVERING)), ids, 3)
            assert getattr(converted, "lsa", None) is not None and converted.lsa.store.length == 22
            assert torch.equal(seq, dense_seq)


def test_backend_by_name_uses_the_entry_point_and_the_default_config():
    names = importlib.metadata.entry_points(group="torch_dynamo_backends").names
    assert "lsa" in names, "the torch_dynamo_backends entry point is not installed: pip install -e ."
    model = make_model("buffer")
    model.setup_caches(1, 256)
    ids = _tokens(40, 5)
    dense_seq, dense_logits = buffer_greedy(model, ids, 10)
    converted = copy.deepcopy(model)
    with warnings.catch_warnings():
        # The default config's sink, tail and window cover this short prompt: everything stays resident.
        warnings.simplefilter("ignore", LSABudgetWarning)
        seq, logits = buffer_greedy(torch.compile(converted, backend="lsa"), ids, 10)
    assert converted.lsa.config == LSAConfig()
    assert torch.equal(seq, dense_seq)
    torch.testing.assert_close(logits, dense_logits, atol=1e-4, rtol=0)


def test_backend_repr_names_its_options():
    text = repr(lsa_rewrite.backend(COVERING))
    assert text.startswith("lsa_rewrite.backend(LSAConfig(budget=4096, chunk_size=16")
    with pytest.raises(TypeError, match="LSAConfig"):
        lsa_rewrite.backend({"budget": 0.25})


# -- adoption without the backend, and refusals --------------------------------------------------


def test_a_dense_prefill_cache_is_adopted_at_a_decode_call():
    """A one-token call with a DynamicCache the dense model filled: adopted (no probe token known)."""
    model = no_eos(make_model("qwen2"))
    kw = _cache_kw(model)
    converted = converted_copy(model, COVERING)
    ids = _tokens(40, 6)
    dense_cache, cache = DynamicCache(config=model.config), DynamicCache(config=model.config)
    with torch.no_grad():
        first = model(input_ids=ids, use_cache=True, **{kw: dense_cache})
        model(input_ids=ids, use_cache=True, **{kw: cache})
        token = first.logits[:, -1:].argmax(-1)
        dense = model(input_ids=token, use_cache=True, **{kw: dense_cache})
        ours = converted(input_ids=token, use_cache=True, **{kw: cache})
    torch.testing.assert_close(ours.logits, dense.logits, atol=1e-4, rtol=0)
    assert isinstance(getattr(ours, kw), LSACache) and converted.lsa.store.length == 41
    assert cache.get_seq_length() == 0  # the dense KV was moved into the store, not kept twice


def test_a_dense_cache_of_another_batch_is_refused_and_left_alone():
    model = no_eos(make_model("llama"))
    kw = _cache_kw(model)
    converted = converted_copy(model, COVERING)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=_tokens(30, 7, batch=2), use_cache=True, **{kw: cache})
        with pytest.raises(ValueError, match="cannot adopt"):
            converted(input_ids=_tokens(1, 8), use_cache=True, **{kw: cache})
    assert cache.get_seq_length() == 30 and converted.lsa.store is None


class _NoAttention(nn.Module):
    """Called like a plain decoder, but nothing reads a KV cache."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(256, 32)
        self.out = nn.Linear(32, 256)

    def forward(self, input_ids, input_pos):
        return self.out(self.embed(input_ids))


def test_a_model_without_attention_is_refused_and_left_as_it_was():
    model = _NoAttention().eval()
    compiled = torch.compile(model, backend=lsa_rewrite.backend(COVERING))
    with pytest.raises(Exception, match="could not convert _NoAttention.*found no attention"):
        compiled(_tokens(4, 9), torch.arange(4))
    assert getattr(model, "lsa", None) is None and "forward" not in model.__dict__


def test_a_compiled_function_that_calls_a_model_is_refused():
    model = make_model("buffer")
    model.setup_caches(1, 64)
    compiled = torch.compile(lambda ids: model(ids, torch.arange(ids.shape[1])), backend=lsa_rewrite.backend(COVERING))
    with pytest.raises(Exception, match="could not tell which model.*compile the model module itself"):
        compiled(_tokens(4, 10))
    assert getattr(model, "lsa", None) is None


# -- example --------------------------------------------------------------------------------------


def test_example_runs():
    spec = importlib.util.spec_from_file_location("compile_backend_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--short"])
    assert result["same_tokens"] and result["ratio"] < 1.0
