"""Decoder LMs: default targets leave the output head out, TRL's SFTTrainer trains with the defaults, gradient
checkpointing (reentrant and not), and examples/sft_with_trl.py runs. A tiny random Llama built in code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import llama_config
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

import sam_peft
from sam_peft.tuner.layer import SparseDiffLayer
from sam_peft.tuner.targets import tuner_of

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 64


def tiny_llama_config(tie: bool = False) -> LlamaConfig:
    """conftest's tiny Llama with a 64-token vocabulary (the tokenizer built below) and bos 1."""
    return llama_config(vocab_size=VOCAB, bos_token_id=1, tie_word_embeddings=tie)


def tiny_llama(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(tie))


def wrapped_names(model) -> set[str]:
    return {name.removeprefix("base_model.model.") for name, m in model.named_modules()
            if isinstance(m, SparseDiffLayer)}


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("task_type", ["CAUSAL_LM", None])
def test_default_targets_leave_out_the_output_head(tie, task_type):
    model = get_peft_model(tiny_llama(tie), sam_peft.SparseDiffConfig(sparsity=0.05, task_type=task_type))
    names = wrapped_names(model)
    assert "lm_head" not in names
    assert not isinstance(model.get_output_embeddings(), SparseDiffLayer)
    assert "model.layers.0.self_attn.q_proj" in names and "model.norm" in names
    assert ("model.embed_tokens" in names) is not tie  # a tied weight is never tuned


def test_output_head_can_still_be_targeted_by_name():
    model = get_peft_model(tiny_llama(), sam_peft.SparseDiffConfig(sparsity=0.05, target_modules=["lm_head"]))
    assert wrapped_names(model) == {"lm_head"}


def test_sequence_classification_head_is_dense_and_lm_head_free():
    torch.manual_seed(0)
    config = tiny_llama_config()
    config.num_labels = 3
    model = get_peft_model(LlamaForSequenceClassification(config),
                           sam_peft.SparseDiffConfig(sparsity=0.05, task_type="SEQ_CLS"))
    assert "score" not in wrapped_names(model)
    assert "model.layers.1.mlp.down_proj" in wrapped_names(model)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def _texts(n: int = 24) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 4, (12,), generator=gen)) for _ in range(n)]


def _sft(tmp_path, *, bf16: bool = False, gradient_checkpointing: bool = False, reentrant: bool = False):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    model = tiny_llama()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    kwargs = {}
    if gradient_checkpointing:
        kwargs = dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=4, per_device_train_batch_size=4,
                         learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                         bf16=bf16, max_length=32, disable_tqdm=True, dataloader_num_workers=0, **kwargs)
    trainer = trl.SFTTrainer(model, args=args, train_dataset=Dataset.from_dict({"text": _texts()}),
                             processing_class=_tokenizer(), peft_config=sam_peft.SAMConfig(task_type="CAUSAL_LM"),
                             callbacks=[sam_peft.SAMCallback(burn_in_steps=2)])
    trainer.train()
    peft_model = trainer.model
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    tuner = tuner_of(peft_model)
    counts = tuner.peft_config["default"].counts
    assert counts and sum(counts.values()) > 0 and not any(k.startswith("lm_head") for k in counts)
    # only the selected entries moved: the base weights are untouched, the deltas are non-zero
    for name, param in peft_model.get_base_model().named_parameters():
        if "sparsediff_" in name:
            continue
        key = name.replace(".base_layer", "")
        assert torch.equal(param.detach().cpu(), base[key]), name
    trained = sum(int((v != 0).sum()) for n, v in peft_model.named_parameters() if "sparsediff_values" in n)
    assert 0 < trained <= sum(counts.values())
    return trainer


def test_sft_trainer_trains_with_the_defaults(tmp_path):
    _sft(tmp_path)


def test_sft_trainer_trains_in_bf16(tmp_path):
    _sft(tmp_path, bf16=True)  # CPU autocast bf16 here; the values and their gradients stay fp32


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_sft_trainer_with_gradient_checkpointing(tmp_path, reentrant):
    _sft(tmp_path, gradient_checkpointing=True, reentrant=reentrant)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = get_peft_model(tiny_llama(), sam_peft.SparseDiffConfig(sparsity=0.05, task_type="CAUSAL_LM",
                                                                        init_weights=False))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()  # reentrant checkpoints need an input that requires grad
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_sft_example_runs(tmp_path):
    pytest.importorskip("trl")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "sft_with_trl.py"), "--max-steps", "3",
                             "--output", str(tmp_path / "sft")], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert (tmp_path / "sft" / "adapter" / "adapter_model.safetensors").exists()
    assert "reloaded" in result.stdout
