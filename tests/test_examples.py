"""Every example runs in its short mode, so none can rot (issue 12)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # Dynamo looks the example's classes up by module name
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(EXAMPLES))


def test_hf_model_example(capsys):
    out = _load("hf_model").main(["--short"])
    assert out["footprint"]["ratio"] < 1.0 and out["footprint"]["selections"] > 0
    assert "tokens equal to dense" in capsys.readouterr().out


def test_plain_decoder_example(capsys):
    out = _load("plain_decoder").main(["--short"])
    assert out["covering_equal"], "a covering budget must give the dense tokens"
    assert out["footprint"]["ratio"] < 1.0
    assert "covering budget equals dense: True" in capsys.readouterr().out


def test_multiturn_chat_example(capsys):
    _load("multiturn_chat").main(["--short"])  # asserts the converted conversation equals the dense one
    assert "turn 3:" in capsys.readouterr().out


def test_train_indexer_example(tmp_path, capsys):
    metrics = _load("train_indexer").main(["--short", "--out", str(tmp_path)])
    assert (tmp_path / "indexer.safetensors").is_file() and metrics["heldout"]["windows"] > 0
    assert "converted with the indexer" in capsys.readouterr().out


def test_every_example_has_a_smoke_test():
    # compile_backend: tests/test_backend.py; quickstart (SmolLM2): tests/test_real_model.py
    tested = {"hf_model", "plain_decoder", "multiturn_chat", "train_indexer", "compile_backend", "quickstart"}
    examples = {p.stem for p in EXAMPLES.glob("*.py") if not p.stem.startswith("_")}
    assert examples <= tested, f"examples without a smoke test: {sorted(examples - tested)}"


def test_quickstart_example_on_smollm2(smollm2_path):
    """The quickstart on the real model (a short filler): it prints both answers and the footprint."""
    import json
    import subprocess

    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py"), "--filler", "12", "--new-tokens", "4", "--budget", "0.5"],
        capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout[done.stdout.index("{"):])
    assert result["dense_answer"] and result["lsa_answer"] and 0 < result["ratio"] <= 1.0
