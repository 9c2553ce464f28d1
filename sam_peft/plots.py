"""PNG plots: where the selected entries are, and the training curve."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .storage.io import atomic_path
from .tuner.targets import layer_and_kind


def subplots(*args, **kwargs):
    """`matplotlib.pyplot.subplots` on the headless Agg backend; every plot of the package starts here.

    matplotlib is imported on the first plot, so importing a module that can plot costs nothing until it does.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_png(fig, path: str | Path, *, tight_layout: bool = False) -> None:
    """Write `fig` as a 120-dpi PNG atomically (a reader never sees half a file) and close it.

    `tight_layout`: lay the axes out with `fig.tight_layout()`; otherwise the saved box is cropped to the content.
    """
    import matplotlib.pyplot as plt

    if tight_layout:
        fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=120, **({} if tight_layout else {"bbox_inches": "tight"}))
    plt.close(fig)


def plot_selection_heatmap(counts: dict[str, int], numels: dict[str, int], path: str | Path, title: str = "") -> None:
    """Density of selected entries per layer (rows) × module kind (columns)."""
    cells = defaultdict(lambda: [0, 0])
    for name, numel in numels.items():
        layer, kind = layer_and_kind(name)
        cells[(layer, kind)][0] += counts.get(name, 0)
        cells[(layer, kind)][1] += numel
    layers = sorted({layer for layer, _ in cells}, key=lambda x: (x == "other", int(x) if x.isdigit() else 0))
    kinds = sorted({kind for _, kind in cells})
    grid = [[(cells[(ly, k)][0] / cells[(ly, k)][1] * 100) if cells[(ly, k)][1] else float("nan") for k in kinds]
            for ly in layers]
    fig, ax = subplots(figsize=(max(6, 0.45 * len(kinds) + 2), max(3, 0.4 * len(layers) + 1.5)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(kinds)), kinds, rotation=70, ha="right", fontsize=7)
    ax.set_yticks(range(len(layers)), layers, fontsize=8)
    ax.set_ylabel("layer")
    ax.set_title(title or "selected entries")
    fig.colorbar(image, ax=ax, label="% of entries selected")
    save_png(fig, path)


def plot_training_curve(log_history: list[dict], path: str | Path, title: str = "") -> None:
    """Training loss and the dev-split primary metric against the step."""
    loss = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    dev = [(e["step"], e["eval_primary"]) for e in log_history if "eval_primary" in e]
    fig, ax = subplots(figsize=(6.5, 3.8))
    if loss:
        ax.plot(*zip(*loss), color="tab:blue", label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss", color="tab:blue")
    if dev:
        twin = ax.twinx()
        twin.plot(*zip(*dev), "o-", color="tab:orange", label="dev primary")
        twin.set_ylabel("dev metric (0-100)", color="tab:orange")
    ax.set_title(title or "training curve")
    save_png(fig, path)
