"""The indexer on a plain decoder through the CUDA path: compiled step, CUDA graph, recall (a check, not a speed test).

The zoo's buffer-cache decoder (``tests/buffer_decoder.py``: gpt-fast style, module-buffer caches, SDPA), with
its rotation written on the two halves of each head (its own ``apply_rope``) or on channel pairs (gpt-fast's
``apply_rotary_emb``, a ``stack`` of two terms over a ``[T, D/2, 2]`` table). For those forms the indexer tap
pass adds the full-width cos/sin to the decode graph and expands a factor row shared by the batch to it, so
these checks cover what the CPU tests cannot: those added nodes inside the Inductor-compiled step replayed as
a CUDA graph. Per form, batch 2, an untrained indexer (``indexer_from_model``):

- covering budget (``mode="dense"``): greedy tokens equal the dense decoder's on the same device, logits within
  1e-3, through the compiled step (``compiled_cuda_graph``);
- sparse (budget 192 tokens, recall lag 4) after a 768-token prompt: selections run with recalls; after the
  prefill's probe the taps (``idx_x``, ``idx_cos``, ``idx_sin``) and the chunk scores equal the same conversion
  on the CPU (PyTorch reference ops).

    python benchmarks/plain_indexer_gpu.py --out benchmarks/results/plain_indexer_gpu.json
    python benchmarks/plain_indexer_gpu.py --device cpu --out /tmp/dry.json   # the script itself, on the CPU
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import buffer_decoder  # noqa: E402
from common import environment, write_json  # noqa: E402

import lsa_rewrite  # noqa: E402
from lsa_rewrite import LSAConfig  # noqa: E402
from lsa_rewrite.indexer.from_model import indexer_from_model  # noqa: E402

TOL = 1e-3
DEVICE = "cuda"
PROMPT, NEW, SPARSE_NEW = 768, 24, 48


FORMS = {"halves": buffer_decoder.apply_rope, "gpt-fast": buffer_decoder.gpt_fast_rope}


@torch.no_grad()
def greedy(model, ids: torch.Tensor, new: int) -> tuple[torch.Tensor, torch.Tensor]:
    device = ids.device
    length = ids.shape[1]
    logits = [model(ids, torch.arange(length, device=device))[:, -1]]
    tokens = [logits[-1].argmax(-1, keepdim=True)]
    for pos in range(length, length + new - 1):
        logits.append(model(tokens[-1], torch.tensor([pos], device=device))[:, -1])
        tokens.append(logits[-1].argmax(-1, keepdim=True))
    return torch.cat([ids, *tokens], 1), torch.stack(logits)


def build(capacity: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = buffer_decoder.BufferDecoder(buffer_decoder.BufferDecoderArgs(max_seq_len=4096)).eval()
    model.setup_caches(max_batch_size=2, max_seq_length=capacity)
    return model


@torch.no_grad()
def check(form: str) -> list[dict]:
    buffer_decoder.apply_rope = FORMS[form]
    rows = []
    base = build(PROMPT + SPARSE_NEW)
    covering = LSAConfig(mode="dense", chunk_size=16, interval=16, selector="indexer")
    indexer = indexer_from_model(base, covering)
    ids = torch.randint(3, 250, (2, 40), generator=torch.Generator().manual_seed(0))
    cuda = copy.deepcopy(base).to(DEVICE)
    want_seq, want_logits = greedy(cuda, ids.to(DEVICE), NEW)
    converted = lsa_rewrite.convert(copy.deepcopy(base).to(DEVICE), covering, indexer=copy.deepcopy(indexer))
    seq, logits = greedy(converted, ids.to(DEVICE), NEW)
    diff = float((logits - want_logits).abs().max())
    same = bool(torch.equal(seq, want_seq))
    compiled = converted.lsa.compiled is not None or DEVICE == "cpu"
    rows.append({"form": form, "check": "covering", "rope_style": indexer.config.rope_style, "max_abs_diff": diff,
                 "same_tokens": same, "compiled_cuda_graph": compiled, "ok": same and diff <= TOL and compiled})
    del converted, cuda

    sparse = LSAConfig(budget=192, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=32, recall_lag=4, selector="indexer")
    long_ids = torch.randint(3, 250, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    row = {"form": form, "check": "sparse lag 4"}
    try:
        stores = []
        for device in (DEVICE, "cpu"):
            model = lsa_rewrite.convert(copy.deepcopy(base).to(device), sparse, indexer=copy.deepcopy(indexer).to(device))
            model(long_ids.to(device), torch.arange(PROMPT, device=device))  # prefill + probe selection
            stores.append(model.lsa.store)
            if len(stores) == 1:
                window = model.lsa.store.policy.window(model.lsa.store.length)
                got = model.lsa.store.selector.scores(model.lsa.store.chunk_layers, window).cpu()
                greedy_model = model
        taps = 0.0
        for here, ref in zip(*(s.chunk_layers for s in stores)):
            for name in ("idx_x", "idx_cos", "idx_sin"):
                if hasattr(ref, name):
                    taps = max(taps, float((getattr(here, name).cpu() - getattr(ref, name)).abs().max()))
        want = stores[1].selector.scores(stores[1].chunk_layers, window)
        scores = float(((got - want).abs() / want.abs().clamp_min(1.0))[..., : window.written_chunks].max())
        # decode on the GPU from the prefilled store: selections and recalls through the CUDA graph
        token = torch.full((2, 1), 5, dtype=torch.long, device=DEVICE)
        for pos in range(PROMPT, PROMPT + SPARSE_NEW):
            token = greedy_model(token, torch.tensor([pos], device=DEVICE))[:, -1].argmax(-1, keepdim=True)
        footprint = lsa_rewrite.footprint(greedy_model)
        store = greedy_model.lsa.store
        row.update(taps_max_abs_diff=taps, scores_max_rel_diff=scores, selections=footprint["selections"],
                   recalled_chunks=store.recalled_chunks, ratio=round(footprint["ratio"], 4),
                   compiled_cuda_graph=greedy_model.lsa.compiled is not None or DEVICE == "cpu")
        row["ok"] = (taps <= TOL and scores <= TOL and footprint["selections"] >= 2 and store.recalled_chunks > 0
                     and row["compiled_cuda_graph"])
    except Exception as exc:  # reported with the other rows
        row.update(error=f"{type(exc).__name__}: {exc}", ok=False)
    rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/plain_indexer_gpu.json")
    parser.add_argument("--device", default="cuda", help="cuda (the check), or cpu (a dry run of the script)")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("plain_indexer_gpu.py needs CUDA (or --device cpu for a dry run)")
    rows = [row for form in FORMS for row in check(form)]
    for row in rows:
        print(row, flush=True)
    write_json(args.out, {"benchmark": "plain_indexer_gpu", "environment": environment(), "rows": rows,
                          "passed": sum(r["ok"] for r in rows), "total": len(rows)})
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
