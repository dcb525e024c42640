"""``ConcatSharedInputLinearPass``: the products of one input by several weights as one product by their
concatenation, split (q/k/v and gate/up of a Llama layer), with the weights moved into one storage.

A decode step reads each weight matrix once per token; where several projections read the same ``x``
(q, k and v read the attention norm's output, gate and up the MLP norm's), one product by the stacked
weights is one larger reduction instead of two or three small ones (at the 8B shape k and v are 8 MB
each, too small to reach the copy rate alone), and the norm is computed once instead of per product.

``build_decode_program`` runs it with ``min_group=3`` on batch-1 CUDA steps (q/k/v, not gate/up) and lowers
the concatenated product to the GEMV (``LowerSmallMLinearPass(normed_concat=True)``): 0.07-0.21 ms faster
at 128K on an H200 (benchmarks/NOTES.md runs 77, 79). Left to Inductor, the concatenated products were
slower (run 72: q/k/v +0.21 ms; gate/up lose the silu * up fusion into up's kernel).

Memory-neutral: the weights are not copied. Each group's parameters are moved into one new buffer
``[sum N, K]`` and the parameters become its row blocks (``param.data = cat[a:b]``: the same
``nn.Parameter`` objects, the model's own forward and ``state_dict`` unchanged, the old storages freed),
and the program reads the buffer. A parameter that already shares its storage with anything (a tied
weight, a view, one a previous run of this pass moved) is never moved again: a group whose weights are
already consecutive blocks of one storage in the group's order reuses it (a second batch size's program
of the same model), any other such group is left alone. So compiled steps and captured CUDA graphs of
earlier programs keep valid pointers.

A group is the ``linear(x, W, None)`` nodes (``torch.nn.functional.linear``) of one ``x`` node, at least
``min_group`` of them, whose ``W`` are distinct 2-D contiguous ``nn.Parameter`` attributes of the model
(``model.<name>`` after binding; never a tensor-parallel shard, which the program reads as a plain
``lsa_local_*`` buffer) of one dtype (``dtypes``), one device (a type in ``devices``) and one ``K``; ``x``
of at most ``max_rows`` rows. ``local_shards=True`` (benchmarks only, not memory-neutral) takes a
tensor-parallel rank's ``lsa_local_*`` shards too, copying them into the buffer: the model's DTensors keep
their own shards, so those weights are held twice. Left alone: products with a bias, over anything but a
model parameter, products of other inputs. Each original node's value is the same slice of the concatenated product
(bit-equal wherever the matmul computes each output column the same way at either width).

Before::

    linear = torch._C._nn.linear(x, model_..._q_proj_weight, None)
    linear_1 = torch._C._nn.linear(x, model_..._k_proj_weight, None)
    linear_2 = torch._C._nn.linear(x, model_..._v_proj_weight, None)

After::

    lsa_concat = torch._C._nn.linear(x, lsa_concat_0, None)          # [.., 4096 + 1024 + 1024]
    split = torch.functional.split(lsa_concat, [4096, 1024, 1024], -1)
    linear = split[0]; linear_1 = split[1]; linear_2 = split[2]
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx

from lsa_rewrite.tensor_parallel import is_dtensor

from .capture import example_value
from .locate import GraphPass

log = logging.getLogger("lsa_rewrite.passes")

_LINEAR = {torch.nn.functional.linear, torch._C._nn.linear}
BUFFER_PREFIX = "lsa_concat_"


def _resolve(gm: fx.GraphModule, target: str):
    value = gm
    for part in target.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def _owns_storage(t: torch.Tensor) -> bool:
    """Whether ``t`` is the whole of its storage (nothing else can view it)."""
    return t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def _consecutive(weights: list[torch.Tensor]) -> bool:
    """Whether ``weights`` are consecutive row blocks, in order, of one storage that they fill exactly."""
    first = weights[0]
    storage = first.untyped_storage()
    offset = first.storage_offset()
    if offset != 0:
        return False
    for w in weights:
        if w.untyped_storage().data_ptr() != storage.data_ptr() or w.storage_offset() != offset:
            return False
        offset += w.numel()
    return offset * first.element_size() == storage.nbytes()


class ConcatSharedInputLinearPass(GraphPass):
    """Concatenate the weights of products sharing one input (see the module docstring).

    ``min_group``: the fewest products of one ``x`` that are concatenated (3: q/k/v but not gate/up at
    the Llama shape); ``max_rows``: the most rows of ``x``; ``devices``: device types of the weights;
    ``dtypes``: weight dtypes; ``local_shards``: copy tensor-parallel shards too (benchmarks only).
    """

    def __init__(self, *, min_group: int = 2, max_rows: int = 1, devices: tuple[str, ...] = ("cuda",),
                 dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16), local_shards: bool = False):
        if min_group < 2:
            raise ValueError(f"ConcatSharedInputLinearPass: min_group must be >= 2, got {min_group}")
        if max_rows < 1:
            raise ValueError(f"ConcatSharedInputLinearPass: max_rows must be >= 1, got {max_rows}")
        self.min_group = min_group
        self.max_rows = max_rows
        self.devices = tuple(devices)
        self.dtypes = tuple(dtypes)
        self.local_shards = local_shards

    def _weight(self, gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, torch.Tensor] | None:
        """``(x, W)`` when ``node`` is ``linear(x, W)`` over a model parameter this pass may move (or, with
        ``local_shards``, a tensor-parallel shard it may copy)."""
        if node.op != "call_function" or node.target not in _LINEAR:
            return None
        x = node.args[0] if node.args else node.kwargs.get("input")
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if bias is not None or not isinstance(x, fx.Node) or not isinstance(weight, fx.Node) or weight.op != "get_attr":
            return None
        w = _resolve(gm, weight.target)
        shard = self.local_shards and weight.target.startswith("lsa_local_") and isinstance(w, torch.Tensor)
        if not (isinstance(w, torch.nn.Parameter) or shard) or is_dtensor(w) or w.dim() != 2 or not w.is_contiguous():
            return None
        if w.device.type not in self.devices or w.dtype not in self.dtypes:
            return None
        xv = example_value(x)
        if not isinstance(xv, torch.Tensor) or xv.dim() < 1 or xv.shape[-1] != w.shape[1] or xv.dtype != w.dtype:
            return None
        if not 1 <= xv.numel() // w.shape[1] <= self.max_rows:
            return None
        return x, w

    def _groups(self, gm: fx.GraphModule) -> list[tuple[fx.Node, list[fx.Node], list[torch.nn.Parameter]]]:
        by_input: dict[fx.Node, list[tuple[fx.Node, torch.nn.Parameter]]] = {}
        for node in gm.graph.nodes:
            found = self._weight(gm, node)
            if found is not None:
                by_input.setdefault(found[0], []).append((node, found[1]))
        groups = []
        claimed: dict[int, int] = {}  # id(param) -> how many candidate groups name it
        candidates = []
        for x, members in by_input.items():
            params = [w for _, w in members]
            if len(members) < self.min_group or len({id(w) for w in params}) != len(params):
                continue
            first = params[0]
            if any(w.device != first.device or w.dtype != first.dtype or w.shape[1] != first.shape[1] for w in params):
                continue
            candidates.append((x, [n for n, _ in members], params))
            for w in params:
                claimed[id(w)] = claimed.get(id(w), 0) + 1
        for x, nodes, params in candidates:
            if any(claimed[id(w)] > 1 for w in params):
                continue  # a weight two inputs multiply (tied): it cannot be a block of two buffers
            is_param = [isinstance(w, torch.nn.Parameter) for w in params]
            if any(is_param) and not all(is_param):
                continue  # parameters and shards are not mixed
            if all(is_param) and not (_consecutive(params) or all(_owns_storage(w) for w in params)):
                continue  # already placed elsewhere (tied, a view, another grouping): never moved
            groups.append((x, nodes, params))
        return groups

    @staticmethod
    def _concatenated(params: list[torch.Tensor]) -> torch.Tensor:
        """The ``[sum N, K]`` buffer whose row blocks the parameters become (moving them there, once); for
        tensor-parallel shards a copy."""
        rows = sum(w.shape[0] for w in params)
        first = params[0]
        if not isinstance(first, torch.nn.Parameter):
            with torch.no_grad():
                return torch.cat(params)
        if _consecutive(params):
            return torch.empty(0, dtype=first.dtype, device=first.device).set_(
                first.untyped_storage(), 0, (rows, first.shape[1]), (first.shape[1], 1))
        with torch.no_grad():
            cat = torch.empty((rows, first.shape[1]), dtype=first.dtype, device=first.device)
            start = 0
            for w in params:
                cat[start:start + w.shape[0]].copy_(w.data)
                start += w.shape[0]
            start = 0
            for w in params:
                w.data = cat[start:start + w.shape[0]]  # the old storage goes with its last reference
                start += w.shape[0]
        return cat

    def __call__(self, gm: fx.GraphModule) -> int:
        """Concatenate the matching groups of ``gm`` in place (recompiling it when any changed); returns how
        many products were replaced."""
        graph = gm.graph
        replaced = 0
        order = {node: i for i, node in enumerate(graph.nodes)}
        for gi, (x, nodes, params) in enumerate(self._groups(gm)):
            cat = self._concatenated(params)
            name = f"{BUFFER_PREFIX}{gi}"
            while hasattr(gm, name):
                name += "_"
            gm.register_buffer(name, cat, persistent=False)
            sizes = [w.shape[0] for w in params]
            first = min(nodes, key=order.__getitem__)
            xv = example_value(x)
            rows = xv.numel() // xv.shape[-1]
            with graph.inserting_before(first):
                w_node = graph.get_attr(name)
                product = graph.call_function(torch._C._nn.linear, (x, w_node, None))
                parts = graph.call_function(torch.split, (product, sizes, -1))
                outs = []
                for i, node in enumerate(nodes):
                    part = graph.call_function(operator.getitem, (parts, i))
                    if rows > 1:  # a slice of several rows is not contiguous; views downstream may need it to be
                        part = graph.call_method("contiguous", (part,))
                    outs.append(part)
            for node, out in zip(nodes, outs):
                out.meta = dict(node.meta)
                weight_node = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
                node.replace_all_uses_with(out)
                graph.erase_node(node)
                if not weight_node.users:
                    graph.erase_node(weight_node)
            replaced += len(nodes)
        if replaced:
            graph.lint()
            gm.recompile()
        log.info("ConcatSharedInputLinearPass: %d linear layers in concatenated groups", replaced)
        return replaced
