"""lsa-rewrite as a torch.compile backend: ``model.forward = torch.compile(model.forward, backend="lsa")``.

Runs on the CPU in seconds, offline: a small random-weight Llama built from a config (no download).

    python examples/compile_backend.py            # 1,500-token prompt, 64 new tokens
    python examples/compile_backend.py --short    # 600-token prompt, 24 new tokens

The first call after torch.compile (generate()'s prefill) runs the model's own code; the backend has
converted the model by then, and its first decode call adopts the prefill's cache into the LSA store.
With a budget that covers the context the tokens are the dense model's; with a small budget only
that share of the KV stays resident.
"""

from __future__ import annotations

import argparse
import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lsa_rewrite
from lsa_rewrite import LSAConfig


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, initializer_range=0.2,
        pad_token_id=0, bos_token_id=1, eos_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def generate(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=new_tokens, do_sample=False)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="a short prompt (the smoke test)")
    parser.add_argument("--budget", type=float, default=0.25, help="resident KV as a fraction of the context")
    args = parser.parse_args(argv)
    prompt, new_tokens = (600, 24) if args.short else (1500, 64)

    dense = tiny_llama()
    ids = torch.randint(3, 256, (1, prompt), generator=torch.Generator().manual_seed(0))
    reference = generate(dense, ids, new_tokens)

    # A budget that covers the whole context: the dense model's tokens.
    covering = copy.deepcopy(dense)
    covering.forward = torch.compile(covering.forward, backend=lsa_rewrite.backend(LSAConfig(budget=1.0, chunk_size=16, interval=16)))
    same = torch.equal(generate(covering, ids, new_tokens), reference)

    # A quarter of the KV resident; torch.compile(model, backend="lsa") is the default LSAConfig().
    sparse = copy.deepcopy(dense)
    config = LSAConfig(budget=args.budget, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=16)
    sparse.forward = torch.compile(sparse.forward, backend=lsa_rewrite.backend(config))
    generate(sparse, ids, new_tokens)
    fp = lsa_rewrite.footprint(sparse)
    print(f"budget 1.0: same tokens as dense: {same}")
    print(
        f"budget {args.budget}: resident KV {fp['resident_kv_bytes']} of {fp['dense_kv_bytes']} dense bytes (ratio {fp['ratio']:.3f}), "
        f"{fp['selections']} selections"
    )
    return {"same_tokens": same, "ratio": fp["ratio"], "selections": fp["selections"]}


if __name__ == "__main__":
    main()
