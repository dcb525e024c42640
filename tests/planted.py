"""A decoder whose attention provably needs known chunks: needles planted far back in filler.

``planted_model()`` builds a one-layer HF Llama (hidden 64, 4 query heads over 2 KV heads of dim 16,
vocab 256, float32) with hand-set weights, and prompts for it. Two retrieval channels, ``a`` and ``b``:

- a *needle* token of channel x has a key with a large component (12) along key dimension ``KEY_DIM[x]``
  of every KV head, and a value that carries channel x's *payload*;
- a *question* token of channel x has a query with the same large component along ``KEY_DIM[x]`` and
  nothing else, so its attention logit on a needle of x is 12 * 12 / 4 = 36 while on any other token it
  is within about +-1: the question's attention mass is essentially all on x's needles;
- the output head turns the payload of x into the *answer* token of x (logit 22.6 against 11.3 for
  ``FALLBACK``); without a payload it emits ``FALLBACK`` (logit 16 against ~0 for anything else).

The answer token embeds like the question, so once the model answers it keeps asking: dense
decoding, and sparse decoding that keeps a needle chunk resident, emit ``answer`` at every step;
sparse decoding that has dropped every needle chunk emits ``FALLBACK``. Filler tokens have random
embeddings in their own subspace (dimensions 8..63), small random query/key/value weights, and keys
whose component along the key dimensions is small (std ~0.15), so a query-aware bound on a filler
chunk stays far below a needle chunk's, and a distractor chunk (needles of the other channel) scores
about 0 for the question. RoPE is switched off (``inv_freq`` = 0): a needle matches the question
wherever it sits, and q . k is exactly what the chunk key bounds bound.

Prompts (``context`` tokens, chunk-aligned, no padding; chunk ids at ``CHUNK`` tokens per chunk):

- sequence 0 asks channel ``a``: its needle chunks are ``(4, 12)``, its distractors (channel-b
  needles) ``(8, 20)``;
- sequence 1 asks channel ``b``: needles ``(7, 17)``, distractors (channel-a needles) ``(5, 13)``;
  so a selection that scored sequence 1 with sequence 0's query would keep ``(5, 13)`` instead.

Each sequence's last token is its question; everything else is filler. ``PLANTED_CONFIG`` holds 10
chunks of the 32+: sink, tail and window take 4, leaving 6 that only a selector can fill, far fewer
than the ~27 candidate chunks, and the needles sit far behind the tail.

Example::

    >>> planted = planted_model(batch=2)
    >>> converted = lsa_rewrite.convert(planted.model, planted_config())
    >>> out = converted.generate(planted.input_ids, max_new_tokens=40, do_sample=False)
    >>> (out[:, planted.input_ids.shape[1]:] == torch.tensor(planted.answers)[:, None]).all()
    tensor(True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from lsa_rewrite import LSAConfig

CHUNK = 16
VOCAB = 256
HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 64, 4, 2, 16

# token ids
NEEDLE = {"a": 3, "b": 4}
QUESTION = {"a": 5, "b": 6}
ANSWER = {"a": 7, "b": 8}
FALLBACK = 9
FIRST_FILLER = 16

# hidden dimensions
_NEEDLE_DIM = {"a": 0, "b": 1}
_QUESTION_DIM = {"a": 2, "b": 3}
_PAYLOAD_DIM = {"a": 4, "b": 5}
_FILLER_DIMS = slice(8, HIDDEN)
# head dimensions
KEY_DIM = {"a": 1, "b": 3}  # where a question's query meets its needles' keys
_VALUE_DIM = {"a": 4, "b": 5}  # where a needle's value carries its payload

_MATCH = 1.5  # query and key weight: after RMSNorm a flag dimension is 8, so q = k = 12 there
_NOISE_QK, _NOISE_K, _NOISE_V, _NOISE_O, _NOISE_OUT = 0.05, 0.02, 0.1, 0.05, 0.3

# (question channel, needle chunks, distractor chunks) per sequence
SEQUENCES = [("a", (4, 12), (8, 20)), ("b", (7, 17), (5, 13))]


@dataclass
class Planted:
    """A planted model and its prompts.

    Attributes:
        model: ``LlamaForCausalLM`` in eval mode, float32 (not converted).
        input_ids: ``[B, context]`` prompts, each ending with its question token.
        needle_chunks: per sequence, the chunks (of ``chunk_size`` tokens) the question attends to.
        distractor_chunks: per sequence, chunks of the other channel's needles.
        questions: per sequence, the channel asked (``"a"`` or ``"b"``).
        answers: per sequence, the token emitted while a needle chunk is attended.
        fallback: the token emitted when no needle is attended.
        chunk_size: tokens per chunk the chunk ids count in.
    """

    model: nn.Module
    input_ids: torch.Tensor
    needle_chunks: list[tuple[int, ...]]
    distractor_chunks: list[tuple[int, ...]]
    questions: list[str]
    answers: list[int]
    fallback: int = FALLBACK
    chunk_size: int = CHUNK


def planted_config(**overrides) -> LSAConfig:
    """10 resident chunks of 16 tokens, a selection every 16 steps: room for the needles, not the context."""
    fields = dict(budget=10 * CHUNK, chunk_size=CHUNK, interval=16, sink_tokens=16, recent_tokens=16)
    return LSAConfig(**(fields | overrides))


def _set_weights(model: nn.Module, generator: torch.Generator) -> None:
    def noise(*shape, std):
        return torch.randn(*shape, generator=generator) * std

    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        emb = model.model.embed_tokens.weight  # [V, hidden]
        emb[:, _FILLER_DIMS] = noise(VOCAB, HIDDEN - 8, std=1.0)
        for x in ("a", "b"):
            for token, dim in ((NEEDLE[x], _NEEDLE_DIM[x]), (QUESTION[x], _QUESTION_DIM[x]), (ANSWER[x], _QUESTION_DIM[x])):
                emb[token] = 0.0
                emb[token, dim] = 8.0  # what RMSNorm makes of a one-hot row of a 64-wide hidden state
        layer = model.model.layers[0]
        attn = layer.self_attn
        q, k, v, o = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight
        q_rows = torch.arange(HEADS * HEAD_DIM).view(HEADS, HEAD_DIM)
        kv_rows = torch.arange(KV_HEADS * HEAD_DIM).view(KV_HEADS, HEAD_DIM)
        planted_qk = sorted(KEY_DIM.values())
        planted_v = sorted(_VALUE_DIM.values())
        free_qk = [d for d in range(HEAD_DIM) if d not in planted_qk]
        free_v = [d for d in range(HEAD_DIM) if d not in planted_v]
        # filler queries, keys and values: small and random, off the planted query and value dims
        # (keys get a little of everything, so filler chunks have nonzero bounds along KEY_DIM)
        q[q_rows[:, free_qk].flatten(), _FILLER_DIMS] = noise(HEADS * len(free_qk), HIDDEN - 8, std=_NOISE_QK)
        k[:, _FILLER_DIMS] = noise(KV_HEADS * HEAD_DIM, HIDDEN - 8, std=_NOISE_K)
        v[kv_rows[:, free_v].flatten(), _FILLER_DIMS] = noise(KV_HEADS * len(free_v), HIDDEN - 8, std=_NOISE_V)
        for x in ("a", "b"):
            q[q_rows[:, KEY_DIM[x]], _QUESTION_DIM[x]] = _MATCH
            k[kv_rows[:, KEY_DIM[x]], _NEEDLE_DIM[x]] = _MATCH
            v[kv_rows[:, _VALUE_DIM[x]], _NEEDLE_DIM[x]] = 1.0
            o[_PAYLOAD_DIM[x], q_rows[:, _VALUE_DIM[x]]] = 1.0 / HEADS  # the heads' mean payload
        o[_FILLER_DIMS, q_rows[:, free_v].flatten()] = noise(HIDDEN - 8, HEADS * len(free_v), std=_NOISE_O)
        # the MLP stays zero; norms are identity
        for norm in (layer.input_layernorm, layer.post_attention_layernorm, model.model.norm):
            norm.weight.fill_(1.0)
        out = model.lm_head.weight  # [V, hidden]
        out[FIRST_FILLER:, _FILLER_DIMS] = noise(VOCAB - FIRST_FILLER, HIDDEN - 8, std=_NOISE_OUT)
        for x in ("a", "b"):
            out[ANSWER[x], _PAYLOAD_DIM[x]] = 4.0
            out[FALLBACK, _QUESTION_DIM[x]] = 2.0
        rotary = model.model.rotary_emb
        for name in ("inv_freq", "original_inv_freq"):
            if hasattr(rotary, name):
                getattr(rotary, name).zero_()


def planted_model(*, batch: int = 1, context: int = 512, seed: int = 0) -> Planted:
    """The planted model and ``batch`` (1 or 2) prompts of ``context`` tokens (a multiple of ``CHUNK``, >= 352).

    The weights depend only on ``seed``; so do the filler tokens.
    """
    if batch not in (1, 2):
        raise ValueError(f"planted_model has prompts for batch 1 or 2, got {batch}")
    if context % CHUNK or context < 22 * CHUNK:
        raise ValueError(f"context must be a multiple of {CHUNK} of at least {22 * CHUNK} tokens (the needles sit in chunks up to 20), got {context}")
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=1, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=4096, rms_norm_eps=1e-6,
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    generator = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(torch.float32).eval()
    _set_weights(model, generator)
    model.generation_config.eos_token_id = None  # the answer repeats; generation runs its full length

    sequences = SEQUENCES[:batch]
    ids = torch.randint(FIRST_FILLER, VOCAB, (batch, context), generator=generator)
    for row, (asked, needles, distractors) in enumerate(sequences):
        other = "b" if asked == "a" else "a"
        for chunk in needles:
            ids[row, chunk * CHUNK : (chunk + 1) * CHUNK] = NEEDLE[asked]
        for chunk in distractors:
            ids[row, chunk * CHUNK : (chunk + 1) * CHUNK] = NEEDLE[other]
        ids[row, -1] = QUESTION[asked]
    return Planted(
        model=model,
        input_ids=ids,
        needle_chunks=[needles for _, needles, _ in sequences],
        distractor_chunks=[distractors for _, _, distractors in sequences],
        questions=[asked for asked, _, _ in sequences],
        answers=[ANSWER[asked] for asked, _, _ in sequences],
    )
