"""Fused MoE experts (one `(num_experts, ·, ·)` parameter, as Mixtral and Qwen3-MoE store them): the burn-in sees the
routing-dependent gradient of the whole tensor, and the selection is its exact top-k, per tensor or globally."""

from __future__ import annotations

import pytest
import torch
from architectures import archs, inputs
from peft import get_peft_model

import sam_peft
from sam_peft.tuner.targets import targets

MOE = [a for a in archs() if a.name in ("mixtral", "qwen3_moe")]
SPARSITY = 0.05


def _reference_scores(arch, batches) -> dict[str, torch.Tensor]:
    """(Σ_t g_t)² of every expert tensor by plain autograd on the unwrapped base: the SAM score to reproduce."""
    torch.manual_seed(0)
    base = arch.build().eval()
    sums: dict[str, torch.Tensor] = {}
    for batch in batches:
        base.zero_grad()
        base(**batch).loss.backward()
        for name, param in base.named_parameters():
            if ".experts." in name:
                sums[name] = sums.get(name, 0) + param.grad.detach().clone()
    return {name: s.square() for name, s in sums.items()}


@pytest.mark.parametrize("arch", MOE, ids=lambda a: a.name)
@pytest.mark.parametrize("allocation", ["per_tensor", "global"])
def test_expert_selection_is_the_top_k_of_the_routed_gradient(arch, allocation):
    batches = [inputs(arch, seed=s) for s in range(3)]
    scores = _reference_scores(arch, batches)
    assert scores, "the architecture has no fused expert parameters"
    for name, score in scores.items():
        assert score.dim() == 3, f"{name} is not a fused (experts, ·, ·) tensor"
        per_expert = score.flatten(1).sum(1)
        assert (per_expert > 0).any(), f"{name}: no expert received a gradient"

    torch.manual_seed(0)
    model = get_peft_model(arch.build().eval(),
                           sam_peft.SAMConfig(task_type="CAUSAL_LM", sparsity=SPARSITY, allocation=allocation))
    sam_peft.select_parameters(model, batches, dropout=False, progress=False)
    chosen = sam_peft.selected_indices(model)
    for name, score in scores.items():
        assert name in chosen, f"{name} was not targeted"
        picked = score.reshape(-1)[chosen[name]]
        if allocation == "per_tensor":  # the whole tensor's budget is floor(p·N) over all experts together
            assert chosen[name].numel() == int(SPARSITY * score.numel())
            threshold = score.reshape(-1).kthvalue(score.numel() - chosen[name].numel() + 1).values
            assert (picked >= threshold).all(), f"{name}: an entry below the tensor's k-th score was picked"
            # exact top-k of (Σg)² up to float summation order: compare with a small relative slack
            others = torch.ones(score.numel(), dtype=torch.bool)
            others[chosen[name]] = False
            assert picked.min() >= score.reshape(-1)[others].max() * (1 - 1e-4)
        assert (picked > 0).all(), f"{name}: an entry with no routed gradient was picked"


@pytest.mark.parametrize("arch", MOE[:1], ids=lambda a: a.name)
def test_expert_values_train(arch):
    """The selected expert entries receive gradients through the router's choice and move in training."""
    batches = [inputs(arch, seed=s) for s in range(2)]
    torch.manual_seed(0)
    model = get_peft_model(arch.build().eval(), sam_peft.SAMConfig(task_type="CAUSAL_LM", sparsity=SPARSITY))
    sam_peft.select_parameters(model, batches, dropout=False, progress=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for batch in batches:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    expert_values = [t for t in targets(model, "default") if ".experts." in t.name]
    assert expert_values and any(t.values.detach().abs().sum() > 0 for t in expert_values)
