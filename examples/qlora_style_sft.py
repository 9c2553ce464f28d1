"""SAM sparse fine-tuning on a 4-bit base, the QLoRA way: bitsandbytes NF4 weights, bf16 compute, TRL's SFTTrainer.

    pip install -e ".[dev]"                        # trl, bitsandbytes and torchao are in the dev extra
    python examples/qlora_style_sft.py             # a tiny random Llama on the CPU, a few steps (a smoke run)
    python examples/qlora_style_sft.py --model meta-llama/Llama-3.2-1B --dataset trl-lib/Capybara --max-steps 200

Reads top to bottom: load the base quantized to NF4, prepare it for k-bit training (gradient checkpointing, float32
norms), let SFTTrainer wrap it with a SAM adapter, run the burn-in with SAMCallback (each quantized layer's weight
gradient is folded into the statistics in its backward: no weight gradient is ever held), train the fp32 values of
the selected entries, save the sparse delta, and reload it on the unquantized base, as QLoRA results are deployed
(the delta records the base's quantization, so the float base is recognised as the same checkpoint).
"""

import argparse
import tempfile

import torch
from datasets import Dataset, load_dataset
from peft import PeftModel, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from trl import SFTConfig, SFTTrainer

import sam_peft

parser = argparse.ArgumentParser()
parser.add_argument("--model", help="causal LM path or hub id (default: a tiny random Llama built here)")
parser.add_argument("--dataset", help="hub dataset with a 'text' or 'messages' column (default: random words)")
parser.add_argument("--max-steps", type=int, default=20)
parser.add_argument("--burn-in-steps", type=int, default=4)
parser.add_argument("--sparsity", type=float, default=0.005)
parser.add_argument("--max-statistics-gib", type=float,
                    help="burn-in in several passes, each holding at most this many GiB of statistics")
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--max-length", type=int, default=512)
parser.add_argument("--output", default="out/example-qlora-style")
args = parser.parse_args()
gpu = torch.cuda.is_available()


def tiny_random_llama(path: str) -> PreTrainedTokenizerFast:
    """Save a 2-layer Llama with random weights to `path` (to load it quantized, as from the hub); return a
    word-level tokenizer over 60 made-up words (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(60)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(words), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return tokenizer


model_path = args.model or tempfile.mkdtemp(prefix="tiny-llama-")
tokenizer = AutoTokenizer.from_pretrained(args.model) if args.model else tiny_random_llama(model_path)
quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=quantization,
                                             dtype=torch.bfloat16 if gpu else torch.float32)
model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)

if args.dataset:
    train = load_dataset(args.dataset, split="train")
else:
    generator = torch.Generator().manual_seed(0)
    train = Dataset.from_dict({"text": [" ".join(f"w{int(i)}" for i in torch.randint(0, 60, (16,), generator=generator))
                                        for _ in range(64)]})

statistics_budget = int(args.max_statistics_gib * 2**30) if args.max_statistics_gib else None
trainer = SFTTrainer(
    model,
    args=SFTConfig(output_dir=f"{args.output}/checkpoints", max_steps=args.max_steps, learning_rate=1e-3,
                   per_device_train_batch_size=args.batch_size, logging_steps=5, save_strategy="no", report_to=[],
                   bf16=True, use_cpu=not gpu, max_length=args.max_length, gradient_checkpointing=True, seed=0),
    train_dataset=train,
    processing_class=tokenizer,
    peft_config=sam_peft.SAMConfig(sparsity=args.sparsity, task_type="CAUSAL_LM"),
    # burn-in at θ0 (in several passes under a statistics budget), then the top p only
    callbacks=[sam_peft.SAMCallback(burn_in_steps=args.burn_in_steps, max_statistics_bytes=statistics_budget)],
)
trainer.train()
trainer.model.print_trainable_parameters()
print("base quantization:", {k: v for k, v in trainer.model.peft_config["default"].base_quantization.items()
                             if k != "parameters"})

trainer.model.save_pretrained(f"{args.output}/adapter")  # indices + values: the sparse delta
tokenizer.save_pretrained(f"{args.output}/adapter")
base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16 if gpu else torch.float32)
reloaded = PeftModel.from_pretrained(base, f"{args.output}/adapter")
entries = sum(idx.numel() for idx in sam_peft.selected_indices(reloaded).values())
print(f"reloaded on the unquantized base: {entries:,} entries on {len(sam_peft.selected_indices(reloaded))} tensors")
