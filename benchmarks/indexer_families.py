"""The trained indexer's path across decoder families, on the CPU, from the test zoo (``tests/zoo.py``).

For every HF family of the zoo (tiny random-weight float32 models built from each architecture's config;
the default attention implementation) and the zoo's plain decoder (``buffer``: gpt-fast style, module-buffer
caches set up for one sequence of 512 tokens, called as ``model(input_ids, input_pos)``), the whole path a user
takes to a trained indexer:

- ``calibrate`` over four short documents (two built-in texts, two calibration tasks; byte tokenizer,
  chunk and interval 16, 3 windows per document), then ``train_indexer`` (one epoch) on the dump;
- ``convert`` with the trained indexer at a covering budget (``mode="dense"``): greedy decoding (8 steps
  after an 80-token prompt) gives the dense model's tokens (``dense_tokens``);
- ``convert`` with it at a 96-token budget: 40 greedy steps after a 200-token prompt run with selections
  (``sparse_selections``).

Each row says what the indexer recorded (per target layer rotary or not, its style) or where the path
stopped and the error (``status``: ``"works"``, ``"refused"``: an error that names why, ``"FAILED"``: a
check failed). Writes JSON (``--out``) and prints one line per family.

    python benchmarks/indexer_families.py --out benchmarks/results/indexer_families.json
    python benchmarks/indexer_families.py --only gptj glm smollm3 --out /tmp/some.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402
from zoo import ALL_FAMILIES, make_model  # noqa: E402

import lsa_rewrite  # noqa: E402
from lsa_rewrite import LSAConfig  # noqa: E402
from lsa_rewrite.indexer.calibrate import calibrate  # noqa: E402
from lsa_rewrite.indexer.documents import ByteTokenizer, builtin_documents, calibration_tasks  # noqa: E402
from lsa_rewrite.indexer.train import train_indexer  # noqa: E402

CHUNK = 16
CALIBRATION = LSAConfig(chunk_size=CHUNK, interval=16)
COVERING = LSAConfig(mode="dense", chunk_size=CHUNK, interval=16, selector="indexer")
SPARSE = LSAConfig(budget=96, chunk_size=CHUNK, interval=16, sink_tokens=16, recent_tokens=16, selector="indexer")
PROMPT, NEW, SPARSE_PROMPT, SPARSE_NEW = 80, 8, 200, 40


def documents():
    tok = ByteTokenizer()
    tasks = calibration_tasks(tok, count=2, min_tokens=150, max_tokens=260, seed=0)
    return tok, builtin_documents(tok, min_tokens=150, max_tokens=260, count=2, seed=0) + [t.to_document(tok) for t in tasks]


def greedy(model, ids: torch.Tensor, new: int, plain: bool) -> torch.Tensor:
    """Greedy decoding: ``generate`` for an HF model; prefill and one token per call for a plain decoder."""
    if not plain:
        return model.generate(ids, max_new_tokens=new, do_sample=False)
    from helpers import buffer_greedy

    with torch.no_grad():
        return buffer_greedy(model, ids, new)[0]


def row(family: str) -> dict:
    tok, docs = documents()
    out: dict = {"family": family}
    stage = "build"
    started = time.perf_counter()
    try:
        model = make_model(family).eval()
        plain = family == "buffer"
        if plain:
            model.setup_caches(max_batch_size=1, max_seq_length=512)
        with tempfile.TemporaryDirectory() as tmp:
            stage = "calibrate"
            dump = calibrate(model, tok, Path(tmp) / "dump", documents=docs, config=CALIBRATION, windows_per_document=3,
                             progress=False, heldout_fraction=0.25)
            stage = "train"
            indexer, _ = train_indexer(dump, epochs=1, progress=False)
        cfg = indexer.config
        rope = cfg.rope if isinstance(cfg.rope, bool) else list(cfg.rope)
        out.update(target_layers=list(cfg.target_layers), rope=rope, rope_style=cfg.rope_style)
        ids = torch.randint(3, 250, (1, PROMPT), generator=torch.Generator().manual_seed(0))
        stage = "convert (covering)"
        converted = lsa_rewrite.convert(copy.deepcopy(model), COVERING, indexer=indexer)
        want = greedy(model, ids, NEW, plain)
        out["dense_tokens"] = bool(torch.equal(greedy(converted, ids, NEW, plain), want))
        del converted
        stage = "convert (96-token budget)"
        sparse = lsa_rewrite.convert(copy.deepcopy(model), SPARSE, indexer=indexer)
        long_ids = torch.randint(3, 250, (1, SPARSE_PROMPT), generator=torch.Generator().manual_seed(1))
        greedy(sparse, long_ids, SPARSE_NEW, plain)
        out["sparse_selections"] = int(lsa_rewrite.footprint(sparse)["selections"])
        out["status"] = "works" if out["dense_tokens"] and out["sparse_selections"] > 0 else "FAILED"
    except ValueError as exc:  # the library's refusals are ValueErrors that name the reason
        out.update(status="refused", stage=stage, error=f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # anything else is a bug
        out.update(status="FAILED", stage=stage, error=f"{type(exc).__name__}: {exc}")
    out["seconds"] = round(time.perf_counter() - started, 1)
    torch._dynamo.reset()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", help="these zoo families only (\"buffer\": the plain decoder)")
    parser.add_argument("--out", default="benchmarks/results/indexer_families.json")
    args = parser.parse_args(argv)
    families = args.only or [*ALL_FAMILIES, "buffer"]
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    payload = {"benchmark": "indexer_families", "environment": environment(), "rows": []}
    for family in families:
        result = row(family)
        payload["rows"].append(result)
        detail = result.get("error", f"rope={result.get('rope')} style={result.get('rope_style')}")
        print(f"{family:18s} {result['status']:8s} {detail[:160]}", flush=True)
        write_json(args.out, payload)
    counts = {s: sum(r["status"] == s for r in payload["rows"]) for s in ("works", "refused", "FAILED")}
    payload["counts"] = counts
    write_json(args.out, payload)
    print(counts)


if __name__ == "__main__":
    main()
