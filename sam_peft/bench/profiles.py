"""Benchmark profiles: which runs make up smoke, quick, paper, lrsearch, evidence, ..., and the settings each run
uses."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..methods import DEFAULT_LRS, DENSE_LR, PAPER_METHODS, SPARSE_METHODS


@dataclass(frozen=True)
class Profile:
    """A grid of runs and the training settings shared by all of them."""

    name: str
    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    sparsities: tuple[float, ...] = (0.005,)
    settings: dict = field(default_factory=dict)
    lrs: dict = field(default_factory=dict)  # method -> learning rate (chosen on the 10 % dev split)
    lr_grid: dict | None = None  # method -> learning rates to try (a learning-rate search profile)
    lrs_from: str | None = None  # the search profile whose results must give the rates (`--lrs-from`)

    def runs(self) -> list[dict]:
        """Every run of the profile as a dict of (task, method, seed, sparsity[, lr]), in execution order."""
        out = []
        for seed in self.seeds:  # seed-major: a partial profile still covers every task and method
            for task in self.tasks:
                for method in self.methods:
                    sparsities = self.sparsities if method in SPARSE_METHODS else (None,)
                    for sparsity in sparsities:
                        run = {"task": task, "method": method, "seed": seed, "sparsity": sparsity}
                        if self.lr_grid is None:
                            out.append(run)
                        else:
                            out += [{**run, "lr": lr} for lr in self.lr_grid[method]]
        return out


SEVEN_TASKS = ("cola", "stsb", "mrpc", "rte", "cb", "copa", "wsc")
QUICK_METHODS = ("full", "sam", "fisher", "random", "bitfit", "magnitude", "lora")
ALL_METHODS = PAPER_METHODS  # the paper's 12 (`sam_peft.methods.REGISTRY`; methods with a sparsity p: SPARSE_METHODS)
# Learning rates for quick and sweep: `sam_peft.methods.DEFAULT_LRS` (untuned defaults, docs/results.md: the
# parameter-efficient methods share 1e-3, the dense ones 5e-5).
# The paper profile's settings (its §5.1 with a 10-epoch cap; the paper's burn-in per task, capped at one epoch).
PAPER_SETTINGS = {"epochs": 10, "batch_size": 16, "max_length": 128, "patience": 5}
# Learning-rate grid searched on the held-out 10 % (seed 0) before the paper profile: dense methods around the
# usual 2e-5..1e-4, parameter-efficient ones around 1e-4..3e-3.
DENSE_GRID = (2e-5, 5e-5, 1e-4)
EFFICIENT_GRID = (1e-4, 5e-4, 2e-3)
LR_GRID = {m: DENSE_GRID if DEFAULT_LRS[m] == DENSE_LR else EFFICIENT_GRID for m in ALL_METHODS}

# Issue 25's evidence: the tasks where MiniLM learns, SAM against full fine-tuning, LoRA and random selection at SAM's
# budget, at a realistic budget (up to 3 epochs, max length 128, an evaluation on the held-out 10 % every half
# epoch, early stopping after one epoch without improvement; the paper's burn-in, capped at one epoch). `lrsearch`
# tries each method's rates on the held-out split (seed 0); `evidence` runs 5 seeds at the rate it chose.
EVIDENCE_TASKS = ("stsb", "mrpc", "cola", "rte")
EVIDENCE_METHODS = ("sam", "full", "lora", "random")
EVIDENCE_SETTINGS = {"epochs": 3, "batch_size": 16, "max_length": 128, "evals_per_epoch": 2, "patience": 2}
EVIDENCE_GRID = {"sam": (3e-4, 1e-3, 3e-3), "random": (3e-4, 1e-3, 3e-3), "lora": (3e-4, 1e-3, 3e-3),
                 "full": (2e-5, 5e-5, 1e-4)}

# Bench labels that run a method with other settings: label -> (method, TrainSettings overrides). The label is the
# "method" of the run's record (so reports keep the variants apart) and is looked up in the profile's `lrs`.
VARIANTS = {
    "parallel_adapter_attn": ("parallel_adapter", {"pa_placement": "attention"}),
    "parallel_adapter_ffn": ("parallel_adapter", {"pa_placement": "ffn"}),
    # the unified profile's equal-budget pair (docs/benchmarks-unified.md): a sequential adapter after both sublayers
    # with r = 96 has 890,496 added parameters, one r = 192 parallel adapter 888,192; SAM at p = 0.0452 tunes
    # 1,026,612 entries on MiniLM, MAM adds 1,026,432
    "sequential_adapter_r96": ("parallel_adapter", {"pa_style": "sequential", "pa_placement": "both", "pa_r": 96}),
    "sam_mam_budget": ("sam", {"sparsity": 0.0452}),
}
# He et al.'s unified view on MiniLM (docs/benchmarks-unified.md): the sequential bottleneck adapter (`adapter`),
# the scaled parallel adapter (s = 4, r = hidden // 2 = 192) beside attention and beside the FFN, prefix tuning
# (l = 30), MAM, LoRA, SAM and full fine-tuning, with the quick profile's settings.
UNIFIED_METHODS = ("adapter", "parallel_adapter_attn", "parallel_adapter_ffn", "prefix", "mam", "lora", "sam", "full",
                   "sequential_adapter_r96", "sam_mam_budget")

PROFILES = {
    "smoke": Profile(
        name="smoke", tasks=("rte", "cb"), methods=("full", "sam", "random", "bitfit", "lora"), seeds=(0, 1),
        settings={"max_steps": 4, "burn_in_steps": 2, "batch_size": 4, "max_length": 32, "eval_steps": 2,
                  "patience": 1, "limit": 24},
        lrs=DEFAULT_LRS,
    ),
    # quick fits this project's 2-core CPU machines: 100 optimizer steps at max length 64 and a 30-batch burn-in
    # keep the 105 runs near 2 hours (150 steps at max length 128 measured ~2.5x that and was abandoned); it is a
    # short-budget comparison, not the paper's protocol (see docs/reproduction.md)
    "quick": Profile(
        name="quick", tasks=("rte", "mrpc", "cb", "copa", "stsb"), methods=QUICK_METHODS, seeds=(0, 1, 2),
        settings={"max_steps": 100, "burn_in_steps": 30, "batch_size": 16, "max_length": 64, "eval_steps": 25,
                  "patience": 2},
        lrs=DEFAULT_LRS,
    ),
    "unified": Profile(
        name="unified", tasks=("rte", "mrpc", "cb", "copa", "stsb"), methods=UNIFIED_METHODS, seeds=(0, 1, 2),
        settings={"max_steps": 100, "burn_in_steps": 30, "batch_size": 16, "max_length": 64, "eval_steps": 25,
                  "patience": 2},
        lrs={**DEFAULT_LRS, **{label: DEFAULT_LRS[method] for label, (method, _) in VARIANTS.items()}},
    ),
    "lrgrid": Profile(
        name="lrgrid", tasks=("rte", "mrpc", "stsb", "cb"), methods=ALL_METHODS, seeds=(0,),
        settings=PAPER_SETTINGS, lr_grid=LR_GRID,
    ),
    "lrsearch": Profile(
        name="lrsearch", tasks=EVIDENCE_TASKS, methods=EVIDENCE_METHODS, seeds=(0,), settings=EVIDENCE_SETTINGS,
        lr_grid=EVIDENCE_GRID,
    ),
    "evidence": Profile(  # sam-peft bench glue --profile evidence --lrs-from benchmarks/results/lrsearch.jsonl
        name="evidence", tasks=EVIDENCE_TASKS, methods=EVIDENCE_METHODS, seeds=tuple(range(5)),
        settings=EVIDENCE_SETTINGS, lrs_from="lrsearch",
    ),
    "paper": Profile(
        name="paper", tasks=SEVEN_TASKS, methods=ALL_METHODS, seeds=tuple(range(10)), settings=PAPER_SETTINGS,
        lrs=DEFAULT_LRS,  # replace with the grid's choice: sam-peft bench glue --profile paper --lrs-from ...
    ),
    "perturb": Profile(  # Table 2: every run drops a different random 10 % of the training rows
        name="perturb", tasks=("rte", "mrpc", "cb", "stsb"), methods=ALL_METHODS, seeds=tuple(range(5)),
        settings={**PAPER_SETTINGS, "drop_fraction": 0.1}, lrs=DEFAULT_LRS,
    ),
    "sweep": Profile(
        name="sweep", tasks=("rte", "mrpc", "cb", "copa", "stsb"), methods=("sam",), seeds=(0, 1, 2),
        sparsities=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2),
        settings={"max_steps": 100, "burn_in_steps": 30, "batch_size": 16, "max_length": 64, "eval_steps": 25,
                  "patience": 2},
        lrs=DEFAULT_LRS,
    ),
}
