"""``lsa-rewrite inspect`` on a tiny zoo checkpoint saved to a temporary directory (no download, no SmolLM2).

The gemma3 zoo model has sliding-window layers 0 and 2 around a full-attention layer 1, so the table
must show one rewritten layer and two kept dense over their window. Errors exit with code 2 and a
one-line message.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner
from zoo import SLIDING_WINDOW, make_model

from lsa_rewrite.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(one_thread, tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma3-tiny")
    make_model("gemma3").save_pretrained(path)
    return path


def invoke(*args):
    return CliRunner().invoke(app, ["inspect", *map(str, args)])


def test_inspect_prints_a_table(checkpoint):
    result = invoke(checkpoint)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Gemma3ForCausalLM" in out
    rows = [[cell.strip() for cell in line.strip("│ ").split("│")] for line in out.splitlines() if line.startswith("│")]
    assert [row[:8] for row in rows] == [
        ["0", "sdpa", "index_copy_", "4", "2", "16", str(SLIDING_WINDOW), "dense (window)"],
        ["1", "sdpa", "index_copy_", "4", "2", "16", "-", "rewrite"],
        ["2", "sdpa", "index_copy_", "4", "2", "16", str(SLIDING_WINDOW), "dense (window)"],
    ], out
    assert "1 of 3 layers rewritten to sparse decode attention; 2 kept dense over their sliding window" in " ".join(out.split())


def test_inspect_json(checkpoint):
    result = invoke(checkpoint, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["layer"] for r in rows] == [0, 1, 2]
    assert [r["action"] for r in rows] == ["ring", "rewrite", "ring"]
    assert [r["window"] for r in rows] == [SLIDING_WINDOW, None, SLIDING_WINDOW]
    assert all((r["q_heads"], r["kv_heads"], r["head_dim"]) == (4, 2, 16) for r in rows)
    assert {r["attention"] for r in rows} == {"sdpa"}


def test_inspect_eager_attention(checkpoint):
    result = invoke(checkpoint, "--json", "--attn", "eager")
    assert result.exit_code == 0, result.output
    assert {r["attention"] for r in json.loads(result.stdout)} == {"eager"}


ERRORS = [
    (["{tmp}/nope.gguf"], "no model at"),
    (["{tmp}"], "without config.json"),
    (["{checkpoint}", "--attn", "flash"], "--attn must be sdpa or eager"),
    (["{checkpoint}", "--capture-cache", "paged"], "capture_cache must be one of"),
]
ERROR_IDS = ["missing-file", "directory-without-config", "bad-attn", "bad-capture-cache"]


@pytest.mark.parametrize(("args", "message"), ERRORS, ids=ERROR_IDS)
def test_inspect_errors_exit_2_and_name_the_problem(checkpoint, tmp_path, args, message):
    result = invoke(*(a.format(tmp=tmp_path, checkpoint=checkpoint) for a in args))
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "error: " in text and message in text, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(("args", "message"), ERRORS, ids=ERROR_IDS)
def test_inspect_errors_are_one_line(checkpoint, tmp_path, args, message):
    result = invoke(*(a.format(tmp=tmp_path, checkpoint=checkpoint) for a in args))
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected a one-line error, got {len(lines)} lines:\n{result.output}"
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
