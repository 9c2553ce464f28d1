"""A crash during training: a run killed right after a checkpoint and resumed from it ends bit-identical to an
uninterrupted run (real subprocesses, SIGKILL), without selecting its entries again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from conftest import ENV
from saved_files import (
    CONFIG_FILE,
    MODEL_FILE,
    decoded_file,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


TRAIN_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys

    import torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    from peft import get_peft_model
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

    import sam_peft

    mode, output_dir, final_dir, report_path = sys.argv[1:5]


    class Data(torch.utils.data.Dataset):
        def __init__(self, n=48, seed=11):
            g = torch.Generator().manual_seed(seed)
            self.ids = torch.randint(1, 100, (n, 8), generator=g)
            self.labels = torch.randint(0, 2, (n,), generator=g)

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long),
                    "labels": self.labels[i]}


    class Crash(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 4:  # right after checkpoint-4 is written: die like a killed process
                os.kill(os.getpid(), signal.SIGKILL)


    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, pad_token_id=0, num_labels=2)
    model = get_peft_model(BertForSequenceClassification(config),
                           sam_peft.SAMConfig(sparsity=0.05, task_type="SEQ_CLS"))
    sam = sam_peft.SAMCallback(burn_in_steps=2, dropout=False)
    args = TrainingArguments(output_dir=output_dir, max_steps=6, save_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, seed=0, data_seed=0,
                             dataloader_num_workers=0, disable_tqdm=True, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=Data(),
                      callbacks=[sam] + ([Crash()] if mode == "crash" else []))
    trainer.train(resume_from_checkpoint=True if mode == "resume" else None)
    model.save_pretrained(final_dir)
    with open(report_path, "w") as f:
        json.dump({"report_is_none": sam.report is None, "global_step": trainer.state.global_step,
                   "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}, f)
    """
)


def _start(script: Path, tmp_path: Path, mode: str, run: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop(ENV, None)
    args = [sys.executable, str(script), mode, str(tmp_path / run), str(tmp_path / f"{run}-final"),
            str(tmp_path / f"{run}-{mode}.json")]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    try:
        return proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    crashed, uninterrupted = _start(script, tmp_path, "crash", "a"), _start(script, tmp_path, "plain", "b")
    crash_log, plain_log = _finish(crashed), _finish(uninterrupted)
    assert crashed.returncode == -signal.SIGKILL, crash_log[-3000:]
    assert uninterrupted.returncode == 0, plain_log[-3000:]
    checkpoints = sorted(p.name for p in (tmp_path / "a").iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"] and not (tmp_path / "a-final").exists()

    resumed = _start(script, tmp_path, "resume", "a")
    resume_log = _finish(resumed)
    assert resumed.returncode == 0, resume_log[-3000:]
    report = json.loads((tmp_path / "a-resume.json").read_text())
    reference = json.loads((tmp_path / "b-plain.json").read_text())
    assert report["report_is_none"], "the resumed run selected its entries again"
    assert not reference["report_is_none"]
    assert report["global_step"] == reference["global_step"] == 6
    assert report["losses"] == reference["losses"]

    final = decoded_file(tmp_path / "a-final" / MODEL_FILE)
    expected = decoded_file(tmp_path / "b-final" / MODEL_FILE)
    assert final.keys() == expected.keys()
    for key in expected:  # bit-identical: indices and values
        assert final[key].dtype == expected[key].dtype and torch.equal(final[key], expected[key]), key
    values = [t for k, t in expected.items() if ".sparsediff_values." in k]
    assert sum(int(torch.count_nonzero(v)) for v in values) > 0  # it really trained
    configs = [json.loads((tmp_path / run / CONFIG_FILE).read_text()) for run in ("a-final", "b-final")]
    assert configs[0]["counts"] == configs[1]["counts"]
    assert configs[0]["base_fingerprint"] == configs[1]["base_fingerprint"]
