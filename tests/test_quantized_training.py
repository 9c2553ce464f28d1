"""The QLoRA-style path with SAM: a 4-bit base prepared with peft's prepare_model_for_kbit_training, gradient
checkpointing, the burn-in by SAMCallback, training by transformers' Trainer and TRL's SFTTrainer; and the
example runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model, prepare_model_for_kbit_training
from quantized_models import VOCAB, batches, load_quantized, save_float_llama

import sam_peft
from sam_peft.tuner.targets import targets

pytestmark = pytest.mark.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def float_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    save_float_llama(path)
    return path


def _check_trained(trainer, steps: int) -> None:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == steps and all(torch.isfinite(torch.tensor(losses)))
    found = targets(trainer.model, "default")
    assert trainer.model.peft_config["default"].base_quantization["quant_type"] == "nf4"
    moved = [t for t in found if t.quantized and t.values.numel() and bool((t.values != 0).any())]
    assert moved, "no quantized layer's values changed"


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_trainer_with_sam_callback_on_4bit_base(float_path, tmp_path, reentrant):
    from transformers import Trainer, TrainingArguments

    model = prepare_model_for_kbit_training(load_quantized(float_path, "nf4"), use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model = get_peft_model(model, sam_peft.SAMConfig(task_type="CAUSAL_LM", sparsity=0.01))
    data = [{k: v[i] for k, v in b.items()} for b in batches(4) for i in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model, args=args, train_dataset=data, callbacks=[sam_peft.SAMCallback(burn_in_steps=2)])
    trainer.train()
    _check_trained(trainer, 3)


def test_sft_trainer_on_4bit_base_in_bf16(float_path, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 4, (12,), generator=g)) for _ in range(16)]
    model = prepare_model_for_kbit_training(load_quantized(float_path, "nf4"), use_gradient_checkpointing=True)
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                         logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=True, max_length=32,
                         disable_tqdm=True, dataloader_num_workers=0, gradient_checkpointing=True)
    trainer = trl.SFTTrainer(model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                             processing_class=tokenizer,
                             peft_config=sam_peft.SAMConfig(task_type="CAUSAL_LM", sparsity=0.01),
                             callbacks=[sam_peft.SAMCallback(burn_in_steps=2)])
    trainer.train()
    _check_trained(trainer, 3)
    assert all(t.values.dtype == torch.float32 for t in targets(trainer.model, "default"))


def test_qlora_style_example_runs(tmp_path):
    pytest.importorskip("trl")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "qlora_style_sft.py"), "--max-steps", "3",
                             "--output", str(tmp_path / "sft")], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reloaded on the unquantized base" in result.stdout


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_burn_in_under_gradient_checkpointing_selects_the_same(float_path, reentrant):
    """Checkpointing recomputes each layer's forward in backward: each weight gradient is still folded once."""
    chosen = []
    for checkpointing in (False, True):
        model = load_quantized(float_path, "nf4")
        if checkpointing:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                    gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model = get_peft_model(model, sam_peft.SAMConfig(task_type="CAUSAL_LM", sparsity=0.01))
        sam_peft.select_parameters(model, batches(2), progress=False, dropout=False)
        chosen.append(sam_peft.selected_indices(model))
    for name in chosen[0]:
        assert torch.equal(chosen[0][name], chosen[1][name]), name
