"""Step times of full fine-tuning, LoRA, SAM and a no-weight-gradient floor on MiniLM, interleaved in one process.

The floor ("frozen") runs the same forward and backward with every weight frozen but the gradient carried down to
the embeddings (the head trains): the work every method that tunes weights in every layer has to do. A method's
step over the floor is what its own updates cost, so the floor over LoRA's step bounds how far below LoRA any such
method can get on this machine. Models and batches are `perf.py`'s (SAM loads the adapter `perf.py` selects).

    python benchmarks/cpu_steps.py [--rounds 8] [--json benchmarks/results/cpu-steps-<date>.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import perf
import torch

METHODS = ("full", "lora", "sam", "frozen")


def _model(name: str, method: str):
    torch.manual_seed(0)
    model = perf._build(name)
    if method == "sam":
        from peft import PeftModel

        import sam_peft  # noqa: F401  (registers the tuner)

        return PeftModel.from_pretrained(model, perf._adapter_dir(name), is_trainable=True)
    if method == "frozen":
        for param_name, param in model.named_parameters():
            param.requires_grad_(param_name.startswith("classifier."))
        model.bert.embeddings.register_forward_hook(lambda module, inputs, out: out.requires_grad_())
        return model
    return perf._wrap(model, method, 0.005)


def measure(name: str, rounds: int) -> dict:
    if not perf._adapter_dir(name).exists():
        perf.select_worker(name, 0.005)
    runs = {}
    for method in METHODS:
        model = _model(name, method).train()
        batch = perf._batch(name, model.config.vocab_size)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        runs[method] = (model, batch, optimizer, [])
    for round_ in range(rounds + 1):  # round 0 warms up; the methods alternate within each round
        for model, batch, optimizer, times in runs.values():
            start = time.perf_counter()
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if round_:
                times.append(time.perf_counter() - start)
    median = {method: statistics.median(run[3]) for method, run in runs.items()}
    return {"model": name, "batch": [perf.SHAPES[name]["batch"], perf.SHAPES[name]["seq"]], "median_seconds": median,
            "sam_over_full": median["sam"] / median["full"], "sam_over_lora": median["sam"] / median["lora"],
            "floor_over_full": median["frozen"] / median["full"], "floor_over_lora": median["frozen"] / median["lora"],
            "step_seconds": {method: run[3] for method, run in runs.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = [measure(name, args.rounds) for name in ("minilm", "minilm64")]
    for r in results:
        ms = {m: round(1000 * s, 1) for m, s in r["median_seconds"].items()}
        print(f"{r['model']} {r['batch']}: {ms} ms; SAM/full {r['sam_over_full']:.3f}, SAM/LoRA "
              f"{r['sam_over_lora']:.3f}; floor/full {r['floor_over_full']:.3f}, floor/LoRA {r['floor_over_lora']:.3f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "rounds": args.rounds, "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
