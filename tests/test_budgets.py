"""Budgets a user would reach for first: budget=1.0, and a budget too small for a short prompt."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import lsa_rewrite
from lsa_rewrite import LSAConfig
from lsa_rewrite.runtime.policy import min_slots
from lsa_rewrite.runtime.store import LSABudgetWarning, StoreError
from zoo import make_model


def _greedy(model, ids, new=24):
    out = model.generate(ids, max_new_tokens=new, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


@pytest.fixture(scope="module")
def llama():
    model = make_model("llama").eval()
    model.generation_config.eos_token_id = None
    return model


def test_budget_one_is_the_dense_model(llama):
    """budget=1.0 covers the context: every chunk resident (index and tables are not charged against it)."""
    ids = torch.randint(3, 250, (1, 700), generator=torch.Generator().manual_seed(0))
    want_seq, want_logits = _greedy(llama, ids)
    converted = lsa_rewrite.convert(copy.deepcopy(llama), LSAConfig(budget=1.0))
    seq, logits = _greedy(converted, ids)
    assert torch.equal(seq, want_seq)
    assert float((logits - want_logits).abs().max()) <= 1e-4
    assert converted.lsa.store.all_resident and lsa_rewrite.footprint(converted)["budget_note"] is None


def test_short_prompt_with_the_readme_budget_keeps_everything_and_says_so(llama):
    """The README's LSAConfig(budget=0.25) on a 300-token prompt: the defaults' sink, tail and window
    need more than that; the model still answers as dense, with one warning that footprint() repeats."""
    ids = torch.randint(3, 250, (1, 300), generator=torch.Generator().manual_seed(1))
    want_seq, _ = _greedy(llama, ids)
    converted = lsa_rewrite.convert(copy.deepcopy(llama), LSAConfig(budget=0.25))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seq, _ = _greedy(converted, ids)
    budget_warnings = [w for w in caught if issubclass(w.category, LSABudgetWarning)]
    assert len(budget_warnings) == 1 and "kept resident" in str(budget_warnings[0].message)
    assert torch.equal(seq, want_seq)
    note = lsa_rewrite.footprint(converted)["budget_note"]
    assert note is not None and "budget 0.25" in note


def test_a_fraction_too_small_for_sink_and_tail_keeps_the_minimum_and_says_so(llama):
    """A fraction that leaves fewer chunks than sink + tail + window need on a context long enough for
    sparse attention: the fewest chunks that work stay resident (sparse, not dense), with one warning."""
    ids = torch.randint(3, 250, (1, 1500), generator=torch.Generator().manual_seed(3))
    config = LSAConfig(budget=0.02, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=64, recall_lag=0)
    converted = lsa_rewrite.convert(copy.deepcopy(llama), config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted.generate(ids, max_new_tokens=4, do_sample=False)
    budget_warnings = [w for w in caught if issubclass(w.category, LSABudgetWarning)]
    assert len(budget_warnings) == 1 and "are kept resident instead" in str(budget_warnings[0].message)
    store = converted.lsa.store
    assert store.slots == min_slots(config) < store.num_chunks and not store.all_resident
    assert "budget 0.02" in lsa_rewrite.footprint(converted)["budget_note"]


def test_long_context_with_a_budget_too_small_is_still_refused(llama):
    """Where sparse attention would matter (sink + tail + window well under half the context), an int
    budget (an explicit token count) that cannot hold them is an error naming the fields to change."""
    ids = torch.randint(3, 250, (1, 1500), generator=torch.Generator().manual_seed(2))
    converted = lsa_rewrite.convert(copy.deepcopy(llama), LSAConfig(budget=64, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=64))
    with pytest.raises(StoreError, match="raise the budget"):
        converted.generate(ids, max_new_tokens=4, do_sample=False)
