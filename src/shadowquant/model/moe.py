"""Mixtral mixture-of-experts blocks with every expert projection and the router as nn.Linear.

transformers 5 stores Mixtral's experts as fused 3-D tensors and its router as a bare
parameter. Profiling, fake quantization and export all work on nn.Linear modules, named like
the classic checkpoint layout (`mlp.gate`, `mlp.experts.<e>.w1|w2|w3`), so the fused block
is replaced by an equivalent one built from Linears.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MixtralExpertMLP(nn.Module):
    """One expert: `w2(act(w1(x)) * w3(x))` (w1 = gate, w3 = up, w2 = down)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act_fn: nn.Module):
        super().__init__()
        # Registered in the classic checkpoint's order, so named_modules lists w1, w2, w3.
        self.w1 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w2 = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.w3 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.act_fn = act_fn

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act_fn(self.w1(hidden_states)) * self.w3(hidden_states))


class MixtralLinearMoeBlock(nn.Module):
    """Drop-in replacement for transformers' MixtralSparseMoeBlock, same routing math and return value."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 jitter_noise: float, act_fn: nn.Module):
        super().__init__()
        self.hidden_size = hidden_size
        self.top_k = top_k
        self.jitter_noise = jitter_noise
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = nn.ModuleList(
            MixtralExpertMLP(hidden_size, intermediate_size, act_fn) for _ in range(num_experts)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        if self.training and self.jitter_noise > 0:
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise
            )
        flat = hidden_states.reshape(-1, hidden_dim)
        router_logits = self.gate(flat)
        # As transformers does: softmax in float32, top-k, renormalise the kept probabilities.
        probs = F.softmax(router_logits.float(), dim=-1)
        top_weights, top_index = torch.topk(probs, self.top_k, dim=-1)
        top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)

        output = torch.zeros_like(flat)
        for expert_index, expert in enumerate(self.experts):
            token_index, slot = torch.where(top_index == expert_index)
            if token_index.numel() == 0:
                continue
            expert_out = expert(flat[token_index]) * top_weights[token_index, slot, None]
            output.index_add_(0, token_index, expert_out.to(output.dtype))
        return output.reshape(batch_size, sequence_length, hidden_dim)


def _is_fused_moe_block(module: nn.Module) -> bool:
    experts = getattr(module, "experts", None)
    gate = getattr(module, "gate", None)
    return (
        experts is not None
        and gate is not None
        and isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor)
        and isinstance(getattr(experts, "down_proj", None), torch.Tensor)
        and isinstance(getattr(gate, "weight", None), torch.Tensor)
        and not isinstance(gate, nn.Linear)
    )


def _split_expert_weights(experts: nn.Module, expert_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w1, w3, w2) weights in nn.Linear [out, in] layout for one expert of a fused block."""
    gate_up = experts.gate_up_proj[expert_index]
    down = experts.down_proj[expert_index]
    if getattr(experts, "is_transposed", False):
        gate_up, down = gate_up.t(), down.t()
    if getattr(experts, "is_concatenated", True):
        w1, w3 = gate_up.chunk(2, dim=0)
    else:  # interleaved rows: gate0, up0, gate1, up1, ...
        w1, w3 = gate_up[0::2], gate_up[1::2]
    return w1, w3, down


def _unfused_copy(block: nn.Module) -> MixtralLinearMoeBlock:
    experts, router = block.experts, block.gate
    num_experts, hidden_size = router.weight.shape
    intermediate_size = _split_expert_weights(experts, 0)[0].shape[0]
    new_block = MixtralLinearMoeBlock(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_experts=num_experts,
        top_k=block.top_k,
        jitter_noise=getattr(block, "jitter_noise", 0.0),
        act_fn=experts.act_fn,
    )
    new_block.to(device=router.weight.device, dtype=router.weight.dtype)
    with torch.no_grad():
        new_block.gate.weight.copy_(router.weight)
        for index, expert in enumerate(new_block.experts):
            w1, w3, w2 = _split_expert_weights(experts, index)
            expert.w1.weight.copy_(w1)
            expert.w3.weight.copy_(w3)
            expert.w2.weight.copy_(w2)
    new_block.train(block.training)
    return new_block


def unfuse_mixtral_experts(model: nn.Module) -> int:
    """Replace every fused Mixtral MoE block by a MixtralLinearMoeBlock in place; return how many.

    Blocks already made of Linears (transformers 4 layout) are left alone.
    """
    targets = [(name, module) for name, module in model.named_modules() if _is_fused_moe_block(module)]
    for name, block in targets:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attribute, _unfused_copy(block))
    return len(targets)
