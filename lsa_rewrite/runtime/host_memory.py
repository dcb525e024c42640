"""Page-locked host memory for the CPU mirror, allocated at its exact size.

``torch.empty(..., pin_memory=True)`` goes through PyTorch's caching host allocator, which rounds
each request up to a power of two: a layer mirror a few chunks over 2^28 bytes (128K tokens plus
decode room, Llama-3-8B layout) takes 2^29, nearly twice the host memory the mirror needs. Here one
pageable allocation holds every layer's mirror and is page-locked in place with ``cudaHostRegister``:
exact size, and faster to pin (``benchmarks/pinning.py`` measures both on the GPU host).

The registration lives as long as the ``HostArena``; every tensor ``take`` hands out keeps a
reference to its arena, so the memory stays page-locked while any of them is held. Without CUDA the
arena is plain pageable memory (same views, nothing registered).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

_ALIGN = 4096  # every tensor starts on a page boundary
_REGISTER_FLAGS = 0x01 | 0x02  # cudaHostRegisterPortable | cudaHostRegisterMapped: every context, device-addressable


def to_device(host: Tensor, device: torch.device) -> Tensor:
    """A small host tensor on ``device`` without making the host wait (page-locked first on CUDA)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class HostArena:
    """One host allocation carved into tensors; page-locked when ``device`` is a CUDA device.

    Example::

        >>> arena = HostArena.for_tensors([((2, 3), torch.float32), ((4,), torch.bfloat16)], torch.device("cpu"))
        >>> a = arena.take((2, 3), torch.float32); b = arena.take((4,), torch.bfloat16)
        >>> a.shape, b.dtype, arena.pinned
        (torch.Size([2, 3]), torch.bfloat16, False)
    """

    def __init__(self, nbytes: int, device: torch.device):
        if nbytes < 0:
            raise ValueError(f"HostArena size must be >= 0 bytes, got {nbytes}")
        self.nbytes = nbytes
        self.device = device
        self._offset = 0
        self._registered: int | None = None  # the registered address, while registered
        want_pin = device.type == "cuda" and torch.cuda.is_available() and nbytes > 0
        self.buffer = torch.empty(nbytes, dtype=torch.uint8)
        if want_pin:
            # Touch every page first (a multi-threaded fill): registering untouched memory faults
            # the pages in one by one, ~5x slower for 8 GiB on the H200 host (benchmarks/pinning.py).
            self.buffer.zero_()
            ptr = self.buffer.data_ptr()
            cudart = torch.cuda.cudart()
            err = cudart.cudaHostRegister(ptr, nbytes, _REGISTER_FLAGS)
            if int(err) == 0:
                self._registered = ptr
            else:
                if hasattr(cudart, "cudaGetLastError"):
                    cudart.cudaGetLastError()  # clear it: a later launch check must not report it
                warnings.warn(
                    f"cudaHostRegister of {nbytes / 2**30:.1f} GiB failed ({err}); using PyTorch's pinned allocator, "
                    "which may reserve up to twice that",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self.buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    @classmethod
    def for_tensors(cls, tensors: list[tuple[tuple[int, ...], torch.dtype]], device: torch.device) -> "HostArena":
        """An arena just large enough for ``tensors`` (shape, dtype), each page-aligned, taken in order."""
        total = sum(_aligned(math.prod(shape) * dtype.itemsize) for shape, dtype in tensors)
        return cls(total, device)

    @property
    def pinned(self) -> bool:
        return self._registered is not None or self.buffer.is_pinned()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """The next page-aligned ``shape`` x ``dtype`` tensor of the arena (uninitialised)."""
        nbytes = math.prod(shape) * dtype.itemsize
        start = self._offset
        if start + nbytes > self.nbytes:
            raise ValueError(f"HostArena of {self.nbytes} bytes has {self.nbytes - start} left, {nbytes} asked for {tuple(shape)} {dtype}")
        self._offset = _aligned(start + nbytes)
        view = self.buffer[start : start + nbytes].view(dtype).view(shape)
        view._lsa_host_arena = self  # the registration must outlive every tensor handed out
        return view

    def __del__(self) -> None:
        ptr, self._registered = getattr(self, "_registered", None), None  # None too if __init__ raised
        if ptr is None:
            return
        try:
            # copies from or to this memory may still be queued on any stream of the device
            torch.cuda.synchronize(self.device)
            torch.cuda.cudart().cudaHostUnregister(ptr)
        except Exception:  # interpreter shutdown: CUDA may already be gone, and the process with it
            pass
