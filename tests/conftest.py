"""Shared pytest setup: the zoo fixture, a per-test seed, and keeping the repo root off sys.path.

Heavy things (real checkpoints, compiled graphs) do not belong here; build them in the tests that need
them, or in module-scoped fixtures next to those tests.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _hide_repo_root() -> None:
    """Drop the repo root from sys.path when lsa_rewrite is importable without it.

    `python -m pytest` from the repo root puts the root on sys.path, which exposes the top-level
    `kernels/` directory as a module named `kernels`. transformers probes for the Hugging Face
    `kernels` package (e.g. while loading GGUF files) by importing whatever `kernels` resolves to, so
    it would import ours a second time under the wrong name and register every `lsa::` custom op twice.
    The installed package (`pip install -e .`) maps kernels/ to `lsa_rewrite.kernels`, so the root
    entry is only needed when lsa_rewrite is not installed at all; then it is kept.
    """

    def is_root(entry: str) -> bool:
        try:
            return Path(entry or ".").resolve() == REPO_ROOT
        except OSError:
            return False

    if not any(is_root(entry) for entry in sys.path):
        return
    saved = list(sys.path)
    sys.path[:] = [entry for entry in sys.path if not is_root(entry)]
    importlib.invalidate_caches()
    if importlib.util.find_spec("lsa_rewrite") is None:
        sys.path[:] = saved


# Must run before anything imports transformers (zoo.py does).
_hide_repo_root()

import pytest  # noqa: E402
import torch  # noqa: E402

from zoo import make_model  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_torch():
    # Tests that draw random inputs without a generator get the same ones whatever ran before them.
    torch.manual_seed(0)


@pytest.fixture
def zoo_model():
    """Factory for zoo models: `zoo_model("mistral", attn_implementation="eager")` (see tests/zoo.py)."""
    return make_model
