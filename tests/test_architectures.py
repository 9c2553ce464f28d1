"""One lifecycle across 39 architectures (tests/architectures.py), each with the default `SAMConfig` of its task type:
wrapping is bit-identical, selection keeps every module's train/eval flag, a few training steps (one under bf16
autocast) move only the selected entries, save → reload on a fresh base, merge_and_unload and generate give the
adapted model's outputs, and gradient checkpointing trains where the model supports it."""

from __future__ import annotations

import copy

import pytest
import torch
from architectures import archs, inputs, output
from peft import PeftModel, get_peft_model

import sam_peft
from sam_peft.tuner.targets import targets

ARCHS = archs()
GENERATIVE = ("causal", "seq2seq", "speech")


def _base(arch):
    torch.manual_seed(0)
    return arch.build().eval()


def _config(arch) -> sam_peft.SAMConfig:
    return sam_peft.SAMConfig(task_type=arch.task_type, sparsity=0.05)


def _train(model, batches, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=step == 1):
            loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("arch", ARCHS, ids=[a.name for a in ARCHS])
def test_lifecycle(arch, tmp_path):
    batches = [inputs(arch, seed=s) for s in range(2)]
    base = _base(arch)
    with torch.no_grad():
        reference = output(base, batches[0])
    theta0 = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, _config(arch))
    model.eval()
    with torch.no_grad():
        assert _same(arch, output(model, batches[0]), reference), "wrapping changed the model's output"

    model.train()
    model.base_model.model.eval()  # the base in eval mode: its dropouts stay off through the selection
    modes = {name: m.training for name, m in model.named_modules()}
    sam_peft.select_parameters(model, batches, progress=False)
    assert {name: m.training for name, m in model.named_modules()} == modes

    _train(model, batches)
    with torch.no_grad():
        adapted = output(model, batches[0])
    assert not torch.equal(adapted, reference), "training changed nothing"
    chosen = sam_peft.selected_indices(model)

    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(_base(arch), tmp_path).eval()
    with torch.no_grad():
        assert _same(arch, output(reloaded, batches[0]), adapted), "save → reload changed the outputs"
    if arch.kind in GENERATIVE:
        generated = _generate(reloaded, arch, batches[0])

    merged = reloaded.merge_and_unload().eval()
    with torch.no_grad():
        torch.testing.assert_close(output(merged, batches[0]), adapted, rtol=1e-5, atol=1e-5)
    params = dict(merged.named_parameters())
    for name, indices in chosen.items():
        moved = (params[name].detach() != theta0[name]).reshape(-1).nonzero().squeeze(1)
        assert set(moved.tolist()) <= set(indices.tolist()), f"{name}: entries outside the selection moved"
    if arch.kind in GENERATIVE:
        assert torch.equal(_generate(merged, arch, batches[0]), generated)


def _same(arch, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit; to rounding (1e-6) for a model whose own bits depend on buffer placement (`Arch.exact`)."""
    return torch.equal(a, b) if arch.exact else torch.allclose(a, b, rtol=1e-6, atol=1e-6)


def _generate(model, arch, batch) -> torch.Tensor:
    kwargs = dict(max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        if arch.kind == "speech":
            return model.generate(input_features=batch["input_features"], **kwargs)
        return model.generate(input_ids=batch["input_ids"], **kwargs)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a.name in ("llama", "bert", "t5", "opt", "qwen3_moe")],
                         ids=lambda a: a.name)
def test_gradient_checkpointing_trains(arch):
    batches = [inputs(arch, seed=s) for s in range(2)]
    base = _base(arch)
    if not base.supports_gradient_checkpointing:
        pytest.skip(f"{type(base).__name__} does not support gradient checkpointing")
    model = get_peft_model(base, _config(arch))
    sam_peft.select_parameters(model, batches, progress=False)
    plain = copy.deepcopy(model)
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    grads = []
    for m in (plain, model):
        m.train()
        torch.manual_seed(1)  # the same dropout masks (checkpointing replays the RNG state)
        m(**batches[0]).loss.backward()
        grads.append({t.name: t.values.grad for t in targets(m, "default") if t.values.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6)
