"""Run the lsa Triton kernels on CPU tensors under Triton's interpreter (imported by the test_triton_* modules).

Triton picks compiled or interpreted when ``@triton.jit`` decorates a function (Triton 3.x reads
``TRITON_INTERPRET`` then, through ``triton.knobs``), not at launch; that holds for Triton's own jit'd
library functions (``tl.sum``, ``tl.max``) too, decorated when ``triton.language`` is first imported.
So this module sets ``TRITON_INTERPRET=1`` before it imports anything; and since Triton and the kernel
modules may have been imported earlier in the same process (transformers imports Triton; other test
modules import the kernels), the autouse fixture swaps every compiled-mode jit function of
``triton.language`` and of the kernel modules for an interpreted one, for each test. The fixture also poisons the split-K workspace of decode
attention: every entry the merge reads must have been written by the split kernel.

Interpreter bugs worked around here (seen in Triton 3.9's interpreter; the kernels run unchanged):
- ``tl.dot`` on bfloat16 operands multiplies their raw uint16 bit patterns (the interpreter stores bf16
  as uint16 and converts only fp8 operands). The fixture widens bf16 dot operands to fp32 first,
  exactly (a bf16 is the top half of an fp32).
- ``x.to(tl.bfloat16)`` from fp32 truncates, where the GPU (and torch) round to nearest even. The
  fixture makes that cast round to nearest even, so stores of bf16 match torch bit for bit.

Import it before ``lsa_rewrite`` and re-export the fixture: ``from triton_interpreter import interpreted_kernels``.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="Triton is not installed (it ships for Linux only)")

import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

KERNEL_MODULES = (
    "lsa_rewrite.kernels.append_kv",
    "lsa_rewrite.kernels.chunk_scores",
    "lsa_rewrite.kernels.compact_chunks",
    "lsa_rewrite.kernels.copy_chunks",
    "lsa_rewrite.kernels.decode_attention",
    "lsa_rewrite.kernels.small_m_linear",
)
POISON = float("nan")
_interpreted: dict[object, InterpretedFunction] = {}  # Python function -> its interpreted form


def _widen_bf16(handle):
    if handle.dtype.scalar != tl.bfloat16:
        return handle
    bits = handle.data.astype(np.uint32) << 16
    return interpreter.TensorHandle(bits.view(np.float32), tl.float32)


_create_dot = interpreter.InterpreterBuilder.create_dot
_cast_impl = interpreter.InterpreterBuilder.cast_impl


def _cast_rounding_to_bf16(self, src, dst_type):
    if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
        rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
        return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
    return _cast_impl(self, src, dst_type)


def _create_dot_widening_bf16(self, a, b, d, *args, **kwargs):
    return _create_dot(self, _widen_bf16(a), _widen_bf16(b), d, *args, **kwargs)


def _interpret_module(module, monkeypatch):
    """Swap the module's compiled-mode jit functions for interpreted ones (what decorating them with
    TRITON_INTERPRET=1 would have made)."""
    for attr, value in list(vars(module).items()):
        if isinstance(value, JITFunction):
            if value.fn not in _interpreted:  # keyed by the Python function: hashing a JITFunction compiles deps
                _interpreted[value.fn] = InterpretedFunction(value.fn)
            monkeypatch.setattr(module, attr, _interpreted[value.fn])


@pytest.fixture(autouse=True)
def interpreted_kernels(monkeypatch):
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", _create_dot_widening_bf16)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", _cast_rounding_to_bf16)
    # Triton imported before TRITON_INTERPRET was set (by transformers, or another test module) holds
    # its own jit'd library functions (tl.sum, tl.max, ...) in compiled mode too.
    for name, module in list(sys.modules.items()):
        if name == "triton.language" or name.startswith("triton.language."):
            _interpret_module(module, monkeypatch)
    for name in KERNEL_MODULES:
        _interpret_module(importlib.import_module(name), monkeypatch)
    decode = importlib.import_module("lsa_rewrite.kernels.decode_attention")
    make_workspace = decode._workspace
    monkeypatch.setattr(decode, "_workspace", lambda *args: tuple(t.fill_(POISON) for t in make_workspace(*args)))
