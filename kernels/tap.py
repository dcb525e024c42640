"""``lsa::tap``: copy a tensor the decode step computes into a store buffer, in place.

The rewrite taps each rewritten layer's query so that selection, which runs between decode steps,
can score chunks against the latest query without the step syncing with the host.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("lsa::tap", mutates_args=("dst",))
def tap(dst: Tensor, src: Tensor) -> None:
    """Copy ``src`` into ``dst`` (same number of elements).

    Example::

        >>> buf = torch.zeros(2, 4); tap(buf, torch.ones(2, 4)); float(buf.sum())
        8.0
    """
    if dst.numel() != src.numel():
        raise ValueError(f"tap: destination {tuple(dst.shape)} and source {tuple(src.shape)} differ in size")
    dst.copy_(src.reshape(dst.shape))


@tap.register_fake
def _(dst, src):
    return None
