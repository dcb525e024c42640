"""GPU correctness smoke run (not a test: CI has no GPU): the CUDA path end to end on zoo models.

For each zoo family, on CUDA in float32: convert with a covering budget (compiled step + CUDA graph),
generate 70 tokens greedily, and compare tokens and logits with the dense HF model; then a sparse
run (budget 0.25 over 1K tokens, recall_lag 3: chunks recalled on the side stream by the copy kernel)
must finish, and every resident chunk it recalled must be bit-identical to the mirror, whose prompt
part must equal the dense model's KV. Exits non-zero on failure.

    python benchmarks/gpu_smoke.py --out benchmarks/results/gpu_smoke.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402
from zoo import HF_FAMILIES, make_model  # noqa: E402

import lsa_rewrite  # noqa: E402
from lsa_rewrite import LSAConfig  # noqa: E402


def greedy(model, ids, new, **kw):
    out = model.generate(ids, max_new_tokens=new, do_sample=False, output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.logits)


@torch.no_grad()
def check_recall(sparse, model, ids) -> dict:
    """After a sparse generation: resident chunks == their mirror rows; mirror prompt == dense KV."""
    from transformers import DynamicCache

    store = sparse.lsa.store
    store.synchronize()
    if ids.is_cuda:
        torch.cuda.synchronize()
    dense = DynamicCache(config=model.config)
    model(input_ids=ids, use_cache=True, past_key_values=dense)
    prompt_chunks = ids.shape[1] // store.chunk
    checked = mismatches = 0
    prompt_exact = True
    for layer, s in store.layers.items():
        if not hasattr(s, "k_pool") or s.mirror_k is None:
            continue
        keys = dense.layers[layer].keys.transpose(1, 2).cpu()  # [B, T, Hkv, D]
        prompt_exact &= torch.equal(s.mirror_k[:, :prompt_chunks].flatten(1, 2), keys[:, : prompt_chunks * store.chunk])
        upto = store.synced // store.chunk  # chunks complete in the mirror
        for b in range(store.batch):
            for slot, chunk in enumerate(s.host_slot_chunk[b]):
                if 0 <= chunk < upto:
                    row = b * store.slots + slot
                    checked += 1
                    same = torch.equal(s.k_pool[row].cpu(), s.mirror_k[b, chunk]) and torch.equal(s.v_pool[row].cpu(), s.mirror_v[b, chunk])
                    mismatches += not same
    return {"recall_checked": checked, "recall_mismatches": mismatches, "recalled_chunks": store.recalled_chunks,
            "mirror_prompt_exact": bool(prompt_exact)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/gpu_smoke.json")
    parser.add_argument("--families", default=",".join(HF_FAMILIES))
    parser.add_argument("--device", default="cuda", help="cpu: checks the script itself (no compiled step there)")
    args = parser.parse_args()
    dev = args.device
    rows, failed = [], []
    for family in args.families.split(","):
        model = make_model(family).to(dev)
        model.generation_config.eos_token_id = None
        ids = torch.randint(3, 250, (2, 40), device=dev, generator=torch.Generator(device=dev).manual_seed(0))
        dense_seq, dense_logits = greedy(model, ids, 70)
        converted = lsa_rewrite.convert(copy.deepcopy(model), LSAConfig(budget=4096, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=16))
        converted.generation_config.eos_token_id = None
        t0 = time.perf_counter()
        seq, logits = greedy(converted, ids, 70)
        seconds = time.perf_counter() - t0
        diff = (logits - dense_logits).abs().max().item()
        same = bool(torch.equal(seq, dense_seq))
        row = {"family": family, "covering_max_abs_diff": diff, "covering_same_tokens": same, "compiled": converted.lsa.compiled is not None, "seconds": round(seconds, 2)}
        sparse = lsa_rewrite.convert(copy.deepcopy(model), LSAConfig(budget=0.25, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=32, recall_lag=3))
        sparse.generation_config.eos_token_id = None
        long_ids = torch.randint(3, 250, (2, 1024), device=dev, generator=torch.Generator(device=dev).manual_seed(1))
        try:
            greedy(sparse, long_ids, 64)
            fp = lsa_rewrite.footprint(sparse)
            row.update(sparse_ratio=round(fp["ratio"], 4), sparse_selections=fp["selections"])
            row.update(check_recall(sparse, model, long_ids))
        except Exception as exc:  # record and continue: this is a smoke run
            row["sparse_error"] = f"{type(exc).__name__}: {exc}"
        ok = diff <= 1e-3 and same and "sparse_error" not in row and row.get("recall_mismatches") == 0 and row.get("recall_checked", 0) > 0
        ok = ok and row.get("mirror_prompt_exact", False)
        if not ok:
            failed.append(family)
        rows.append(row)
        print(row, flush=True)
    write_json(args.out, {"benchmark": "gpu_smoke", "environment": environment(), "results": rows, "failed": failed})
    if failed:
        raise SystemExit(f"GPU smoke failed for {failed}")


if __name__ == "__main__":
    main()
