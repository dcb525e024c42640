"""``LowerSmallMLinearPass(fuse_norm=True)``: a one-row product of a Llama-style RMSNorm's output becomes
``lsa::small_m_linear_rmsnorm`` of the norm's input; which nodes, which norms go, and that the lowered
step decodes exactly as before.

The pass lowers CUDA weights only; on this CPU machine the tests name ``devices=("cpu",)`` to see what it
would do (the fused op on CPU runs its reference, the norm in the order of Hugging Face's ``LlamaRMSNorm``
and then ``F.linear``: the same ops as the unfused graph, so a lowered CPU program must give the same bits).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from helpers import converted_copy, hf_greedy, no_eos, traced_with_values

import lsa_rewrite
from lsa_rewrite import LSAConfig
from lsa_rewrite.passes import LowerSmallMLinearPass, clone_program, count_targets
from lsa_rewrite.passes import pipeline
from lsa_rewrite.passes.small_m_linear import rms_norm_match

pytestmark = pytest.mark.usefixtures("one_thread")

OP = torch.ops.lsa.small_m_linear.default
FUSED = torch.ops.lsa.small_m_linear_rmsnorm.default
FUSING = functools.partial(LowerSmallMLinearPass, devices=("cpu",), max_rows=1, normed_inputs=False, fuse_norm=True)


def _program(zoo_model, family: str, batch: int = 1):
    model = zoo_model(family).to(torch.bfloat16)
    return lsa_rewrite.convert(model, LSAConfig(mode="dense")).lsa.program(batch), model


def _leaf(node: fx.Node) -> str:
    return node.target.split(".")[-2]  # model.model.layers.0.self_attn.q_proj.weight -> q_proj


@pytest.mark.parametrize("family,qk_norms", [("llama", 0), ("qwen2", 0), ("qwen3", 2)])
def test_normed_products_take_the_fused_op(zoo_model, family, qk_norms):
    """q/k/v, gate/up and the lm head read an RMSNorm's output: each becomes the fused op of the norm's
    input, with that norm's weight and eps; o and down (no norm) the plain GEMV. The layer norms' nodes
    go; Qwen3's q/k norms (after a product, feeding no product) stay."""
    program, model = _program(zoo_model, family)
    layers = model.config.num_hidden_layers
    lowered = clone_program(program)
    assert FUSING()(lowered.module) == 15
    graph = lowered.module.graph
    fused = [n for n in graph.nodes if n.target is FUSED]
    plain = [n for n in graph.nodes if n.target is OP]
    assert sorted(_leaf(n.args[3]) for n in fused) == sorted(["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"] * layers + ["lm_head"])
    assert sorted(_leaf(n.args[1]) for n in plain) == ["down_proj"] * layers + ["o_proj"] * layers
    norm_of = {"q_proj": "input_layernorm", "k_proj": "input_layernorm", "v_proj": "input_layernorm",
               "gate_proj": "post_attention_layernorm", "up_proj": "post_attention_layernorm", "lm_head": "norm"}
    for node in fused:
        weight, eps = node.args[1], node.args[2]
        assert weight.target.split(".")[-2] == norm_of[_leaf(node.args[3])]
        if _leaf(node.args[3]) != "lm_head":
            assert weight.target.split(".")[-3] == node.args[3].target.split(".")[-4]  # the same layer
        assert eps == model.config.rms_norm_eps
        assert example_dtype(node.args[0]) == torch.bfloat16  # the norm's input, not its fp32 copy
    counts = count_targets(graph)
    assert "linear" not in counts
    assert counts.get("rsqrt", 0) == counts.get("mean", 0) == qk_norms * layers


def example_dtype(node):
    from lsa_rewrite.passes.capture import example_value

    return example_value(node).dtype


def test_gemma_norms_and_batched_steps_are_not_fused(zoo_model):
    """Gemma's RMSNorm (``x * (1 + w)`` in fp32, then cast) is another form: its products stay ``linear``
    (with ``normed_inputs=False``); a batch-2 step has two rows: nothing is fused."""
    program, _ = _program(zoo_model, "gemma3")
    lowered = clone_program(program)
    FUSING()(lowered.module)
    assert count_targets(lowered.module.graph).get("small_m_linear_rmsnorm.default", 0) == 0
    program, _ = _program(zoo_model, "llama", batch=2)
    lowered = clone_program(program)
    assert FUSING(max_rows=2)(lowered.module) == 4  # o and down only
    assert count_targets(lowered.module.graph).get("small_m_linear_rmsnorm.default", 0) == 0


class _Norms(torch.nn.Module):
    """A Llama RMSNorm read by a product and by something else; the Gemma form; a norm with an fp32 weight."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.g = torch.nn.Parameter((1 + torch.randn(16, generator=gen)).bfloat16())
        self.g32 = torch.nn.Parameter(1 + torch.randn(16, generator=gen))
        self.w1 = torch.nn.Parameter(torch.randn(24, 16, generator=gen).bfloat16())
        self.w2 = torch.nn.Parameter(torch.randn(8, 16, generator=gen).bfloat16())
        self.w3 = torch.nn.Parameter(torch.randn(8, 16, generator=gen).bfloat16())

    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
        n = self.g * h.to(torch.bfloat16)  # a constant dtype, as Dynamo records it
        a = F.linear(n, self.w1)  # fused
        b = n.sum()  # keeps n (and its norm) alive
        gemma = (h * (1.0 + self.g.float())).to(torch.bfloat16)
        c = F.linear(gemma, self.w2)  # left: Gemma's form
        d = F.linear((self.g32 * h).to(torch.bfloat16), self.w3)  # left: the weight multiplies in fp32
        return a.sum() + b + c.sum() + d.sum()



def test_a_norm_with_other_users_stays_and_other_forms_are_left_alone():
    module = _Norms()
    x = (3 * torch.randn(1, 1, 16)).bfloat16()
    gm = traced_with_values(module, x)
    want = gm(x)
    assert FUSING()(gm) == 1
    fused = [n for n in gm.graph.nodes if n.target is FUSED]
    assert len(fused) == 1 and fused[0].args[1].target == "g" and fused[0].args[3].target == "w1" and fused[0].args[2] == 1e-5
    assert fused[0].args[0].op == "placeholder"
    counts = count_targets(gm.graph)
    assert counts["linear"] == 2 and counts["rsqrt"] == 1  # the norm stays for n.sum()
    assert torch.equal(gm(x), want)
    norm_out = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ == "mul" and n.args[0].op == "get_attr"
                    and n.args[0].target == "g")
    assert rms_norm_match(gm, norm_out) is not None


def _decode(zoo_model, monkeypatch, family: str, factory):
    model = no_eos(zoo_model(family).to(torch.bfloat16))
    ids = torch.randint(3, 250, (1, 24), generator=torch.Generator().manual_seed(3))
    config = LSAConfig(mode="dense", chunk_size=16, interval=16, sink_tokens=16, recent_tokens=16)
    plain = converted_copy(model, config)
    monkeypatch.setattr(pipeline, "LowerSmallMLinearPass", factory)
    lowered = converted_copy(model, config)
    counts = count_targets(lowered.lsa.program(1).module.graph)
    return hf_greedy(plain, ids, 8), hf_greedy(lowered, ids, 8), counts


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_fused_step_decodes_exactly_like_the_original(zoo_model, monkeypatch, family):
    """bf16 greedy decoding with the norms fused (the pipeline's pass swapped for ``fuse_norm=True`` on
    CPU): same tokens and bit-identical logits (on CPU the fused op is the norm's own ops, then F.linear)."""
    (seq_p, logits_p), (seq_l, logits_l), counts = _decode(
        zoo_model, monkeypatch, family, lambda **kw: LowerSmallMLinearPass(**{**kw, "devices": ("cpu",), "fuse_norm": True}))
    assert counts["small_m_linear_rmsnorm.default"] == 11 and counts["small_m_linear.default"] == 4
    assert torch.equal(seq_l, seq_p) and torch.equal(logits_l, logits_p)


def test_uuid_is_stable():
    assert LowerSmallMLinearPass(fuse_norm=True).uuid() == LowerSmallMLinearPass().uuid()
