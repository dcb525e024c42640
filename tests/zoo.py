"""The shared zoo of tiny random-weight decoders that the tests run lsa-rewrite against.

Every model is built from a config in code (no hub, no files), in float32, with weights fixed by a seed,
and is small enough that a forward pass on two CPU cores takes milliseconds. Each HF family is here for
the attention variant it brings: GQA (every family that supports it), sliding-window layers (mistral,
gemma3, with a window of 32 so it bites at ~100 tokens), fused qkv (phi3), q/k norms and a head_dim that
is not hidden/heads (qwen3), absolute positions and MHA (gpt2). "buffer" is a plain PyTorch decoder whose
KV cache is a pair of module buffers (see buffer_decoder.py).

Only long-standing config fields are set, so the same configs build under transformers 5.17 and 5.24.
The zoo says nothing about model quality: weights are random.

Beyond those, ``SWEEP_FAMILIES`` holds the other decoder families a user plausibly brings, each for what
its attention does differently (see ``_SWEEP``): logit softcapping, partial and interleaved rotary, fused
qkv, q/k norms, parallel blocks, MoE MLPs, score multipliers, layers without rotary, learned positions,
multi-query attention, local attention layers. They are built through ``AutoConfig.for_model``, so a
family the installed transformers lacks is reported, not an import error. ``HF_FAMILIES`` (what every
parametrised zoo test runs) takes a representative few of them (``DEFAULT_SWEEP``); ``LSA_ZOO=all`` in the
environment runs the zoo tests over every family, and ``benchmarks/supported_models.py`` sweeps them all.
``REFUSED`` lists families ``convert()`` refuses, with the configs that show why; ``DYNAMIC_CAPTURE_ONLY``
those that convert only with ``LSAConfig(capture_cache="dynamic")``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn
from transformers import (
    AutoConfig,
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


def _auto(model_type: str, **fields) -> Callable[[], PretrainedConfig]:
    return lambda: AutoConfig.for_model(model_type, **fields)


def _decoder(**over) -> dict:
    return {**_DECODER, **over}


# GPT-style configs name their fields differently; dropout off (the zoo models run in eval mode anyway).
_GPT = dict(vocab_size=VOCAB_SIZE, initializer_range=INIT_STD, **_SPECIAL_TOKENS)
_NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
_THREE_LAYERS = ["sliding_attention", "full_attention", "sliding_attention"]

# The other families, each with the attention variant it brings (model_type: config builder).
_SWEEP: dict[str, Callable[[], PretrainedConfig]] = {
    # attention logit softcapping (tanh) with sliding layers; HF has no SDPA path for it (eager only)
    "gemma2": _auto("gemma2", **_decoder(num_hidden_layers=3), head_dim=16, query_pre_attn_scalar=16,
                    sliding_window=SLIDING_WINDOW, attn_logit_softcapping=5.0, final_logit_softcapping=30.0),
    "gemma": _auto("gemma", **_DECODER, head_dim=16),  # scaled embeddings, (1 + w) RMSNorm
    "olmo": _auto("olmo", **_DECODER, clip_qkv=0.5),  # parameter-free layernorm, clamped q/k/v
    "olmo2": _auto("olmo2", **_DECODER),  # q/k RMSNorm over the whole projection
    "olmo3": _auto("olmo3", **_decoder(num_hidden_layers=3), sliding_window=SLIDING_WINDOW, layer_types=_THREE_LAYERS),
    "cohere": _auto("cohere", **_DECODER, use_qk_norm=True),  # parallel block, interleaved rotary, q/k layernorm
    "cohere2": _auto("cohere2", **_decoder(num_hidden_layers=3), head_dim=16, sliding_window=SLIDING_WINDOW,
                     layer_types=_THREE_LAYERS),  # full-attention layers without rotary
    "stablelm": _auto("stablelm", **_DECODER, partial_rotary_factor=0.25, qk_layernorm=True, use_parallel_residual=True),
    "gpt_neox": _auto("gpt_neox", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=MAX_POSITIONS, rotary_pct=0.25, **_GPT),  # fused qkv, partial rotary
    # new decoder architecture (GQA, fused qkv); eager scales scores in place (scores /= sqrt(d))
    "falcon": _auto("falcon", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
                    new_decoder_architecture=True, alibi=False, max_position_embeddings=MAX_POSITIONS, **_GPT),
    # falcon-7b style: multi-query attention, parallel attention and MLP
    "falcon_mqa": _auto("falcon", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
                        parallel_attn=True, new_decoder_architecture=False, alibi=False,
                        max_position_embeddings=MAX_POSITIONS, **_GPT),
    "mixtral": _auto("mixtral", **_DECODER, head_dim=16, num_local_experts=4, num_experts_per_tok=2),  # MoE MLP
    "qwen2_moe": _auto("qwen2_moe", **_DECODER, moe_intermediate_size=64, shared_expert_intermediate_size=64,
                       num_experts=4, num_experts_per_tok=2),
    "qwen3_moe": _auto("qwen3_moe", **_DECODER, head_dim=16, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2),
    "olmoe": _auto("olmoe", **_DECODER, num_experts=4, num_experts_per_tok=2),
    "granitemoe": _auto("granitemoe", **_DECODER, num_local_experts=4, num_experts_per_tok=2),
    "phimoe": _auto("phimoe", **_DECODER, num_local_experts=4, num_experts_per_tok=2),
    "starcoder2": _auto("starcoder2", **_DECODER, sliding_window=None),  # biases, layernorm
    # attention_multiplier (the score scale), embedding/residual multipliers, logits scaling
    "granite": _auto("granite", **_DECODER, attention_multiplier=0.5, embedding_multiplier=2.0,
                     residual_multiplier=0.5, logits_scaling=2.0),
    "glm": _auto("glm", **_DECODER, head_dim=16),  # partial interleaved rotary, fused gate/up
    "glm4": _auto("glm4", **_DECODER, head_dim=16),  # and post-attention/-MLP norms
    "phi": _auto("phi", **_DECODER, partial_rotary_factor=0.5, qk_layernorm=True, resid_pdrop=0.0, embd_pdrop=0.0),
    "persimmon": _auto("persimmon", **_decoder(num_key_value_heads=4), partial_rotary_factor=0.5),
    "nemotron": _auto("nemotron", **_DECODER, head_dim=16, partial_rotary_factor=0.5),  # layernorm1p, relu^2
    "smollm3": _auto("smollm3", **_DECODER, no_rope_layer_interval=2),  # every second layer without rotary
    "exaone4": _auto("exaone4", **_decoder(num_hidden_layers=3), head_dim=16, sliding_window=SLIDING_WINDOW,
                     layer_types=_THREE_LAYERS),  # q/k norms, post-norm blocks
    "helium": _auto("helium", **_DECODER, head_dim=16),
    "ernie4_5": _auto("ernie4_5", **_DECODER, head_dim=16),
    "seed_oss": _auto("seed_oss", **_DECODER, head_dim=16),
    "arcee": _auto("arcee", **_DECODER, head_dim=16),  # relu^2 MLP without gate
    "apertus": _auto("apertus", **_DECODER, head_dim=16),  # xIELU, q/k norms
    "hunyuan_v1_dense": _auto("hunyuan_v1_dense", **_DECODER, head_dim=16),  # q/k norms after rotary
    "internlm3": _auto("internlm3", **_DECODER, head_dim=16),
    "bitnet": _auto("bitnet", **_DECODER, head_dim=16),  # ternary weights, sub-norms
    "ministral": _auto("ministral", **_DECODER, head_dim=16, sliding_window=SLIDING_WINDOW),
    # learned absolute positions (offset 2)
    "opt": _auto("opt", vocab_size=VOCAB_SIZE, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                 word_embed_proj_dim=64, max_position_embeddings=MAX_POSITIONS, init_std=INIT_STD, dropout=0.0,
                 **_SPECIAL_TOKENS),
    # partial interleaved rotary (rotate every two), parallel block
    "gptj": _auto("gptj", n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=MAX_POSITIONS, **_NO_DROPOUT, **_GPT),
    "codegen": _auto("codegen", n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=MAX_POSITIONS, n_ctx=MAX_POSITIONS,
                     **_NO_DROPOUT, **_GPT),  # fused qkv split in model-parallel groups
    "gpt_bigcode": _auto("gpt_bigcode", n_embd=64, n_layer=2, n_head=4, n_positions=MAX_POSITIONS, multi_query=True,
                         **_NO_DROPOUT, **_GPT),  # multi-query attention, learned positions
    # local-attention layers declared by attention_layers/window_size, a torch.where mask, unscaled scores (eager only)
    "gpt_neo": _auto("gpt_neo", hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
                     window_size=SLIDING_WINDOW, max_position_embeddings=MAX_POSITIONS, resid_dropout=0.0,
                     embed_dropout=0.0, attention_dropout=0.0, **_GPT),
}

# Families convert() refuses, with a config that shows it and the words the error must contain.
REFUSED: dict[str, tuple[Callable[[], PretrainedConfig], str]] = {
    "bloom": (_auto("bloom", hidden_size=64, n_layer=2, n_head=4, **_GPT), "takes no `position_ids`"),
    "mpt": (_auto("mpt", d_model=64, n_layers=2, n_heads=4, max_seq_len=MAX_POSITIONS, **_GPT), "takes no `position_ids`"),
    "falcon_alibi": (
        _auto("falcon", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=True, bias=True,
              new_decoder_architecture=False, multi_query=False, parallel_attn=False, max_position_embeddings=MAX_POSITIONS, **_GPT),
        "ALiBi position biases",
    ),
    "deepseek_v3": (
        _auto("deepseek_v3", **_decoder(num_key_value_heads=4), n_routed_experts=4, num_experts_per_tok=2, n_group=1,
              topk_group=1, moe_intermediate_size=64, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48,
              qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16),
        "multi-head latent attention",
    ),
    "deepseek_v2": (
        _auto("deepseek_v2", **_decoder(num_key_value_heads=4), n_routed_experts=4, num_experts_per_tok=2, n_group=1,
              topk_group=1, moe_intermediate_size=64, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48,
              qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16),
        "multi-head latent attention",
    ),
    "minicpm3": (
        _auto("minicpm3", **_decoder(num_key_value_heads=4), kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8,
              qk_nope_head_dim=16, v_head_dim=16),
        "multi-head latent attention",
    ),
    "diffllama": (_auto("diffllama", **_DECODER, head_dim=16), "differential attention"),
    "gpt_oss": (
        _auto("gpt_oss", **_DECODER, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=SLIDING_WINDOW),
        "attention sinks",
    ),
    "llama4": (
        _auto("llama4_text", **_decoder(num_hidden_layers=4), head_dim=16, intermediate_size_mlp=128, num_local_experts=2,
              num_experts_per_tok=1, attention_chunk_size=SLIDING_WINDOW, interleave_moe_layer_step=2),
        "chunked attention",
    ),
    "gemma3n": (
        _auto("gemma3n_text", **_decoder(num_hidden_layers=4), head_dim=16, sliding_window=SLIDING_WINDOW,
              num_kv_shared_layers=2, layer_types=["sliding_attention", "full_attention"] * 2, laurel_rank=8,
              hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB_SIZE, altup_num_inputs=2,
              activation_sparsity_pattern=[0.0] * 4),
        "cross-layer KV sharing",
    ),
    "qwen3_next": (
        _auto("qwen3_next", **_decoder(num_hidden_layers=4), head_dim=16, num_experts=4, num_experts_per_tok=2,
              moe_intermediate_size=64, shared_expert_intermediate_size=64, linear_num_key_heads=2,
              linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16),
        "'linear_attention' layers",
    ),
    "jamba": (
        _auto("jamba", **_DECODER, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
              num_experts=2, use_mamba_kernels=False, mamba_d_state=8, mamba_dt_rank=8),
        "'linear_attention' layers",
    ),
    "falcon_h1": (
        _auto("falcon_h1", **_DECODER, head_dim=16, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1,
              mamba_d_state=16),
        "'hybrid' layers",
    ),
    "lfm2": (_auto("lfm2", **_DECODER, layer_types=["conv", "full_attention"]), "'conv' layers"),
}

# Families that trace only over a DynamicCache: convert(model, LSAConfig(capture_cache="dynamic")). BioGPT reads
# its positions back from the attention mask, a data-dependent length over a StaticCache.
DYNAMIC_CAPTURE_ONLY: dict[str, Callable[[], PretrainedConfig]] = {
    "biogpt": _auto("biogpt", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=MAX_POSITIONS, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **_GPT),
}

HF_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "mistral": _mistral,
    "gemma3": _gemma3,
    "phi3": _phi3,
    "gpt2": _gpt2,
    **_SWEEP,
}
SWEEP_FAMILIES: list[str] = list(_SWEEP)
# The sweep's families in the default test run, each under the one attention implementation that shows what
# it brings: attention logit softcapping with sliding layers (gemma2), scores scaled in place (falcon's
# `scores /= sqrt(d)`), local layers declared by attention_layers/window_size with a torch.where mask and
# unscaled scores (gpt_neo). The rest run in benchmarks/supported_models.py, or here with LSA_ZOO=all.
DEFAULT_SWEEP: dict[str, str] = {"gemma2": "eager", "falcon": "eager", "gpt_neo": "eager"}
ORIGINAL_FAMILIES: list[str] = ["llama", "qwen2", "qwen3", "mistral", "gemma3", "phi3", "gpt2"]
ALL_FAMILIES: list[str] = [*ORIGINAL_FAMILIES, *SWEEP_FAMILIES]
ZOO_ALL: bool = os.environ.get("LSA_ZOO") == "all"
HF_FAMILIES: list[str] = ALL_FAMILIES if ZOO_ALL else [*ORIGINAL_FAMILIES, *DEFAULT_SWEEP]
SLIDING_FAMILIES: list[str] = ["mistral", "gemma3"] + [f for f in ("gemma2",) if f in HF_FAMILIES]
ATTN_IMPLEMENTATIONS: list[str] = ["sdpa", "eager"]


def make_config(name: str) -> PretrainedConfig:
    """The HF config of zoo model `name`, e.g. `make_config("mistral").sliding_window == 32`."""
    if name not in HF_CONFIGS:
        raise ValueError(f"no HF config for zoo model {name!r}; HF families are {ALL_FAMILIES}")
    return HF_CONFIGS[name]()


def attn_implementations(name: str) -> list[str]:
    """The attention implementations HF offers for zoo family ``name``: ``["sdpa", "eager"]``, or ``["eager"]``
    for families without an SDPA path (gemma2, gpt_neo)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(make_config(name))]
    return [a for a in ATTN_IMPLEMENTATIONS if a != "sdpa" or getattr(model_class, "_supports_sdpa", False)]


def attns_in_tests(name: str) -> list[str]:
    """The attention implementations the parametrised zoo tests run family ``name`` under: all HF offers
    (``attn_implementations``), except for the sweep's families in the default run (``DEFAULT_SWEEP``)."""
    if name in DEFAULT_SWEEP and not ZOO_ALL:
        return [DEFAULT_SWEEP[name]]
    return attn_implementations(name)


def _make_hf(name: str, *, attn_implementation: str = "sdpa", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(name), attn_implementation=attn_implementation)
    return model.to(torch.float32).eval()


def make_refused(name: str, *, attn_implementation: str = "eager", seed: int = 0) -> nn.Module:
    """A tiny model of a family ``convert()`` refuses (``REFUSED``) or converts only with a DynamicCache capture
    (``DYNAMIC_CAPTURE_ONLY``), built like the zoo's."""
    torch.manual_seed(seed)
    build = REFUSED[name][0] if name in REFUSED else DYNAMIC_CAPTURE_ONLY[name]
    model = AutoModelForCausalLM.from_config(build(), attn_implementation=attn_implementation)
    return model.to(torch.float32).eval()


def _make_buffer(*, attn_implementation: str | None = None, seed: int = 0) -> nn.Module:
    if attn_implementation not in (None, "sdpa"):
        raise ValueError(
            f"the buffer decoder always uses SDPA, got attn_implementation={attn_implementation!r}; "
            "parametrize over HF_FAMILIES to vary the attention implementation"
        )
    torch.manual_seed(seed)
    return BufferDecoder(BufferDecoderArgs(vocab_size=VOCAB_SIZE, max_seq_len=MAX_POSITIONS)).eval()


def _hf_builder(name: str) -> Callable[..., nn.Module]:
    def build(*, attn_implementation: str | None = None, seed: int = 0) -> nn.Module:
        attn = attn_implementation or attn_implementations(name)[0]
        return _make_hf(name, attn_implementation=attn, seed=seed)

    return build


ZOO: dict[str, Callable[..., nn.Module]] = {name: _hf_builder(name) for name in ALL_FAMILIES}
ZOO["buffer"] = _make_buffer
ZOO_NAMES: list[str] = list(ZOO)


def make_model(name: str, *, attn_implementation: str | None = None, seed: int = 0) -> nn.Module:
    """Build zoo model `name` in eval mode with seeded random float32 weights.

    Example: `make_model("gemma3", attn_implementation="eager")`. The same name and seed give the same
    weights. Without `attn_implementation`, SDPA where HF has it for the family, else eager. The buffer decoder has no caches until `model.setup_caches(batch, max_seq_length)`.
    """
    if name not in ZOO:
        raise ValueError(f"unknown zoo model {name!r}; choose one of {ZOO_NAMES}")
    return ZOO[name](attn_implementation=attn_implementation, seed=seed)


def make_input_ids(*, batch: int = 2, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    """Random token ids [batch, seq_len] that avoid the special ids 0-2, so generation never sees a pad or EOS prompt."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB_SIZE, (batch, seq_len), generator=generator)
