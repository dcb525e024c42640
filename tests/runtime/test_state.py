"""The per-layer state contract: one declaration that the rewrite pass and the store both follow."""

from __future__ import annotations

import pytest
import torch

import lsa_rewrite
from lsa_rewrite import LSAConfig
from lsa_rewrite.runtime import state
from lsa_rewrite.runtime.state import StateContractError, check_program_inputs
from lsa_rewrite.runtime.store import ChunkLayer, KVStore, LayerSpec, RingLayer

SPECS = [LayerSpec(0, 4, 2, 16, torch.float32), LayerSpec(1, 4, 2, 16, torch.float32, window=32)]
CFG = LSAConfig(budget=128, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=16)


def test_store_allocates_exactly_the_declared_tensors():
    store = KVStore(SPECS, CFG, batch=2, capacity=256)
    dims = {"B": 2, "S": store.slots, "N": store.num_chunks, "C": 16, "Hq": 4, "Hkv": 2, "D": 16, "W": 32}
    for layer, contract in ((store.layers[0], state.CHUNK_LAYER_STATE), (store.layers[1], state.RING_LAYER_STATE)):
        assert list(layer.device_tensors()) == [t.name for t in contract]
        for t in contract:
            value = getattr(layer, t.name)
            assert tuple(value.shape) == t.resolve_shape(dims) and value.dtype == t.resolve_dtype(torch.float32), t.name
    assert isinstance(store.layers[0], ChunkLayer) and isinstance(store.layers[1], RingLayer)


def test_rewritten_graph_reads_the_contract_inputs_in_order(zoo_model):
    model = lsa_rewrite.convert(zoo_model("gemma3").eval(), LSAConfig(mode="dense", chunk_size=16))
    program = model.lsa.program(1)
    keys = program.store_keys
    assert keys[:2] == [(None, "pos"), (None, "valid_start")]
    by_layer: dict[int, list[str]] = {}
    for layer, name in keys[2:]:
        by_layer.setdefault(layer, []).append(name)
    actions = {s.layer: s.action for s in program.sites}
    assert set(actions.values()) == {"rewrite", "ring"}
    for layer, names in by_layer.items():
        assert tuple(names) == state.graph_inputs(actions[layer])
    placeholders = [n.name for n in program.module.graph.nodes if n.op == "placeholder" and n.name.startswith("lsa_")]
    assert len(placeholders) == len(keys)


def test_a_graph_input_missing_from_the_contract_fails_at_convert(zoo_model, monkeypatch):
    """The pass emits one placeholder too many (a tensor the store would not hold): convert() refuses
    with the contract's message and leaves the model unconverted."""
    model = zoo_model("llama").eval()
    real = state.graph_inputs

    def with_extra(action):
        return real(action) + ("k_extra",)

    monkeypatch.setattr("lsa_rewrite.passes.rewrite.graph_inputs", with_extra)
    forward = model.forward
    with pytest.raises(StateContractError, match="'k_extra' is not declared"):
        lsa_rewrite.convert(model, LSAConfig(mode="dense"))
    assert getattr(model, "lsa", None) is None and model.forward == forward


def test_check_program_inputs_names_the_mismatch():
    actions = {0: "rewrite"}
    ok = [(None, "pos"), (None, "valid_start")] + [(0, n) for n in state.graph_inputs("rewrite")]
    check_program_inputs(ok, actions)
    with pytest.raises(StateContractError, match="layer 0 .*binds"):
        check_program_inputs(ok[:-1], actions)
    with pytest.raises(StateContractError, match="keeps out of the step"):
        check_program_inputs(ok + [(0, "planned")], actions)
    with pytest.raises(StateContractError, match="no attention site"):
        check_program_inputs(ok + [(3, "k_pool")], actions)


def test_store_tensor_of_another_shape_is_refused():
    spec = state.declared("rewrite", "kmin")
    dims = {"B": 1, "N": 4, "Hkv": 2, "D": 8}
    with pytest.raises(StateContractError, match="'kmin' is \\(1, 4, 2, 4\\)"):
        state.check_tensor(spec, torch.zeros(1, 4, 2, 4), dims, kv_dtype=torch.float32, device=torch.device("cpu"), where="layer 0")
