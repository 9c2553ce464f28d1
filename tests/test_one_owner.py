"""Rules that each have one owner in the core: the θ0 + Δ rounding, selection state, the base-identity check, budgets
and top-k; and the defects found while unifying them (ids reused after garbage collection, quadratic loading)."""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import make_llama
from peft import PeftModel, get_peft_model
from torch import nn

import sam_peft
from sam_peft.ranking.budget import Budget, budget, entry_budget, placeholder_count
from sam_peft.ranking.signals import SIGNALS
from sam_peft.tuner.ops import add_rounded_once
from sam_peft.tuner.targets import targets

HALF_ULP_AND_A_BIT = 2.0**-8 + 1e-5  # bf16(1 + v) rounds up; bf16(1 + bf16(v)) = bf16(1 + 2⁻⁸) ties down to 1.0


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.linear(x))


def _bf16_model_with_values(value: float) -> nn.Module:
    torch.manual_seed(0)
    base = _Tiny().to(torch.bfloat16)
    with torch.no_grad():
        base.linear.bias.fill_(1.0)
    config = sam_peft.SparseDiffConfig(sparsity=0.5, selection="magnitude", target_modules=["linear", "norm"])
    model = get_peft_model(base, config)
    with torch.no_grad():
        for t in targets(model, "default"):
            t.values.fill_(value)
    return model


def test_every_path_rounds_theta0_plus_delta_once_in_bf16():
    """The generic layer (LayerNorm) and the Linear bias form θ0 + Δ as the written-in weight and merging do: added in
    fp32, rounded once to bf16. Rounding the values to bf16 first (the earlier generic path) ties 1 + 2⁻⁸ to 1.0."""
    model = _bf16_model_with_values(HALF_ULP_AND_A_BIT).eval()
    for t in targets(model, "default"):
        if t.name in ("norm.weight", "linear.bias"):
            theta0 = t.param.detach().reshape(-1)[t.indices.long()]
            assert torch.all(theta0 == 1.0), t.name
    expected = add_rounded_once(torch.ones(1, dtype=torch.bfloat16), torch.tensor([HALF_ULP_AND_A_BIT]))
    assert expected.item() == 1.0 + 2.0**-7  # the single rounding goes up
    x = torch.randn(3, 8).to(torch.bfloat16)
    with torch.no_grad():
        adapted = model(x)
        merged = model.merge_and_unload()(x)
    assert torch.equal(adapted, merged)
    assert merged.dtype == torch.bfloat16


def test_several_adapters_sum_their_values_before_the_single_rounding():
    torch.manual_seed(0)
    base = _Tiny().to(torch.bfloat16)
    model = get_peft_model(base, sam_peft.SparseDiffConfig(sparsity=1.0, selection="magnitude",
                                                           target_modules=["norm"]))
    model.add_adapter("other", sam_peft.SparseDiffConfig(sparsity=1.0, selection="magnitude", target_modules=["norm"]))
    with torch.no_grad():
        for name in ("default", "other"):
            for t in targets(model, name):
                t.values.fill_(HALF_ULP_AND_A_BIT / 2)
    model.base_model.set_adapter(["default", "other"])
    x = torch.randn(2, 8).to(torch.bfloat16)
    layer = model.base_model.model.norm
    norm = layer.get_base_layer()
    delta = torch.full((8,), HALF_ULP_AND_A_BIT)
    weight, bias = (add_rounded_once(p.detach(), delta) for p in (norm.weight, norm.bias))
    assert weight[0].item() == 1.0 + 2.0**-7  # two bf16 roundings (one per adapter, or values first) give 1.0
    with torch.no_grad():
        expected = nn.functional.layer_norm(x, (8,), weight, bias, norm.eps)
        assert torch.equal(layer(x), expected)


def test_one_message_for_an_unselected_adapter(tmp_path):
    model = get_peft_model(make_llama(), sam_peft.SAMConfig(task_type="CAUSAL_LM"))
    messages = []
    for action in (lambda: sam_peft.selected_indices(model), lambda: sam_peft.SparseDelta.from_peft(model),
                   lambda: model.save_pretrained(tmp_path)):
        with pytest.raises(sam_peft.NotSelectedError) as info:
            action()
        messages.append(str(info.value).rsplit(" before ", 1)[0])
    assert len(set(messages)) == 1 and "placeholder entries" in messages[0]


def test_one_budget_for_both_allocations_and_the_placeholders():
    sizes = [1000, 7, 4096]
    assert budget(0.005, "per_tensor", sizes) == Budget((0, 1, 2), (5, 0, 20))
    assert budget(0.005, "global", sizes) == Budget((0, 0, 0), (entry_budget(0.005, 5103),))
    assert entry_budget(0.005, 5103) == 25
    assert entry_budget(0.29, 100) == 29  # the decimal written, not 0.28999...
    assert placeholder_count(0.005, "per_tensor", True, 4096) == 20
    assert placeholder_count(0.005, "global", True, 4096) == 0
    assert placeholder_count(0.005, "per_tensor", SIGNALS["bitfit"].budgeted, 4096) == 0


def test_data_free_signals_score_through_the_registry():
    assert all((s.weight_score is not None or s.keeps is not None) == (not s.needs_data) for s in SIGNALS.values())
    model = get_peft_model(make_llama(), sam_peft.SparseDiffConfig(sparsity=0.01, selection="magnitude"))
    for t in targets(model, "default"):
        if t.values.numel():
            chosen = set(t.indices.long().tolist())
            magnitudes = t.param.detach().abs().reshape(-1)
            smallest_kept = magnitudes[list(chosen)].min()
            assert int((magnitudes > smallest_kept).sum()) < len(chosen), t.name


def test_a_delta_forgets_models_that_were_collected():
    """Applied models are weakly referenced: a collected model's address, reused by a new one, is never taken for
    the old (it read as 'already applied' before), and nothing of it stays alive in the delta."""
    torch.manual_seed(0)
    delta = sam_peft.SparseDelta({"weight": (torch.tensor([0, 3]), torch.tensor([0.5, -0.5]))}, {"weight": [2, 2]})
    for _ in range(40):
        model = nn.Linear(2, 2, bias=False)
        delta.apply_to(model)
        assert model.weight.view(-1)[0] != 0
        del model
        gc.collect()
    assert len(delta._backups) == 0 and len(delta._checked) == 0


def _count_named_modules_calls(model: nn.Module, monkeypatch) -> list[int]:
    calls = [0]
    original = nn.Module.named_modules

    def counting(self, *args, **kwargs):
        if self is model:
            calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "named_modules", counting)
    return calls


def _walks_while_loading(tmp_path, monkeypatch, layers: int) -> int:
    trained = get_peft_model(make_llama(num_hidden_layers=layers),
                             sam_peft.SparseDiffConfig(sparsity=0.05, selection="random"))
    trained.save_pretrained(tmp_path / str(layers))
    base = make_llama(num_hidden_layers=layers)
    calls = _count_named_modules_calls(base, monkeypatch)
    loaded = PeftModel.from_pretrained(base, tmp_path / str(layers))
    monkeypatch.undo()
    for ours, theirs in zip(targets(loaded, "default"), targets(trained, "default"), strict=True):
        assert torch.equal(ours.indices, theirs.indices)
    return calls[0]


def test_loading_walks_the_model_a_fixed_number_of_times(tmp_path, monkeypatch):
    """Loading is linear in the number of modules: the model is walked as often with 8 layers as with 2 (each
    layer's state-dict prefix was found by a walk of its own: quadratic)."""
    assert _walks_while_loading(tmp_path, monkeypatch, 2) == _walks_while_loading(tmp_path, monkeypatch, 8)
