"""Serving many task deltas on one base: mixed-adapter batches (peft's `adapter_names`) against one adapter, SAM
against LoRA at an equal number of tuned entries, and the cost of switching a delta in place.

Two workloads: the packaged MiniLM encoder (a batch of sequences, one forward) and a random-init Llama-shaped
decoder (`generate`, greedy). For N ∈ {1, 2, 4, 8} adapters on the same linear layers, the requests of a batch are
spread uniformly over the adapters (row i uses adapter i mod N). SAM adapters keep p = 0.005 of each targeted
weight (random entries: the serving cost does not depend on how they were chosen); LoRA gets the rank whose
parameter count is closest to SAM's k. Methods and settings alternate within each round; medians of the rounds.

    python benchmarks/serving.py [--device cpu] [--threads 1] [--rounds 15] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

COUNTS = (1, 2, 4, 8)
SPARSITY = 0.005


@dataclass(frozen=True)
class Workload:
    name: str
    targets: list[str]
    batch: int
    length: int
    new_tokens: int  # 0: one forward


def _minilm(device: str) -> nn.Module:
    from transformers import AutoModel

    from sam_peft.training import default_model_path

    return AutoModel.from_pretrained(default_model_path()).to(device).eval()


def _llama(device: str) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=4, pad_token_id=0, eos_token_id=None)
    return tf.LlamaForCausalLM(config).to(device).eval()


WORKLOADS = {
    "minilm": (Workload("minilm encoder forward", ["query", "key", "value", "dense"], 32, 64, 0), _minilm),
    "llama": (Workload("tiny-Llama generate", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"], 8, 16, 16), _llama),
}


def _adapters(method: str, base: nn.Module, workload: Workload, n: int, rank: int | None):
    """A PeftModel holding `n` adapters task0..task{n-1} with non-zero deltas; (model, tuned entries per adapter)."""
    from peft import LoraConfig, get_peft_model

    import sam_peft
    from sam_peft.tuner.targets import targets

    def config(i: int):
        if method == "lora":
            return LoraConfig(r=rank, target_modules=workload.targets, init_lora_weights=False)
        return sam_peft.SparseDiffConfig(sparsity=SPARSITY, selection="random", seed=i,
                                         target_modules=workload.targets)

    model = get_peft_model(base, config(0), adapter_name="task0")
    for i in range(1, n):
        model.add_adapter(f"task{i}", config(i))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i in range(n):
            if method == "sam":
                for t in targets(model, f"task{i}"):
                    t.values.copy_(0.01 * torch.randn(t.values.shape, generator=generator))
    model.set_adapter("task0")
    model.eval()
    tuned = sum(p.numel() for name, p in model.named_parameters() if ".task0." in name or name.endswith(".task0"))
    return model, tuned


def _lora_side(base: nn.Module, workload: Workload) -> int:
    """Σ (in + out) over the targeted linear layers: LoRA's parameters per unit of rank."""
    return sum(m.in_features + m.out_features for name, m in base.named_modules()
               if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in workload.targets)


def _run(model, workload: Workload, ids: torch.Tensor, names: list[str] | None) -> None:
    kwargs = {} if names is None else {"adapter_names": names}
    with torch.no_grad():
        if workload.new_tokens:
            model.generate(input_ids=ids, max_new_tokens=workload.new_tokens, do_sample=False, **kwargs)
        else:
            model(input_ids=ids, **kwargs)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_workload(key: str, device: str, rounds: int) -> list[dict]:
    workload, build = WORKLOADS[key]
    ids = torch.randint(3, 1000, (workload.batch, workload.length), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    rows = []
    for n in COUNTS:
        base = build(device)
        side = _lora_side(base, workload)
        sam, sam_k = _adapters("sam", base, workload, n, None)
        rank = max(1, round(sam_k / side))
        lora, lora_k = _adapters("lora", build(device), workload, n, rank)
        names = [f"task{i % n}" for i in range(workload.batch)]
        cases = {(m, mode): (model, None if mode == "single" else names)
                 for m, model in (("sam", sam), ("lora", lora)) for mode in ("single", "mixed")}
        for model, batch_names in cases.values():  # warm-up
            _run(model, workload, ids, batch_names)
        times: dict = {case: [] for case in cases}
        for _ in range(rounds):
            for case, (model, batch_names) in cases.items():
                _sync(device)
                start = time.perf_counter()
                _run(model, workload, ids, batch_names)
                _sync(device)
                times[case].append(time.perf_counter() - start)
        med = {case: statistics.median(t) for case, t in times.items()}
        rows.append({
            "workload": workload.name, "adapters": n, "batch": workload.batch, "length": workload.length,
            "new_tokens": workload.new_tokens, "sam_entries": sam_k, "lora_rank": rank, "lora_params": lora_k,
            **{f"{m}_{mode}_s": med[(m, mode)] for m, mode in cases},
            "sam_mixed_over_single": med[("sam", "mixed")] / med[("sam", "single")],
            "lora_mixed_over_single": med[("lora", "mixed")] / med[("lora", "single")],
            "sam_mixed_throughput_over_lora": med[("lora", "mixed")] / med[("sam", "mixed")],
        })
        print(_format(rows[-1]), flush=True)
    return rows


def bench_switch(device: str, rounds: int) -> dict:
    """Per-switch cost on MiniLM: SparseDelta apply/remove in place, hot-swapping a loaded adapter, and LoRA's
    merge/unmerge (the in-place analogue for LoRA)."""
    import sam_peft
    from sam_peft import SparseDelta

    workload, build = WORKLOADS["minilm"]
    sam, _ = _adapters("sam", build(device), workload, 2, None)
    deltas = [SparseDelta.from_peft(sam, f"task{i}") for i in range(2)]
    plain = build(device)
    rank = max(1, round(deltas[0].num_entries / _lora_side(plain, workload)))
    for delta in deltas:  # the fingerprint is checked (and cached) on the first apply
        delta.apply_to(plain)
        delta.remove_from(plain)
    lora, _ = _adapters("lora", build(device), workload, 1, rank)
    timings: dict[str, list[float]] = {"apply": [], "remove": [], "hotswap": [], "lora_merge": [], "lora_unmerge": []}

    def timed(key: str, fn) -> None:
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        timings[key].append(time.perf_counter() - start)

    for r in range(rounds):
        delta, other = deltas[r % 2], deltas[(r + 1) % 2]
        timed("apply", lambda d=delta: d.apply_to(plain))
        timed("remove", lambda d=delta: d.remove_from(plain))
        timed("hotswap", lambda d=other: sam_peft.hotswap_adapter(sam, d, "task0"))
        timed("lora_merge", lambda: lora.merge_adapter())
        timed("lora_unmerge", lambda: lora.unmerge_adapter())
    result = {f"{k}_ms": 1000 * statistics.median(v) for k, v in timings.items()}
    result["entries"] = deltas[0].num_entries
    print("switch (MiniLM, {entries} entries): apply {apply_ms:.2f} ms, remove {remove_ms:.2f} ms, hot-swap "
          "{hotswap_ms:.2f} ms; LoRA merge {lora_merge_ms:.2f} ms, unmerge {lora_unmerge_ms:.2f} ms".format(**result),
          flush=True)
    return result


def _format(row: dict) -> str:
    return (f"{row['workload']}, N={row['adapters']}: SAM single {1000 * row['sam_single_s']:.1f} ms, mixed "
            f"{1000 * row['sam_mixed_s']:.1f} ms ({row['sam_mixed_over_single']:.2f}×); LoRA r={row['lora_rank']} "
            f"single {1000 * row['lora_single_s']:.1f} ms, mixed {1000 * row['lora_mixed_s']:.1f} ms "
            f"({row['lora_mixed_over_single']:.2f}×); SAM/LoRA mixed throughput "
            f"{row['sam_mixed_throughput_over_lora']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    result = {"command": "python benchmarks/serving.py " + " ".join(sys.argv[1:]),
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "threads": args.threads, "rounds": args.rounds, "torch": torch.__version__, "rows": []}
    for key in args.workloads:
        result["rows"] += bench_workload(key, args.device, args.rounds)
    result["switch"] = bench_switch(args.device, args.rounds)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
