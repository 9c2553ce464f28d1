"""The fine-tuning methods of the training path (`sam-peft train` and the benchmark harness).

`prepare_method` turns a freshly loaded model into what the Trainer trains for one method, with the callbacks,
extra loss terms and the finishing step it needs:

- sparse deltas (a sam-peft adapter): sam, fisher, sam_hessian (burn-in selection), magnitude, random, bitfit;
- peft adapters: lora (peft's LoRA), adapter (bottleneck adapters, `sam_peft.baselines.adapters`), and He et al.'s
  parallel_adapter, prefix and mam (`sam_peft.baselines.adapters.unified`);
- dense baselines: full, mixout, childpruning, diffpruning, dps (`sam_peft.baselines`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .ranking.signals import SELECTIONS, SIGNALS
from .tuner import SparseDiffConfig

# Default learning rates: 1e-3 for the parameter-efficient methods and 5e-5 for the dense ones (a starting point;
# the `lrsearch` profile chose these for sam and full, and 3e-4 for lora, 3e-3 for random: docs/results.md);
# benchmarks choose theirs on a grid (`--lrs-from`).
EFFICIENT_LR, DENSE_LR = 1e-3, 5e-5


@dataclass(frozen=True)
class Method:
    """One method of the training path, as the CLI, the training settings and the benchmark profiles see it."""

    name: str
    family: str  # "sparse delta" (a sam-peft adapter), "peft" (another peft adapter) or "dense"
    lr: float  # default learning rate
    sparse: bool = False  # tunes a fraction p of the weights (p is recorded per run; the sweep varies it)
    paper: bool = True  # one of the 12 methods of the paper's comparison (Table 1)


# The one list of methods: the sparse deltas are the selection signals (`sam_peft.ranking.signals.SIGNALS`).
REGISTRY: dict[str, Method] = {
    method.name: method
    for method in (
        *(Method(name, "sparse delta", EFFICIENT_LR, sparse=SIGNALS[name].budgeted, paper=name != "sam_hessian")
          for name in SELECTIONS),
        Method("lora", "peft", EFFICIENT_LR),
        Method("adapter", "peft", EFFICIENT_LR),
        # He et al.'s unified view (`sam_peft.baselines.adapters.unified`), not in Fu et al.'s comparison
        Method("parallel_adapter", "peft", EFFICIENT_LR, paper=False),
        Method("prefix", "peft", EFFICIENT_LR, paper=False),
        Method("mam", "peft", EFFICIENT_LR, paper=False),
        Method("full", "dense", DENSE_LR),
        Method("mixout", "dense", DENSE_LR),
        Method("childpruning", "dense", DENSE_LR, sparse=True),
        Method("diffpruning", "dense", EFFICIENT_LR, sparse=True),
        Method("dps", "dense", DENSE_LR),
    )
}
METHODS = tuple(REGISTRY)
DEFAULT_LRS = {name: method.lr for name, method in REGISTRY.items()}
SPARSE_METHODS = tuple(name for name, method in REGISTRY.items() if method.sparse)
PAPER_METHODS = tuple(name for name, method in REGISTRY.items() if method.paper)


def describe_methods() -> str:
    """The methods by family, for help texts: "sparse delta: sam, fisher, ...; peft: ...; dense: ..."."""
    families: dict[str, list[str]] = {}
    for method in REGISTRY.values():
        families.setdefault(method.family, []).append(method.name)
    return "; ".join(f"{family}: {', '.join(names)}" for family, names in families.items())


@dataclass
class PreparedMethod:
    """What the Trainer needs for one method."""

    model: nn.Module
    callbacks: list = field(default_factory=list)
    loss_terms: list[Callable[[], torch.Tensor | None]] = field(default_factory=list)
    finalize: Callable[[], None] | None = None  # run after training, before evaluation and saving
    describe: Callable[[], dict] | None = None  # method facts recorded in metrics.json


def prepare_method(model: nn.Module, settings, task, *, burn_in: int, total_steps: int) -> PreparedMethod:
    """Wrap `model` for `settings.method`; `burn_in` is the selection / warm-up length in optimizer steps."""
    method = settings.method
    task_type = None if task.is_multiple_choice else "SEQ_CLS"
    head = ["classifier"] if task.is_multiple_choice else None
    if method == "full":
        return PreparedMethod(model)
    if method in SELECTIONS:
        return _sparse_delta(model, settings, task_type, head, burn_in)
    if method in ("lora", "adapter"):
        return _peft_adapter(model, settings, task_type, head)
    if method in ("parallel_adapter", "prefix", "mam"):
        return _unified(model, settings, task_type, head)
    if method in _DENSE_BASELINES:
        return _DENSE_BASELINES[method](model, settings, burn_in, total_steps)
    raise ValueError(f"method={method!r} is unknown; choose one of {list(METHODS)}.")


def _sparse_delta(model, settings, task_type, head, burn_in: int) -> PreparedMethod:
    from peft import get_peft_model

    from .burnin.callback import SAMCallback

    config = SparseDiffConfig(sparsity=settings.sparsity, selection=settings.method, allocation=settings.allocation,
                              seed=settings.seed, task_type=task_type, modules_to_save=head)
    wrapped = get_peft_model(model, config)
    if config.is_data_free:  # selected when the adapter was created
        return PreparedMethod(wrapped)
    selection = SAMCallback(burn_in_steps=burn_in, progress=settings.progress)

    def describe() -> dict:  # the steps the burn-in used (fewer than asked when the data ran out)
        report = selection.report
        return {"burn_in_steps": report.steps if report else burn_in, "burn_in_steps_requested": burn_in,
                "burn_in_seconds": report.burn_in_seconds if report else None,
                "selection_seconds": report.seconds if report else None}

    return PreparedMethod(wrapped, [selection], describe=describe)


def _unified(model, settings, task_type, head) -> PreparedMethod:
    """He et al.'s parallel adapter, prefix tuning or MAM (settings: pa_style, pa_placement, pa_r, pa_scaling,
    prefix_length)."""
    from peft import get_peft_model

    from .baselines.adapters import AdapterConfig, MAMConfig, PrefixConfig

    common = {"task_type": task_type, "modules_to_save": head}
    if settings.method == "parallel_adapter":
        config = AdapterConfig(style=settings.pa_style, placement=settings.pa_placement, r=settings.pa_r,
                               scaling=settings.pa_scaling, **common)
    elif settings.method == "prefix":
        config = PrefixConfig(num_virtual_tokens=settings.prefix_length, **common)
    else:
        config = MAMConfig(num_virtual_tokens=settings.prefix_length, r=settings.pa_r,
                           scaling=settings.pa_scaling or 4.0, **common)
    wrapped = get_peft_model(model, config)
    facts = {key: getattr(config, key) for key in ("style", "placement", "r", "scaling", "num_virtual_tokens")
             if hasattr(config, key)}
    return PreparedMethod(wrapped, describe=lambda: dict(facts))


def _peft_adapter(model, settings, task_type, head) -> PreparedMethod:
    """peft's LoRA (r from the settings, alpha = 2r, on every attention and dense projection) or the
    bottleneck adapters (`sam_peft.baselines.adapters`)."""
    from peft import LoraConfig, get_peft_model

    if settings.method == "lora":
        config = LoraConfig(r=settings.lora_r, lora_alpha=2 * settings.lora_r, lora_dropout=0.1,
                            target_modules=["query", "key", "value", "dense"], task_type=task_type,
                            modules_to_save=head)
    else:
        from .baselines.adapters import BottleneckConfig

        config = BottleneckConfig(placement=settings.adapter_placement, reduction_factor=settings.adapter_reduction,
                                  task_type=task_type, modules_to_save=head)
    return PreparedMethod(get_peft_model(model, config))


def _mixout(model, settings, burn_in: int, total_steps: int) -> PreparedMethod:
    from .baselines.mixout import apply_mixout, remove_mixout

    apply_mixout(model, settings.mixout_p)
    return PreparedMethod(model, finalize=lambda: remove_mixout(model))


def _childpruning(model, settings, burn_in: int, total_steps: int) -> PreparedMethod:
    from .baselines.childpruning import ProjectionCallback

    callback = ProjectionCallback(model, settings.sparsity, _warm_up(burn_in, total_steps),
                                  every=settings.projection_every)
    return PreparedMethod(model, [callback], describe=lambda: {
        "projection_steps": callback.projection_steps, "projections": callback.projections,
        "changed_entries": callback.changed_entries()})


def _diffpruning(model, settings, burn_in: int, total_steps: int) -> PreparedMethod:
    from .baselines.diffpruning import DiffPruningCallback, attach_gated_diffs, bake

    gated = attach_gated_diffs(model)
    callback = DiffPruningCallback(gated, settings.sparsity, _warm_up(burn_in, total_steps),
                                   l0_weight=settings.l0_weight, reproject_every=settings.reproject_every)

    def finalize() -> None:
        callback.finish()
        bake(model)

    return PreparedMethod(model, [callback], loss_terms=[callback.penalty], finalize=finalize,
                          describe=lambda: {"projection_steps": callback.projection_steps,
                                            "projections": callback.projections,
                                            "l0_penalty_by_step": callback.penalty_by_step})


def _dps(model, settings, burn_in: int, total_steps: int) -> PreparedMethod:
    from .baselines.dps import DPSCallback
    from .baselines.mixout import set_dropout

    set_dropout(model, 0.0)
    stage = max(1, round(settings.dps_stage_ratio * total_steps))
    callback = DPSCallback(model, stage, keep=settings.dps_keep)
    return PreparedMethod(model, [callback], describe=lambda: {"stage_steps": stage,
                                                               "selections": callback.selections})


# The dense baselines (`sam_peft.baselines`): method -> builder(model, settings, burn_in, total_steps).
_DENSE_BASELINES = {"mixout": _mixout, "childpruning": _childpruning, "diffpruning": _diffpruning, "dps": _dps}


def _warm_up(burn_in: int, total_steps: int) -> int:
    """A warm-up phase (projection methods) of `burn_in` steps, leaving at least half the run after it."""
    return max(1, min(burn_in, math.ceil(total_steps / 2)))
