"""GPU performance: full fine-tuning, peft LoRA, peft Supertuning, SAM and a no-weight-gradient floor on a
TinyLlama-1.1B-shaped decoder.

    python benchmarks/perf.py --device cuda --json benchmarks/results/perf-gpu-$(date +%F).json \
        --markdown docs/benchmarks-gpu.md [--profile-dir DIR] [--before DIR]

The protocol (../shared/guide/BENCHMARKS.md): random-init decoder (hidden 2048, 22 layers, 32 heads, 4 KV heads,
FFN 5632, vocab 32000), batch 4 × 1024, bf16 autocast, fused AdamW. Full fine-tuning keeps fp32 master weights;
LoRA (r=16, every linear layer), Supertuning (the same density as SAM on every linear layer) and SAM (p = 0.005)
keep the base in bf16 and their trainable tensors in fp32. Each method runs in its own process; step times are
CUDA-event medians over the timed steps after the warm-up steps; peaks are `torch.cuda.max_memory_allocated`
after `reset_peak_memory_stats`. `frozen` is the floor: the bf16 model with every weight frozen and the gradient
carried down from the loss to the embeddings' output, i.e. the forward and the input gradients that any method
training weights in every layer has to run (LoRA and SAM included): no such method's step goes below the floor's.
The SAM process also times its burn-in steps (and their peak) before training, the full process its steps without
the optimizer. `--before DIR` adds a `sam_before` row from an older sam-peft package in DIR (bf16 base, no
autocast: that version's backward failed under autocast).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

METHODS = ("full", "lora", "supertuning", "sam", "frozen")
# opt-in (--methods): the same method's training steps under torch.compile (inductor); the compile happens in the
# first warm-up step and is reported as compile_seconds
COMPILED = ("lora_compiled", "sam_compiled")
# opt-in (--methods sam_restrict50, ...): SAM with a side of each values-gradient block restricted to its touched
# rows/columns only below that percentage touched (the library's threshold is `ops._RESTRICT_BELOW`), set in that
# method's own worker process: an A/B of the gathers against the larger matmul on the device at hand
RESTRICT = "sam_restrict"
SPARSITY = 0.005
SHAPES = {
    "tinyllama": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                      intermediate_size=5632, vocab_size=32000, batch=4, seq=1024),
    # a small stand-in with the same structure, for checking the script on a CPU
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, batch=2, seq=32),
}


def _model(shape: str, dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = {k: v for k, v in SHAPES[shape].items() if k not in ("batch", "seq")}
    config = LlamaConfig(**spec, max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype)


def _batches(shape: str, device: str, n: int) -> list[dict]:
    spec = SHAPES[shape]
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, spec["vocab_size"], (spec["batch"], spec["seq"]), generator=g).to(device)
        out.append({"input_ids": ids, "labels": ids})
    return out


def _timer(device: str):
    """(start, stop) closures returning seconds between them: CUDA events on a GPU, the host clock on a CPU."""
    if device == "cuda":
        def start():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event

        def stop(begin):
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            return begin, end

        return start, stop
    return time.perf_counter, lambda begin: (begin, time.perf_counter())


def _seconds(pairs, device: str) -> list[float]:
    if device == "cuda":
        torch.cuda.synchronize()
        return [a.elapsed_time(b) / 1000 for a, b in pairs]
    return [b - a for a, b in pairs]


def _peak_reset(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> int | None:
    if device == "cuda":
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())
    return None


def _wrap(model, method: str):
    from peft import LoraConfig, SupertuningConfig, get_peft_model

    import sam_peft

    if method == "lora":
        return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    if method == "supertuning":
        return get_peft_model(model, SupertuningConfig(sparsity=1 - SPARSITY, target_modules="all-linear",
                                                       task_type="CAUSAL_LM"))
    return get_peft_model(model, sam_peft.SAMConfig(sparsity=SPARSITY, task_type="CAUSAL_LM"))


def _train_steps(model, batches, device: str, warmup: int, steps: int, optimizer, autocast: bool) -> list[float]:
    start, stop = _timer(device)
    pairs = []
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        begin = start()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        if i >= warmup:
            pairs.append(stop(begin))
    return _seconds(pairs, device)


def _profile(model, batches, device: str, optimizer, autocast: bool, path: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        _train_steps(model, batches, device, 0, 3, optimizer, autocast)
    sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    Path(path).write_text(prof.key_averages().table(sort_by=sort, row_limit=30))


def worker(method: str, shape: str, device: str, warmup: int, steps: int, profile_dir: str | None) -> dict:
    """One method's measurements, in this process."""
    compiled = method in COMPILED
    result = {"method": method, "shape": shape}
    name = method
    if method.startswith(RESTRICT):
        from sam_peft.tuner import ops

        ops._RESTRICT_BELOW = result["restrict_below"] = int(method.removeprefix(RESTRICT)) / 100
        method = "sam"
    method = method.removesuffix("_compiled")
    autocast = method != "sam_before"
    batches = _batches(shape, device, 4)
    if method == "full":
        model = _model(shape, torch.float32, device)  # fp32 master weights, bf16 autocast
        model.train()
        _peak_reset(device)
        result["noopt_step_seconds"] = _train_steps(model, batches, device, warmup, steps, None, autocast)
        result["noopt_peak_bytes"] = _peak(device)
        params = [p for p in model.parameters() if p.requires_grad]
    elif method == "frozen":
        model = _frozen(_model(shape, torch.bfloat16, device))
        params = []
    else:
        model = _model(shape, torch.bfloat16, device)
        model = _wrap(model, method)
        if method in ("sam", "sam_before"):
            import sam_peft

            model.train()
            _peak_reset(device)
            burn_in = _train_burn_in(model, batches, device, warmup)
            result.update(burn_in)
            result["burn_in_peak_bytes"] = _peak(device)
        params = [p for p in model.parameters() if p.requires_grad]
        if method in ("sam", "sam_before"):
            result["selected"] = int(sum(i.numel() for i in sam_peft.selected_indices(model).values()))
    fused = device == "cuda"
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=fused) if params else None
    model.train()
    if compiled:
        model = torch.compile(model)
        begin = time.perf_counter()
        _train_steps(model, batches, device, 1, 0, optimizer, autocast)
        if device == "cuda":
            torch.cuda.synchronize()
        result["compile_seconds"] = time.perf_counter() - begin
    _peak_reset(device)
    result["step_seconds"] = _train_steps(model, batches, device, warmup, steps, optimizer, autocast)
    result["peak_bytes"] = _peak(device)
    result["trainable"] = int(sum(p.numel() for p in params))
    result["step_median"] = statistics.median(result["step_seconds"])
    if method == "sam":
        result["blocks"] = _block_shares(model)
    if profile_dir:
        _profile(model, batches, device, optimizer, autocast, os.path.join(profile_dir, f"profile-{name}.txt"))
    return result


def _frozen(model):
    """The floor: every weight frozen, the embeddings' output made to require grad (so backward runs the input
    gradient of every layer, and no weight gradient)."""
    model.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda module, inputs, out: out.requires_grad_())
    return model


def _block_shares(model) -> dict:
    """Parameter-weighted shares of touched rows, touched columns and the rows × columns block of the Linear
    weights (what the values' gradient and the saved inputs cost, relative to dense)."""
    from sam_peft.tuner.ops import BlockStructure

    total = rows = cols = block = 0.0
    for module in model.modules():
        for _, structure in getattr(module, "_cache", {}).values():
            if isinstance(structure, BlockStructure):
                n = structure.n_rows * structure.n_cols
                r, c = structure.block_shape
                total += n
                rows += n * r / structure.n_rows
                cols += n * c / structure.n_cols
                block += r * c
    return {} if not total else {"rows": rows / total, "cols": cols / total, "block": block / total}


def _train_burn_in(model, batches, device: str, warmup: int) -> dict:
    """One `select_parameters` call over warm-up + 10 batches; a timer mark at each batch the library draws gives the
    time of each burn-in step (forward, backward, statistics folded in); then the selection itself."""
    import sam_peft

    start, stop = _timer(device)
    marks = []

    def timed_batches():
        for i in range(warmup + 10):
            marks.append(start())
            yield batches[i % len(batches)]
        marks.append(start())

    began = time.perf_counter()
    report = sam_peft.select_parameters(model, timed_batches(), progress=False)
    total = time.perf_counter() - began
    pairs = list(zip(marks[warmup:-1], marks[warmup + 1:]))
    seconds = _seconds(pairs, device)
    return {"burn_in_step_seconds": seconds, "burn_in_step_median": statistics.median(seconds),
            "selection_seconds": report.seconds - report.burn_in_seconds, "select_parameters_seconds": total}


def _is_restrict(method: str) -> bool:
    number = method.removeprefix(RESTRICT)
    return method.startswith(RESTRICT) and number.isdigit() and 1 <= int(number) <= 100


def run(args) -> dict:
    """Run each method in its own process and collect the results."""
    methods = list(args.methods or METHODS) + (["sam_before"] if args.before else [])
    unknown = [m for m in methods if m not in (*METHODS, *COMPILED, "sam_before") and not _is_restrict(m)]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}: choose from {[*METHODS, *COMPILED]} or {RESTRICT}NN "
                         "(NN: the percentage, 1-100, below which a block side is restricted)")
    results = {}
    log = []
    for method in methods:
        env = dict(os.environ)
        if method == "sam_before":
            env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(args.before), env.get("PYTHONPATH", "")])
        profile = args.profile_dir if args.profile_dir and method in (args.profile_methods or methods) else ""
        command = [sys.executable, __file__, "--worker", method, args.shape, args.device, str(args.warmup),
                   str(args.steps), profile]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            results[method] = {"method": method, "error": done.stderr[-3000:]}
            log.append(f"{method}: FAILED after {elapsed:.0f}s\n{done.stderr[-3000:]}")
        else:
            results[method] = json.loads(done.stdout.strip().splitlines()[-1])
            log.append(f"{method}: {results[method]['step_median'] * 1000:.1f} ms/step ({elapsed:.0f}s)")
        print(log[-1], flush=True)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" and torch.cuda.is_available() else "cpu"
    return {"date": time.strftime("%Y-%m-%d"), "device": device_name, "torch": torch.__version__,
            "shape": args.shape, "warmup": args.warmup, "steps": args.steps, "results": results,
            "ratios": ratios(results)}


def ratios(results: dict) -> dict:
    def get(method, key):
        return results.get(method, {}).get(key)

    def ratio(a, b):
        return None if a is None or b is None else a / b

    full_noopt = get("full", "noopt_step_seconds")
    return {
        "sam_step_over_lora": ratio(get("sam", "step_median"), get("lora", "step_median")),
        "sam_step_over_full": ratio(get("sam", "step_median"), get("full", "step_median")),
        "sam_peak_over_lora": ratio(get("sam", "peak_bytes"), get("lora", "peak_bytes")),
        "burnin_step_over_full_noopt": ratio(get("sam", "burn_in_step_median"),
                                             statistics.median(full_noopt) if full_noopt else None),
        "sam_step_over_supertuning": ratio(get("sam", "step_median"), get("supertuning", "step_median")),
        "floor_step_over_full": ratio(get("frozen", "step_median"), get("full", "step_median")),
        "floor_step_over_lora": ratio(get("frozen", "step_median"), get("lora", "step_median")),
        "floor_peak_over_lora": ratio(get("frozen", "peak_bytes"), get("lora", "peak_bytes")),
        "sam_step_over_floor": ratio(get("sam", "step_median"), get("frozen", "step_median")),
        "sam_step_after_over_before": ratio(get("sam", "step_median"), get("sam_before", "step_median")),
    }


TARGETS = {
    "sam_step_over_lora": ("SAM step / LoRA (r=16, all linear) step", 0.8),
    "sam_step_over_full": ("SAM step / full fine-tuning step", 0.5),
    "sam_peak_over_lora": ("SAM peak memory / LoRA's", 0.9),
    "burnin_step_over_full_noopt": ("burn-in step / full step without optimizer", 1.1),
}


def render(report: dict, source: str) -> str:
    """The GPU table of docs/benchmarks-gpu.md."""
    rows = ["| method | step (ms, median) | peak (GiB) | trainable |", "|---|---|---|---|"]
    for method, r in report["results"].items():
        if "error" in r:
            rows.append(f"| {method} | failed | | |")
            continue
        peak = r.get("peak_bytes")
        rows.append(f"| {method} | {r['step_median'] * 1000:.1f} | {peak / 2**30:.2f} | {r['trainable']:,} |"
                    if peak else f"| {method} | {r['step_median'] * 1000:.1f} | – | {r['trainable']:,} |")
    full, sam = report["results"].get("full", {}), report["results"].get("sam", {})
    if full.get("noopt_step_seconds"):
        rows.append(f"| full, no optimizer | {statistics.median(full['noopt_step_seconds']) * 1000:.1f} | "
                    f"{(full.get('noopt_peak_bytes') or 0) / 2**30:.2f} | – |")
    if sam.get("burn_in_step_median"):
        rows.append(f"| SAM burn-in step | {sam['burn_in_step_median'] * 1000:.1f} | "
                    f"{(sam.get('burn_in_peak_bytes') or 0) / 2**30:.2f} | – |")
    targets = ["| figure | measured | target | met |", "|---|---|---|---|"]
    for key, (label, target) in TARGETS.items():
        value = report["ratios"].get(key)
        targets.append(f"| {label} | {'–' if value is None else f'{value:.2f}'} | ≤ {target} | "
                       f"{'–' if value is None else ('yes' if value <= target else 'no')} |")
    for method, r in report["results"].items():
        if method.startswith(RESTRICT) and "step_median" in r and "step_median" in sam:
            targets.append(f"| {method} step / sam step | {r['step_median'] / sam['step_median']:.2f} | | |")
    for key in ("sam_step_over_supertuning", "sam_step_after_over_before", "floor_step_over_full",
                "floor_step_over_lora", "floor_peak_over_lora", "sam_step_over_floor"):
        value = report["ratios"].get(key)
        if value is not None:
            targets.append(f"| {key.replace('_', ' ')} | {value:.2f} | | |")
    blocks = sam.get("blocks") or {}
    notes = []
    if blocks:
        notes = [f"SAM's entries touch {100 * blocks['rows']:.0f} % of the Linear weights' rows and "
                 f"{100 * blocks['cols']:.0f} % of their columns (parameter-weighted); the rows × columns block the "
                 f"values' gradient is computed on is {100 * blocks['block']:.0f} % of the weights.", ""]
    floor_full, floor_lora = report["ratios"].get("floor_step_over_full"), report["ratios"].get("floor_step_over_lora")
    if floor_full is not None and floor_lora is not None:
        notes += [f"The floor (`frozen`: forward and input gradients only, no weight gradient) is {floor_full:.2f} × "
                  f"full fine-tuning's step and {floor_lora:.2f} × LoRA's: no method that trains weights in every "
                  "layer can go below it.", ""]
    return "\n".join([
        f"# GPU performance ({report['device']}, {report['date']})", "",
        f"Generated by `python benchmarks/perf.py --device cuda` from `{source}`; torch {report['torch']}; shape "
        f"`{report['shape']}`; medians over {report['steps']} steps after {report['warmup']} warm-up steps, one "
        "process per method, ratios within this one run. Protocol: benchmarks/gpu_perf.py's docstring.", "",
        *rows, "", *targets, "", *notes,
    ])


def main(argv: list[str]) -> None:
    if argv and argv[0] == "--worker":
        method, shape, device, warmup, steps, profile_dir = argv[1:7]
        print(json.dumps(worker(method, shape, device, int(warmup), int(steps), profile_dir or None)))
        return
    raise SystemExit("run through benchmarks/perf.py --device cuda")


if __name__ == "__main__":
    main(sys.argv[1:])
