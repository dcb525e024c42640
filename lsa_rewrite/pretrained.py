"""Converted HF models on disk: ``save_pretrained`` of a converted model and ``from_pretrained``.

A converted model's ``save_pretrained(dir)`` (installed by ``handling.install`` on HF models) writes
what transformers writes for the underlying dense model (``config.json``, ``model.safetensors``,
``generation_config.json``) plus:

- ``lsa_config.json``: ``{"_type": "LSAPretrained", "_version": 1, "lsa_rewrite_version": ...,
  "config": LSAConfig.to_dict(), "indexer": "indexer.safetensors" or null}``, written last, so its
  presence marks a complete directory;
- ``indexer.safetensors`` when the conversion uses an indexer (``LSAIndexer.save``'s format).

The directory stays an ordinary HF model directory: ``AutoModelForCausalLM.from_pretrained`` loads
the dense model from it. ``from_pretrained(dir)`` loads it (offline, through ``loading.load_model``)
and converts it with the saved settings in one call.

Not here: what a converted model does under deepcopy, ``.to()`` or pickling (``handling.py``), and
the conversion itself (``convert.py``).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import LSAConfig

CONFIG_FILE = "lsa_config.json"
INDEXER_FILE = "indexer.safetensors"
FILE_TYPE = "LSAPretrained"
FORMAT_VERSION = 1

# What transformers' legacy GGUF loader leaves on a model whose weights it dequantized: markers of a
# quantized checkpoint that make save_pretrained refuse, although every weight is a plain tensor.
_GGUF_MARKERS = ("hf_quantizer", "quantization_method", "_weight_conversions", "is_quantized")


@dataclass(frozen=True)
class SavedLSA:
    """What ``lsa_config.json`` of a converted model directory says.

    ``indexer`` is the path of the saved indexer file, or None when the conversion used none.
    """

    config: LSAConfig
    indexer: Path | None
    lsa_rewrite_version: str


def read_lsa_config(path: str | os.PathLike) -> SavedLSA | None:
    """The LSA settings saved in model directory ``path``, or None when it has no ``lsa_config.json``.

    Raises ``FileNotFoundError`` when ``path`` does not exist or the indexer file it names is missing,
    and ``ValueError`` naming the file when ``lsa_config.json`` is unreadable or of an unknown version.

    Example::

        >>> saved = read_lsa_config("smollm2-lsa/")
        >>> saved.config.budget, saved.indexer
        (0.135, None)
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"no model at {str(path)!r}: expected a model directory (written by save_pretrained or `lsa-rewrite convert`, or any HF "
            "checkpoint with config.json) or a .gguf file; check the path (loading is offline, hub model ids are not accepted)"
        )
    file = path / CONFIG_FILE
    if not path.is_dir() or not file.exists():
        return None
    redo = f"re-create it with `lsa-rewrite convert MODEL -o {path}`, or pass config=LSAConfig(...) to convert the weights with settings of your own"
    try:
        obj = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file} is not readable JSON ({exc}); {redo}") from None
    if not isinstance(obj, dict) or obj.get("_type") != FILE_TYPE:
        found = obj.get("_type") if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{file} is not an lsa-rewrite model config (_type={found!r}, expected {FILE_TYPE!r}); {redo}")
    version = obj.get("_version")
    if version != FORMAT_VERSION:
        from . import __version__

        raise ValueError(
            f"{file} has format version {version!r} (written by lsa-rewrite {obj.get('lsa_rewrite_version', '?')}); this lsa-rewrite "
            f"({__version__}) reads version {FORMAT_VERSION}: upgrade lsa-rewrite, or pass config=LSAConfig(...) to convert the weights yourself"
        )
    try:
        config = LSAConfig.from_dict(obj.get("config"))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{file}: invalid LSA config: {exc}; {redo}") from None
    name = obj.get("indexer")
    if name is not None and (not isinstance(name, str) or Path(name).name != name):
        raise ValueError(f"{file}: 'indexer' must be null or a file name in the same directory, got {name!r}; {redo}")
    indexer = path / name if name else None
    if indexer is not None and not indexer.is_file():
        raise FileNotFoundError(f"{file} names the indexer {name!r}, but {indexer} is missing; copy it back, or {redo}")
    return SavedLSA(config=config, indexer=indexer, lsa_rewrite_version=str(obj.get("lsa_rewrite_version", "?")))


def from_pretrained(
    path: str | os.PathLike,
    *,
    config: LSAConfig | None = None,
    indexer: Any = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, Any]:
    """Load a converted model directory and convert it in one call; returns ``(model, tokenizer)``.

    ``path`` is a directory written by a converted model's ``save_pretrained`` or by ``lsa-rewrite
    convert``: the dense weights are loaded offline (``loading.load_model``) and converted with the
    saved ``LSAConfig`` and, when there is one, the saved indexer. The tokenizer is the one saved in
    the directory, or None when it holds none (the same shape as ``load_model``).

    Args:
        path: the model directory. With ``config`` given, any model ``load_model`` takes (an HF
            directory without ``lsa_config.json``, a ``.gguf`` file) is converted with it.
        config: settings that replace the saved ones. The saved indexer is used only when the
            config in effect has ``selector="indexer"``.
        indexer: an ``LSAIndexer`` or the path of its ``.safetensors`` file, instead of the saved one.
        dtype, device: what ``load_model`` loads the weights as, and where.

    Raises:
        FileNotFoundError: ``path`` or the indexer file is missing; ``path`` has no ``lsa_config.json``
            and no ``config`` was given.
        ValueError: ``lsa_config.json`` is corrupt or of an unknown version, or the conversion fails.

    Example::

        >>> model.save_pretrained("smollm2-lsa")          # a converted model (or: lsa-rewrite convert ... -o smollm2-lsa)
        >>> model, tokenizer = lsa_rewrite.from_pretrained("smollm2-lsa")
        >>> model.generate(ids, max_new_tokens=64)
    """
    from .convert import convert
    from .loading import load_model

    if config is not None and not isinstance(config, LSAConfig):
        raise TypeError(f"config must be an LSAConfig, got {type(config).__name__}")
    path = Path(path).expanduser()
    saved = read_lsa_config(path)
    if saved is None and config is None:
        raise FileNotFoundError(
            f"{str(path)!r} has no {CONFIG_FILE}: it is not a converted model directory. Pass config=LSAConfig(...) to convert it "
            f"here, or write one with `lsa-rewrite convert {path} -o OUT`"
        )
    config = config or saved.config
    if indexer is None and saved is not None and saved.indexer is not None and config.selector == "indexer":
        indexer = saved.indexer
    if isinstance(indexer, (str, os.PathLike)):  # a bad indexer file fails before the weights load
        from .indexer import LSAIndexer

        indexer = LSAIndexer.load(indexer)
    model, tokenizer = load_model(path, dtype=dtype, device=device)
    return convert(model, config, indexer=indexer), tokenizer


def save_dense(model: torch.nn.Module, directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
    """``save_pretrained`` of the dense model under a converted one; the model is not changed.

    A model loaded from a GGUF file by transformers' legacy loader holds plain dequantized tensors but
    keeps the quantizer's markers, which make ``save_pretrained`` refuse; they are set aside for the
    call. Weights that stay packed in GGUF blocks cannot be saved densely and are refused.
    """
    cls = type(model)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or getattr(quantizer.quantization_config, "quant_method", None) != "gguf":
        cls.save_pretrained(model, directory, *args, **kwargs)
        return
    packed = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.startswith("Gguf")})
    if packed or any(not p.is_floating_point() for p in model.parameters()):
        raise ValueError(
            f"this model's weights stay packed in GGUF blocks ({', '.join(packed) or 'integer tensors'}), which cannot be saved as dense "
            "safetensors; load the .gguf dequantized (transformers' GgufConfig(dequantize=True)) before converting it"
        )
    held = {name: model.__dict__.pop(name) for name in _GGUF_MARKERS if name in model.__dict__}
    quantization = model.config.__dict__.pop("quantization_config", None)
    model.is_quantized = False
    try:
        cls.save_pretrained(model, directory, *args, **kwargs)
    finally:
        model.__dict__.pop("is_quantized", None)
        model.__dict__.update(held)
        if quantization is not None:
            model.config.quantization_config = quantization


def write_lsa_files(model: torch.nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``lsa_config.json`` (and ``indexer.safetensors``) of converted ``model`` into ``directory``."""
    from . import __version__

    session = model.lsa
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    indexer_name = None
    if session.indexer is not None:
        indexer = copy.deepcopy(session.indexer)  # save() records what it wrote on the object; leave the live one as it is
        signature = indexer.signature
        if not signature:
            from .adapters import is_hf_model
            from .indexer.calibrate import model_signature

            signature = model_signature(model) if is_hf_model(model) else {}
        lsa = indexer.lsa if "chunk_size" in (indexer.lsa or {}) else session.config.to_dict()
        indexer.save(directory / INDEXER_FILE, signature=signature, lsa=lsa, metrics=indexer.metrics)
        indexer_name = INDEXER_FILE
    else:
        (directory / INDEXER_FILE).unlink(missing_ok=True)  # a previous save's indexer would contradict lsa_config.json
    record = {
        "_type": FILE_TYPE,
        "_version": FORMAT_VERSION,
        "lsa_rewrite_version": __version__,
        "config": session.config.to_dict(),
        "indexer": indexer_name,
    }
    file = directory / CONFIG_FILE
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, file)
    return file
