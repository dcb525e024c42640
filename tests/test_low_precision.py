"""bf16 and fp16 models end to end on the CPU: convert, generate, compare with the same-dtype dense model.

With a budget covering every chunk (and a store twice the context, so selection, the mirror and recall
run for real) the converted model gives the dense model's greedy tokens, and logits within
4 x eps(dtype) x the largest logit (the decode attention accumulates in another order than the
model's own). The store keeps the KV in the model's dtype. A sparse run decodes several windows with
chunks dropped and recalled, and stays finite.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import buffer_greedy, hf_greedy, no_eos
from selection_trace import ResidentTrace, buffer_decode, total_churn
from zoo import make_model

import lsa_rewrite
from lsa_rewrite import LSAConfig

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = [torch.bfloat16, torch.float16]
FAMILIES = ["llama", "gemma3", "buffer"]
PROMPT, NEW = 40, 40


def build(family: str, dtype: torch.dtype, *, cache_len: int):
    model = make_model(family).to(dtype)
    if family == "buffer":
        model.setup_caches(max_batch_size=1, max_seq_length=cache_len)
        return model
    return no_eos(model)


def greedy(family: str, model, ids: torch.Tensor, new: int):
    seq, logits = buffer_greedy(model, ids, new) if family == "buffer" else hf_greedy(model, ids, new)
    return seq, logits.float()


def check_store_dtype(model, dtype: torch.dtype) -> None:
    for state in model.lsa.store.layers.values():
        for name in ("k_pool", "v_pool", "kmin", "kmax", "mirror_k", "k_ring"):
            t = getattr(state, name, None)
            if t is not None:
                assert t.dtype == dtype, f"{name} is {t.dtype}, the model is {dtype}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_covering_budget_matches_the_same_dtype_dense_model(dtype, family):
    capacity = 2 * (PROMPT + NEW)
    model = build(family, dtype, cache_len=capacity)
    ids = torch.randint(3, 250, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    dense_seq, dense_logits = greedy(family, model, ids, NEW)
    config = LSAConfig(budget=PROMPT + NEW + 16, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=16, max_context=capacity)
    converted = lsa_rewrite.convert(copy.deepcopy(model), config)
    seq, logits = greedy(family, converted, ids, NEW)
    assert converted.lsa.store.selections > 0, "the selection path did not run"
    check_store_dtype(converted, dtype)
    assert torch.equal(seq, dense_seq)
    tol = 4 * torch.finfo(dtype).eps * dense_logits.abs().max().item()
    diff = (logits - dense_logits).abs().max().item()
    assert diff <= tol, f"{dtype}: logits differ by {diff:.3g} > {tol:.3g}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_run(dtype, family):
    prompt, new, capacity = 300, 60, 400
    model = build(family, dtype, cache_len=capacity)
    config = LSAConfig(budget=128, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=16, max_context=capacity)
    converted = lsa_rewrite.convert(model, config)
    ids = torch.randint(3, 250, (1, prompt), generator=torch.Generator().manual_seed(2))
    trace = ResidentTrace(converted)
    if family == "buffer":
        _, logits = buffer_decode(converted, ids, new, trace=trace)
    else:
        out = converted.generate(ids, max_new_tokens=new, do_sample=False, output_logits=True, return_dict_in_generate=True, logits_processor=trace.processors())
        logits = torch.stack(out.logits)
    assert torch.isfinite(logits).all()
    fp = lsa_rewrite.footprint(converted)
    assert fp["selections"] >= 4 and fp["ratio"] < 0.7, fp
    dropped, came_back = total_churn(trace)
    assert dropped > 0 and came_back > 0, (dropped, came_back)
    check_store_dtype(converted, dtype)
