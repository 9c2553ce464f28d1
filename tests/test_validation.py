"""Clear errors for bad inputs: invalid settings, patterns matching nothing, unusable data, NaN losses and
gradients, meta-device bases, duplicate adapter names, and selecting an inference-mode adapter."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from conftest import make_batches, make_bert, sam_model
from peft import PeftModel, get_peft_model
from saved_files import (
    SPARSITY,
    assert_same,
    content,
)

import sam_peft


@pytest.mark.parametrize("sparsity", [0, 0.0, -0.1, 1.5, float("nan"), float("inf"), True, "x", None], ids=repr)
def test_invalid_sparsity_is_a_config_error_naming_it(sparsity):
    with pytest.raises(sam_peft.ConfigError, match=re.escape(f"sparsity={sparsity!r} is invalid")) as info:
        sam_peft.SAMConfig(sparsity=sparsity)
    assert "(0, 1]" in str(info.value)
    assert isinstance(info.value, ValueError)  # generic handlers keep working


@pytest.mark.parametrize("field, value", [("selection", "sam2"), ("allocation", "per_layer")])
def test_unknown_choice_is_a_config_error_listing_the_options(field, value):
    with pytest.raises(sam_peft.ConfigError, match=f"{field}='{value}' is unknown") as info:
        sam_peft.SAMConfig(**{field: value})
    assert ("'magnitude'" if field == "selection" else "'global'") in str(info.value)


def test_unknown_selection_override_names_it():
    model = sam_model()
    with pytest.raises(sam_peft.ConfigError, match="selection='sam2' is unknown") as info:
        sam_peft.select_parameters(model, make_batches(1), selection="sam2", progress=False)
    assert "'magnitude'" in str(info.value)
    assert model.peft_config["default"].counts is None
    assert model.peft_config["default"].selection == "sam"


@pytest.mark.parametrize("patterns", [["nope"], "nope"], ids=["list", "regex"])
@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
def test_patterns_matching_nothing_say_what_was_searched(field, patterns):
    with pytest.raises(sam_peft.ConfigError) as info:
        sam_model(**{field: patterns})
    message = str(info.value)
    assert f"{field}=" in message and "nope" in message
    assert "searched" in message and "bert.embeddings" in message


def test_empty_dataloader_is_a_selection_error():
    model = sam_model()
    with pytest.raises(sam_peft.SelectionError, match="empty"):
        sam_peft.select_parameters(model, [], progress=False)
    assert model.peft_config["default"].counts is None


def test_fewer_batches_than_num_steps_warns(caplog):
    model = sam_model()
    with caplog.at_level(logging.WARNING, logger="sam_peft"):
        report = sam_peft.select_parameters(model, make_batches(2), num_steps=5, dropout=False, progress=False)
    assert report.steps == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("5" in m and "2" in m for m in warnings), warnings


@pytest.mark.parametrize("allocation", ["per_tensor", "global"])
def test_a_sparsity_that_selects_nothing_is_refused_before_the_burn_in(allocation):
    model = sam_model(sparsity=1e-9, allocation=allocation)
    batches = make_batches(2)
    consumed = []
    with pytest.raises(sam_peft.SelectionError, match="selects no entry") as info:
        sam_peft.select_parameters(model, (consumed.append(b) or b for b in batches), progress=False)
    assert "sparsity ≥" in str(info.value)
    assert not consumed  # refused before any burn-in batch
    assert model.peft_config["default"].counts is None


def test_batches_that_are_not_dicts_get_a_clear_error():
    model = sam_model()
    batch = make_batches(1)[0]
    with pytest.raises(sam_peft.SelectionError, match="a burn-in batch is a list, not a dict"):
        sam_peft.select_parameters(model, [[batch["input_ids"], batch["labels"]]], progress=False)
    assert model.peft_config["default"].counts is None


def test_sparsity_one_warning_suggests_a_valid_value(caplog):
    with caplog.at_level(logging.WARNING, logger="sam_peft"):
        sam_peft.SAMConfig(sparsity=1.0)
        sam_peft.SAMConfig(sparsity=0.995)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "did you mean 0.005?" in messages[1]
    assert "did you mean 0.0?" not in messages[0] and "did you mean a small fraction" in messages[0]


def _flags(model) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def test_nan_loss_is_a_selection_error_naming_the_step():
    model = sam_model()
    flags = _flags(model)
    calls = []

    def poison(module, args, output):  # the third batch's forward produces NaN
        calls.append(None)
        return output * float("nan") if len(calls) == 3 else output

    handle = model.get_base_model().bert.pooler.register_forward_hook(poison)
    try:
        with pytest.raises(sam_peft.SelectionError, match=r"loss is nan at step 2"):
            sam_peft.select_parameters(model, make_batches(4), dropout=False, progress=False)
    finally:
        handle.remove()
    assert model.peft_config["default"].counts is None
    assert _flags(model) == flags
    assert all(p.grad is None for p in model.parameters())


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss with NaN gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


def test_nan_gradient_with_finite_loss_is_a_selection_error_naming_the_tensor():
    model = sam_model()
    losses = []
    handle = model.get_base_model().bert.pooler.register_forward_hook(lambda m, a, out: _NaNGradient.apply(out))
    loss_hook = model.register_forward_hook(lambda m, a, out: losses.append(float(out.loss.detach())))
    try:
        with pytest.raises(sam_peft.SelectionError, match=r"burn-in gradient of '([\w.]+)' is NaN") as info:
            sam_peft.select_parameters(model, make_batches(2), dropout=False, progress=False)
    finally:
        handle.remove()
        loss_hook.remove()
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    named = re.search(r"gradient of '([\w.]+)'", str(info.value)).group(1)
    assert named in dict(make_bert().named_parameters())
    assert model.peft_config["default"].counts is None


def _meta_base(kind: str):
    if kind == "torch.device":
        with torch.device("meta"):
            return make_bert()
    from accelerate import init_empty_weights

    with init_empty_weights():
        return make_bert()


@pytest.mark.parametrize("kind", ["torch.device", "init_empty_weights"])
def test_meta_device_base_is_a_selection_error(kind, saved):
    """Nothing to fingerprint on the meta device: the adapter is created, selecting on it is refused clearly."""
    model = sam_model(_meta_base(kind))
    config = model.peft_config["default"]
    assert config.base_fingerprint is None
    assert config.base_shapes_digest == saved.config["base_shapes_digest"]  # shapes are known without data
    with pytest.raises(sam_peft.SelectionError, match="meta device"):
        sam_peft.select_parameters(model, make_batches(1), progress=False)
    assert config.counts is None


def test_adding_an_existing_adapter_name_is_refused():
    model = sam_model()
    sam_peft.select_parameters(model, make_batches(1), dropout=False, progress=False)
    before = content(model)
    with pytest.raises(ValueError, match="'default' already exists"):
        model.add_adapter("default", sam_peft.SAMConfig(sparsity=0.1, task_type="SEQ_CLS"))
    assert model.peft_config["default"].sparsity == SPARSITY
    assert_same(content(model), before)




def test_selecting_an_inference_mode_adapter_is_refused(tmp_path):
    model = get_peft_model(make_bert(), sam_peft.SAMConfig(sparsity=SPARSITY))
    sam_peft.select_parameters(model, make_batches(1), dropout=False, progress=False)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_bert(), tmp_path)  # is_trainable=False: values frozen
    with pytest.raises(sam_peft.SelectionError, match="inference mode"):
        sam_peft.select_parameters(loaded, make_batches(1), progress=False)


def test_saving_an_unselected_adapter_is_refused_before_writing(tmp_path):
    model = sam_model()
    with pytest.raises(sam_peft.NotSelectedError, match="before saving"):
        model.save_pretrained(tmp_path / "adapter")
    assert not any((tmp_path / "adapter").glob("*.safetensors"))
    magnitude = get_peft_model(make_bert(), sam_peft.SparseDiffConfig(sparsity=SPARSITY, task_type="SEQ_CLS"))
    magnitude.save_pretrained(tmp_path / "data-free")  # selected when it was created
