"""The values' gradient of SAM's Linear layers three ways, on the mask `perf.py` selects for MiniLM.

- block: the library's path (`ops._values_gradient`): the rows × cols sub-block of gᵀx that holds entries, then
  the entries' positions in it;
- sddmm: `torch.sparse.sampled_addmm` with the mask as a CSR tensor (fp32 only on a CPU);
- per-entry: each entry's dot product of its output-gradient row and input row over the tokens (gathered rows of
  gᵀ and xᵀ, multiplied and summed), the per-entry work a sampled dense-dense kernel does.

Random g and x (tokens × features, fp32), medians of 5 calls per layer, summed over the layers; the cost per
multiply-add is the time over the multiply-adds each way actually does (block: tokens × block cells; per entry:
tokens × k).

    python benchmarks/values_gradient.py [--tokens 2048] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import perf
import torch


def _timed(fn, device: str, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _linear_masks(model) -> list[tuple[str, torch.Tensor, tuple[int, int]]]:
    found = []
    for name, module in model.named_modules():
        entries = getattr(module, "sparsediff_indices", {})
        if "default" in entries and "weight" in entries["default"]:
            base = module.get_base_layer()
            if isinstance(base, torch.nn.Linear):
                found.append((name, entries["default"]["weight"].long(), tuple(base.weight.shape)))
    return found


def _ways(structure, mask, rows, cols, g, x) -> dict:
    from sam_peft.tuner import ops

    g_t, x_t = g.t().contiguous(), x.t().contiguous()
    return {
        "block": lambda: ops._values_gradient(structure, False, x, True, g),
        "sddmm": lambda: torch.sparse.sampled_addmm(mask, g.t(), x, beta=0.0).values(),
        "per-entry": lambda: (g_t.index_select(0, rows) * x_t.index_select(0, cols)).sum(1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
    from peft import PeftModel

    import sam_peft  # noqa: F401  (registers the tuner)
    from sam_peft.tuner import ops

    if not perf._adapter_dir("minilm").exists():
        perf.select_worker("minilm", 0.005)
    model = PeftModel.from_pretrained(perf._build("minilm"), perf._adapter_dir("minilm"))
    totals = {"block": 0.0, "sddmm": 0.0, "per-entry": 0.0}
    macs = {"block": 0, "sddmm": 0, "per-entry": 0}
    generator = torch.Generator().manual_seed(0)
    for _, indices, (n_out, n_in) in _linear_masks(model):
        indices = indices.to(args.device)
        structure = ops.BlockStructure.build(indices, (n_out, n_in))
        g = torch.randn(args.tokens, n_out, generator=generator).to(args.device)
        x = torch.randn(args.tokens, n_in, generator=generator).to(args.device)
        rows, cols = indices // n_in, indices % n_in
        crow = torch.zeros(n_out + 1, dtype=torch.int64, device=args.device)
        crow[1:] = torch.bincount(rows, minlength=n_out).cumsum(0)
        mask = torch.sparse_csr_tensor(crow, cols, torch.zeros(indices.numel(), device=args.device), (n_out, n_in))
        ways = _ways(structure, mask, rows, cols, g, x)
        reference = ways["block"]()
        for way, fn in ways.items():
            torch.testing.assert_close(fn(), reference, rtol=1e-3, atol=1e-2)
            totals[way] += _timed(fn, args.device)
        r, c = structure.block_shape
        macs["block"] += args.tokens * r * c
        macs["sddmm"] += args.tokens * indices.numel()
        macs["per-entry"] += args.tokens * indices.numel()
    for way, seconds in totals.items():
        print(f"{way}: {1000 * seconds:.1f} ms over the Linear layers, {1e12 * seconds / macs[way]:.1f} ps per "
              f"multiply-add ({macs[way] / 1e9:.2f} G)")


if __name__ == "__main__":
    main()
