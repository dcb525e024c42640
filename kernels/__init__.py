"""LSA operators: torch custom ops over the resident KV store, with PyTorch references.

Every op here is a ``torch.library.custom_op`` in the ``lsa`` namespace with a fake (meta)
implementation, so rewritten FX graphs trace, export and compile through them. On the CPU each op
runs its pure-PyTorch reference (``<op>_ref``); on CUDA it launches its Triton kernel
(``<op>_triton``, the launcher, also callable directly) behind the same op boundary, so the graphs
that call the ops do not change. Triton is optional: without it (macOS) every op runs its reference.

Installed as ``lsa_rewrite.kernels`` (never as a top-level ``kernels`` module: that name belongs to
a Hugging Face package that transformers imports).
"""

from .append_kv import (
    append_kv,
    append_kv_ref,
    append_kv_triton,
    ring_append_kv,
    ring_append_kv_ref,
    ring_append_kv_triton,
    update_chunk_index,
    update_chunk_index_ref,
    update_chunk_index_triton,
)
from .chunk_scores import chunk_scores, chunk_scores_ref, chunk_scores_triton
from .compact_chunks import pack_chunks, pack_chunks_ref, pack_fp8, unpack_chunks, unpack_chunks_ref, unpack_chunks_triton, unpack_fp8
from .copy_chunks import copy_chunks, copy_chunks_ref, copy_chunks_triton
from .decode_attention import (
    ring_decode_attention,
    ring_decode_attention_ref,
    ring_decode_attention_triton,
    sparse_decode_attention,
    sparse_decode_attention_append,
    sparse_decode_attention_append_ref,
    sparse_decode_attention_append_triton,
    sparse_decode_attention_ref,
    sparse_decode_attention_triton,
)
from .small_m_linear import GemvConfig, small_m_linear, small_m_linear_ref, small_m_linear_triton
from .tap import tap

__all__ = [
    "GemvConfig",
    "append_kv",
    "append_kv_ref",
    "append_kv_triton",
    "chunk_scores",
    "chunk_scores_ref",
    "chunk_scores_triton",
    "copy_chunks",
    "copy_chunks_ref",
    "copy_chunks_triton",
    "pack_chunks",
    "pack_chunks_ref",
    "pack_fp8",
    "ring_append_kv",
    "ring_append_kv_ref",
    "ring_append_kv_triton",
    "ring_decode_attention",
    "ring_decode_attention_ref",
    "ring_decode_attention_triton",
    "sparse_decode_attention",
    "sparse_decode_attention_append",
    "sparse_decode_attention_append_ref",
    "sparse_decode_attention_append_triton",
    "sparse_decode_attention_ref",
    "sparse_decode_attention_triton",
    "small_m_linear",
    "small_m_linear_ref",
    "small_m_linear_triton",
    "tap",
    "unpack_chunks",
    "unpack_chunks_ref",
    "unpack_chunks_triton",
    "unpack_fp8",
    "update_chunk_index",
    "update_chunk_index_ref",
    "update_chunk_index_triton",
]
