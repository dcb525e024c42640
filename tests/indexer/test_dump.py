"""Tests for ``lsa_rewrite.indexer.dump``: the golden rule, the dump's round trip, resume, refusals."""

from __future__ import annotations

import json

import pytest
import torch

from lsa_rewrite.indexer.dump import (
    CalibrationDump,
    DumpWriter,
    default_min_layers,
    golden_labels,
    label_rule,
    rule_name,
    selectable_chunks,
)

LT, LS, HIDDEN, HQ, HKV, D, C = 2, 3, 16, 4, 2, 8, 16


def manifest(**changes) -> dict:
    base = {
        "model": {"class": "Tiny", "model_type": "tiny", "num_layers": 3, "hidden_size": HIDDEN, "q_heads": HQ, "kv_heads": HKV,
                  "head_dim": D, "sparse_layers": [0, 1, 2], "vocab_size": 50},
        "lsa_config": {"_type": "LSAConfig", "_version": 1, "_data": {"chunk_size": C, "interval": 16, "sink_tokens": C, "recent_tokens": 32}},
        "target_layers": [0, 2],
        "label": label_rule(LS),
        "shapes": {"hidden": HIDDEN, "q_heads": HQ, "kv_heads": HKV, "head_dim": D, "rope": True},
    }
    base.update(changes)
    return base


def record(doc: int, t: int, *, seed: int = 0, query: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = -(-t // C)
    mass = torch.rand(LS, n, generator=g) / n
    out = {
        "hidden": torch.randn(LT, HIDDEN, generator=g).half(),
        "cos": torch.rand(D, generator=g),
        "sin": torch.rand(D, generator=g),
        "kmin": torch.randn(LT, n, HKV, D, generator=g).bfloat16(),
        "kmax": torch.randn(LT, n, HKV, D, generator=g).bfloat16(),
        "mass": mass,
        "golden": golden_labels(mass, 0.6, 1),
        "meta": torch.tensor([doc, t, t - 1]),
    }
    if query:
        out["query"] = torch.randn(LT, HQ, D, generator=g)
    return out


def write_docs(writer: DumpWriter, docs: list[tuple[str, str, list[int]]], *, first_index: int = 0) -> dict[int, dict]:
    """docs: (id, split, window starts); returns the records written, by window order."""
    written = {}
    for k, (doc_id, split, starts) in enumerate(docs):
        index = writer.add_document(doc_id, source="synthetic", tokens=max(starts, default=0) + 16, split=split)
        assert index == first_index + k
        for t in starts:
            rec = record(index, t, seed=1000 * index + t)
            writer.add_window(rec)
            written[len(written)] = rec
    return written


# -- the golden rule ----------------------------------------------------------------------------


def test_golden_labels_hand_computed():
    mass = torch.tensor(
        [
            [0.10, 0.40, 0.20, 0.00, 0.10],  # shares .125 .5 .25 0 .125 -> keeps 1 (.5), 2 (.75 >= .6)
            [0.30, 0.00, 0.00, 0.30, 0.00],  # .5 0 0 .5 0 -> keeps 0 then 3 (tie: lower index first)
            [0.00, 0.35, 0.00, 0.05, 0.40],  # 0 .4375 0 .0625 .5 -> keeps 4, then 1 (.9375)
        ]
    )
    assert golden_labels(mass, top_p=0.6, min_layers=1).tolist() == [True, True, True, True, True]
    assert golden_labels(mass, top_p=0.6, min_layers=2).tolist() == [False, True, False, False, False]
    assert golden_labels(mass, top_p=0.6, min_layers=3).tolist() == [False] * 5
    # top_p=0.5: the first chunk of each layer already reaches it
    assert golden_labels(mass, top_p=0.5, min_layers=1).tolist() == [True, True, False, False, True]


def test_golden_labels_mean_rule_hand_computed():
    mass = torch.tensor(
        [
            [0.10, 0.40, 0.20, 0.00, 0.10],  # shares .125 .5 .25 0 .125
            [0.30, 0.00, 0.00, 0.30, 0.00],  # .5 0 0 .5 0
            [0.00, 0.35, 0.00, 0.05, 0.40],  # 0 .4375 0 .0625 .5
        ]
    )
    # layer mean: .2083 .3125 .0833 .1875 .2083 -> 1 (.3125), then 0 and 4 tie (.2083; lower index
    # first): 0 reaches .52 < .6, 4 reaches .73
    assert golden_labels(mass, top_p=0.6, rule="mean").tolist() == [True, True, False, False, True]
    assert golden_labels(mass, top_p=0.3, rule="mean").tolist() == [False, True, False, False, False]
    # the vote ignores a chunk that one layer reads heavily; the mean keeps it
    needle = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.5, 0.4], [0.1, 0.4, 0.5]])
    assert golden_labels(needle, top_p=0.3, min_layers=2).tolist() == [False, False, False]
    assert golden_labels(needle, top_p=0.3, rule="mean").tolist() == [True, False, False]
    # min_layers does not apply to the mean; the selectable mask does
    assert golden_labels(needle, top_p=0.3, min_layers=3, rule="mean").tolist() == [True, False, False]
    keep = torch.tensor([False, True, True])
    # over chunks 1-2 the shares are .5/.5, .556/.444, .444/.556: a tie of means, the lower index wins
    assert golden_labels(needle, top_p=0.3, rule="mean", selectable=keep).tolist() == [False, True, False]
    with pytest.raises(ValueError, match="rule"):
        golden_labels(needle, rule="max")


def test_golden_labels_edges():
    # reaching top_p exactly stops the nucleus; a layer without mass keeps nothing
    mass = torch.tensor([[0.6, 0.4], [0.0, 0.0]])
    assert golden_labels(mass, top_p=0.6, min_layers=1).tolist() == [True, False]
    assert golden_labels(torch.tensor([[0.2, 0.1, 0.7]]), top_p=1.0, min_layers=1).tolist() == [True, True, True]
    with pytest.raises(ValueError, match="top_p"):
        golden_labels(mass, top_p=0.0)
    with pytest.raises(ValueError, match=r"\[layers, chunks\]"):
        golden_labels(mass[0])


def test_golden_labels_leave_out_the_always_resident_chunks():
    # Chunk 0 (the sink) holds most of every layer's mass; left out, the nucleus is over chunks 1-3.
    mass = torch.tensor([[0.70, 0.05, 0.20, 0.05], [0.60, 0.25, 0.10, 0.05]])
    assert golden_labels(mass, top_p=0.6, min_layers=2).tolist() == [True, False, False, False]
    selectable = torch.tensor([False, True, True, True])
    # shares over 1-3: layer 0 .167 .667 .167 -> keeps 2; layer 1 .625 .25 .125 -> keeps 1
    assert golden_labels(mass, top_p=0.6, min_layers=1, selectable=selectable).tolist() == [False, True, True, False]
    assert golden_labels(mass, top_p=0.6, min_layers=2, selectable=selectable).tolist() == [False] * 4
    with pytest.raises(ValueError, match="selectable"):
        golden_labels(mass, selectable=torch.ones(3, dtype=torch.bool))


def test_selectable_chunks_follow_the_runtime_rule():
    lsa = {"chunk_size": 16, "sink_tokens": 16, "recent_tokens": 32}
    # t = 100: chunks 0..6 written; sink chunk 0, tail tokens 68..99 -> chunks 4, 5, 6
    assert selectable_chunks(7, 100, lsa).tolist() == [False, True, True, True, False, False, False]
    assert selectable_chunks(7, 100, {"_data": {**lsa, "sink_tokens": 0}}).tolist() == [True, True, True, True, False, False, False]


def test_min_layers_rule():
    assert [default_min_layers(n) for n in (1, 4, 15, 30, 32)] == [1, 2, 8, 15, 16]
    assert label_rule(30, rule="vote") == {"rule": "vote", "top_p": 0.3, "min_layers": 15, "exclude": "always-resident"}
    assert label_rule(30) == {"rule": "mean", "top_p": 0.3, "min_layers": 1, "exclude": "always-resident"}
    # manifests written before the rule was a choice say "nucleus": the vote
    assert rule_name({"rule": "nucleus", "top_p": 0.3, "min_layers": 15}) == "vote"
    assert rule_name(label_rule(30)) == "mean"


# -- round trip ---------------------------------------------------------------------------------


def test_round_trip_shards_and_splits(tmp_path):
    writer = DumpWriter(tmp_path / "dump", manifest(), shard_windows=3)
    written = write_docs(writer, [("a", "train", [32, 48]), ("b", "train", [32, 64, 80]), ("c", "heldout", [48]), ("d", "train", [])])
    writer.close()
    dump = CalibrationDump(tmp_path / "dump")
    assert dump.manifest["complete"] is True
    assert [s["windows"] for s in dump.manifest["shards"]] == [5, 1]  # documents stay whole
    assert [d["id"] for d in dump.documents] == ["a", "b", "c", "d"]
    assert len(dump) == 6 and dump.count("train") == 5 and dump.count("heldout") == 1
    assert set(dump.manifest["versions"]) == {"lsa_rewrite", "torch", "transformers"}
    records = list(dump.windows())
    assert [r["window"] for r in records] == list(range(6))
    for i, rec in enumerate(records):
        assert rec["split"] == ("heldout" if i == 5 else "train")
        for field, value in written[i].items():
            assert rec[field].dtype == value.dtype and torch.equal(rec[field], value), field
    assert [int(r["meta"][0]) for r in dump.windows("heldout")] == [2]
    assert not list(tmp_path.glob("dump/.*.tmp"))


def test_optional_query_field_round_trips(tmp_path):
    writer = DumpWriter(tmp_path, manifest())
    writer.add_document("a", source="s", tokens=64, split="train")
    rec = record(0, 48, query=True)
    writer.add_window(rec)
    writer.close()
    (back,) = CalibrationDump(tmp_path).windows()
    assert torch.equal(back["query"], rec["query"])


def test_manifest_follows_each_shard_and_resume_skips_finished_documents(tmp_path):
    out = tmp_path / "dump"
    writer = DumpWriter(out, manifest(), shard_windows=2)
    written = write_docs(writer, [("a", "train", [32, 48]), ("b", "heldout", [32])])  # "a" is flushed when "b" begins
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["complete"] is False and [d["id"] for d in on_disk["documents"]] == ["a"]
    del writer  # interrupted: "b" was still buffered
    with pytest.raises(ValueError, match="is incomplete"):
        CalibrationDump(out)
    assert len(CalibrationDump(out, allow_incomplete=True)) == 2

    resumed = DumpWriter(out, manifest(), shard_windows=2)
    assert resumed.finished == {"a"}
    written_b = write_docs(resumed, [("b", "heldout", [32]), ("c", "train", [64])], first_index=1)
    resumed.close()
    dump = CalibrationDump(out)
    assert [d["id"] for d in dump.documents] == ["a", "b", "c"]
    records = list(dump.windows())
    expected = [written[0], written[1], written_b[0], written_b[1]]
    assert len(records) == 4
    for rec, want in zip(records, expected):
        assert torch.equal(rec["kmin"], want["kmin"]) and torch.equal(rec["meta"], want["meta"])
    # a complete dump opens as fully finished
    assert DumpWriter(out, manifest()).finished == {"a", "b", "c"}


def test_resume_refuses_a_different_setup(tmp_path):
    DumpWriter(tmp_path, manifest())
    with pytest.raises(ValueError, match="different 'target_layers'"):
        DumpWriter(tmp_path, manifest(target_layers=[0, 1]))


# -- writer refusals ----------------------------------------------------------------------------


def test_writer_refusals(tmp_path):
    with pytest.raises(ValueError, match=r"needs the entries \['shapes'\]"):
        DumpWriter(tmp_path / "x", {k: v for k, v in manifest().items() if k != "shapes"})
    writer = DumpWriter(tmp_path / "w", manifest())
    with pytest.raises(ValueError, match="call add_document first"):
        writer.add_window(record(0, 32))
    with pytest.raises(ValueError, match="split must be one of"):
        writer.add_document("a", source="s", tokens=10, split="test")
    writer.add_document("a", source="s", tokens=64, split="train")
    with pytest.raises(ValueError, match="already in the dump"):
        writer.add_document("a", source="s", tokens=64, split="train")
    rec = record(0, 32)
    with pytest.raises(ValueError, match=r"lacks fields \['cos'\]"):
        writer.add_window({k: v for k, v in rec.items() if k != "cos"})
    with pytest.raises(ValueError, match=r"unknown fields \['extra'\]"):
        writer.add_window({**rec, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="'mass' has shape"):
        writer.add_window({**rec, "mass": rec["mass"][:2]})
    with pytest.raises(ValueError, match="kmin/kmax shape"):
        writer.add_window({**rec, "kmin": rec["kmin"][..., :4], "kmax": rec["kmax"][..., :4]})
    with pytest.raises(ValueError, match="'golden' must be bool"):
        writer.add_window({**rec, "golden": rec["golden"].float()})
    with pytest.raises(ValueError, match="meta.0.=1 is not the current document's index 0"):
        writer.add_window({**rec, "meta": torch.tensor([1, 32, 31])})
    writer.add_window(rec)
    writer.close()
    with pytest.raises(ValueError, match="is closed"):
        writer.add_document("b", source="s", tokens=64, split="train")


# -- reader refusals ----------------------------------------------------------------------------


@pytest.fixture
def small_dump(tmp_path):
    out = tmp_path / "dump"
    writer = DumpWriter(out, manifest(), shard_windows=1)
    write_docs(writer, [("a", "train", [32]), ("b", "heldout", [48])])
    writer.close()
    return out


def test_reader_refusals(small_dump, tmp_path):
    with pytest.raises(FileNotFoundError, match="no calibration dump at"):
        CalibrationDump(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no manifest.json"):
        CalibrationDump(tmp_path / "empty")
    path = small_dump / "manifest.json"
    good = path.read_text()
    path.write_text(good[:-20])
    with pytest.raises(ValueError, match="manifest.json is corrupt"):
        CalibrationDump(small_dump)
    path.write_text(json.dumps({**json.loads(good), "_type": "Other"}))
    with pytest.raises(ValueError, match="not a calibration dump manifest"):
        CalibrationDump(small_dump)
    path.write_text(json.dumps({**json.loads(good), "_version": 9}))
    with pytest.raises(ValueError, match="version 9 is not supported"):
        CalibrationDump(small_dump)
    path.write_text(good)
    shard = small_dump / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:50])
    dump = CalibrationDump(small_dump)
    assert len(list(dump.shard(0))) == 1
    with pytest.raises(ValueError, match="shard shard-00001.safetensors is corrupt"):
        list(dump.windows())
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="lists shard shard-00001.safetensors, which is missing"):
        CalibrationDump(small_dump)
