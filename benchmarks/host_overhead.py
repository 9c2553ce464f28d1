"""Host-side cost of a tuner layer: a stack of small Linear layers, frozen, LoRA and SAM, forward + backward.

With 64 × 64 weights and 64 tokens the kernels themselves are a few microseconds, so the time per layer is what the
host spends issuing them (Python, autograd, dispatch): the part of a GPU step that can leave the GPU waiting when
a model has many layers. On a GPU the base is bf16 under bf16 autocast, as in training there; on a CPU, where bf16
matmuls are slow enough to be timed themselves, fp32 without autocast (the same host-side work). The methods
alternate within each round; medians.

    python benchmarks/host_overhead.py [--layers 50] [--width 64] [--tokens 64] [--rounds 200] [--device cpu]
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


def _model(method: str, layers: int, width: int, device: str, dtype: torch.dtype) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    import sam_peft

    torch.manual_seed(0)
    model = Stack(layers, width).to(device=device, dtype=dtype)
    if method == "frozen":
        return model.requires_grad_(False)
    targets = [f"layers.{i}" for i in range(layers)]
    if method == "lora":
        return get_peft_model(model, LoraConfig(r=8, target_modules=targets)).train()
    # 1 % of each weight at random (data-free): the same kernels as a SAM mask after a burn-in
    config = sam_peft.SparseDiffConfig(sparsity=0.01, selection="random", target_modules=targets)
    return get_peft_model(model, config).train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=50)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kind = torch.device(args.device).type
    dtype = torch.bfloat16 if kind == "cuda" else torch.float32
    x = torch.randn(args.tokens, args.width, device=args.device, requires_grad=True)
    models = {m: _model(m, args.layers, args.width, args.device, dtype) for m in ("frozen", "lora", "sam")}
    trained = {m: [p for p in model.parameters() if p.requires_grad] for m, model in models.items()}
    times: dict[str, list[float]] = {m: [] for m in models}
    for round_ in range(args.rounds):
        for method, model in models.items():
            if kind == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast(kind, dtype=torch.bfloat16, enabled=kind == "cuda"):
                out = model(x)
            out.float().sum().backward()
            for param in (*trained[method], x):  # not `zero_grad`: walking the modules would be timed too
                param.grad = None
            if kind == "cuda":
                torch.cuda.synchronize()
            if round_ >= args.rounds // 10:  # the first tenth warms up
                times[method].append(time.perf_counter() - start)
    per_layer = {m: 1e6 * statistics.median(t) / args.layers for m, t in times.items()}
    print(", ".join(f"{m} {us:.1f} us" for m, us in per_layer.items()) + " per layer (forward + backward); "
          f"over frozen: LoRA {per_layer['lora'] - per_layer['frozen']:.1f} us, "
          f"SAM {per_layer['sam'] - per_layer['frozen']:.1f} us")


if __name__ == "__main__":
    main()
