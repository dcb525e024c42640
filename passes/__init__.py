"""FX passes of lsa-rewrite: capture a decode step, locate attention + KV-cache writes, rewrite, verify,
and (CUDA, fp16/bf16) lower the step's projections to a GEMV op.

Installed as ``lsa_rewrite.passes``. One pass per file; ``pipeline.py`` holds the explicit order.
"""

from .capture import Binding, CapturedStep, CaptureError, capture_step
from .concat_linear import ConcatSharedInputLinearPass
from .indexer_taps import IndexerTap, TapIndexerInputsPass
from .locate import AttentionSite, LocateAttentionPass, LocateError
from .pipeline import DecodeProgram, build_decode_program, clone_program, locate
from .rewrite import RewriteAttentionPass
from .small_m_linear import LowerSmallMLinearPass
from .verify import VerifyError, VerifyRewritePass, count_targets

__all__ = [
    "AttentionSite",
    "Binding",
    "CaptureError",
    "CapturedStep",
    "ConcatSharedInputLinearPass",
    "DecodeProgram",
    "IndexerTap",
    "LocateAttentionPass",
    "LocateError",
    "LowerSmallMLinearPass",
    "RewriteAttentionPass",
    "TapIndexerInputsPass",
    "VerifyError",
    "VerifyRewritePass",
    "build_decode_program",
    "capture_step",
    "clone_program",
    "count_targets",
    "locate",
]
