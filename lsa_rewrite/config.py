"""``LSAConfig``: what a conversion keeps resident, and how it chooses.

A frozen dataclass with checks in ``__post_init__`` and a stable JSON form
(``{"_type": "LSAConfig", "_version": 1, "_data": {...}}``). It holds no model-specific knowledge.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

MODES = ("offload", "evict", "dense")
MIRRORS = ("exact", "fp8")
SELECTORS = ("query-aware", "recency", "random", "indexer")
CAPTURE_CACHES = ("static", "dynamic")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_compile_backend(name: str) -> None:
    import torch._dynamo

    known = sorted(set(torch._dynamo.list_backends(exclude_tags=())) - {"lsa"})
    if name not in known:
        raise ValueError(
            f"compile={name!r} is not a torch.compile backend the decode step can use; pass True (Inductor on CUDA), "
            f"False, or one of {known}"
        )


def always_resident_chunks(pos: int, *, chunk_size: int, sink_tokens: int, recent_tokens: int, valid_start: int = 0) -> list[int]:
    """Chunks of the tokens before ``pos`` that stay resident whatever a selector says: the sink
    (first ``sink_tokens`` from ``valid_start``) and the recent tail (last ``recent_tokens``, at least
    the chunk of the last token). The selection policy adds the chunks the coming window writes;
    calibration labels and selection metrics leave these chunks out (no selector chooses them).

    Example::

        >>> always_resident_chunks(100, chunk_size=16, sink_tokens=16, recent_tokens=32)
        [0, 4, 5, 6]
    """
    c = chunk_size
    keep: list[int] = []
    if sink_tokens and pos > valid_start:
        keep += range(valid_start // c, (min(valid_start + sink_tokens, pos) - 1) // c + 1)
    if pos > 0:
        keep += range(max(0, pos - max(recent_tokens, 1)) // c, (pos - 1) // c + 1)
    return list(dict.fromkeys(keep))


@dataclass(frozen=True)
class LSAConfig:
    """How much KV stays resident during decode and how the resident set is chosen.

    Args:
        budget: resident KV per sequence and layer. A float in (0, 1] is a fraction of the context
            (pool + chunk index + tables <= budget x the dense cache); an int >= 1 is a number of
            resident tokens (the pool alone).
        chunk_size: tokens per chunk, a positive power of two; selection and recall move whole chunks.
        interval: decode steps between selections (the lookahead window).
        sink_tokens: first tokens of each sequence that are always resident (attention sinks).
        recent_tokens: most recent tokens that are always resident, on top of the chunks the next
            window writes.
        mode: ``"offload"`` keeps the full history in a CPU mirror (recall from it); ``"evict"``
            keeps no mirror at all: the prefill writes the first resident set (sink and the newest
            chunks) straight into the pool, the rest of the prompt and every chunk that later leaves
            the pool are gone (counted in ``footprint()["dropped_chunks"]``), and no host memory
            grows with the context; ``"dense"`` keeps everything resident (for checking).
        mirror: how offload mode's CPU mirror stores chunks. ``"exact"`` (default): in the model's
            dtype, lossless (a recalled chunk is bit-identical to the one written). ``"fp8"``:
            **lossy**, half the host bytes of a bf16/fp16 model (a quarter of fp32), and half the
            bytes per recall over the host link: per token and KV head, ``head_dim``
            ``float8_e4m3fn`` codes and one power-of-two scale byte, so a recalled value is within
            ``2**-4 * |x| + 2**-9 * amax / 448`` of the original (``amax``: the largest magnitude of
            its token and head). Chunks resident on the device stay in the model's dtype; only those
            recalled from the mirror, and a later turn's read of the history (multi-turn), see the
            rounding. Needs a torch with ``torch.float8_e4m3fn``; offload mode only (evict keeps no
            mirror; dense and a covering budget never allocate one).
        selector: ``"query-aware"`` (training-free: current queries against chunk key bounds),
            ``"recency"`` or ``"random"`` (baselines), ``"indexer"`` (a trained indexer; needs one).
        max_context: tokens per sequence the store is sized for. ``None``: taken from ``generate()``
            (prompt + ``max_new_tokens``), else from the model's ``max_position_embeddings``.
        capture_cache: the HF cache the decode step is traced with: ``"static"`` or ``"dynamic"``.
        recall_lag: decode steps between a selection and the moment its recalled chunks join the
            chunk table. Chunks the selection drops leave at once; the chunks it recalls are copied
            from the CPU mirror on a side stream while decode goes on, and the table takes them
            only ``recall_lag`` steps later, after the copy is done. 0 waits for the copies at the
            selection. ``None``: ``interval // 16`` (4 for the default interval of 64). Must be
            below ``interval``; the chunks kept resident cover ``interval + recall_lag`` tokens ahead.
        recall_lag_max: the latest decode step after a selection at which its recalled chunks join.
            ``None`` (default): ``recall_lag``, so they join exactly ``recall_lag`` steps later (the
            main stream waits there for copies still running) and outputs are reproducible run to run.
            An int in ``[recall_lag, interval)``: from ``recall_lag`` steps on they join at the first
            step whose copies are done (the host checks the copies' event without blocking) and the
            main stream waits only at ``recall_lag_max``. Decode then never stalls on a recall that the
            window's remaining steps can hide (a long context recalls gigabytes per window over the host
            link), but the step at which recalled chunks join depends on timing, so sparse outputs may
            differ between runs. CUDA only in effect (elsewhere the copies are done at the selection).
        fallback_budget: the needle fallback (``selector="indexer"`` only): when more chunks score above
            the indexer's threshold than ``budget`` holds (the indexer is unsure, as on exact needle
            lookups), a selection keeps up to this many instead (same units as ``budget``; >= it). The
            pool is allocated at this size, so ``footprint()`` counts it; ``footprint()["widened"]``
            counts the layer-sequence selections that widened. ``None``: off.
        seed: seed of the ``"random"`` selector.
        compile: ``True``: on CUDA, compile the decode step with Inductor and replay it as a CUDA
            graph; on the CPU run the rewritten graph as a ``GraphModule``. A ``torch.compile``
            backend name (``"inductor"``, ``"aot_eager"``, ...): compile the step with that backend on
            every device (CUDA graph on CUDA only). ``False``: never compile. A compiled step is
            compiled once per batch size: stores of other capacities (new prompt lengths) reuse it.
        prefill_batch: prompts per prefill forward. ``None``: a batch of prompts is prefilled in one
            forward of the model (the dense attention's working set for every row at once). An int
            ``p >= 1``: the batch is prefilled ``p`` rows at a time into the one store sized for the
            whole batch, then decodes together, so peak device memory during the prefill is the
            weights, the store and one piece's working set (its activations, and one layer's KV of
            ``p`` rows at a time). Left padding, the mirror options and every mode (``"dense"``
            included) work as for the whole batch, with the same tokens. The first call of a
            ``torch.compile(backend="lsa")`` model runs the model's own code over the whole batch and
            does not apply it.
        prefill_chunk: prompt tokens per prefill forward (HF models). ``None``: the prompt is
            prefilled in one forward. An int (a multiple of ``chunk_size``): a longer prompt is
            prefilled in pieces of that many tokens, each attending exactly to everything before it
            (read back one layer at a time from the store: the mirror in offload mode, the pool in
            dense mode) and streamed into the store and the mirror as it goes, so peak device memory
            during the prefill is the weights, the store and one piece's working set (its activations,
            and one layer's history while that layer runs). Needs the history of earlier pieces:
            ``mode="offload"`` or ``"dense"`` (evict keeps none); with ``mirror="fp8"`` the earlier
            pieces are read back dequantised (lossy, as a later turn's history is). Applies to the
            first prefill of a generation (a later turn's new tokens run in one piece); the first
            call of a ``torch.compile(backend="lsa")`` model runs the model's own code over the whole
            prompt and does not apply it; plain decoders refuse a longer prompt with it.

    Example::

        >>> cfg = LSAConfig(budget=0.135, chunk_size=64)
        >>> LSAConfig.from_json(cfg.to_json()) == cfg
        True
    """

    budget: float | int = 0.135
    chunk_size: int = 64
    interval: int = 64
    sink_tokens: int = 64
    recent_tokens: int = 128
    mode: str = "offload"
    mirror: str = "exact"
    selector: str = "query-aware"
    max_context: int | None = None
    capture_cache: str = "static"
    recall_lag: int | None = None
    recall_lag_max: int | None = None
    fallback_budget: float | int | None = None
    seed: int = 0
    compile: bool | str = True
    prefill_batch: int | None = None
    prefill_chunk: int | None = None
    version: int = 1

    def __post_init__(self) -> None:
        budget = self.budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise ValueError(f"budget must be a fraction in (0, 1] or a token count >= 1, got {budget!r}")
        if isinstance(budget, float) and not (0.0 < budget <= 1.0):
            raise ValueError(
                f"budget={budget} is out of range: a float budget is a fraction of the context in (0, 1]; "
                "pass an int for an absolute number of resident tokens"
            )
        if _is_int(budget) and budget < 1:
            raise ValueError(f"budget={budget} is out of range: an int budget counts resident tokens and must be >= 1")
        size = self.chunk_size
        if not _is_int(size) or size < 1 or size & (size - 1):
            raise ValueError(f"chunk_size must be a positive power of two (e.g. 16, 64), got {size!r}")
        if not _is_int(self.interval) or self.interval < 1:
            raise ValueError(f"interval must be an int >= 1 (decode steps between selections), got {self.interval!r}")
        for name in ("sink_tokens", "recent_tokens"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mirror not in MIRRORS:
            raise ValueError(f"mirror must be one of {MIRRORS} ('exact': lossless; 'fp8': lossy, half the host bytes), got {self.mirror!r}")
        if self.mirror != "exact" and self.mode == "evict":
            raise ValueError(
                f"mirror={self.mirror!r} with mode='evict': evict mode keeps no CPU mirror, so there is nothing to store "
                "as fp8; use mode='offload' with mirror='fp8' (a lossy mirror in half the host memory), or leave mirror='exact'"
            )
        if self.mirror == "fp8":
            import torch

            if getattr(torch, "float8_e4m3fn", None) is None:
                raise ValueError(
                    f"mirror='fp8' needs a torch with torch.float8_e4m3fn (2.1 or later); this torch {torch.__version__} has none: "
                    "upgrade torch or use mirror='exact'"
                )
        if self.selector not in SELECTORS:
            raise ValueError(f"selector must be one of {SELECTORS}, got {self.selector!r}")
        if self.max_context is not None and (not _is_int(self.max_context) or self.max_context < 1):
            raise ValueError(f"max_context must be None or an int >= 1, got {self.max_context!r}")
        if self.recall_lag is not None and (not _is_int(self.recall_lag) or not 0 <= self.recall_lag < self.interval):
            raise ValueError(
                f"recall_lag must be None or an int in [0, interval={self.interval}) (decode steps a recall may take "
                f"before its chunks join the table), got {self.recall_lag!r}"
            )
        if self.recall_lag_max is not None and (
            not _is_int(self.recall_lag_max) or not self.lag <= self.recall_lag_max < self.interval
        ):
            raise ValueError(
                f"recall_lag_max must be None or an int in [recall_lag={self.lag}, interval={self.interval}) (the latest "
                f"decode step after a selection at which its recalled chunks join), got {self.recall_lag_max!r}"
            )
        fallback = self.fallback_budget
        if fallback is not None:
            if isinstance(fallback, bool) or not isinstance(fallback, (int, float)) or type(fallback) is not type(budget):
                raise ValueError(
                    f"fallback_budget must be None or of the same kind as budget ({type(budget).__name__}: a fraction or a "
                    f"token count), got {fallback!r}"
                )
            if fallback < budget or (isinstance(fallback, float) and fallback > 1.0):
                raise ValueError(f"fallback_budget={fallback!r} must be >= budget={budget!r} (and <= 1.0 as a fraction)")
            if self.selector != "indexer":
                raise ValueError(
                    f"fallback_budget widens past the budget when the indexer's threshold passes more chunks than it holds; "
                    f"it needs selector='indexer', got selector={self.selector!r}"
                )
        if self.capture_cache not in CAPTURE_CACHES:
            raise ValueError(f"capture_cache must be one of {CAPTURE_CACHES}, got {self.capture_cache!r}")
        if not isinstance(self.compile, (bool, str)):
            raise ValueError(f"compile must be True, False or a torch.compile backend name, got {self.compile!r}")
        if isinstance(self.compile, str):
            _check_compile_backend(self.compile)
        if self.prefill_batch is not None and (not _is_int(self.prefill_batch) or self.prefill_batch < 1):
            raise ValueError(
                f"prefill_batch must be None (prefill a batch of prompts in one forward) or an int >= 1 (prompts per "
                f"prefill forward, e.g. 1 to prefill one sequence at a time), got {self.prefill_batch!r}"
            )
        chunk = self.prefill_chunk
        if chunk is not None:
            if not _is_int(chunk) or chunk < self.chunk_size or chunk % self.chunk_size:
                raise ValueError(
                    f"prefill_chunk must be None (prefill a prompt in one forward) or a multiple of chunk_size={self.chunk_size} "
                    f"(prompt tokens per prefill forward, e.g. {64 * self.chunk_size}), got {chunk!r}"
                )
            if self.mode == "evict":
                raise ValueError(
                    "prefill_chunk needs the KV of earlier pieces to attend to, which mode='evict' does not keep; use "
                    "mode='offload' (the mirror holds it) or prefill in one forward (prefill_chunk=None)"
                )
        if self.version != 1:
            raise ValueError(f"LSAConfig version {self.version} is not supported by this lsa-rewrite (knows version 1)")

    @property
    def lag(self) -> int:
        """The recall lag in effect: ``recall_lag``, or ``interval // 16`` when it is ``None``."""
        return self.interval // 16 if self.recall_lag is None else self.recall_lag

    @property
    def lag_max(self) -> int:
        """The latest step a recall may join at: ``recall_lag_max``, or the lag in effect when it is ``None``."""
        return self.lag if self.recall_lag_max is None else self.recall_lag_max

    def to_dict(self) -> dict[str, Any]:
        """Stable, versioned dict form (``_type``, ``_version``, ``_data``)."""
        data = dataclasses.asdict(self)
        version = data.pop("version")
        return {"_type": "LSAConfig", "_version": version, "_data": data}

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> "LSAConfig":
        """Inverse of :meth:`to_dict`; unknown fields are an error, not silently dropped."""
        if not isinstance(obj, dict) or obj.get("_type") != "LSAConfig" or "_data" not in obj:
            raise ValueError(f"not an LSAConfig dict (expected keys _type='LSAConfig', _version, _data): {obj!r}")
        data = dict(obj["_data"])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LSAConfig fields {unknown}; known fields are {sorted(known - {'version'})}")
        return cls(**data, version=obj.get("_version", 1))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "LSAConfig":
        return cls.from_dict(json.loads(text))
