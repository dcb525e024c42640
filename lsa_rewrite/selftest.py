"""``python -m lsa_rewrite.selftest [--gpu]``: check this install's runtime path end to end.

On tiny random-weight models built from configs (a GQA Llama, and a Gemma3 with sliding-window and
full layers), with no download:

1. **covering budget**: the converted model's greedy tokens and logits equal the dense model's (on
   CUDA through the compiled step replayed as a CUDA graph);
2. **sparse decode at recall lags 0, 1 and 4** (query-aware selector; and lag 4 with an untrained
   indexer, whose taps run in the compiled step, once ranking for all layers and once per layer group,
   half of each group's set from the shared ranking):
   real selections with recalls from the mirror (on CUDA:
   the copy kernel on a side stream, the tables swapped ``lag`` steps later); every resident chunk is
   bit-identical to its mirror row, the mirror's prompt part equals the dense model's KV, and the
   logits equal the same conversion run on the CPU (PyTorch reference ops) within tolerance (for the
   indexer: its taps and chunk scores after the prefill equal the CPU's; the decoded tokens may part
   where near-equal scores order differently);
3. **pinned mirror**: on CUDA the mirror is page-locked host memory (``HostArena``).

Exit status 0 when every check passes; ``--out FILE`` writes the rows as JSON. ``--gpu`` requires
CUDA. Not here: speed (``benchmarks/``).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

LAGS = (0, 1, 4)
COVERING_TOL = 1e-3  # logits, compiled (TF32-free fp32) vs eager dense
REFERENCE_TOL = 1e-3  # sparse logits, device kernels vs CPU reference ops


def tiny_models() -> dict[str, torch.nn.Module]:
    """The self-test's models: fixed seeds, float32, std 0.2 weights (attention concentrates)."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

    common = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    configs = {
        "llama": LlamaConfig(num_hidden_layers=2, **common),
        "gemma3": Gemma3TextConfig(
            num_hidden_layers=3, head_dim=16, sliding_window=32, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            **common,
        ),
    }
    models = {}
    for name, config in configs.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()
        model.generation_config.eos_token_id = None
        models[name] = model
    return models


def _greedy(model, ids, new: int):
    out = model.generate(ids, max_new_tokens=new, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


@torch.no_grad()
def _recall_exact(converted, model, ids) -> dict[str, Any]:
    """Resident chunks == their mirror rows; the mirror's prompt part == the dense model's KV."""
    from transformers import DynamicCache

    store = converted.lsa.store
    store.synchronize()
    if ids.is_cuda:
        torch.cuda.synchronize()
    dense = DynamicCache(config=model.config)
    model(input_ids=ids, use_cache=True, past_key_values=dense)
    prompt_chunks = ids.shape[1] // store.chunk
    checked = mismatches = 0
    prompt_exact = pinned = True
    upto = store.synced // store.chunk  # chunks complete in the mirror
    for layer in store.chunk_layers:
        keys = dense.layers[layer.spec.layer].keys.transpose(1, 2).cpu()  # [B, T, Hkv, D]
        prompt_exact &= torch.equal(layer.mirror_k[:, :prompt_chunks].flatten(1, 2), keys[:, : prompt_chunks * store.chunk])
        pinned &= (not ids.is_cuda) or layer.mirror_k.is_pinned()
        for b in range(store.batch):
            for slot, chunk in enumerate(layer.host_slot_chunk[b]):
                if 0 <= chunk < upto:
                    row = b * store.slots + slot
                    checked += 1
                    same = torch.equal(layer.k_pool[row].cpu(), layer.mirror_k[b, chunk]) and torch.equal(layer.v_pool[row].cpu(), layer.mirror_v[b, chunk])
                    mismatches += not same
    return {"recall_checked": checked, "recall_mismatches": mismatches, "recalled_chunks": store.recalled_chunks,
            "mirror_prompt_exact": bool(prompt_exact), "mirror_pinned": bool(pinned)}


@torch.no_grad()
def _indexer_taps_match(model, base, config, indexer, ids, device: str) -> dict[str, float]:
    """After the prefill and its probe step: the indexer's taps and chunk scores on ``device`` against the CPU reference."""
    import lsa_rewrite

    stores = []
    for m, dev in ((model, device), (base, "cpu")):
        converted = lsa_rewrite.convert(copy.deepcopy(m).to(dev), config, indexer=copy.deepcopy(indexer))
        converted.generate(ids.to(dev), max_new_tokens=1, do_sample=False)
        stores.append(converted.lsa.store)
    taps = scores = 0.0
    for here, ref in zip(*(s.chunk_layers for s in stores)):
        for name in ("idx_x", "idx_cos", "idx_sin"):
            if hasattr(ref, name):
                taps = max(taps, float((getattr(here, name).cpu() - getattr(ref, name)).abs().max()))
    window = stores[1].policy.window(stores[1].length)
    got = stores[0].selector.scores(stores[0].chunk_layers, window).cpu()
    want = stores[1].selector.scores(stores[1].chunk_layers, window)
    written = window.written_chunks
    scores = float(((got - want).abs() / want.abs().clamp_min(1.0))[..., :written].max())
    return {"taps_max_abs_diff": taps, "scores_max_rel_diff": scores}


def _grouped(indexer):
    """The same weights with ``ensemble="group"``: each sparse layer selects by its nearest target layer,
    half of its free slots first from the shared ranking (``group_shared=0.5``: the union's sort and scatter
    run in the captured selection too). With two or more target layers, the first one ranks for the shared
    slots only, as in a merged indexer (``merge_indexers``: ``shared_layers``, an empty group)."""
    import dataclasses

    from lsa_rewrite.indexer import LSAIndexer, nearest_groups

    cfg = indexer.config
    sparse = indexer.signature["sparse_layers"]
    extra: dict[str, Any] = {}
    if len(cfg.target_layers) >= 2:
        first, rest = cfg.target_layers[0], cfg.target_layers[1:]
        groups = ((),) + nearest_groups(rest, sparse)
        extra = {"shared_layers": (first,)}
    else:
        groups = nearest_groups(cfg.target_layers, sparse)
    grouped = LSAIndexer(dataclasses.replace(cfg, ensemble="group", layer_groups=groups, group_shared=0.5, **extra))
    grouped.load_state_dict(indexer.state_dict())
    grouped.signature, grouped.lsa = indexer.signature, indexer.lsa
    return grouped


def run(device: str = "cuda", *, prompt: int = 768, new_tokens: int = 48, models: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Every check on ``device`` (for ``models``, default all); one row per (model, check); a row's ``ok`` says whether it passed."""
    import lsa_rewrite
    from lsa_rewrite import LSAConfig
    from lsa_rewrite.indexer.from_model import indexer_from_model

    rows = []
    for name, base in tiny_models().items():
        if models is not None and name not in models:
            continue
        model = base.to(device)
        ids = torch.randint(3, 250, (2, 40), generator=torch.Generator().manual_seed(0)).to(device)
        want_seq, want_logits = _greedy(model, ids, 40)
        converted = lsa_rewrite.convert(copy.deepcopy(model), LSAConfig(mode="dense", chunk_size=16, interval=16))
        t0 = time.perf_counter()
        seq, logits = _greedy(converted, ids, 40)
        diff = float((logits - want_logits).abs().max())
        compiled = converted.lsa.compiled is not None
        ok = diff <= COVERING_TOL and bool(torch.equal(seq, want_seq)) and (compiled or device == "cpu")
        rows.append({"model": name, "check": "covering", "max_abs_diff": diff, "same_tokens": bool(torch.equal(seq, want_seq)),
                     "compiled_cuda_graph": compiled, "seconds": round(time.perf_counter() - t0, 2), "ok": ok})
        long_ids = torch.randint(3, 250, (2, prompt), generator=torch.Generator().manual_seed(1))
        variants = [(lag, "query-aware") for lag in LAGS] + [(LAGS[-1], "indexer"), (LAGS[-1], "indexer groups")]
        for lag, variant in variants:
            selector = variant.split()[0]
            config = LSAConfig(budget=192, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=32, recall_lag=lag, selector=selector)
            row: dict[str, Any] = {"model": name, "check": f"sparse lag {lag}" + (f" {variant}" if selector == "indexer" else "")}
            indexer = indexer_from_model(base.to("cpu"), config) if selector == "indexer" else None
            if variant == "indexer groups":  # per-layer-group resident sets (IndexerConfig.ensemble="group")
                indexer = _grouped(indexer)
            model.to(device)
            try:
                sparse = lsa_rewrite.convert(copy.deepcopy(model), config, indexer=copy.deepcopy(indexer))
                seq, logits = _greedy(sparse, long_ids.to(device), new_tokens)
                footprint = lsa_rewrite.footprint(sparse)
                row.update(ratio=round(footprint["ratio"], 4), selections=footprint["selections"])
                row.update(_recall_exact(sparse, model, long_ids.to(device)))
                if device != "cpu":  # every selector here is graph_safe: its selection must replay a CUDA graph
                    row["selection_captured"] = sparse.lsa.store.selection_captured
                if device != "cpu":
                    reference = lsa_rewrite.convert(copy.deepcopy(base).to("cpu"), config, indexer=copy.deepcopy(indexer))
                    ref_seq, ref_logits = _greedy(reference, long_ids, new_tokens)
                    row["reference_max_abs_diff"] = float((logits.cpu() - ref_logits).abs().max())
                    row["reference_same_tokens"] = bool(torch.equal(seq.cpu(), ref_seq))
                row["ok"] = (
                    row["recall_mismatches"] == 0 and row["recall_checked"] > 0 and row["recalled_chunks"] > 0
                    and row["mirror_prompt_exact"] and row["mirror_pinned"] and row["selections"] >= 2
                    and (selector == "indexer" or row.get("reference_max_abs_diff", 0.0) <= REFERENCE_TOL)
                    and row.get("selection_captured", True)
                )
                if selector == "indexer" and device != "cpu":
                    row.update(_indexer_taps_match(model, base, config, indexer, long_ids, device))
                    row["ok"] = row["ok"] and row["taps_max_abs_diff"] <= REFERENCE_TOL and row["scores_max_rel_diff"] <= REFERENCE_TOL
            except Exception as exc:  # a failed check is reported with the others
                row.update(error=f"{type(exc).__name__}: {exc}", ok=False)
            rows.append(row)
        rows.append(_multiturn_exact(model, long_ids[:1].to(device), name))
        rows.append(_fp8_mirror(model, long_ids.to(device), name, new_tokens))
        model.to("cpu")
    return rows


def _fp8_mirror(model, ids, name: str, new_tokens: int) -> dict[str, Any]:
    """The compact mirror (``LSAConfig(mirror="fp8")``): every resident chunk of the pool holds either the
    exact KV (placed from the prefill or decoded there) or its mirror row decoded (recalled through
    ``lsa::unpack_chunks``), bit for bit, and some were recalled; the logits stay close to the exact
    mirror's run (the fp8 bound; ``tests/test_fp8_mirror.py`` uses the same tolerances)."""
    import lsa_rewrite
    from lsa_rewrite import LSAConfig
    from lsa_rewrite.kernels import pack_fp8, unpack_fp8

    row: dict[str, Any] = {"model": name, "check": "fp8 mirror recall"}
    try:
        base = dict(budget=192, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=32, recall_lag=1)
        exact = lsa_rewrite.convert(copy.deepcopy(model), LSAConfig(**base))
        want_seq, want = _greedy(exact, ids, new_tokens)
        compact = lsa_rewrite.convert(copy.deepcopy(model), LSAConfig(**base, mirror="fp8"))
        seq, logits = _greedy(compact, ids, new_tokens)
        store = compact.lsa.store
        store.synchronize()
        if ids.is_cuda:
            torch.cuda.synchronize()
        upto = store.synced // store.chunk
        decoded = checked = mismatches = 0
        for layer in store.chunk_layers:
            for b in range(store.batch):
                for slot, chunk in enumerate(layer.host_slot_chunk[b]):
                    if not 0 <= chunk < upto:
                        continue
                    r = b * store.slots + slot
                    k, v = layer.k_pool[r], layer.v_pool[r]
                    dk = unpack_fp8(layer.mirror_k[b, chunk].to(k.device), k.dtype)
                    dv = unpack_fp8(layer.mirror_v[b, chunk].to(v.device), v.dtype)
                    checked += 1
                    if torch.equal(k, dk) and torch.equal(v, dv):
                        decoded += 1
                    else:  # then the exact values, which round to the mirror's row
                        mismatches += not (torch.equal(unpack_fp8(pack_fp8(k), k.dtype), dk) and torch.equal(unpack_fp8(pack_fp8(v), v.dtype), dv))
        # logits compared while both runs fed back the same tokens (a different greedy token changes the context)
        n = ids.shape[1]
        differs = (seq[:, n:] != want_seq[:, n:]).any(0).nonzero()
        same = int(differs[0]) + 1 if differs.numel() else seq.shape[1] - n
        diff = (logits[:same].float() - want[:same].float()).abs()
        row.update(steps_compared=same, checked=checked, decoded_from_mirror=decoded, mismatches=mismatches, recalled_chunks=store.recalled_chunks,
                   mean_abs_diff_vs_exact=float(diff.mean()), max_abs_diff_vs_exact=float(diff.max()),
                   host_bytes=lsa_rewrite.footprint(compact)["host_bytes"], host_bytes_exact=lsa_rewrite.footprint(exact)["host_bytes"])
        row["ok"] = (
            checked > 0 and mismatches == 0 and decoded > 0 and store.recalled_chunks > 0 and row["mean_abs_diff_vs_exact"] <= 0.15
            and row["host_bytes"] < row["host_bytes_exact"] and bool(logits.isfinite().all())
        )
    except Exception as exc:  # reported with the other checks
        row.update(error=f"{type(exc).__name__}: {exc}", ok=False)
    return row


def _multiturn_exact(model, prompt, name: str) -> dict[str, Any]:
    """A later turn on the cache of a sparse generation (multi-turn over the mirror): with only the prompt
    in the store (one new token, never fed back), the new tokens' prefill logits must equal a dense
    forward over the whole conversation, read back from pool + mirror."""
    import inspect

    import lsa_rewrite
    from lsa_rewrite import LSAConfig

    row: dict[str, Any] = {"model": name, "check": "multi-turn exact prefill"}
    try:
        config = LSAConfig(budget=192, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=32, recall_lag=1)
        sparse = lsa_rewrite.convert(copy.deepcopy(model), config)
        kw = "cache" if "cache" in inspect.signature(type(sparse).forward).parameters else "past_key_values"
        first = sparse.generate(prompt, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
        cache = first.cache if getattr(first, "cache", None) is not None else first.past_key_values
        n = prompt.shape[1]
        follow = torch.randint(3, 250, (1, 24), generator=torch.Generator().manual_seed(2)).to(prompt.device)
        new = torch.cat([first.sequences[:, n:], follow], 1)
        with torch.no_grad():
            ours = sparse(input_ids=new, position_ids=torch.arange(n, n + new.shape[1], device=prompt.device)[None], use_cache=True, **{kw: cache}).logits
            dense = model(input_ids=torch.cat([first.sequences, follow], 1)).logits[:, -new.shape[1]:]
            step = sparse(input_ids=ours[:, -1:].argmax(-1), use_cache=True, **{kw: cache}).logits
        store = sparse.lsa.store
        diff = float((ours.float() - dense.float()).abs().max())
        row.update(max_abs_diff=diff, tokens=store.length, sparse=store.slots < store.num_chunks, next_step_finite=bool(step.isfinite().all()))
        row["ok"] = diff <= REFERENCE_TOL * 10 and row["sparse"] and row["next_step_finite"] and store.length == n + new.shape[1] + 1
    except Exception as exc:  # reported with the other checks
        row.update(error=f"{type(exc).__name__}: {exc}", ok=False)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lsa_rewrite.selftest", description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="run on CUDA (required there) and compare with the CPU references")
    parser.add_argument("--device", default=None, help="device to run on (default: cuda with --gpu, else cpu)")
    parser.add_argument("--out", default=None, help="write the rows and the environment as JSON")
    parser.add_argument("--quick", action="store_true", help="shorter prompts (a check of the check itself)")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if args.gpu else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --gpu needs CUDA, and torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    rows = run(device, prompt=320 if args.quick else 768, new_tokens=24 if args.quick else 48)
    for row in rows:
        print(("PASS " if row["ok"] else "FAIL ") + json.dumps(row), flush=True)
    failed = [f"{r['model']}: {r['check']}" for r in rows if not r["ok"]]
    if args.out:
        import transformers

        environment = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"benchmark": "selftest", "device": device, "environment": environment, "results": rows, "failed": failed}, indent=2))
    print(f"{len(rows) - len(failed)} of {len(rows)} checks passed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
