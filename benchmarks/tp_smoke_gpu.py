"""Tensor parallelism on GPUs: a smoke check of what tests/test_tensor_parallel.py checks on the CPU.

Run with ``torchrun --nproc-per-node 2 benchmarks/tp_smoke_gpu.py --out FILE`` on two GPUs (NCCL). A
small random-weight Llama (float32) is saved once, loaded on every rank with transformers'
``DistributedConfig(tp_size=2)`` and converted; the decode step is compiled by Inductor and replayed as
a CUDA graph (the default on CUDA), the all-reduces and the all-gather of the sharded projections
inside it as functional collectives. Checks, per rank:

- covering budget: greedy tokens equal the unsharded model's (``generate()`` on one GPU), logits close;
- budget 0.25 on a longer prompt: the store holds this rank's KV heads only, the footprint is within
  the budget, and the ranks keep the same resident set (query-aware scores all-reduced);
- the step ran through the compiled path.

Not a speed measurement (``benchmarks/e2e_tp.py`` would be). Rank 0 writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

import lsa_rewrite
from lsa_rewrite import LSAConfig

COVERING = LSAConfig(budget=4096, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=16)
QUARTER = LSAConfig(budget=0.25, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=32)


def config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=4, head_dim=32, max_position_embeddings=4096, initializer_range=0.2)


def greedy(model, ids, new):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits).float()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/tp_smoke_gpu.json")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    from transformers.distributed import DistributedConfig

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    shared = Path(tempfile.gettempdir()) / "lsa_tp_smoke"
    if rank == 0:
        torch.manual_seed(0)
        model = LlamaForCausalLM(config()).eval()
        model.generation_config.eos_token_id = None
        model.save_pretrained(shared)
    dist.barrier()
    rows: dict = {"rank": rank, "world": world}
    try:
        full = AutoModelForCausalLM.from_pretrained(shared, dtype=torch.float32).cuda().eval()
        full.generation_config.eos_token_id = None
        short = torch.randint(3, 500, (2, 48), generator=torch.Generator().manual_seed(0)).cuda()
        longer = torch.randint(3, 500, (1, 768), generator=torch.Generator().manual_seed(1)).cuda()
        want_seq, want_logits = greedy(full, short, 32)

        def sharded():
            m = AutoModelForCausalLM.from_pretrained(shared, distributed_config=DistributedConfig(tp_size=world), dtype=torch.float32)
            m.generation_config.eos_token_id = None
            return m.eval()

        model = lsa_rewrite.convert(sharded(), COVERING)
        t0 = time.perf_counter()
        seq, logits = greedy(model, short, 32)
        rows["covering"] = {
            "same_tokens": bool(torch.equal(seq, want_seq)), "max_abs_diff": float((logits - want_logits).abs().max()),
            "compiled_cuda_graph": model.lsa.compiled is not None and model.lsa.compiled.graph is not None,
            "seconds": round(time.perf_counter() - t0, 2),
            "sites": [(s.q_heads, s.kv_heads) for s in model.lsa.sites],
            # the library's collective lowering for this step (one-shot over symmetric memory on one host's GPUs)
            "compile_options": model.lsa.adapter.tp.compile_options(model.lsa.store.device),
        }
        del model
        model = lsa_rewrite.convert(sharded(), QUARTER)
        seq, _ = greedy(model, longer, 32)
        store = model.lsa.store
        tables = torch.stack([layer.chunk_slot.clone() for layer in store.chunk_layers])
        gathered = [torch.empty_like(tables) for _ in range(world)]
        dist.all_gather(gathered, tables)
        fp = lsa_rewrite.footprint(model)
        total = lsa_rewrite.footprint(model, across_ranks=True)
        rows["quarter"] = {
            "ratio": fp["ratio"], "tp_rank": fp["tp_rank"], "resident_kv_bytes": fp["resident_kv_bytes"],
            "total_resident_kv_bytes": total["resident_kv_bytes"], "total_dense_kv_bytes": total["dense_kv_bytes"],
            "pool_kv_heads": [layer.k_pool.shape[-2] for layer in store.chunk_layers],
            "same_tables_on_every_rank": all(torch.equal(g, gathered[0]) for g in gathered),
            "selections": store.selections, "recalled_chunks": store.recalled_chunks,
            "compiled_cuda_graph": model.lsa.compiled is not None and model.lsa.compiled.graph is not None,
        }
        rows["ok"] = (rows["covering"]["same_tokens"] and rows["covering"]["max_abs_diff"] <= 1e-3 and rows["covering"]["compiled_cuda_graph"]
                      and rows["quarter"]["same_tables_on_every_rank"] and rows["quarter"]["ratio"] <= 0.25 + 0.05
                      and rows["quarter"]["recalled_chunks"] > 0)
    except Exception as exc:  # reported, then the other rank's row
        import traceback

        rows.update(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-3000:], ok=False)
    everyone = [None] * world
    dist.all_gather_object(everyone, rows)
    if rank == 0:
        import transformers

        payload = {
            "benchmark": "tp_smoke_gpu",
            "environment": {"date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()), "gpu": torch.cuda.get_device_name(),
                            "gpus": world, "torch": torch.__version__, "transformers": transformers.__version__},
            "ranks": everyone,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=2))
        for r in everyone:
            print(json.dumps({k: v for k, v in r.items() if k != "traceback"}))
            if "traceback" in r:
                print(r["traceback"])
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
