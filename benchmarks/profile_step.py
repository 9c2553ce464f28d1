"""torch.profiler table of training steps of one method on MiniLM (batch 16 x 128), as benchmarks/perf.py builds it.

    python benchmarks/profile_step.py sam      # or lora, full, supertuning; after one `perf.py` run (SAM's adapter)
"""

from __future__ import annotations

import sys

import perf
import torch
from torch.profiler import ProfilerActivity, profile


def main(method: str, steps: int = 3) -> None:
    model = perf._build("minilm")
    batch = perf._batch("minilm", model.config.vocab_size)
    if method == "sam":
        from peft import PeftModel

        import sam_peft  # noqa: F401  (registers the tuner)

        model = PeftModel.from_pretrained(model, perf._adapter_dir("minilm"), is_trainable=True)
    else:
        model = perf._wrap(model, method, 0.005)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "sam")
