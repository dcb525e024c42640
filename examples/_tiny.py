"""Shared by the examples: a small random-weight Llama built from a config (no download), or a real
checkpoint (HF directory or ``.gguf``) when ``--model`` is given."""

from __future__ import annotations

import torch


def load(model_path: str | None, *, layers: int = 4, max_positions: int = 8192):
    """``(model, tokenizer or None)``: the checkpoint at ``model_path``, else a seeded tiny Llama."""
    if model_path:
        from lsa_rewrite.loading import load_model

        model, tokenizer = load_model(model_path)
        return model.eval(), tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_positions, attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None  # random weights: run every requested step
    model.generation_config.pad_token_id = 0
    return model, None


def random_prompt(length: int, *, vocab: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(seed))
