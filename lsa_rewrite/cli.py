"""``lsa-rewrite`` command line: thin wrappers over the Python API (typer + rich).

Commands: ``inspect`` (what the passes find in a checkpoint and what they would do with it),
``calibrate`` (record the indexer's inputs and targets over long documents into a dump) and ``train``
(train an indexer from a dump, without the model). Loading is offline: MODEL is an HF model
directory or a ``.gguf`` file. Options are checked before any model loads; bad input prints one
line naming what was wrong and exits with code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="lsa-rewrite",
    help="Lookahead Sparse Attention for decoder LLMs, by FX graph rewriting.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """Lookahead Sparse Attention for decoder LLMs, by FX graph rewriting."""


@app.command("inspect")
def inspect_cmd(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="HF model directory or .gguf file"),
    attn: str = typer.Option("sdpa", help="attention implementation to trace: sdpa or eager"),
    capture_cache: str = typer.Option("static", help="HF cache the decode step is traced with: static or dynamic"),
    as_json: bool = typer.Option(False, "--json", help="print the sites as JSON instead of a table"),
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
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(code=2) from None
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
    console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
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
    documents: list[Path] = typer.Option(None, "--documents", help=".txt/.jsonl files or directories (default: built-in texts and tasks)"),
    target_layers: str = typer.Option(None, help="comma-separated sparsely attended layers (default: 3 over the depth)"),
    windows: int = typer.Option(16, help="window starts sampled per document"),
    max_tokens: int = typer.Option(None, help="cut documents to this many tokens (default: the model's maximum)"),
    seed: int = typer.Option(0, help="seeds documents, window starts and the held-out split"),
    fresh: bool = typer.Option(False, "--fresh", help="delete an existing dump in --out instead of resuming it"),
    debug: bool = typer.Option(False, "--debug", help="show the traceback on errors"),
) -> None:
    """Record what the lookahead indexer reads and the real attention it should predict (a calibration dump)."""
    from .config import LSAConfig

    console = Console(stderr=True)
    try:
        config = LSAConfig(chunk_size=chunk_size, interval=interval)
        layers = _layers(target_layers)
        if windows < 1:
            raise ValueError(f"--windows must be >= 1, got {windows}")
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
            max_tokens=max_tokens, seed=seed, resume=not fresh,
        )
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as exc:
        _fail(console, exc, debug)
    from .indexer import CalibrationDump

    opened = CalibrationDump(dump)
    console.print(f"wrote {dump}: {len(opened)} windows ({opened.count('train')} train, {opened.count('heldout')} held out), target layers {opened.target_layers}")


@app.command("train")
def train_cmd(
    dump: Path = typer.Argument(..., metavar="DUMP", help="calibration dump directory (from `lsa-rewrite calibrate`)"),
    out: Path = typer.Option(..., "--out", "-o", help="indexer file to write (.safetensors)"),
    epochs: int = typer.Option(8, help="passes over the training windows"),
    lr: float = typer.Option(1e-3, help="learning rate (AdamW, cosine decay)"),
    loss: str = typer.Option("bce", help="bce or focal"),
    rank: int = typer.Option(None, help="query-tower rank (default: from the hidden size)"),
    seed: int = typer.Option(0, help="training seed (same seed, same weights)"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    top_p: float = typer.Option(None, "--top-p", help="golden-label nucleus per layer (default: the dump's)"),
    min_layers: int = typer.Option(None, "--min-layers", help="golden-label layer vote (default: the dump's)"),
    as_json: bool = typer.Option(False, "--json", help="print the held-out metrics as JSON"),
    debug: bool = typer.Option(False, "--debug", help="show the traceback on errors"),
) -> None:
    """Train an indexer from a calibration dump alone (the model is never loaded); report held-out metrics."""
    console = Console(stderr=True)
    try:
        if out.suffix != ".safetensors":
            raise ValueError(f"--out must name a .safetensors file, got {str(out)!r}")
        if loss not in ("bce", "focal"):
            raise ValueError(f"--loss must be bce or focal, got {loss!r}")
        if epochs < 1 or lr <= 0:
            raise ValueError(f"--epochs must be >= 1 and --lr > 0, got {epochs} and {lr}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"--top-p must be in (0, 1], got {top_p}")
        if min_layers is not None and min_layers < 1:
            raise ValueError(f"--min-layers must be >= 1, got {min_layers}")
        if not dump.is_dir():
            raise FileNotFoundError(f"no calibration dump at {str(dump)!r}: pass the directory `lsa-rewrite calibrate --out` wrote")
        from .indexer import train_indexer

        _, metrics = train_indexer(
            dump, out=out, epochs=epochs, lr=lr, loss=loss, rank=rank, seed=seed, device=device, top_p=top_p, min_layers=min_layers
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
    Console().print(table)
    console.print(f"wrote {out}")


if __name__ == "__main__":  # pragma: no cover
    app()
