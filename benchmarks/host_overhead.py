"""Host-side cost of a tuner layer: a stack of small Linear layers, frozen, LoRA and SAM, forward + backward.

With 64 × 64 weights and 64 tokens the kernels themselves are a few microseconds, so the time per layer is what the
host spends issuing them (Python, autograd, dispatch): the part of a GPU step that can leave the GPU waiting when
a model has many layers. bf16 base and autocast, as on the GPU; the methods alternate within each round, medians.

    python benchmarks/host_overhead.py [--layers 50] [--rounds 200] [--device cpu] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn


class Stack(nn.Module):
    def __init__(self, layers: int, width: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def _model(method: str, layers: int, width: int, device: str) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    import sam_peft

    torch.manual_seed(0)
    model = Stack(layers, width).to(device=device, dtype=torch.bfloat16)
    if method == "frozen":
        return model.requires_grad_(False)
    targets = [f"layers.{i}" for i in range(layers)]
    if method == "lora":
        return get_peft_model(model, LoraConfig(r=8, target_modules=targets)).train()
    # data-free entries (the first 1 % of each weight): what the layer runs is the same as after a burn-in
    return get_peft_model(model, sam_peft.SAMConfig(sparsity=0.01, target_modules=targets)).train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=50)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.width, args.width, device=args.device, requires_grad=True)
    models = {m: _model(m, args.layers, args.width, args.device) for m in ("frozen", "lora", "sam")}
    times: dict[str, list[float]] = {m: [] for m in models}
    for round_ in range(args.rounds):
        for method, model in models.items():
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast(args.device, dtype=torch.bfloat16):
                out = model(x)
            out.float().sum().backward()
            if args.device == "cuda":
                torch.cuda.synchronize()
            if round_ >= args.rounds // 10:  # the first tenth warms up
                times[method].append(time.perf_counter() - start)
    per_layer = {m: 1e6 * statistics.median(t) / args.layers for m, t in times.items()}
    print(", ".join(f"{m} {us:.1f} us" for m, us in per_layer.items()) + " per layer (forward + backward); "
          f"over frozen: LoRA {per_layer['lora'] - per_layer['frozen']:.1f} us, "
          f"SAM {per_layer['sam'] - per_layer['frozen']:.1f} us")


if __name__ == "__main__":
    main()
