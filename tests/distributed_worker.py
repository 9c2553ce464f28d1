"""One rank of the 2-process checks in test_distributed.py: `python distributed_worker.py SCENARIO RANK PORT OUT TMP`.

Scenarios: "fsdp" (selection under FSDP2, sharded training, save and load), "ddp" (selection options and
Trainer + DDP + SAMCallback) and "all" (both, to OUT.fsdp and OUT.ddp). Each writes what the parent compares with
a one-process run.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import sam_peft  # noqa: E402

VOCAB, SEQ, BATCH, SPARSITY = 100, 8, 4, 0.02

# (selection, allocation, max_grad_norm, statistics_dtype)
FSDP_CASES = [
    ("sam", "per_tensor", None, "float32"),
    ("sam", "global", None, "float32"),
    ("fisher", "global", None, "float32"),
    ("sam", "global", 0.05, "float32"),
    ("sam", "per_tensor", 0.05, "bfloat16"),
]
DDP_CASES = [("sam", "global", 0.05, "float32"), ("fisher", "per_tensor", 0.05, "bfloat16")]


# --------------------------------------------------------------------------- helpers (shared with the parent)


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, type_vocab_size=2, num_labels=2)
    return BertForSequenceClassification(config).eval()


def make_batches(n: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        mask = torch.ones(BATCH, SEQ, dtype=torch.long)
        mask[0, SEQ - 2 :] = 0  # some padding, so attention masks matter
        batches.append({"input_ids": torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), "attention_mask": mask,
                        "labels": torch.randint(0, 2, (BATCH,), generator=g)})
    return batches


def peft_model(base, **kwargs):
    from peft import get_peft_model

    kwargs.setdefault("sparsity", SPARSITY)
    return get_peft_model(copy.deepcopy(base), sam_peft.SAMConfig(task_type="SEQ_CLS", **kwargs))


def tuned_params(base) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in base.named_parameters() if not n.startswith("classifier.")]


def assert_same_indices(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected)
    for name in expected:
        assert torch.equal(actual[name].long(), expected[name].long()), name


def trainer(model, out_dir, callback, **overrides):
    """A Trainer on a list of examples (no `datasets` needed), 3 steps, no evaluation or checkpoints."""
    from transformers import Trainer, TrainingArguments

    rows = [{k: v[i] for k, v in batch.items()} for batch in make_batches(8, seed=11) for i in range(BATCH)]
    kwargs = dict(output_dir=str(out_dir), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                  weight_decay=0.1, report_to=[], disable_tqdm=True, save_strategy="no", seed=0)
    kwargs.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**kwargs), train_dataset=rows, callbacks=[callback])


def uneven_bert():
    """A tiny BERT whose embedding rows (101, 63) do not split evenly over 2 ranks."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=63, type_vocab_size=3, num_labels=2)
    return BertForSequenceClassification(config).eval()


def step_batches(rank: int | None, steps: int = 2) -> list[dict[str, torch.Tensor]]:
    """Burn-in batches: at step s rank r gets batch 2s + r; `rank=None` gives both ranks' batches of a step as one."""
    batches = make_batches(2 * steps, seed=7)
    if rank is not None:
        return [batches[2 * s + rank] for s in range(steps)]
    return [{k: torch.cat([batches[2 * s][k], batches[2 * s + 1][k]]) for k in batches[0]} for s in range(steps)]


def shard(model) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)


def run_fsdp(rank: int, out: str, tmp: Path) -> None:
    from torch.distributed.tensor import DTensor

    base = tiny_bert()
    result = {"selected": {}}
    for case in FSDP_CASES:
        kind, allocation, clip, dtype = case
        model = peft_model(base, allocation=allocation)
        shard(model)
        sam_peft.select_parameters(model, step_batches(rank), dropout=False, progress=False, selection=kind,
                                   max_grad_norm=clip, statistics_dtype=dtype)
        result["selected"][case] = sam_peft.selected_indices(model)
    for allocation in ("global", "per_tensor"):  # shards of unequal length
        model = peft_model(uneven_bert(), allocation=allocation)
        shard(model)
        sam_peft.select_parameters(model, step_batches(rank), dropout=False, progress=False)
        result["selected"][("uneven", allocation)] = sam_peft.selected_indices(model)
    # the last global model trains sharded, saves from every rank, and loads again
    model = peft_model(base, allocation="global")
    shard(model)
    sam_peft.select_parameters(model, step_batches(rank), dropout=False, progress=False)
    values = [p for n, p in model.named_parameters() if "sparsediff_values" in n and p.numel() > 0]
    assert values and all(isinstance(v, DTensor) for v in values)
    result["local_numel"] = sum(v.to_local().numel() for v in values)
    result["numel"] = sum(v.numel() for v in values)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    assert not any(not p.requires_grad for p in values)
    for batch in step_batches(rank, 3):
        model.train()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    base_grads = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not base_grads, base_grads
    model.eval()
    probe = make_batches(1, seed=9)[0]
    with torch.no_grad():
        logits = model(**probe).logits
    model.save_pretrained(str(tmp / "saved"), is_main_process=rank == 0)
    dist.barrier()
    result["logits"] = logits
    result["values"] = {n: p.full_tensor() for n, p in model.named_parameters() if "sparsediff_values" in n}
    # loading: from the file on every rank, then sharded again
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp / "saved"), is_trainable=True)
    shard(loaded)
    loaded.eval()
    with torch.no_grad():
        result["loaded_logits"] = loaded(**probe).logits
    result["loaded_selected"] = sam_peft.selected_indices(loaded)
    torch.save(result, out)


def run_ddp(rank: int, out: str, tmp: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel

    base = tiny_bert()
    result = {"selected": {}, "trainer": {}}
    for case in DDP_CASES:
        kind, allocation, clip, dtype = case
        model = peft_model(base, allocation=allocation)
        # built before the selection: the values change length (global) or trainability (empty ones) under it
        wrapped = DistributedDataParallel(model)
        sam_peft.select_parameters(wrapped, step_batches(rank), dropout=False, progress=False, selection=kind,
                                   max_grad_norm=clip, statistics_dtype=dtype)
        result["selected"][case] = sam_peft.selected_indices(model)
        wrapped(**step_batches(rank)[0]).loss.backward()  # DDP still reduces the (resized) values' gradients
        result.setdefault("grads", {})[case] = torch.cat(
            [p.grad.reshape(-1) for n, p in model.named_parameters() if "sparsediff_values" in n and p.numel()])
    for allocation in ("global", "per_tensor"):
        model = peft_model(base, allocation=allocation)
        callback = sam_peft.SAMCallback(burn_in_steps=2, dropout=False)
        run = trainer(model, tmp / f"run-{allocation}-{rank}", callback, use_cpu=True, ddp_backend="gloo")
        run.train()
        result["trainer"][allocation] = {
            "ddp": isinstance(run.model_wrapped, DistributedDataParallel),
            "selected": sam_peft.selected_indices(model),
            "values": {n: p.detach().clone() for n, p in model.named_parameters() if "sparsediff_values" in n},
        }
    torch.save(result, out)


def run_trainer_fsdp(rank: int, out: str, tmp: Path) -> None:
    """Trainer + accelerate's FSDP2 plugin + SAMCallback (global allocation, clipping); needs accelerators."""
    from torch.distributed.tensor import DTensor
    rank = int(os.environ.get("RANK", rank))
    model = peft_model(tiny_bert(), allocation="global")
    callback = sam_peft.SAMCallback(burn_in_steps=2, dropout=False, max_grad_norm=1.0)
    run = trainer(model, tmp / "fsdp-trainer", callback, fsdp="full_shard",
                  fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]})
    run.train()
    values = {n: p for n, p in run.model.named_parameters() if "sparsediff_values" in n and p.numel()}
    assert values and all(isinstance(v, DTensor) for v in values.values()), [type(v) for v in values.values()]
    run.model.save_pretrained(str(tmp / "fsdp-trainer-saved"), is_main_process=rank == 0)
    full = {n: v.full_tensor().cpu() for n, v in values.items()}
    if rank == 0:
        torch.save({"selected": sam_peft.selected_indices(run.model), "k": callback.report.selected,
                    "values": full}, out)


def main() -> None:
    scenario, rank, port, out, tmp = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], Path(sys.argv[5])
    torch.set_num_threads(1)
    if scenario == "trainer_fsdp":  # launched by torchrun on accelerators: the Trainer sets the process group up
        run_trainer_fsdp(rank, out, tmp)
        return
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        if scenario == "all":  # both in one launch (the start-up of two processes costs more than the checks)
            run_fsdp(rank, out + ".fsdp", tmp)
            run_ddp(rank, out + ".ddp", tmp)
        else:
            {"fsdp": run_fsdp, "ddp": run_ddp}[scenario](rank, out, tmp)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
