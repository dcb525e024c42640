"""A tensor-parallel HF model (transformers' tp_plan, DTensor weights) converted on every rank.

Two CPU processes over gloo load the tiny Llama with ``DistributedConfig(tp_size=2)`` and convert it.
At a covering budget the greedy tokens and logits equal the unsharded dense model's; at budget 0.25
every rank's store holds only its own KV head, within the budget, and the ranks keep the same
resident set (query-aware scores all-reduced, or the indexer's per-head score sums, per layer group too); sampling (one seed on every rank) and a later turn on
the same cache agree across ranks and with the unsharded model. Plans the local view cannot run are refused before
anything is converted.
"""

from __future__ import annotations

import copy
import dataclasses
import socket
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import hf_greedy, no_eos
from zoo import make_model

import lsa_rewrite
from lsa_rewrite import LSAConfig

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend (two CPU processes stand in for two GPUs)",
)

WORLD = 2
COVERING = LSAConfig(budget=4096, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=16)
# the covering run goes through torch.compile (the step that failed on DTensor.to_local before the local view)
COMPILED = dataclasses.replace(COVERING, compile="aot_eager")
QUARTER = LSAConfig(budget=0.25, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=32)
INDEXED = dataclasses.replace(QUARTER, selector="indexer")
SHORT, LONG, NEW = 40, 512, 32


def _prompt(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 250, (batch, length), generator=torch.Generator().manual_seed(seed))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_sharded(path: str):
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    model = AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(tp_size=WORLD), dtype=torch.float32)
    return no_eos(model.eval())


def _sample(model, ids: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(7)
    return model.generate(ids, max_new_tokens=NEW, do_sample=True, top_k=20, temperature=1.5)


def _two_turns(model) -> list[torch.Tensor]:
    """Two turns on one cache (multi-turn over the mirror); the sequences of each."""
    import inspect

    kw = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    out = model.generate(_prompt(1, LONG, 3), max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    again = model.generate(torch.cat([out.sequences, _prompt(1, 40, 4)], 1), max_new_tokens=12, do_sample=False,
                           return_dict_in_generate=True, **{kw: cache})
    return [out.sequences, again.sequences]


def _worker(rank: int, path: str, port: int, out: str, indexer) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        from lsa_rewrite.tensor_parallel import TensorParallelError

        result = {}
        model = lsa_rewrite.convert(_load_sharded(path), COMPILED)
        result["sites"] = [(s.q_heads, s.kv_heads) for s in model.lsa.sites]
        result["covering"] = hf_greedy(model, _prompt(2, SHORT, 0), NEW)
        result["compiled"] = model.lsa.compiled is not None
        graph = model.lsa.programs[2].module.graph
        result["collectives"] = [str(n.target) for n in graph.nodes if "c10d_functional" in str(n.target)]
        result["compile_options"] = model.lsa.adapter.tp.compile_options(torch.device("cpu"))
        del model

        # Compile settings that fail (say symmetric memory that cannot allocate): the step is compiled again
        # without them, the plan keeps NCCL from then on, decoding goes on.
        from lsa_rewrite.runtime.compiled import CompiledStep

        model = lsa_rewrite.convert(_load_sharded(path), COMPILED)
        model.lsa.adapter.tp._options = {"max_autotune": False}  # stands for the one-shot lowering's settings
        call = CompiledStep.__call__

        def failing(self, inputs):
            if self.compile_config:
                raise RuntimeError("simulated compile failure")
            return call(self, inputs)

        CompiledStep.__call__ = failing
        try:
            result["fallback"] = hf_greedy(model, _prompt(2, SHORT, 0), NEW)
        finally:
            CompiledStep.__call__ = call
        result["fallback_options"] = model.lsa.adapter.tp.compile_options(torch.device("cpu"))
        del model

        model = lsa_rewrite.convert(_load_sharded(path), QUARTER)
        result["quarter"] = hf_greedy(model, _prompt(1, LONG, 1), NEW)
        result["footprint"] = lsa_rewrite.footprint(model)
        result["total"] = lsa_rewrite.footprint(model, across_ranks=True)
        store = model.lsa.store
        result["pool_heads"] = [layer.k_pool.shape[-2] for layer in store.chunk_layers]
        result["mirror_heads"] = [layer.mirror_k.shape[-2] for layer in store.chunk_layers]
        result["index_heads"] = [layer.kmin.shape[-2] for layer in store.chunk_layers]
        result["tables"] = [layer.chunk_slot.clone() for layer in store.chunk_layers]
        result["slot_chunk"] = [layer.slot_chunk.clone() for layer in store.chunk_layers]
        result["kv_chunk_bytes"] = sum(2 * 16 * s.kv_heads * s.head_dim * 4 for s in model.lsa.sites)
        del store
        # sampling: every rank draws from the same seed (as transformers' TP generate needs), so the ranks
        # agree on each token; a later turn on the same cache prefills only the new tokens on every rank
        result["sampled"] = _sample(model, _prompt(1, LONG, 2))
        result["turns"] = _two_turns(model)
        result["turn_footprint"] = lsa_rewrite.footprint(model)
        del model

        refused = _load_sharded(path)
        refused._tp_plan = {**refused._tp_plan, "model.norm": "sequence_parallel"}
        forward = refused.forward
        try:
            lsa_rewrite.convert(refused, COVERING)
        except TensorParallelError as exc:
            result["refused"] = str(exc)
        result["untouched"] = getattr(refused, "lsa", None) is None and refused.forward == forward
        del refused

        # the indexer: each rank scores with its own KV heads' share, the shares summed across ranks
        model = lsa_rewrite.convert(_load_sharded(path), INDEXED, indexer=indexer)
        result["indexed"] = hf_greedy(model, _prompt(1, LONG, 5), NEW)
        store = model.lsa.store
        result["indexed_tables"] = [layer.chunk_slot.clone() for layer in store.chunk_layers]
        result["indexed_selector"] = (type(store.selector).__name__, store.selector.kv_heads)
        result["indexed_selections"] = store.selections
        del model, store
        # the same weights as a layer-group indexer: each layer keeps its own target layer's choice, the
        # per-target head sums all-reduced before each layer takes its group's row
        model = lsa_rewrite.convert(_load_sharded(path), INDEXED, indexer=_grouped(indexer))
        result["grouped"] = hf_greedy(model, _prompt(1, LONG, 5), NEW)
        result["grouped_tables"] = [layer.chunk_slot.clone() for layer in model.lsa.store.chunk_layers]
        del model
        # and with half of each selection from the shared ranking (group_shared), taken after the all-reduce
        model = lsa_rewrite.convert(_load_sharded(path), INDEXED, indexer=_grouped(indexer, shared=0.5))
        result["grouped_shared"] = hf_greedy(model, _prompt(1, LONG, 5), NEW)
        result["grouped_shared_tables"] = [layer.chunk_slot.clone() for layer in model.lsa.store.chunk_layers]
        del model
        # a merged-form indexer: layer 0's target ranks the shared slots only, layer 1's chooses for both layers
        model = lsa_rewrite.convert(_load_sharded(path), INDEXED, indexer=_grouped(indexer, shared=0.5, merged=True))
        result["merged"] = hf_greedy(model, _prompt(1, LONG, 5), NEW)
        result["merged_tables"] = [layer.chunk_slot.clone() for layer in model.lsa.store.chunk_layers]
        del model
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    import torch.multiprocessing as mp

    model = no_eos(make_model("llama"))
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "llama")
        model.save_pretrained(path)
        indexer = _indexer(model)
        mp.spawn(_worker, args=(path, _free_port(), tmp, indexer), nprocs=WORLD, join=True)
        results = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return model, indexer, results


def _grouped(indexer, shared=0.0, merged=False):
    """The same weights with ``ensemble="group"``: layer 0 chooses for itself, layer 1 for itself (with
    ``shared`` of each selection's free slots first from the shared ranking: ``group_shared``). ``merged``:
    as ``merge_indexers`` builds them, target layer 0 ranks the shared slots only (``shared_layers``, an
    empty group) and target layer 1 chooses for both layers."""
    from lsa_rewrite.indexer import LSAIndexer

    groups = dict(layer_groups=((), (0, 1)), shared_layers=(0,)) if merged else dict(layer_groups=((0,), (1,)))
    other = LSAIndexer(dataclasses.replace(indexer.config, ensemble="group", group_shared=shared, **groups))
    other.load_state_dict(indexer.state_dict())
    other.signature, other.lsa, other.metrics, other.source = indexer.signature, indexer.lsa, indexer.metrics, indexer.source
    return other


def _indexer(model):
    """An indexer for the tiny Llama: initialised from its query projections, then every parameter moved
    by seeded noise, so that heads weigh differently and the per-head sums matter."""
    from lsa_rewrite.indexer.from_model import indexer_from_model

    indexer = indexer_from_model(model, INDEXED, target_layers=[0, 1])
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in indexer.parameters():
            p.add_(0.3 * p.abs().mean() * torch.randn(p.shape, generator=g))
    return indexer


def test_each_rank_traces_and_stores_its_own_heads(ranks):
    model, _, results = ranks
    q, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    for r in results:
        assert r["sites"] == [(q // WORLD, kv // WORLD)] * model.config.num_hidden_layers
        assert r["collectives"].count("_c10d_functional.all_reduce") == 1 + 2 * model.config.num_hidden_layers
        assert r["collectives"].count("_c10d_functional.all_gather_into_tensor") == 1
        assert r["pool_heads"] == r["mirror_heads"] == r["index_heads"] == [kv // WORLD] * model.config.num_hidden_layers
        assert r["compile_options"] == {}  # gloo on the CPU: the all-reduces stay the process group's (one-shot is CUDA's)


def test_failing_compile_settings_fall_back_to_the_plain_step(ranks):
    model, _, results = ranks
    dense_seq, dense_logits = hf_greedy(model, _prompt(2, SHORT, 0), NEW)
    for r in results:
        seq, logits = r["fallback"]
        assert torch.equal(seq, dense_seq)
        torch.testing.assert_close(logits, dense_logits, atol=1e-4, rtol=1e-4)
        assert r["fallback_options"] == {}  # NCCL (here gloo) for every later compile


def test_covering_budget_equals_the_unsharded_dense_model(ranks):
    model, _, results = ranks
    dense_seq, dense_logits = hf_greedy(model, _prompt(2, SHORT, 0), NEW)
    for r in results:
        seq, logits = r["covering"]
        assert r["compiled"], "the covering run should decode through the compiled step"
        assert torch.equal(seq, dense_seq)
        torch.testing.assert_close(logits, dense_logits, atol=1e-4, rtol=1e-4)


def test_quarter_budget_per_rank_footprint_and_one_resident_set(ranks):
    model, _, results = ranks
    for r in results:
        fp = r["footprint"]
        slack = r["kv_chunk_bytes"] / fp["dense_kv_bytes"]
        assert fp["tp_size"] == WORLD and fp["tokens"] == LONG + NEW - 1
        assert 0.1 < fp["ratio"] <= 0.25 + slack, fp
        assert fp["selections"] >= 3 and fp["mirror_bytes"] > 0
    ranks_fp = [r["footprint"] for r in results]
    assert {fp["tp_rank"] for fp in ranks_fp} == set(range(WORLD))
    total = results[0]["total"]
    assert total == results[1]["total"]
    assert total["resident_kv_bytes"] == sum(fp["resident_kv_bytes"] for fp in ranks_fp)
    sites = [(model.config.num_key_value_heads, model.config.head_dim)] * model.config.num_hidden_layers
    assert total["dense_kv_bytes"] == (LONG + NEW - 1) * sum(2 * h * d * 4 for h, d in sites)
    # the all-reduced scores give every rank the same chunk tables (only the heads in the pools differ)
    for a, b in zip(results[0]["tables"] + results[0]["slot_chunk"], results[1]["tables"] + results[1]["slot_chunk"]):
        assert torch.equal(a, b)
    assert torch.equal(results[0]["quarter"][0], results[1]["quarter"][0])


def test_quarter_budget_follows_the_unsharded_lsa_model(ranks):
    model, _, results = ranks
    from helpers import converted_copy

    seq, logits = hf_greedy(no_eos(converted_copy(model, QUARTER)), _prompt(1, LONG, 1), NEW)
    tp_seq, tp_logits = results[0]["quarter"]
    assert torch.equal(tp_seq, seq)
    torch.testing.assert_close(tp_logits, logits, atol=1e-3, rtol=1e-3)


def test_unsupported_plans_are_refused_before_converting(ranks):
    _, _, results = ranks
    for r in results:
        assert "sequence_parallel" in r["refused"] and "model.norm" in r["refused"]
        assert r["untouched"]


def test_sampling_and_a_later_turn_agree_across_ranks_and_with_the_unsharded_model(ranks):
    model, _, results = ranks
    from helpers import converted_copy

    single = no_eos(converted_copy(model, QUARTER))
    sampled = _sample(single, _prompt(1, LONG, 2))
    turns = _two_turns(single)
    for r in results:
        assert torch.equal(r["sampled"], sampled)
        assert all(torch.equal(a, b) for a, b in zip(r["turns"], turns))
        fp = r["turn_footprint"]
        assert fp["tokens"] == turns[1].shape[1] - 1 and fp["ratio"] < 0.5, fp


def test_indexer_selector_sums_head_shares_across_ranks_like_the_unsharded_model(ranks):
    model, indexer, results = ranks
    single = no_eos(lsa_rewrite.convert(copy.deepcopy(model), INDEXED, indexer=indexer))
    seq, logits = hf_greedy(single, _prompt(1, LONG, 5), NEW)
    tables = [layer.chunk_slot for layer in single.lsa.store.chunk_layers]
    assert single.lsa.store.selections >= 3
    kv = model.config.num_key_value_heads
    for rank, r in enumerate(results):
        assert r["indexed_selector"] == ("IndexerSelector", slice(rank * kv // WORLD, (rank + 1) * kv // WORLD))
        tp_seq, tp_logits = r["indexed"]
        assert torch.equal(tp_seq, seq)
        torch.testing.assert_close(tp_logits, logits, atol=1e-3, rtol=1e-3)
        assert all(torch.equal(a, b) for a, b in zip(r["indexed_tables"], tables))


def test_group_indexer_keeps_per_layer_sets_agreed_across_ranks_like_the_unsharded_model(ranks):
    model, indexer, results = ranks
    single = no_eos(lsa_rewrite.convert(copy.deepcopy(model), INDEXED, indexer=_grouped(indexer)))
    seq, logits = hf_greedy(single, _prompt(1, LONG, 5), NEW)
    tables = [layer.chunk_slot for layer in single.lsa.store.chunk_layers]
    assert not torch.equal(tables[0], tables[1])  # the two groups keep different resident sets
    for r in results:
        tp_seq, tp_logits = r["grouped"]
        assert torch.equal(tp_seq, seq)
        torch.testing.assert_close(tp_logits, logits, atol=1e-3, rtol=1e-3)
        assert all(torch.equal(a, b) for a, b in zip(r["grouped_tables"], tables))
    shared = no_eos(lsa_rewrite.convert(copy.deepcopy(model), INDEXED, indexer=_grouped(indexer, shared=0.5)))
    seq, logits = hf_greedy(shared, _prompt(1, LONG, 5), NEW)
    shared_tables = [layer.chunk_slot for layer in shared.lsa.store.chunk_layers]
    assert any(not torch.equal(a, b) for a, b in zip(shared_tables, tables))  # the union chose differently
    for r in results:
        tp_seq, tp_logits = r["grouped_shared"]
        assert torch.equal(tp_seq, seq)
        torch.testing.assert_close(tp_logits, logits, atol=1e-3, rtol=1e-3)
        assert all(torch.equal(a, b) for a, b in zip(r["grouped_shared_tables"], shared_tables))
    merged = no_eos(lsa_rewrite.convert(copy.deepcopy(model), INDEXED, indexer=_grouped(indexer, shared=0.5, merged=True)))
    seq, logits = hf_greedy(merged, _prompt(1, LONG, 5), NEW)
    merged_tables = [layer.chunk_slot for layer in merged.lsa.store.chunk_layers]
    assert any(not torch.equal(a, b) for a, b in zip(merged_tables, shared_tables))  # other shared rows, other sets
    for r in results:
        tp_seq, tp_logits = r["merged"]
        assert torch.equal(tp_seq, seq)
        torch.testing.assert_close(tp_logits, logits, atol=1e-3, rtol=1e-3)
        assert all(torch.equal(a, b) for a, b in zip(r["merged_tables"], merged_tables))
