"""Eager against torch.compile (inductor) training steps of a Llama-shaped decoder, full fine-tuning and SAM.

bf16 autocast, bf16 base for SAM (fp32 for full fine-tuning's master weights), AdamW; the first compiled step
includes the compile. A quick check that the compiled path is not slower than eager on a given machine; the GPU
protocol's `sam_compiled` / `lora_compiled` rows (benchmarks/gpu_perf.py) are the measurement to quote for GPUs.

    python benchmarks/compile_steps.py [--shape tiny] [--device cpu] [--threads 1] [--steps 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import gpu_perf
import torch


def _steps(run, model, batches, device: str, steps: int) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = run(**batches[i % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    import sam_peft

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="tiny", choices=sorted(gpu_perf.SHAPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch threads (CPU)")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = gpu_perf._batches(args.shape, args.device, 4)
    for method in ("full", "sam"):
        for compiled in (False, True):
            if method == "sam":
                model = gpu_perf._wrap(gpu_perf._model(args.shape, torch.bfloat16, args.device), "sam").train()
                sam_peft.select_parameters(model, batches[:2], progress=False)
            else:
                model = gpu_perf._model(args.shape, torch.float32, args.device).train()
            run = torch.compile(model) if compiled else model
            times = _steps(run, model, batches, args.device, args.steps)
            print(f"{method} {'inductor' if compiled else 'eager'}: first step {times[0]:.2f} s, then median "
                  f"{1000 * statistics.median(times[1:]):.1f} ms", flush=True)


if __name__ == "__main__":
    main()
