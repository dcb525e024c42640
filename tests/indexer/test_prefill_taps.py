"""The probe's indexer inputs come from the model's own prefill (``lsa_rewrite.prefill_taps``).

After a prefill the first selection reads ``idx_x`` of the last prompt token at each target layer. The
probe step that fills it attends over the first resident set only, so past the first sparse layer its
hidden state is not the dense model's; the prefill's own query-projection input is, and it is what the
store must hold when the probe selects.
"""

from __future__ import annotations

import copy

import pytest
import torch

import lsa_rewrite
from lsa_rewrite import LSAConfig
from lsa_rewrite.indexer.from_model import indexer_from_model
from lsa_rewrite.prefill_taps import PrefillTaps, projection_module
from lsa_rewrite.session import LSASession
from helpers import no_eos
from zoo import make_model

PROMPT = 240
SPARSE = dict(budget=112, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=16, selector="indexer")


def _dense_inputs(base, layer_module: str, call) -> torch.Tensor:
    """The input ``layer_module`` sees at the last position when ``call()`` runs the dense model."""
    seen = {}
    module = dict(base.named_modules())[layer_module]
    hook = module.register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0][:, -1].clone()))
    try:
        with torch.no_grad():
            call()
    finally:
        hook.remove()
    return seen["x"]


def _target_module(converted, layer: int) -> str:
    site = next(s for s in converted.lsa.sites if s.layer == layer)
    return site.indexer.weight.rpartition(".")[0]


def _step_taps_only(monkeypatch) -> None:
    """The probe as it was: its own step's taps (no hooks during the prefill)."""
    monkeypatch.setattr(LSASession, "prefill_taps", lambda self, batch: PrefillTaps(self.model, [], batch))


@pytest.mark.parametrize(
    "family, options, padded",
    [
        ("llama", {}, False),
        ("llama", {"prefill_batch": 1}, True),  # one forward per row, the first row left-padded
        ("llama", {"prefill_chunk": 32}, False),  # the prompt in four forwards: the last piece's last token counts
        ("phi3", {}, False),  # fused qkv_proj
        ("gpt2", {}, False),  # Conv1D c_attn (addmm, transposed weight)
    ],
)
def test_probe_reads_the_prefills_query_projection_input(family, options, padded, monkeypatch):
    base = no_eos(make_model(family).eval())
    target = 1
    config = LSAConfig(**SPARSE, **options)
    indexer = indexer_from_model(base, config, target_layers=[target])
    ids = torch.randint(3, 250, (2, PROMPT), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :7] = 0
    converted = lsa_rewrite.convert(copy.deepcopy(base), config, indexer=indexer)
    module = _target_module(converted, target)
    want = _dense_inputs(base, module, lambda: base(ids, attention_mask=mask))
    converted.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False)  # the prefill and its probe only
    store = converted.lsa.store
    assert not store.all_resident and store.selections == 1, "the probe's selection did not run on a sparse store"
    torch.testing.assert_close(store.layers[target].idx_x, want, atol=1e-5, rtol=1e-5)

    if options or family != "llama":
        return  # the contrast below once (two conversions per case cost CI time)
    # Without the prefill's values the probe's step taps an input computed over the first resident set
    # only: far from the dense one (the check above would fail).
    _step_taps_only(monkeypatch)
    stepped = lsa_rewrite.convert(copy.deepcopy(base), config, indexer=indexer)
    stepped.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False)
    assert not torch.allclose(stepped.lsa.store.layers[target].idx_x, want, atol=1e-3, rtol=1e-3)


def _rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The buffer decoder's rotation written as HF writes it (``q * cos + rotate_half(q) * sin``), the form
    the indexer's tap pass recognises (its own ``cat`` of two products is not)."""
    cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def test_plain_decoder_probe_reads_the_prefills_input(monkeypatch):
    import buffer_decoder

    monkeypatch.setattr(buffer_decoder, "apply_rope", _rotate_half_rope)
    base = make_model("buffer")
    length = PROMPT
    base.setup_caches(max_batch_size=2, max_seq_length=2 * length)
    config = LSAConfig(**SPARSE)
    target = 1
    indexer = indexer_from_model(base, config, target_layers=[target])
    ids = torch.randint(3, 250, (2, length), generator=torch.Generator().manual_seed(6))
    converted = lsa_rewrite.convert(copy.deepcopy(base), config, indexer=indexer)
    module = _target_module(converted, target)
    want = _dense_inputs(base, module, lambda: base(ids, torch.arange(length)))
    with torch.no_grad():
        converted(ids, torch.arange(length))
    store = converted.lsa.store
    assert not store.all_resident and store.selections == 1
    torch.testing.assert_close(store.layers[target].idx_x, want, atol=1e-5, rtol=1e-5)


def test_later_turn_probe_reads_its_own_prefill():
    """A second turn prefills only its new tokens (attending to the whole history exactly); its probe
    reads the new last token's input as the dense model computes it over the whole conversation."""
    base = no_eos(make_model("llama").eval())
    target = 1
    config = LSAConfig(**SPARSE)
    indexer = indexer_from_model(base, config, target_layers=[target])
    converted = lsa_rewrite.convert(copy.deepcopy(base), config, indexer=indexer)
    ids = torch.randint(3, 250, (1, PROMPT), generator=torch.Generator().manual_seed(7))
    first = converted.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    more = torch.randint(3, 250, (1, 40), generator=torch.Generator().manual_seed(8))
    whole = torch.cat([first.sequences, more], 1)
    converted.generate(whole, past_key_values=first.past_key_values, max_new_tokens=1, do_sample=False)
    module = _target_module(converted, target)
    # the history's last generated token was never fed to the model: the dense reference runs the whole conversation
    want = _dense_inputs(base, module, lambda: base(whole))
    torch.testing.assert_close(converted.lsa.store.layers[target].idx_x, want, atol=1e-5, rtol=1e-5)


def test_prefill_taps_keep_only_layers_read_for_every_row():
    """A layer whose hook saw an input it cannot read, or rows no forward recorded, is left out: the
    probe keeps its own step's tap there."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))

    class Site:
        def __init__(self, layer, weight):
            self.layer, self.indexer = layer, type("Tap", (), {"weight": weight, "hidden": 8})()

    sites = [Site(0, "0.weight"), Site(1, "1.weight"), Site(2, "missing.weight")]
    assert projection_module(model, "0.weight") is model[0] and projection_module(model, "missing.weight") is None
    with PrefillTaps(model, sites, batch=2) as taps:
        taps.rows = slice(0, 1)
        x = torch.randn(1, 5, 8)
        model(x)
    assert taps.values() == {}, "row 1 was never recorded"
    with PrefillTaps(model, sites, batch=2) as taps:
        x = torch.randn(2, 5, 8)
        model(x)
        model[1](torch.randn(2, 8))  # a 2D input: not [batch, tokens, hidden]
    got = taps.values()
    assert list(got) == [0]
    torch.testing.assert_close(got[0], x[:, -1])
    assert not model[0]._forward_pre_hooks and not model[1]._forward_pre_hooks, "hooks outlived the prefill"
