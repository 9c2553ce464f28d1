"""Model-level peft behaviours found by peft's own test suite (scripts/peft_conformance.py): loading with
`low_cpu_mem_usage=True` (values created on the meta device, filled by the load) and empty values tensors, which can
never train, not marked trainable."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import sam_peft
from sam_peft.tuner.install import install


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.norm = nn.LayerNorm(20)
        self.lin1 = nn.Linear(20, 2)

    def forward(self, x):
        return self.lin1(torch.relu(self.norm(self.lin0(x))))


def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP()


def values(model) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "sparsediff_values" in n}


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_load_with_low_cpu_mem_usage(tmp_path, low_cpu_mem_usage):
    x = torch.randn(4, 10)
    model = get_peft_model(mlp(), sam_peft.SparseDiffConfig(sparsity=0.2, init_weights=False))
    expected = model(x)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(mlp(), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    assert not any(b.device.type == "meta" for b in loaded.buffers())
    torch.testing.assert_close(loaded(x), expected)
    loaded.load_adapter(tmp_path, adapter_name="other", low_cpu_mem_usage=low_cpu_mem_usage)
    loaded.set_adapter("other")
    torch.testing.assert_close(loaded(x), expected)


def test_empty_values_are_not_trainable():
    # lin1.bias has 2 entries: floor(0.2 * 2) = 0 are kept
    model = get_peft_model(mlp(), sam_peft.SparseDiffConfig(sparsity=0.2))
    params = values(model)
    empty = [n for n, p in params.items() if p.numel() == 0]
    assert empty and all("lin1.sparsediff_values.default.bias" in n for n in empty)
    assert all(p.requires_grad == (p.numel() > 0) for p in params.values())
    model.set_adapter("default")  # peft marks every adapter tensor trainable again here
    assert all(p.requires_grad == (p.numel() > 0) for p in values(model).values())
    model(torch.randn(3, 10)).sum().backward()
    assert all(p.grad is not None for p in values(model).values() if p.requires_grad)


def test_placeholders_stay_trainable_until_the_selection():
    model = get_peft_model(mlp(), sam_peft.SAMConfig(sparsity=0.2))  # data-driven: placeholders, counts unknown
    assert all(p.requires_grad for p in values(model).values())
    tuner = model.base_model
    chosen = {"lin0.weight": torch.tensor([0, 5, 7]), "norm.weight": torch.tensor([1])}  # nothing elsewhere
    install(tuner, "default", chosen)
    trainable = {n for n, p in values(model).items() if p.requires_grad}
    assert trainable == {n for n, p in values(model).items() if p.numel() > 0}
    assert len(trainable) == 2
    install(tuner, "default", {"lin1.bias": torch.tensor([1])})  # a re-selection can give entries back
    assert {n for n, p in values(model).items() if p.requires_grad} == {
        n for n in values(model) if n.endswith("lin1.sparsediff_values.default.bias")}
