"""``ConcatSharedInputLinearPass``: which products become one, that the weights move into one storage
without a copy left behind, and that the step decodes exactly as before.

The pass takes CUDA weights by default (the library runs it with ``min_group=3`` on batch-1 CUDA steps, q/k/v
then lowered to the GEMV: benchmarks/NOTES.md run 77); the tests name ``devices=("cpu",)`` to run it on this machine.
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
from lsa_rewrite.passes import ConcatSharedInputLinearPass, clone_program, count_targets
from lsa_rewrite.passes import pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

ON_CPU = functools.partial(ConcatSharedInputLinearPass, devices=("cpu",))
DECODE = LSAConfig(mode="dense", chunk_size=16, interval=16, sink_tokens=16, recent_tokens=16)


def _program(name: str = "llama", dtype: torch.dtype = torch.bfloat16, batch: int = 1):
    model = no_eos(make_model(name).to(dtype))
    return lsa_rewrite.convert(model, LSAConfig(mode="dense")).lsa.program(batch), model


def _groups(model) -> list[list[torch.nn.Parameter]]:
    out = []
    for layer in model.model.layers:
        out.append([layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight])
        out.append([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight])
    return out


def test_q_k_v_and_gate_up_become_one_product_each():
    program, _ = _program()
    before = count_targets(program.module.graph)
    lowered = clone_program(program)
    assert ON_CPU()(lowered.module) == 10  # q, k, v, gate, up x 2 layers
    after = count_targets(lowered.module.graph)
    assert before["linear"] == 15 and after["linear"] == 9  # 4 concatenated + o, down x 2 + lm head
    assert after["split"] == 4
    only_qkv = clone_program(program)
    assert ON_CPU(min_group=3)(only_qkv.module) == 6
    assert count_targets(only_qkv.module.graph)["split"] == 2


def test_weights_move_into_one_storage_and_the_old_ones_are_freed():
    program, model = _program()
    want = {name: t.clone() for name, t in model.state_dict().items()}
    groups = _groups(model)
    old = [w.untyped_storage() for group in groups for w in group]  # handles: the storages' only other holders are the weights
    assert all(torch._C._storage_Use_Count(s._cdata) > 1 for s in old)
    lowered = clone_program(program)
    ON_CPU()(lowered.module)
    assert all(torch._C._storage_Use_Count(s._cdata) == 1 for s in old), "an old weight storage is still held"
    buffers = {n: b for n, b in lowered.module.named_buffers() if n.startswith("lsa_concat_")}
    assert len(buffers) == 4
    ptrs = {b.untyped_storage().data_ptr() for b in buffers.values()}
    for group in groups:
        storage = group[0].untyped_storage()
        assert storage.data_ptr() in ptrs and all(w.untyped_storage().data_ptr() == storage.data_ptr() for w in group)
        offsets = [w.storage_offset() for w in group]
        assert offsets == [sum(w.numel() for w in group[:i]) for i in range(len(group))]
        assert storage.nbytes() == sum(w.numel() * w.element_size() for w in group)  # nothing more than the weights
        assert all(isinstance(w, torch.nn.Parameter) and w.is_contiguous() for w in group)
    got = model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)


def test_a_second_program_reuses_the_storage():
    program, model = _program()
    first = clone_program(program)
    ON_CPU()(first.module)
    ptrs = [w.data_ptr() for group in _groups(model) for w in group]
    second = clone_program(program)
    assert ON_CPU()(second.module) == 10
    assert [w.data_ptr() for group in _groups(model) for w in group] == ptrs
    assert sorted(b.data_ptr() for n, b in second.module.named_buffers() if n.startswith("lsa_concat_")) == sorted(
        b.data_ptr() for n, b in first.module.named_buffers() if n.startswith("lsa_concat_"))


def test_fp32_gpu_default_and_many_rows_are_left_alone():
    program, _ = _program(dtype=torch.float32)
    assert ON_CPU()(clone_program(program).module) == 0  # fp16/bf16 by default
    program, _ = _program()
    assert ConcatSharedInputLinearPass()(clone_program(program).module) == 0  # CUDA weights by default
    program, _ = _program(batch=2)
    assert ON_CPU()(clone_program(program).module) == 0  # 2 rows > max_rows=1
    assert ON_CPU(max_rows=2)(clone_program(program).module) == 10


class _Mixed(torch.nn.Module):
    """Products of one input that the pass must leave alone, and one pair it takes."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)

        def p(*shape):
            return torch.nn.Parameter(torch.randn(*shape, generator=gen).bfloat16())

        self.a1, self.a2 = p(8, 16), p(4, 16)  # taken
        self.b1, self.b2, self.bias = p(8, 16), p(8, 16), p(8)  # one has a bias: no group of two
        self.shared = p(24, 16)
        self.v1 = torch.nn.Parameter(self.shared.data[:8])  # a view of another tensor's storage: never moved
        self.v2 = p(8, 16)
        self.c1, self.c2 = p(8, 16), p(8, 32)  # different inputs
        self.register_buffer("lsa_local_w1", torch.randn(8, 16, generator=gen).bfloat16())  # tensor-parallel shards
        self.register_buffer("lsa_local_w2", torch.randn(4, 16, generator=gen).bfloat16())

    def forward(self, x, y, z):
        a = F.linear(x, self.a1) + F.linear(x, self.a2).sum()
        b = F.linear(y, self.b1, self.bias) + F.linear(y, self.b2)
        v = F.linear(z, self.v1) + F.linear(z, self.v2)
        c = F.linear(x + 1, self.c1).sum() + F.linear(torch.cat([x, x], -1), self.c2).sum()
        y2 = y * 2
        s = F.linear(y2, self.lsa_local_w1).sum() + F.linear(y2, self.lsa_local_w2).sum()
        return a.sum() + b.sum() + v.sum() + c + s + self.shared.sum()



def test_only_bias_free_products_of_owned_parameters_are_grouped():
    module = _Mixed()
    gen = torch.Generator().manual_seed(1)
    x, y, z = (torch.randn(1, 16, generator=gen).bfloat16() for _ in range(3))
    gm = traced_with_values(module, x, y, z)
    want = gm(x, y, z)
    a1 = module.a1.data_ptr()
    v1 = module.v1.data_ptr()
    shard = module.lsa_local_w1.data_ptr()
    assert ON_CPU()(gm) == 2  # a1 and a2 only
    assert module.a1.data_ptr() != a1 and module.a2.data_ptr() == module.a1.data_ptr() + 8 * 16 * 2
    assert module.v1.data_ptr() == v1 and module.lsa_local_w1.data_ptr() == shard
    assert torch.equal(gm(x, y, z), want)
    # tensor-parallel shards (benchmarks only): copied into the buffer, the shards themselves untouched
    gm = traced_with_values(module, x, y, z)
    assert ON_CPU(local_shards=True)(gm) == 4
    assert module.lsa_local_w1.data_ptr() == shard
    assert torch.equal(gm(x, y, z), want)


def _decode(monkeypatch, name: str, min_group: int = 2):
    """Greedy tokens and logits of a bf16 zoo model converted as is, and with the pass run on its program
    (in place of the GEMV pass, which leaves CPU programs alone anyway); how many products it replaced."""
    model = no_eos(make_model(name).to(torch.bfloat16))
    ids = torch.randint(3, 250, (1, 24), generator=torch.Generator().manual_seed(3))
    plain = converted_copy(model, DECODE)
    replaced = []
    monkeypatch.setattr(pipeline, "LowerSmallMLinearPass",
                        lambda **_: lambda module: replaced.append(ON_CPU(min_group=min_group)(module)))
    grouped = converted_copy(model, DECODE)
    return hf_greedy(plain, ids, 10), hf_greedy(grouped, ids, 10), replaced, model.config.num_hidden_layers


@pytest.mark.parametrize(("name", "per_layer"), [
    ("llama", 5), ("mistral", 5), ("qwen3", 5), ("gemma3", 5),  # q, k, v, gate, up
    ("qwen2", 2),  # q/k/v have biases: gate/up only
    ("phi3", 0),  # qkv and gate_up are one weight each already
    ("gpt2", 0),  # Conv1D (addmm with a bias)
])
def test_the_step_decodes_exactly_as_before(monkeypatch, name, per_layer):
    (seq_p, logits_p), (seq_g, logits_g), replaced, layers = _decode(monkeypatch, name)
    assert replaced == [per_layer * layers]  # one program (batch 1)
    # bit-equal on the CPU: each output column of the wider product is computed as before
    assert torch.equal(seq_g, seq_p) and torch.equal(logits_g, logits_p)


def test_min_group_below_two_is_refused():
    with pytest.raises(ValueError, match="min_group must be >= 2"):
        ConcatSharedInputLinearPass(min_group=1)
    with pytest.raises(ValueError, match="max_rows must be >= 1"):
        ConcatSharedInputLinearPass(max_rows=0)
