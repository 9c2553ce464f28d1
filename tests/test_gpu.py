"""The same behaviours on a CUDA device, where users train: bf16 autocast with fp32 values, an inference-mode
forward before training, and Trainer(bf16=True) with SAMCallback. Skipped without a GPU (CI has none)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import sam_peft

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _llama(dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).to("cuda", dtype)


def _batch(seed: int = 0) -> dict:
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(seed)).cuda()
    return {"input_ids": ids, "labels": ids}


def _peft(dtype=torch.float32):
    model = get_peft_model(_llama(dtype), sam_peft.SAMConfig(sparsity=0.05, task_type="CAUSAL_LM", init_weights=False))
    sam_peft.select_parameters(model, [_batch(1), _batch(2)], progress=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "sparsediff_values" in name:
                p.normal_(0, 0.01)
    return model


def _loss_and_grads(model, autocast: bool):
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**_batch()).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach().float(), grads


def test_bf16_autocast_matches_fp32_with_fp32_values():
    model = _peft()
    ref_loss, ref_grads = _loss_and_grads(model, autocast=False)
    loss, grads = _loss_and_grads(model, autocast=True)
    assert abs(float(loss - ref_loss)) / float(ref_loss) < 2e-2
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name
        rel = float((grad - ref_grads[name]).norm() / ref_grads[name].norm().clamp_min(1e-12))
        assert rel < 0.1, (name, rel)


def test_bf16_base_trains_and_only_selected_entries_move():
    model = _peft(torch.bfloat16)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(**_batch()).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if "base_layer" in n)
    indices = sam_peft.selected_indices(model)
    merged = model.merge_and_unload()
    changed = 0
    for name, param in merged.named_parameters():
        if name in indices:
            flat, before = param.detach().reshape(-1), base_of(base, name).reshape(-1)
            outside = torch.ones_like(flat, dtype=torch.bool)
            outside[indices[name].cuda()] = False
            assert torch.equal(flat[outside], before[outside]), name
            changed += int((flat != before).sum())
    assert changed > 0


def base_of(base: dict, name: str) -> torch.Tensor:
    module, attr = name.rsplit(".", 1)
    return base[f"base_model.model.{module}.base_layer.{attr}"]


def test_inference_mode_forward_then_training():
    model = _peft(torch.bfloat16)
    with torch.inference_mode():
        model(**_batch())
    loss, grads = _loss_and_grads(model, autocast=True)
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads.values())


def test_trainer_bf16_with_sam_callback(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(_llama(torch.bfloat16), sam_peft.SAMConfig(sparsity=0.05, task_type="CAUSAL_LM"))
    rows = [_batch(s)["input_ids"][0].cpu() for s in range(16)]
    data = [{"input_ids": ids, "labels": ids} for ids in rows]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, bf16=True,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1)
    callback = sam_peft.SAMCallback(burn_in_steps=2, progress=False)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    assert callback.report is not None and callback.report.selected > 0
    values = [p for n, p in model.named_parameters() if "sparsediff_values" in n and p.numel()]
    assert values and all(p.dtype == torch.float32 for p in values) and any(p.abs().sum() > 0 for p in values)


def test_inductor_compiled_bf16_step_matches_eager():
    import copy

    eager = _peft()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)  # inductor, CUDA kernels
    ref_loss, ref_grads = _loss_and_grads(eager, autocast=True)
    compiled_model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = compiled(**_batch()).loss
    loss.backward()
    loss = loss.detach().float()
    grads = {n: p.grad for n, p in compiled_model.named_parameters() if p.requires_grad and p.grad is not None}
    assert abs(float(loss - ref_loss)) / float(ref_loss) < 1e-2
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        rel = float((grad - ref_grads[name]).norm() / ref_grads[name].norm().clamp_min(1e-12))
        assert rel < 0.05, (name, rel)
