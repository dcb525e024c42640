"""The indexer in the runtime: taps in the rewritten graph, the indexer selector, convert(indexer=...)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import lsa_rewrite
from lsa_rewrite import LSAConfig
from lsa_rewrite.indexer import LSAIndexer
from lsa_rewrite.indexer.calibrate import sparse_layers
from lsa_rewrite.indexer.from_model import indexer_from_model
from lsa_rewrite.selectors import IndexerSelector, QueryAwareSelector
from planted import planted_config, planted_model
from helpers import no_eos
from zoo import HF_FAMILIES, make_model

PROMPT = 200


def _ids(batch=1, length=PROMPT, seed=0):
    return torch.randint(3, 250, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_indexer_selector_at_a_covering_budget_is_dense(family):
    """Dense exactness with selector='indexer' (taps spliced into the graph) for every zoo family
    (a family whose layers all slide, like the zoo's mistral, has nothing to select, and that is said)."""
    base = make_model(family).eval()
    config = LSAConfig(mode="dense", chunk_size=16, interval=16, selector="indexer")
    if not sparse_layers(base):  # every layer a sliding window (the zoo's mistral, ministral)
        with pytest.raises(ValueError, match="no sparsely attended layer"):
            indexer_from_model(base, config)
        return
    converted = lsa_rewrite.convert(copy.deepcopy(base), config, indexer=indexer_from_model(base, config))
    ids = _ids()
    want = base.generate(ids, max_new_tokens=24, do_sample=False, output_logits=True, return_dict_in_generate=True)
    got = converted.generate(ids, max_new_tokens=24, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(want.sequences, got.sequences)
    diff = max(float((a - b).abs().max()) for a, b in zip(want.logits, got.logits))
    assert diff <= 1e-4


def test_mixed_rotary_layers_convert_with_a_per_layer_rope_indexer():
    """SmolLM3 (every second layer without rotary): the indexer built from the model rotates at layer 0
    only, converts with selector='indexer', and decodes the dense tokens and logits at a covering budget."""
    base = no_eos(make_model("smollm3").eval())
    # a covering budget in a store for twice the context: selections run while every chunk still fits
    common = dict(chunk_size=16, interval=16, sink_tokens=16, recent_tokens=16, selector="indexer")
    config = LSAConfig(budget=120 + 20 + 16, max_context=2 * (120 + 20), **common)
    indexer = indexer_from_model(base, config)
    assert indexer.config.target_layers == (0, 1) and indexer.config.rope == (True, False)
    converted = lsa_rewrite.convert(copy.deepcopy(base), config, indexer=indexer)
    ids = _ids(length=120)
    want = base.generate(ids, max_new_tokens=20, do_sample=False, output_logits=True, return_dict_in_generate=True)
    got = converted.generate(ids, max_new_tokens=20, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert not converted.lsa.store.all_resident and converted.lsa.store.selections > 0
    assert torch.equal(want.sequences, got.sequences)
    assert max(float((a - b).abs().max()) for a, b in zip(want.logits, got.logits)) <= 1e-4
    # An indexer whose rotary flag differs from the model's at a target layer is refused, naming the layer.
    wrong = LSAIndexer(dataclasses.replace(indexer.config, rope=(True, True)))
    with pytest.raises(ValueError, match="rope=True at target layer 1 .* does not apply rotary embeddings to queries at layer 1"):
        lsa_rewrite.convert(copy.deepcopy(base), config, indexer=wrong)
    wrong = LSAIndexer(dataclasses.replace(indexer.config, rope=(False, False)))
    with pytest.raises(ValueError, match="rope=False at target layer 0 .* applies rotary embeddings to queries at layer 0"):
        lsa_rewrite.convert(copy.deepcopy(base), config, indexer=wrong)


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
def test_taps_hold_the_query_projection_input_and_rotary(family):
    """After a decode step, idx_x is what the layer's query projection saw for the last token, and
    idx_cos/idx_sin rotate the model's own (pre-rotary) query into the query the attention used."""
    base = make_model(family).eval()
    config = LSAConfig(mode="dense", chunk_size=16, interval=16, selector="indexer")
    indexer = indexer_from_model(base, config, target_layers=[1])
    converted = lsa_rewrite.convert(copy.deepcopy(base), config, indexer=indexer)
    ids = _ids(length=40)
    out = converted.generate(ids, max_new_tokens=3, do_sample=False)
    layer = converted.lsa.store.layers[1]
    seen = {}
    module = dict(base.named_modules())[indexer_weight_module(converted, 1)]
    def record(_module, args):
        seen["x"] = args[0].reshape(1, out.shape[1] - 1, -1)[:, -1].clone()

    hook = module.register_forward_pre_hook(record)
    with torch.no_grad():
        base(out[:, :-1])  # the last decode step ran on token out[:, -2] at position len - 2
    hook.remove()
    torch.testing.assert_close(layer.idx_x, seen["x"], atol=1e-5, rtol=1e-5)
    if indexer.config.rope:
        assert not torch.all(layer.idx_sin == 0), "rotary sin of a position > 0 is not zero"
        torch.testing.assert_close(layer.idx_cos.pow(2) + layer.idx_sin.pow(2), torch.ones_like(layer.idx_cos), atol=1e-5, rtol=1e-5)
    else:
        assert torch.all(layer.idx_cos == 1) and torch.all(layer.idx_sin == 0)


def indexer_weight_module(converted, layer: int) -> str:
    site = next(s for s in converted.lsa.sites if s.layer == layer)
    return site.indexer.weight.rpartition(".")[0]


def test_untrained_indexer_keeps_the_planted_needles():
    """Initialised from the model's query projection, the indexer finds the chunks the question needs."""
    planted = planted_model(batch=2)
    config = planted_config(selector="indexer", interval=8)
    indexer = indexer_from_model(planted.model, config)
    converted = lsa_rewrite.convert(planted.model, config, indexer=indexer)
    out = converted.generate(planted.input_ids, max_new_tokens=24, do_sample=False)
    new = out[:, planted.input_ids.shape[1]:]
    assert converted.lsa.store.selections >= 3
    for row, answer in enumerate(planted.answers):
        assert torch.all(new[row] == answer), f"sequence {row} lost its needles: {new[row].tolist()}"
        resident = {c for c in converted.lsa.store.layers[0].host_slot_chunk[row] if c >= 0}
        assert set(planted.needle_chunks[row]) <= resident


# One family per rotary form: rotate-half (llama), interleaved over the leading channels in GPT-J's
# [B, S, H, D] layout (gptj), partial interleaved with cos/sin repeated per pair (glm).
@pytest.mark.parametrize("family", ["llama", "gptj", "glm"])
def test_untrained_indexer_ranks_chunks_like_query_aware(family):
    """On a random model after a real prefill, the untrained indexer's chunk ranking agrees with the
    query-aware bound's far better than chance (Spearman); a random indexer's does not."""
    base = make_model(family).eval()
    config = LSAConfig(budget=96, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=16, selector="indexer")
    indexer = indexer_from_model(base, config, target_layers=[0], rank=64)
    converted = lsa_rewrite.convert(base, config, indexer=indexer)
    converted.generate(_ids(length=480, seed=3), max_new_tokens=2, do_sample=False)
    store = converted.lsa.store
    window = store.policy.window(store.length)
    written = window.written_chunks
    layers = [store.layers[0]]

    def rank(x):
        return x.argsort().argsort().float()

    def spearman(a, b):
        ra, rb = rank(a), rank(b)
        ra, rb = ra - ra.mean(), rb - rb.mean()
        return float((ra * rb).sum() / (ra.norm() * rb.norm()))

    reference = QueryAwareSelector().scores(layers, window)[0, 0, :written]
    ours = IndexerSelector(indexer).scores(layers, window)[0, 0, :written]
    noise = LSAIndexer.random_init(indexer.config, generator=torch.Generator().manual_seed(0))
    rand = IndexerSelector(noise).scores(layers, window)[0, 0, :written]
    assert spearman(ours, reference) >= 0.5
    assert spearman(ours, reference) > spearman(rand, reference) + 0.3


def test_indexer_refusals(tmp_path):
    base = make_model("llama").eval()
    config = LSAConfig(chunk_size=16, interval=16, selector="indexer")
    with pytest.raises(ValueError, match="needs a trained indexer"):
        lsa_rewrite.convert(copy.deepcopy(base), config)
    indexer = indexer_from_model(base, config)
    with pytest.raises(ValueError, match="selector='indexer'"):
        lsa_rewrite.convert(copy.deepcopy(base), LSAConfig(chunk_size=16), indexer=indexer)
    path = indexer.save(tmp_path / "idx.safetensors", signature=indexer.signature, lsa=config.to_dict())
    with pytest.raises(ValueError, match="chunk_size=16.*chunk_size=32"):
        lsa_rewrite.convert(copy.deepcopy(base), LSAConfig(chunk_size=32, interval=16, selector="indexer"), indexer=path)
    other = make_model("qwen2").eval()
    with pytest.raises(ValueError, match="trained for a model with"):
        lsa_rewrite.convert(other, config, indexer=path)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        lsa_rewrite.convert(copy.deepcopy(base), config, indexer=tmp_path / "nope.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        lsa_rewrite.convert(copy.deepcopy(base), config, indexer=tmp_path / "bad.safetensors")
    untouched = copy.deepcopy(base)
    lsa_rewrite.convert(untouched, config, indexer=path)  # the saved indexer loads and converts
    assert untouched.lsa.indexer is not None


def test_indexer_target_layer_must_be_sparse():
    base = make_model("gemma3").eval()
    with pytest.raises(ValueError, match="not a sparsely attended layer"):
        indexer_from_model(base, LSAConfig(chunk_size=16), target_layers=[0])


# -- the indexer's span rule at selection time (IndexerConfig.neighbour_margin) --


def _with_rules(indexer, **rules):
    """The same weights under other scoring rules."""
    import dataclasses

    other = LSAIndexer(dataclasses.replace(indexer.config, **rules))
    other.load_state_dict(indexer.state_dict())
    other.signature, other.lsa, other.metrics, other.source = indexer.signature, indexer.lsa, indexer.metrics, indexer.source
    return other


def _fake_layers(indexer, *, seed, chunks=12):
    """Per-layer state a selector reads (batch 2), random but fixed by ``seed``."""
    from types import SimpleNamespace

    cfg = indexer.config
    g = torch.Generator().manual_seed(seed)
    out = []
    for layer in cfg.target_layers:
        centre = torch.randn(2, chunks, cfg.kv_heads, cfg.head_dim, generator=g)
        half = torch.rand(2, chunks, cfg.kv_heads, cfg.head_dim, generator=g)
        angle = torch.rand(2, cfg.head_dim // 2, generator=g).repeat(1, 2)
        out.append(SimpleNamespace(
            spec=SimpleNamespace(layer=layer), kmin=centre - half, kmax=centre + half,
            idx_x=torch.randn(2, cfg.hidden_size, generator=g), idx_cos=angle.cos(), idx_sin=angle.sin(),
        ))
    return out


def _window(start, slots=None):
    from lsa_rewrite.selectors import SelectionWindow

    return SelectionWindow(start=start, interval=16, lag=0, chunk_size=16, valid_start=(0, 0), slots=slots)


@pytest.fixture(scope="module")
def llama_indexer():
    base = make_model("llama").eval()
    return indexer_from_model(base, LSAConfig(chunk_size=16, interval=16, selector="indexer"), target_layers=[0, 1])


def test_selection_window_selectable_chunks():
    import dataclasses

    from lsa_rewrite.selectors import SelectionWindow

    window = SelectionWindow(start=160, interval=16, lag=0, chunk_size=16, valid_start=(0, 40), sink_tokens=16, recent_tokens=32)
    sel = window.selectable(12)
    # sequence 0: sink chunk 0, tail chunks 8-9 (positions 128-159), chunks 10-11 unwritten
    assert sel[0].tolist() == [False] + [True] * 7 + [False] * 4
    # sequence 1 starts at 40: chunks 0-1 are left padding only, its sink is chunks 2-3 (positions 40-55)
    assert sel[1].tolist() == [False] * 4 + [True] * 4 + [False] * 4
    assert window.free_slots is None
    # 12 slots: sink 0 (2-3 for sequence 1), tail 8-9, the window's chunk 10 -> 8 free (7 for sequence 1)
    assert dataclasses.replace(window, slots=12).free_slots == 7


def test_span_rule_in_the_selector_follows_the_slots_and_selectable_lenders(llama_indexer):
    from lsa_rewrite.indexer.model import spread_neighbours

    layers = _fake_layers(llama_indexer, seed=3)
    ruled = IndexerSelector(_with_rules(llama_indexer, neighbour_margin=0.2, neighbour_min_free=4))
    plain = IndexerSelector(llama_indexer)
    window = _window(160, slots=8)
    raw = plain.scores(layers, window)[0][:, :10]
    lenders = window.selectable(10)
    # per target layer, then the max ensemble: the same as the rule over the ensembled logits
    want = spread_neighbours(raw, 0.2, lenders=lenders)
    torch.testing.assert_close(ruled.scores(layers, window)[0][:, :10], want)
    assert window.free_slots == 6  # 8 slots, less chunk 9 (the last token's) and chunk 10 (the window's)
    torch.testing.assert_close(ruled.scores(layers, _window(160, slots=5))[0][:, :10], raw)  # 3 free slots: off
    assert not torch.allclose(want, raw)
    full = ruled.scores(layers, window)[0]
    assert torch.all(full[:, 10:] == -torch.inf)  # chunks not written yet (window start 160) score nothing


def test_sink_and_tail_lend_no_score():
    from lsa_rewrite.indexer.model import spread_neighbours

    z = torch.tensor([9.0, 0.0, 0.0, 5.0, 0.0, 0.0, 8.0])  # chunk 0: sink, chunk 6: tail
    lenders = torch.tensor([False, True, True, True, True, True, False])
    torch.testing.assert_close(spread_neighbours(z, 1.0, lenders=lenders), torch.tensor([9.0, 0.0, 4.0, 5.0, 4.0, 0.0, 8.0]))
    torch.testing.assert_close(spread_neighbours(z, 1.0), torch.tensor([9.0, 8.0, 4.0, 5.0, 4.0, 7.0, 8.0]))


def test_span_rule_keeps_dense_exactness():
    """At a covering budget the span rule changes nothing."""
    base = make_model("llama").eval()
    config = LSAConfig(budget=512, chunk_size=16, interval=16, selector="indexer")  # covering: 200 + 24 tokens
    indexer = _with_rules(indexer_from_model(base, config), neighbour_margin=0.1)
    converted = lsa_rewrite.convert(copy.deepcopy(base), config, indexer=indexer)
    ids = _ids()
    want = base.generate(ids, max_new_tokens=24, do_sample=False)
    assert torch.equal(converted.generate(ids, max_new_tokens=24, do_sample=False), want)


@pytest.mark.parametrize(
    "family, style, rotary",
    [("llama", "half", 16), ("gpt_neox", "half", 4), ("glm", "interleaved", 8), ("gptj", "interleaved", 8),
     ("codegen", "interleaved", 8), ("helium", "interleaved", 16), ("smollm3", "half", 16)],
)
def test_untrained_indexer_reproduces_the_model_query(family, style, rotary):
    """The taps recognise each rotary form (style and rotated width): at full rank the untrained indexer's
    query from the tapped input and cos/sin is the model's own post-rotary query up to a positive scale."""
    base = make_model(family).eval()
    config = LSAConfig(mode="dense", chunk_size=16, interval=16, selector="indexer")
    indexer = indexer_from_model(base, config, rank=64)
    converted = lsa_rewrite.convert(base, config, indexer=indexer)
    converted.generate(_ids(length=40), max_new_tokens=2, do_sample=False)
    cfg = indexer.config
    assert cfg.rope_style == style
    for i, target in enumerate(cfg.target_layers):
        layer, rope = converted.lsa.store.layers[target], cfg.layer_rope(i)
        tap = next(s for s in converted.lsa.sites if s.layer == target).indexer
        assert tap.rotary == (rotary if rope else 0) and (not rope or tap.style == style)
        with torch.no_grad():
            q, _ = indexer.query(i, layer.idx_x, layer.idx_cos if rope else None, layer.idx_sin if rope else None)
        similarity = torch.nn.functional.cosine_similarity(q.flatten(1), layer.q_tap.float().flatten(1))
        assert float(similarity.min()) > 0.999, (target, similarity)


@pytest.mark.parametrize("rope, style", [("halves", "half"), ("gpt-fast", "interleaved")])
def test_plain_decoder_rotary_forms_reproduce_the_query(monkeypatch, rope, style):
    """A plain decoder's rotation written on the two halves (cat of x1 cos - x2 sin and x2 cos + x1 sin, the
    buffer decoder's own) or on channel pairs (gpt-fast's stack) is recognised: its [T, D/2] table at one position,
    shared by a batch of 2, is tapped as [B, D] cos/sin, and the untrained indexer's query is the model's own
    post-rotary query; decoding with the indexer equals dense."""
    import buffer_decoder
    from helpers import buffer_greedy

    if rope == "gpt-fast":
        monkeypatch.setattr(buffer_decoder, "apply_rope", buffer_decoder.gpt_fast_rope)
    base = make_model("buffer")
    base.setup_caches(max_batch_size=2, max_seq_length=96)
    config = LSAConfig(mode="dense", chunk_size=16, interval=16, selector="indexer")
    indexer = indexer_from_model(base, config, rank=64)
    assert indexer.config.rope_style == style and all(indexer.config.layer_rope(i) for i in range(len(indexer.config.target_layers)))
    ids = torch.randint(3, 250, (2, 40), generator=torch.Generator().manual_seed(3))
    dense = buffer_greedy(base, ids, 4)
    converted = lsa_rewrite.convert(copy.deepcopy(base), config, indexer=indexer)
    got = buffer_greedy(converted, ids, 4)
    assert torch.equal(got[0], dense[0]) and float((got[1] - dense[1]).abs().max()) <= 1e-4
    for i, target in enumerate(indexer.config.target_layers):
        layer = converted.lsa.store.layers[target]
        tap = next(s for s in converted.lsa.sites if s.layer == target).indexer
        assert tap.rotary == 16 and tap.style == style and tuple(layer.idx_cos.shape) == (2, 16)
        torch.testing.assert_close(layer.idx_cos.pow(2) + layer.idx_sin.pow(2), torch.ones_like(layer.idx_cos), atol=1e-5, rtol=1e-5)
        assert torch.equal(layer.idx_cos[0], layer.idx_cos[1]) and not torch.all(layer.idx_sin == 0)
        with torch.no_grad():
            q, _ = indexer.query(i, layer.idx_x, layer.idx_cos, layer.idx_sin)
        similarity = torch.nn.functional.cosine_similarity(q.flatten(1), layer.q_tap.float().flatten(1))
        assert float(similarity.min()) > 0.999, (target, similarity)


def test_unrecognised_rotary_refuses_the_indexer_path_only(monkeypatch):
    """A rotary form the taps do not know is refused by name on the indexer path (not approximated); the
    default selector still converts the model."""
    import lsa_rewrite.passes.indexer_taps as taps

    base = make_model("gptj").eval()
    config = LSAConfig(mode="dense", chunk_size=16, interval=16, selector="indexer")
    monkeypatch.setattr(taps, "_rotation", lambda r: {"half": torch.zeros(r)})  # a form matching no input
    with pytest.raises(Exception, match="layer 0: the query is multiplied by a position-dependent tensor .* not a rotary embedding"):
        indexer_from_model(base, config)
    monkeypatch.undo()
    converted = lsa_rewrite.convert(copy.deepcopy(base), LSAConfig(mode="dense", chunk_size=16, interval=16))
    ids = _ids(length=40)
    assert torch.equal(converted.generate(ids, max_new_tokens=4, do_sample=False), base.generate(ids, max_new_tokens=4, do_sample=False))



# -- per-layer-group resident sets (IndexerConfig.ensemble="group") --


def _grouped(indexer, groups=None):
    from lsa_rewrite.indexer import nearest_groups

    layers = indexer.signature.get("sparse_layers") or list(indexer.config.target_layers)
    return _with_rules(indexer, ensemble="group", layer_groups=groups or nearest_groups(indexer.config.target_layers, layers))


def test_group_selector_ranks_each_layer_by_its_groups_target_layer(llama_indexer):
    grouped = _grouped(llama_indexer)
    assert grouped.config.layer_groups == ((0,), (1,))
    layers = _fake_layers(grouped, seed=5)
    selector = IndexerSelector(grouped)
    window = _window(160, slots=8)
    per_target = selector.target_scores(layers, window)  # [Lt, B, N]
    scores = selector.scores(layers[::-1], window)  # rows follow the order of the layers given
    torch.testing.assert_close(scores, per_target.flip(0))
    assert not torch.equal(per_target[0], per_target[1])
    # each row is the target layer's own logit (no ensemble): the max ensemble of that layer alone
    alone = IndexerSelector(llama_indexer).target_scores(layers, window)
    torch.testing.assert_close(per_target, alone)
    assert selector.threshold_score == IndexerSelector(llama_indexer).threshold_score  # a logit, as under max
    narrow = _grouped(llama_indexer, groups=((0,), (5,)))
    with pytest.raises(ValueError, match=r"layers \[1\] are in none of them"):
        IndexerSelector(narrow).scores(layers, window)


def test_group_indexer_converts_dense_exact_and_keeps_per_group_resident_sets():
    """At a covering budget the group indexer decodes the dense tokens; at a small one the two layer
    groups keep resident sets of their own (each its target layer's choice), and an indexer whose groups
    leave a sparse layer out is refused at convert()."""
    base = make_model("llama").eval()
    common = dict(chunk_size=16, interval=16, sink_tokens=16, recent_tokens=16, selector="indexer")
    indexer = _grouped(indexer_from_model(base, LSAConfig(**common), target_layers=[0, 1]))
    ids = _ids(length=480, seed=4)
    covering = lsa_rewrite.convert(copy.deepcopy(base), LSAConfig(budget=1024, **common), indexer=indexer)
    want = base.generate(ids, max_new_tokens=20, do_sample=False, output_logits=True, return_dict_in_generate=True)
    got = covering.generate(ids, max_new_tokens=20, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(want.sequences, got.sequences)
    assert max(float((a - b).abs().max()) for a, b in zip(want.logits, got.logits)) <= 1e-4
    small = lsa_rewrite.convert(copy.deepcopy(base), LSAConfig(budget=96, **common), indexer=indexer)
    small.generate(ids, max_new_tokens=2, do_sample=False)
    store = small.lsa.store
    assert store.selections > 0
    resident = [{c for c in layer.host_slot_chunk[0] if c >= 0} for layer in store.chunk_layers]
    assert resident[0] != resident[1]
    # a selection now: each layer keeps its own target layer's top chunks beside the must-keep ones
    policy, pos = store.policy, store.length
    window = policy.window(pos)
    per_target = IndexerSelector(indexer).target_scores(store.chunk_layers, window)[:, 0]  # [2, N]
    available = torch.ones(len(resident), 1, policy.num_chunks, dtype=torch.bool)
    ids = policy.choose(store.chunk_layers, available, pos)[:, 0]  # [L, k]
    must = set(policy.must_keep(0, pos))
    for i in range(len(resident)):
        chosen = {c for c in ids[i].tolist() if c >= 0} - must
        top = per_target[i].masked_fill(~window.selectable(policy.num_chunks)[0], -torch.inf).topk(len(chosen)).indices
        assert chosen and chosen == set(top.tolist())
    assert {c for c in ids[0].tolist()} != {c for c in ids[1].tolist()}
    with pytest.raises(ValueError, match=r"sparse layers \[1\] of this model are in none of them"):
        lsa_rewrite.convert(copy.deepcopy(base), LSAConfig(budget=96, **common), indexer=_grouped(indexer, groups=((0,), (7,))))


def _dense_then_half_shared(base, common, indexer):
    """Convert ``base`` with ``indexer``: at a covering budget it must decode dense's tokens; at budget 128
    it decodes two tokens. Returns the small store, its window now, the selectable chunks and
    ``ceil(0.5 * free)``, the shared picks of ``group_shared=0.5`` (checked strictly between 0 and the free slots)."""
    import math

    ids = _ids(length=480, seed=4)
    covering = lsa_rewrite.convert(copy.deepcopy(base), LSAConfig(budget=1024, **common), indexer=indexer)
    assert torch.equal(covering.generate(ids, max_new_tokens=8, do_sample=False), base.generate(ids, max_new_tokens=8, do_sample=False))
    small = lsa_rewrite.convert(copy.deepcopy(base), LSAConfig(budget=128, **common), indexer=indexer)
    small.generate(ids, max_new_tokens=2, do_sample=False)
    store = small.lsa.store
    window = store.policy.window(store.length)
    free = window.free_slots
    m = math.ceil(0.5 * free)
    assert 0 < m < free
    return store, window, window.selectable(store.policy.num_chunks)[0], m


def test_group_shared_selection_keeps_the_shared_top_then_each_groups_own():
    """With ``group_shared=0.5`` every layer's resident set (a real selection of a converted model) holds
    the top half of the free slots by the shared ranking (the max over target layers), the rest by its
    own group's; the sets still differ per group, and at a covering budget the tokens are dense's."""
    base = make_model("llama").eval()
    common = dict(chunk_size=16, interval=16, sink_tokens=16, recent_tokens=16, selector="indexer")
    indexer = _with_rules(_grouped(indexer_from_model(base, LSAConfig(**common), target_layers=[0, 1])), group_shared=0.5)
    store, window, selectable, m = _dense_then_half_shared(base, common, indexer)
    policy, pos = store.policy, store.length
    plain = IndexerSelector(_with_rules(indexer, group_shared=0.0)).target_scores(store.chunk_layers, window)[:, 0]  # [2, N]
    shared = plain.amax(0).masked_fill(~selectable, -torch.inf)
    first = set(shared.topk(m).indices.tolist())
    available = torch.ones(2, 1, policy.num_chunks, dtype=torch.bool)
    chosen_ids = policy.choose(store.chunk_layers, available, pos)[:, 0]
    must = set(policy.must_keep(0, pos))
    sets = []
    for i in range(2):
        chosen = {c for c in chosen_ids[i].tolist() if c >= 0} - must
        own = plain[i].masked_fill(~selectable, -torch.inf)
        own[list(first)] = -torch.inf
        want = first | set(own.topk(len(chosen) - m).indices.tolist())
        assert chosen == want, i
        sets.append(chosen)
    assert sets[0] != sets[1]


def test_merged_indexer_converts_dense_exact_and_selects_the_shared_files_top_first(tmp_path):
    """A merged indexer (``lsa-rewrite merge``: a max indexer on layer 0, a group indexer on layer 1 choosing
    for both layers) taps both target layers in a converted llama: at a covering budget it decodes
    dense's tokens; at a small one every layer's real resident set is the top half of its free slots
    by the max file's own ranking, then the group file's. The CLI writes the same indexer."""
    from typer.testing import CliRunner

    from lsa_rewrite.cli import app
    from lsa_rewrite.indexer.model import merge_indexers

    base = make_model("llama").eval()
    common = dict(chunk_size=16, interval=16, sink_tokens=16, recent_tokens=16, selector="indexer")
    shared = indexer_from_model(base, LSAConfig(**common), target_layers=[0])
    # the group file: layer 1's query tower, scaled so that its ranking is not the shared one's
    groups = _with_rules(indexer_from_model(base, LSAConfig(**common), target_layers=[1]), ensemble="group", layer_groups=((0, 1),))
    with torch.no_grad():
        groups.layers[0].centre_gain.mul_(torch.linspace(-1.0, 1.0, groups.layers[0].centre_gain.numel()).view_as(groups.layers[0].centre_gain))
    paths = [shared.save(tmp_path / "max.safetensors", signature=shared.signature, lsa=shared.lsa),
             groups.save(tmp_path / "groups.safetensors", signature=groups.signature, lsa=groups.lsa)]
    out = tmp_path / "merged.safetensors"
    result = CliRunner().invoke(app, ["merge", str(paths[0]), str(paths[1]), "--share", "0.5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    merged = LSAIndexer.load(out)
    assert merged.config == merge_indexers(shared, groups, share=0.5).config
    assert merged.config.target_layers == (0, 1) and merged.config.layer_groups == ((), (0, 1))
    refused = CliRunner().invoke(app, ["merge", str(paths[0]), str(paths[1]), "--share", "0.5", "--out", str(paths[1])])
    assert refused.exit_code != 0 and "would overwrite an input indexer" in refused.output

    store, window, selectable, m = _dense_then_half_shared(base, common, merged)
    policy, pos = store.policy, store.length
    a = IndexerSelector(shared).scores(store.chunk_layers, window)[0, 0].masked_fill(~selectable, -torch.inf)  # the max file alone
    b = IndexerSelector(groups).scores(store.chunk_layers, window)[0, 0].masked_fill(~selectable, -torch.inf)  # the group file alone
    first = set(a.topk(m).indices.tolist())
    chosen_ids = policy.choose(store.chunk_layers, torch.ones(2, 1, policy.num_chunks, dtype=torch.bool), pos)[:, 0]
    must = set(policy.must_keep(0, pos))
    for i in range(2):
        chosen = {c for c in chosen_ids[i].tolist() if c >= 0} - must
        rest = b.clone()
        rest[list(first)] = -torch.inf
        want = first | set(rest.topk(len(chosen) - m).indices.tolist())
        assert set(b.topk(len(chosen)).indices.tolist()) != want  # the shared slots change the group file's own choice
        assert chosen == want, i
