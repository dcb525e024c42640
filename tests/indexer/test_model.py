"""Tests for ``lsa_rewrite.indexer.model``: shapes, rotary, GQA mapping, initialisation from the model's
query projections, the size rule, the file format and its refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from lsa_rewrite.indexer.model import (
    IndexerConfig,
    LSAIndexer,
    apply_rope,
    check_compatible,
    default_rank,
    rotate_half,
    spread_neighbours,
)

HIDDEN, HQ, HKV, D = 32, 4, 2, 8
LAYERS = (1, 3)
SIGNATURE = {
    "class": "TinyForCausalLM",
    "model_type": "tiny",
    "num_layers": 4,
    "hidden_size": HIDDEN,
    "q_heads": HQ,
    "kv_heads": HKV,
    "head_dim": D,
    "sparse_layers": [0, 1, 2, 3],
    "vocab_size": 100,
}
LSA = {"_type": "LSAConfig", "_version": 1, "_data": {"chunk_size": 16, "interval": 16, "budget": 0.135}}


def make_config(**overrides) -> IndexerConfig:
    fields = dict(hidden_size=HIDDEN, q_heads=HQ, kv_heads=HKV, head_dim=D, rank=16, target_layers=LAYERS)
    fields.update(overrides)
    return IndexerConfig(**fields)


def rope_tables(batch: int, *, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """HF-style cos/sin [B, D]: angles for D/2 frequencies, duplicated over the two halves."""
    angles = torch.rand(batch, D // 2, generator=generator) * 2 * math.pi
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def random_inputs(batch: int = 3, chunks: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lt = len(LAYERS)
    x = torch.randn(batch, lt, HIDDEN, generator=g)
    cos, sin = rope_tables(batch, generator=g)
    centre = torch.randn(batch, lt, chunks, HKV, D, generator=g)
    half = torch.rand(batch, lt, chunks, HKV, D, generator=g)
    return x, cos, sin, centre - half, centre + half


def reference_query(w_q: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The model's query ``rope(W_q x)`` [B, Hq, D], hand-written."""
    q = (x @ w_q.T).view(x.shape[0], HQ, D)
    return q * cos[:, None] + rotate_half(q) * sin[:, None]


# -- config -------------------------------------------------------------------------------------


def test_config_round_trip_and_tuple():
    cfg = make_config(target_layers=[3, 1], ensemble="mean", rope=False, threshold=0.3)
    assert cfg.target_layers == (3, 1)
    assert IndexerConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"hidden_size": 0}, "hidden_size must be an int >= 1"),
        ({"q_heads": 6, "kv_heads": 4}, "multiple of kv_heads"),
        ({"rank": 2.5}, "rank must be an int"),
        ({"target_layers": ()}, "non-empty tuple"),
        ({"target_layers": (1, 1)}, "repeated layers"),
        ({"target_layers": (-1,)}, "layer indices >= 0"),
        ({"ensemble": "sum"}, "ensemble must be one of"),
        ({"rope": 1}, "rope must be True, False or one bool per target layer"),
        ({"rope": (True,)}, "one bool per target layer \\(2 for target_layers"),
        ({"rope": (True, 0)}, "rope must be True, False or one bool per target layer"),
        ({"threshold": 1.0}, "threshold must be a probability"),
        ({"version": 2}, "version 2 is not supported"),
        ({"neighbour_margin": -0.1}, "neighbour_margin must be None \\(off\\) or a finite number of logits >= 0"),
        ({"neighbour_margin": True}, "neighbour_margin must be None"),
        ({"neighbour_margin": float("inf")}, "neighbour_margin must be None \\(off\\) or a finite"),
        ({"neighbour_min_free": -1}, "neighbour_min_free must be an int >= 0"),
        ({"neighbour_top": 0}, "neighbour_top must be None \\(every selectable chunk lends\\) or an int >= 1"),
        ({"neighbour_min_free": 2.0}, "neighbour_min_free must be an int >= 0"),
        ({"ensemble": "group"}, "ensemble='group' needs layer_groups"),
        ({"ensemble": "group", "layer_groups": ((0, 1),)}, "one non-empty tuple of model layer indices per target layer \\(2 for"),
        ({"ensemble": "group", "layer_groups": ((0, 1), ())}, "ensemble='group' needs layer_groups"),
        ({"ensemble": "group", "layer_groups": ((0, 1), (1, 2))}, "layer_groups must be disjoint"),
        ({"layer_groups": ((0,), (1,))}, "layer_groups is only used with ensemble='group'"),
    ],
)
def test_config_checks(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(**overrides)


def test_per_layer_rope_round_trips_and_a_uniform_tuple_is_the_bool():
    """``rope`` per target layer (a model mixing rotary and no-rotary layers); one bool stays one bool in
    the dict form (files written before per-layer rope read and write the same)."""
    mixed = make_config(rope=[False, True])
    assert mixed.rope == (False, True) and mixed.any_rope
    assert [mixed.layer_rope(i) for i in range(2)] == [False, True]
    data = json.loads(json.dumps(mixed.to_dict()))
    assert data["_data"]["rope"] == [False, True] and IndexerConfig.from_dict(data) == mixed
    assert make_config(rope=(True, True)) == make_config(rope=True) and make_config(rope=(False, False)).rope is False
    assert make_config().to_dict()["_data"]["rope"] is True
    assert "rope_style" not in make_config().to_dict()["_data"]  # the default is left out: old readers read it
    inter = make_config(rope_style="interleaved")
    assert IndexerConfig.from_dict(json.loads(json.dumps(inter.to_dict()))) == inter
    with pytest.raises(ValueError, match="rope_style must be one of"):
        make_config(rope_style="gptj")
    x = torch.arange(1.0, 5.0)
    assert apply_rope(x, torch.zeros(4), torch.ones(4), "interleaved").tolist() == [-2.0, 1.0, -4.0, 3.0]
    assert apply_rope(x, torch.zeros(4), torch.ones(4)).tolist() == [-3.0, -4.0, 1.0, 2.0]
    assert not make_config(rope=False).any_rope


def test_per_layer_rope_rotates_only_the_rotary_layers():
    """Under a mixed ``rope`` each target layer scores as an all-rotary or a no-rotary indexer with the
    same weights would: cos/sin reach the rotary layers only."""
    g = torch.Generator().manual_seed(3)
    mixed = LSAIndexer.random_init(make_config(rope=(True, False)), generator=g)
    x, cos, sin, kmin, kmax = random_inputs()
    got = mixed.logits(x, cos, sin, kmin, kmax)
    for rope, layers in ((True, [0]), (False, [1])):
        same = LSAIndexer(make_config(rope=rope))
        same.load_state_dict(mixed.state_dict())
        want = same.logits(x, cos if rope else None, sin if rope else None, kmin, kmax)
        assert torch.equal(got[:, layers], want[:, layers])
    with pytest.raises(ValueError, match="target layer 3 of this indexer has no rotary embedding"):
        mixed.query(1, x[:, 1], cos, sin)
    with pytest.raises(ValueError, match="target layer 1 of this indexer applies rotary embeddings"):
        mixed.query(0, x[:, 0], None, None)


def test_shipped_indexer_file_loads_with_rope_for_every_layer():
    """The shipped SmolLM2 indexer (written before per-layer rope) still loads, reads rope=True for every
    target layer, and writes its config back as it was."""
    import importlib.resources

    path = importlib.resources.files("lsa_rewrite") / "data" / "smollm2-135m-instruct.indexer.safetensors"
    indexer = LSAIndexer.load(path)
    cfg = indexer.config
    assert cfg.rope is True and all(cfg.layer_rope(i) for i in range(len(cfg.target_layers)))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        stored = json.loads(f.metadata()["config"])
    assert cfg.to_dict() == stored


def test_old_format_file_with_one_rope_bool_loads(trained):
    """A file whose config says ``rope: true`` (every file before per-layer rope) loads and scores as saved."""
    indexer, path = trained
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["config"])["_data"]["rope"] is True
    loaded = LSAIndexer.load(path)
    assert loaded.config.rope is True
    x, cos, sin, kmin, kmax = random_inputs()
    assert torch.equal(loaded(x, cos, sin, kmin, kmax), indexer(x, cos, sin, kmin, kmax))


def test_scoring_rules_round_trip_and_default_off():
    cfg = make_config(neighbour_margin=0.25, neighbour_min_free=9, neighbour_top=2)
    assert IndexerConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    old = make_config().to_dict()  # a file written before the rules existed: its config lacks the fields
    for key in ("neighbour_margin", "neighbour_min_free", "neighbour_top"):
        del old["_data"][key]
    loaded = IndexerConfig.from_dict(old)
    assert loaded.neighbour_margin is None and loaded.neighbour_min_free == 0 and loaded.neighbour_top is None


def test_span_rule_raises_neighbours_of_a_high_chunk():
    z = torch.tensor([[0.0, 5.0, 0.0, 1.0, -3.0], [9.0, 0.0, 0.0, 0.0, 0.0]])
    out = spread_neighbours(z, 1.0)
    torch.testing.assert_close(out, torch.tensor([[4.0, 5.0, 4.0, 1.0, 0.0], [9.0, 8.0, 0.0, 0.0, 0.0]]))
    assert spread_neighbours(z, None) is z
    assert spread_neighbours(z, 1.0, slots=4, min_slots=5) is z  # too few slots: off
    torch.testing.assert_close(spread_neighbours(z, 1.0, slots=5, min_slots=5), out)
    # only the top lenders of each row raise neighbours (distractor needles do not crowd the budget)
    many = torch.tensor([0.0, 9.0, 0.0, 0.0, 7.0, 0.0, 0.0, 6.0, 0.0])
    torch.testing.assert_close(spread_neighbours(many, 1.0, top=1), torch.tensor([8.0, 9.0, 8.0, 0.0, 7.0, 0.0, 0.0, 6.0, 0.0]))
    torch.testing.assert_close(spread_neighbours(many, 1.0, top=2), torch.tensor([8.0, 9.0, 8.0, 6.0, 7.0, 6.0, 0.0, 6.0, 0.0]))
    torch.testing.assert_close(spread_neighbours(many, 1.0, top=9), spread_neighbours(many, 1.0))
    # through the indexer: forward applies the rule per target layer before the ensemble, logits() does not
    g = torch.Generator().manual_seed(5)
    plain = LSAIndexer.random_init(make_config(), generator=g)
    ruled = LSAIndexer(make_config(neighbour_margin=0.5))
    ruled.load_state_dict(plain.state_dict())
    x, cos, sin, kmin, kmax = random_inputs()
    raw = plain.logits(x, cos, sin, kmin, kmax)
    torch.testing.assert_close(ruled.logits(x, cos, sin, kmin, kmax), raw)
    torch.testing.assert_close(ruled(x, cos, sin, kmin, kmax), torch.sigmoid(spread_neighbours(raw, 0.5)).amax(1))
    assert not torch.allclose(ruled(x, cos, sin, kmin, kmax), plain(x, cos, sin, kmin, kmax))


def test_config_from_dict_refuses_unknown_fields():
    data = make_config().to_dict()
    data["_data"]["heads"] = 3
    with pytest.raises(ValueError, match="unknown IndexerConfig fields"):
        IndexerConfig.from_dict(data)


def test_default_rank():
    assert default_rank(576) == 64 and default_rank(1024) == 64 and default_rank(4096) == 256
    assert default_rank(32, q_dim=16) == 16


# -- shapes, rotary, GQA ------------------------------------------------------------------------


def test_shapes_and_forward_agree_with_per_layer_calls():
    g = torch.Generator().manual_seed(1)
    indexer = LSAIndexer.random_init(make_config(), generator=g)
    x, cos, sin, kmin, kmax = random_inputs()
    q, w = indexer.query(0, x[:, 0], cos, sin)
    assert q.shape == (3, HQ, D) and w.shape == (3, HQ)
    logits = indexer.layer_logits(0, q, w, kmin[:, 0].half(), kmax[:, 0].bfloat16())
    assert logits.shape == (3, 7) and logits.dtype == torch.float32
    all_logits = indexer.logits(x, cos, sin, kmin, kmax)
    assert all_logits.shape == (3, 2, 7)
    per_layer = [indexer.layer_logits(i, *indexer.query(i, x[:, i], cos, sin), kmin[:, i], kmax[:, i]) for i in range(2)]
    probs = indexer.ensemble(per_layer)
    assert probs.shape == (3, 7)
    torch.testing.assert_close(indexer(x, cos, sin, kmin, kmax), probs)
    torch.testing.assert_close(probs, torch.sigmoid(torch.stack(per_layer, 1)).amax(1))
    mean = LSAIndexer(make_config(ensemble="mean"))
    mean.load_state_dict(indexer.state_dict())
    torch.testing.assert_close(mean(x, cos, sin, kmin, kmax), torch.sigmoid(torch.stack(per_layer, 1)).mean(1))


def test_rope_rotates_each_channel_pair_by_its_angle():
    g = torch.Generator().manual_seed(2)
    rope = LSAIndexer.random_init(make_config(), generator=g)
    plain = LSAIndexer(make_config(rope=False))
    plain.load_state_dict(rope.state_dict())
    x = torch.randn(2, HIDDEN, generator=g)
    theta = torch.rand(2, D // 2, generator=g) * 6.0
    cos, sin = torch.cat([theta.cos()] * 2, -1), torch.cat([theta.sin()] * 2, -1)
    q_rot, w_rot = rope.query(0, x, cos, sin)
    q, w = plain.query(0, x, None, None)
    torch.testing.assert_close(w_rot, w)
    # channel pair (i, i + D/2) turns by theta_i: (a, b) -> (a cos - b sin, a sin + b cos)
    a, b = q[..., : D // 2], q[..., D // 2 :]
    c, s = theta.cos()[:, None], theta.sin()[:, None]
    torch.testing.assert_close(q_rot, torch.cat([a * c - b * s, a * s + b * c], -1))
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm(dim=-1))
    with pytest.raises(ValueError, match="rope=True"):
        rope.query(0, x)
    with pytest.raises(ValueError, match="rope=False"):
        plain.query(0, x, cos, sin)


def test_partial_rotary_leaves_the_tail():
    g = torch.Generator().manual_seed(3)
    v = torch.randn(2, HQ, D, generator=g)
    cos, sin = torch.rand(2, 1, D // 2, generator=g), torch.rand(2, 1, D // 2, generator=g)
    out = apply_rope(v, cos, sin)
    torch.testing.assert_close(out[..., D // 2 :], v[..., D // 2 :])
    torch.testing.assert_close(out[..., : D // 2], v[..., : D // 2] * cos + rotate_half(v[..., : D // 2]) * sin)


@pytest.mark.parametrize("head", range(HQ))
def test_gqa_query_head_reads_its_kv_head(head):
    """Query head h scores against kv head h // (Hq / Hkv), as repeat_kv maps them."""
    indexer = LSAIndexer(make_config(rope=False))
    with torch.no_grad():
        indexer.layers[0].head_bias.zero_()
        indexer.layers[0].head_bias[head] = 1.0
    q = torch.ones(1, HQ, D)
    w = indexer.layers[0].head_bias.detach().expand(1, HQ)
    for kv_head in range(HKV):
        keys = torch.zeros(1, 1, HKV, D)
        keys[0, 0, kv_head] = 1.0
        logit = indexer.layer_logits(0, q, w, keys, keys)
        expected = D / math.sqrt(D) if kv_head == head // (HQ // HKV) else 0.0
        assert logit.item() == pytest.approx(expected)


# -- initialisation from the model --------------------------------------------------------------


def test_full_rank_init_reproduces_the_model_query_up_to_a_positive_scale():
    g = torch.Generator().manual_seed(4)
    weights = {layer: torch.randn(HQ * D, HIDDEN, generator=g) for layer in LAYERS}
    indexer = LSAIndexer.from_query_weights(make_config(rank=HIDDEN), weights)
    x, cos, sin, *_ = random_inputs(batch=5)
    for i, layer in enumerate(LAYERS):
        q, w = indexer.query(i, x[:, i], cos, sin)
        ref = reference_query(weights[layer], x[:, i], cos, sin)
        ratio = (q.flatten(1) * ref.flatten(1)).sum(1) / ref.flatten(1).pow(2).sum(1)  # per-row scale
        assert (ratio > 0).all()
        torch.testing.assert_close(q, ref * ratio[:, None, None], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(w, torch.full_like(w, 1.0 / HQ))


def test_untrained_indexer_ranks_chunks_by_the_model_query_bound():
    g = torch.Generator().manual_seed(5)
    weights = {layer: torch.randn(HQ * D, HIDDEN, generator=g) for layer in LAYERS}
    indexer = LSAIndexer.from_query_weights(make_config(rank=HIDDEN), weights)
    x, cos, sin, kmin, kmax = random_inputs(batch=4, chunks=40, seed=6)
    for i, layer in enumerate(LAYERS):
        ref_q = reference_query(weights[layer], x[:, i], cos, sin)  # [B, Hq, D]
        centre = (kmin[:, i] + kmax[:, i]) / 2  # [B, N, Hkv, D]
        half = (kmax[:, i] - kmin[:, i]) / 2
        ref = torch.zeros(4, 40)
        for h in range(HQ):  # hand-written: sum over heads of relu(max of q_h . k over the chunk's key box)
            g = h // (HQ // HKV)
            bound = torch.maximum(kmin[:, i][:, :, g] * ref_q[:, None, h], kmax[:, i][:, :, g] * ref_q[:, None, h]).sum(-1)
            torch.testing.assert_close(bound, (centre[:, :, g] * ref_q[:, None, h] + half[:, :, g] * ref_q[:, None, h].abs()).sum(-1))
            ref += torch.relu(bound)
        logits = indexer.layer_logits(i, *indexer.query(i, x[:, i], cos, sin), kmin[:, i], kmax[:, i])
        scale = logits.sum(1, keepdim=True) / ref.sum(1, keepdim=True)  # positive per query
        assert (scale > 0).all()
        torch.testing.assert_close(logits, ref * scale, rtol=1e-4, atol=1e-4)
        top = lambda scores: torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :10]  # noqa: E731
        assert torch.equal(top(logits), top(ref))


def test_low_rank_init_is_the_truncated_svd():
    g = torch.Generator().manual_seed(7)
    w_q = torch.randn(HQ * D, HIDDEN, generator=g)
    indexer = LSAIndexer.from_query_weights(make_config(rank=8, target_layers=(0,)), {0: w_q})
    u, s, vh = torch.linalg.svd(w_q.double())
    best = (u[:, :8] * s[:8]) @ vh[:8]
    product = indexer.layers[0].up.double() @ indexer.layers[0].down.double()
    torch.testing.assert_close(product, best, rtol=1e-5, atol=1e-5)


def test_init_refuses_missing_or_misshapen_weights():
    with pytest.raises(ValueError, match=r"missing for target layers \[3\]"):
        LSAIndexer.from_query_weights(make_config(), {1: torch.zeros(HQ * D, HIDDEN)})
    with pytest.raises(ValueError, match="layer 1 has shape"):
        LSAIndexer.from_query_weights(make_config(), {1: torch.zeros(HIDDEN, HQ * D + 1), 3: torch.zeros(HQ * D, HIDDEN)})


# -- size rule ----------------------------------------------------------------------------------


def llama_parameters(*, hidden, q_heads, kv_heads, head_dim, layers, intermediate, vocab, tied):
    attention = hidden * head_dim * (2 * q_heads + 2 * kv_heads)
    per_layer = attention + 3 * hidden * intermediate + 2 * hidden
    return layers * per_layer + vocab * hidden * (1 if tied else 2) + hidden


def test_size_rule_135m_shape():
    model = llama_parameters(hidden=576, q_heads=9, kv_heads=3, head_dim=64, layers=30, intermediate=1536, vocab=49152, tied=True)
    assert 130e6 < model < 140e6
    cfg = IndexerConfig(hidden_size=576, q_heads=9, kv_heads=3, head_dim=64, rank=default_rank(576), target_layers=(9, 18, 27))
    assert LSAIndexer(cfg).num_parameters() == cfg.num_parameters()
    assert cfg.num_parameters() <= 0.03 * model


def test_size_rule_8b_shape():
    model = llama_parameters(hidden=4096, q_heads=32, kv_heads=8, head_dim=128, layers=32, intermediate=14336, vocab=128256, tied=False)
    assert 7.9e9 < model < 8.1e9
    cfg = IndexerConfig(hidden_size=4096, q_heads=32, kv_heads=8, head_dim=128, rank=default_rank(4096), target_layers=(10, 20, 28))
    assert cfg.num_parameters() <= 0.01 * model


# -- file format --------------------------------------------------------------------------------


@pytest.fixture
def trained(tmp_path):
    g = torch.Generator().manual_seed(8)
    indexer = LSAIndexer.random_init(make_config(), generator=g)
    with torch.no_grad():
        for p in indexer.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    path = indexer.save(tmp_path / "ix.safetensors", signature=SIGNATURE, lsa=LSA, metrics={"indexer": {"golden_recall": {"0.1": 0.9}}})
    return indexer, path


def test_save_load_round_trip_is_exact(trained):
    indexer, path = trained
    loaded = LSAIndexer.load(path)
    assert loaded.config == indexer.config
    for (name, a), (_, b) in zip(indexer.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.signature == SIGNATURE
    assert loaded.lsa == {"chunk_size": 16, "interval": 16}
    assert loaded.metrics == {"indexer": {"golden_recall": {"0.1": 0.9}}}
    assert loaded.source == str(path)
    x, cos, sin, kmin, kmax = random_inputs()
    assert torch.equal(loaded(x, cos, sin, kmin, kmax), indexer(x, cos, sin, kmin, kmax))
    check_compatible(loaded, dict(SIGNATURE), LSA)  # the same model and chunk size: accepted
    check_compatible(loaded, dict(SIGNATURE), {"chunk_size": 16, "interval": 64})  # another interval too


def _rewrite(path, *, drop=None, **metadata_changes):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != drop}
    metadata.update(metadata_changes)
    save_file(tensors, str(path), metadata=metadata)


def test_load_refusals_name_the_file(trained, tmp_path):
    _, path = trained
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=f"indexer file {missing} does not exist"):
        LSAIndexer.load(missing)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file at all")
    with pytest.raises(ValueError, match=f"{garbage} is not a readable safetensors file"):
        LSAIndexer.load(garbage)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"{truncated} is not a readable safetensors file"):
        LSAIndexer.load(truncated)
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match=f"{other} is a safetensors file but not an LSA indexer"):
        LSAIndexer.load(other)
    _rewrite(path, _version="2")
    with pytest.raises(ValueError, match=f"{path} is an LSA indexer of format version '2'"):
        LSAIndexer.load(path)
    _rewrite(path, _version="1", drop="layers.1.up")
    with pytest.raises(ValueError, match=rf"{path}: indexer tensors missing: \['layers.1.up'\]"):
        LSAIndexer.load(path)


def test_load_refuses_broken_metadata(trained):
    _, path = trained
    _rewrite(path, config="{not json")
    with pytest.raises(ValueError, match="'config' is missing or not JSON"):
        LSAIndexer.load(path)
    bad = make_config().to_dict()
    bad["_data"]["rank"] = 99
    _rewrite(path, config=json.dumps(bad))
    with pytest.raises(ValueError, match="tensor layers.0.down has shape"):
        LSAIndexer.load(path)


@pytest.mark.parametrize(
    "signature_change, lsa, message",
    [
        ({"num_layers": 5}, LSA, "trained for a model with num_layers=4, but this model has num_layers=5"),
        ({"model_type": "other"}, LSA, "model_type='tiny'"),
        ({"head_dim": 16}, LSA, "head_dim=8"),
        ({"vocab_size": None}, LSA, "vocab_size=100"),
        ({}, {"chunk_size": 32, "interval": 16}, "trained for chunk_size=16, but the LSAConfig has chunk_size=32"),
        ({}, {"chunk_size": 16, "target_layers": [1, 2]}, r"reads target layers \[1, 3\], but the runtime taps layers \[1, 2\]"),
    ],
)
def test_check_compatible_names_the_first_difference(trained, signature_change, lsa, message):
    _, path = trained
    loaded = LSAIndexer.load(path)
    signature = {**SIGNATURE, **signature_change}
    with pytest.raises(ValueError, match=message):
        check_compatible(loaded, signature, lsa)


def test_check_compatible_target_layers_must_be_sparse(tmp_path):
    indexer = LSAIndexer(make_config())
    signature = {**SIGNATURE, "sparse_layers": [0, 1, 2]}
    indexer.save(tmp_path / "ix.safetensors", signature=signature, lsa=LSA)
    loaded = LSAIndexer.load(tmp_path / "ix.safetensors")
    with pytest.raises(ValueError, match=r"layers \[3\] are not sparsely attended"):
        check_compatible(loaded, signature, LSA)


def test_in_memory_indexer_is_checked_for_shape_and_layers_only():
    indexer = LSAIndexer.from_query_weights(make_config(), {1: torch.randn(HQ * D, HIDDEN), 3: torch.randn(HQ * D, HIDDEN)})
    check_compatible(indexer, SIGNATURE, LSA)
    with pytest.raises(ValueError, match="indexer <in-memory indexer> has q_heads=4, but this model has q_heads=8"):
        check_compatible(indexer, {**SIGNATURE, "q_heads": 8}, LSA)
    with pytest.raises(ValueError, match="this model has 3 layers"):
        check_compatible(indexer, {**SIGNATURE, "num_layers": 3, "sparse_layers": None}, LSA)
    with pytest.raises(ValueError, match="must give the chunk_size"):
        indexer.save("unused.safetensors", signature=SIGNATURE, lsa={"interval": 16})


def test_layer_groups_round_trip_and_nearest_groups():
    from lsa_rewrite.indexer import nearest_groups

    assert nearest_groups((7, 15, 22), range(30)) == (tuple(range(12)), tuple(range(12, 19)), tuple(range(19, 30)))
    assert nearest_groups((2, 0), [0, 1, 2, 3]) == ((2, 3), (0, 1))  # a tie (layer 1) goes to the earlier target layer
    with pytest.raises(ValueError, match="nearest to none of the layers"):
        nearest_groups((0, 9), [0, 1])
    cfg = make_config(ensemble="group", layer_groups=[[3, 0], [1, 2]])
    assert cfg.layer_groups == ((0, 3), (1, 2)) and cfg.per_layer
    assert [cfg.target_of(layer) for layer in range(5)] == [0, 1, 1, 0, None]
    assert IndexerConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    plain = make_config()
    assert "layer_groups" not in plain.to_dict()["_data"] and plain.target_of(9) == 0  # files without groups stay as they were


def test_group_ensemble_keeps_one_probability_row_per_target_layer():
    indexer = LSAIndexer.random_init(make_config(), generator=torch.Generator().manual_seed(4))
    grouped = LSAIndexer(make_config(ensemble="group", layer_groups=((0, 1), (2, 3))))
    grouped.load_state_dict(indexer.state_dict())
    x, cos, sin, kmin, kmax = random_inputs()
    probs = grouped(x, cos, sin, kmin, kmax)
    assert probs.shape == (3, 2, 7)
    torch.testing.assert_close(probs, torch.sigmoid(indexer.logits(x, cos, sin, kmin, kmax)))
    torch.testing.assert_close(probs.amax(1), indexer(x, cos, sin, kmin, kmax))


def test_group_shared_ranking_is_the_union_of_the_shared_top_and_each_rows_own():
    """Each row's top ``k`` under ``share_ranking``: the top ``ceil(share * k)`` selectable chunks of the max
    over rows, then the row's own best among the rest (hand-computed per row, fresh random logits)."""
    from lsa_rewrite.indexer.model import share_ranking

    g = torch.Generator().manual_seed(11)
    for trial in range(20):
        b, lt, n = 2, 3, 12
        logits = torch.randn(b, lt, n, generator=g) * 3
        selectable = torch.rand(b, n, generator=g) > 0.25
        logits[:, :, -2:] = -torch.inf  # unwritten chunks
        selectable[:, -2:] = False
        k, share = int(torch.randint(1, 8, (1,), generator=g)), [0.25, 0.5, 1.0][trial % 3]
        out = share_ranking(logits, share, slots=torch.tensor(k), selectable=selectable)
        m = math.ceil(share * k)
        for i in range(b):
            shared = logits[i].amax(0).masked_fill(~selectable[i], -torch.inf)
            first = [c for c in shared.argsort(descending=True, stable=True).tolist() if selectable[i, c]][:m]
            for row in range(lt):
                own = logits[i, row].masked_fill(~selectable[i], -torch.inf)
                rest = [c for c in own.argsort(descending=True, stable=True).tolist() if selectable[i, c] and c not in first]
                want = set(first + rest[: k - len(first)])
                got = out[i, row].masked_fill(~selectable[i], -torch.inf).topk(len(want)).indices.tolist()
                assert set(got) == want, (trial, i, row)
        changed = (out != logits).sum(-1)  # only the picked chunks move; the others keep their logits
        assert int(changed.max()) <= m
    # share 1: every row the same set, the shared ranking's top k
    out = share_ranking(logits, 1.0, slots=4, selectable=selectable)
    sets = [set(out[0, r].masked_fill(~selectable[0], -torch.inf).topk(4).indices.tolist()) for r in range(3)]
    assert sets[0] == sets[1] == sets[2]


def test_group_shared_config_is_checked_saved_and_applied_only_to_groups():
    groups = dict(ensemble="group", layer_groups=((0, 1), (2, 3)))
    cfg = make_config(group_shared=0.5, **groups)
    assert IndexerConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert "group_shared" not in make_config(**groups).to_dict()["_data"]  # 0: files stay as lsa-rewrite wrote them before
    with pytest.raises(ValueError, match="group_shared=0.5 needs ensemble='group'"):
        make_config(group_shared=0.5)
    with pytest.raises(ValueError, match=r"group_shared must be a share of the free slots in \[0, 1\], got 1.5"):
        make_config(group_shared=1.5, **groups)
    logits = torch.randn(2, 3, 7)
    keep = torch.ones(2, 7, dtype=torch.bool)
    plain = LSAIndexer(make_config(**groups))
    assert plain.share_slots(logits, slots=3, selectable=keep) is logits  # off: unchanged
    shared = LSAIndexer(cfg)
    assert shared.share_slots(logits, slots=None, selectable=keep) is logits  # slots unknown: unchanged
    assert not torch.equal(shared.share_slots(logits, slots=3, selectable=keep), logits)


def test_shared_rows_rank_the_shared_slots_alone():
    """``share_ranking(rows=...)``: the shared picks are the top of the max over the given rows only
    (hand-computed on fresh random logits); the other rows still rank their own rest."""
    from lsa_rewrite.indexer.model import share_ranking

    g = torch.Generator().manual_seed(12)
    for trial in range(12):
        logits = torch.randn(2, 4, 10, generator=g) * 3
        selectable = torch.rand(2, 10, generator=g) > 0.2
        k, share, rows = 5, [0.4, 0.6, 1.0][trial % 3], [[1, 3], [0], [2, 3]][trial % 3]
        out = share_ranking(logits, share, slots=k, selectable=selectable, rows=rows)
        m = math.ceil(share * k)
        for i in range(2):
            shared = logits[i, rows].amax(0).masked_fill(~selectable[i], -torch.inf)
            first = [c for c in shared.argsort(descending=True, stable=True).tolist() if selectable[i, c]][:m]
            for row in range(4):
                own = logits[i, row].masked_fill(~selectable[i], -torch.inf)
                rest = [c for c in own.argsort(descending=True, stable=True).tolist() if selectable[i, c] and c not in first]
                want = set(first + rest[: k - len(first)])
                got = out[i, row].masked_fill(~selectable[i], -torch.inf).topk(len(want)).indices.tolist()
                assert set(got) == want, (trial, i, row)


def test_shared_layers_config_is_checked_and_round_trips():
    cfg = make_config(target_layers=(1, 3, 5), ensemble="group", layer_groups=((0, 1, 2), (), (3, 4, 5)), group_shared=0.25, shared_layers=[3])
    assert cfg.shared_layers == (3,) and cfg.target_of(3) == 2 and cfg.target_of(1) == 0
    assert IndexerConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert "shared_layers" not in make_config(ensemble="group", layer_groups=((0, 1), (2, 3)), group_shared=0.5).to_dict()["_data"]
    assert LSAIndexer(cfg).shared_rows == [1]
    with pytest.raises(ValueError, match="only a target layer of shared_layers may have an empty one"):
        make_config(ensemble="group", layer_groups=((0, 1), ()), group_shared=0.5)
    with pytest.raises(ValueError, match=r"\[7\] are not in target_layers"):
        make_config(ensemble="group", layer_groups=((0, 1), (2, 3)), group_shared=0.5, shared_layers=(7,))
    with pytest.raises(ValueError, match="needs group_shared > 0"):
        make_config(ensemble="group", layer_groups=((0, 1), (2, 3)), shared_layers=(1,))
    with pytest.raises(ValueError, match="are all empty"):
        make_config(ensemble="group", layer_groups=((), ()), group_shared=0.5, shared_layers=(1, 3))


def _merge_pair(seed: int = 21, **shared_overrides):
    from lsa_rewrite.indexer.model import nearest_groups

    g = torch.Generator().manual_seed(seed)
    common = dict(neighbour_margin=0.5, neighbour_top=1)
    shared = LSAIndexer.random_init(make_config(**{"target_layers": (2, 5), **common, **shared_overrides}), generator=g)
    groups_cfg = make_config(target_layers=(1, 4), ensemble="group", layer_groups=nearest_groups((1, 4), range(6)), **common)
    groups = LSAIndexer.random_init(groups_cfg, generator=g)
    for indexer in (shared, groups):
        indexer.signature, indexer.lsa = {"model_type": "llama", "num_layers": 6}, {"chunk_size": 16, "interval": 16}
    return shared, groups


def test_merged_indexer_ranks_each_group_by_the_shared_files_top_then_its_own(tmp_path):
    """``merge_indexers``: the weights of both files unchanged, and each layer group's top-k equals the top
    ``ceil(share * k)`` of the max indexer's own ranking (span rule included) plus the group indexer's rest,
    each file scored alone on fresh random inputs."""
    from lsa_rewrite.indexer.model import merge_indexers

    shared, groups = _merge_pair()
    merged = merge_indexers(shared, groups, share=0.5)
    cfg = merged.config
    assert cfg.target_layers == (1, 2, 4, 5) and cfg.shared_layers == (2, 5) and cfg.group_shared == 0.5
    assert cfg.layer_groups == (groups.config.layer_groups[0], (), groups.config.layer_groups[1], ())
    path = merged.save(tmp_path / "merged.safetensors", signature=merged.signature, lsa=merged.lsa, metrics=merged.metrics)
    loaded = LSAIndexer.load(path)
    assert loaded.config == cfg and loaded.signature == shared.signature and set(loaded.metrics["merged_from"]) == {"shared", "groups"}

    def inputs(indexer, seed):
        x, cos, sin, kmin, kmax = random_inputs(batch=2, chunks=12, seed=seed)
        lt = len(indexer.config.target_layers)
        return x[:, :1].expand(-1, lt, -1), cos, sin, kmin[:, :1].expand(-1, lt, -1, -1, -1), kmax[:, :1].expand(-1, lt, -1, -1, -1)

    for seed in range(5):
        # one hidden state and chunk index for every target layer (what the model would tap differs per
        # layer, but the arithmetic is per layer, so one shared input tests the bookkeeping)
        x, cos, sin, kmin, kmax = inputs(loaded, seed)
        keep = torch.ones(2, 12, dtype=torch.bool)
        k = 6
        rows = loaded.share_slots(loaded.spread(loaded.logits(x, cos, sin, kmin, kmax), slots=k, lenders=keep[:, None]), slots=k, selectable=keep)
        a_logits = shared.spread(shared.logits(*inputs(shared, seed)), slots=k, lenders=keep[:, None]).amax(1)  # [B, N]
        b_logits = groups.spread(groups.logits(*inputs(groups, seed)), slots=k, lenders=keep[:, None])  # [B, 2, N]
        m = math.ceil(0.5 * k)
        for i in range(2):
            first = a_logits[i].argsort(descending=True, stable=True)[:m].tolist()
            for row, group_row in ((0, 0), (2, 1)):
                own = b_logits[i, group_row].clone()
                own[first] = -torch.inf
                want = set(first) | set(own.topk(k - m).indices.tolist())
                assert set(rows[i, row].topk(k).indices.tolist()) == want, (seed, i, row)


def test_merge_refuses_what_cannot_be_one_indexer():
    from lsa_rewrite.indexer.model import merge_indexers

    shared, groups = _merge_pair()
    with pytest.raises(ValueError, match="must rank with ensemble='max'"):
        merge_indexers(groups, groups, share=0.5)
    with pytest.raises(ValueError, match="must have ensemble='group'"):
        merge_indexers(shared, shared, share=0.5)
    with pytest.raises(ValueError, match=r"share must be in \(0, 1\]"):
        merge_indexers(shared, groups, share=0.0)
    other_rank, _ = _merge_pair(rank=8)
    with pytest.raises(ValueError, match=r"rank differs \(8 against 16\)"):
        merge_indexers(other_rank, groups, share=0.5)
    overlapping, _ = _merge_pair(target_layers=(1, 5))
    with pytest.raises(ValueError, match=r"both read target layers \[1\]"):
        merge_indexers(overlapping, groups, share=0.5)
    shared.lsa = {"chunk_size": 32, "interval": 16}
    with pytest.raises(ValueError, match="another chunk_size"):
        merge_indexers(shared, groups, share=0.5)
