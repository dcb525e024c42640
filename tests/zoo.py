"""The shared zoo of tiny random-weight decoders that the tests run lsa-rewrite against.

Every model is built from a config in code (no hub, no files), in float32, with weights fixed by a seed,
and is small enough that a forward pass on two CPU cores takes milliseconds. Each HF family is here for
the attention variant it brings: GQA (every family that supports it), sliding-window layers (mistral,
gemma3, with a window of 32 so it bites at ~100 tokens), fused qkv (phi3), q/k norms and a head_dim that
is not hidden/heads (qwen3), absolute positions and MHA (gpt2). "buffer" is a plain PyTorch decoder whose
KV cache is a pair of module buffers (see buffer_decoder.py).

Only long-standing config fields are set, so the same configs build under transformers 5.17 and 5.24.
The zoo says nothing about model quality: weights are random.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from buffer_decoder import BufferDecoder, BufferDecoderArgs

VOCAB_SIZE = 256
MAX_POSITIONS = 2048
SLIDING_WINDOW = 32
# HF's default 0.02 leaves random-weight attention almost uniform (max prob ~0.01 over 100 keys) and top-2
# logit gaps ~1e-4; 0.2 makes attention concentrate on a few keys, as in trained models, so sparse vs
# dense comparisons mean something and greedy argmax is less fragile to float reordering.
INIT_STD = 0.2

# Token ids inside the tiny vocab; families whose defaults point past VOCAB_SIZE (phi3: 32000, gpt2: 50256)
# would otherwise index out of the embedding table.
_SPECIAL_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

# Llama-like shape: 4 query heads sharing 2 KV heads of dim 16.
_DECODER = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=MAX_POSITIONS,
    initializer_range=INIT_STD,
    **_SPECIAL_TOKENS,
)


def _llama() -> PretrainedConfig:
    return LlamaConfig(**_DECODER, head_dim=16)


def _qwen2() -> PretrainedConfig:
    # Qwen2 adds biases on q/k/v; its optional sliding window stays off, as in the released checkpoints.
    return Qwen2Config(**_DECODER)


def _qwen3() -> PretrainedConfig:
    # head_dim 32 with hidden 64 and 4 heads: q_proj widens to 128, so head_dim != hidden / heads.
    return Qwen3Config(**_DECODER, head_dim=32)


def _mistral() -> PretrainedConfig:
    return MistralConfig(**{**_DECODER, "num_hidden_layers": 3}, head_dim=16, sliding_window=SLIDING_WINDOW)


def _gemma3() -> PretrainedConfig:
    return Gemma3TextConfig(
        **{**_DECODER, "num_hidden_layers": 3},
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )


def _phi3() -> PretrainedConfig:
    return Phi3Config(**_DECODER, original_max_position_embeddings=MAX_POSITIONS, resid_pdrop=0.0, embd_pdrop=0.0)


def _gpt2() -> PretrainedConfig:
    return GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=MAX_POSITIONS,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_inner=128,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        initializer_range=INIT_STD,
        **_SPECIAL_TOKENS,
    )


HF_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "mistral": _mistral,
    "gemma3": _gemma3,
    "phi3": _phi3,
    "gpt2": _gpt2,
}
HF_FAMILIES: list[str] = list(HF_CONFIGS)
SLIDING_FAMILIES: list[str] = ["mistral", "gemma3"]
ATTN_IMPLEMENTATIONS: list[str] = ["sdpa", "eager"]


def make_config(name: str) -> PretrainedConfig:
    """The HF config of zoo model `name`, e.g. `make_config("mistral").sliding_window == 32`."""
    if name not in HF_CONFIGS:
        raise ValueError(f"no HF config for zoo model {name!r}; HF families are {HF_FAMILIES}")
    return HF_CONFIGS[name]()


def _make_hf(name: str, *, attn_implementation: str = "sdpa", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(name), attn_implementation=attn_implementation)
    return model.to(torch.float32).eval()


def _make_buffer(*, attn_implementation: str = "sdpa", seed: int = 0) -> nn.Module:
    if attn_implementation != "sdpa":
        raise ValueError(
            f"the buffer decoder always uses SDPA, got attn_implementation={attn_implementation!r}; "
            "parametrize over HF_FAMILIES to vary the attention implementation"
        )
    torch.manual_seed(seed)
    return BufferDecoder(BufferDecoderArgs(vocab_size=VOCAB_SIZE, max_seq_len=MAX_POSITIONS)).eval()


def _hf_builder(name: str) -> Callable[..., nn.Module]:
    def build(*, attn_implementation: str = "sdpa", seed: int = 0) -> nn.Module:
        return _make_hf(name, attn_implementation=attn_implementation, seed=seed)

    return build


ZOO: dict[str, Callable[..., nn.Module]] = {name: _hf_builder(name) for name in HF_FAMILIES}
ZOO["buffer"] = _make_buffer
ZOO_NAMES: list[str] = list(ZOO)


def make_model(name: str, *, attn_implementation: str = "sdpa", seed: int = 0) -> nn.Module:
    """Build zoo model `name` in eval mode with seeded random float32 weights.

    Example: `make_model("gemma3", attn_implementation="eager")`. The same name and seed give the same
    weights. The buffer decoder has no caches until `model.setup_caches(batch, max_seq_length)`.
    """
    if name not in ZOO:
        raise ValueError(f"unknown zoo model {name!r}; choose one of {ZOO_NAMES}")
    return ZOO[name](attn_implementation=attn_implementation, seed=seed)


def make_input_ids(*, batch: int = 2, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    """Random token ids [batch, seq_len] that avoid the special ids 0-2, so generation never sees a pad or EOS prompt."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB_SIZE, (batch, seq_len), generator=generator)
