"""A gpt-fast style decoder in plain PyTorch whose KV cache lives in module buffers.

It stands in for the hand-written (non-HF) decoders lsa-rewrite must convert: each layer's cache is a
`KVCache` module with fixed-shape `k_cache` / `v_cache` buffers written by index assignment, and
attention is SDPA over the whole fixed-length cache with a boolean mask sliced from a buffer. That is the
graph shape the passes have to recognise without any HF config. Test-only: random weights, no sampling,
no weight loading.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class BufferDecoderArgs:
    vocab_size: int = 256
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int = 2
    dim: int = 64
    intermediate_size: int = 128
    max_seq_len: int = 2048  # longest position the RoPE tables cover
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head


class KVCache(nn.Module):
    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_head: int, head_dim: int, *, dtype: torch.dtype):
        super().__init__()
        shape = (max_batch_size, n_kv_head, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype))  # [B, H_kv, S, D]
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype))  # [B, H_kv, S, D]

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # input_pos: [T]; k, v: [B, H_kv, T, D]. B must equal the cache's batch size, as in gpt-fast.
        k_out, v_out = self.k_cache, self.v_cache
        k_out[:, :, input_pos] = k
        v_out[:, :, input_pos] = v
        return k_out, v_out  # [B, H_kv, S, D]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, *, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, D]; cos, sin: [T, D/2]. Rotates the pairs (x[i], x[i + D/2]).
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def gpt_fast_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """gpt-fast's apply_rotary_emb, a drop-in for ``apply_rope``: interleaved channel pairs, the factors as a
    [T, D/2, 2] (cos, sin) table."""
    freqs = torch.stack([cos, sin], -1)
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    freqs = freqs.view(1, 1, xs.size(2), xs.size(3), 2)
    out = torch.stack(
        [xs[..., 0] * freqs[..., 0] - xs[..., 1] * freqs[..., 1], xs[..., 1] * freqs[..., 0] + xs[..., 0] * freqs[..., 1]], -1
    )
    return out.flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: BufferDecoderArgs):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = args.n_head, args.n_kv_head, args.head_dim
        self.wqkv = nn.Linear(args.dim, (args.n_head + 2 * args.n_kv_head) * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_head * args.head_dim, args.dim, bias=False)
        self.kv_cache: KVCache | None = None  # set by BufferDecoder.setup_caches

    def forward(self, x, cos, sin, mask, input_pos):
        B, T, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # [B, H_kv, T, D]
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # [B, H_kv, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # [B, H_kv, S, D]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # [B, H, T, D]
        return self.wo(y.transpose(1, 2).reshape(B, T, q_size))


class FeedForward(nn.Module):
    def __init__(self, args: BufferDecoderArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(args.dim, args.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, args: BufferDecoderArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, cos, sin, mask, input_pos):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class BufferDecoder(nn.Module):
    def __init__(self, args: BufferDecoderArgs = BufferDecoderArgs()):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layer))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        inv_freq = 1.0 / args.rope_base ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim)
        angles = torch.outer(torch.arange(args.max_seq_len).float(), inv_freq)  # [S_max, D/2]
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        causal = torch.tril(torch.ones(args.max_seq_len, args.max_seq_len, dtype=torch.bool))
        self.register_buffer("causal_mask", causal, persistent=False)  # [S_max, S_max]

    def setup_caches(self, max_batch_size: int, max_seq_length: int) -> None:
        if not 0 < max_seq_length <= self.args.max_seq_len:
            raise ValueError(
                f"max_seq_length={max_seq_length} is outside 1..{self.args.max_seq_len} (the RoPE table length); "
                "build the decoder with a larger BufferDecoderArgs.max_seq_len"
            )
        dtype = self.output.weight.dtype
        for block in self.layers:
            attn = block.attention
            attn.kv_cache = KVCache(max_batch_size, max_seq_length, attn.n_kv_head, attn.head_dim, dtype=dtype)
        # Sized to the cache, so the mask row for a query covers exactly the cache's S slots.
        causal = torch.tril(torch.ones(max_seq_length, max_seq_length, dtype=torch.bool))
        self.register_buffer("causal_mask", causal.to(self.output.weight.device), persistent=False)

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        # idx: [B, T] token ids; input_pos: [T] absolute positions of those tokens.
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]  # [T, D/2]
        mask = self.causal_mask[None, None, input_pos]  # [1, 1, T, S]
        if self.layers[0].attention.kv_cache is None:
            # No cache: keys are this call's tokens only, so keep only their columns.
            mask = mask[..., input_pos]  # [1, 1, T, T]
        x = self.tok_embeddings(idx)  # [B, T, dim]
        for block in self.layers:
            x = block(x, cos, sin, mask, input_pos)
        return self.output(self.norm(x))  # [B, T, V]
