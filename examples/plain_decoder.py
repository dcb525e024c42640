"""Convert a plain PyTorch decoder (no transformers) whose KV cache lives in module buffers.

The decoder below is written the gpt-fast way: ``model(idx [B, T], input_pos [T]) -> logits``, each
layer's cache a pair of fixed-size buffers written by index assignment, SDPA over the whole cache with
a causal mask row. ``lsa_rewrite.convert`` finds the attention and the cache writes in its traced decode
step by graph shape alone (no config, no class names) and rewrites them; the model's own loop then runs
unchanged: prefill at ``input_pos = arange(T)``, then one token at a time.

    python examples/plain_decoder.py            # 1,500-token prompt, 64 decode steps, dense vs LSA
    python examples/plain_decoder.py --short
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn

import lsa_rewrite
from lsa_rewrite import LSAConfig


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.wqkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def setup_cache(self, batch: int, length: int) -> None:
        shape = (batch, self.kv_heads, length, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape))
        self.register_buffer("v_cache", torch.zeros(shape))

    def forward(self, x, cos, sin, mask, input_pos):
        b, t, _ = x.shape
        d = self.head_dim
        q, k, v = self.wqkv(x).split([self.heads * d, self.kv_heads * d, self.kv_heads * d], dim=-1)
        q, k, v = (z.view(b, t, -1, d).transpose(1, 2) for z in (q, k, v))
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        self.k_cache[:, :, input_pos] = k  # the KV-cache writes the passes look for
        self.v_cache[:, :, input_pos] = v
        y = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


def rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Decoder(nn.Module):
    def __init__(self, vocab: int = 512, dim: int = 128, layers: int = 4, heads: int = 4, kv_heads: int = 2, max_len: int = 4096):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = nn.ModuleList(Attention(dim, heads, kv_heads) for _ in range(layers))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim)) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        half = dim // heads // 2
        angles = torch.outer(torch.arange(max_len).float(), 1.0 / 10000 ** (torch.arange(half).float() / half))
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        self.max_len = max_len

    def setup_caches(self, batch: int, length: int) -> None:
        for a in self.attn:
            a.setup_cache(batch, length)
        self.register_buffer("mask", torch.ones(length, length, dtype=torch.bool).tril(), persistent=False)

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        cos, sin, mask = self.cos[input_pos], self.sin[input_pos], self.mask[None, None, input_pos]
        x = self.embed(idx)
        for attn, mlp in zip(self.attn, self.mlp):
            x = x + attn(self.norm(x), cos, sin, mask, input_pos)
            x = x + mlp(self.norm(x))
        return self.out(self.norm(x))


@torch.no_grad()
def greedy(model, prompt: torch.Tensor, steps: int) -> list[int]:
    """The model's own loop: prefill, then one token per call."""
    logits = model(prompt, torch.arange(prompt.shape[1]))
    tokens = [int(logits[0, -1].argmax())]
    for pos in range(prompt.shape[1], prompt.shape[1] + steps - 1):
        logits = model(torch.tensor([[tokens[-1]]]), torch.tensor([pos]))
        tokens.append(int(logits[0, -1].argmax()))
    return tokens


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--budget", type=int, default=256, help="resident tokens per sequence and layer")
    parser.add_argument("--short", action="store_true", help="600 tokens, 16 steps")
    args = parser.parse_args(argv)
    if args.short:
        args.tokens, args.steps = 600, 16
    torch.manual_seed(0)
    model = Decoder().eval()
    model.setup_caches(batch=1, length=args.tokens + args.steps)
    prompt = torch.randint(0, 512, (1, args.tokens), generator=torch.Generator().manual_seed(1))

    dense = greedy(model, prompt, args.steps)
    covering = lsa_rewrite.convert(copy.deepcopy(model), LSAConfig(budget=1.0, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=32))
    sparse = lsa_rewrite.convert(
        copy.deepcopy(model), LSAConfig(budget=args.budget, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=32)
    )
    print("attention sites:", [(row["layer"], row["action"]) for row in sparse.lsa.report()])
    same = greedy(covering, prompt, args.steps)
    ours = greedy(sparse, prompt, args.steps)
    fp = lsa_rewrite.footprint(sparse)
    print(f"covering budget equals dense: {same == dense}")
    print(f"budget {args.budget} tokens: {sum(a == b for a, b in zip(ours, dense))}/{args.steps} tokens equal to dense, "
          f"device KV {fp['ratio']:.1%} of dense, {fp['selections']} selections")
    return {"covering_equal": same == dense, "footprint": fp}


if __name__ == "__main__":
    main()
