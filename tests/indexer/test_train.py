"""Tests for ``lsa_rewrite.indexer.train``: learning a planted pattern, determinism, the output file,
and training in a process where ``transformers`` (hence the model) cannot be imported."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from lsa_rewrite.config import LSAConfig

from lsa_rewrite.indexer.dump import DumpWriter, label_rule
from lsa_rewrite.indexer.model import LSAIndexer, rotate_half
from lsa_rewrite.indexer import train as train_module
from lsa_rewrite.indexer.train import train_indexer

HIDDEN, HQ, HKV, D, C = 24, 4, 2, 8, 16
TARGETS, SPARSE = [1, 2], [0, 1, 2, 3]
SIGNATURE = {"class": "Planted", "model_type": "planted", "num_layers": 4, "hidden_size": HIDDEN, "q_heads": HQ,
             "kv_heads": HKV, "head_dim": D, "sparse_layers": SPARSE, "vocab_size": 64}
LSA = LSAConfig(chunk_size=C, interval=16, sink_tokens=C, recent_tokens=32).to_dict()


def true_query_weights(seed: int = 0) -> dict[int, torch.Tensor]:
    """The planted "model": each target layer's W_q maps the hidden state to a topic vector, the same for every head."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in TARGETS:
        read = torch.randn(D, HIDDEN, generator=g) / math.sqrt(HIDDEN)
        weights[layer] = read.repeat(HQ, 1)  # [Hq * D, hidden]
    return weights


def write_planted_dump(out, *, windows_per_doc=12, docs=(14, 4), record_query=False, rope=True, seed=0, split_groups=False):
    """Windows whose golden chunks have key centres along the rotated topic that the hidden state encodes.

    Hidden state x: random; topic v = W x (per target layer, pre-rotary); query position's rotation
    R (cos/sin); golden chunks (about a fifth) have key centres near R v in every KV head, the others
    random directions. Masses: golden chunks take most of each sparse layer's mass.
    ``split_groups``: layers 0-1 (nearest to target layer 1) and 2-3 (nearest to target 2) attend two
    independent chunk sets, each planted along its own target layer's topic only.
    """
    weights = true_query_weights()
    g = torch.Generator().manual_seed(seed + 1)
    manifest = {
        "model": SIGNATURE,
        "lsa_config": LSA,
        "target_layers": TARGETS,
        "label": label_rule(len(SPARSE)),
        "shapes": {"hidden": HIDDEN, "q_heads": HQ, "kv_heads": HKV, "head_dim": D, "rope": rope},
    }
    writer = DumpWriter(out, manifest, shard_windows=32)
    splits = ["train"] * docs[0] + ["heldout"] * docs[1]
    for d, split in enumerate(splits):
        index = writer.add_document(f"doc{d}", source="planted", tokens=1024, split=split)
        for _ in range(windows_per_doc):
            n = int(torch.randint(8, 33, (), generator=g))
            t = n * C
            x = torch.randn(len(TARGETS), HIDDEN, generator=g)
            theta = torch.rand(D // 2, generator=g) * 2 * math.pi * rope
            cos, sin = torch.cat([theta.cos()] * 2), torch.cat([theta.sin()] * 2)
            golden = torch.rand(n, generator=g) < 0.2
            golden[int(torch.randint(0, n, (), generator=g))] = True
            per_target = [golden, golden]
            if split_groups:
                other = torch.rand(n, generator=g) < 0.2
                other[int(torch.randint(0, n, (), generator=g))] = True
                per_target = [golden, other]
            kmin, kmax, queries = [], [], []
            for i, layer in enumerate(TARGETS):
                golden_i = per_target[i]
                v = (weights[layer] @ x[i]).view(HQ, D)[0]
                rv = v * cos + rotate_half(v) * sin
                queries.append((weights[layer] @ x[i]).view(HQ, D) * cos + rotate_half((weights[layer] @ x[i]).view(HQ, D)) * sin)
                centre = torch.randn(n, HKV, D, generator=g) * 0.5
                centre[golden_i] += 2.0 * rv / rv.norm()
                centre[~golden_i] -= 0.5 * rv / rv.norm()  # the others lean away (a clean planted pattern)
                half = torch.rand(n, HKV, D, generator=g) * 0.3
                kmin.append(centre - half)
                kmax.append(centre + half)
            attended = torch.stack([per_target[0], per_target[0], per_target[1], per_target[1]])  # [Ls, N]
            mass = torch.where(attended, 1.0, 0.05) * torch.rand(len(SPARSE), n, generator=g).add(0.5)
            mass = mass / mass.sum(1, keepdim=True) * 0.8
            record = {
                "hidden": x.half(),
                "cos": cos,
                "sin": sin,
                "kmin": torch.stack(kmin).half(),
                "kmax": torch.stack(kmax).half(),
                "mass": mass,
                "golden": per_target[0] | per_target[1],
                "meta": torch.tensor([index, t, t - 1]),
            }
            if record_query:
                record["query"] = torch.stack(queries)
            if not rope:
                del record["cos"], record["sin"]
            writer.add_window(record)
    writer.close()
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: a second intra-op thread only adds contention (on a shared 2-core CI box, 1000x slower)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return write_planted_dump(tmp_path_factory.mktemp("planted") / "dump")


@pytest.fixture(scope="module")
def planted_with_queries(tmp_path_factory):
    return write_planted_dump(tmp_path_factory.mktemp("planted_q") / "dump", record_query=True, docs=(14, 3), windows_per_doc=10)


@pytest.fixture(scope="module")
def trained(planted, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "indexer.safetensors"
    indexer, metrics = train_indexer(planted, out=out, epochs=6, lr=1e-2, batch_windows=16, seed=0, progress=False)
    return indexer, metrics, out


def test_training_learns_the_planted_pattern(trained):
    indexer, metrics, _ = trained
    train = metrics["train"]
    assert train["init"] == "random"
    assert train["train_loss"][-1] < 0.6 * train["train_loss_initial"]
    assert train["heldout_loss"][-1] < train["heldout_loss_initial"]
    learned, untrained = metrics["indexer"], metrics["untrained"]
    for budget in ("0.05", "0.1", "0.135", "0.25"):
        assert learned["golden_recall"][budget] >= untrained["golden_recall"][budget]
        assert learned["mass_recall"][budget] >= metrics["recency"]["mass_recall"][budget]
    assert learned["golden_recall"]["0.25"] > 0.9 > untrained["golden_recall"]["0.25"] + 0.2
    assert learned["precision"] > 0.8 and learned["recall"] > 0.8
    assert 0.0 < learned["above_threshold"] < 0.5
    assert "query_aware" not in metrics  # the dump has no queries and no W_q was given
    assert metrics["heldout"]["windows"] == 4 * 12
    assert indexer.config.target_layers == tuple(TARGETS) and indexer.config.rank == 24


def test_output_file_carries_config_signature_lsa_and_metrics(trained):
    indexer, metrics, out = trained
    loaded = LSAIndexer.load(out)
    assert loaded.config == indexer.config
    assert loaded.signature == SIGNATURE
    assert loaded.lsa == {"chunk_size": C, "interval": 16}
    assert loaded.metrics == json.loads(json.dumps(metrics))
    for name, value in indexer.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_training_is_deterministic_under_a_seed(planted):
    runs = [train_indexer(planted, epochs=1, batch_windows=8, seed=3, progress=False) for _ in range(2)]
    (a, ma), (b, mb) = runs
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name]), name
    assert ma["indexer"] == mb["indexer"] and ma["random"] == mb["random"]
    other, _ = train_indexer(planted, epochs=1, batch_windows=8, seed=4, progress=False)
    assert not torch.equal(other.layers[0].down, a.layers[0].down)


def test_trainable_heads_keeps_the_query_projection_and_learns_the_rest(planted):
    weights = true_query_weights()
    start, _ = train_indexer(planted, epochs=0, init_weights=weights, progress=False)
    heads, metrics = train_indexer(planted, epochs=1, batch_windows=8, init_weights=weights, trainable="heads", progress=False)
    for a, b in zip(start.layers, heads.layers):
        assert torch.equal(a.down, b.down) and torch.equal(a.up, b.up) and torch.equal(a.norm, b.norm)
        assert not torch.equal(a.head_weight, b.head_weight)
    assert metrics["train"]["trainable"] == "heads"
    with pytest.raises(ValueError, match="trainable"):
        train_indexer(planted, epochs=0, trainable="query", progress=False)


def test_relabelling_with_another_rule_changes_the_golden_rate(planted):
    _, default = train_indexer(planted, epochs=0, progress=False)
    _, wide = train_indexer(planted, epochs=0, top_p=0.9, min_layers=1, progress=False)
    assert default["train"]["label"]["from"] == "the dump's labels"
    assert wide["train"]["label"] == {
        "rule": "mean", "top_p": 0.9, "min_layers": 1, "exclude": "always-resident", "from": "recomputed from the recorded masses"
    }
    assert wide["heldout"]["golden_rate"] > default["heldout"]["golden_rate"]
    # the vote: a chunk needs every sparse layer's nucleus (3 of 3) -> no more golden than the mean's
    _, vote = train_indexer(planted, epochs=0, label_rule="vote", min_layers=len(SPARSE), progress=False)
    assert vote["train"]["label"]["rule"] == "vote" and vote["train"]["label"]["min_layers"] == len(SPARSE)
    assert vote["heldout"]["golden_rate"] <= default["heldout"]["golden_rate"]
    with pytest.raises(ValueError, match="label_rule"):
        train_indexer(planted, epochs=0, label_rule="max", progress=False)


def test_listwise_loss_trains_toward_the_attention_shares(planted):
    start, _ = train_indexer(planted, epochs=0, seed=2, progress=False)
    trained, metrics = train_indexer(planted, epochs=2, batch_windows=8, seed=2, loss="bce+listwise", progress=False)
    assert metrics["train"]["loss"] == "bce+listwise"
    assert metrics["train"]["train_loss"][-1] < metrics["train"]["train_loss_initial"]
    assert metrics["indexer"]["mass_recall"]["0.1"] >= metrics["untrained"]["mass_recall"]["0.1"]


def test_init_from_query_weights_or_recorded_queries(planted, planted_with_queries):
    weights = true_query_weights()
    _, m1 = train_indexer(planted, epochs=0, init_weights=weights, progress=False)
    assert m1["train"]["init"] == "query-weights" and m1["query_aware"]["query_source"] == "query-weights"
    _, m2 = train_indexer(planted_with_queries, epochs=0, progress=False)
    assert m2["train"]["init"] == "dump-queries" and m2["query_aware"]["query_source"] == "dump"
    _, m3 = train_indexer(planted_with_queries, epochs=0, init_weights=weights, progress=False)
    assert m3["train"]["init"] == "query-weights" and m3["query_aware"] == m2["query_aware"]  # recorded queries win
    # every start is where the planted model's own queries are: far above chance, like the query-aware bound
    for metrics in (m1, m2, m3):
        assert metrics["untrained"]["golden_recall"]["0.25"] > 0.9
        assert metrics["query_aware"]["golden_recall"]["0.25"] > 0.9
        assert metrics["random"]["golden_recall"]["0.25"] < 0.5


def test_options_and_refusals(planted, monkeypatch):
    options = dict(loss="focal", pos_weight=2.0, target_layers=[2], rank=4, ensemble="mean")
    indexer, metrics = train_indexer(planted, epochs=1, progress=False, **options)
    assert indexer.config.target_layers == (2,) and indexer.config.rank == 4 and indexer.config.ensemble == "mean"
    assert metrics["train"]["loss"] == "focal"
    # dumps too large to keep in memory are streamed shard by shard, in a seeded order too
    monkeypatch.setattr(train_module, "CACHE_BYTES", 0)
    streamed = [train_indexer(planted, epochs=1, progress=False)[0] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(streamed[0].state_dict().values(), streamed[1].state_dict().values()))
    with pytest.raises(ValueError, match=r"target layers \[0\] are not in the dump"):
        train_indexer(planted, target_layers=[0], progress=False)
    with pytest.raises(ValueError, match="loss must be one of"):
        train_indexer(planted, loss="mse", progress=False)
    with pytest.raises(ValueError, match="batch_windows must be an int >= 1"):
        train_indexer(planted, batch_windows=0, progress=False)


def test_model_without_rotary_embeddings(tmp_path):
    dump = write_planted_dump(tmp_path / "dump", rope=False, docs=(4, 2), windows_per_doc=6)
    indexer, metrics = train_indexer(dump, epochs=2, lr=1e-2, init_weights=true_query_weights(), progress=False)
    assert indexer.config.rope is False
    assert metrics["query_aware"]["golden_recall"]["0.25"] > 0.9 and metrics["indexer"]["golden_recall"]["0.25"] > 0.9


NO_TRANSFORMERS = """
import importlib.abc, importlib.util, json, sys, types

class Blocked(importlib.abc.MetaPathFinder):
    # transformers (hence any model code or weights) cannot be imported in this process
    def find_spec(self, name, path=None, target=None):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError(f"blocked for this test: {name}")
        return None

sys.meta_path.insert(0, Blocked())
try:
    import lsa_rewrite
    parent = "package"
except ImportError:
    # lsa_rewrite/__init__ imports the conversion stack, which needs transformers: load the
    # indexer subpackage under a bare parent package instead (what the test is about).
    spec = importlib.util.find_spec("lsa_rewrite")
    stub = types.ModuleType("lsa_rewrite")
    stub.__path__ = list(spec.submodule_search_locations)
    sys.modules["lsa_rewrite"] = stub
    parent = "stub"
from lsa_rewrite.indexer import train as train_module
from lsa_rewrite.indexer.train import train_indexer
from lsa_rewrite.indexer.model import LSAIndexer

indexer, metrics = train_indexer(sys.argv[1], out=sys.argv[2], epochs=1, progress=True)
LSAIndexer.load(sys.argv[2])
loaded = sorted(name for name in sys.modules if name.startswith(("transformers", "lsa_rewrite.convert", "lsa_rewrite.loading")))
print(json.dumps({"parent": parent, "loaded": loaded if parent == "stub" else [], "recall": metrics["indexer"]["golden_recall"]["0.25"]}))
"""


def test_training_runs_where_transformers_cannot_be_imported(planted, tmp_path):
    out = tmp_path / "ix.safetensors"
    script = tmp_path / "no_transformers.py"
    script.write_text(textwrap.dedent(NO_TRANSFORMERS))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(script), str(planted), str(out)]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["loaded"] == [], result
    assert 0.0 <= result["recall"] <= 1.0
    assert out.is_file()


def test_a_batch_of_always_resident_chunks_only_gives_a_zero_loss():
    from lsa_rewrite.indexer.train import _make_loss

    logits = torch.randn(2, 3, 4, requires_grad=True)
    for kind in ("bce", "focal", "bce+listwise"):
        batch = {"golden": torch.zeros(2, 4), "mask": torch.zeros(2, 4, dtype=torch.bool), "mass": torch.rand(2, 5, 4)}
        value = _make_loss(kind, None)(logits, batch)
        assert value.item() == 0.0
        value.backward()  # still a graph: training steps on such a batch do nothing
        assert torch.isfinite(logits.grad).all()


def test_listwise_loss_with_a_window_without_selectable_chunks_has_finite_gradients():
    from lsa_rewrite.indexer.train import _make_loss

    logits = torch.randn(2, 3, 4, requires_grad=True)
    mask = torch.tensor([[False] * 4, [True, True, False, True]])
    batch = {"golden": torch.tensor([[0.0] * 4, [1.0, 0, 0, 0]]), "mask": mask, "mass": torch.rand(2, 5, 4)}
    value = _make_loss("bce+listwise", None)(logits, batch)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()
    assert (logits.grad[0] == 0).all() and (logits.grad[1, :, 2] == 0).all()  # masked chunks learn nothing


def test_span_rule_is_saved_and_used_in_the_held_out_metrics(planted, tmp_path):
    """``neighbour_margin`` changes no weight (not in the loss) but is saved and applied in the metrics;
    the CLI passes it through and refuses a negative margin."""
    from typer.testing import CliRunner

    from lsa_rewrite.cli import app

    plain, m_plain = train_indexer(planted, epochs=1, batch_windows=8, seed=1, progress=False)
    ruled, m_ruled = train_indexer(planted, epochs=1, batch_windows=8, seed=1, neighbour_margin=0.0, progress=False)
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, ruled.state_dict()[name]), name
    assert ruled.config.neighbour_margin == 0.0 and plain.config.neighbour_margin is None
    assert m_ruled["indexer"]["golden_recall"] != m_plain["indexer"]["golden_recall"]  # margin 0: neighbours tie
    _, m_gated = train_indexer(planted, epochs=1, batch_windows=8, seed=1, neighbour_margin=0.0, neighbour_min_free=10**6, progress=False)
    for key in ("golden_recall", "mass_recall"):  # no budget leaves that many free slots: the rule never ranks
        assert m_gated["indexer"][key] == m_plain["indexer"][key]
    out = tmp_path / "ruled.safetensors"
    result = CliRunner().invoke(app, ["train", str(planted), "--out", str(out), "--epochs", "1", "--neighbour-margin", "0.5", "--neighbour-min-free", "9", "--neighbour-top", "2"])
    assert result.exit_code == 0, result.output
    config = LSAIndexer.load(out).config
    assert (config.neighbour_margin, config.neighbour_min_free, config.neighbour_top) == (0.5, 9, 2)
    bad = CliRunner().invoke(app, ["train", str(planted), "--out", str(out), "--neighbour-margin", "-1"])
    assert bad.exit_code == 2 and "--neighbour-margin must be a number of logits >= 0" in " ".join(bad.output.split())


def test_selection_metrics_rank_per_budget_with_a_function_of_k():
    """A ranking that depends on how many chunks the budget keeps (the gated span rule) is asked per budget."""
    from lsa_rewrite.indexer.metrics import SelectionMetrics

    golden = torch.tensor([False, True, False, False, True, False, False, False, False, False])
    mass = golden.float()[None]
    asked = []

    def ranking(k):
        asked.append(k)
        return torch.arange(10.0) if k < 3 else -torch.arange(10.0)  # few chunks: newest first; else oldest first

    m = SelectionMetrics((0.1, 0.5))
    m.add(ranking, golden, mass)
    assert asked == [1, 5]
    result = m.result()
    assert result["golden_recall"] == {"0.1": 0.0, "0.5": 1.0}  # k=1 keeps chunk 9; k=5 keeps chunks 0-4
    # a perfect ranking keeps one of the two golden chunks at k=1 and both at k=5
    assert result["golden_recall_ceiling"] == {"0.1": 0.5, "0.5": 1.0}
    assert result["golden_share"] == pytest.approx(0.2)


def test_several_dumps_train_one_indexer(planted, tmp_path):
    """Dumps of one model (calibrated separately: other lengths, other documents) train one indexer on
    all their windows, each held-out split kept; a one-dump list is the dump; dumps of another model,
    chunking or label rule are refused with the field named (CLI too)."""
    from typer.testing import CliRunner

    from lsa_rewrite.cli import app

    second = write_planted_dump(tmp_path / "second", docs=(6, 2), seed=5)
    alone, m_alone = train_indexer(planted, epochs=1, batch_windows=8, seed=2, progress=False)
    listed, _ = train_indexer([planted], epochs=1, batch_windows=8, seed=2, progress=False)
    for name, tensor in alone.state_dict().items():
        assert torch.equal(tensor, listed.state_dict()[name]), name
    both, m_both = train_indexer([planted, second], epochs=2, batch_windows=8, seed=2, progress=False)
    assert m_both["train"]["windows"] == m_alone["train"]["windows"] + 6 * 12
    assert m_both["heldout"]["windows"] == m_alone["heldout"]["windows"] + 2 * 12
    assert m_both["train"]["documents"] == 14 + 6 and m_both["train"]["dumps"] == [str(planted), str(second)]
    assert m_both["indexer"]["golden_recall"]["0.25"] > m_both["random"]["golden_recall"]["0.25"]  # it learnt from both

    def edited(name, change):
        path = tmp_path / name
        shutil.copytree(second, path)
        manifest = json.loads((path / "manifest.json").read_text())
        change(manifest)
        (path / "manifest.json").write_text(json.dumps(manifest))
        return path

    other_chunk = edited("chunk", lambda m: m["lsa_config"]["_data"].update(chunk_size=2 * C))
    other_model = edited("model", lambda m: m["model"].update(num_layers=8))
    for path, field in ((other_chunk, "chunk_size"), (other_model, "model signature")):
        with pytest.raises(ValueError, match=f"differ in {field}"):
            train_indexer([planted, path], epochs=1, progress=False)
    out = tmp_path / "both.safetensors"
    result = CliRunner().invoke(app, ["train", str(planted), str(second), "--out", str(out), "--epochs", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout[result.stdout.index("{"):])["train"]["dumps"] == [str(planted), str(second)] and out.exists()
    bad = CliRunner().invoke(app, ["train", str(planted), str(other_chunk), "--out", str(out)])
    assert bad.exit_code == 2 and "differ in chunk_size" in " ".join(bad.output.split())


def test_reply_weight_repeats_the_windows_at_a_reply(planted, tmp_path):
    """``reply_weight=R``: a training window at or after its task's reply start (recorded in the manifest)
    is drawn R times per epoch, the others once, held-out windows are not weighted; the training differs
    from R=1 by that alone. Dumps without reply positions are refused for R > 1 (CLI too)."""
    from typer.testing import CliRunner

    from lsa_rewrite.cli import app
    from lsa_rewrite.indexer.dump import CalibrationDump

    marked = tmp_path / "marked"
    shutil.copytree(planted, marked)
    manifest = json.loads((marked / "manifest.json").read_text())
    for entry in manifest["documents"][::2]:
        entry["answer"] = 320  # windows start at multiples of 16 in [128, 512]
    (marked / "manifest.json").write_text(json.dumps(manifest))

    dump = CalibrationDump(marked)
    assert dump.has_replies and not CalibrationDump(planted).has_replies
    replies = [(int(r["meta"][0]), int(r["meta"][1])) for r in dump.windows("train") if dump.at_reply(r)]
    want = [(d, t) for r in dump.windows("train") for d, t in [r["meta"][:2].tolist()] if d % 2 == 0 and t >= 320]
    assert replies == want and 0 < len(replies) < dump.count("train")
    assert dump.count_replies("train") == len(replies) and dump.count_replies() > len(replies)  # held-out ones too

    for cache in (True, False):
        windows = train_module._Windows(dump, "train", [0, 1], cache=cache, reply_weight=3)
        drawn = [(tuple(w["hidden"].flatten().tolist()), w["reply"]) for w in windows.shuffled(torch.Generator().manual_seed(0))]
        assert len(drawn) == windows.epoch_count == dump.count("train") + 2 * len(replies)
        counts: dict[tuple, int] = {}
        for key, _ in drawn:
            counts[key] = counts.get(key, 0) + 1
        assert sorted(counts.values()) == sorted([3] * len(replies) + [1] * (dump.count("train") - len(replies)))
        assert all(counts[key] == (3 if reply else 1) for key, reply in drawn)

    one, m_one = train_indexer(marked, epochs=1, batch_windows=8, seed=2, progress=False)
    three, m_three = train_indexer(marked, epochs=1, batch_windows=8, seed=2, reply_weight=3, progress=False)
    assert m_three["train"]["reply_weight"] == 3 and m_three["train"]["reply_windows"] == len(replies)
    assert m_three["train"]["steps"] == math.ceil((dump.count("train") + 2 * len(replies)) / 8) > m_one["train"]["steps"]
    assert m_three["heldout"]["windows"] == m_one["heldout"]["windows"]
    assert any(not torch.equal(a, b) for a, b in zip(one.state_dict().values(), three.state_dict().values()))
    plain, _ = train_indexer(planted, epochs=1, batch_windows=8, seed=2, progress=False)
    for name, tensor in plain.state_dict().items():  # weight 1 ignores the reply marks
        assert torch.equal(tensor, one.state_dict()[name]), name

    with pytest.raises(ValueError, match="record where each task's reply starts"):
        train_indexer(planted, epochs=1, reply_weight=2, progress=False)  # no dump has replies
    old_tasks = tmp_path / "old_tasks"  # tasks calibrated before reply positions were recorded
    shutil.copytree(planted, old_tasks)
    manifest = json.loads((old_tasks / "manifest.json").read_text())
    for entry in manifest["documents"]:
        entry["source"] = "task:passkey"
    (old_tasks / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"{old_tasks} do.es. not"):
        train_indexer([marked, old_tasks], epochs=1, reply_weight=2, progress=False)
    _, m_text = train_indexer([marked, planted], epochs=1, batch_windows=8, reply_weight=3, progress=False)  # running text joins
    assert m_text["train"]["reply_windows"] == len(replies) and m_text["train"]["windows"] == 2 * dump.count("train")
    with pytest.raises(ValueError, match="reply_weight must be an int >= 1"):
        train_indexer(marked, epochs=1, reply_weight=0, progress=False)
    out = tmp_path / "r.safetensors"
    result = CliRunner().invoke(app, ["train", str(marked), "--out", str(out), "--epochs", "1", "--reply-weight", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout[result.stdout.index("{"):])["train"]["reply_weight"] == 3
    bad = CliRunner().invoke(app, ["train", str(planted), "--out", str(out), "--reply-weight", "2"])
    assert bad.exit_code == 2 and "reply starts" in " ".join(bad.output.split())


@pytest.fixture(scope="module")
def planted_groups(tmp_path_factory):
    return write_planted_dump(tmp_path_factory.mktemp("planted_groups") / "dump", split_groups=True, docs=(14, 3))


def test_group_labels_come_from_each_groups_own_layers(planted_groups):
    """ensemble='group': target layer i's labels are the rule over its group's rows of the mass only."""
    from lsa_rewrite.indexer.dump import CalibrationDump, golden_labels
    from lsa_rewrite.indexer.dump import selectable_chunks

    dump = CalibrationDump(planted_groups)
    rows = [[0, 1], [2, 3]]
    windows = train_module._Windows(dump, "heldout", [0, 1], cache=True, label={"rule": "mean", "top_p": 0.6, "rows": rows})
    record = next(dump.windows("heldout"))
    prepared = next(windows.ordered())
    keep = selectable_chunks(record["mass"].shape[1], int(record["meta"][1]), dump.lsa_config)
    assert prepared["golden"].shape == (2, record["mass"].shape[1])
    for i, r in enumerate(rows):
        assert torch.equal(prepared["golden"][i], golden_labels(record["mass"][r], 0.6, selectable=keep, rule="mean"))
    assert not torch.equal(prepared["golden"][0], prepared["golden"][1])  # the groups attend different chunks


def test_group_training_learns_each_groups_chunks(planted_groups, tmp_path):
    """Two layer groups attending different chunks: the group indexer learns each target layer's own set
    (held-out recall against its group's labels), where one ranking for all layers cannot; the file
    carries the groups, and the CLI trains the same indexer."""
    from typer.testing import CliRunner

    from lsa_rewrite.cli import app
    from lsa_rewrite.indexer.dump import CalibrationDump
    from lsa_rewrite.indexer.metrics import SelectionMetrics

    options = dict(epochs=6, lr=1e-2, batch_windows=16, seed=0, label_rule="mean", top_p=0.6, progress=False)
    grouped, m_group = train_indexer(planted_groups, ensemble="group", out=tmp_path / "g.safetensors", **options)
    assert grouped.config.layer_groups == ((0, 1), (2, 3))
    assert m_group["train"]["label"]["groups"] == [[0, 1], [2, 3]]
    assert m_group["train"]["train_loss"][-1] < 0.6 * m_group["train"]["train_loss_initial"]
    assert m_group["indexer"]["golden_recall"]["0.25"] > 0.9 > m_group["untrained"]["golden_recall"]["0.25"] + 0.2
    assert m_group["heldout"]["windows"] == 3 * 12  # 3 held-out documents x 12 windows (each scored once per group)
    # The same data under one shared ranking (max), measured against each group's own labels: worse.
    shared, _ = train_indexer(planted_groups, ensemble="max", **options)
    rows = [[0, 1], [2, 3]]
    heldout = train_module._Windows(CalibrationDump(planted_groups), "heldout", [0, 1], cache=True, label={"rule": "mean", "top_p": 0.6, "rows": rows})
    one, own = SelectionMetrics(), SelectionMetrics()
    with torch.no_grad():
        for record in heldout.ordered():
            batch = train_module._collate([record], torch.device("cpu"))
            args = (batch["hidden"], batch["cos"], batch["sin"], batch["kmin"], batch["kmax"])
            ranking, per_group = shared(*args)[0], grouped(*args)[0]  # [N] for every layer; [2, N] per group
            for i, r in enumerate(rows):
                one.add(ranking, record["golden"][i], record["mass"][r], selectable=record["selectable"])
                own.add(per_group[i], record["golden"][i], record["mass"][r], selectable=record["selectable"])
    for budget in ("0.05", "0.1", "0.135"):
        assert own.result()["golden_recall"][budget] > one.result()["golden_recall"][budget] + 0.1
    loaded = LSAIndexer.load(tmp_path / "g.safetensors")
    assert loaded.config == grouped.config
    out = tmp_path / "cli.safetensors"
    result = CliRunner().invoke(app, ["train", str(planted_groups), "--out", str(out), "--epochs", "1", "--ensemble", "group"])
    assert result.exit_code == 0, result.output
    assert LSAIndexer.load(out).config.layer_groups == ((0, 1), (2, 3))
    bad = CliRunner().invoke(app, ["train", str(planted_groups), "--out", str(out), "--ensemble", "sum"])
    assert bad.exit_code == 2 and "--ensemble must be max, mean or group" in " ".join(bad.output.split())
    _, m_vote = train_indexer(planted_groups, ensemble="group", label_rule="vote", epochs=1, progress=False)
    assert m_vote["train"]["label"]["min_layers"] == [1, 1]  # half of each group's two layers
    with pytest.raises(ValueError, match="not sparse layers of the dump's model"):
        train_indexer(planted_groups, ensemble="group", layer_groups=[[0, 1], [2, 7]], epochs=0, progress=False)
    with pytest.raises(ValueError, match="only used with ensemble='group'"):
        train_indexer(planted_groups, layer_groups=[[0, 1], [2, 3]], epochs=0, progress=False)


def test_group_shared_changes_no_weight_and_applies_in_the_heldout_metrics(planted_groups, tmp_path):
    """``group_shared`` is a selection rule: the same weights as without it; its held-out metrics rank each
    group by the union (at 1.0 the shared ranking alone, which misses the other group's chunks), and the CLI
    saves it with the groups only."""
    from typer.testing import CliRunner

    from lsa_rewrite.cli import app

    options = dict(ensemble="group", epochs=6, lr=1e-2, batch_windows=16, seed=0, label_rule="mean", top_p=0.6, progress=False)
    own, m_own = train_indexer(planted_groups, **options)
    union, m_union = train_indexer(planted_groups, group_shared=1.0, **options)
    for name, tensor in own.state_dict().items():
        assert torch.equal(tensor, union.state_dict()[name]), name
    assert union.config.group_shared == 1.0
    for budget in ("0.05", "0.1", "0.135"):
        assert m_own["indexer"]["golden_recall"][budget] > m_union["indexer"]["golden_recall"][budget] + 0.1, budget
    assert m_own["recency"] == m_union["recency"]  # the baselines are not the indexer's rule
    out = tmp_path / "u.safetensors"
    result = CliRunner().invoke(app, ["train", str(planted_groups), "--out", str(out), "--epochs", "1", "--ensemble", "group", "--group-shared", "0.5"])
    assert result.exit_code == 0, result.output
    assert LSAIndexer.load(out).config.group_shared == 0.5
    bad = CliRunner().invoke(app, ["train", str(planted_groups), "--out", str(out), "--group-shared", "0.5"])
    assert bad.exit_code == 2 and "needs --ensemble group" in " ".join(bad.output.split())
