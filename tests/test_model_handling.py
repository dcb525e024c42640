"""A converted model under copy.deepcopy, .to(), and torch.save (lsa_rewrite/handling.py)."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import lsa_rewrite
from lsa_rewrite import LSAConfig
from zoo import make_model

CONFIG = LSAConfig(budget=96, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=16)


def _tokens(model, ids, new=24):
    return model.generate(ids, max_new_tokens=new, do_sample=False)


@pytest.fixture
def llama():
    model = make_model("llama").eval()
    model.generation_config.eos_token_id = None
    return model


def test_deepcopy_is_a_fresh_converted_model(llama):
    ids = torch.randint(3, 250, (1, 300), generator=torch.Generator().manual_seed(0))
    converted = lsa_rewrite.convert(llama, CONFIG)
    want = _tokens(converted, ids)
    clone = copy.deepcopy(converted)
    assert clone.lsa is not converted.lsa and clone.lsa.store is None
    assert clone.lsa.config == CONFIG
    assert next(clone.parameters()).data_ptr() != next(converted.parameters()).data_ptr()
    assert torch.equal(_tokens(clone, ids), want)
    assert torch.equal(_tokens(converted, ids), want)  # the original still works


def test_to_dtype_reconverts_for_the_new_dtype(llama):
    ids = torch.randint(3, 250, (1, 300), generator=torch.Generator().manual_seed(1))
    reference = lsa_rewrite.convert(copy.deepcopy(llama).to(torch.bfloat16), CONFIG)
    converted = lsa_rewrite.convert(llama, CONFIG)
    _tokens(converted, ids)
    moved = converted.to(torch.bfloat16)
    assert moved is converted and next(moved.parameters()).dtype == torch.bfloat16
    assert {s.dtype for s in moved.lsa.sites} == {torch.bfloat16}
    assert torch.equal(_tokens(moved, ids), _tokens(reference, ids))
    assert lsa_rewrite.footprint(moved)["resident_kv_bytes"] == lsa_rewrite.footprint(reference)["resident_kv_bytes"]


def test_a_move_that_changes_nothing_keeps_the_session(llama):
    converted = lsa_rewrite.convert(llama, CONFIG)
    converted.generate(torch.randint(3, 250, (1, 300)), max_new_tokens=4, do_sample=False)
    session, store = converted.lsa, converted.lsa.store
    assert converted.to("cpu") is converted and converted.float() is converted and converted.to(torch.float32) is converted
    assert converted.lsa is session and session.store is store


def test_plain_decoder_deepcopy_and_to_dtype():
    base = make_model("buffer")
    base.setup_caches(max_batch_size=1, max_seq_length=512)
    converted = lsa_rewrite.convert(base, LSAConfig(mode="dense", chunk_size=16, interval=16))
    ids = torch.randint(3, 250, (1, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = converted(ids, torch.arange(64))
        clone = copy.deepcopy(converted)
        torch.testing.assert_close(clone(ids, torch.arange(64)), want)
        moved = converted.to(torch.float64)
        assert moved(ids, torch.arange(64)).dtype == torch.float64


def test_torch_save_is_refused_with_what_to_do(llama):
    converted = lsa_rewrite.convert(llama, CONFIG)
    with pytest.raises(TypeError, match="state_dict"):
        torch.save(converted, io.BytesIO())
    buffer = io.BytesIO()
    torch.save(converted.state_dict(), buffer)  # the weights save as usual
    assert buffer.tell() > 0
