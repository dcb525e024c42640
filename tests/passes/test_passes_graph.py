"""What the passes find in, and leave of, each zoo model's decode graph."""

from __future__ import annotations

import pytest
import torch
from zoo import HF_FAMILIES, SLIDING_FAMILIES, make_model

import lsa_rewrite
from lsa_rewrite import LSAConfig
from lsa_rewrite.adapters import HFAdapter, hf_layer_windows
from lsa_rewrite.passes import (
    LocateAttentionPass,
    RewriteAttentionPass,
    VerifyError,
    VerifyRewritePass,
    count_targets,
    locate,
)

LSA = torch.ops.lsa


def _targets(program) -> list:
    return [n.target for n in program.module.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("family", [*HF_FAMILIES, "buffer"])
def test_rewritten_graph_reads_only_the_store(family):
    model = make_model(family)
    if family == "buffer":
        model.setup_caches(max_batch_size=1, max_seq_length=64)
    converted = lsa_rewrite.convert(model, LSAConfig(mode="dense"))
    program = converted.lsa.program(1)
    sites = program.sites
    targets = _targets(program)
    sparse = sum(s.action == "rewrite" for s in sites)
    ring = sum(s.action == "ring" for s in sites)
    # one fused op per sparse layer: the token's append, its chunk bounds, the query tap and the attention
    assert targets.count(LSA.sparse_decode_attention_append.default) == sparse
    for unfused in (LSA.sparse_decode_attention, LSA.append_kv, LSA.update_chunk_index):
        assert targets.count(unfused.default) == 0
    assert targets.count(LSA.tap.default) == 0  # no indexer here; the query tap is the fused op's
    assert targets.count(LSA.ring_decode_attention.default) == ring
    assert targets.count(LSA.ring_append_kv.default) == ring
    counts = count_targets(program.module.graph)
    assert "scaled_dot_product_attention" not in counts and "index_copy_" not in counts
    # no attention softmax is left; a mixture-of-experts router keeps its own, over the experts
    config = getattr(model, "config", None)
    experts = next((getattr(config, k) for k in ("num_experts", "num_local_experts", "n_routed_experts") if getattr(config, k, None)), None)
    assert "softmax" not in counts or experts, "a softmax is left in the graph of a model without experts"
    inputs = [n.name for n in program.module.graph.nodes if n.op == "placeholder"]
    assert len(inputs) == len(program.input_names) + len(program.store_keys)
    assert all(name.startswith("lsa_") for name in inputs[len(program.input_names):])
    assert sorted(s.layer for s in sites) == list(range(n_layers(model, family)))


def n_layers(model, family: str) -> int:
    return model.config.num_hidden_layers if family != "buffer" else len(model.layers)


@pytest.mark.parametrize("family", SLIDING_FAMILIES)
def test_sliding_window_layers_are_reported_not_sparsified(family):
    model = make_model(family)
    rows = lsa_rewrite.inspect_model(model)
    windows = hf_layer_windows(model.config)
    assert windows, "zoo sliding family without sliding layers"
    for row in rows:
        if row["layer"] in windows:
            assert row["action"] == "ring" and row["window"] == windows[row["layer"]]
            assert "sliding window" in row["reason"]
        else:
            assert row["action"] == "rewrite"


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_static_and_dynamic_capture_agree(family):
    model = make_model(family)
    static = lsa_rewrite.inspect_model(model, LSAConfig(capture_cache="static"))
    dynamic = lsa_rewrite.inspect_model(model, LSAConfig(capture_cache="dynamic"))
    keys = ("layer", "q_heads", "kv_heads", "head_dim", "scale", "window", "action")
    assert [{k: r[k] for k in keys} for r in static] == [{k: r[k] for k in keys} for r in dynamic]
    assert {r["cache_write"] for r in static} == {"index_copy_"}
    assert {r["cache_write"] for r in dynamic} == {"cat"}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_scale_and_heads_come_from_the_graph(attn):
    model = make_model("qwen3", attn_implementation=attn)  # head_dim 32 != hidden / heads
    rows = lsa_rewrite.inspect_model(model)
    for row in rows:
        assert row["attention"] == attn
        assert (row["q_heads"], row["kv_heads"], row["head_dim"]) == (4, 2, 32)
        assert row["scale"] == pytest.approx(32 ** -0.5)


def test_verify_rejects_a_graph_that_still_reads_the_cache():
    model = make_model("llama")
    step = HFAdapter(model, LSAConfig()).capture(1)
    sites = LocateAttentionPass()(step)
    with pytest.raises(VerifyError, match="still read"):
        VerifyRewritePass()(step, sites)  # located but not rewritten: the dense cache is still attended


def test_pass_uuids_are_stable_and_distinct():
    passes = [LocateAttentionPass(), RewriteAttentionPass(), VerifyRewritePass()]
    ids = [p.uuid() for p in passes]
    assert len(set(ids)) == 3
    assert ids == [p.uuid() for p in (LocateAttentionPass(), RewriteAttentionPass(), VerifyRewritePass())]


def test_locate_does_not_change_the_graph():
    model = make_model("gemma3")
    step = HFAdapter(model, LSAConfig()).capture(1)
    before = str(step.graph_module.graph)
    locate(step, layer_windows=hf_layer_windows(model.config))
    assert str(step.graph_module.graph) == before


def _layer_types_and_kwargs_before_5_2x(config):
    """transformers' ``get_layer_types_and_kwargs`` as 5.17 has it (the H200 image's): the layer types, and one
    kwargs dict for every layer holding the config's one sliding window."""
    types = getattr(config, "layer_types", None)
    if types is None:
        if getattr(config, "sliding_window", None) is not None:
            types = ["sliding_attention"] * config.num_hidden_layers
        else:
            types = ["full_attention"] * config.num_hidden_layers
    kwargs = {}
    if "sliding_attention" in types:
        kwargs["sliding_window"] = config.sliding_window
    return types, kwargs


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_layer_windows_read_the_same_from_the_older_transformers_helper(family, monkeypatch):
    """transformers 5.17 returns one kwargs dict for all layers where later versions return one per layer:
    both give every zoo family the same sliding-window layers."""
    import transformers.cache_utils

    model = make_model(family)
    try:
        want = hf_layer_windows(model.config)
    except ValueError as exc:  # a family refused for its layer kinds is refused the same way
        monkeypatch.setattr(transformers.cache_utils, "get_layer_types_and_kwargs", _layer_types_and_kwargs_before_5_2x)
        with pytest.raises(ValueError, match=str(exc).split(":")[0]):
            hf_layer_windows(model.config)
        return
    monkeypatch.setattr(transformers.cache_utils, "get_layer_types_and_kwargs", _layer_types_and_kwargs_before_5_2x)
    assert hf_layer_windows(model.config) == want
    if family in SLIDING_FAMILIES:
        assert want
