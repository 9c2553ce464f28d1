"""SAM on a 4-bit (NF4) Llama against QLoRA: peak memory and step time, and SAM's burn-in in one pass and under a
statistics budget (issue 23, item 6).

    OMP_NUM_THREADS=1 python benchmarks/quantized.py --json benchmarks/results/quantized-cpu.json
    python benchmarks/quantized.py --device cuda --batch-size 4 --seq 512 --json benchmarks/results/quantized-cuda.json

A Llama-shaped model with random weights (hidden 1024, 24 layers, FFN 2816, 16 heads, vocab 32000, untied
embeddings: 373,867,520 parameters) is saved once in bf16 and loaded by every method with
`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)`, then
`prepare_model_for_kbit_training` (non-reentrant gradient checkpointing, which a burn-in in several passes needs;
norms and embeddings in fp32). Each method runs in a
process of its own:

- `qlora`: peft LoRA r=16, alpha 32, no dropout, `target_modules="all-linear"`; AdamW; training steps.
- `sam`: `SAMConfig(task_type="CAUSAL_LM", sparsity=0.005)` (every parameter but lm_head), a one-pass burn-in of
  `--burn-in-steps` batches, then training steps (AdamW on the fp32 values).
- `burnin`: the burn-in alone, one pass (the statistics of every target at once).
- `burnin_budget`: the same burn-in with `max_statistics_bytes` set for `--passes` passes; its selection must equal
  the one-pass selection (torch.equal on every tensor's indices).
- `burnin_bf16`: the one-pass burn-in on the unquantized model, every weight in bf16 (gradient checkpointing), for
  reference.

Steps and burn-ins run under bf16 autocast (as a Trainer with `bf16=True`, and SAMCallback, run them), on random
token batches (labels = inputs). Each training step is forward, backward, optimizer step, zero_grad; the step time is
the median of `--steps` steps after `--warmup` steps.

What "peak" means. On CUDA: `torch.cuda.max_memory_allocated` during the phase (live tensors), reported absolute and
above the allocation after loading. On the CPU: the process's resident set high-water mark (VmHWM of
/proc/self/status) during the phase, reset through /proc/self/clear_refs when the phase starts, reported absolute
and above the resident set after loading and preparing the model (after gc and malloc_trim). glibc keeps freed
blocks of up to 32 MiB for reuse and the resident set then grows with fragmentation, not with live tensors; so on
the CPU each method runs twice: a `memory` run with `MALLOC_MMAP_THRESHOLD_=65536` (every block above 64 KiB is
mapped and unmapped, so the resident set follows the live tensors; the peaks come from this run) and a `time` run
with glibc's defaults (the times come from this run: the mapping costs page faults, which a caching GPU allocator
does not). CPU times are given as wall seconds and as the process's CPU seconds (`time.process_time`), the latter
less sensitive to other jobs on a shared machine; one thread (`--threads`, `torch.set_num_threads`). The timing
runs of `qlora` and `sam` are repeated (`--repeats`, alternating) and the medians taken over all their timed steps.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

METHODS = ("qlora", "sam", "burnin", "burnin_budget", "burnin_bf16")
RESULT = "RESULT "


# --------------------------------------------------------------------------------------------- the model and data
def build_model(args, path: Path) -> int:
    """Save a random-init Llama of the requested shape to `path` in bf16; return its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=max(2048, args.seq),
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def load_model(args, quantized: bool):
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    kwargs = {"dtype": torch.bfloat16}
    if args.device == "cuda":
        kwargs["device_map"] = {"": 0}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM.from_pretrained(args.model_dir, **kwargs)
    if quantized:
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
    # the bf16 reference: every weight in bf16, frozen, gradient checkpointing as prepare_model_for_kbit_training sets
    for param in model.parameters():
        param.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return model


def batches(args, count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, args.vocab, (args.batch_size, args.seq), generator=generator).to(args.device)
        out.append({"input_ids": ids, "labels": ids})
    return out


# --------------------------------------------------------------------------------------------- measuring
class Meter:
    """Peak memory of one phase (see the module docstring) and the baseline after loading."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.baseline = 0

    def _rss(self, key: str) -> int:
        status = Path("/proc/self/status").read_text()
        return int(re.search(rf"^{key}:\s+(\d+) kB", status, re.M).group(1)) * 1024

    def _settle(self) -> None:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
        else:
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL("libc.so.6").malloc_trim(0)

    def current(self) -> int:
        return torch.cuda.memory_allocated() if self.device == "cuda" else self._rss("VmRSS")

    def set_baseline(self) -> int:
        self._settle()
        self.baseline = self.current()
        return self.baseline

    def start(self) -> None:
        """Start a phase: the peak counts from here."""
        self._settle()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set

    def peak(self) -> dict[str, int]:
        if self.device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = self._rss("VmHWM")
        self._settle()
        return {"peak_bytes": peak, "peak_above_loaded_bytes": peak - self.baseline,
                "held_after_bytes": self.current() - self.baseline}


def autocast(args):
    return torch.autocast(args.device, dtype=torch.bfloat16)


def sync(args) -> None:
    if args.device == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------- one method
def statistics_budget(model, passes: int) -> tuple[int, int]:
    """(all of SAM's fp32 statistics in bytes, a max_statistics_bytes that splits them into `passes` passes)."""
    from sam_peft.burnin.passes import plan_passes, statistics_bytes
    from sam_peft.ranking.signals import signal_named
    from sam_peft.tuner.targets import targets

    found = targets(model, "default")
    signal = signal_named("sam")
    sizes = [statistics_bytes(t, signal, torch.float32, False) for t in found]
    budget = max(math.ceil(sum(sizes) / passes), max(sizes))
    while len(plan_passes(found, signal, torch.float32, False, budget)) > passes:
        budget += max(sizes) // 16
    return sum(sizes), budget


def burn_in(args, model, meter: Meter, method: str) -> dict:
    import sam_peft

    total, budget = statistics_budget(model, args.passes)
    data = batches(args, args.burn_in_steps, seed=1)
    meter.start()
    wall, cpu = time.perf_counter(), time.process_time()
    with autocast(args):
        report = sam_peft.select_parameters(model, data, progress=False,
                                            max_statistics_bytes=budget if method == "burnin_budget" else None)
    sync(args)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    out = meter.peak() | {
        "seconds": wall, "cpu_seconds": cpu, "passes": report.passes, "batches": args.burn_in_steps,
        "seconds_per_batch_pass": wall / (args.burn_in_steps * report.passes),
        "statistics_bytes_held": report.statistics_bytes, "statistics_bytes_all": total,
        "max_statistics_bytes": budget if method == "burnin_budget" else None,
        "selected": report.selected, "targeted": report.total,
    }
    torch.save({k: v.cpu() for k, v in sam_peft.selected_indices(model).items()},
               Path(args.model_dir) / f"selected-{method}-{args.mode}.pt")
    return out


def train(args, model, meter: Meter, steps: int) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    data = batches(args, args.warmup + steps, seed=2)
    model.train()
    meter.start()
    walls, cpus, losses = [], [], []
    for batch in data:
        sync(args)
        wall, cpu = time.perf_counter(), time.process_time()
        with autocast(args):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(args)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        losses.append(loss.item())
    out = meter.peak() | {
        "trainable": sum(p.numel() for p in params), "steps_timed": steps, "warmup": args.warmup,
        "step_seconds_median": statistics.median(walls[args.warmup:]),
        "step_cpu_seconds_median": statistics.median(cpus[args.warmup:]),
        "step_seconds": walls, "step_cpu_seconds": cpus, "losses": losses,
    }
    if args.profile:
        out["profile"] = profile_step(args, model, optimizer, data[-1])
    return out


def profile_step(args, model, optimizer, batch) -> str:
    """torch.profiler table of one more training step: the top ops by self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as prof:
        with autocast(args):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(args)
    key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=args.profile)


def worker(args) -> dict:
    from peft import LoraConfig, get_peft_model

    import sam_peft

    method = args.worker
    torch.set_num_threads(args.threads)
    meter = Meter(args.device)
    wall = time.perf_counter()
    model = load_model(args, quantized=method != "burnin_bf16")
    result = {"method": method, "mode": args.mode, "load_seconds": time.perf_counter() - wall,
              "loaded_bytes": meter.set_baseline()}
    if method == "qlora":
        config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules="all-linear",
                            task_type="CAUSAL_LM")
    else:
        config = sam_peft.SAMConfig(task_type="CAUSAL_LM", sparsity=args.sparsity,
                                    exclude_modules=args.sam_exclude or None)
    model = get_peft_model(model, config)
    if method != "qlora":
        result["burn_in"] = burn_in(args, model, meter, method)
    if method in ("qlora", "sam"):
        result["train"] = train(args, model, meter, args.steps if args.mode != "memory" else 1)
    return result


# --------------------------------------------------------------------------------------------- the driver
def run_worker(args, method: str, mode: str) -> dict:
    root = str(Path(__file__).resolve().parents[1])  # the workers measure this tree's sam_peft
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])]))
    if mode == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    command = [sys.executable, __file__, "--worker", method, "--mode", mode, "--model-dir", str(args.model_dir)]
    for key in ("device", "vocab", "hidden", "layers", "intermediate", "heads", "batch_size", "seq", "warmup",
                "steps", "burn_in_steps", "sparsity", "lora_r", "passes", "threads", "profile", "sam_exclude"):
        command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode or not lines:
        sys.stderr.write(done.stderr[-5000:])
        raise SystemExit(f"{method} ({mode}) failed with exit code {done.returncode}")
    result = json.loads(lines[-1][len(RESULT):])
    print(f"{method:14s} {mode:7s} {json.dumps(_brief(result))}", flush=True)
    return result


def _brief(result: dict) -> dict:
    out = {"loaded_MiB": round(result["loaded_bytes"] / 2**20)}
    for phase in ("burn_in", "train"):
        if phase in result:
            p = result[phase]
            out[phase] = {"peak_MiB": round(p["peak_bytes"] / 2**20),
                          "above_MiB": round(p["peak_above_loaded_bytes"] / 2**20),
                          "held_MiB": round(p["held_after_bytes"] / 2**20)}
            for key in ("seconds", "cpu_seconds", "passes", "step_seconds_median", "step_cpu_seconds_median"):
                if key in p:
                    out[phase][key] = round(p[key], 3)
    return out


def summarize(args, runs: dict[str, dict[str, dict]], parameters: int) -> dict:
    """The table's rows and the issue's targets, from the runs of each method (`memory` and `time` on the CPU,
    `cuda` on a GPU)."""
    mem_mode = "cuda" if args.device == "cuda" else "memory"
    time_mode = "cuda" if args.device == "cuda" else "time"
    rows = {}
    for method, by_mode in runs.items():
        for phase in ("burn_in", "train"):
            if phase not in by_mode[mem_mode][0]:
                continue
            m, t = by_mode[mem_mode][0][phase], by_mode[time_mode][0][phase]
            row = {"peak_MiB": m["peak_bytes"] / 2**20, "peak_above_loaded_MiB": m["peak_above_loaded_bytes"] / 2**20,
                   "loaded_MiB": by_mode[mem_mode][0]["loaded_bytes"] / 2**20}
            if phase == "train":
                timed = [r[phase] for r in by_mode[time_mode]]  # the timed steps of every timing run
                row |= {"step_s": statistics.median(s for r in timed for s in r["step_seconds"][r["warmup"]:]),
                        "step_cpu_s": statistics.median(s for r in timed for s in r["step_cpu_seconds"][r["warmup"]:]),
                        "step_s_per_run": [r["step_seconds_median"] for r in timed], "timing_runs": len(timed),
                        "trainable": m["trainable"]}
            else:
                row |= {"burn_in_s": t["seconds"], "burn_in_cpu_s": t["cpu_seconds"], "passes": t["passes"],
                        "statistics_MiB_held": t["statistics_bytes_held"] / 2**20,
                        "statistics_MiB_all": t["statistics_bytes_all"] / 2**20}
            rows[f"{method}/{phase}"] = row
    targets = {}
    qlora = rows.get("qlora/train")
    if qlora and "sam/train" in rows:
        sam = rows["sam/train"]
        targets["sam_train_peak_over_qlora"] = {
            "absolute": sam["peak_MiB"] / qlora["peak_MiB"],
            "above_loaded": sam["peak_above_loaded_MiB"] / qlora["peak_above_loaded_MiB"], "target": 1.0}
        targets["sam_step_over_qlora"] = {"wall": sam["step_s"] / qlora["step_s"],
                                          "cpu": sam["step_cpu_s"] / qlora["step_cpu_s"], "target": 1.1}
    for name in ("burnin", "burnin_budget", "sam"):
        row = rows.get(f"{name}/burn_in")
        if qlora and row:
            stats = row["statistics_MiB_held"]
            targets[f"{name}_peak_over_qlora_plus_statistics"] = {
                "absolute": row["peak_MiB"] / (qlora["peak_MiB"] + stats),
                "above_loaded": row["peak_above_loaded_MiB"] / (qlora["peak_above_loaded_MiB"] + stats),
                "target": 1.1}
    selections = {}
    reference = Path(args.model_dir) / f"selected-burnin-{time_mode}.pt"
    if reference.exists():
        one_pass = torch.load(reference)
        for path in sorted(Path(args.model_dir).glob("selected-*.pt")):
            if "bf16" in path.stem:  # another base: another selection
                continue
            other = torch.load(path)
            selections[path.stem.removeprefix("selected-")] = \
                other.keys() == one_pass.keys() and all(torch.equal(other[k], one_pass[k]) for k in one_pass)
    return {
        "command": " ".join([Path(sys.executable).name, "benchmarks/quantized.py"] + sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "mode", "model_dir", "json")}
        | {"parameters": parameters, "torch": torch.__version__, "machine": platform.machine(),
           "cpus": os.cpu_count(), "versions": _versions()},
        "rows": rows, "targets": targets, "selection_equal_to_one_pass_burnin": selections, "runs": runs,
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("transformers", "peft", "bitsandbytes")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--burn-in-steps", type=int, default=4)
    parser.add_argument("--sparsity", type=float, default=0.005)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--passes", type=int, default=4, help="passes of the budgeted burn-in")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="timing runs of qlora and sam, alternating")
    parser.add_argument("--sam-exclude", default="", help="exclude_modules of the SAM adapter (a regex)")
    parser.add_argument("--profile", type=int, default=0, help="also profile one training step: top N ops")
    parser.add_argument("--model-dir", default=None, help="reuse a model saved by an earlier run")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="cuda", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(RESULT + json.dumps(worker(args)), flush=True)
        return
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {METHODS}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    own_dir = args.model_dir is None
    args.model_dir = Path(tempfile.mkdtemp(prefix="sam-peft-qbench-") if own_dir else args.model_dir)
    try:
        if not (args.model_dir / "config.json").exists():
            parameters = build_model(args, args.model_dir)
        else:
            from transformers import AutoConfig, LlamaForCausalLM

            with torch.device("meta"):
                parameters = sum(p.numel() for p in LlamaForCausalLM(AutoConfig.from_pretrained(args.model_dir))
                                 .parameters())
        print(f"Llama: {parameters:,} parameters, saved in bf16", flush=True)
        modes = ("cuda",) if args.device == "cuda" else ("memory", "time")
        runs = {method: {mode: [run_worker(args, method, mode)] for mode in modes} for method in methods}
        for _ in range(args.repeats - 1):  # more timing runs of the training methods, alternating
            for method in (m for m in methods if m in ("qlora", "sam")):
                runs[method][modes[-1]].append(run_worker(args, method, modes[-1]))
        summary = summarize(args, runs, parameters)
    finally:
        if own_dir:
            shutil.rmtree(args.model_dir, ignore_errors=True)
    print(json.dumps({k: summary[k] for k in ("rows", "targets", "selection_equal_to_one_pass_burnin")}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
