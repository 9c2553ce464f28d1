"""The training path peft users run: bf16/fp16 autocast and half-precision bases for every layer kind, values and
their gradients in fp32, and no state outside the model that an inference-mode or no-grad forward can poison."""

from __future__ import annotations

import threading

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import sam_peft


class AllKinds(nn.Module):
    """One module of every kind the tuner wraps: Embedding, Linear, Conv1D, Conv1d, Conv2d, MultiheadAttention,
    LayerNorm."""

    def __init__(self, vocab: int = 40, dim: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.lin = nn.Linear(dim, dim)
        self.c1d = Conv1D(dim, dim)
        self.conv1 = nn.Conv1d(dim, dim, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 2, 3, padding=1)
        self.mha = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(2 * dim, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.lin(self.emb(ids))
        h = self.c1d(torch.relu(h))
        h = h + self.conv1(h.transpose(1, 2)).transpose(1, 2)
        h = h + self.conv2(h.unsqueeze(1)).mean(1)
        h = h + self.mha(h, h, h, need_weights=False)[0]
        h = self.norm(h)
        return self.out(torch.cat([h, h.square()], -1)).mean(1)


def _model(dtype: torch.dtype = torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    base = AllKinds().to(dtype)
    config = sam_peft.SparseDiffConfig(sparsity=0.2, selection="random", init_weights=False, exclude_modules=["out"])
    return get_peft_model(base, config)


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 40, (4, 6), generator=torch.Generator().manual_seed(seed))


def _values(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "sparsediff_values" in n and p.numel()}


def _grads(model, ids, autocast_dtype=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = model(ids)
    out.float().square().sum().backward()
    return out.detach().float(), {n: p.grad for n, p in _values(model).items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))


def test_every_kind_has_a_delta():
    kinds = {type(m.get_base_layer()).__name__ for m in _model().modules() if hasattr(m, "sparsediff_values")}
    assert {"Embedding", "Linear", "Conv1D", "Conv1d", "Conv2d", "MultiheadAttention", "LayerNorm"} <= kinds


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_matches_fp32_within_the_dtype_tolerance(dtype):
    model = _model()
    ids = _ids()
    ref_out, ref_grads = _grads(model, ids)
    out, grads = _grads(model, ids, autocast_dtype=dtype)
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    assert _rel(out, ref_out) < tol
    assert grads.keys() == ref_grads.keys() and len(grads) >= 7
    for name, grad in grads.items():
        assert grad is not None and grad.dtype == torch.float32, name  # the master copy's gradient is fp32
        assert _rel(grad, ref_grads[name]) < 5 * tol, name
    assert all(p.dtype == torch.float32 for p in _values(model).values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_base_trains_with_fp32_values(dtype):
    ref = _model()
    half = _model(dtype)
    ids = _ids()
    ref_out, ref_grads = _grads(ref, ids)
    out, grads = _grads(half, ids)
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    assert _rel(out, ref_out) < tol
    for name, grad in grads.items():
        assert grad.dtype == torch.float32 and _rel(grad, ref_grads[name]) < 5 * tol, name
    before = {n: p.detach().clone() for n, p in half.named_parameters() if "base_layer" in n}
    torch.optim.AdamW(_values(half).values(), lr=1e-2).step()
    out_after, _ = _grads(half, ids)
    assert not torch.equal(out_after, out)  # the update reached the forward
    assert all(torch.equal(p, before[n]) for n, p in half.named_parameters() if "base_layer" in n)


def test_fp16_with_a_gradient_scaler():
    model = _model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    optimizer = torch.optim.AdamW(_values(model).values(), lr=1e-2)
    start = {n: p.detach().clone() for n, p in _values(model).items()}
    for _ in range(3):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(_ids()).float().square().mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    assert all(torch.isfinite(p).all() and not torch.equal(p, start[n]) for n, p in _values(model).items())


@pytest.mark.parametrize("context", [torch.inference_mode, torch.no_grad], ids=["inference_mode", "no_grad"])
def test_an_inference_forward_leaves_nothing_that_breaks_training(context):
    model = _model()
    ids = _ids()
    with context():
        first = model(ids)
    out, grads = _grads(model, ids)
    torch.testing.assert_close(out, first.clone().float())
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    with torch.autocast("cpu", dtype=torch.bfloat16), context():
        model(ids)
    _grads(model, ids, autocast_dtype=torch.bfloat16)


def test_two_models_in_one_process_do_not_share_state():
    a, b = _model(seed=0), _model(seed=1)
    ids = _ids()
    out_a, _ = _grads(a, ids)
    out_b, _ = _grads(b, ids)
    again_a, _ = _grads(a, ids)
    torch.testing.assert_close(again_a, out_a)
    assert not torch.allclose(out_a, out_b)


def test_two_threads_running_inference_on_one_model():
    model = _model().eval()
    inputs = [_ids(seed) for seed in range(8)]
    with torch.no_grad():
        expected = [model(ids) for ids in inputs]
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    results: dict[int, list[torch.Tensor]] = {}

    def work(worker: int) -> None:
        with torch.inference_mode():
            results[worker] = [model(ids) for _ in range(20) for ids in inputs][-len(inputs):]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for worker in range(2):
        for got, want in zip(results[worker], expected):
            torch.testing.assert_close(got, want)
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if "base_layer" in n)


def test_base_weights_hold_theta0_between_calls():
    """The fast path writes the delta into a weight only for the duration of a kernel."""
    model = _model()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    _grads(model, _ids())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(_ids()).sum().backward()
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if "base_layer" in n)


def test_trainer_bf16_with_sam_callback_changes_only_selected_entries(tmp_path):
    """Trainer(bf16=True) (autocast in every step, and in the burn-in) with SAMCallback on a tiny Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    base = LlamaForCausalLM(config)
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, sam_peft.SAMConfig(sparsity=0.05, task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(3)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (16, 12), generator=generator)]
    seen = []
    sam_callback = sam_peft.SAMCallback(burn_in_steps=2, progress=False)
    real_select = sam_peft.burnin.callback.select_parameters

    def recording_select(*args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real_select(*args, **kwargs)

    sam_peft.burnin.callback.select_parameters = recording_select
    try:
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, bf16=True,
                                 use_cpu=True, learning_rate=1e-2, report_to=[], save_strategy="no")
        Trainer(model=model, args=args, train_dataset=data, callbacks=[sam_callback]).train()
    finally:
        sam_peft.burnin.callback.select_parameters = real_select
    assert seen == [(True, torch.bfloat16)], "the burn-in runs under the training autocast"
    values = {n: p for n, p in model.named_parameters() if "sparsediff_values" in n and p.numel()}
    assert values and all(p.dtype == torch.float32 for p in values.values())
    indices = sam_peft.selected_indices(model)
    merged = model.merge_and_unload()
    changed = 0
    for name, param in merged.named_parameters():
        flat, before = param.detach().reshape(-1), original[name].reshape(-1)
        outside = torch.ones_like(flat, dtype=torch.bool)
        if name in indices:
            outside[indices[name]] = False
            changed += int((flat[~outside] != before[~outside]).sum())
        assert torch.equal(flat[outside], before[outside]), name
    assert changed > 0
