"""Half-precision bases: the values stay float32, merging and unmerging restore an fp16/bf16 base within
rounding, and a safe merge that would overflow is refused leaving the base unchanged."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batches, make_bert
from peft import get_peft_model
from saved_files import (
    SPARSITY,
    assert_same,
    base_weights,
    randomize,
)

import sam_peft


def _half_model(dtype: torch.dtype):
    model = get_peft_model(make_bert().to(dtype), sam_peft.SparseDiffConfig(
        sparsity=SPARSITY, selection="magnitude", task_type="SEQ_CLS"))
    randomize(model)
    return model


@pytest.mark.filterwarnings("ignore:Already unmerged")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_values_are_float32_and_unmerge_restores_the_base(dtype):
    model = _half_model(dtype)
    values = {n: p for n, p in model.named_parameters() if ".sparsediff_values." in n}
    assert values and all(p.dtype == torch.float32 for p in values.values())
    assert all(p.dtype == dtype for p in base_weights(model).values())
    before = base_weights(model)
    inputs = make_batches(1)[0]
    inputs.pop("labels")
    with torch.no_grad():
        unmerged_out = model(**inputs).logits
    model.merge_adapter()
    merged = base_weights(model)
    assert any(not torch.equal(merged[n], before[n]) for n in before)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, unmerged_out, rtol=0.05, atol=0.05)
    model.unmerge_adapter()
    eps = torch.finfo(dtype).eps
    v_max = max(float(v.detach().abs().max()) for v in values.values() if v.numel())
    for name, restored in base_weights(model).items():
        bound = 2 * eps * (float(before[name].float().abs().max()) + v_max)
        assert float((restored.float() - before[name].float()).abs().max()) <= bound, name


@pytest.mark.parametrize(
    "dtype, huge, refused",
    [(torch.float16, 1e30, True), (torch.bfloat16, 3.4e38, True), (torch.bfloat16, 1e30, False)],
    ids=["fp16-1e30", "bf16-3.4e38", "bf16-1e30-fits"],
)
@pytest.mark.parametrize("how", ["merge_adapter", "merge_and_unload"])
def test_safe_merge_refuses_overflow_and_leaves_the_base_unchanged(dtype, huge, refused, how):
    model = _half_model(dtype)
    names = [n for n, p in model.named_parameters() if ".sparsediff_values." in n and p.numel()]
    with torch.no_grad():  # the last layer overflows: every earlier layer would merge first
        model.get_parameter(names[-1])[0] = huge
    before = base_weights(model)
    merge = (lambda: model.merge_adapter(safe_merge=True)) if how == "merge_adapter" else (
        lambda: model.merge_and_unload(safe_merge=True))
    if not refused:  # 1e30 is finite in bfloat16
        merge()
        return
    with pytest.raises(ValueError, match="non-finite") as info:
        merge()
    assert "unchanged" in str(info.value)
    assert_same(base_weights(model), before)
    assert not any(getattr(m, "merged", False) for m in model.modules())
