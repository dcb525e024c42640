"""``LowerSmallMLinearPass``: which nodes of a decode graph become ``lsa::small_m_linear``, and that the
lowered step decodes exactly as before.

The pass lowers CUDA weights only; on this CPU machine the tests name ``devices=("cpu",)`` to see what it
would do (the op runs ``F.linear`` on CPU, so a lowered CPU program must give the same bits).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from helpers import converted_copy, hf_greedy, no_eos, traced_with_values
from zoo import make_model

import lsa_rewrite
from lsa_rewrite import LSAConfig
from lsa_rewrite.passes import LowerSmallMLinearPass, clone_program, count_targets
from lsa_rewrite.passes import pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

OP = torch.ops.lsa.small_m_linear.default
ON_CPU = functools.partial(LowerSmallMLinearPass, devices=("cpu",))


def _program(dtype: torch.dtype, batch: int = 1):
    model = make_model("llama").to(dtype)
    return lsa_rewrite.convert(model, LSAConfig(mode="dense")).lsa.program(batch), model


def _linear_layers(model) -> int:
    return sum(isinstance(m, torch.nn.Linear) for m in model.modules())


def test_cpu_programs_are_left_alone():
    program, model = _program(torch.bfloat16)
    counts = count_targets(program.module.graph)
    assert counts.get("small_m_linear.default", 0) == 0
    assert counts["linear"] == _linear_layers(model) == 15  # q, k, v, o, gate, up, down x 2 layers + lm head


def test_every_projection_of_a_bf16_step_is_lowered():
    program, model = _program(torch.bfloat16)
    before = count_targets(program.module.graph)
    lowered = clone_program(program)
    assert ON_CPU()(lowered.module) == 15
    after = count_targets(lowered.module.graph)
    assert after["small_m_linear.default"] == before["linear"] and "linear" not in after
    assert {k: v for k, v in after.items() if k != "small_m_linear.default"} == {k: v for k, v in before.items() if k != "linear"}
    weights = {node.args[1].target for node in lowered.module.graph.nodes if node.target is OP}
    assert weights == {f"model.{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_fp32_weights_and_many_rows_are_left_alone():
    program, _ = _program(torch.float32)
    assert ON_CPU()(clone_program(program).module) == 0  # the GEMV takes fp16/bf16 only
    program, _ = _program(torch.bfloat16, batch=4)
    assert ON_CPU(max_rows=2)(clone_program(program).module) == 0  # 4 rows
    assert ON_CPU(max_rows=4)(clone_program(program).module) == 15


def test_normed_inputs_off_lowers_only_products_of_unnormed_inputs():
    """``normed_inputs=False``: q/k/v, gate/up and the lm head read a norm's output and stay ``linear``;
    o (reads the attention) and down (reads silu(gate) * up) are lowered."""
    program, _ = _program(torch.bfloat16)
    lowered = clone_program(program)
    assert ON_CPU(normed_inputs=False)(lowered.module) == 4
    weights = sorted(node.args[1].target.split(".")[-2] for node in lowered.module.graph.nodes if node.target is OP)
    assert weights == ["down_proj", "down_proj", "o_proj", "o_proj"]
    assert count_targets(lowered.module.graph)["linear"] == 11


def test_normed_concat_lowers_the_concatenated_q_k_v_too():
    """``normed_concat=True`` after ``ConcatSharedInputLinearPass(min_group=3)``: the q/k/v product (a norm's
    output times an ``lsa_concat_*`` buffer) is lowered with o and down; gate/up and the lm head stay ``linear``."""
    from lsa_rewrite.passes import ConcatSharedInputLinearPass

    program, _ = _program(torch.bfloat16)
    lowered = clone_program(program)
    assert ConcatSharedInputLinearPass(min_group=3, devices=("cpu",))(lowered.module) == 6
    assert ON_CPU(normed_inputs=False, normed_concat=True)(lowered.module) == 6
    weights = sorted(node.args[1].target for node in lowered.module.graph.nodes if node.target is OP)
    assert [w for w in weights if w.startswith("lsa_concat_")] == ["lsa_concat_0", "lsa_concat_1"]
    assert sorted(w.split(".")[-2] for w in weights if w.startswith("model.")) == ["down_proj", "down_proj", "o_proj", "o_proj"]
    assert count_targets(lowered.module.graph)["linear"] == 5  # gate, up x 2 layers + lm head
    without = clone_program(program)
    ConcatSharedInputLinearPass(min_group=3, devices=("cpu",))(without.module)
    assert ON_CPU(normed_inputs=False)(without.module) == 4  # the option is what lowers the normed concatenation


def test_q_k_v_concatenated_and_lowered_decode_exactly_like_the_original(monkeypatch):
    from lsa_rewrite.passes import ConcatSharedInputLinearPass

    def factory(**options):
        def run(module):
            ConcatSharedInputLinearPass(min_group=3, devices=("cpu",))(module)
            return LowerSmallMLinearPass(devices=("cpu",), **{**options, "normed_concat": True})(module)
        return run

    (seq_p, logits_p), (seq_l, logits_l), ops = _decode_with_pass(monkeypatch, factory)
    assert ops == 6
    assert torch.equal(seq_l, seq_p) and torch.equal(logits_l, logits_p)


class _Mixed(torch.nn.Module):
    """Linear layers in the forms the pass takes, and products it must leave alone."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(24, 16, generator=gen).bfloat16())
        self.w2 = torch.nn.Parameter(torch.randn(8, 24, generator=gen).bfloat16())
        self.b2 = torch.nn.Parameter(torch.randn(8, generator=gen).bfloat16())
        self.w3 = torch.nn.Parameter(torch.randn(16, 8, generator=gen).bfloat16())  # [K, N]: not transposed
        self.w4 = torch.nn.Parameter(torch.randn(16, 16, generator=gen).bfloat16())

    def forward(self, x, wide):
        h = x @ self.w1.t()  # lowered (matmul of a transposed weight)
        g = F.linear(h, self.w2, self.b2)  # lowered (linear + bias)
        u = torch.matmul(x, self.w3)  # left: the weight is [K, N]
        a = x @ x.transpose(-1, -2)  # left: activations times activations
        p = F.linear(wide, self.w4)  # left: 32 rows
        q = F.linear(x.float(), self.w4.float())  # left: fp32
        return g.sum() + u.sum() + a.sum() + p.sum() + q.sum()



def test_only_weight_products_of_few_rows_are_lowered():
    module = _Mixed()
    x = torch.randn(2, 16).bfloat16()
    wide = torch.randn(32, 16).bfloat16()
    gm = traced_with_values(module, x, wide)
    want = gm(x, wide)
    assert ON_CPU()(gm) == 2
    lowered = [n for n in gm.graph.nodes if n.target is OP]
    assert [(n.args[1].target, n.args[2].target if n.args[2] is not None else None) for n in lowered] == [("w1", None), ("w2", "b2")]
    assert not any(n.op == "call_method" and n.target == "t" for n in gm.graph.nodes), "the lowered weight's transpose was left behind"
    assert torch.equal(gm(x, wide), want)


def _decode_with_pass(monkeypatch, factory):
    """Greedy tokens and logits of a bf16 llama converted twice: as is (CPU: no lowering) and with
    ``build_decode_program`` running ``factory(**its options)`` in place of the pass; and the lowered
    program's op count."""
    model = no_eos(make_model("llama").to(torch.bfloat16))
    ids = torch.randint(3, 250, (1, 24), generator=torch.Generator().manual_seed(3))
    config = LSAConfig(mode="dense", chunk_size=16, interval=16, sink_tokens=16, recent_tokens=16)
    plain = converted_copy(model, config)
    monkeypatch.setattr(pipeline, "LowerSmallMLinearPass", factory)
    lowered = converted_copy(model, config)
    ops = count_targets(lowered.lsa.program(1).module.graph).get("small_m_linear.default", 0)
    return hf_greedy(plain, ids, 12), hf_greedy(lowered, ids, 12), ops


def test_the_pipeline_lowers_o_and_down_of_a_batch_1_step(monkeypatch):
    """``build_decode_program``'s own GEMV options (one row, no norm outputs), the device check moved to the
    CPU (q/k/v not concatenated: the pipeline's concat pass takes CUDA weights only): o and down of both
    layers; same tokens and bit-identical logits (the op on CPU is F.linear)."""
    (seq_p, logits_p), (seq_l, logits_l), ops = _decode_with_pass(monkeypatch, functools.partial(LowerSmallMLinearPass, devices=("cpu",)))
    assert ops == 4
    assert torch.equal(seq_l, seq_p) and torch.equal(logits_l, logits_p)


def test_the_pipeline_lowers_q_k_v_as_one_product_with_o_and_down(monkeypatch):
    """``build_decode_program`` as it runs on CUDA bf16 weights, both passes' device checks moved to the CPU:
    q/k/v concatenated and lowered (one op a layer), o and down lowered, gate/up and the lm head left as
    ``linear``; the model's parameters keep their values; same tokens and bit-identical logits."""
    from lsa_rewrite.passes import ConcatSharedInputLinearPass

    monkeypatch.setattr(pipeline, "ConcatSharedInputLinearPass", functools.partial(ConcatSharedInputLinearPass, devices=("cpu",)))
    model = no_eos(make_model("llama").to(torch.bfloat16))
    want = {name: t.clone() for name, t in model.state_dict().items()}
    (seq_p, logits_p), (seq_l, logits_l), ops = _decode_with_pass(monkeypatch, functools.partial(LowerSmallMLinearPass, devices=("cpu",)))
    assert ops == 6  # (q/k/v, o, down) x 2 layers
    assert torch.equal(seq_l, seq_p) and torch.equal(logits_l, logits_p)
    program = lsa_rewrite.convert(model, LSAConfig(mode="dense")).lsa.program(1)
    lowered = {n.args[1].target for n in program.module.graph.nodes if n.target is OP}
    assert {t for t in lowered if t.startswith("lsa_concat_")} == {"lsa_concat_0", "lsa_concat_1"}
    linear = sorted(n.args[1].target.split(".")[-2] for n in program.module.graph.nodes if n.op == "call_function" and n.target is not OP
                    and n.target in (F.linear, torch._C._nn.linear))
    assert linear == ["gate_proj", "gate_proj", "lm_head", "up_proj", "up_proj"]
    got = model.state_dict()
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert count_targets(lsa_rewrite.convert(no_eos(make_model("llama").to(torch.bfloat16)), LSAConfig(mode="dense"))
                         .lsa.program(2).module.graph).get("small_m_linear.default", 0) == 0  # batched: left alone


def test_every_projection_lowered_decodes_exactly_like_the_original(monkeypatch):
    (seq_p, logits_p), (seq_l, logits_l), ops = _decode_with_pass(
        monkeypatch, lambda **_: LowerSmallMLinearPass(devices=("cpu",), normed_inputs=True))
    assert ops == 15
    assert torch.equal(seq_l, seq_p) and torch.equal(logits_l, logits_p)


def test_the_pipeline_leaves_a_batched_step_alone(monkeypatch):
    monkeypatch.setattr(pipeline, "LowerSmallMLinearPass", functools.partial(LowerSmallMLinearPass, devices=("cpu",)))
    program, _ = _program(torch.bfloat16, batch=2)
    assert count_targets(program.module.graph).get("small_m_linear.default", 0) == 0
    program, _ = _program(torch.bfloat16, batch=1)
    assert count_targets(program.module.graph)["small_m_linear.default"] == 4


def test_max_rows_out_of_range_is_refused():
    with pytest.raises(ValueError, match="max_rows must be 1..16"):
        LowerSmallMLinearPass(max_rows=17)


def test_uuid_is_stable():
    assert LowerSmallMLinearPass().uuid() == LowerSmallMLinearPass(max_rows=4).uuid()
