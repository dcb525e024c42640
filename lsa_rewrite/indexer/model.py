"""The lookahead indexer: a small dual encoder that scores KV chunks for the coming decode window.

What is here: ``IndexerConfig`` (frozen, versioned JSON form), ``LSAIndexer`` (per target layer: a
low-rank query tower over the layer's query-projection input, and a document tower over the chunk
index's key bounds; see docs/indexer.md), its initialisation from the model's own query projections
(``LSAIndexer.from_query_weights``), the ``.safetensors`` file format (``save``/``load``) and
``check_compatible``, which refuses an indexer trained for another model, chunk size or layer set.

Not here: producing the inputs (calibration, the decode-graph taps), choosing the resident set from the
scores (the memory manager), training (``train.py``). Nothing in this file imports the model code or
``transformers``: the indexer must train and load in a process that never loads the backbone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ENSEMBLES = ("max", "mean", "group")
ROPE_STYLES = ("half", "interleaved")  # HF rotate_half over the two halves; GPT-J's rotate-every-two over channel pairs
FILE_TYPE = "LSAIndexer"
FILE_VERSION = 1
# The model signature an indexer is trained for (docs/indexer.md), compared in this order.
SIGNATURE_FIELDS = ("class", "model_type", "num_layers", "hidden_size", "q_heads", "kv_heads", "head_dim", "sparse_layers", "vocab_size")
RMS_EPS = 1e-6


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def default_rank(hidden_size: int, *, q_dim: int | None = None) -> int:
    """Rank of the query tower's projection: 64 for hidden <= 1024, else 256 (docs/indexer.md).

    Capped by ``hidden_size`` and by ``q_dim = q_heads * head_dim`` when given: a truncated SVD of the
    query projection has no more directions than that.

    Example::

        >>> default_rank(576), default_rank(4096), default_rank(32, q_dim=16)
        (64, 256, 16)
    """
    rank = 64 if hidden_size <= 1024 else 256
    return min(rank, hidden_size, q_dim if q_dim is not None else hidden_size)


@dataclass(frozen=True)
class IndexerConfig:
    """Shape and behaviour of an ``LSAIndexer``.

    Args:
        hidden_size: width of the target layers' query-projection input.
        q_heads, kv_heads, head_dim: the model's attention shape (``q_heads`` a multiple of ``kv_heads``).
        rank: width of the low-rank query projection (``default_rank``).
        target_layers: model layer indices the indexer reads (distinct, >= 0), in the order of its
            per-layer parameters and of the ``Lt`` axis of its inputs.
        ensemble: how target layers' scores rank chunks: ``"max"`` (default) or ``"mean"`` of their
            probabilities (one resident set for every layer), or ``"group"``: no combination, each
            target layer ranks the chunks of its own group of model layers (``layer_groups``), which
            keep resident sets of their own; trained with labels from its group's attention only.
        layer_groups: under ``ensemble="group"``, one tuple of model layer indices per target layer (in
            the order of ``target_layers``, disjoint): the layers whose resident set it chooses
            (``nearest_groups`` gives each sparse layer its nearest target layer). ``None`` otherwise.
        rope: queries get the model's rotary embedding (the cos/sin recorded at the query position):
            ``True``/``False`` for every target layer, or a tuple of bools, one per target layer, for
            models whose layers mix rotary and no rotary (SmolLM3's no-rope layers). A tuple whose
            values are all equal is stored as that bool (so the two spellings compare equal).
        rope_style: how the model rotates a query's channels: ``"half"`` (HF ``rotate_half``: channel ``j``
            pairs with ``j + R/2``; Llama, Qwen, ...) or ``"interleaved"`` (GPT-J's rotate-every-two:
            channels ``2i`` and ``2i + 1`` pair; GPT-J, CodeGen, Cohere, GLM, Helium, ERNIE 4.5). The
            rotary width ``R`` (partial rotary: the leading ``R`` channels of each head) is the width of
            the cos/sin the indexer is handed. Files without the field: ``"half"``.
        threshold: probability above which a chunk is predicted to be attended.
        neighbour_margin: the span rule (``None``: off). A needle sentence often spans two or three
            chunks: each target layer's logit of a chunk is raised to its better neighbour's minus this
            margin (logits, >= 0), so that the neighbours of a high-scoring chunk follow it into the
            resident set. Applied at selection time and in the held-out metrics, not in the training loss.
        neighbour_top: only the ``neighbour_top`` highest selectable chunks of each target layer lend
            (``None``: every selectable chunk): with several similar needles (distractor keys) their
            neighbours would otherwise crowd out the other candidates.
        neighbour_min_free: the span rule applies only to selections with at least this many free
            slots per sequence (``SelectionWindow.free_slots``: slots beyond the sink, the tail and the
            window's own chunks): with one or two free slots a neighbour would take the place of the
            second-best candidate.
        group_shared: under ``ensemble="group"``, the share of each selection's free slots (beyond the
            sink, the tail and the window's own chunks) that every layer fills from one shared ranking,
            the max of the target layers' logits (of ``shared_layers``; default all), before its own group's ranking fills the rest
            (``share_slots``): a union of the groups' sets and the set every group would keep. 0 (the
            default): each group's ranking alone; 1: one ranking for every layer. A selection rule, not
            a weight: it changes no parameter, and applies at run time and in the held-out metrics.
        shared_layers: under ``group_shared`` > 0, the target layers (model layer indices, a subset of
            ``target_layers``) whose max is the shared ranking; ``None`` (the default): every target
            layer. A target layer listed here may have an empty group in ``layer_groups``: it then only
            ranks for the shared slots (``merge_indexers`` builds such an indexer from a ``max``
            indexer and a group one, each trained on its own dump).

    Example::

        >>> cfg = IndexerConfig(hidden_size=576, q_heads=9, kv_heads=3, head_dim=64, rank=64, target_layers=(9, 18, 27))
        >>> IndexerConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    hidden_size: int
    q_heads: int
    kv_heads: int
    head_dim: int
    rank: int
    target_layers: tuple[int, ...]
    ensemble: str = "max"
    rope: bool | tuple[bool, ...] = True
    rope_style: str = "half"
    threshold: float = 0.5
    neighbour_margin: float | None = None
    neighbour_min_free: int = 0
    neighbour_top: int | None = None
    layer_groups: tuple[tuple[int, ...], ...] | None = None
    group_shared: float = 0.0
    shared_layers: tuple[int, ...] | None = None
    version: int = 1

    def __post_init__(self) -> None:
        for name in ("hidden_size", "q_heads", "kv_heads", "head_dim", "rank"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"IndexerConfig.{name} must be an int >= 1, got {value!r}")
        if self.q_heads % self.kv_heads:
            raise ValueError(f"q_heads={self.q_heads} must be a multiple of kv_heads={self.kv_heads} (grouped-query attention)")
        layers = self.target_layers
        if not isinstance(layers, (tuple, list)) or not layers or not all(_is_int(i) and i >= 0 for i in layers):
            raise ValueError(f"target_layers must be a non-empty tuple of layer indices >= 0, got {layers!r}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"target_layers has repeated layers: {list(layers)}")
        if isinstance(layers, list):
            object.__setattr__(self, "target_layers", tuple(layers))
        if self.ensemble not in ENSEMBLES:
            raise ValueError(f"ensemble must be one of {ENSEMBLES}, got {self.ensemble!r}")
        shared = self.shared_layers
        if shared is not None:
            if not isinstance(shared, (tuple, list)) or not shared or not all(_is_int(i) for i in shared) or len(set(shared)) != len(shared):
                raise ValueError(f"shared_layers must be None or a non-empty tuple of distinct target layers, got {shared!r}")
            outside = [i for i in shared if i not in layers]
            if outside:
                raise ValueError(f"shared_layers {list(shared)} must be target layers; {outside} are not in target_layers={list(layers)}")
            object.__setattr__(self, "shared_layers", tuple(shared))
        groups = self.layer_groups
        if self.ensemble == "group":
            # A target layer of the shared ranking may have an empty group: it only ranks for the shared slots.
            def allowed(i: int, g: Any) -> bool:
                members = isinstance(g, (tuple, list)) and all(_is_int(j) and j >= 0 for j in g)
                return members and (bool(g) or (shared is not None and layers[i] in shared))

            if not isinstance(groups, (tuple, list)) or len(groups) != len(layers) or not all(allowed(i, g) for i, g in enumerate(groups)):
                raise ValueError(
                    f"ensemble='group' needs layer_groups: one non-empty tuple of model layer indices per target layer "
                    f"({len(layers)} for target_layers={list(layers)}; nearest_groups() makes them; only a target layer of "
                    f"shared_layers may have an empty one), got {groups!r}"
                )
            if not any(groups):
                raise ValueError(f"layer_groups {groups!r} are all empty: no model layer would be chosen for")
            flat = [i for g in groups for i in g]
            if len(set(flat)) != len(flat):
                raise ValueError(f"layer_groups must be disjoint (each model layer chosen for by one target layer), got {groups!r}")
            object.__setattr__(self, "layer_groups", tuple(tuple(sorted(g)) for g in groups))
        elif groups is not None:
            raise ValueError(f"layer_groups is only used with ensemble='group' (ensemble={self.ensemble!r}); got {groups!r}")
        rope = self.rope
        if isinstance(rope, (tuple, list)):
            if len(rope) != len(layers) or not all(isinstance(r, bool) for r in rope):
                raise ValueError(
                    f"rope must be True, False or one bool per target layer ({len(layers)} for target_layers={list(layers)}), got {rope!r}"
                )
            object.__setattr__(self, "rope", rope[0] if len(set(rope)) == 1 else tuple(rope))
        elif not isinstance(rope, bool):
            raise ValueError(f"rope must be True, False or one bool per target layer, got {rope!r}")
        if self.rope_style not in ROPE_STYLES:
            raise ValueError(f"rope_style must be one of {ROPE_STYLES}, got {self.rope_style!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be a probability in (0, 1), got {self.threshold!r}")
        margin = self.neighbour_margin
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0.0 <= margin < math.inf):
            raise ValueError(f"neighbour_margin must be None (off) or a finite number of logits >= 0, got {margin!r}")
        if self.neighbour_top is not None and (not _is_int(self.neighbour_top) or self.neighbour_top < 1):
            raise ValueError(f"neighbour_top must be None (every selectable chunk lends) or an int >= 1, got {self.neighbour_top!r}")
        if not _is_int(self.neighbour_min_free) or self.neighbour_min_free < 0:
            raise ValueError(
                f"neighbour_min_free must be an int >= 0 (free slots; 0: the span rule at every budget), got {self.neighbour_min_free!r}"
            )
        share = self.group_shared
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
            raise ValueError(f"group_shared must be a share of the free slots in [0, 1], got {share!r}")
        if share and self.ensemble != "group":
            raise ValueError(
                f"group_shared={share} needs ensemble='group' (a shared ranking beside each layer group's own); ensemble={self.ensemble!r} "
                "already gives every layer one ranking"
            )
        object.__setattr__(self, "group_shared", float(share))
        if self.shared_layers is not None and not share:
            raise ValueError(
                f"shared_layers={list(self.shared_layers)} names the target layers of the shared ranking, which needs group_shared > 0 "
                f"(got group_shared={share!r})"
            )
        if self.version != 1:
            raise ValueError(f"IndexerConfig version {self.version} is not supported by this lsa-rewrite (knows version 1)")

    def layer_rope(self, i: int) -> bool:
        """Whether target layer number ``i`` (an index into ``target_layers``) applies the rotary embedding."""
        return self.rope if isinstance(self.rope, bool) else self.rope[i]

    @property
    def any_rope(self) -> bool:
        """Whether some target layer applies the rotary embedding (its inputs then carry cos/sin)."""
        return self.rope if isinstance(self.rope, bool) else any(self.rope)

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.q_heads // self.kv_heads

    @property
    def per_layer(self) -> bool:
        """Whether each target layer ranks chunks for its own layer group (``ensemble="group"``)."""
        return self.ensemble == "group"

    def target_of(self, layer: int) -> int | None:
        """Under ``ensemble="group"``: the number (index into ``target_layers``) of the target layer whose
        group holds model layer ``layer``, ``None`` when no group does; else 0 (every layer shares one ranking)."""
        if not self.per_layer:
            return 0
        return next((i for i, g in enumerate(self.layer_groups or ()) if layer in g), None)

    def num_parameters(self) -> int:
        """Parameters of an ``LSAIndexer`` with this config (without building it)."""
        h, r, hq, hkv, d = self.hidden_size, self.rank, self.q_heads, self.kv_heads, self.head_dim
        per_layer = r * h + r + hq * d * r + hq * h + hq + 2 * hkv * d + 2
        return per_layer * len(self.target_layers)

    def to_dict(self) -> dict[str, Any]:
        """Stable, versioned dict form (``_type``, ``_version``, ``_data``)."""
        data = dataclasses.asdict(self)
        version = data.pop("version")
        data["target_layers"] = list(self.target_layers)
        if isinstance(self.rope, tuple):
            data["rope"] = list(self.rope)
        if self.rope_style == "half":  # the default: left out, so files read by lsa-rewrite before the field stay readable
            del data["rope_style"]
        if self.layer_groups is None:  # likewise (only ensemble="group" has groups)
            del data["layer_groups"]
        else:
            data["layer_groups"] = [list(g) for g in self.layer_groups]
        if not self.group_shared:  # likewise (files written before the field read back equal)
            del data["group_shared"]
        if self.shared_layers is None:  # likewise
            del data["shared_layers"]
        else:
            data["shared_layers"] = list(self.shared_layers)
        return {"_type": "IndexerConfig", "_version": version, "_data": data}

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> "IndexerConfig":
        """Inverse of :meth:`to_dict`; unknown fields are an error, not silently dropped."""
        if not isinstance(obj, dict) or obj.get("_type") != "IndexerConfig" or not isinstance(obj.get("_data"), dict):
            raise ValueError(f"not an IndexerConfig dict (expected keys _type='IndexerConfig', _version, _data): {obj!r}")
        data = dict(obj["_data"])
        known = {f.name for f in dataclasses.fields(cls)} - {"version"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown IndexerConfig fields {unknown}; known fields are {sorted(known)}")
        if isinstance(data.get("target_layers"), list):
            data["target_layers"] = tuple(data["target_layers"])
        if isinstance(data.get("rope"), list):
            data["rope"] = tuple(data["rope"])
        if isinstance(data.get("layer_groups"), list):
            data["layer_groups"] = tuple(tuple(g) if isinstance(g, list) else g for g in data["layer_groups"])
        if isinstance(data.get("shared_layers"), list):
            data["shared_layers"] = tuple(data["shared_layers"])
        return cls(**data, version=obj.get("_version", 1))


def nearest_groups(target_layers: tuple[int, ...] | list[int], layers: list[int] | tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """``layer_groups`` for ``ensemble="group"``: each of ``layers`` (the model's sparsely attended layers)
    goes to its nearest target layer, a tie to the earlier one.

    Example::

        >>> nearest_groups((7, 15, 22), range(30))
        ((0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11), (12, 13, 14, 15, 16, 17, 18), (19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29))
    """
    targets = list(target_layers)
    if not targets:
        raise ValueError("nearest_groups needs at least one target layer")
    groups: list[list[int]] = [[] for _ in targets]
    for layer in layers:
        best = min(range(len(targets)), key=lambda i: (abs(targets[i] - layer), targets[i]))
        groups[best].append(int(layer))
    empty = [targets[i] for i, g in enumerate(groups) if not g]
    if empty:
        raise ValueError(f"target layers {empty} are nearest to none of the layers {list(layers)}: choose target layers among them")
    return tuple(tuple(g) for g in groups)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_every_two(x: Tensor) -> Tensor:
    """GPT-J's interleaved rotation: ``(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)``."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, style: str = "half") -> Tensor:
    """Rotary embedding ``x * cos + rotate(x) * sin`` on the first ``cos.shape[-1]`` channels of ``x`` (all
    of them unless the model rotates only part of each head); ``rotate`` is HF's ``rotate_half``
    (``style="half"``) or GPT-J's ``rotate_every_two`` (``"interleaved"``). ``cos``/``sin`` are the factors
    the model multiplies by, in its channel order."""
    rotate = rotate_half if style == "half" else rotate_every_two
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate(x) * sin
    head, tail = x[..., :rot], x[..., rot:]
    return torch.cat((head * cos + rotate(head) * sin, tail), dim=-1)


class TargetLayerIndexer(nn.Module):
    """The parameters for one target layer (names of docs/indexer.md in the comments)."""

    def __init__(self, config: IndexerConfig) -> None:
        super().__init__()
        h, r, hq, hkv, d = config.hidden_size, config.rank, config.q_heads, config.kv_heads, config.head_dim
        self.down = nn.Parameter(torch.zeros(r, h))  # A [r, hidden]
        self.norm = nn.Parameter(torch.ones(r))  # RMSNorm weight [r]
        self.up = nn.Parameter(torch.zeros(hq * d, r))  # B [Hq * D, r]
        self.head_weight = nn.Parameter(torch.zeros(hq, h))  # W [Hq, hidden]
        self.head_bias = nn.Parameter(torch.full((hq,), 1.0 / hq))  # b_w [Hq]
        self.centre_gain = nn.Parameter(torch.ones(hkv, d))  # s [Hkv, D]
        self.half_gain = nn.Parameter(torch.ones(hkv, d))  # t [Hkv, D]
        # scale = exp(log_scale): optimised in log space so that it stays positive and moves by factors.
        self.log_scale = nn.Parameter(torch.tensor(-0.5 * math.log(d)))
        self.bias = nn.Parameter(torch.zeros(()))


class LSAIndexer(nn.Module):
    """Scores every chunk of the history: how likely the next ``interval`` tokens are to attend to it.

    Per target layer ``l`` (docs/indexer.md)::

        u      = RMSNorm(A x)                         x: the layer's query-projection input [hidden]
        q_h    = rope(B_h u),  w_h = W_h x + b_w,h    per query head h
        e_c,g  = s_g * centre_c,g + t_g * half_c,g    chunk c's key bounds, KV head g
        z_c    = scale * sum_h w_h * relu(q_h . e_c,g(h)) + bias
        p_c    = max (or mean) over target layers of sigmoid(z_c)
                 (ensemble "group": sigmoid(z_c) per target layer, for its own group of model layers)

    The methods work one target layer at a time and batch-first (what the runtime calls at selection
    time): ``query`` -> ``layer_logits`` per layer, then ``ensemble``. ``forward`` chains them over all
    target layers; ``logits`` returns the per-layer logits that training uses. All arithmetic is
    float32 whatever the dtype of the inputs.

    Attributes set by ``load``: ``signature`` (model signature), ``lsa`` (``chunk_size``, ``interval``),
    ``metrics`` (held-out metrics or ``None``), ``source`` (the file).

    Example::

        >>> cfg = IndexerConfig(hidden_size=32, q_heads=4, kv_heads=2, head_dim=8, rank=16, target_layers=(1, 3))
        >>> indexer = LSAIndexer.from_query_weights(cfg, {1: torch.randn(32, 32), 3: torch.randn(32, 32)})
        >>> probs = indexer(x, cos, sin, kmin, kmax)  # x [B, 2, 32], cos/sin [B, 8], kmin/kmax [B, 2, N, 2, 8] -> [B, N]
    """

    def __init__(self, config: IndexerConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(TargetLayerIndexer(config) for _ in config.target_layers)
        self.signature: dict[str, Any] = {}
        self.lsa: dict[str, Any] = {}
        self.metrics: dict[str, Any] | None = None
        self.source = "<in-memory indexer>"

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_query_weights(cls, config: IndexerConfig, weights: dict[int, Tensor]) -> "LSAIndexer":
        """An untrained indexer that ranks chunks like the model's own queries against key centres.

        ``weights[l]`` is target layer ``l``'s query projection ``W_q`` ``[q_heads * head_dim, hidden]``
        (rows in the model's head order). ``A`` and ``B`` come from its rank-``r`` truncated SVD
        (``W_q ~= B A``, singular values split as ``sqrt(S)`` on each side); the RMSNorm only rescales
        ``u`` by a positive number, so at full rank ``q`` is the model's query up to a positive scale.
        A query bias or query norm of the model is not folded in (training corrects it).
        """
        indexer = cls(config)
        missing = [layer for layer in config.target_layers if layer not in weights]
        if missing:
            raise ValueError(f"query weights missing for target layers {missing} (have layers {sorted(weights)})")
        expected = (config.q_heads * config.head_dim, config.hidden_size)
        with torch.no_grad():
            for i, layer in enumerate(config.target_layers):
                w_q = weights[layer]
                if tuple(w_q.shape) != expected:
                    raise ValueError(
                        f"query weight of layer {layer} has shape {tuple(w_q.shape)}, expected [q_heads * head_dim, hidden] = {list(expected)}"
                    )
                u, s, vh = torch.linalg.svd(w_q.detach().to(torch.float64).cpu(), full_matrices=False)
                r = min(config.rank, s.numel())
                root = s[:r].sqrt()
                target = indexer.layers[i]
                target.up.zero_()
                target.down.zero_()
                target.up[:, :r] = (u[:, :r] * root).float()
                target.down[:r] = (root[:, None] * vh[:r]).float()
        return indexer

    @classmethod
    def random_init(cls, config: IndexerConfig, *, generator: torch.Generator | None = None) -> "LSAIndexer":
        """An indexer with random query projections (``A ~ N(0, 1/hidden)``, ``B ~ N(0, 1/rank)``), for
        training when neither the model's query weights nor recorded queries are at hand."""
        indexer = cls(config)
        with torch.no_grad():
            for target in indexer.layers:
                target.down.copy_(torch.randn(target.down.shape, generator=generator) / math.sqrt(config.hidden_size))
                target.up.copy_(torch.randn(target.up.shape, generator=generator) / math.sqrt(config.rank))
        return indexer

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- scoring ------------------------------------------------------------------------------

    def query(self, i: int, x: Tensor, cos: Tensor | None = None, sin: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Query tower of target layer number ``i``: x [B, hidden], cos/sin [B, D] -> (q [B, Hq, D], w [B, Hq])."""
        cfg, target = self.config, self.layers[i]
        x = x.float()
        u = F.linear(x, target.down)  # [B, r]
        u = u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + RMS_EPS) * target.norm
        q = F.linear(u, target.up).view(x.shape[0], cfg.q_heads, cfg.head_dim)  # [B, Hq, D]
        if cfg.layer_rope(i):
            if cos is None or sin is None:
                raise ValueError(
                    f"target layer {cfg.target_layers[i]} of this indexer applies rotary embeddings (rope={cfg.rope}): "
                    "pass the cos/sin of the query position"
                )
            q = apply_rope(q, cos.float()[:, None], sin.float()[:, None], cfg.rope_style)
        elif cos is not None or sin is not None:
            raise ValueError(
                f"target layer {cfg.target_layers[i]} of this indexer has no rotary embedding (rope={cfg.rope}): its cos/sin must be None"
            )
        w = F.linear(x, target.head_weight, target.head_bias)  # [B, Hq]
        return q, w

    def layer_logits(self, i: int, q: Tensor, w: Tensor, kmin: Tensor, kmax: Tensor) -> Tensor:
        """Document tower and score of target layer number ``i``: q [B, Hq, D], w [B, Hq],
        kmin/kmax [B, N, Hkv, D] (any float dtype) -> logits [B, N] (``z + bias``, float32)."""
        return self.finish_logits(i, self.head_sum(i, q, w, kmin, kmax))

    def head_sum(self, i: int, q: Tensor, w: Tensor, kmin: Tensor, kmax: Tensor, *, kv_heads: slice | None = None) -> Tensor:
        """The head sum ``z`` of target layer ``i`` before its scale and bias: q [B, Hq, D], w [B, Hq] (all
        heads), kmin/kmax [B, N, Hk, D] over the KV heads ``kv_heads`` (default: all ``Hkv``) -> [B, N].
        The sum runs over those KV heads and their query heads only, so the head sums of disjoint KV head
        ranges (tensor-parallel ranks) add up to the whole model's."""
        cfg, target = self.config, self.layers[i]
        heads = kv_heads if kv_heads is not None else slice(0, cfg.kv_heads)
        batch = q.shape[0]
        lo, hi = kmin.float(), kmax.float()
        if lo.shape[-2] != len(range(cfg.kv_heads)[heads]):
            raise ValueError(f"kmin/kmax hold {lo.shape[-2]} KV heads, but kv_heads={heads} selects {len(range(cfg.kv_heads)[heads])}")
        centre = target.centre_gain[heads] * ((lo + hi) * 0.5)  # [B, N, Hk, D]
        half = target.half_gain[heads] * ((hi - lo) * 0.5)
        qg = q.float().view(batch, cfg.kv_heads, cfg.group, cfg.head_dim)[:, heads]  # head h -> kv head h // G, as repeat_kv
        # q . centre + |q| . half: with s = t = 1 the largest q . k over the chunk's key box (the query-aware bound)
        dots = torch.einsum("bkgd,bnkd->bnkg", qg, centre) + torch.einsum("bkgd,bnkd->bnkg", qg.abs(), half)  # [B, N, Hk, G]
        weights = w.float().view(batch, cfg.kv_heads, cfg.group)[:, heads]
        return (dots.relu() * weights.unsqueeze(1)).sum((-2, -1))  # [B, N]

    def finish_logits(self, i: int, z: Tensor) -> Tensor:
        """Target layer ``i``'s logits from its (whole-model) head sum ``z`` [..., N]: ``z * scale + bias``."""
        target = self.layers[i]
        return z * target.log_scale.exp() + target.bias

    def spread(self, logits: Tensor, *, slots: int | Tensor | None = None, lenders: Tensor | None = None) -> Tensor:
        """The span rule (``config.neighbour_margin``) over the last axis of ``logits`` [..., N]: each chunk's
        logit raised to ``max(own, best lending neighbour - margin)``. ``lenders`` (bool, broadcast to
        ``logits``): the chunks whose score may raise a neighbour, the selectable ones (``None``: all);
        the always-resident sink and tail are kept anyway, and the chunks beside them are not the
        rest of a needle. Unchanged when the rule is off, or when ``slots`` (the selection's free slots
        per sequence) is below ``config.neighbour_min_free``; ``slots=None`` (unknown) applies it."""
        cfg = self.config
        return spread_neighbours(
            logits, cfg.neighbour_margin, slots=slots, min_slots=cfg.neighbour_min_free, lenders=lenders, top=cfg.neighbour_top
        )

    def share_slots(self, logits: Tensor, *, slots: int | Tensor | None, selectable: Tensor) -> Tensor:
        """Under ``ensemble="group"`` with ``config.group_shared`` > 0: target layer rows ``[..., Lt, N]`` in
        which the top ``ceil(group_shared * slots)`` selectable chunks of the shared ranking (the max over
        the rows) rank above every other chunk of each row, so a selection of ``slots`` chunks from a row
        keeps them and fills the rest from the row's own ranking. Unchanged otherwise, or when ``slots``
        is ``None`` (unknown). ``selectable`` (bool, broadcast to ``[..., N]``): the chunks the selection
        chooses among (the sink, the tail and unwritten chunks take no shared slot)."""
        cfg = self.config
        if not cfg.group_shared or not cfg.per_layer or slots is None:
            return logits
        return share_ranking(logits, cfg.group_shared, slots=slots, selectable=selectable, rows=self.shared_rows)

    @property
    def shared_rows(self) -> list[int] | None:
        """The rows (target layer numbers) whose max is the shared ranking (``config.shared_layers``); ``None``: all."""
        shared = self.config.shared_layers
        return None if shared is None else [self.config.target_layers.index(layer) for layer in shared]

    def ensemble(self, logits_list: list[Tensor] | tuple[Tensor, ...] | Tensor) -> Tensor:
        """Per-layer logits (a list of [B, N], or [B, Lt, N]) -> probabilities [B, N] (max or mean over
        layers); under ``ensemble="group"`` the per-target-layer probabilities [B, Lt, N], uncombined."""
        logits = torch.stack(list(logits_list), dim=1) if isinstance(logits_list, (list, tuple)) else logits_list
        probs = torch.sigmoid(logits)
        if self.config.ensemble == "group":
            return probs
        return probs.amax(1) if self.config.ensemble == "max" else probs.mean(1)

    def logits(self, x: Tensor, cos: Tensor | None, sin: Tensor | None, kmin: Tensor, kmax: Tensor) -> Tensor:
        """All target layers: x [B, Lt, hidden], cos/sin [B, D], kmin/kmax [B, Lt, N, Hkv, D] -> logits [B, Lt, N].
        Under a per-layer ``rope`` the cos/sin go to the rotary layers only."""
        self._check_layers(x, kmin, kmax)
        cfg = self.config
        out = []
        for i in range(len(self.layers)):
            rotary = isinstance(cfg.rope, bool) or cfg.layer_rope(i)
            q, w = self.query(i, x[:, i], cos if rotary else None, sin if rotary else None)
            out.append(self.layer_logits(i, q, w, kmin[:, i], kmax[:, i]))
        return torch.stack(out, dim=1)

    def forward(
        self, x: Tensor, cos: Tensor | None, sin: Tensor | None, kmin: Tensor, kmax: Tensor, *, lenders: Tensor | None = None
    ) -> Tensor:
        """x [B, Lt, hidden], cos/sin [B, D] (or None), kmin/kmax [B, Lt, N, Hkv, D] -> probabilities [B, N]
        (under ``ensemble="group"`` [B, Lt, N], one row per target layer), with the span rule of
        ``config.neighbour_margin`` as the runtime scores (``logits`` is without it).
        ``lenders`` [B, N] bool: the selectable chunks (see ``spread``)."""
        return self.ensemble(self.spread(self.logits(x, cos, sin, kmin, kmax), lenders=None if lenders is None else lenders[:, None]))

    def _check_layers(self, x: Tensor, kmin: Tensor, kmax: Tensor) -> None:
        lt = len(self.layers)
        if x.dim() != 3 or x.shape[1] != lt or kmin.dim() != 5 or kmin.shape[1] != lt or kmax.shape != kmin.shape:
            raise ValueError(
                f"expected x [B, Lt={lt}, hidden] and kmin/kmax [B, Lt={lt}, N, Hkv, D], got x {list(x.shape)}, "
                f"kmin {list(kmin.shape)}, kmax {list(kmax.shape)}"
            )

    # -- file format --------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, *, signature: dict, lsa: dict, metrics: dict | None = None) -> Path:
        """Write weights and metadata to one ``.safetensors`` file (atomically: temp file, then rename).

        ``signature``: the model signature it was trained for; ``lsa``: an ``LSAConfig.to_dict()`` or a
        flat dict with at least ``chunk_size`` (and ``interval``); ``metrics``: held-out metrics.
        The metadata holds ``_type``, ``_version``, and ``config``/``signature``/``lsa``/``metrics`` as JSON.
        """
        from safetensors.torch import save_file

        if "chunk_size" not in lsa_fields(lsa):
            raise ValueError(f"lsa must give the chunk_size the indexer is trained for (LSAConfig.to_dict() or a flat dict), got {lsa!r}")
        path = Path(path)
        tensors = {name: p.detach().to("cpu", torch.float32).contiguous() for name, p in self.named_parameters()}
        metadata = {
            "_type": FILE_TYPE,
            "_version": str(FILE_VERSION),
            "config": json.dumps(self.config.to_dict(), sort_keys=True),
            "signature": json.dumps(_plain(signature), sort_keys=True),
            "lsa": json.dumps(lsa_fields(lsa), sort_keys=True),
            "metrics": json.dumps(_plain(metrics), sort_keys=True),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
        self.signature, self.lsa, self.metrics = _plain(signature), lsa_fields(lsa), _plain(metrics)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu") -> "LSAIndexer":
        """Read an indexer written by :meth:`save`; every error names the file and what is wrong."""
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"indexer file {path} does not exist")
        if not path.is_file():
            raise ValueError(f"indexer path {path} is not a file")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise ValueError(f"indexer file {path} is not a readable safetensors file (corrupt or another format): {exc}") from None
        if metadata.get("_type") != FILE_TYPE:
            found = metadata.get("_type")
            raise ValueError(f"{path} is a safetensors file but not an LSA indexer (metadata _type={found!r}, expected {FILE_TYPE!r})")
        if metadata.get("_version") != str(FILE_VERSION):
            raise ValueError(
                f"{path} is an LSA indexer of format version {metadata.get('_version')!r}; this lsa-rewrite reads version {FILE_VERSION}"
            )
        fields = {}
        for key in ("config", "signature", "lsa", "metrics"):
            try:
                fields[key] = json.loads(metadata[key])
            except (KeyError, TypeError, json.JSONDecodeError) as exc:
                raise ValueError(f"{path}: indexer metadata field {key!r} is missing or not JSON ({exc})") from None
        try:
            config = IndexerConfig.from_dict(fields["config"])
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: invalid indexer config: {exc}") from None
        indexer = cls(config)
        expected = {name: tuple(p.shape) for name, p in indexer.named_parameters()}
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise ValueError(f"{path}: indexer tensors missing: {missing}")
        unexpected = sorted(set(tensors) - set(expected))
        if unexpected:
            raise ValueError(f"{path}: unexpected tensors for this indexer config: {unexpected}")
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise ValueError(f"{path}: tensor {name} has shape {list(tensors[name].shape)}, the config needs {list(shape)}")
        indexer.load_state_dict({name: t.float() for name, t in tensors.items()})
        indexer.signature, indexer.lsa, indexer.metrics = fields["signature"] or {}, fields["lsa"] or {}, fields["metrics"]
        indexer.source = str(path)
        return indexer.to(device)


def spread_neighbours(
    logits: Tensor,
    margin: float | None,
    *,
    slots: int | Tensor | None = None,
    min_slots: int = 0,
    lenders: Tensor | None = None,
    top: int | None = None,
) -> Tensor:
    """``max(own, max(left, right) - margin)`` along the last axis (chunks), where only ``lenders`` (bool,
    broadcast to ``logits``; ``None``: every chunk), and of those only the ``top`` highest (``None``: all),
    raise a neighbour; the first and last chunk have one neighbour. ``margin=None``, or ``slots`` given and
    below ``min_slots``: ``logits`` unchanged (``slots`` may be a ``[]`` tensor: decided on the device).

    Example::

        >>> spread_neighbours(torch.tensor([0.0, 5.0, 0.0, 1.0]), 1.0)
        tensor([4., 5., 4., 1.])
    """
    if margin is None or logits.shape[-1] < 2:
        return logits
    if slots is not None and not isinstance(slots, Tensor) and slots < min_slots:
        return logits
    source = logits if lenders is None else logits.masked_fill(~lenders, -torch.inf)
    if top is not None and top < logits.shape[-1]:
        cut = source.topk(top, dim=-1).values[..., -1:]  # the top-th highest lender's logit
        source = source.masked_fill(source < cut, -torch.inf)
    none = torch.full_like(source[..., :1], -torch.inf)
    after = torch.cat([source[..., 1:], none], dim=-1)  # the right neighbour's score
    before = torch.cat([none, source[..., :-1]], dim=-1)
    out = torch.maximum(logits, torch.maximum(after, before) - margin)
    if isinstance(slots, Tensor):  # a device count (a selection captured in a CUDA graph): decided on the device
        out = torch.where(slots >= min_slots, out, logits)
    return out


def share_ranking(
    logits: Tensor, share: float, *, slots: int | Tensor, selectable: Tensor, rows: list[int] | None = None
) -> Tensor:
    """``logits`` ``[..., Lt, N]`` with the top ``ceil(share * slots)`` ``selectable`` chunks of their max
    over ``Lt`` (over the rows ``rows`` of ``Lt`` only, when given) raised in every row above that row's
    highest logit (in shared order), the other chunks as they were. ``slots``: an int or a ``[]``/``[...]``
    tensor (device work only: a selection captured in a CUDA graph stays exact).

    Example::

        >>> rows = torch.tensor([[[3.0, 2.0, 0.0, 1.0], [0.0, 0.0, 5.0, 4.0]]])  # [B=1, Lt=2, N=4]
        >>> share_ranking(rows, 0.5, slots=2, selectable=torch.ones(1, 4, dtype=torch.bool)).topk(2).indices
        tensor([[[2, 0],
                 [2, 3]]])
    """
    # the rows by integer views (a list index would copy a host tensor: refused in a CUDA graph capture)
    source = logits if rows is None else torch.stack([logits[..., r, :] for r in rows], dim=-2)
    shared = source.amax(-2).masked_fill(~selectable, -torch.inf)  # [..., N]
    count = torch.as_tensor(slots, device=logits.device)
    count = torch.ceil(count.to(torch.float32) * share).to(torch.long)
    count = count.reshape(count.shape + (1,) * (shared.dim() - count.dim())) if count.dim() else count
    order = shared.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(shared.shape[-1], device=logits.device).expand_as(order))
    picked = (rank < count) & torch.isfinite(shared)  # [..., N]
    finite = logits.masked_fill(~torch.isfinite(logits), -torch.finfo(logits.dtype).max)
    ceiling = finite.amax(-1, keepdim=True)  # [..., Lt, 1]: each row's highest logit
    lifted = ceiling + 1.0 + (shared.shape[-1] - rank).to(logits.dtype).unsqueeze(-2)  # shared order among the picked
    return torch.where(picked.unsqueeze(-2), lifted, logits)


def merge_indexers(shared: LSAIndexer, groups: LSAIndexer, *, share: float) -> LSAIndexer:
    """One indexer whose layer groups take ``share`` of each selection's free slots from ``shared``'s
    ranking: the union of a ``max`` indexer (one ranking for every layer) and a ``group`` indexer (a
    ranking per layer group), each trained on its own calibration dump (its own target layers).

    The result reads both indexers' target layers (they must be disjoint), with their trained weights
    unchanged: ``groups``' target layers keep their groups, ``shared``'s have empty groups and form the
    shared ranking (``IndexerConfig.shared_layers``, ``group_shared=share``). At a selection each layer
    then ranks exactly as the two files would: the top ``ceil(share * free)`` of ``shared``'s ranking
    (its span rule included) first, its group's own after. The two must be for the same model, chunk
    size, query-tower rank, threshold and span rule; what differs is named. Held-out metrics are not
    carried (no dump records both target layer sets); the sources' are kept under ``metrics["merged_from"]``.

    Example::

        >>> merged = merge_indexers(LSAIndexer.load("max.safetensors"), LSAIndexer.load("groups.safetensors"), share=0.25)
        >>> merged.save("merged.safetensors", signature=merged.signature, lsa=merged.lsa, metrics=merged.metrics)
    """
    a, b = shared.config, groups.config
    if a.ensemble != "max":
        raise ValueError(f"the shared indexer ({shared.source}) must rank with ensemble='max' (one ranking for every layer), it has ensemble={a.ensemble!r}")
    if b.ensemble != "group" or b.shared_layers is not None:
        raise ValueError(
            f"the group indexer ({groups.source}) must have ensemble='group' and no shared layers of its own, "
            f"it has ensemble={b.ensemble!r}, shared_layers={b.shared_layers!r}"
        )
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 < share <= 1.0:
        raise ValueError(f"share must be in (0, 1] (the share of each selection's free slots from the shared ranking), got {share!r}")
    for name in ("hidden_size", "q_heads", "kv_heads", "head_dim", "rank", "rope_style", "threshold", "neighbour_margin", "neighbour_min_free", "neighbour_top"):
        if getattr(a, name) != getattr(b, name):
            raise ValueError(
                f"cannot merge {shared.source} and {groups.source}: {name} differs ({getattr(a, name)!r} against {getattr(b, name)!r}); "
                "train both with the same value"
            )
    both = sorted(set(a.target_layers) & set(b.target_layers))
    if both:
        raise ValueError(f"cannot merge {shared.source} and {groups.source}: both read target layers {both}; calibrate one of them for other layers")
    for name, left, right in (("model signature", shared.signature, groups.signature), ("chunk_size", shared.lsa.get("chunk_size"), groups.lsa.get("chunk_size"))):
        if _plain(left) and _plain(right) and _plain(left) != _plain(right):
            raise ValueError(f"cannot merge {shared.source} and {groups.source}: they were trained for another {name} ({left!r} against {right!r})")
    sources = {layer: (groups, i) for i, layer in enumerate(b.target_layers)} | {layer: (shared, i) for i, layer in enumerate(a.target_layers)}
    targets = tuple(sorted(sources))
    rope = tuple(src.config.layer_rope(i) for src, i in (sources[layer] for layer in targets))
    config = dataclasses.replace(
        b,
        target_layers=targets,
        rope=rope,
        layer_groups=tuple(b.layer_groups[i] if src is groups else () for src, i in (sources[layer] for layer in targets)),
        group_shared=float(share),
        shared_layers=tuple(sorted(a.target_layers)),
    )
    merged = LSAIndexer(config)
    with torch.no_grad():
        for k, layer in enumerate(targets):
            src, i = sources[layer]
            merged.layers[k].load_state_dict(src.layers[i].state_dict())
    merged.signature = dict(groups.signature or shared.signature)
    merged.lsa = dict(groups.lsa or shared.lsa)
    merged.metrics = {"merged_from": {"shared": {"source": shared.source, "metrics": shared.metrics}, "groups": {"source": groups.source, "metrics": groups.metrics}}}
    merged.source = f"<merged {shared.source} + {groups.source}>"
    return merged.to(next(groups.parameters()).device)


def lsa_fields(lsa: dict | None) -> dict[str, Any]:
    """The LSAConfig fields an indexer depends on (``chunk_size``, ``interval``), from an
    ``LSAConfig.to_dict()`` or a flat dict."""
    if not lsa:
        return {}
    data = lsa.get("_data", lsa) if isinstance(lsa, dict) else None
    if not isinstance(data, dict):
        raise ValueError(f"lsa must be an LSAConfig dict or a dict with chunk_size/interval, got {lsa!r}")
    out = {key: data[key] for key in ("chunk_size", "interval") if key in data}
    if "target_layers" in data:
        out["target_layers"] = list(data["target_layers"])
    return out


def _plain(obj: Any) -> Any:
    """JSON-normal form (tuples become lists) so that saved and live values compare equal."""
    return json.loads(json.dumps(obj)) if obj is not None else None


_MISSING = object()


def check_compatible(indexer: LSAIndexer, signature: dict, lsa: dict) -> None:
    """Refuse an indexer trained for another model, chunk size or target layer set.

    ``signature``: the model signature of the converted model (fields of ``SIGNATURE_FIELDS``);
    ``lsa``: its ``LSAConfig.to_dict()`` or a flat dict (``chunk_size``; optional ``target_layers``: the
    layers the runtime taps). Raises ``ValueError`` naming the first field that differs. A different
    ``interval`` is allowed (the indexer then looks ahead over another window length; quality may drop).
    An indexer built in memory (no recorded signature or chunk size) is checked for its shape and
    target layers only.

    Example::

        >>> check_compatible(LSAIndexer.load("smollm2.safetensors"), signature, LSAConfig(chunk_size=16).to_dict())
    """
    source = indexer.source
    trained, model = _plain(indexer.signature) or {}, _plain(signature) or {}
    # An indexer built in memory (e.g. ``from_query_weights``) records no signature: only its shape is checked.
    extra = sorted((set(trained) | set(model)) - set(SIGNATURE_FIELDS)) if trained else []
    for key in (*SIGNATURE_FIELDS, *extra) if trained else ():
        have, want = trained.get(key, _MISSING), model.get(key, _MISSING)
        if have is _MISSING and want is _MISSING:
            continue
        if have != want:
            show = lambda v: "(absent)" if v is _MISSING else repr(v)  # noqa: E731
            raise ValueError(f"indexer {source} was trained for a model with {key}={show(have)}, but this model has {key}={show(want)}")
    cfg = indexer.config
    for key, value in (("hidden_size", cfg.hidden_size), ("q_heads", cfg.q_heads), ("kv_heads", cfg.kv_heads), ("head_dim", cfg.head_dim)):
        if key in model and model[key] != value:
            raise ValueError(f"indexer {source} has {key}={value}, but this model has {key}={model[key]!r}")
    fields, wanted = indexer.lsa, lsa_fields(lsa)
    if "chunk_size" in fields and "chunk_size" in wanted and wanted["chunk_size"] != fields["chunk_size"]:
        raise ValueError(
            f"indexer {source} was trained for chunk_size={fields['chunk_size']}, but the LSAConfig has chunk_size={wanted['chunk_size']}"
        )
    layers = list(cfg.target_layers)
    if "target_layers" in wanted and sorted(wanted["target_layers"]) != sorted(layers):
        raise ValueError(f"indexer {source} reads target layers {layers}, but the runtime taps layers {sorted(wanted['target_layers'])}")
    sparse = model.get("sparse_layers")
    if sparse is not None and cfg.per_layer:
        uncovered = [layer for layer in sparse if cfg.target_of(layer) is None]
        if uncovered:
            raise ValueError(
                f"indexer {source} chooses resident sets per layer group {[list(g) for g in cfg.layer_groups or ()]}, "
                f"but sparse layers {uncovered} of this model are in none of them: train it for this model's layers"
            )
    if sparse is not None:
        outside = [layer for layer in layers if layer not in sparse]
        if outside:
            raise ValueError(
                f"indexer {source} reads target layers {layers}, but layers {outside} are not sparsely attended in this model "
                f"(sparse layers: {sparse})"
            )
    num_layers = model.get("num_layers")
    if num_layers is not None and max(layers) >= num_layers:
        raise ValueError(f"indexer {source} reads target layers {layers}, but this model has {num_layers} layers")
