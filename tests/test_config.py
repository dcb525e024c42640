"""Tests for ``LSAConfig``: validation messages, defaults, and the versioned JSON form."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lsa_rewrite.config import LSAConfig


def test_defaults_are_sane():
    cfg = LSAConfig()
    assert cfg.interval == 64
    assert isinstance(cfg.budget, float) and 0.0 < cfg.budget <= 1.0
    size = cfg.chunk_size
    assert size >= 1 and size & (size - 1) == 0
    assert cfg.sink_tokens >= 0 and cfg.recent_tokens >= 0
    assert (cfg.mode, cfg.selector, cfg.capture_cache) == ("offload", "query-aware", "static")
    assert cfg.max_context is None and cfg.version == 1


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        LSAConfig().budget = 0.5  # type: ignore[misc]


@pytest.mark.parametrize(
    "cfg",
    [
        LSAConfig(),
        LSAConfig(budget=0.25, chunk_size=16, interval=8, sink_tokens=0, recent_tokens=32, mode="evict", selector="recency", seed=7),
        LSAConfig(budget=512, chunk_size=1, interval=1, mode="dense", selector="random", max_context=4096, capture_cache="dynamic"),
        LSAConfig(budget=1.0, selector="indexer"),
        LSAConfig(budget=1),
        LSAConfig(compile="aot_eager"),
        LSAConfig(mirror="fp8"),
    ],
    ids=["default", "evict", "int-budget", "float-1.0", "int-1", "compile-backend", "fp8-mirror"],
)
def test_json_round_trip(cfg):
    text = cfg.to_json()
    back = LSAConfig.from_json(text)
    assert back == cfg
    # an int budget counts tokens and a float one is a fraction: the type must survive the trip
    assert type(back.budget) is type(cfg.budget)
    assert LSAConfig.from_dict(json.loads(text)) == cfg
    assert LSAConfig.from_dict(cfg.to_dict()) == cfg


def test_dict_form_is_versioned():
    d = LSAConfig(budget=0.5).to_dict()
    assert set(d) == {"_type", "_version", "_data"}
    assert d["_type"] == "LSAConfig" and d["_version"] == 1
    assert "version" not in d["_data"] and d["_data"]["budget"] == 0.5
    assert set(d["_data"]) == {f.name for f in dataclasses.fields(LSAConfig)} - {"version"}
    assert json.loads(LSAConfig().to_json()) == LSAConfig().to_dict()


@pytest.mark.parametrize(
    "field, value",
    [
        ("budget", 0),
        ("budget", 0.0),
        ("budget", 1.5),
        ("budget", -3),
        ("budget", -0.1),
        ("budget", float("nan")),
        ("budget", True),
        ("budget", "x"),
        ("budget", None),
        ("chunk_size", 0),
        ("chunk_size", 3),
        ("chunk_size", 48),
        ("chunk_size", -16),
        ("chunk_size", 16.0),
        ("chunk_size", True),
        ("interval", 0),
        ("interval", -4),
        ("interval", 2.0),
        ("sink_tokens", -1),
        ("sink_tokens", 1.5),
        ("recent_tokens", -8),
        ("mode", "sparse"),
        ("mode", "OFFLOAD"),
        ("selector", "quest"),
        ("selector", None),
        ("max_context", 0),
        ("max_context", 100.0),
        ("capture_cache", "paged"),
        ("compile", 1),
        ("compile", "no-such-backend"),
        ("compile", "lsa"),
        ("mirror", "int8"),
        ("mirror", None),
    ],
)
def test_bad_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        LSAConfig(**{field: value})


def test_fp8_mirror_in_evict_mode_names_both_fields():
    with pytest.raises(ValueError, match=r"mirror='fp8' with mode='evict'.*mode='offload'"):
        LSAConfig(mode="evict", mirror="fp8")


def test_fp8_mirror_needs_float8(monkeypatch):
    import torch

    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(ValueError, match=r"mirror='fp8' needs a torch with torch.float8_e4m3fn.*mirror='exact'"):
        LSAConfig(mirror="fp8")
    assert LSAConfig(mirror="exact").mirror == "exact"


def test_older_json_without_mirror_reads_as_exact():
    d = LSAConfig().to_dict()
    del d["_data"]["mirror"]
    assert LSAConfig.from_dict(d).mirror == "exact"


def test_bad_value_from_dict_names_the_field():
    d = LSAConfig().to_dict()
    d["_data"]["interval"] = 0
    with pytest.raises(ValueError, match="interval"):
        LSAConfig.from_dict(d)


def test_unknown_field_in_from_dict_names_it():
    d = LSAConfig().to_dict()
    d["_data"]["lookahead"] = 3
    with pytest.raises(ValueError, match=r"unknown LSAConfig fields \['lookahead'\]"):
        LSAConfig.from_dict(d)


@pytest.mark.parametrize("obj", [{}, {"_type": "Other", "_data": {}}, {"_type": "LSAConfig"}, [1, 2]], ids=["empty", "other-type", "no-data", "list"])
def test_from_dict_refuses_what_is_not_an_lsa_config(obj):
    with pytest.raises(ValueError, match="not an LSAConfig dict"):
        LSAConfig.from_dict(obj)


def test_unsupported_version_is_refused():
    d = LSAConfig().to_dict()
    d["_version"] = 2
    with pytest.raises(ValueError, match="version 2"):
        LSAConfig.from_dict(d)


@pytest.mark.parametrize("budget", [1e-6, 1.0, 1, 10**9])
def test_budget_edges_accepted(budget):
    assert LSAConfig(budget=budget).budget == budget
