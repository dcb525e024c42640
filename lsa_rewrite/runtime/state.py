"""The per-layer state contract: every tensor the rewritten decode step reads or writes, declared once.

``RewriteAttentionPass`` turns the graph inputs declared here into placeholders named
``lsa_<layer>_<name>`` (``lsa_<name>`` for the store-wide ones); ``KVStore`` allocates exactly these
tensors from the same declarations, with the shapes and dtypes given here. Neither keeps its own list
of names: a pass that emits a placeholder the contract does not declare, or a store that holds a tensor
of another shape, fails at ``convert()`` / allocation with a message (``StateContractError``).

Shapes are written with symbols resolved per layer and store:

- ``B`` sequences, ``S`` resident slots per sequence, ``N`` chunks per sequence (capacity / C),
  ``C`` tokens per chunk, ``Hq``/``Hkv`` query/KV heads, ``D`` head dim, ``W`` sliding window;
- ``B*S``: a product (pools are flat over sequences and slots).

``S`` and ``N`` follow the store's capacity (tokens it is sized for) and change from one generation to
the next; every other size is fixed by the model and the batch. The compiled step treats the dimensions
that involve them as dynamic (``StateTensor.capacity_dims``), so one compile serves every capacity.

Dtype ``"kv"`` is the layer's KV dtype, ``"index"`` is int64, ``"bool"`` is bool.

Not here: what the tensors mean to the selection policy (``runtime/policy.py``) or how chunks move
between pool and mirror (``runtime/mover.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

INDEX_DTYPE = torch.long
CAPACITY_SYMBOLS = frozenset({"S", "N"})  # sizes that follow the store's capacity (see the module docstring)


class StateContractError(ValueError):
    """A graph input or a store tensor does not match the per-layer state contract."""


@dataclass(frozen=True)
class StateTensor:
    """One tensor of the contract.

    Args:
        name: attribute name on the layer (and placeholder suffix in the rewritten graph).
        shape: symbolic shape (see the module docstring).
        dtype: ``"kv"``, ``"index"`` or ``"bool"``.
        writer: who writes it: ``"step"`` (the decode step, in place), ``"manager"`` (selection,
            recall, prefill; outside the step) or ``"step+manager"``.
        graph: the rewritten decode step takes it as an input; otherwise only the manager uses it
            (still on the device and counted in ``footprint()``).
        fill: initial value.
        doc: what it holds.
    """

    name: str
    shape: tuple[str, ...]
    dtype: str
    writer: str
    graph: bool
    fill: float
    doc: str

    def resolve_shape(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        out = []
        for sym in self.shape:
            try:
                out.append(math.prod(dims[part] for part in sym.split("*")))
            except KeyError as exc:
                raise StateContractError(f"state tensor {self.name!r}: no size given for dimension {exc.args[0]!r}") from None
        return tuple(out)

    def capacity_dims(self) -> tuple[int, ...]:
        """Indices of the dimensions whose size follows the store's capacity (they involve ``S`` or ``N``)."""
        return tuple(i for i, sym in enumerate(self.shape) if CAPACITY_SYMBOLS & set(sym.split("*")))

    def resolve_dtype(self, kv_dtype: torch.dtype) -> torch.dtype:
        return {"kv": kv_dtype, "index": INDEX_DTYPE, "bool": torch.bool}[self.dtype]


def _t(name, shape, dtype, writer, graph, fill, doc) -> StateTensor:
    return StateTensor(name, tuple(shape), dtype, writer, graph, float(fill), doc)


# Store-wide tensors (one per store, not per layer).
STORE_STATE: tuple[StateTensor, ...] = (
    _t("pos", ["1"], "index", "manager", True, 0, "physical position being decoded (same for every sequence)"),
    _t("valid_start", ["B"], "index", "manager", True, 0, "first real (non-padding) position of each sequence"),
)

# A sparsely attended layer: resident pool + tables + chunk index + query tap.
CHUNK_LAYER_STATE: tuple[StateTensor, ...] = (
    _t("k_pool", ["B*S", "C", "Hkv", "D"], "kv", "step+manager", True, 0, "resident keys: S slots of C tokens per sequence"),
    _t("v_pool", ["B*S", "C", "Hkv", "D"], "kv", "step+manager", True, 0, "resident values"),
    _t("slot_chunk", ["B", "S"], "index", "manager", True, -1, "slot -> logical chunk (-1: empty), what decode attention reads"),
    _t("chunk_slot", ["B", "N"], "index", "manager", True, -1, "logical chunk -> slot (-1: not resident), where the step appends"),
    _t("kmin", ["B", "N", "Hkv", "D"], "kv", "step+manager", True, 0, "chunk index: per-channel key minimum of each chunk"),
    _t("kmax", ["B", "N", "Hkv", "D"], "kv", "step+manager", True, 0, "chunk index: per-channel key maximum of each chunk"),
    _t("q_tap", ["B", "Hq", "D"], "kv", "step", True, 0, "the latest decode query, for the selection"),
    _t("planned", ["B", "S"], "index", "manager", False, -1, "slot -> chunk once a pending recall is in"),
    _t("available", ["B", "N"], "bool", "manager", False, 0, "chunk held in pool or mirror (not dropped, written)"),
    _t("dropped", [], "index", "manager", False, 0, "chunks gone for good (evict mode)"),
)

# A sliding-window layer: an exact ring of the last W tokens.
RING_LAYER_STATE: tuple[StateTensor, ...] = (
    _t("k_ring", ["B", "W", "Hkv", "D"], "kv", "step", True, 0, "keys of the last W positions, at position % W"),
    _t("v_ring", ["B", "W", "Hkv", "D"], "kv", "step", True, 0, "values of the last W positions"),
)

# What the lookahead indexer reads at a target layer (``passes/indexer_taps.py``): the query
# projection's input and the rotary cos/sin of the latest decoded token. X: hidden size, R: rotated
# channels (without rotary the step never writes cos/sin and they stay 1 and 0: no rotation).
INDEXER_TAP_STATE: tuple[StateTensor, ...] = (
    _t("idx_x", ["B", "X"], "kv", "step", True, 0, "input of the query projection at the latest token"),
    _t("idx_cos", ["B", "R"], "kv", "step", True, 1, "rotary cos the model applied to that token's query"),
    _t("idx_sin", ["B", "R"], "kv", "step", True, 0, "rotary sin the model applied to that token's query"),
)

LAYOUTS: dict[str, tuple[StateTensor, ...]] = {
    "rewrite": CHUNK_LAYER_STATE,
    "rewrite+indexer": CHUNK_LAYER_STATE + INDEXER_TAP_STATE,
    "ring": RING_LAYER_STATE,
}


def layout(action: str) -> tuple[StateTensor, ...]:
    """The contract of a layer of this layout: ``"rewrite"`` (sparse), ``"rewrite+indexer"`` (sparse, and
    the indexer reads it) or ``"ring"`` (sliding window)."""
    try:
        return LAYOUTS[action]
    except KeyError:
        raise StateContractError(f"no state contract for site action {action!r}; known: {sorted(LAYOUTS)}") from None


def graph_inputs(action: str) -> tuple[str, ...]:
    """Names the rewritten step takes as inputs for one layer of this ``action``, in placeholder order."""
    return tuple(t.name for t in layout(action) if t.graph)


def store_graph_inputs() -> tuple[str, ...]:
    return tuple(t.name for t in STORE_STATE if t.graph)


def declared(action: str | None, name: str) -> StateTensor:
    """The declaration of ``name`` for a layer of ``action`` (``None``: store-wide)."""
    for t in STORE_STATE if action is None else layout(action):
        if t.name == name:
            return t
    where = "store-wide state" if action is None else f"the {action!r} layer state"
    raise StateContractError(f"{name!r} is not declared in {where} (runtime/state.py)")


def allocate(
    tensors: tuple[StateTensor, ...], dims: Mapping[str, int], *, kv_dtype: torch.dtype, device: torch.device, only_graph: bool = False
) -> dict[str, Tensor]:
    """Fresh tensors for ``tensors`` (all, or the graph inputs only) with their declared shape, dtype and fill."""
    return {
        t.name: torch.full(t.resolve_shape(dims), t.fill, dtype=t.resolve_dtype(kv_dtype), device=device)
        for t in tensors
        if t.graph or not only_graph
    }


def same_device(actual: torch.device, wanted: torch.device) -> bool:
    """``actual`` is ``wanted``; a device without an index (``"cuda"``) matches any index of its type."""
    return actual.type == wanted.type and (wanted.index is None or actual.index == wanted.index)


def check_tensor(spec: StateTensor, value: Tensor | None, dims: Mapping[str, int], *, kv_dtype: torch.dtype, device: torch.device, where: str) -> None:
    """Raise ``StateContractError`` unless ``value`` has the declared shape, dtype and device."""
    if not isinstance(value, Tensor):
        raise StateContractError(f"{where}: {spec.name!r} is missing (got {type(value).__name__})")
    shape, dtype = spec.resolve_shape(dims), spec.resolve_dtype(kv_dtype)
    if tuple(value.shape) != shape or value.dtype != dtype or not same_device(value.device, device):
        raise StateContractError(
            f"{where}: {spec.name!r} is {tuple(value.shape)} {value.dtype} on {value.device}, the contract declares "
            f"{spec.shape} = {shape} {dtype} on {device}"
        )


def check_program_inputs(store_keys: list[tuple[int | None, str]], actions: Mapping[int, str]) -> None:
    """Every store input of a rewritten graph is declared, and every declared graph input of each layer is bound.

    ``store_keys``: ``(layer, name)`` of the graph's store placeholders (``layer`` None: store-wide);
    ``actions``: layer -> the site's layout (``AttentionSite.layout``). Raises ``StateContractError`` naming the first mismatch.
    """
    seen: dict[int | None, list[str]] = {}
    for layer, name in store_keys:
        if layer is not None and layer not in actions:
            raise StateContractError(f"the rewritten graph reads {name!r} of layer {layer}, which has no attention site")
        spec = declared(None if layer is None else actions[layer], name)
        if not spec.graph:
            raise StateContractError(f"the rewritten graph reads {name!r} of layer {layer}, which the contract keeps out of the step")
        seen.setdefault(layer, []).append(name)
    wanted = {None: list(store_graph_inputs()), **{layer: list(graph_inputs(a)) for layer, a in actions.items()}}
    for layer, names in wanted.items():
        if seen.get(layer, []) != names:
            where = "store-wide" if layer is None else f"layer {layer} ({actions[layer]})"
            raise StateContractError(f"{where}: the rewritten graph binds {seen.get(layer, [])}, the contract declares {names}")
