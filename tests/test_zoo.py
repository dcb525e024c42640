"""Sanity checks of the model zoo itself: cached greedy decoding equals a no-cache recompute.

Every later equality test (converted model vs dense model) leans on these models, so when a zoo config
stops building or decoding correctly under a new transformers release, it fails here first, with the
family's name in the test id.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from zoo import (
    HF_FAMILIES,
    SLIDING_FAMILIES,
    SLIDING_WINDOW,
    ZOO_NAMES,
    attn_implementations,
    attns_in_tests,
    make_config,
    make_input_ids,
    make_model,
)

PROMPT_LEN = 40  # longer than SLIDING_WINDOW, so the sliding families decode past their window
NEW_TOKENS = 8


def greedy_without_cache(model, ids: torch.Tensor, *, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding by re-running the whole sequence each step: the reference for cached decoding."""
    step_logits = []
    for _ in range(steps):
        logits = model(ids, use_cache=False).logits[:, -1]  # [B, V]
        step_logits.append(logits)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=-1)
    return ids, torch.stack(step_logits, dim=1)  # [B, T + steps], [B, steps, V]


_CASES = [(n, a) for n in HF_FAMILIES for a in attns_in_tests(n)]


@pytest.mark.parametrize(("name", "attn_implementation"), _CASES, ids=[f"{n}-{a}" for n, a in _CASES])
@torch.no_grad()
def test_hf_generate_matches_loop_without_cache(name, attn_implementation):
    model = make_model(name, attn_implementation=attn_implementation)
    # Random weights emit EOS now and then; generate() would stop there while the reference loop goes on.
    model.generation_config.eos_token_id = None
    ids = make_input_ids(batch=2, seq_len=PROMPT_LEN)

    out = model.generate(
        ids, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    expected_ids, expected_logits = greedy_without_cache(model, ids, steps=NEW_TOKENS)

    assert torch.equal(out.sequences, expected_ids)
    torch.testing.assert_close(torch.stack(out.logits, dim=1), expected_logits, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_buffer_decoder_cached_decode_matches_full_sequence():
    model = make_model("buffer")
    batch = 2
    ids = make_input_ids(batch=batch, seq_len=PROMPT_LEN)
    model.setup_caches(max_batch_size=batch, max_seq_length=128)

    logits = model(ids, torch.arange(PROMPT_LEN))[:, -1]  # prefill -> [B, V]
    step_logits, tokens = [logits], [logits.argmax(-1)]
    for pos in range(PROMPT_LEN, PROMPT_LEN + NEW_TOKENS):
        logits = model(tokens[-1][:, None], torch.tensor([pos]))[:, -1]
        step_logits.append(logits)
        tokens.append(logits.argmax(-1))
    generated = torch.stack(tokens, dim=1)  # [B, 1 + NEW_TOKENS]

    # The same weights without caches, over prompt + generated tokens in one pass.
    reference = make_model("buffer")
    full = torch.cat([ids, generated[:, :-1]], dim=1)
    full_logits = reference(full, torch.arange(full.shape[1]))[:, PROMPT_LEN - 1 :]  # [B, 1 + NEW_TOKENS, V]

    assert torch.equal(full_logits.argmax(-1), generated)
    torch.testing.assert_close(torch.stack(step_logits, dim=1), full_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_same_seed_gives_same_weights(name):
    first, second = make_model(name).state_dict(), make_model(name).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


@pytest.mark.parametrize("name", SLIDING_FAMILIES)
@torch.no_grad()
def test_sliding_window_changes_logits_past_the_window(name):
    # Guards the zoo's purpose for these families: if a config field were silently ignored, sliding
    # layers would attend to everything and tests meant for sliding windows would test nothing.
    ids = make_input_ids(batch=1, seq_len=3 * SLIDING_WINDOW)
    attn = attn_implementations(name)[0]
    windowed = make_model(name, attn_implementation=attn)(ids).logits
    config = make_config(name)
    config.sliding_window = 4 * SLIDING_WINDOW
    torch.manual_seed(0)  # make_model's seed, so the weights match
    unwindowed = AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()(ids).logits

    torch.testing.assert_close(windowed[:, :SLIDING_WINDOW], unwindowed[:, :SLIDING_WINDOW])
    assert (windowed[:, -1] - unwindowed[:, -1]).abs().max() > 1e-3
