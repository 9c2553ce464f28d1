"""torch.compile: every tuner layer traces without a graph break, and a compiled model trains as the eager one."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from transformers.pytorch_utils import Conv1D

import sam_peft
from tests.conftest import SEQ, VOCAB, make_batches, make_llama


class _One(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _randomize_values(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "sparsediff_values" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _wrapped(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    layers = {"linear": nn.Linear(48, 40), "conv1d": Conv1D(40, 48), "embedding": nn.Embedding(60, 48, padding_idx=0),
              "layernorm": nn.LayerNorm(48)}
    model = get_peft_model(_One(layers[kind]), sam_peft.SAMConfig(sparsity=0.1, selection="random", seed=0,
                                                                   target_modules=["layer"]))
    _randomize_values(model)
    x = torch.randint(0, 60, (3, 5)) if kind == "embedding" else torch.randn(3, 5, 48)
    return model.train(), x


@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding", "layernorm"])
def test_a_fresh_layer_traces_without_graph_breaks(kind):
    model, x = _wrapped(kind)
    layer = model.base_model.model.layer
    explanation = torch._dynamo.explain(layer)(x)  # the first call: nothing ran eagerly before
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding", "layernorm"])
def test_a_compiled_layer_matches_eager(kind):
    eager, x = _wrapped(kind)
    compiled_model = copy.deepcopy(eager)
    x_grad = x.clone().requires_grad_() if x.is_floating_point() else x
    outputs = []
    for model, run, inputs in ((eager, eager, x), (compiled_model, torch.compile(compiled_model, backend="aot_eager",
                                                                               fullgraph=True), x_grad)):
        out = run(inputs)
        out.square().sum().backward()
        outputs.append((out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=1e-5, atol=1e-6)
    assert outputs[0][1].keys() == outputs[1][1].keys()
    for name, grad in outputs[0][1].items():
        torch.testing.assert_close(outputs[1][1][name], grad, rtol=1e-5, atol=1e-6, msg=name)
    if x.is_floating_point():  # the input gradient flows through the composed weight too
        y = x.clone().requires_grad_()
        eager(y).square().sum().backward()
        torch.testing.assert_close(x_grad.grad, y.grad, rtol=1e-5, atol=1e-6)


def test_two_active_adapters_trace_without_graph_breaks():
    model, x = _wrapped("linear")
    model.add_adapter("other", sam_peft.SAMConfig(sparsity=0.1, selection="random", seed=1, target_modules=["layer"]))
    _randomize_values(model, seed=1)
    model.base_model.set_adapter(["default", "other"])
    layer = model.base_model.model.layer
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model.base_model.model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model.base_model.model(x), rtol=0, atol=1e-6)


def _llama_pair(**config):
    base = make_llama()
    model = get_peft_model(base, sam_peft.SAMConfig(sparsity=0.05, selection="random", seed=0,
                                                    task_type="CAUSAL_LM", **config))
    _randomize_values(model)
    model.train()
    return model, copy.deepcopy(model)


def test_compiled_llama_trains_as_the_eager_one_without_recompiling():
    eager, compiled_model = _llama_pair()
    theta0 = {n: p.detach().clone() for n, p in compiled_model.named_parameters() if not p.requires_grad}
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_model, backend=counter, fullgraph=True)
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
                  for m in (eager, compiled_model)]
    for batch in make_batches(3, batch_size=2):
        inputs = {"input_ids": batch["input_ids"], "labels": batch["input_ids"]}
        losses = []
        for run, optimizer in ((eager, optimizers[0]), (compiled, optimizers[1])):
            optimizer.zero_grad()
            loss = run(**inputs).loss
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        for (name, p), (_, q) in zip(eager.named_parameters(), compiled_model.named_parameters()):
            if p.requires_grad:
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
        for optimizer in optimizers:
            optimizer.step()
    assert counter.frame_count == 1  # new values each step, one graph
    for name, p in compiled_model.named_parameters():  # the base weights were never written
        if not p.requires_grad:
            assert torch.equal(p, theta0[name]), name


def test_compiled_bf16_autocast_matches_eager():
    eager, compiled_model = _llama_pair()
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    ids = torch.randint(1, VOCAB, (2, SEQ))
    results = []
    for run, model in ((eager, eager), (compiled, compiled_model)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = run(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-2, atol=1e-2)
    for name, grad in results[0][1].items():
        assert results[1][1][name].dtype == torch.float32
        torch.testing.assert_close(results[1][1][name], grad, rtol=5e-2, atol=5e-3, msg=name)


def test_compiled_model_follows_disable_and_merge():
    eager, compiled_model = _llama_pair()
    compiled = torch.compile(compiled_model, backend="aot_eager")
    ids = torch.randint(1, VOCAB, (2, SEQ))
    with torch.no_grad():
        with eager.disable_adapter():
            base_logits = eager(input_ids=ids).logits
        tuned = eager(input_ids=ids).logits
        with compiled_model.disable_adapter():
            torch.testing.assert_close(compiled(input_ids=ids).logits, base_logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(compiled(input_ids=ids).logits, tuned, rtol=1e-5, atol=1e-5)
        compiled_model.merge_adapter()
        torch.testing.assert_close(compiled(input_ids=ids).logits, tuned, rtol=1e-5, atol=1e-5)
        compiled_model.unmerge_adapter()
        torch.testing.assert_close(compiled(input_ids=ids).logits, tuned, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", [nn.Linear(48, 40, bias=False), nn.Embedding(60, 48)], ids=["linear", "embedding"])
def test_global_allocation_selection_leaves_no_graph_break(layer):
    torch.manual_seed(0)
    model = get_peft_model(_One(layer), sam_peft.SAMConfig(sparsity=0.1, selection="random", allocation="global",
                                                           seed=0, target_modules=["layer"]))
    x = torch.randint(0, 60, (3, 5)) if isinstance(layer, nn.Embedding) else torch.randn(3, 5, 48)
    explanation = torch._dynamo.explain(model.base_model.model.layer)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_meta_build_then_to_empty_then_load(tmp_path):
    source, _ = _wrapped("linear")
    source.save_pretrained(tmp_path)
    with torch.device("meta"):
        model = get_peft_model(_One(nn.Linear(48, 40)), sam_peft.SAMConfig(sparsity=0.1, target_modules=["layer"]))
    model.to_empty(device="cpu")  # indices hold whatever the memory held: nothing may index with them
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    with torch.no_grad():
        model.base_model.model.layer.base_layer.weight.copy_(source.base_model.model.layer.base_layer.weight)
        model.base_model.model.layer.base_layer.bias.copy_(source.base_model.model.layer.base_layer.bias)
    set_peft_model_state_dict(model, load_file(tmp_path / "adapter_model.safetensors"))
    x = torch.randn(3, 5, 48)
    compiled = torch.compile(model.base_model.model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), source.base_model.model(x), rtol=1e-5, atol=1e-6)
