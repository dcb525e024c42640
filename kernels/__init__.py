"""LSA operators: torch custom ops over the resident KV store, with PyTorch references.

Every op here is a ``torch.library.custom_op`` in the ``lsa`` namespace with a fake (meta)
implementation, so rewritten FX graphs trace, export and compile through them. On the CPU each op
runs its pure-PyTorch reference (``<op>_ref``); Triton kernels for CUDA plug in behind the same op
boundary without changing the graphs that call them.

Installed as ``lsa_rewrite.kernels`` (never as a top-level ``kernels`` module: that name belongs to
a Hugging Face package that transformers imports).
"""

from .append_kv import append_kv, append_kv_ref, ring_append_kv, ring_append_kv_ref, update_chunk_index, update_chunk_index_ref
from .decode_attention import (
    ring_decode_attention,
    ring_decode_attention_ref,
    sparse_decode_attention,
    sparse_decode_attention_ref,
)
from .tap import tap

__all__ = [
    "append_kv",
    "append_kv_ref",
    "ring_append_kv",
    "ring_append_kv_ref",
    "ring_decode_attention",
    "ring_decode_attention_ref",
    "sparse_decode_attention",
    "sparse_decode_attention_ref",
    "tap",
    "update_chunk_index",
    "update_chunk_index_ref",
]
