"""Runtime misuse of a converted model is refused, and leaves the model as it was.

Each test decodes part of a sparse generation (selections running, a selection due at the very call
that is misused), makes one wrong call, and checks that it raises an error that names the problem,
that the generation that was running continues exactly as it would have without the wrong call, that
the model's current store is still that generation's, and that a normal ``generate()`` afterwards
gives the same output as before.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import no_eos
from selection_trace import cache_kw, hf_decode, hf_step
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList
from zoo import make_model

import lsa_rewrite
from lsa_rewrite import LSAConfig

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT, STEPS = 200, 40
AT = 18  # tokens decoded before the misuse; the misused call is the one a scheduled selection runs in
CONFIG = LSAConfig(budget=96, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=16, max_context=512)


class HFRun:
    """A converted llama, a prompt, and what it decodes when nothing goes wrong."""

    def __init__(self):
        self.dense = no_eos(make_model("llama"))
        self.model = no_eos(lsa_rewrite.convert(copy.deepcopy(self.dense), CONFIG))
        self.ids = torch.randint(3, 250, (1, PROMPT), generator=torch.Generator().manual_seed(0))
        self.tokens, _, _ = hf_decode(self.model, self.ids, STEPS)
        self.generated = self.generate()
        assert self.model.lsa.store.selections >= 3

    def generate(self, ids=None, **kwargs):
        ids = self.ids if ids is None else ids
        return self.model.generate(ids, max_new_tokens=STEPS, do_sample=False, **kwargs)

    def check_untouched(self, misuse, *, error=ValueError, match: str) -> None:
        """Decode AT tokens, ``misuse(last_tokens, cache)`` must raise; then everything goes on as before."""
        tokens, _, cache = hf_decode(self.model, self.ids, AT)
        store = self.model.lsa.store
        with pytest.raises(error, match=match):
            misuse(tokens[:, -1:], cache)
        assert self.model.lsa.store is store, "the refused call replaced the model's current store"
        out = [tokens]
        for _ in range(STEPS - AT):
            out.append(hf_step(self.model, cache, out[-1][:, -1:]))
        assert torch.equal(torch.cat(out, 1), self.tokens), "the running generation changed after the refused call"
        assert torch.equal(self.generate(), self.generated), "generate() gives another output after the refused call"

    def decode_kwargs(self, cache) -> dict:
        return {cache_kw(self.model): cache}


@pytest.fixture(scope="module")
def hf(one_thread):
    return HFRun()


# -- HF ----------------------------------------------------------------------------------------


def test_hf_later_turn_with_a_mask_of_the_new_tokens_only(hf):
    """Several tokens on a held cache continue the conversation (tests/test_multiturn.py); a mask that
    covers only the new tokens, not the history, is refused before anything changes."""

    def misuse(last, cache):
        hf.model(input_ids=torch.cat([last, last], 1), attention_mask=torch.ones(1, 2, dtype=torch.long), **hf.decode_kwargs(cache))

    hf.check_untouched(misuse, match="cover the whole conversation")


def test_hf_labels(hf):
    def misuse(last, cache):
        hf.model(input_ids=hf.ids, labels=hf.ids)

    hf.check_untouched(misuse, match="loss")


def test_hf_inputs_embeds(hf):
    def misuse(last, cache):
        hf.model.generate(inputs_embeds=hf.dense.get_input_embeddings()(hf.ids), max_new_tokens=4)

    hf.check_untouched(misuse, match="inputs_embeds")


def test_hf_cache_prefilled_by_another_model(hf):
    def misuse(last, cache):
        other = DynamicCache(config=hf.dense.config)
        with torch.no_grad():
            hf.dense(input_ids=hf.ids[:, :50], use_cache=True, **{cache_kw(hf.dense): other})
        hf.generate(**{cache_kw(hf.dense): other})

    hf.check_untouched(misuse, match="already holds tokens")


def test_hf_decode_batch_differs_from_the_prefill(hf):
    def misuse(last, cache):
        hf.model(input_ids=torch.cat([last, last]), **hf.decode_kwargs(cache))

    hf.check_untouched(misuse, match="batch")


def test_hf_beam_search(hf):
    def misuse(last, cache):
        hf.generate(num_beams=2)

    hf.check_untouched(misuse, error=(ValueError, NotImplementedError), match="beam search")


def test_hf_use_cache_false(hf):
    def misuse(last, cache):
        hf.generate(use_cache=False)

    hf.check_untouched(misuse, match="use_cache")


def test_hf_failure_during_decode_leaves_the_model_usable(hf):
    """HF's own machinery fails in the middle of a generation (here a stopping criterion raises)."""

    class Boom(StoppingCriteria):
        def __init__(self):
            self.calls = 0

        def __call__(self, input_ids, scores, **kwargs):
            self.calls += 1
            if self.calls == 5:
                raise RuntimeError("boom")
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    boom = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        hf.generate(stopping_criteria=StoppingCriteriaList([boom]))
    assert boom.calls == 5 and hf.model.lsa.store.selections >= 1  # it failed while decoding
    assert torch.equal(hf.generate(), hf.generated)


def test_hf_failure_during_prefill_leaves_the_model_usable(hf):
    """The model's own forward fails inside the prefill, after conversion (a token id past the vocabulary)."""
    bad = hf.ids.clone()
    bad[0, 50] = hf.dense.config.vocab_size + 10
    with pytest.raises(IndexError):
        hf.generate(bad)
    assert torch.equal(hf.generate(), hf.generated)


def test_hf_failure_during_prefill_leaves_the_running_generation_alone(hf):
    bad = hf.ids.clone()
    bad[0, 50] = hf.dense.config.vocab_size + 10

    def misuse(last, cache):
        hf.generate(bad)

    hf.check_untouched(misuse, error=IndexError, match="index out of range")


# -- plain decoder -----------------------------------------------------------------------------


class BufferRun:
    """A plain decoder converted for batch 1, a prompt, and what it decodes when nothing goes wrong."""

    def __init__(self):
        base = make_model("buffer")
        base.setup_caches(max_batch_size=1, max_seq_length=512)
        self.model = lsa_rewrite.convert(base, CONFIG)
        self.ids = torch.randint(3, 250, (1, PROMPT), generator=torch.Generator().manual_seed(1))
        self.tokens = self.decode(STEPS)
        assert self.model.lsa.store.selections >= 3

    @torch.no_grad()
    def decode(self, steps: int, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Prefill and decode ``steps`` tokens, or (``tokens`` given) continue that generation to ``steps`` tokens."""
        if tokens is None:
            tokens = self.model(self.ids, torch.arange(PROMPT))[:, -1].argmax(-1, keepdim=True)
        while tokens.shape[1] < steps:
            pos = PROMPT + tokens.shape[1] - 1
            logits = self.model(tokens[:, -1:], torch.tensor([pos]))[:, -1]
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], 1)
        return tokens

    def check_untouched(self, misuse, *, error=ValueError, match: str) -> None:
        tokens = self.decode(AT)
        store = self.model.lsa.store
        with pytest.raises(error, match=match), torch.no_grad():
            misuse(tokens, PROMPT + AT - 1)  # the position the next token would take
        assert self.model.lsa.store is store, "the refused call replaced the model's current store"
        assert torch.equal(self.decode(STEPS, tokens), self.tokens), "the running generation changed after the refused call"
        assert torch.equal(self.decode(STEPS), self.tokens), "a new generation gives another output after the refused call"


@pytest.fixture(scope="module")
def plain(one_thread):
    return BufferRun()


def test_plain_multi_token_decode(plain):
    def misuse(tokens, pos):
        plain.model(torch.cat([tokens[:, -1:], tokens[:, -1:]], 1), torch.tensor([pos, pos + 1]))

    plain.check_untouched(misuse, match="position")


def test_plain_skipped_positions(plain):
    def misuse(tokens, pos):
        plain.model(tokens[:, -1:], torch.tensor([pos + 3]))

    plain.check_untouched(misuse, match="advance by one")


def test_plain_prefill_with_another_batch(plain):
    def misuse(tokens, pos):
        plain.model(plain.ids.expand(2, -1), torch.arange(PROMPT))

    plain.check_untouched(misuse, match=r"converted for batch 1.*got batch 2")


def test_plain_decode_with_another_batch(plain):
    def misuse(tokens, pos):
        plain.model(tokens[:, -1:].expand(2, -1), torch.tensor([pos]))

    plain.check_untouched(misuse, match="batch")
