"""``lsa-rewrite demo``: the bundled model and shipped indexer, dense vs LSA, in a short mode (issue 12)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from lsa_rewrite.cli import app
from lsa_rewrite.demo import INDEXER_FILE, demo_config, kv_curve, plot_curve, shipped_indexer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_shipped_indexer_is_for_smollm2_and_the_demo_setting():
    from lsa_rewrite.indexer import LSAIndexer

    indexer = LSAIndexer.load(shipped_indexer())
    assert shipped_indexer().name == INDEXER_FILE
    assert indexer.signature["class"] == "LlamaForCausalLM" and indexer.config.hidden_size == 576
    assert indexer.lsa["chunk_size"] == demo_config(1000).chunk_size and indexer.lsa["interval"] == demo_config(1000).interval
    assert indexer.num_parameters() < 0.03 * 135e6


def test_demo_short_mode_prints_both_answers_and_the_footprint(smollm2_path, tmp_path):
    plot = tmp_path / "kv.png"
    result = CliRunner().invoke(app, ["demo", "--tokens", "400", "--new-tokens", "4", "--plot", str(plot), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout[result.stdout.index("{"):])
    assert out["task"]["prompt_tokens"] >= 300 and out["dense"]["reply"] and out["lsa"]["reply"]
    assert 0 < out["lsa"]["kv_ratio"] < 1.0 and out["lsa"]["mirror_bytes"] > 0
    assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curve = out["kv_curve"]
    assert [r["context"] for r in curve] == sorted(r["context"] for r in curve)
    assert all(r["lsa_kv_bytes"] < r["dense_kv_bytes"] for r in curve[1:])


def test_demo_refuses_bad_options_before_loading():
    result = CliRunner().invoke(app, ["demo", "--plot", "kv.jpg"])
    assert result.exit_code == 2 and "--plot must name a .png file" in result.output
    result = CliRunner().invoke(app, ["demo", "--tokens", "10"])
    assert result.exit_code == 2 and "--tokens must be >= 256" in result.output
