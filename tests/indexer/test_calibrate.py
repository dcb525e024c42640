"""Tests for lsa_rewrite.indexer.calibrate on tiny zoo models: the dump round-trips with the documented
fields and shapes; the recorded masses, key bounds, queries and rotary cos/sin equal a hand computation
from the weights and the eager attention probabilities; the recorded hidden state is what the query
projection sees; an interrupted run resumes to the same dump; the attention implementation is restored."""

from __future__ import annotations

import json
import random

import pytest
import torch

import lsa_rewrite.indexer.calibrate as calibrate_module
from lsa_rewrite.config import LSAConfig
from lsa_rewrite.indexer.calibrate import (
    _attention_modules,
    _query_projection,
    calibrate,
    default_target_layers,
    model_signature,
    window_masses,
    window_starts,
)
from lsa_rewrite.indexer.documents import ByteTokenizer, Document, builtin_documents, calibration_tasks
from lsa_rewrite.config import always_resident_chunks
from lsa_rewrite.indexer.dump import CalibrationDump, golden_labels
from zoo import make_model

TOK = ByteTokenizer()
CFG = LSAConfig(chunk_size=16, interval=16)
C, I = CFG.chunk_size, CFG.interval
FAMILIES = ["llama", "phi3", "gpt2", "qwen3", "gemma3"]


def _documents() -> list[Document]:
    tasks = calibration_tasks(TOK, count=2, min_tokens=150, max_tokens=260, seed=0)
    return builtin_documents(TOK, min_tokens=150, max_tokens=260, count=2, seed=0) + [t.to_document(TOK) for t in tasks]


def _text(length: int, seed: int = 0) -> Document:
    rng = random.Random(seed)
    return Document(id=f"random-{seed}", source="text", text="".join(chr(rng.randrange(32, 127)) for _ in range(length)))


def _chunk_mass(probs, t):
    """probs [H, S, S] -> the mass rows [t, t + I) put on each chunk before t (a partial last one too;
    rows past the sequence's end do not exist, the mass is over the rows there are)."""
    n = -(-t // C)
    rows = probs[:, t : t + I, :t]
    per_key = torch.nn.functional.pad(rows.sum((0, 1)), (0, n * C - t))
    return per_key.view(n, C).sum(1) / (probs.shape[0] * rows.shape[1])


def _run(model, path, documents, **kwargs):
    kwargs = {"config": CFG, "windows_per_document": 3, "progress": False, **kwargs}
    return calibrate(model, TOK, path, documents=documents, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_dump_round_trips_with_documented_fields(family, tmp_path):
    model = make_model(family)
    docs = _documents()
    out = _run(model, tmp_path / "dump", docs, heldout_fraction=0.25)
    dump = CalibrationDump(out)
    manifest = json.loads((out / "manifest.json").read_text())
    config = model.config

    assert manifest["_type"] == "LSACalibrationDump" and manifest["_version"] == 1 and manifest["complete"]
    signature = model_signature(model)
    assert dump.signature == signature and signature["class"] == type(model).__name__
    sparse = signature["sparse_layers"]
    assert sparse == ([1] if family == "gemma3" else [0, 1]) and signature["num_layers"] == config.num_hidden_layers
    assert LSAConfig.from_dict(dump.lsa_config) == CFG
    assert dump.target_layers == default_target_layers(sparse)
    assert dump.label == {"rule": "mean", "top_p": 0.3, "min_layers": 1, "exclude": "always-resident"}
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = family != "gpt2"
    assert dump.shapes == {"hidden": config.hidden_size, "q_heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "rope": rope}
    assert {"torch", "transformers", "lsa_rewrite"} <= set(manifest["versions"])
    assert [d["id"] for d in dump.documents] == [d.id for d in docs]
    assert [d["tokens"] for d in dump.documents] == [len(TOK.encode(d.text)) for d in docs]
    assert [d["source"] for d in dump.documents] == [d.source for d in docs]
    assert {d["split"] for d in dump.documents} == {"train", "heldout"}

    lt, ls = len(dump.target_layers), len(sparse)
    # A task's reply starts after its rendered prompt: windows start there too (and I/4, I/2 later).
    answers = {d.id: len(TOK.encode(d.text[: d.meta["answer_char"]])) for d in docs if "answer_char" in d.meta}
    assert len(answers) == 2
    starts: dict[int, list[int]] = {}
    for record in dump.windows():
        doc, t, pos = record["meta"].tolist()
        starts.setdefault(doc, []).append(t)
        tokens = dump.documents[doc]["tokens"]
        answer = answers.get(dump.documents[doc]["id"])
        reply = answer is not None and t in (answer, answer + I // 4, answer + I // 2)
        assert pos == t - 1 and t >= 2 * C and (t + I <= tokens or reply) and t < tokens
        assert t % C == 0 or t == tokens - I or reply  # the last window ends at the document's end
        n = -(-t // C)
        assert record["hidden"].shape == (lt, config.hidden_size)
        assert record["query"].shape == (lt, heads, head_dim)
        assert record["kmin"].shape == record["kmax"].shape == (lt, n, kv_heads, head_dim)
        assert bool((record["kmin"] <= record["kmax"]).all())
        assert record["mass"].shape == (ls, n) and record["mass"].dtype == torch.float32
        assert bool((record["mass"] > 0).all()) and bool((record["mass"].sum(1) <= 1 + 1e-5).all())
        selectable = torch.ones(n, dtype=torch.bool)
        selectable[[c for c in always_resident_chunks(t, chunk_size=C, sink_tokens=CFG.sink_tokens, recent_tokens=CFG.recent_tokens) if c < n]] = False
        assert torch.equal(record["golden"], golden_labels(record["mass"], 0.3, selectable=selectable, rule="mean"))
        assert not bool((record["golden"] & ~selectable).any())
        assert ("cos" in record) == ("sin" in record) == rope
        if rope:
            assert record["cos"].shape == record["sin"].shape == (head_dim,)
        assert record["split"] == dump.documents[doc]["split"]
    for doc, ts in starts.items():
        answer = answers.get(dump.documents[doc]["id"])
        tokens = dump.documents[doc]["tokens"]
        extra = {t for t in (answer, answer + I // 4, answer + I // 2) if t < tokens} if answer is not None else set()
        assert ts == sorted(set(ts)) and extra <= set(ts) and dump.documents[doc]["tokens"] - I in ts
        assert len(set(ts) - extra) == 3
        # The manifest says where each task's reply starts; the windows from there on are the reply's.
        assert dump.documents[doc].get("answer") == answer
        assert {t for t in ts if dump.at_reply({"meta": torch.tensor([doc, t, t - 1])})} == ({t for t in ts if t >= answer} if answer is not None else set())
    assert dump.has_replies and dump.count_replies() == sum(1 for r in dump.windows() if dump.at_reply(r)) > 0


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def test_llama_records_equal_a_hand_computation_from_the_weights(tmp_path):
    """q/k of each layer from its weights and the layer's q_proj input, rotary by hand, causal softmax
    by hand: the masses, key bounds, queries and cos/sin in the dump equal it."""
    model = make_model("llama")
    doc = _text(150)  # the last window starts at 134: its last chunk is partial
    ids = torch.tensor(TOK.encode(doc.text))
    seq = len(ids)
    inputs = {}
    hooks = [
        _query_projection(m).register_forward_pre_hook(lambda mod, args, layer=layer: inputs.__setitem__(layer, args[0][0]))
        for layer, m in enumerate(_attention_modules(model))
    ]
    with torch.no_grad():
        model(input_ids=ids[None])
    for h in hooks:
        h.remove()

    dump = CalibrationDump(_run(model, tmp_path / "dump", [doc], windows_per_document=4))
    heads, kv_heads, dim = 4, 2, 16
    theta = model.config.rope_parameters["rope_theta"] if hasattr(model.config, "rope_parameters") else model.config.rope_theta
    inv = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)
    freqs = torch.outer(torch.arange(seq).float(), inv)
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()  # [S, D]
    records = list(dump.windows())
    assert len(records) == 4
    for layer in (0, 1):
        attn = model.model.layers[layer].self_attn
        with torch.no_grad():
            x = inputs[layer]
            q = _rope(attn.q_proj(x).view(seq, heads, dim).transpose(0, 1), cos, sin)  # [H, S, D]
            k = _rope(attn.k_proj(x).view(seq, kv_heads, dim).transpose(0, 1), cos, sin)  # [Hkv, S, D]
        k_full = k.repeat_interleave(heads // kv_heads, 0)
        logits = q @ k_full.transpose(1, 2) / dim**0.5
        logits = logits.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), -torch.inf)
        probs = logits.softmax(-1)
        assert int(records[-1]["meta"][1]) % C != 0
        for record in records:
            t = int(record["meta"][1])
            torch.testing.assert_close(record["mass"][layer], _chunk_mass(probs, t), atol=1e-5, rtol=1e-4)
            i = dump.target_layers.index(layer)
            chunks = [k[:, c : min(c + C, t)] for c in range(0, t, C)]  # [Hkv, <=C, D] each
            torch.testing.assert_close(record["kmin"][i], torch.stack([c.amin(1) for c in chunks]), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(record["kmax"][i], torch.stack([c.amax(1) for c in chunks]), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(record["query"][i], q[:, t - 1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(record["hidden"][i], x[t - 1])
            torch.testing.assert_close(record["cos"], cos[t - 1], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(record["sin"], sin[t - 1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3", "gemma3"])
def test_masses_equal_the_eager_attention_probabilities(family, tmp_path):
    model = make_model(family)  # calibrated under SDPA
    eager = make_model(family, attn_implementation="eager")
    doc = _text(170, seed=1)
    ids = torch.tensor(TOK.encode(doc.text))
    dump = CalibrationDump(_run(model, tmp_path / "dump", [doc], windows_per_document=5))
    with torch.no_grad():
        attentions = eager(input_ids=ids[None], output_attentions=True).attentions
    sparse = dump.signature["sparse_layers"]
    for record in dump.windows():
        t = int(record["meta"][1])
        for j, layer in enumerate(sparse):
            torch.testing.assert_close(record["mass"][j], _chunk_mass(attentions[layer][0], t), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "qwen3"])
def test_hidden_is_what_the_query_projection_sees(family, tmp_path):
    model = make_model(family)
    doc = _text(140, seed=2)
    ids = torch.tensor(TOK.encode(doc.text))
    dump = CalibrationDump(_run(model, tmp_path / "dump", [doc], windows_per_document=4))
    modules = _attention_modules(model)
    names = {"llama": "q_proj", "phi3": "qkv_proj", "gpt2": "c_attn", "qwen3": "q_proj"}
    seen = {}
    hooks = []
    for layer in dump.target_layers:
        proj = getattr(modules[layer], names[family])
        hooks.append(proj.register_forward_pre_hook(lambda mod, args, layer=layer: seen.__setitem__(layer, args[0][0].clone())))
    with torch.no_grad():
        model(input_ids=ids[None])
    for h in hooks:
        h.remove()
    for record in dump.windows():
        t = int(record["meta"][1])
        for i, layer in enumerate(dump.target_layers):
            assert torch.equal(record["hidden"][i], seen[layer][t - 1])


def _tensors(path) -> dict:
    dump = CalibrationDump(path)
    return {(r["window"], name): value for r in dump.windows() for name, value in r.items() if isinstance(value, torch.Tensor)}


def test_interrupted_run_resumes_to_the_same_dump(tmp_path, monkeypatch):
    model = make_model("llama")
    docs = _documents() + [_text(200, seed=5)]
    full = _run(model, tmp_path / "full", docs, shard_windows=4)

    real = calibrate_module._run_document
    calls = []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(calibrate_module, "_run_document", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(model, tmp_path / "resumed", docs, shard_windows=4)
    partial = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert not partial["complete"] and 0 < len(partial["documents"]) < len(docs)
    assert model.config._attn_implementation == "sdpa" and calibrate_module._ACTIVE is None
    with pytest.raises(ValueError, match="incomplete"):
        CalibrationDump(tmp_path / "resumed")

    calls.clear()
    monkeypatch.setattr(calibrate_module, "_run_document", lambda *args: (calls.append(1), real(*args))[1])
    resumed = _run(model, tmp_path / "resumed", docs, shard_windows=4)
    assert len(calls) == len(docs) - len(partial["documents"])  # finished documents are skipped
    a, b = json.loads((full / "manifest.json").read_text()), json.loads((resumed / "manifest.json").read_text())
    assert a == b
    ta, tb = _tensors(full), _tensors(resumed)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[key], tb[key]) for key in ta)

    calls.clear()
    _run(model, tmp_path / "resumed", docs, shard_windows=4)  # complete: nothing to do
    assert not calls
    _run(model, tmp_path / "resumed", docs, shard_windows=4, resume=False)  # starts over
    assert len(calls) == len(docs) and json.loads((resumed / "manifest.json").read_text()) == a


def test_attention_implementation_restored_after_an_error(tmp_path, monkeypatch):
    model = make_model("gemma3")
    ids = torch.tensor(TOK.encode(_text(100).text))[None]
    with torch.no_grad():
        before = model(input_ids=ids).logits

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(calibrate_module, "_run_document", broken)
    with pytest.raises(RuntimeError, match="boom"):
        _run(model, tmp_path / "dump", [_text(100)])
    assert model.config._attn_implementation == "sdpa" and calibrate_module._ACTIVE is None
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_refuses_bad_arguments(tmp_path):
    gemma = make_model("gemma3")
    with pytest.raises(ValueError, match="sparsely attended"):
        _run(gemma, tmp_path / "a", [_text(100)], target_layers=[0])  # a sliding-window layer
    with pytest.raises(ValueError, match="no sparsely attended layers"):
        _run(make_model("mistral"), tmp_path / "b", [_text(100)])
    with pytest.raises(ValueError, match="no document holds a window"):
        _run(make_model("llama"), tmp_path / "c", [_text(40)])
    with pytest.raises(ValueError, match="share the id"):
        _run(make_model("llama"), tmp_path / "d", [_text(100), _text(100)])
    with pytest.raises(ValueError, match="windows_per_document"):
        _run(make_model("llama"), tmp_path / "e", [_text(100)], windows_per_document=0)


def test_window_starts_and_default_target_layers():
    rng = random.Random(0)
    starts = window_starts(1000, chunk=64, interval=64, count=5, rng=rng)
    assert len(starts) == 5 and starts == sorted(set(starts)) and starts[-1] == 936
    assert all(t % 64 == 0 and t >= 128 for t in starts[:-1])
    assert window_starts(300, chunk=64, interval=64, count=10, rng=rng) == [128, 192, 236]
    assert window_starts(320, chunk=64, interval=64, count=10, rng=rng) == [128, 192, 256]
    assert window_starts(320, chunk=64, interval=64, count=1, rng=rng) == [256]
    assert window_starts(150, chunk=64, interval=64, count=10, rng=rng) == []
    # a task's reply at token 290: windows there and a quarter and half an interval on (past the end too)
    assert window_starts(320, chunk=64, interval=64, count=1, rng=rng, answer=290) == [256, 290, 306]
    assert window_starts(150, chunk=64, interval=64, count=10, rng=rng, answer=140) == [140]
    assert window_starts(300, chunk=64, interval=64, count=1, rng=rng, answer=100) == [236]  # before two chunks: none
    assert default_target_layers(list(range(30))) == [7, 15, 22]
    assert default_target_layers([5, 11, 17]) == [5, 11, 17]
    assert default_target_layers([1]) == [1]


def test_window_masses_with_gqa_softcap_and_sinks():
    torch.manual_seed(0)
    q, k = torch.randn(4, 64, 8), torch.randn(2, 64, 8)
    sinks = torch.randn(4)
    got = window_masses(q, k, [32], chunk=16, interval=16, scaling=0.3, softcap=5.0, sinks=sinks)[0]
    logits = torch.tanh(q @ k.repeat_interleave(2, 0).transpose(1, 2) * 0.3 / 5.0) * 5.0
    logits = logits.masked_fill(torch.ones(64, 64, dtype=torch.bool).triu(1), -torch.inf)
    full = torch.cat([logits, sinks.view(4, 1, 1).expand(4, 64, 1)], -1).softmax(-1)[..., :64]
    expect = full[:, 32:48, :32].sum((0, 1)).view(2, 16).sum(1) / (4 * 16)
    torch.testing.assert_close(got, expect)


def test_user_files_and_texts_as_documents(tmp_path):
    (tmp_path / "notes.txt").write_text(_text(120, seed=7).text)
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": _text(130, seed=8).text, "id": "row"}) + "\n")
    dump = CalibrationDump(_run(make_model("llama"), tmp_path / "dump", [tmp_path / "notes.txt", tmp_path / "rows.jsonl", _text(110).text]))
    assert [d["source"] for d in dump.documents] == ["file:notes.txt", "file:rows.jsonl", "text"]
    assert [d["tokens"] for d in dump.documents] == [120, 130, 110]
    assert dump.documents[1]["id"] == "row"


def test_default_documents_take_the_task_count(tmp_path, monkeypatch):
    """``calibrate(documents=None, tasks=N)`` runs the built-in documents with N calibration tasks."""
    seen = {}

    def fake_default_documents(tokenizer, **kwargs):
        seen.update(kwargs)
        return _documents()

    monkeypatch.setattr(calibrate_module, "default_documents", fake_default_documents)
    dump = _run(make_model("llama"), tmp_path / "dump", None, tasks=7, seed=3)
    assert seen["tasks"] == 7 and seen["seed"] == 3
    assert len(CalibrationDump(dump).manifest["documents"]) == len(_documents())
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="tasks must be an int >= 0"):
            _run(make_model("llama"), tmp_path / "bad", None, tasks=bad)


def test_mixed_rotary_dump_trains_a_per_layer_rope_indexer(tmp_path):
    """SmolLM3 hands its rotary cos/sin to every layer but layer 1 does not apply them: the dump records
    rope per target layer (the probe), training reads it into the indexer's config, the file keeps it,
    and the trained indexer converts the model (its taps agree layer by layer) and decodes exactly."""
    import copy

    import lsa_rewrite
    from lsa_rewrite.indexer import LSAIndexer
    from lsa_rewrite.indexer.train import train_indexer

    model = make_model("smollm3").eval()
    out = _run(model, tmp_path / "dump", _documents()[1:3], heldout_fraction=0.5)
    dump = CalibrationDump(out)
    assert dump.target_layers == [0, 1] and dump.shapes["rope"] == [True, False]
    for record in dump.windows():
        assert record["cos"].shape == record["sin"].shape == (16,)
    indexer, _ = train_indexer(out, out=tmp_path / "ix.safetensors", epochs=1, progress=False)
    assert indexer.config.rope == (True, False)
    loaded = LSAIndexer.load(tmp_path / "ix.safetensors")
    assert loaded.config.rope == (True, False)
    config = LSAConfig(mode="dense", chunk_size=16, interval=16, selector="indexer")
    converted = lsa_rewrite.convert(copy.deepcopy(model), config, indexer=tmp_path / "ix.safetensors")
    ids = torch.randint(3, 250, (1, 80), generator=torch.Generator().manual_seed(0))
    want = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(converted.generate(ids, max_new_tokens=12, do_sample=False), want)
    only_plain, _ = train_indexer(out, target_layers=[1], epochs=1, progress=False)  # a no-rotary layer of the dump alone
    assert only_plain.config.rope is False



ROTARY_FORMS = {  # family: (rope_style, rotated channels of the 16 per head) in the zoo's configs
    "llama": ("half", 16),
    "nemotron": ("half", 8),  # partial rotary
    "gptj": ("interleaved", 8),  # rotate-every-two over a leading part
    "glm": ("interleaved", 8),
    "helium": ("interleaved", 16),
}


@pytest.mark.parametrize("family", sorted(ROTARY_FORMS))
def test_recorded_rotary_reproduces_the_models_query(family, tmp_path):
    """The dump's cos/sin are the factors the model multiplies its queries by, in its channel order and
    over the channels it rotates (partial and interleaved rotary included: the decode step's own rotary
    ops run for each position): the query projection of the recorded hidden state, rotated with them in
    the recorded style, is the recorded post-rotary query; trained on the dump, the indexer carries the
    style and converts the model exactly at a covering budget."""
    import copy

    import lsa_rewrite
    from lsa_rewrite.indexer.model import apply_rope
    from lsa_rewrite.indexer.train import train_indexer

    style, dims = ROTARY_FORMS[family]
    model = make_model(family).eval()
    out = _run(model, tmp_path / "dump", _documents()[1:3], heldout_fraction=0.5)
    dump = CalibrationDump(out)
    manifest = json.loads((out / "manifest.json").read_text())["shapes"]
    assert manifest.get("rope_style", "half") == style and manifest.get("rotary_dims", 16) == dims
    heads = model.config.num_attention_heads
    projections = [_query_projection(m) for m in _attention_modules(model)]
    checked = 0
    for record in dump.windows():
        assert record["cos"].shape == record["sin"].shape == (dims,)
        for i, layer in enumerate(dump.target_layers):
            with torch.no_grad():
                q = projections[layer](record["hidden"][i][None]).view(heads, -1)
            torch.testing.assert_close(apply_rope(q, record["cos"], record["sin"], style), record["query"][i], atol=1e-5, rtol=1e-5)
            checked += 1
    assert checked > 0
    indexer, _ = train_indexer(out, epochs=1, progress=False)
    assert indexer.config.rope_style == style
    config = LSAConfig(mode="dense", chunk_size=16, interval=16, selector="indexer")
    converted = lsa_rewrite.convert(copy.deepcopy(model), config, indexer=indexer)
    ids = torch.randint(3, 250, (1, 60), generator=torch.Generator().manual_seed(0))
    assert torch.equal(converted.generate(ids, max_new_tokens=8, do_sample=False), model.generate(ids, max_new_tokens=8, do_sample=False))


def test_a_model_traced_over_a_dynamic_cache_only_calibrates_with_the_default_config(tmp_path):
    """BioGPT's decode step traces over a DynamicCache only (``capture_cache="dynamic"``); calibration's
    trace, which only reads the rotary form, takes that cache itself, and the dump keeps the given config."""
    from transformers import AutoModelForCausalLM
    from zoo import DYNAMIC_CAPTURE_ONLY

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(DYNAMIC_CAPTURE_ONLY["biogpt"]()).eval()
    out = _run(model, tmp_path / "dump", _documents()[:2])
    dump = CalibrationDump(out)
    assert dump.shapes["rope"] is False and dump.count("train") + dump.count("heldout") > 0
    assert dump.lsa_config == CFG.to_dict()


# ---------------------------------------------------------------- attention that bypasses the registry


def _dump_tensors(path) -> list[dict]:
    return [{k: v for k, v in r.items() if isinstance(v, torch.Tensor)} for r in CalibrationDump(path).windows()]


def _assert_same_dumps(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_recording_from_sdpa_calls_gives_the_registry_dump(family, tmp_path, monkeypatch):
    """A model that says its attention bypasses transformers' registry is recorded from each attention module's
    own scaled_dot_product_attention call; on a registry model (GQA, keys per KV head) that must give the very
    dump the registry recording gives."""
    model = make_model(family)
    docs = [_text(170, seed=3), _text(150, seed=4)]
    want = _dump_tensors(_run(model, tmp_path / "registry", docs))
    monkeypatch.setattr(type(model), "is_backend_compatible", classmethod(lambda cls: False))
    got = _dump_tensors(_run(model, tmp_path / "sdpa", docs))
    assert model.config._attn_implementation == "sdpa" and calibrate_module._ACTIVE is None
    _assert_same_dumps(got, want)


@pytest.mark.parametrize("family", ["falcon", "falcon_mqa"])
def test_falcon_calibrates_from_its_sdpa_calls(family, tmp_path):
    """Falcon calls SDPA itself (no registry): masses equal its eager attention probabilities, key bounds are per
    KV head as the store keeps them (one for multi-query), and the recorded hidden state is what
    query_key_value sees; the model's attention implementation is left as it was."""
    model = make_model(family)
    eager = make_model(family, attn_implementation="eager")
    doc = _text(170, seed=1)
    ids = torch.tensor(TOK.encode(doc.text))
    dump = CalibrationDump(_run(model, tmp_path / "dump", [doc], windows_per_document=5))
    assert model.config._attn_implementation == "sdpa"
    seen = {}
    modules = _attention_modules(model)
    hooks = [modules[layer].query_key_value.register_forward_pre_hook(lambda mod, args, layer=layer: seen.__setitem__(layer, args[0][0].clone()))
             for layer in dump.target_layers]
    with torch.no_grad():
        attentions = eager(input_ids=ids[None], output_attentions=True).attentions
        model(input_ids=ids[None])
    for h in hooks:
        h.remove()
    kv_heads = 1 if family == "falcon_mqa" else model.config.num_attention_heads  # the new layout caches keys per query head
    assert dump.shapes["kv_heads"] == kv_heads
    windows = list(dump.windows())
    assert len(windows) == 5
    for record in windows:
        t = int(record["meta"][1])
        for j, layer in enumerate(dump.signature["sparse_layers"]):
            torch.testing.assert_close(record["mass"][j], _chunk_mass(attentions[layer][0], t), atol=1e-5, rtol=1e-4)
        assert record["kmin"].shape[2] == kv_heads and bool((record["kmin"] <= record["kmax"]).all())
        for i, layer in enumerate(dump.target_layers):
            assert torch.equal(record["hidden"][i], seen[layer][t - 1])


@pytest.mark.parametrize("family", ["gpt_neo", "falcon", "falcon_mqa"])
def test_eager_attention_is_recorded_from_its_softmax(family, tmp_path):
    """GPT-Neo computes attention as matmul and softmax (no registry, no SDPA), and a Falcon loaded with eager
    attention cannot switch at run time: calibration records each layer's softmax over its q @ k^T scores, and the
    masses equal the model's own attention probabilities; the implementation stays eager."""
    model = make_model(family, attn_implementation="eager")
    doc = _text(170, seed=1)
    ids = torch.tensor(TOK.encode(doc.text))
    dump = CalibrationDump(_run(model, tmp_path / "dump", [doc], windows_per_document=5))
    assert model.config._attn_implementation == "eager" and calibrate_module._ACTIVE is None
    with torch.no_grad():
        attentions = model(input_ids=ids[None], output_attentions=True).attentions
    windows = list(dump.windows())
    assert len(windows) == 5 and dump.signature["sparse_layers"]
    for record in windows:
        t = int(record["meta"][1])
        for j, layer in enumerate(dump.signature["sparse_layers"]):
            torch.testing.assert_close(record["mass"][j], _chunk_mass(attentions[layer][0], t), atol=1e-5, rtol=1e-4)
        assert record["kmin"].shape[2] == dump.shapes["kv_heads"]


def test_attention_calibration_cannot_find_is_refused_with_the_layers(tmp_path, monkeypatch):
    """A model whose layers compute attention neither through the registry, nor as an SDPA call, nor as a softmax
    over a matmul (here: GPT-Neo with matmul hidden from the recorder) is refused, naming the layers."""
    monkeypatch.setattr(calibrate_module, "_MATMULS", set())
    with pytest.raises(ValueError, match=r"layers \[0\] of GPTNeoForCausalLM neither"):
        _run(make_model("gpt_neo"), tmp_path / "neo", [_text(170)])
    assert calibrate_module._ACTIVE is None


def test_keys_expanded_to_the_query_heads_are_folded_back_per_kv_head():
    model = make_model("llama")
    recorder = calibrate_module._Recorder(model, target_layers=[1], sparse=[0, 1], chunk=C, interval=I)
    kv, heads = recorder.kv_heads, model.config.num_attention_heads
    assert kv < heads
    key = torch.randn(1, kv, 40, 16)
    expanded = key.repeat_interleave(heads // kv, dim=1)  # what repeat_kv hands SDPA
    assert torch.equal(recorder._kv_heads(0, expanded), key)
    assert recorder._kv_heads(0, key) is key
    with pytest.raises(ValueError, match=f"{heads} heads.*{kv} KV heads"):
        recorder._kv_heads(0, torch.randn(1, heads, 40, 16))  # distinct keys per query head: not an expansion


# ---------------------------------------------------------------- plain decoders


@pytest.fixture
def plain_decoder():
    """The buffer decoder (gpt-fast style; its rotation written on the two halves with [T, D/2] cos/sin)."""
    model = make_model("buffer")
    model.setup_caches(max_batch_size=1, max_seq_length=512)
    return model


def _llama_twin(plain):
    """An HF Llama with the buffer decoder's weights (q/k/v split out of wqkv): the same function."""
    from transformers import LlamaConfig, LlamaForCausalLM

    a = plain.args
    config = LlamaConfig(
        vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.intermediate_size, num_hidden_layers=a.n_layer,
        num_attention_heads=a.n_head, num_key_value_heads=a.n_kv_head, rms_norm_eps=a.norm_eps, rope_theta=a.rope_base,
        max_position_embeddings=a.max_seq_len, tie_word_embeddings=False,
    )
    twin = LlamaForCausalLM(config).eval()
    rows = [a.n_head * a.head_dim, a.n_kv_head * a.head_dim, a.n_kv_head * a.head_dim]
    with torch.no_grad():
        twin.model.embed_tokens.weight.copy_(plain.tok_embeddings.weight)
        for block, layer in zip(plain.layers, twin.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            for proj, weight in zip((attn.q_proj, attn.k_proj, attn.v_proj), block.attention.wqkv.weight.split(rows)):
                proj.weight.copy_(weight)
            attn.o_proj.weight.copy_(block.attention.wo.weight)
            mlp.gate_proj.weight.copy_(block.feed_forward.w1.weight)
            mlp.up_proj.weight.copy_(block.feed_forward.w3.weight)
            mlp.down_proj.weight.copy_(block.feed_forward.w2.weight)
            layer.input_layernorm.weight.copy_(block.attention_norm.weight)
            layer.post_attention_layernorm.weight.copy_(block.ffn_norm.weight)
        twin.model.norm.weight.copy_(plain.norm.weight)
        twin.lm_head.weight.copy_(plain.output.weight)
    return twin


def test_plain_decoder_calibrates_to_its_hf_twins_dump(plain_decoder, tmp_path):
    """A plain decoder (module-buffer caches, SDPA, no HF config) is calibrated from its traced step's facts and its
    SDPA calls: every recorded tensor equals the dump of an HF Llama with the same weights, its signature comes from
    the trace, and its cache buffers are left as they were."""
    twin = _llama_twin(plain_decoder)
    ids = torch.randint(3, 250, (1, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain_decoder(ids, torch.arange(100)), twin(ids).logits, atol=1e-5, rtol=1e-5)
    docs = [_text(200, seed=5), _text(260, seed=6), _text(700, seed=7)]  # the last one is cut to the 512-token cache
    before = {name: b.clone() for name, b in plain_decoder.named_buffers()}
    plain = CalibrationDump(_run(plain_decoder, tmp_path / "plain", docs))
    assert all(torch.equal(before[name], b) for name, b in plain_decoder.named_buffers())
    hf = CalibrationDump(_run(twin, tmp_path / "hf", docs, max_tokens=512))
    assert plain.signature == {
        "class": "BufferDecoder", "model_type": None, "num_layers": 2, "q_heads": 4, "kv_heads": 2, "head_dim": 16, "sparse_layers": [0, 1],
    }
    assert plain.shapes == hf.shapes and plain.target_layers == hf.target_layers
    assert [d["tokens"] for d in plain.documents] == [200, 260, 512]
    want, got = _dump_tensors(hf.path), _dump_tensors(plain.path)
    assert len(got) == 9
    _assert_same_dumps(got, want)


def test_plain_decoder_trains_an_indexer_that_converts_it_and_only_it(plain_decoder, tmp_path):
    """Backbone-free training on a plain decoder's dump; the indexer converts that decoder (dense exactness at a
    covering budget; sparse, the same run through the torch.compile backend) and is refused, with the field that
    differs, by a decoder of another shape and an HF model."""
    import copy

    import lsa_rewrite
    from helpers import buffer_greedy
    from lsa_rewrite.indexer.train import train_indexer

    dump = _run(plain_decoder, tmp_path / "dump", _documents(), heldout_fraction=0.25)
    indexer, _ = train_indexer(dump, epochs=1, progress=False)
    assert indexer.signature["class"] == "BufferDecoder"
    config = LSAConfig(mode="dense", chunk_size=C, interval=I, selector="indexer")
    ids = torch.randint(3, 250, (1, 80), generator=torch.Generator().manual_seed(1))
    dense = buffer_greedy(plain_decoder, ids, 8)
    converted = lsa_rewrite.convert(copy.deepcopy(plain_decoder), config, indexer=indexer)
    got = buffer_greedy(converted, ids, 8)
    assert torch.equal(got[0], dense[0]) and float((got[1] - dense[1]).abs().max()) <= 1e-4
    # through torch.compile(backend=lsa_rewrite.backend(..., indexer=...)): the converted model's sparse run
    sparse = LSAConfig(budget=96, chunk_size=C, interval=I, sink_tokens=16, recent_tokens=16, selector="indexer")
    long_ids = torch.randint(3, 250, (1, 200), generator=torch.Generator().manual_seed(4))
    reference = lsa_rewrite.convert(copy.deepcopy(plain_decoder), sparse, indexer=indexer)
    want = buffer_greedy(reference, long_ids, 40)
    compiled = copy.deepcopy(plain_decoder)
    got = buffer_greedy(torch.compile(compiled, backend=lsa_rewrite.backend(sparse, indexer=indexer)), long_ids, 40)
    assert compiled.lsa.store.selections == reference.lsa.store.selections > 0
    assert torch.equal(got[0], want[0]) and float((got[1] - want[1]).abs().max()) <= 1e-4

    from buffer_decoder import BufferDecoder, BufferDecoderArgs

    deeper = BufferDecoder(BufferDecoderArgs(n_layer=3)).eval()
    deeper.setup_caches(max_batch_size=1, max_seq_length=256)
    with pytest.raises(ValueError, match="num_layers=2, but this model has num_layers=3"):
        lsa_rewrite.convert(deeper, config, indexer=indexer)
    assert getattr(deeper, "lsa", None) is None
    with pytest.raises(ValueError, match="class='BufferDecoder'"):
        lsa_rewrite.convert(make_model("llama"), config, indexer=indexer)


def _repeated_qkv(attn, x, cos, sin, input_pos):
    """The buffer decoder's rotated q, k, v ``[B, H, S, D]`` after its cache update, keys and values repeated to the
    query heads (``repeat_interleave``) as gpt-fast writes GQA."""
    import buffer_decoder

    B, T, _ = x.shape
    q_size, kv_size = attn.n_head * attn.head_dim, attn.n_kv_head * attn.head_dim
    q, k, v = attn.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
    q = q.view(B, T, attn.n_head, attn.head_dim).transpose(1, 2)
    k = k.view(B, T, attn.n_kv_head, attn.head_dim).transpose(1, 2)
    v = v.view(B, T, attn.n_kv_head, attn.head_dim).transpose(1, 2)
    q, k = buffer_decoder.apply_rope(q, cos, sin), buffer_decoder.apply_rope(k, cos, sin)
    if attn.kv_cache is not None:
        k, v = attn.kv_cache.update(input_pos, k, v)
    group = attn.n_head // attn.n_kv_head
    return q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)


def _repeat_kv_attention(self, x, cos, sin, mask, input_pos):
    """The buffer decoder's attention with keys and values repeated to the query heads before a plain SDPA call."""
    q, k, v = _repeated_qkv(self, x, cos, sin, input_pos)
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return self.wo(y.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


def test_plain_decoder_with_keys_repeated_to_the_query_heads_records_per_kv_head(plain_decoder, tmp_path, monkeypatch):
    """gpt-fast repeats keys to the query heads before SDPA: calibration folds them back per KV head (the store's
    layout), giving the dump of the same decoder with grouped SDPA (enable_gqa)."""
    import buffer_decoder

    docs = [_text(200, seed=8), _text(230, seed=9)]
    want = _dump_tensors(_run(plain_decoder, tmp_path / "gqa", docs))
    monkeypatch.setattr(buffer_decoder.Attention, "forward", _repeat_kv_attention)
    dump = CalibrationDump(_run(plain_decoder, tmp_path / "repeated", docs))
    assert dump.shapes["kv_heads"] == 2
    got = _dump_tensors(dump.path)
    _assert_same_dumps(got, want)


def _eager_attention(self, x, cos, sin, mask, input_pos):
    """The buffer decoder's attention written out: scores ``q @ k^T`` over the whole cache, masked, softmax, ``@ v``."""
    q, k, v = _repeated_qkv(self, x, cos, sin, input_pos)
    scores = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return self.wo((probs @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


def test_plain_decoder_with_eager_attention_records_its_softmax(plain_decoder, tmp_path, monkeypatch):
    """A plain decoder whose attention is written as matmul, mask and softmax over its cache is recorded from that
    softmax: the dump of the same decoder with SDPA."""
    import buffer_decoder

    docs = [_text(200, seed=10), _text(230, seed=11)]
    want = _dump_tensors(_run(plain_decoder, tmp_path / "sdpa", docs))
    monkeypatch.setattr(buffer_decoder.Attention, "forward", _eager_attention)
    got = _dump_tensors(_run(plain_decoder, tmp_path / "eager", docs))
    _assert_same_dumps(got, want)
