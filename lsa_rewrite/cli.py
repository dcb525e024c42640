"""``lsa-rewrite`` command line: thin wrappers over the Python API (typer + rich).

Commands: ``convert`` (load, convert and save a model directory that ``lsa_rewrite.from_pretrained``
loads converted), ``generate`` (one reply, streamed, with the KV footprint), ``bench`` (decode speed
and device KV bytes, dense against LSA, per context length), ``inspect`` (what the passes find in a
checkpoint and what they would do with it), ``calibrate`` (record the indexer's inputs and targets
over long documents into a dump) and ``train`` (train an indexer from a dump, without the model).
Loading is offline: MODEL is an HF model directory, a ``.gguf`` file, or a directory written by
``convert`` (its saved LSA settings are the defaults of the options). Options are checked before any
model loads; bad input prints one line naming what was wrong and exits with code 2 (``--debug``
shows the traceback).

Not here: an interactive multi-turn chat (it needs cache reuse across turns).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(
    name="lsa-rewrite",
    help="Lookahead Sparse Attention for decoder LLMs, by FX graph rewriting.",
    no_args_is_help=True,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"lsa-rewrite {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="print the version and exit"),
) -> None:
    """Lookahead Sparse Attention for decoder LLMs, by FX graph rewriting."""


@app.command("inspect")
def inspect_cmd(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="HF model directory or .gguf file"),
    attn: str = typer.Option("sdpa", help="attention implementation to trace: sdpa or eager"),
    capture_cache: str = typer.Option("static", help="HF cache the decode step is traced with: static or dynamic"),
    as_json: bool = typer.Option(False, "--json", help="print the sites as JSON instead of a table"),
    debug: bool = typer.Option(False, "--debug", help="show the traceback on errors"),
) -> None:
    """List every attention site of MODEL: form, cache write, heads, window, and the action taken."""
    from .config import LSAConfig
    from .convert import inspect_model
    from .loading import load_model

    console = Console(stderr=True)
    try:
        config = LSAConfig(capture_cache=capture_cache)
        if attn not in ("sdpa", "eager"):
            raise ValueError(f"--attn must be sdpa or eager, got {attn!r}")
        with console.status(f"loading {model_path.name}"):
            model, _ = load_model(model_path)
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(attn)
        with console.status("tracing one decode step"):
            rows = inspect_model(model, config)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as exc:
        _fail(console, exc, debug)
    if as_json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    table = Table(title=f"{model_path.name}: {type(model).__name__}")
    for column in ("layer", "attention", "cache write", "heads", "kv heads", "head dim", "window", "action", "why"):
        table.add_column(column, justify="right" if column in ("layer", "heads", "kv heads", "head dim", "window") else "left", no_wrap=column != "why")
    for r in rows:
        style = "green" if r["action"] == "rewrite" else "yellow"
        action = "rewrite" if r["action"] == "rewrite" else "dense (window)"
        table.add_row(
            str(r["layer"]), r["attention"], r["cache_write"], str(r["q_heads"]), str(r["kv_heads"]), str(r["head_dim"]),
            "-" if r["window"] is None else str(r["window"]), f"[{style}]{action}[/{style}]", r["reason"],
        )
    out = Console(width=None if sys.stdout.isatty() else 140)  # pipes get full rows, not an 80-column squeeze
    out.print(table)
    rewritten = sum(r["action"] == "rewrite" for r in rows)
    out.print(f"{rewritten} of {len(rows)} layers rewritten to sparse decode attention; {len(rows) - rewritten} kept dense over their sliding window")


def _fail(console: Console, exc: BaseException, debug: bool) -> None:
    if debug:
        raise exc
    console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
    raise typer.Exit(code=2)


def _layers(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--target-layers must be comma-separated layer numbers (e.g. 7,15,22), got {text!r}") from None


@app.command("calibrate")
def calibrate_cmd(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="HF model directory or .gguf file"),
    out: Path = typer.Option(..., "--out", "-o", help="dump directory to write (resumed when it holds an unfinished dump)"),
    chunk_size: int = typer.Option(16, help="tokens per chunk the indexer scores (a power of two, 16-64)"),
    interval: int = typer.Option(16, help="lookahead window: decode steps between selections"),
    sink_tokens: int = typer.Option(
        64, help="first tokens left out of the labels (LSAConfig's default; on SmolLM2, 64 / 128 kept running-text KL at "
        "half of 16 / 32's at 13.5% resident with the same task answers, for a runtime with 16 / 32; no gain on Gemma-3: docs/indexer.md)",
    ),
    recent_tokens: int = typer.Option(128, help="most recent tokens left out of the labels (LSAConfig's default)"),
    documents: list[Path] = typer.Option(None, "--documents", help=".txt/.jsonl files or directories (default: built-in texts and tasks)"),
    target_layers: str = typer.Option(None, help="comma-separated sparsely attended layers (default: 3 over the depth)"),
    windows: int = typer.Option(6, help="window starts sampled per document (tasks add 3 at their reply)"),
    max_tokens: int = typer.Option(None, help="cut documents to this many tokens (default: the model's maximum)"),
    seed: int = typer.Option(0, help="seeds documents, window starts and the held-out split"),
    tasks: int = typer.Option(120, help="synthetic retrieval tasks among the built-in documents (without --documents)"),
    fresh: bool = typer.Option(False, "--fresh", help="delete an existing dump in --out instead of resuming it"),
    debug: bool = typer.Option(False, "--debug", help="show the traceback on errors"),
) -> None:
    """Record what the lookahead indexer reads and the real attention it should predict (a calibration dump)."""
    from .config import LSAConfig

    console = Console(stderr=True)
    try:
        config = LSAConfig(chunk_size=chunk_size, interval=interval, sink_tokens=sink_tokens, recent_tokens=recent_tokens)
        layers = _layers(target_layers)
        if windows < 1:
            raise ValueError(f"--windows must be >= 1, got {windows}")
        if tasks < 0:
            raise ValueError(f"--tasks must be >= 0, got {tasks}")
        if documents and tasks != 120:
            raise ValueError("--tasks sets the built-in documents' task count; with --documents, put the tasks in those files")
        for path in documents or []:
            if not path.exists():
                raise FileNotFoundError(f"--documents {str(path)!r} does not exist")
        from .indexer.calibrate import calibrate
        from .loading import load_model

        with console.status(f"loading {model_path.name}"):
            model, tokenizer = load_model(model_path)
        if tokenizer is None:
            raise ValueError(f"{model_path} has no tokenizer; calibration tokenizes documents with the model's own tokenizer")
        dump = calibrate(
            model, tokenizer, out, config=config, documents=documents or None, target_layers=layers, windows_per_document=windows,
            max_tokens=max_tokens, seed=seed, tasks=tasks, resume=not fresh,
        )
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as exc:
        _fail(console, exc, debug)
    from .indexer import CalibrationDump

    opened = CalibrationDump(dump)
    console.print(f"wrote {dump}: {len(opened)} windows ({opened.count('train')} train, {opened.count('heldout')} held out), target layers {opened.target_layers}")


@app.command("train")
def train_cmd(
    dump: list[Path] = typer.Argument(
        ..., metavar="DUMP...", help="calibration dump directory (from `lsa-rewrite calibrate`); several: one indexer trained on all of their windows"
    ),
    out: Path = typer.Option(..., "--out", "-o", help="indexer file to write (.safetensors)"),
    epochs: int = typer.Option(8, help="passes over the training windows"),
    lr: float = typer.Option(1e-3, help="learning rate (AdamW, cosine decay)"),
    loss: str = typer.Option("bce", help="bce, focal, or bce+listwise (adds a KL term toward the attention shares)"),
    rank: int = typer.Option(None, help="query-tower rank (default: from the hidden size)"),
    seed: int = typer.Option(0, help="training seed (same seed, same weights)"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    top_p: float = typer.Option(None, "--top-p", help="golden-label nucleus per layer (default: the dump's)"),
    min_layers: int = typer.Option(None, "--min-layers", help="golden-label layer vote of the 'vote' rule (default: the dump's)"),
    label_rule: str = typer.Option(None, "--label-rule", help="golden labels: 'mean' (nucleus of the layer-averaged attention) or 'vote' (per-layer nucleus + layer vote); default: the dump's"),
    trainable: str = typer.Option("all", help="all, or heads (the query projection stays the model's own)"),
    ensemble: str = typer.Option(
        "max", help="max or mean: one ranking from all target layers; group: each target layer ranks for its nearest layers, trained on their attention"
    ),
    neighbour_margin: float = typer.Option(
        None, "--neighbour-margin",
        help="span rule saved with the indexer: a chunk's logit is raised to its best selectable neighbour's minus this margin (default: off)",
    ),
    neighbour_min_free: int = typer.Option(
        0, "--neighbour-min-free", help="the span rule only for selections with at least this many free slots (beyond sink, tail and window)"
    ),
    neighbour_top: int = typer.Option(
        None, "--neighbour-top", help="the span rule: only the N highest selectable chunks of each target layer lend (default: all)"
    ),
    group_shared: float = typer.Option(
        0.0, "--group-shared",
        help="with --ensemble group: the share of each selection's free slots every layer fills from the shared ranking (max over target layers) first",
    ),
    reply_weight: int = typer.Option(
        1, "--reply-weight",
        help="times per epoch each window at a task's reply (where the answer is read) is seen; the others once",
    ),
    as_json: bool = typer.Option(False, "--json", help="print the held-out metrics as JSON"),
    debug: bool = typer.Option(False, "--debug", help="show the traceback on errors"),
) -> None:
    """Train an indexer from calibration dumps alone (the model is never loaded); report held-out metrics."""
    console = Console(stderr=True)
    try:
        if out.suffix != ".safetensors":
            raise ValueError(f"--out must name a .safetensors file, got {str(out)!r}")
        if loss not in ("bce", "focal", "bce+listwise"):
            raise ValueError(f"--loss must be bce, focal or bce+listwise, got {loss!r}")
        if epochs < 1 or lr <= 0:
            raise ValueError(f"--epochs must be >= 1 and --lr > 0, got {epochs} and {lr}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"--top-p must be in (0, 1], got {top_p}")
        if min_layers is not None and min_layers < 1:
            raise ValueError(f"--min-layers must be >= 1, got {min_layers}")
        from .indexer.dump import LABEL_RULES

        if label_rule is not None and label_rule not in LABEL_RULES:
            raise ValueError(f"--label-rule must be one of {', '.join(LABEL_RULES)}, got {label_rule!r}")
        if trainable not in ("all", "heads"):
            raise ValueError(f"--trainable must be all or heads, got {trainable!r}")
        if ensemble not in ("max", "mean", "group"):
            raise ValueError(f"--ensemble must be max, mean or group, got {ensemble!r}")
        if neighbour_margin is not None and not 0.0 <= neighbour_margin < float("inf"):
            raise ValueError(f"--neighbour-margin must be a number of logits >= 0 (leave it out for no span rule), got {neighbour_margin}")
        if neighbour_min_free < 0:
            raise ValueError(f"--neighbour-min-free must be >= 0, got {neighbour_min_free}")
        if neighbour_top is not None and neighbour_top < 1:
            raise ValueError(f"--neighbour-top must be >= 1 (leave it out for every selectable chunk), got {neighbour_top}")
        if not 0.0 <= group_shared <= 1.0 or (group_shared and ensemble != "group"):
            raise ValueError(f"--group-shared must be a share in [0, 1] and needs --ensemble group, got {group_shared} with --ensemble {ensemble}")
        if reply_weight < 1:
            raise ValueError(f"--reply-weight must be >= 1 (1: reply windows count like the others), got {reply_weight}")
        for path in dump:
            if not path.is_dir():
                raise FileNotFoundError(f"no calibration dump at {str(path)!r}: pass the directory `lsa-rewrite calibrate --out` wrote")
        from .indexer import train_indexer

        _, metrics = train_indexer(
            dump, out=out, epochs=epochs, lr=lr, loss=loss, rank=rank, seed=seed, device=device, top_p=top_p, min_layers=min_layers, label_rule=label_rule,
            trainable=trainable, ensemble=ensemble, neighbour_margin=neighbour_margin, neighbour_min_free=neighbour_min_free,
            neighbour_top=neighbour_top, group_shared=group_shared, reply_weight=reply_weight,
        )
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        _fail(console, exc, debug)
    if as_json:
        json.dump(metrics, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        return
    table = Table(title=f"held-out selection quality: {out.name}")
    table.add_column("selector")
    budgets = None
    for name in ("indexer", "untrained", "query_aware", "recency", "random"):
        row = metrics.get(name)
        if not isinstance(row, dict):
            continue
        recall = row.get("golden_recall", {})
        if budgets is None:
            budgets = list(recall)
            for b in budgets:
                table.add_column(f"golden@{b}", justify="right")
        table.add_row(name, *["-" if recall.get(b) is None else f"{recall[b]:.3f}" for b in budgets])
    ceiling = next((row["golden_recall_ceiling"] for row in metrics.values() if isinstance(row, dict) and "golden_recall_ceiling" in row), None)
    if ceiling and budgets:  # what a perfect ranking reaches: the golden sets can be larger than a budget
        table.add_row("(perfect ranking)", *["-" if ceiling.get(b) is None else f"{ceiling[b]:.3f}" for b in budgets])
    Console().print(table)
    console.print(f"wrote {out}")


@app.command("merge")
def merge_cmd(
    shared: Path = typer.Argument(..., metavar="SHARED", help="indexer trained with --ensemble max: the shared ranking"),
    groups: Path = typer.Argument(..., metavar="GROUPS", help="indexer trained with --ensemble group (on other target layers)"),
    out: Path = typer.Option(..., "--out", "-o", help="indexer file to write (.safetensors)"),
    share: float = typer.Option(..., "--share", help="share of each selection's free slots every layer group fills from SHARED's ranking first, in (0, 1]"),
    debug: bool = typer.Option(False, "--debug", help="show the traceback on errors"),
) -> None:
    """One indexer from a max indexer and a group indexer: each layer group's resident set starts with the
    top --share of SHARED's ranking and GROUPS fills the rest (weights unchanged; both files' target layers tapped)."""
    console = Console(stderr=True)
    try:
        if out.suffix != ".safetensors":
            raise ValueError(f"--out must name a .safetensors file, got {str(out)!r}")
        if out.resolve() in (shared.resolve(), groups.resolve()):
            raise ValueError(f"--out {str(out)!r} would overwrite an input indexer: write the merged one to another file")
        from .indexer.model import LSAIndexer, merge_indexers

        merged = merge_indexers(LSAIndexer.load(shared), LSAIndexer.load(groups), share=share)
        merged.save(out, signature=merged.signature, lsa=merged.lsa, metrics=merged.metrics)
    except (ValueError, FileNotFoundError) as exc:
        _fail(console, exc, debug)
    cfg = merged.config
    console.print(
        f"wrote {out}: target layers {list(cfg.target_layers)} ({merged.num_parameters():,} parameters), "
        f"shared ranking from layers {list(cfg.shared_layers or ())}, share {cfg.group_shared}"
    )


# -- convert, generate, bench ---------------------------------------------------------------------
# The LSA options the three commands share; None means "the saved setting of a converted MODEL,
# else the LSAConfig default".
BUDGET = typer.Option(None, "--budget", help="resident KV per sequence and layer: a fraction of the context (0.135) or a number of tokens (4096)")
CHUNK_SIZE = typer.Option(None, "--chunk-size", help="tokens per chunk (a power of two)")
INTERVAL = typer.Option(None, "--interval", help="lookahead window: decode steps between selections")
SINK_TOKENS = typer.Option(None, "--sink-tokens", help="first tokens that are always resident")
RECENT_TOKENS = typer.Option(None, "--recent-tokens", help="most recent tokens that are always resident")
SELECTOR = typer.Option(None, "--selector", help="query-aware, recency, random or indexer (default: indexer with --indexer, else query-aware)")
MODE = typer.Option(None, "--mode", help="offload (CPU mirror), evict (no mirror, no host memory per sequence) or dense")
MIRROR = typer.Option(None, "--mirror", help="offload mode's CPU mirror: exact (lossless) or fp8 (lossy, half the host memory)")
INDEXER = typer.Option(None, "--indexer", help="trained indexer (.safetensors from `lsa-rewrite train`); implies --selector indexer")
DTYPE = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16: what the weights are loaded as")
DEVICE = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)")
DEBUG = typer.Option(False, "--debug", help="show the traceback on errors")

_DTYPES = ("float32", "bfloat16", "float16")
_LSA_FLAGS = {
    "budget": "--budget", "chunk_size": "--chunk-size", "interval": "--interval", "sink_tokens": "--sink-tokens",
    "recent_tokens": "--recent-tokens", "selector": "--selector", "mode": "--mode",
    "mirror": "--mirror",
}


def _budget(text: str | None) -> float | int | None:
    """``--budget``: an int is a number of resident tokens, anything with a point or exponent a fraction (as in LSAConfig)."""
    if text is None:
        return None
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    raise ValueError(f"--budget must be a fraction of the context (e.g. 0.135) or a number of resident tokens (e.g. 4096), got {text!r}")


def _dtype(name: str):
    import torch

    if name not in _DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(_DTYPES)}, got {name!r}")
    return getattr(torch, name)


def _device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be cpu or cuda (or cuda:N), got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda (or cuda:N), got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device here; use --device cpu")
    return device


def _lsa_settings(model_path: Path, options: dict[str, Any], indexer: Path | None):
    """The LSAConfig and indexer a command converts with, checked before any model loads.

    A converted MODEL's saved settings (``lsa_config.json``) are the starting point, else the
    ``LSAConfig`` defaults; the options given replace single fields. ``--indexer`` implies
    ``--selector indexer``; a converted MODEL's saved indexer is used when the selector is the indexer.
    """
    from .config import LSAConfig
    from .indexer import LSAIndexer
    from .pretrained import read_lsa_config

    given = {name: value for name, value in options.items() if value is not None}
    if "budget" in given:
        given["budget"] = _budget(given["budget"])
    if indexer is not None:
        if not indexer.is_file():
            raise FileNotFoundError(f"--indexer {str(indexer)!r} does not exist: pass the .safetensors file `lsa-rewrite train --out` wrote")
        given.setdefault("selector", "indexer")
    saved = read_lsa_config(model_path)
    config = dataclasses.replace(saved.config if saved is not None else LSAConfig(), **given)
    if indexer is not None:
        if config.selector != "indexer":
            raise ValueError(f"--indexer is read by the indexer selector, but --selector is {config.selector!r}; leave out --selector")
        return config, LSAIndexer.load(indexer)
    if config.selector == "indexer":
        if saved is None or saved.indexer is None:
            raise ValueError("--selector indexer needs a trained indexer: pass --indexer FILE (from `lsa-rewrite calibrate` + `lsa-rewrite train`)")
        return config, LSAIndexer.load(saved.indexer)
    return config, None


def _check_out(model_path: Path, out: Path) -> None:
    from .pretrained import CONFIG_FILE

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; pass a directory to write the converted model to")
    if out.exists() and out.resolve() == model_path.resolve():
        raise ValueError(f"--out {str(out)!r} is MODEL itself; write the converted model to another directory")
    if out.is_dir() and any(out.iterdir()) and not (out / CONFIG_FILE).is_file():
        raise ValueError(f"--out {str(out)!r} is a non-empty directory that holds no converted model; pass a new or empty directory")


def _check_tokenizer(model_path: Path) -> None:
    """A model directory without tokenizer files cannot generate from text (a .gguf carries its own)."""
    from .loading import _TOKENIZER_FILES

    if model_path.is_dir() and (model_path / "config.json").is_file() and not any((model_path / n).is_file() for n in _TOKENIZER_FILES):
        raise ValueError(
            f"{str(model_path)!r} has no tokenizer ({', '.join(_TOKENIZER_FILES)}); save one next to the weights "
            "(tokenizer.save_pretrained(DIR)) to generate from text"
        )


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' own progress bars (loading, writing shards) would interleave with ours on stderr."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.2f} MiB"


def _dense_cache_bytes(cache) -> int:
    """Bytes of the K/V tensors a transformers cache holds (what the dense model keeps on its device)."""
    total = 0
    for layer in getattr(cache, "layers", None) or ():
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if tensor is not None and hasattr(tensor, "element_size"):
                total += tensor.numel() * tensor.element_size()
    return total


def _footprint(model, out) -> dict[str, Any]:
    """``lsa_rewrite.footprint`` of a converted model; for the dense model, its cache measured after the run."""
    if getattr(model, "lsa", None) is not None:
        from .convert import footprint

        return footprint(model)
    cache = getattr(out, "cache", None)  # older transformers call it past_key_values
    dense = _dense_cache_bytes(cache if cache is not None else out.past_key_values)
    return {"resident_kv_bytes": dense, "dense_kv_bytes": dense, "ratio": 1.0, "tokens": int(out.sequences.shape[1]) - 1}


def _generate_kwargs(model, tokenizer) -> dict[str, Any]:
    """Greedy decoding, with a pad token so that transformers does not warn about it."""
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None and tokenizer is not None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"do_sample": False, "pad_token_id": pad, "return_dict_in_generate": True}


@app.command("convert")
def convert_cmd(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="HF model directory, .gguf file, or a converted directory"),
    out: Path = typer.Option(..., "--out", "-o", help="directory to write: weights (safetensors), tokenizer, lsa_config.json, indexer"),
    budget: str = BUDGET,
    chunk_size: int = CHUNK_SIZE,
    interval: int = INTERVAL,
    sink_tokens: int = SINK_TOKENS,
    recent_tokens: int = RECENT_TOKENS,
    selector: str = SELECTOR,
    mode: str = MODE,
    mirror: str = MIRROR,
    indexer: Path = INDEXER,
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16: what the weights are saved as"),
    debug: bool = DEBUG,
) -> None:
    """Convert MODEL and write it to OUT, which `lsa_rewrite.from_pretrained(OUT)` loads converted.

    OUT is an HF model directory (GGUF weights dequantized) with lsa_config.json and the indexer; the conversion is checked first.
    """
    console = Console(stderr=True)
    options = dict(budget=budget, chunk_size=chunk_size, interval=interval, sink_tokens=sink_tokens, recent_tokens=recent_tokens, selector=selector, mode=mode, mirror=mirror)
    try:
        torch_dtype = _dtype(dtype)
        config, loaded = _lsa_settings(model_path, options, indexer)
        _check_out(model_path, out)
        from .pretrained import from_pretrained

        with _quiet_transformers(), console.status(f"loading and converting {model_path.name}"):
            model, tokenizer = from_pretrained(model_path, config=config, indexer=loaded, dtype=torch_dtype)
        with _quiet_transformers(), console.status(f"writing {out}"):
            model.save_pretrained(out)
            if tokenizer is not None:
                tokenizer.save_pretrained(out)
    except (ValueError, OSError, ImportError, RuntimeError) as exc:
        _fail(console, exc, debug)
    rows = model.lsa.report()
    sparse = sum(r["action"] == "rewrite" for r in rows)
    parts = ["weights", "lsa_config.json"] + (["indexer.safetensors"] if loaded is not None else []) + (["tokenizer"] if tokenizer is not None else [])
    console.print(
        f"wrote {out} ({', '.join(parts)}): {type(model).__name__}, {sparse} of {len(rows)} layers sparse; budget {config.budget!r}, "
        f"chunk_size {config.chunk_size}, interval {config.interval}, selector {config.selector}, mode {config.mode}",
        soft_wrap=True,
    )


@app.command("generate")
def generate_cmd(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="HF model directory, .gguf file, or a converted directory"),
    prompt: str = typer.Option(None, "--prompt", "-p", help="the prompt text"),
    prompt_file: Path = typer.Option(None, "--prompt-file", help="read the prompt from this UTF-8 text file"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="tokens to generate at most (greedy)"),
    chat: bool = typer.Option(False, "--chat", help="wrap the prompt as one user turn in the tokenizer's chat template"),
    dense: bool = typer.Option(False, "--dense", help="run the model without LSA (the reference)"),
    budget: str = BUDGET,
    chunk_size: int = CHUNK_SIZE,
    interval: int = INTERVAL,
    sink_tokens: int = SINK_TOKENS,
    recent_tokens: int = RECENT_TOKENS,
    selector: str = SELECTOR,
    mode: str = MODE,
    mirror: str = MIRROR,
    indexer: Path = INDEXER,
    dtype: str = DTYPE,
    device: str = DEVICE,
    as_json: bool = typer.Option(False, "--json", help='print {"reply", "footprint", "tokens", "seconds"} instead of streaming'),
    debug: bool = DEBUG,
) -> None:
    """Generate one reply to a prompt with MODEL converted (or dense), streamed to stdout; KV footprint on stderr."""
    console = Console(stderr=True)
    options = dict(budget=budget, chunk_size=chunk_size, interval=interval, sink_tokens=sink_tokens, recent_tokens=recent_tokens, selector=selector, mode=mode, mirror=mirror)
    try:
        if (prompt is None) == (prompt_file is None):
            raise ValueError("pass the prompt as exactly one of --prompt TEXT and --prompt-file FILE")
        if prompt_file is not None:
            if not prompt_file.is_file():
                raise FileNotFoundError(f"--prompt-file {str(prompt_file)!r} does not exist")
            try:
                prompt = prompt_file.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"--prompt-file {str(prompt_file)!r} is not UTF-8 text") from None
        if not prompt.strip():
            raise ValueError("the prompt is empty; pass some text with --prompt or --prompt-file")
        if max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        torch_dtype, torch_device = _dtype(dtype), _device(device)
        if dense:
            given = [_LSA_FLAGS[name] for name, value in options.items() if value is not None] + (["--indexer"] if indexer is not None else [])
            if given:
                raise ValueError(f"--dense runs the model without LSA; leave out {', '.join(given)}")
        else:
            config, loaded = _lsa_settings(model_path, options, indexer)
        _check_tokenizer(model_path)
        from .loading import load_model
        from .pretrained import from_pretrained

        with _quiet_transformers(), console.status(f"loading {model_path.name}" if dense else f"loading and converting {model_path.name}"):
            if dense:
                model, tokenizer = load_model(model_path, dtype=torch_dtype, device=torch_device)
            else:
                model, tokenizer = from_pretrained(model_path, config=config, indexer=loaded, dtype=torch_dtype, device=torch_device)
        if tokenizer is None:
            raise ValueError(f"{str(model_path)!r} has no tokenizer; save one next to the weights to generate from text")
        ids = _encode(tokenizer, prompt, chat=chat, source=model_path).to(torch_device)
        reply, out, seconds = _generate(model, tokenizer, ids, max_new_tokens=max_new_tokens, stream=not as_json)
        footprint = _footprint(model, out)
    except (ValueError, OSError, ImportError, RuntimeError) as exc:
        _fail(console, exc, debug)
    tokens = int(out.sequences.shape[1] - ids.shape[1])
    if as_json:
        json.dump({"reply": reply, "footprint": footprint, "tokens": tokens, "seconds": seconds}, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    _print_footprint(console, footprint, dense=dense, tokens=tokens, seconds=seconds)


@app.command("chat")
def chat_cmd(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="HF model directory, .gguf file, or a converted directory"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="tokens per reply at most (greedy)"),
    budget: str = BUDGET,
    chunk_size: int = CHUNK_SIZE,
    interval: int = INTERVAL,
    sink_tokens: int = SINK_TOKENS,
    recent_tokens: int = RECENT_TOKENS,
    selector: str = SELECTOR,
    mode: str = MODE,
    mirror: str = MIRROR,
    indexer: Path = INDEXER,
    dtype: str = DTYPE,
    device: str = DEVICE,
    debug: bool = DEBUG,
) -> None:
    """Interactive chat with MODEL converted: each turn prefills only the new message into the same store
    (the history stays exact in the CPU mirror); an empty line or end of input ends it."""
    console = Console(stderr=True)
    options = dict(budget=budget, chunk_size=chunk_size, interval=interval, sink_tokens=sink_tokens, recent_tokens=recent_tokens, selector=selector, mode=mode, mirror=mirror)
    try:
        if max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        torch_dtype, torch_device = _dtype(dtype), _device(device)
        config, loaded = _lsa_settings(model_path, options, indexer)
        if config is not None and config.mode == "evict":
            raise ValueError("--mode evict drops chunks, so a later turn could not attend to the history; use offload for chat")
        _check_tokenizer(model_path)
        from .pretrained import from_pretrained

        with _quiet_transformers(), console.status(f"loading and converting {model_path.name}"):
            model, tokenizer = from_pretrained(model_path, config=config, indexer=loaded, dtype=torch_dtype, device=torch_device)
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{str(model_path)!r} has no tokenizer with a chat template; use `lsa-rewrite generate` instead")
    except (ValueError, OSError, ImportError, RuntimeError) as exc:
        _fail(console, exc, debug)
    messages: list[dict[str, str]] = []
    out = None
    while True:
        try:
            text = input("you> ")
        except EOFError:
            break
        if not text.strip():
            break
        try:
            ids, new = _chat_turn(tokenizer, messages, text, out, torch_device)
            reply, out, seconds = _generate(model, tokenizer, ids, max_new_tokens=max_new_tokens, stream=True, cache=out)
        except (ValueError, RuntimeError) as exc:
            _fail(console, exc, debug)
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        tokens = int(out.sequences.shape[1] - ids.shape[1])
        console.print(f"[dim]({new} new prompt tokens prefilled)[/dim]", soft_wrap=True)
        _print_footprint(console, _footprint(model, out), dense=False, tokens=tokens, seconds=seconds)


def _chat_turn(tokenizer, messages: list[dict[str, str]], text: str, out, device):
    """The whole conversation's token ids for the next reply: the previous ``generate()`` output (kept
    as it is, so its cache lines up) followed by what the chat template puts after the last reply
    (end of that turn, the new user turn, the generation prompt). Returns (ids, new token count)."""
    import torch

    if out is None:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        return ids.to(device), int(ids.shape[1])
    marker = "\x00LSA-REPLY\x00"
    rendered = tokenizer.apply_chat_template(
        messages[:-1] + [{"role": "assistant", "content": marker}, {"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    suffix = rendered.split(marker, 1)[1]
    last = int(out.sequences[0, -1])
    eos = tokenizer.eos_token_id if isinstance(tokenizer.eos_token_id, list) else [tokenizer.eos_token_id]
    if last in eos:  # the reply already ended its turn with the end-of-turn token the template would add
        ended = tokenizer.decode([last])
        suffix = suffix[len(ended):] if suffix.startswith(ended) else suffix
    new = tokenizer(suffix, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
    return torch.cat([out.sequences, new], 1), int(new.shape[1])


def _encode(tokenizer, prompt: str, *, chat: bool, source: Path):
    if not chat:
        return tokenizer(prompt, return_tensors="pt")["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer of {str(source)!r} has no chat template; leave out --chat")
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]


def _generate(model, tokenizer, ids, *, max_new_tokens: int, stream: bool, cache=None):
    """Greedy generation of one reply (continuing ``cache``'s conversation when given, a previous
    ``generate()`` output); returns (reply text, generate() output, seconds)."""
    import warnings

    import torch
    from transformers import TextStreamer

    from .runtime.store import LSABudgetWarning

    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LSABudgetWarning)  # footprint()["budget_note"] says it, once, in the summary
        extra = {}
        if cache is not None:
            import inspect as _inspect

            held = cache.cache if getattr(cache, "cache", None) is not None else cache.past_key_values
            extra["cache" if "cache" in _inspect.signature(type(model).forward).parameters else "past_key_values"] = held
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, streamer=streamer, **_generate_kwargs(model, tokenizer), **extra
        )
    seconds = time.perf_counter() - start
    reply = tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)
    return reply, out, seconds


def _print_footprint(console: Console, fp: dict[str, Any], *, dense: bool, tokens: int, seconds: float) -> None:
    speed = f"{tokens} tokens in {seconds:.2f} s ({tokens / seconds:.1f} tokens/s)" if seconds > 0 else f"{tokens} tokens"
    if dense:
        console.print(f"[bold]dense[/bold] KV on device: {_mb(fp['dense_kv_bytes'])} for {fp['tokens']:,} tokens; {speed}", soft_wrap=True)
        return
    console.print(
        f"[bold]LSA[/bold] KV on device: {_mb(fp['resident_kv_bytes'])} of {_mb(fp['dense_kv_bytes'])} dense "
        f"([green]{fp['ratio']:.1%}[/green]) for {fp['tokens']:,} tokens; CPU mirror {_mb(fp['mirror_bytes'])}; "
        f"{fp['selections']} selections; {speed}",
        soft_wrap=True,
    )
    if fp.get("budget_note"):
        console.print(f"[yellow]note:[/yellow] {fp['budget_note']}", soft_wrap=True)


def _contexts(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(v < 2 for v in values):
        raise ValueError(f"--contexts must be comma-separated prompt lengths in tokens, each >= 2 (e.g. 1024,2048), got {text!r}")
    return values


def _max_positions(model) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _synthetic_prompt(model, tokenizer, length: int, *, device):
    """``length`` token ids drawn (seeded) from the vocabulary, leaving out special tokens."""
    import torch

    vocab = int(getattr(model.config, "vocab_size", 0) or 0) or len(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", None) or []) if tokenizer is not None else set()
    ids = torch.tensor([i for i in range(vocab) if i not in special])
    pick = torch.randint(len(ids), (1, length), generator=torch.Generator().manual_seed(length))
    return ids[pick].to(device)


class _Clock:
    """A generate() streamer that only timestamps: the prompt, then each new token."""

    def __init__(self, device) -> None:
        self.times: list[float] = []
        self.sync = device.type == "cuda"

    def put(self, value) -> None:
        if self.sync:
            import torch

            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _bench_one(model, tokenizer, ids, new_tokens: int) -> dict[str, Any]:
    """Decode tokens/s (after the first new token: the prefill is not counted) and the KV bytes on the device."""
    import warnings

    import torch

    from .runtime.store import LSABudgetWarning

    clock = _Clock(ids.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LSABudgetWarning)
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=clock,
            **_generate_kwargs(model, tokenizer),
        )
    decode = clock.times[-1] - clock.times[1]
    fp = _footprint(model, out)
    return {"tokens_per_s": (len(clock.times) - 2) / decode if decode > 0 else None, "kv_bytes": fp["resident_kv_bytes"], "footprint": fp}


@app.command("bench")
def bench_cmd(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="HF model directory, .gguf file, or a converted directory"),
    contexts: str = typer.Option("1024,2048", "--contexts", help="comma-separated prompt lengths in tokens"),
    new_tokens: int = typer.Option(32, "--new-tokens", help="tokens decoded per run (>= 2; the first, after the prefill, is not timed)"),
    budget: str = BUDGET,
    chunk_size: int = CHUNK_SIZE,
    interval: int = INTERVAL,
    sink_tokens: int = SINK_TOKENS,
    recent_tokens: int = RECENT_TOKENS,
    selector: str = SELECTOR,
    mode: str = MODE,
    mirror: str = MIRROR,
    indexer: Path = INDEXER,
    dtype: str = DTYPE,
    device: str = DEVICE,
    as_json: bool = typer.Option(False, "--json", help="print the rows as JSON"),
    debug: bool = DEBUG,
) -> None:
    """Decode tokens/s and KV bytes on the device, dense against LSA, per context length (synthetic prompts).

    Dense KV: what the model's own cache holds after the run; LSA KV: footprint()'s resident_kv_bytes.
    """
    console = Console(stderr=True)
    options = dict(budget=budget, chunk_size=chunk_size, interval=interval, sink_tokens=sink_tokens, recent_tokens=recent_tokens, selector=selector, mode=mode, mirror=mirror)
    try:
        lengths = _contexts(contexts)
        if new_tokens < 2:
            raise ValueError(f"--new-tokens must be >= 2 (the first new token ends the prefill; the rest are timed), got {new_tokens}")
        torch_dtype, torch_device = _dtype(dtype), _device(device)
        config, loaded = _lsa_settings(model_path, options, indexer)
        from .convert import convert
        from .loading import load_model

        with _quiet_transformers(), console.status(f"loading {model_path.name}"):
            model, tokenizer = load_model(model_path, dtype=torch_dtype, device=torch_device)
        limit = _max_positions(model)
        if limit is not None and max(lengths) + new_tokens > limit:
            raise ValueError(f"--contexts {max(lengths)} + --new-tokens {new_tokens} exceeds the {limit} positions of {type(model).__name__}; use shorter contexts")
        rows = _bench_rows(model, tokenizer, lengths, new_tokens, config, loaded, convert, console)
    except (ValueError, OSError, ImportError, RuntimeError) as exc:
        _fail(console, exc, debug)
    if all(row["lsa"] is None for row in rows):
        _fail(console, ValueError(f"LSA ran at no context: {rows[0]['lsa_error']}"), debug)
    if as_json:
        record = {"model": str(model_path), "device": str(torch_device), "dtype": dtype, "new_tokens": new_tokens, "config": config.to_dict(), "rows": rows}
        json.dump(record, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        return
    _print_bench(rows, title=f"{model_path.name}: {type(model).__name__}, {torch_device}, {dtype}, {new_tokens} new tokens, budget {config.budget!r}")


def _bench_rows(model, tokenizer, lengths, new_tokens, config, indexer, convert, console) -> list[dict[str, Any]]:
    """Every context dense first, then the model converted once and every context again; each
    model runs a short warm-up generation first, so one-time costs are not timed."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .runtime.store import StoreError

    device = next(model.parameters()).device
    prompts = {n: _synthetic_prompt(model, tokenizer, n, device=device) for n in lengths}
    rows = {n: {"context": n} for n in lengths}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("dense, warm-up", total=2 * len(lengths))
        warmup = _synthetic_prompt(model, tokenizer, 8, device=device)
        _bench_one(model, tokenizer, warmup, 2)
        for n in lengths:
            progress.update(task, description=f"dense, {n:,} tokens")
            rows[n]["dense"] = _bench_one(model, tokenizer, prompts[n], new_tokens)
            progress.advance(task)
        progress.update(task, description="converting, warm-up")
        convert(model, config, indexer=indexer)
        _bench_one(model, tokenizer, warmup, 2)  # 8 tokens: everything resident, whatever the budget
        for n in lengths:
            progress.update(task, description=f"LSA, {n:,} tokens")
            try:
                rows[n]["lsa"] = _bench_one(model, tokenizer, prompts[n], new_tokens)
            except StoreError as exc:  # e.g. a budget too small for this context: the row says so
                rows[n]["lsa"], rows[n]["lsa_error"] = None, str(exc)
            progress.advance(task)
    return list(rows.values())


def _print_bench(rows: list[dict[str, Any]], *, title: str) -> None:
    table = Table(title=title)
    for column in ("context", "dense tok/s", "LSA tok/s", "speed", "dense KV", "LSA KV", "KV ratio"):
        table.add_column(column, justify="right")
    notes = []
    for row in rows:
        dense, lsa = row["dense"], row["lsa"]
        rate = lambda r: "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.1f}"  # noqa: E731
        if lsa is None:
            table.add_row(f"{row['context']:,}", rate(dense), "[red]refused[/red]", "-", _mb(dense["kv_bytes"]), "-", "-")
            notes.append(f"{row['context']:,} tokens: {row['lsa_error']}")
            continue
        speed = "-" if None in (dense["tokens_per_s"], lsa["tokens_per_s"]) else f"{lsa['tokens_per_s'] / dense['tokens_per_s']:.2f}x"
        ratio = lsa["kv_bytes"] / dense["kv_bytes"] if dense["kv_bytes"] else float("nan")
        table.add_row(f"{row['context']:,}", rate(dense), rate(lsa), speed, _mb(dense["kv_bytes"]), _mb(lsa["kv_bytes"]), f"{ratio:.1%}")
        if lsa["footprint"].get("budget_note"):
            notes.append(f"{row['context']:,} tokens: {lsa['footprint']['budget_note']}")
    out = Console(width=None if sys.stdout.isatty() else 140)
    out.print(table)
    for note in notes:
        out.print(f"note: {note}", soft_wrap=True)


@app.command("demo")
def demo_cmd(
    tokens: int = typer.Option(1200, help="length of the retrieval prompt (tokens)"),
    new_tokens: int = typer.Option(24, help="tokens to generate"),
    plot: Path = typer.Option(Path("lsa-demo-kv.png"), help="PNG of device KV bytes against context length"),
    no_plot: bool = typer.Option(False, "--no-plot", help="skip the plot"),
    seed: int = typer.Option(0, help="which held-out pass-key task"),
    as_json: bool = typer.Option(False, "--json", help="print the figures as JSON"),
    debug: bool = typer.Option(False, "--debug", help="show the traceback on errors"),
) -> None:
    """Dense vs LSA on a long-context retrieval prompt with the bundled SmolLM2-135M-Instruct and its trained indexer."""
    console = Console(stderr=True)
    try:
        if tokens < 256 or new_tokens < 1:
            raise ValueError(f"--tokens must be >= 256 and --new-tokens >= 1, got {tokens} and {new_tokens}")
        if not no_plot and plot.suffix.lower() != ".png":
            raise ValueError(f"--plot must name a .png file, got {str(plot)!r}")
        from .demo import run_demo

        with console.status("starting") as status:
            result = run_demo(tokens=tokens, new_tokens=new_tokens, seed=seed, plot=None if no_plot else plot, progress=status.update)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as exc:
        _fail(console, exc, debug)
    if as_json:
        json.dump(result, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        return
    task = result["task"]
    table = Table(title=f"{result['model']}: pass key {task['answer']} in a {task['prompt_tokens']}-token prompt")
    for column in ("", "answer", "correct", "device KV", "decode tok/s"):
        table.add_column(column, justify="left" if column in ("", "answer") else "right")
    dense, lsa = result["dense"], result["lsa"]
    table.add_row("dense", dense["reply"].strip(), "yes" if dense["correct"] else "no", f"{dense['kv_bytes'] / 2**20:.1f} MiB (100%)",
                  f"{dense['decode_tokens_per_s']:.1f}")
    table.add_row("LSA", lsa["reply"].strip(), "yes" if lsa["correct"] else "no",
                  f"{lsa['kv_bytes'] / 2**20:.1f} MiB ({lsa['kv_ratio']:.1%})", f"{lsa['decode_tokens_per_s']:.1f}")
    Console().print(table)
    console.print(
        f"LSA: budget {result['config']['_data']['budget']} resident tokens (13.5% of the prompt + 48-token sink and tail), "
        f"indexer {result['indexer']}; the full history ({lsa['mirror_bytes'] / 2**20:.1f} MiB) stays in the CPU mirror"
    )
    if "plot" in result:
        console.print(f"wrote {result['plot']}")


if __name__ == "__main__":  # pragma: no cover
    app()
