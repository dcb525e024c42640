"""Selection policy: which chunks each layer and sequence keeps resident for the coming window.

Always kept: the sink (first ``sink_tokens`` of each sequence), the recent tail (last
``recent_tokens``), and every chunk the next ``interval + recall_lag`` tokens write. The rest of the
pool goes to the chunks the selector (``lsa_rewrite.selectors``) scores highest, among those that are
written, not left padding, and (evict mode) not dropped. The result is ``[L, B, k]`` chunk ids, must-keep
first; the memory mover installs it. The policy never touches the pools, tables or mirror.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..config import LSAConfig, always_resident_chunks
from ..selectors import SelectionWindow, Selector, WindowMasks, window_masks
from .state import INDEX_DTYPE


def min_slots(config: LSAConfig) -> int:
    """Slots per sequence the always-resident chunks can take: sink, tail, the window and the recall lag."""
    c = config.chunk_size
    sink = math.ceil(config.sink_tokens / c) + 1 if config.sink_tokens else 0
    return sink + math.ceil((config.recent_tokens + config.interval + config.lag) / c) + 1


class SelectionPolicy:
    """Must-keep chunks + the selector's top scores, per layer and sequence.

    Args:
        config: the conversion's ``LSAConfig`` (chunk size, sink, tail, interval, lag, mode).
        selector: scores chunks (``lsa_rewrite.selectors``).
        batch, slots, num_chunks, capacity: store sizes.
        valid_start: first real position of each sequence (host ints).
        device: where scores and the result live.
    """

    def __init__(
        self, config: LSAConfig, selector: Selector, *, batch: int, slots: int, num_chunks: int, capacity: int,
        valid_start: list[int], device: torch.device, base_slots: int | None = None,
    ):
        self.config, self.selector = config, selector
        self.batch, self.slots, self.num_chunks, self.capacity = batch, slots, num_chunks, capacity
        # The needle fallback: a selection keeps base_slots chunks, up to slots when more chunks pass the
        # selector's threshold than base_slots holds (LSAConfig.fallback_budget).
        self.base_slots = slots if base_slots is None else base_slots
        self.widened = torch.zeros((), dtype=torch.long, device=device)  # layer-sequence selections that widened
        self.valid_start, self.device = list(valid_start), device
        self.valid_start_device = torch.tensor(self.valid_start, dtype=torch.long, device=device)  # [B]
        # The start of the window being chosen for, on the device: `choose` sets it, or (a selection captured
        # in a CUDA graph) the store before each replay; the masks of must-keep and unusable chunks follow it.
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self.chunk, self.lag = config.chunk_size, config.lag

    def device_tensors(self) -> list[Tensor]:
        """The policy's own device tensors (counted by ``KVStore.footprint``)."""
        return [self.widened, self.position, self.valid_start_device]

    def masks(self) -> WindowMasks:
        """The chunk classes of the window at ``self.position`` (device ops only)."""
        cfg = self.config
        return window_masks(
            self.position, self.valid_start_device, num_chunks=self.num_chunks, chunk_size=self.chunk, interval=cfg.interval,
            lag=self.lag, sink_tokens=cfg.sink_tokens, recent_tokens=cfg.recent_tokens,
        )

    def window(self, pos: int, masks: WindowMasks | None = None) -> SelectionWindow:
        cfg = self.config
        return SelectionWindow(
            start=pos, interval=cfg.interval, lag=self.lag, chunk_size=self.chunk, valid_start=tuple(self.valid_start),
            slots=self.base_slots, sink_tokens=cfg.sink_tokens, recent_tokens=cfg.recent_tokens, masks=masks,
        )

    def must_keep(self, b: int, pos: int) -> list[int]:
        """Sink chunks, recent tail, and every chunk written during the next window (sequence ``b``)."""
        cfg, c = self.config, self.chunk
        keep = always_resident_chunks(pos, chunk_size=c, sink_tokens=cfg.sink_tokens, recent_tokens=cfg.recent_tokens, valid_start=self.valid_start[b])
        last = min(pos + cfg.interval + self.lag - 1, self.capacity - 1) // c
        keep += range(max(pos - 1, 0) // c, last + 1)  # the last token's chunk and every chunk the window writes
        return list(dict.fromkeys(keep))

    def choose(self, layers: list, available: Tensor, pos: int, *, set_position: bool = True) -> Tensor:
        """``[L, B, k]`` chunk ids to keep per layer (must-keep first, then by descending score; -1: none).

        ``available`` ``[L, B, N]``: chunks held in pool or mirror (evict mode drops the rest).
        ``set_position=False``: ``self.position`` already holds ``pos`` (a captured selection: the store
        sets it before each replay; ``pos`` is then only the host-side ``SelectionWindow.start``).
        Device work only, no host sync.
        """
        n = self.num_chunks
        if set_position:
            self.position.fill_(pos)
        masks = self.masks()
        must = masks.resident | masks.window  # sink, tail and the chunks the window writes
        blocked = ~masks.written | masks.padding  # not yet written, or left padding only
        k = min(self.slots, n)
        scores = self.selector.scores(layers, self.window(pos, masks)).float()  # [L, B, N]
        expected = (len(layers), self.batch, n)
        if tuple(scores.shape) != expected:
            raise ValueError(f"selector {self.selector.name!r} returned scores of shape {tuple(scores.shape)}; expected [L, B, N] = {expected}")
        gone = blocked if self.config.mode != "evict" else blocked | ~available  # dropped chunks
        scores = scores.nan_to_num(nan=-torch.finfo(torch.float32).max).masked_fill(gone, -torch.inf)
        values, ids = scores.masked_fill(must, torch.inf).topk(k, dim=2)  # sorted: must-keep first
        ids = ids.masked_fill(values == -torch.inf, -1)
        base = min(self.base_slots, n)
        if base < k:
            threshold = getattr(self.selector, "threshold_score", None)
            keep = torch.full(ids.shape[:2], base, dtype=torch.long, device=ids.device)
            if threshold is not None:
                # Chunks above the threshold beyond the budget: widen up to the ceiling (the fallback).
                passing = ((scores > threshold) & ~must & ~gone).sum(-1) + must.sum(-1)  # [L, B]
                self.widened += (passing > base).sum()
                keep = passing.clamp(min=base, max=k)
            ids = ids.masked_fill(torch.arange(k, device=ids.device) >= keep.unsqueeze(-1), -1)
        return ids

    def first_resident(self, length: int) -> Tensor:
        """``[B, S]`` chunk ids resident right after a prefill of ``length`` tokens: must-keep, then the newest."""
        keeps = torch.full((self.batch, self.slots), -1, dtype=INDEX_DTYPE)
        for b in range(self.batch):
            must = self.must_keep(b, length)
            first = self.valid_start[b] // self.chunk  # chunks before it are all left padding
            rest = [c for c in range(math.ceil(length / self.chunk) - 1, first - 1, -1) if c not in must]
            keep = list(dict.fromkeys(must + rest))[: self.slots]
            keeps[b, : len(keep)] = torch.tensor(keep, dtype=INDEX_DTYPE)
        return keeps.to(self.device)

