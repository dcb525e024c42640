"""Shared test helpers: dense-vs-converted decoding comparisons on zoo models."""

from __future__ import annotations

import copy

import torch

import lsa_rewrite
from lsa_rewrite import LSAConfig


def no_eos(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights emit EOS at random; generation must run its full length to be compared."""
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = None
    return model


def hf_greedy(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, **kwargs):
    """Greedy generate returning (sequences, per-step logits [steps, B, V])."""
    out = model.generate(
        ids, max_new_tokens=new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True, **kwargs
    )
    return out.sequences, torch.stack(out.logits)


@torch.no_grad()
def buffer_greedy(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int):
    """Prefill + greedy decode of a buffer-cache decoder; returns (sequences, logits [steps, B, V])."""
    length = ids.shape[1]
    logits = [model(ids, torch.arange(length))[:, -1]]
    tokens = [logits[-1].argmax(-1, keepdim=True)]
    for pos in range(length, length + new_tokens - 1):
        logits.append(model(tokens[-1], torch.tensor([pos]))[:, -1])
        tokens.append(logits[-1].argmax(-1, keepdim=True))
    return torch.cat([ids, *tokens], 1), torch.stack(logits)


def converted_copy(model: torch.nn.Module, config: LSAConfig) -> torch.nn.Module:
    return lsa_rewrite.convert(copy.deepcopy(model), config)


def traced_with_values(module: torch.nn.Module, *args) -> "torch.fx.GraphModule":
    """``module`` traced by FX, each node's value recorded in ``meta["val"]`` (as Dynamo records its example values)."""
    from torch import fx

    gm = fx.symbolic_trace(module)

    class Record(fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            n.meta["val"] = result
            return result

    Record(gm).run(*args)
    return gm
