"""`SelectionReport`: what a selection chose, per parameter, per layer and per module kind."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch

from ..tuner.targets import layer_and_kind, targets


@dataclass
class SelectionReport:
    """Counts and densities of the selected entries, a score summary and the time taken; `passes`: burn-in passes
    over the batches (0: a data-free selection, more than 1 under `max_statistics_bytes`), `statistics_bytes`: the
    most bytes of statistics one pass held."""

    adapter_name: str
    selection: str
    allocation: str
    sparsity: float
    steps: int
    seconds: float
    selected: int
    total: int
    burn_in_seconds: float = 0.0
    per_parameter: dict[str, dict[str, int]] = field(default_factory=dict)
    per_layer: dict[str, float] = field(default_factory=dict)
    per_kind: dict[str, float] = field(default_factory=dict)
    score_summary: dict[str, float] = field(default_factory=dict)
    passes: int = 0
    statistics_bytes: int = 0

    @property
    def density(self) -> float:
        return self.selected / max(self.total, 1)

    @classmethod
    def build(cls, model, adapter_name: str, *, steps: int, seconds: float, burn_in_seconds: float = 0.0,
              kept: torch.Tensor | None = None, passes: int = 0, statistics_bytes: int = 0):
        """The report of the adapter's installed entries; `kept`: the scores of the chosen entries (any order)."""
        config = model.peft_config[adapter_name]
        per_parameter, layer_tot, kind_tot = {}, defaultdict(lambda: [0, 0]), defaultdict(lambda: [0, 0])
        for t in targets(model, adapter_name):
            k, n = t.values.numel(), t.numel
            per_parameter[t.name] = {"selected": k, "numel": n}
            layer, kind = layer_and_kind(t.name)
            for table, key in ((layer_tot, layer), (kind_tot, kind)):
                table[key][0] += k
                table[key][1] += n
        summary = {}
        if kept is not None and kept.numel():
            summary = {"kept_min": float(kept.min()), "kept_median": float(kept.median()),
                       "kept_max": float(kept.max())}
        selected = sum(v["selected"] for v in per_parameter.values())
        total = sum(v["numel"] for v in per_parameter.values())
        return cls(
            adapter_name=adapter_name, selection=config.selection, allocation=config.allocation,
            sparsity=config.sparsity, steps=steps, seconds=seconds, burn_in_seconds=burn_in_seconds, passes=passes,
            statistics_bytes=statistics_bytes,
            selected=selected, total=total,
            per_parameter=per_parameter,
            per_layer={k: s / max(n, 1) for k, (s, n) in layer_tot.items()},
            per_kind={k: s / max(n, 1) for k, (s, n) in kind_tot.items()},
            score_summary=summary,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        lines = [
            f"selection={self.selection} allocation={self.allocation} sparsity={self.sparsity} "
            f"steps={self.steps}{f' passes={self.passes}' if self.passes > 1 else ''} "
            f"burn-in={self.burn_in_seconds:.1f}s total={self.seconds:.1f}s",
            f"selected {self.selected:,} of {self.total:,} entries ({100 * self.density:.3f} %)",
        ]
        lines += [f"  layer {layer:>6}: {100 * d:7.3f} %" for layer, d in self.per_layer.items()]
        return "\n".join(lines)
