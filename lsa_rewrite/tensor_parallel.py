"""Tensor-parallel HF models (transformers' ``tp_plan``, DTensor weights): the per-rank decode step.

transformers shards a model by its ``tp_plan`` into ``DTensor`` parameters and wraps each planned
module's ``forward`` in hooks that convert between local and distributed tensors. Dynamo cannot trace
those hooks (``DTensor.to_local``, a ``DeviceMesh`` as a graph input), so the decode step is traced
on a *local view* of the model instead (``TensorParallelPlan.local_view``): for the time of the
capture every DTensor parameter is replaced by its local shard (the same tensor object, no copy) and
every planned module runs a plain local forward whose collectives are ``torch.distributed``
functional collectives (``_c10d_functional.all_reduce`` / ``all_gather_into_tensor``), which trace
into the graph. The traced graph is then per rank: its shapes carry the rank's local head counts,
so the located attention sites, the state contract and the store hold only this rank's KV heads.

Supported plan styles (what transformers' Llama-like plans use), each checked against the
parameters' placements before anything is converted:

- ``colwise`` on ``nn.Linear`` (weight and bias ``Shard(0)``): local output features, no collective;
- ``rowwise`` on ``nn.Linear`` (weight ``Shard(1)``, bias replicated): partial product, all-reduce
  (sum), then the bias once;
- ``embedding_rowwise`` on ``nn.Embedding`` (vocabulary-parallel, weight ``Shard(0)``): ids outside
  the rank's rows look up zeros, all-reduce (sum);
- ``colwise_gather_output`` / ``colwise_rep`` on ``nn.Linear`` (e.g. ``lm_head``): local output
  features, all-gather on the last dimension;
- ``replicate``: nothing to do.

Anything else (sequence parallelism, packed or fused projections, experts, a mesh with more than one
dimension of size > 1, a sharded parameter of a module the plan does not name, KV heads that do not
divide by the tensor-parallel size) is refused with a ``TensorParallelError`` naming it.

Not here: the selection across ranks (``selectors.AllReduceSelector``), the store (per rank, from the
traced shapes).
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


class TensorParallelError(ValueError):
    """A tensor-parallel model that lsa-rewrite cannot convert (the message says what and what to do).

    Example::

        >>> try:
        ...     lsa_rewrite.convert(model_with_sequence_parallel_norms)
        ... except lsa_rewrite.TensorParallelError as exc:
        ...     print(exc)   # names the plan entry and the styles that are supported
    """


_LINEAR_STYLES = {"colwise", "rowwise", "colwise_gather_output", "colwise_rep"}
_SUPPORTED = sorted(_LINEAR_STYLES | {"embedding_rowwise", "replicate"})


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def is_dtensor(t: Any) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


@dataclass(frozen=True)
class ShardedModule:
    """One module of the plan: its qualified name, style and the facts its local forward needs."""

    name: str
    style: str
    vocab_start: int = 0  # embedding_rowwise: first vocabulary row this rank holds


@dataclass
class TensorParallelPlan:
    """How a tensor-parallel model is sharded, as far as the decode step is concerned.

    ``rank``/``size``: this process's place in the tensor-parallel group; ``group``: that process
    group; ``modules``: every planned module, by qualified name.

    Example::

        >>> plan = TensorParallelPlan.from_model(model)   # None for a model without DTensor weights
        >>> plan.size, plan.rank
        (2, 0)
    """

    group: Any
    rank: int
    size: int
    modules: dict[str, ShardedModule]
    _options: dict[str, Any] | None = None  # compile_options, once decided

    @property
    def group_name(self) -> str:
        return self.group.group_name

    def compile_options(self, device: torch.device) -> dict[str, Any]:
        """Inductor settings for compiling this rank's decode step: on CUDA GPUs of one host that can read
        each other's memory, the step's small all-reduces (the rowwise products' sums, a few KB each)
        lowered as PyTorch's one-shot all-reduce over symmetric memory (each rank reads its peers'
        buffers over NVLink) instead of NCCL, with symmetric memory enabled for the group; ``{}``
        (NCCL) otherwise. Decided once per plan, on every rank alike (an all-gather of each rank's
        host and peer access).

        On two H200s, 8B shape, 512K, LSA 13.5%: 6.55 -> 5.82 ms/token (benchmarks/NOTES.md, run 55, set by
        the benchmark); in runs 78-79 NCCL's all-reduces cost +0.9-1.2 ms per token; run 83 measures it set
        by the library (4.53 ms/token). The
        settings are applied around the step's compile (``CompiledStep.compile_config``); if the step fails
        to compile with them, the session compiles it again with NCCL's (``use_nccl``) and goes on.
        """
        if self._options is None:
            self._options = _one_shot_options(self, device)
        return dict(self._options)

    def use_nccl(self) -> None:
        """Compile later steps with NCCL all-reduces (``compile_options`` returns ``{}`` from now on)."""
        self._options = {}

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "TensorParallelPlan | None":
        """The plan of ``model``, checked; None when no parameter is a ``DTensor``.

        Raises ``TensorParallelError`` for anything the local view cannot run (see the module docstring).
        """
        dtensors = {n: p for n, p in model.named_parameters() if is_dtensor(p)}
        if not dtensors:
            return None
        meshes = {id(p.device_mesh): p.device_mesh for p in dtensors.values()}
        if len(meshes) != 1:
            raise TensorParallelError(
                f"the model's DTensor parameters live on {len(meshes)} different device meshes; lsa-rewrite converts a "
                "model sharded on one tensor-parallel mesh (from_pretrained(..., tp_plan='auto') under torchrun)"
            )
        mesh = next(iter(meshes.values()))
        if mesh.ndim != 1:
            raise TensorParallelError(
                f"the model's parameters are sharded over a {mesh.ndim}-D device mesh {mesh}; lsa-rewrite supports "
                "tensor parallelism alone (a 1-D mesh): no FSDP, expert or pipeline sharding"
            )
        plan = dict(getattr(model, "_tp_plan", None) or getattr(model, "tp_plan", None) or {})
        if not plan:
            raise TensorParallelError(
                "the model has DTensor parameters but no tensor-parallel plan (`model._tp_plan`); load it with "
                "from_pretrained(..., distributed_config=DistributedConfig(tp_size=N)) so lsa-rewrite can read how it is sharded"
            )
        named = dict(model.named_modules())
        modules: dict[str, ShardedModule] = {}
        for pattern, style in plan.items():
            regex = re.compile(re.escape(pattern).replace(r"\*", r"\d+"))
            matched = [n for n in named if regex.fullmatch(n)]
            for name in matched:
                modules[name] = _check_module(name, named[name], style, mesh)
        for pname, p in dtensors.items():
            owner = pname.rpartition(".")[0]
            if owner not in modules and any(not pl.is_replicate() for pl in p.placements):
                raise TensorParallelError(
                    f"parameter {pname} is sharded ({p.placements}) but no plan entry that lsa-rewrite knows names its module; "
                    f"supported plan styles: {', '.join(_SUPPORTED)}"
                )
        group = mesh.get_group()
        return cls(group=group, rank=mesh.get_local_rank(), size=mesh.size(), modules=modules)

    def check_heads(self, sites, config: Any) -> None:
        """Every rank holds whole KV heads: the traced (local) head counts times the size give the model's."""
        kv = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)
        q = getattr(config, "num_attention_heads", None)
        for site in sites:
            if kv and site.kv_heads * self.size != kv or q and site.q_heads * self.size != q:
                raise TensorParallelError(
                    f"layer {site.layer} attends with {site.q_heads} query and {site.kv_heads} KV heads on this rank, but the "
                    f"model has {q} and {kv} over {self.size} ranks; lsa-rewrite needs the plan to split query and KV heads "
                    "evenly across ranks (colwise q/k/v projections with heads divisible by the tensor-parallel size)"
                )

    @contextlib.contextmanager
    def local_view(self, model: torch.nn.Module) -> Iterator[None]:
        """For the time of the block: DTensor parameters are their local shards and planned modules run
        a local forward with functional collectives (traceable by Dynamo). Restored on exit."""
        swapped: list[tuple[torch.nn.Module, str, Any]] = []
        forwards: list[tuple[torch.nn.Module, Any]] = []
        named = dict(model.named_modules())
        try:
            for module in named.values():
                for pname, p in list(module._parameters.items()):
                    if is_dtensor(p):
                        swapped.append((module, pname, p))
                        # a plain tensor on the shard's storage (no copy): the graph keeps it as a constant
                        module._parameters[pname] = p.to_local().detach()
            for name, sharded in self.modules.items():
                module = named[name]
                forwards.append((module, module.__dict__.get("forward")))
                module.forward = _local_forward(module, sharded, self)
            yield
        finally:
            for module, forward in forwards:
                if forward is None:
                    module.__dict__.pop("forward", None)
                else:
                    module.forward = forward
            for module, pname, p in swapped:
                module._parameters[pname] = p


def _one_shot_options(plan: TensorParallelPlan, device: torch.device) -> dict[str, Any]:
    """``compile_options``: the one-shot all-reduce where every rank of the group is a CUDA device on one
    host with peer access to the others (all ranks must agree, so the facts are gathered first)."""
    import torch.distributed as dist

    if device.type != "cuda" or dist.get_backend(plan.group) != "nccl":
        return {}
    try:
        from torch.distributed._symmetric_memory import enable_symm_mem_for_group
        import torch._inductor.config as inductor_config

        inductor_config._collective.auto_select  # noqa: B018 (present in this torch)
    except (ImportError, AttributeError):
        return {}
    index = device.index if device.index is not None else torch.cuda.current_device()
    peers = all(torch.cuda.can_device_access_peer(index, other) for other in range(torch.cuda.device_count()) if other != index)
    facts: list[Any] = [None] * plan.size
    dist.all_gather_object(facts, (socket.gethostname(), peers), group=plan.group)
    if len({host for host, _ in facts}) != 1 or not all(ok for _, ok in facts):
        log.info("tensor parallel: NCCL all-reduces (ranks on several hosts, or GPUs without peer access): %s", facts)
        return {}
    try:
        enable_symm_mem_for_group(plan.group_name)
    except Exception as exc:  # an allocator or driver without symmetric memory: NCCL, as before
        log.warning("tensor parallel: symmetric memory unavailable (%s); the decode step's all-reduces stay NCCL's", exc)
        return {}
    return {"_collective.auto_select": True}


def _check_module(name: str, module: torch.nn.Module, style: str, mesh) -> ShardedModule:
    if style == "replicate":
        return ShardedModule(name, style)
    size = mesh.size()
    if style in _LINEAR_STYLES:
        if type(module) is not torch.nn.Linear:
            raise TensorParallelError(
                f"plan entry {name!r}: {style} on a {type(module).__name__}; lsa-rewrite runs colwise/rowwise shards of plain "
                "nn.Linear layers only (no quantized or packed projections)"
            )
        weight = module.weight
        want = 1 if style == "rowwise" else 0
        if not is_dtensor(weight) or weight.placements[0] != _shard(want):
            found = weight.placements if is_dtensor(weight) else "a plain tensor"
            raise TensorParallelError(f"plan entry {name!r} ({style}) expects its weight sharded on dim {want}, found {found}")
        width = weight.shape[want]
        if width % size:
            raise TensorParallelError(
                f"plan entry {name!r} ({style}): {width} features do not split evenly over {size} ranks; lsa-rewrite needs "
                "even shards"
            )
        return ShardedModule(name, style)
    if style == "embedding_rowwise":
        if type(module) is not torch.nn.Embedding or module.max_norm is not None:
            raise TensorParallelError(
                f"plan entry {name!r}: embedding_rowwise on a {type(module).__name__}; lsa-rewrite supports plain nn.Embedding "
                "(without max_norm) only"
            )
        weight = module.weight
        if not is_dtensor(weight) or weight.placements[0] != _shard(0) or weight.shape[0] % size:
            raise TensorParallelError(
                f"plan entry {name!r}: embedding_rowwise needs the vocabulary rows split evenly over {size} ranks, found "
                f"{weight.shape[0]} rows placed as {getattr(weight, 'placements', 'a plain tensor')}"
            )
        rows = weight.shape[0] // size
        return ShardedModule(name, style, vocab_start=mesh.get_local_rank() * rows)
    raise TensorParallelError(
        f"plan entry {name!r} uses the {style!r} style, which lsa-rewrite does not support under tensor parallelism; "
        f"supported: {', '.join(_SUPPORTED)} (shard attention heads and the MLP colwise/rowwise, or convert the unsharded model)"
    )


def _shard(dim: int):
    from torch.distributed.tensor import Shard

    return Shard(dim)


def _local_forward(module: torch.nn.Module, sharded: ShardedModule, plan: TensorParallelPlan):
    from torch.distributed import _functional_collectives as funcol

    group = plan.group_name
    style = sharded.style
    if style in ("colwise", "replicate"):
        return type(module).forward.__get__(module)

    if style == "rowwise":
        def rowwise(x: torch.Tensor) -> torch.Tensor:
            y = funcol.all_reduce(F.linear(x, module.weight), "sum", group)
            return y if module.bias is None else y + module.bias
        return rowwise

    if style in ("colwise_gather_output", "colwise_rep"):
        world = plan.size

        def gather(x: torch.Tensor) -> torch.Tensor:
            y = F.linear(x, module.weight, module.bias).contiguous()
            # the c10d functional ops themselves (funcol's all-gather wrappers differ between torch 2.11 and
            # 2.13, and 2.11's chunk-and-cat helper is skipped by Dynamo): gather along dim 0, then
            # move the rank dimension next to the sharded last one
            g = torch.ops._c10d_functional.all_gather_into_tensor(y, world, group)
            g = torch.ops._c10d_functional.wait_tensor(g)
            return g.view(world, *y.shape).movedim(0, -2).reshape(*y.shape[:-1], world * y.shape[-1])
        return gather

    if style == "embedding_rowwise":
        start = sharded.vocab_start

        def embedding(ids: torch.Tensor) -> torch.Tensor:
            rows = module.weight.shape[0]
            outside = (ids < start) | (ids >= start + rows)
            local = (ids - start).masked_fill(outside, 0)
            out = F.embedding(local, module.weight).masked_fill(outside.unsqueeze(-1), 0.0)
            return funcol.all_reduce(out, "sum", group)
        return embedding
    raise AssertionError(f"unchecked style {style}")  # _check_module refuses every other style
