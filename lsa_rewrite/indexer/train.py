"""Backbone-free indexer training: reads a calibration dump, never the model.

``train_indexer(dump, ...)`` builds an ``LSAIndexer`` for the dump's target layers, initialises it,
trains every target layer's logits against the window's golden chunks (BCE or focal loss over all
chunks of each window; windows of different N are padded and masked), and measures it on the
held-out documents against the untrained indexer and the baselines (``metrics.py``).

Initialisation, in order of preference:
1. ``init_weights``: the model's query projections ``W_q`` per target layer (truncated SVD);
2. the dump's recorded queries (field ``query``): ``W_q`` fitted by ridge regression from the recorded
   hidden states to the recorded queries with the rotary embedding undone (for models with a query
   norm this also absorbs the norm's average effect), then the same SVD;
3. otherwise random query projections from the seed.
Then each target layer's logit scale and bias are fitted to the training windows (Platt scaling: a
one-dimensional logistic regression on the layer's raw score), which leaves each layer's ranking as
it is and starts the threshold at a calibrated point. That calibrated state is the "untrained"
indexer of the metrics.

Not here: the model, ``transformers``, the runtime (this module must import without them).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .dump import DEFAULT_TOP_P, LABEL_RULES, CalibrationDump, default_min_layers, rule_name
from .metrics import BUDGETS, SelectionMetrics, query_aware_scores, random_scores, recency_scores
from .model import IndexerConfig, LSAIndexer, apply_rope, default_rank, lsa_fields, nearest_groups

LOSSES = ("bce", "focal", "bce+listwise")
LISTWISE_WEIGHT = 0.1
TRAINABLE = ("all", "heads")
FOCAL_GAMMA = 2.0
TRAIN_SPLIT, HELDOUT_SPLIT = "train", "heldout"
CACHE_BYTES = 1 << 30  # dumps up to this size are read once and kept in memory
CALIBRATION_WINDOWS = 512


def train_indexer(
    dump: str | os.PathLike | CalibrationDump | Sequence[str | os.PathLike | CalibrationDump],
    *,
    out: str | os.PathLike | None = None,
    rank: int | None = None,
    target_layers: list[int] | tuple[int, ...] | None = None,
    epochs: int = 8,
    lr: float = 1e-3,
    loss: str = "bce",
    batch_windows: int = 16,
    seed: int = 0,
    device: str | torch.device = "cpu",
    init_weights: dict[int, Tensor] | None = None,
    ensemble: str = "max",
    layer_groups: Sequence[Sequence[int]] | None = None,
    pos_weight: float | None = None,
    weight_decay: float = 0.0,
    top_p: float | None = None,
    min_layers: int | None = None,
    label_rule: str | None = None,
    trainable: str = "all",
    neighbour_margin: float | None = None,
    neighbour_min_free: int = 0,
    neighbour_top: int | None = None,
    group_shared: float = 0.0,
    reply_weight: int = 1,
    progress: bool = True,
) -> tuple[LSAIndexer, dict[str, Any]]:
    """Train an indexer on a calibration dump; returns it and its held-out metrics.

    Args:
        dump: a dump directory or an open ``CalibrationDump``, or several of them (calibrations of one
            model at different lengths or on different documents, each with its own held-out split):
            their windows train one indexer. They must agree on the model signature, target layers,
            shapes, chunk size, interval and label rule (sink and tail may differ).
        out: write the indexer here (``.safetensors``, with config, model signature, the dump's
            ``chunk_size``/``interval`` and the metrics in its metadata).
        rank: query-tower rank (``default_rank`` of the model's hidden size when ``None``).
        target_layers: a subset of the dump's target layers (all of them when ``None``).
        epochs, lr, batch_windows, weight_decay: AdamW over ``epochs`` passes of the training windows,
            ``batch_windows`` windows per step, learning rate on a cosine decay to a tenth.
        loss: ``"bce"`` or ``"focal"`` (gamma 2), over all chunks of every window; ``"bce+listwise"``
            adds ``LISTWISE_WEIGHT`` x the KL divergence from the window's layer-averaged attention shares
            to the softmax of the logits over its selectable chunks (a ranking target on top of the labels).
        pos_weight: weight of golden chunks in the loss (``None``: 1, calibrated probabilities).
        seed: shuffling, random initialisation and the random baseline; two runs with the same
            arguments give identical weights.
        device: where training runs (``"cpu"`` or ``"cuda"``).
        init_weights: the model's query projections ``{layer: W_q [q_heads * head_dim, hidden]}``
            (see the module docstring for what happens without them).
        ensemble: ``"max"`` or ``"mean"`` over target layers, or ``"group"``: each target layer is
            trained on the golden labels of its own group of sparse layers (the label rule over those
            layers' masses only) and ranks chunks for them at run time (``IndexerConfig.layer_groups``).
        layer_groups: under ``"group"``, the model layers of each target layer (one sequence per target
            layer, disjoint, among the dump's sparse layers); ``None``: ``nearest_groups`` over the sparse layers.
        top_p, min_layers, label_rule: the golden-label rule (``dump.golden_labels``: ``"mean"`` or
            ``"vote"``, always-resident chunks left out), recomputed from the dump's recorded masses;
            ``None``: the dump's manifest values (``min_layers`` only counts under ``"vote"``).
        neighbour_margin, neighbour_min_free, neighbour_top: the span rule, saved in the indexer's config
            (``IndexerConfig``); it does not change the loss, and the held-out metrics of the trained
            and the untrained indexer apply it.
        group_shared: under ``"group"``, the share of each selection's free slots filled from the shared
            ranking (the max over target layers) before each group's own (``IndexerConfig.group_shared``);
            saved in the config, applied in the held-out metrics, not in the loss.
        reply_weight: each training window at a task's reply (``CalibrationDump.at_reply``: where the
            reply reads the answer out of the context) is seen this many times per epoch, the others
            once. 1: every window alike. Needs dumps that record reply positions (calibrated by this
            version; a dump of running text alone may join them); held-out metrics are unweighted.
        progress: show a rich progress bar.

    Example::

        >>> indexer, metrics = train_indexer("dump/", out="smollm2-indexer.safetensors")
        >>> metrics["indexer"]["golden_recall"]["0.1"], metrics["query_aware"]["golden_recall"]["0.1"]
    """
    started = time.perf_counter()
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    for name, value in (("epochs", epochs), ("batch_windows", batch_windows)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "epochs" else 1):
            raise ValueError(f"{name} must be an int >= {0 if name == 'epochs' else 1}, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not isinstance(reply_weight, int) or isinstance(reply_weight, bool) or reply_weight < 1:
        raise ValueError(f"reply_weight must be an int >= 1 (times a reply window is seen per epoch), got {reply_weight!r}")
    dumps = [d if isinstance(d, CalibrationDump) else CalibrationDump(d) for d in ([dump] if isinstance(dump, (str, os.PathLike, CalibrationDump)) else dump)]
    if not dumps:
        raise ValueError("train_indexer needs at least one calibration dump")
    dump = dumps[0]
    for other in dumps[1:]:
        _check_compatible(dump, other)
    if reply_weight > 1:
        # a dump of tasks without reply positions was written before calibration recorded them; a dump
        # of running text alone has no replies to weight and joins as it is
        unmarked = [str(d.path) for d in dumps if not d.has_replies and any(doc["source"].startswith("task:") for doc in d.documents)]
        if unmarked or not any(d.has_replies for d in dumps):
            names = ", ".join(unmarked or [str(d.path) for d in dumps])
            raise ValueError(
                f"reply_weight={reply_weight} needs dumps that record where each task's reply starts; {names} "
                "do(es) not (calibrated by an older version, or without tasks): calibrate again, or train with reply_weight=1"
            )
    device = torch.device(device)
    shapes = dump.shapes
    layers_in_dump = dump.target_layers
    chosen = list(layers_in_dump) if target_layers is None else [int(layer) for layer in target_layers]
    absent = [layer for layer in chosen if layer not in layers_in_dump]
    if absent:
        raise ValueError(f"target layers {absent} are not in the dump {dump.path} (it holds layers {layers_in_dump})")
    select = [layers_in_dump.index(layer) for layer in chosen]
    groups: tuple[tuple[int, ...], ...] | None = None
    group_rows: list[list[int]] | None = None  # per target layer: its group's rows of the dump's mass [Ls, N]
    if ensemble == "group":
        sparse = [int(layer) for layer in dump.signature.get("sparse_layers", [])]
        groups = nearest_groups(chosen, sparse) if layer_groups is None else tuple(tuple(int(i) for i in g) for g in layer_groups)
        unknown = sorted({layer for g in groups for layer in g} - set(sparse))
        if unknown:
            raise ValueError(f"layer_groups name layers {unknown} that are not sparse layers of the dump's model (sparse: {sparse})")
        group_rows = [[sparse.index(layer) for layer in g] for g in groups]
    elif layer_groups is not None:
        raise ValueError(f"layer_groups is only used with ensemble='group' (ensemble={ensemble!r})")
    hidden, q_heads, head_dim = int(shapes["hidden"]), int(shapes["q_heads"]), int(shapes["head_dim"])
    config = IndexerConfig(
        hidden_size=hidden,
        q_heads=q_heads,
        kv_heads=int(shapes["kv_heads"]),
        head_dim=head_dim,
        rank=default_rank(hidden, q_dim=q_heads * head_dim) if rank is None else rank,
        target_layers=tuple(chosen),
        ensemble=ensemble,
        rope=_dump_rope(shapes.get("rope", False), select),
        rope_style=shapes.get("rope_style", "half"),
        neighbour_margin=neighbour_margin,
        neighbour_min_free=neighbour_min_free,
        neighbour_top=neighbour_top,
        layer_groups=groups,
        group_shared=group_shared,
    )

    cache = sum(d.shard_nbytes() for d in dumps) <= CACHE_BYTES
    stored_rule = rule_name(dump.label)
    if label_rule is not None and label_rule not in LABEL_RULES:
        raise ValueError(f"label_rule must be one of {LABEL_RULES}, got {label_rule!r}")
    rule = stored_rule if label_rule is None else label_rule
    relabel = (
        top_p is not None or min_layers is not None or rule != stored_rule or dump.label.get("exclude") != "always-resident" or groups is not None
    )
    if min_layers is not None:
        layers_vote = int(min_layers)
    elif rule == "vote" and groups is not None:
        layers_vote = 1  # per group: half of its own layers (``CalibrationDump.labels``); recorded as "groups" below
    elif rule == "vote":
        layers_vote = int(dump.label.get("min_layers", 1)) if stored_rule == "vote" else default_min_layers(len(dump.signature.get("sparse_layers", [])) or 1)
    else:
        layers_vote = 1
    label = {
        "rule": rule,
        "top_p": float(dump.label.get("top_p", DEFAULT_TOP_P)) if top_p is None else float(top_p),
        "min_layers": layers_vote,
        "exclude": "always-resident",
        "from": "recomputed from the recorded masses" if relabel else "the dump's labels",
    }
    if not 0.0 < label["top_p"] <= 1.0 or label["min_layers"] < 1:
        raise ValueError(f"the label rule needs top_p in (0, 1] and min_layers >= 1, got top_p={top_p!r}, min_layers={min_layers!r}")
    if groups is not None:  # each target layer's labels come from its own group's layers
        label["groups"] = [list(g) for g in groups]
        if rule == "vote" and min_layers is None:
            label["min_layers"] = [default_min_layers(len(g)) for g in groups]
    overrides = {"top_p": label["top_p"], "min_layers": min_layers, "rule": rule} if relabel else {}
    if relabel and groups is None:
        overrides["min_layers"] = label["min_layers"]
    if group_rows is not None:
        overrides["rows"] = group_rows
    train = _Windows(dumps, TRAIN_SPLIT, select, cache=cache, label=overrides, reply_weight=reply_weight)
    heldout = _Windows(dumps, HELDOUT_SPLIT, select, cache=cache, label=overrides)
    if train.count == 0:
        names = ", ".join(str(d.path) for d in dumps)
        raise ValueError(f"no windows of split {TRAIN_SPLIT!r} to train on in calibration dump(s) {names}")

    generator = torch.Generator().manual_seed(seed)
    indexer, init = _initial_indexer(config, train, init_weights, generator)
    _fit_scale_and_bias(indexer, train)
    untrained = LSAIndexer(config)
    untrained.load_state_dict(indexer.state_dict())
    indexer.to(device)

    loss_fn = _make_loss(loss, pos_weight, group_rows)
    steps_per_epoch = math.ceil(train.epoch_count / batch_windows)
    total = epochs * steps_per_epoch
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
    if trainable == "heads":  # the query projection stays the model's own (from its W_q); the rest learns
        for t in indexer.layers:
            for name in ("down", "norm", "up"):
                getattr(t, name).requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in indexer.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    cosine = lambda step: 0.1 + 0.45 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))  # noqa: E731  (1 -> 0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)

    history: dict[str, Any] = {
        "train_loss_initial": _mean_loss(indexer, train, loss_fn, batch_windows, device),
        "heldout_loss_initial": _mean_loss(indexer, heldout, loss_fn, batch_windows, device) if heldout.count else None,
        "train_loss": [],
        "heldout_loss": [],
    }
    with _progress(progress, total) as (bar, task):
        for epoch in range(epochs):
            indexer.train()
            running, seen = 0.0, 0
            for batch in _batches(train.shuffled(generator), batch_windows, device):
                logits = indexer.logits(batch["hidden"], batch["cos"], batch["sin"], batch["kmin"], batch["kmax"])
                value = loss_fn(logits, batch)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
                schedule.step()
                chunks = int(batch["mask"].sum())
                running, seen = running + value.item() * chunks, seen + chunks
                if bar is not None:
                    bar.update(task, advance=1, description=f"epoch {epoch + 1}/{epochs} loss {running / max(seen, 1):.4f}")
            history["train_loss"].append(running / max(seen, 1))
            if heldout.count:
                history["heldout_loss"].append(_mean_loss(indexer, heldout, loss_fn, batch_windows, device))

    indexer.cpu().eval()
    metrics = _evaluate(indexer, untrained, heldout, init_weights=init_weights, select_layers=chosen, seed=seed)
    metrics["train"] = {
        "windows": train.count,
        "reply_windows": train.reply_count,
        "reply_weight": reply_weight,
        "documents": sum(1 for d in dumps for doc in d.documents if doc["split"] == TRAIN_SPLIT),
        "dumps": [str(d.path) for d in dumps],
        "epochs": epochs,
        "steps": total,
        "lr": lr,
        "loss": loss,
        "pos_weight": pos_weight,
        "weight_decay": weight_decay,
        "batch_windows": batch_windows,
        "seed": seed,
        "label": label,
        "trainable": trainable,
        "rank": config.rank,
        "init": init,
        "parameters": indexer.num_parameters(),
        "seconds": round(time.perf_counter() - started, 3),
        **history,
    }
    indexer.metrics = metrics
    indexer.signature = dict(dump.signature)
    if out is not None:
        indexer.save(Path(out), signature=dump.signature, lsa=dump.lsa_config, metrics=metrics)
    else:
        indexer.lsa = lsa_fields(dump.lsa_config)
    return indexer, metrics


# -- data ---------------------------------------------------------------------------------------


def _check_compatible(first: CalibrationDump, other: CalibrationDump) -> None:
    """Refuse to train one indexer on dumps of different models, layers or chunking, naming the field."""
    fields = {
        "model signature": (first.signature, other.signature),
        "target layers": (list(first.target_layers), list(other.target_layers)),
        "shapes": (first.shapes, other.shapes),
        "chunk_size": (lsa_fields(first.lsa_config).get("chunk_size"), lsa_fields(other.lsa_config).get("chunk_size")),
        "interval": (lsa_fields(first.lsa_config).get("interval"), lsa_fields(other.lsa_config).get("interval")),
        "label rule": ({k: v for k, v in first.label.items() if k != "exclude"}, {k: v for k, v in other.label.items() if k != "exclude"}),
    }
    for name, (a, b) in fields.items():
        if a != b:
            raise ValueError(
                f"calibration dumps {first.path} and {other.path} differ in {name} ({a!r} against {b!r}); "
                "train one indexer on dumps of the same model, target layers, chunk size, interval and label rule"
            )


class _Windows:
    """The windows of one split of one or more dumps, with the target layers narrowed to the trained ones
    (each window labelled by its own dump: their sink and tail may differ)."""

    def __init__(
        self,
        dump: CalibrationDump | Sequence[CalibrationDump],
        split: str,
        select: list[int],
        *,
        cache: bool,
        label: dict[str, Any] | None = None,
        reply_weight: int = 1,
    ) -> None:
        self.dumps = [dump] if isinstance(dump, CalibrationDump) else list(dump)
        self.dump, self.split, self.select = self.dumps[0], split, select
        self.label = dict(label or {})
        rope = _dump_rope(self.dump.shapes.get("rope", False), select)
        self.rotary = any(rope) if isinstance(rope, tuple) else rope  # cos/sin kept only when a chosen layer rotates
        self.reply_weight = int(reply_weight)
        self.count = sum(d.count(split) for d in self.dumps)
        self.reply_count = sum(d.count_replies(split) for d in self.dumps)
        self.epoch_count = self.count + (self.reply_weight - 1) * self.reply_count  # windows drawn per epoch
        self._cached: list[dict[str, Any]] | None = None
        if cache and self.count:
            self._cached = [self._prepare(r, d) for d in self.dumps for r in d.windows(split)]

    def _repeats(self, record: dict[str, Any]) -> int:
        return self.reply_weight if record["reply"] else 1

    def _shards(self) -> list[tuple[CalibrationDump, int]]:
        return [(d, j) for d in self.dumps for j in range(d.num_shards)]

    def _prepare(self, record: dict[str, Any], dump: CalibrationDump | None = None) -> dict[str, Any]:
        sel, source = self.select, dump or self.dump
        options = dict(top_p=self.label.get("top_p"), min_layers=self.label.get("min_layers"), rule=self.label.get("rule"))
        if self.label.get("rows") is not None:  # ensemble "group": one label row per target layer, from its group
            pairs = [source.labels(record, rows=rows, **options) for rows in self.label["rows"]]
            golden, selectable = torch.stack([g for g, _ in pairs]), pairs[0][1]
        else:
            golden, selectable = source.labels(record, **options)
        out = {
            "hidden": record["hidden"][sel],
            "kmin": record["kmin"][sel],
            "kmax": record["kmax"][sel],
            "golden": golden,
            "selectable": selectable,
            "mass": record["mass"],
            "cos": record.get("cos") if self.rotary else None,
            "sin": record.get("sin") if self.rotary else None,
            "reply": source.at_reply(record),
        }
        if "query" in record:
            out["query"] = record["query"][sel]
        return out

    def ordered(self) -> Iterator[dict[str, Any]]:
        if self._cached is not None:
            yield from self._cached
            return
        for d, j in self._shards():
            yield from (self._prepare(r, d) for r in d.shard(j, split=self.split))

    def shuffled(self, generator: torch.Generator) -> Iterator[dict[str, Any]]:
        """A seeded order: a global permutation when cached, else shards in a random order, each shuffled;
        a reply window appears ``reply_weight`` times (``epoch_count`` windows in all)."""
        if self._cached is not None:
            pool = [r for r in self._cached for _ in range(self._repeats(r))]
            for i in torch.randperm(len(pool), generator=generator).tolist():
                yield pool[i]
            return
        shards = self._shards()
        for i in torch.randperm(len(shards), generator=generator).tolist():
            d, j = shards[i]
            records = [r for r in (self._prepare(r, d) for r in d.shard(j, split=self.split)) for _ in range(self._repeats(r))]
            for k in torch.randperm(len(records), generator=generator).tolist():
                yield records[k]


def _collate(records: list[dict[str, Any]], device: torch.device) -> dict[str, Tensor | None]:
    """Pad windows to the largest N: kmin/kmax [B, Lt, N, Hkv, D], golden [B, N] (per target layer
    [B, Lt, N] under ``ensemble="group"``), mask [B, N] (real and selectable chunks: what the loss counts),
    mass [B, Ls, N]."""
    batch, n = len(records), max(r["golden"].shape[-1] for r in records)
    lt, _, hkv, d = records[0]["kmin"].shape
    kmin = records[0]["kmin"].new_zeros(batch, lt, n, hkv, d)
    kmax = torch.zeros_like(kmin)
    golden = torch.zeros(batch, *records[0]["golden"].shape[:-1], n)
    mask = torch.zeros(batch, n, dtype=torch.bool)
    mass = torch.zeros(batch, records[0]["mass"].shape[0], n)
    for b, r in enumerate(records):
        size = r["golden"].shape[-1]
        kmin[b, :, :size], kmax[b, :, :size] = r["kmin"], r["kmax"]
        golden[b, ..., :size], mask[b, :size], mass[b, :, :size] = r["golden"].float(), r["selectable"], r["mass"]
    out: dict[str, Tensor | None] = {
        "hidden": torch.stack([r["hidden"] for r in records]).float(),
        "kmin": kmin,
        "kmax": kmax,
        "golden": golden,
        "mask": mask,
        "mass": mass,
        "cos": torch.stack([r["cos"] for r in records]).float() if records[0]["cos"] is not None else None,
        "sin": torch.stack([r["sin"] for r in records]).float() if records[0]["sin"] is not None else None,
    }
    return {k: (v.to(device, non_blocking=True) if v is not None else None) for k, v in out.items()}


def _batches(records: Iterator[dict[str, Any]], size: int, device: torch.device) -> Iterator[dict[str, Tensor | None]]:
    chunk: list[dict[str, Any]] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield _collate(chunk, device)
            chunk = []
    if chunk:
        yield _collate(chunk, device)


# -- initialisation -----------------------------------------------------------------------------


def _initial_indexer(
    config: IndexerConfig, train: _Windows, init_weights: dict[int, Tensor] | None, generator: torch.Generator
) -> tuple[LSAIndexer, str]:
    if init_weights is not None:
        return LSAIndexer.from_query_weights(config, init_weights), "query-weights"
    first = next(train.ordered())
    if "query" in first:
        return LSAIndexer.from_query_weights(config, _fit_query_weights(config, train)), "dump-queries"
    return LSAIndexer.random_init(config, generator=generator), "random"


def _dump_rope(rope: bool | list[bool], select: list[int]) -> bool | tuple[bool, ...]:
    """The indexer's ``rope`` for the chosen target layers (positions ``select`` in the dump's) from the dump
    manifest's ``shapes["rope"]``: one bool, or one per dump target layer."""
    if isinstance(rope, list):
        return tuple(bool(rope[i]) for i in select)
    return bool(rope)


def _fit_query_weights(config: IndexerConfig, train: _Windows, *, block: int = 256) -> dict[int, Tensor]:
    """Ridge regression per target layer from hidden states [M, hidden] to pre-rotary queries [M, Hq * D]."""
    lt, h, qd = len(config.target_layers), config.hidden_size, config.q_heads * config.head_dim
    xtx = torch.zeros(lt, h, h, dtype=torch.float64)
    xty = torch.zeros(lt, h, qd, dtype=torch.float64)

    def accumulate(rows: list[Tensor], targets: list[Tensor]) -> None:
        x = torch.stack(rows, dim=1)  # [Lt, M, hidden]
        y = torch.stack(targets, dim=1)  # [Lt, M, Hq * D]
        xtx.add_(x.transpose(1, 2) @ x)
        xty.add_(x.transpose(1, 2) @ y)

    rows: list[Tensor] = []
    targets: list[Tensor] = []
    for record in train.ordered():
        q = record["query"].double()  # [Lt, Hq, D]
        if config.any_rope:  # undo the rotation on the rotary layers: R(theta)^-1 = R(-theta)
            cos, sin = record["cos"].double(), -record["sin"].double()
            q = torch.stack([apply_rope(q[i], cos, sin, config.rope_style) if config.layer_rope(i) else q[i] for i in range(lt)])
        rows.append(record["hidden"].double())
        targets.append(q.reshape(lt, qd))
        if len(rows) == block:
            accumulate(rows, targets)
            rows, targets = [], []
    if rows:
        accumulate(rows, targets)
    weights = {}
    for i, layer in enumerate(config.target_layers):
        ridge = 1e-3 * float(xtx[i].diagonal().mean()) + 1e-12
        solution = torch.linalg.solve(xtx[i] + ridge * torch.eye(h, dtype=torch.float64), xty[i])  # [hidden, Hq * D]
        weights[layer] = solution.T.float()
    return weights


@torch.no_grad()
def _raw_scores(indexer: LSAIndexer, batch: dict[str, Tensor | None]) -> Tensor:
    """Per-layer logits with scale 1 and bias 0: [B, Lt, N]."""
    saved = [(t.log_scale.clone(), t.bias.clone()) for t in indexer.layers]
    for t in indexer.layers:
        t.log_scale.zero_()
        t.bias.zero_()
    try:
        return indexer.logits(batch["hidden"], batch["cos"], batch["sin"], batch["kmin"], batch["kmax"])
    finally:
        for t, (scale, bias) in zip(indexer.layers, saved):
            t.log_scale.copy_(scale)
            t.bias.copy_(bias)


def _fit_scale_and_bias(indexer: LSAIndexer, train: _Windows) -> None:
    """Platt scaling per target layer: logit = exp(log_scale) * raw + bias, fitted on training windows."""
    raws, labels = [], []
    for i, record in enumerate(train.ordered()):
        if i == CALIBRATION_WINDOWS:
            break
        batch = _collate([record], torch.device("cpu"))
        keep = record["selectable"]
        raws.append(_raw_scores(indexer, batch)[0][:, keep])  # [Lt, N selectable]
        labels.append(record["golden"][..., keep].float().expand_as(raws[-1]))  # one row, or one per target layer
    raw = torch.cat(raws, dim=1)  # [Lt, M]
    label = torch.cat(labels, dim=1)
    with torch.no_grad():
        for i, target in enumerate(indexer.layers):
            std = float(raw[i].std()) if raw.shape[1] > 1 else 0.0
            log_scale = torch.tensor(-math.log(std) if std > 0 else 0.0, dtype=torch.float32, requires_grad=True)
            bias = torch.zeros((), requires_grad=True)
            optimizer = torch.optim.LBFGS([log_scale, bias], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

            def closure() -> Tensor:
                optimizer.zero_grad()
                with torch.enable_grad():
                    value = F.binary_cross_entropy_with_logits(raw[i] * log_scale.exp() + bias, label[i])
                    value.backward()
                return value

            with torch.enable_grad():
                optimizer.step(closure)
            if torch.isfinite(log_scale) and torch.isfinite(bias):
                target.log_scale.copy_(log_scale.detach().clamp(-30.0, 30.0))
                target.bias.copy_(bias.detach())


# -- loss ---------------------------------------------------------------------------------------


def _make_loss(kind: str, pos_weight: float | None, group_rows: list[list[int]] | None = None):
    weight = None if pos_weight is None else torch.tensor(float(pos_weight))

    def loss_fn(logits: Tensor, batch: dict[str, Tensor | None]) -> Tensor:
        """logits [B, Lt, N] -> mean over every layer's real selectable chunks (+ the listwise term)."""
        golden, mask = batch["golden"], batch["mask"]
        assert golden is not None and mask is not None
        target = golden[:, None].expand_as(logits) if golden.dim() == 2 else golden  # [B, Lt, N] per target layer
        pw = weight.to(logits.device) if weight is not None else None
        per_chunk = F.binary_cross_entropy_with_logits(logits, target, reduction="none", pos_weight=pw)
        if kind == "focal":
            p = torch.sigmoid(logits)
            p_true = p * target + (1 - p) * (1 - target)
            per_chunk = per_chunk * (1 - p_true).pow(FOCAL_GAMMA)
        m = mask[:, None].expand_as(logits)
        if not bool(m.any()):  # every chunk of the batch is always resident: nothing to learn from it
            return (logits * 0).sum()
        value = per_chunk.masked_select(m).mean()
        if kind == "bce+listwise":
            value = value + LISTWISE_WEIGHT * _listwise(logits, batch["mass"], mask, group_rows)
        return value

    return loss_fn


def _listwise(logits: Tensor, mass: Tensor | None, mask: Tensor, group_rows: list[list[int]] | None = None) -> Tensor:
    """KL(target || softmax(logits)) over each window's selectable chunks, per target layer; the target
    is the layer-averaged share of the window's attention on those chunks (``golden_labels``' "mean"),
    averaged over each target layer's own group of layers under ``ensemble="group"`` (``group_rows``)."""
    assert mass is not None
    share = mass * mask[:, None]
    share = share / share.sum(-1, keepdim=True).clamp_min(1e-12)
    if group_rows is None:
        t = share.mean(1)[:, None].expand_as(logits)  # [B, Lt, N]
    else:
        t = torch.stack([share[:, rows].mean(1) for rows in group_rows], dim=1)
    t = t / t.sum(-1, keepdim=True).clamp_min(1e-12)
    live = mask.any(-1)[:, None] & (t.sum(-1) > 0)  # [B, Lt]
    if not bool(live.any()):
        return (logits * 0).sum()
    # a finite fill: a window without selectable chunks gives a finite (unused) row, not NaN gradients
    logp = torch.log_softmax(logits.masked_fill(~mask[:, None], torch.finfo(logits.dtype).min), dim=-1)  # [B, Lt, N]
    kl = torch.where(t > 0, t * (torch.log(t.clamp_min(1e-12)) - logp), torch.zeros_like(logp)).sum(-1)  # [B, Lt]
    return kl[live].mean()


@torch.no_grad()
def _mean_loss(indexer: LSAIndexer, windows: _Windows, loss_fn, batch_windows: int, device: torch.device) -> float:
    indexer.eval()
    total, seen = 0.0, 0
    for batch in _batches(windows.ordered(), batch_windows, device):
        logits = indexer.logits(batch["hidden"], batch["cos"], batch["sin"], batch["kmin"], batch["kmax"])
        chunks = int(batch["mask"].sum())
        total, seen = total + float(loss_fn(logits, batch)) * chunks, seen + chunks
    return total / max(seen, 1)


# -- evaluation ---------------------------------------------------------------------------------


@torch.no_grad()
def _evaluate(
    indexer: LSAIndexer,
    untrained: LSAIndexer,
    heldout: _Windows,
    *,
    init_weights: dict[int, Tensor] | None,
    select_layers: list[int],
    seed: int,
) -> dict[str, Any]:
    """Metrics over all chunks of every held-out window, for the indexer and the baselines.

    Under ``ensemble="group"`` each window counts once per target layer: that layer's ranking against
    its group's labels and masses (every selector alike), so a group weighs as much as any other."""
    threshold = indexer.config.threshold
    names = ("indexer", "untrained", "recency", "random", "query_aware")
    scorers = {name: SelectionMetrics(BUDGETS, threshold=threshold) for name in names}
    generator = torch.Generator().manual_seed(seed + 1)
    query_source = None
    windows = chunks = positives = 0
    group_rows = heldout.label.get("rows")
    for record in heldout.ordered():
        batch = _collate([record], torch.device("cpu"))
        golden, mass, keep = record["golden"], record["mass"], record["selectable"]
        n = golden.shape[-1]
        args = (batch["hidden"], batch["cos"], batch["sin"], batch["kmin"], batch["kmax"])
        query = record.get("query")
        if query is not None:
            query_source = "dump"
        elif init_weights is not None:
            query_source = "query-weights"
            query = _model_queries(init_weights, select_layers, record, indexer.config)
        # (row of the indexer's output, the labels, the masses, the query-aware layers) per ranking
        parts = [(None, golden, mass, slice(None))]
        if group_rows is not None:
            parts = [(i, golden[i], mass[rows], slice(i, i + 1)) for i, rows in enumerate(group_rows)]
        for row, gold, part_mass, layers in parts:
            for name, model in (("indexer", indexer), ("untrained", untrained)):
                # The span rule as at run time: only selectable chunks raise a neighbour, and only when the
                # budget's k chunks leave enough free slots (neighbour_min_free).
                probs = model(*args, lenders=keep[None])[0]
                scorers[name].add(_ranking(model, args, keep, row), gold, part_mass, probs=probs if row is None else probs[row], selectable=keep)
            scorers["recency"].add(recency_scores(n), gold, part_mass, selectable=keep)
            scorers["random"].add(random_scores(n, generator=generator), gold, part_mass, selectable=keep)
            if query is not None:
                scores = query_aware_scores(query[layers], record["kmin"][layers], record["kmax"][layers])
                scorers["query_aware"].add(scores, gold, part_mass, selectable=keep)
            positives += int(gold.sum())
        windows += 1
        chunks += int(keep.sum()) * len(parts)
    out: dict[str, Any] = {
        "budgets": list(BUDGETS),
        "heldout": {"windows": windows, "chunks": chunks, "golden_rate": positives / chunks if chunks else None},
    }
    for name, scorer in scorers.items():
        if name == "query_aware" and query_source is None:
            continue
        out[name] = scorer.result() if windows else None
    if query_source is not None:
        out["query_aware"]["query_source"] = query_source
    return out


def _ranking(indexer: LSAIndexer, args: tuple, keep: Tensor, row: int | None = None):
    """``k -> [N]`` scores under the span rule for a selection of ``k`` free slots (target layer ``row``'s
    under ``ensemble="group"``): probabilities, or logits where ``group_shared`` raises the shared picks."""
    logits = indexer.logits(*args)  # [1, Lt, N]
    if row is not None and indexer.config.group_shared:
        # the union with the shared ranking, as the runtime selects (in logits: lifted rows would saturate a sigmoid)
        return lambda k: indexer.share_slots(indexer.spread(logits, slots=k, lenders=keep[None, None]), slots=k, selectable=keep[None])[0, row]
    if row is not None:
        return lambda k: indexer.ensemble(indexer.spread(logits, slots=k, lenders=keep[None, None]))[0, row]
    return lambda k: indexer.ensemble(indexer.spread(logits, slots=k, lenders=keep[None, None]))[0]


def _model_queries(weights: dict[int, Tensor], layers: list[int], record: dict[str, Any], config: IndexerConfig) -> Tensor:
    """The model's query (``W_q x``, rotated) per target layer, [Lt, Hq, D]: for the query-aware baseline."""
    out = []
    for i, layer in enumerate(layers):
        q = (weights[layer].float() @ record["hidden"][i].float()).view(config.q_heads, config.head_dim)
        if config.layer_rope(i):
            q = apply_rope(q, record["cos"].float(), record["sin"].float(), config.rope_style)
        out.append(q)
    return torch.stack(out)


class _progress:
    """A rich progress bar over the training steps (nothing when disabled)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled, total
        self.bar = None

    def __enter__(self):
        if not self.enabled:
            return None, None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.console import Console

        columns = (TextColumn("[bold]train indexer[/] {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
        self.bar = Progress(*columns, console=Console(stderr=True))  # stdout stays for results (--json)
        self.bar.__enter__()
        return self.bar, self.bar.add_task("", total=self.total)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
