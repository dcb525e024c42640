"""``lsa-rewrite`` command line: thin wrappers over the Python API (typer + rich).

Commands here: ``inspect`` (what the passes find in a checkpoint and what they would do with it).
Loading is offline: MODEL is an HF model directory or a ``.gguf`` file.
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
        with console.status(f"loading {model_path.name}"):
            model, _ = load_model(model_path)
        if attn not in ("sdpa", "eager"):
            raise ValueError(f"--attn must be sdpa or eager, got {attn!r}")
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(attn)
        with console.status("tracing one decode step"):
            rows = inspect_model(model, config)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as exc:
        console.print(f"[red]error:[/red] {exc}")
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


if __name__ == "__main__":  # pragma: no cover
    app()
