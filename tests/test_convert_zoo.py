"""convert() on every zoo model: with nothing to drop, decoding equals the dense model's.

The first test of every model family (DESIGN.md invariants): with ``mode="dense"``, and with a budget
covering the whole context, 64+ decode steps give the dense model's logits (max abs diff <= 1e-4 in
float32) and the same greedy tokens. The covering budget is run two ways: a store sized to the
context (every chunk resident from the start), and a store sized for twice the context, so that chunk
selection, the mirror and recall run for real while every written chunk still fits.

Every family runs under each attention implementation HF has for it and both capture caches; the
families the sweep added to the default run (``zoo.DEFAULT_SWEEP``) run under one implementation with the
static capture cache only, to keep the run short (``LSA_ZOO=all`` runs every zoo family, in full).
"""

from __future__ import annotations

import pytest
import torch
from helpers import buffer_greedy, converted_copy, hf_greedy, no_eos
from zoo import DEFAULT_SWEEP, HF_FAMILIES, ZOO_ALL, attns_in_tests, make_model

from lsa_rewrite import LSAConfig

PROMPT, NEW = 40, 66  # 65 decode steps after the prefill
TOL = 1e-4
CHUNK = 16


def _configs(capture_cache: str) -> dict[str, LSAConfig]:
    common = dict(chunk_size=CHUNK, interval=16, sink_tokens=16, recent_tokens=16, capture_cache=capture_cache)
    return {
        "dense": LSAConfig(mode="dense", **common),
        "covering": LSAConfig(budget=PROMPT + NEW, **common),
        "covering-selected": LSAConfig(budget=PROMPT + NEW + CHUNK, max_context=2 * (PROMPT + NEW), **common),
    }


def _assert_same(dense, converted):
    (seq_d, logits_d), (seq_c, logits_c) = dense, converted
    assert logits_c.shape == logits_d.shape
    diff = (logits_c - logits_d).abs().max().item()
    assert diff <= TOL, f"max abs logit diff {diff:.3g} > {TOL}"
    assert torch.equal(seq_c, seq_d)


def _cases() -> list[tuple[str, str, str]]:
    cases = []
    for family in HF_FAMILIES:
        captures = ["static"] if family in DEFAULT_SWEEP and not ZOO_ALL else ["static", "dynamic"]
        cases += [(family, attn, capture) for attn in attns_in_tests(family) for capture in captures]
    return cases


@pytest.mark.parametrize(("family", "attn", "capture_cache"), _cases(), ids=["-".join(case) for case in _cases()])
def test_hf_family_matches_dense(family, attn, capture_cache):
    model = no_eos(make_model(family, attn_implementation=attn))
    ids = torch.randint(3, 250, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    dense = hf_greedy(model, ids, NEW)
    configs = _configs(capture_cache)
    # One covering variant per combination keeps the run short; all of them on the family's first tested
    # implementation (SDPA where HF has it and it is tested) with the static capture cache.
    names = list(configs) if (attn, capture_cache) == (attns_in_tests(family)[0], "static") else ["dense"]
    for name in names:
        converted = no_eos(converted_copy(model, configs[name]))
        _assert_same(dense, hf_greedy(converted, ids, NEW))
        if name == "covering-selected" and any(site.action == "rewrite" for site in converted.lsa.sites):
            store = converted.lsa.store
            assert not store.all_resident and store.selections > 0, "the selection path did not run"


@pytest.mark.parametrize("config_name", ["dense", "covering", "covering-selected"])
def test_buffer_decoder_matches_dense(config_name):
    model = make_model("buffer")
    capacity = 2 * (PROMPT + NEW) if config_name == "covering-selected" else PROMPT + NEW
    model.setup_caches(max_batch_size=2, max_seq_length=capacity)
    ids = torch.randint(3, 250, (2, PROMPT), generator=torch.Generator().manual_seed(2))
    dense = buffer_greedy(model, ids, NEW)
    converted = converted_copy(model, _configs("static")[config_name])
    _assert_same(dense, buffer_greedy(converted, ids, NEW))
    # The converted decoder holds no dense cache: its cache buffers were released.
    for name, buf in converted.named_buffers():
        if name.endswith(("k_cache", "v_cache")):
            assert buf.numel() == 0, f"{name} still holds {tuple(buf.shape)}"
