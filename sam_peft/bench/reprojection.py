"""Fig. 3 of Fu et al.: DiffPruning's training loss when its diff is re-projected periodically.

One `sam-peft train --method diffpruning --reproject-every N` run (the shared training path) logs the loss at
every step; the L0 penalty of each step is subtracted so the curve is the task loss. The curve (JSON) and a
PNG with the projection steps marked are written.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..plots import save_png, subplots
from ..storage.io import write_text_atomic


def projection_curve(metrics: dict) -> dict:
    """Task loss per step (logged loss minus that step's L0 penalty) and the projection steps of a run."""
    facts = metrics["method_facts"]
    penalties = {int(k): v for k, v in facts.get("l0_penalty_by_step", {}).items()}
    steps, losses = [], []
    for entry in metrics["log_history"]:
        if "loss" in entry and "step" in entry:
            steps.append(entry["step"])
            losses.append(entry["loss"] - penalties.get(entry["step"], 0.0))
    projections = sorted({p for p in facts["projections"] if p in steps})  # markers at logged steps
    return {"task": metrics["task"], "lr": metrics["settings"]["lr"], "reproject_every": metrics["settings"]
            ["reproject_every"], "steps": steps, "task_loss": losses, "projections": projections}


def plot_projection_curve(curve: dict, path: Path) -> None:
    fig, ax = subplots(figsize=(7, 3.5))
    ax.plot(curve["steps"], curve["task_loss"], linewidth=1)
    for step in curve["projections"]:
        ax.axvline(step, color="red", linestyle=":", linewidth=1)
    ax.set_xlabel("training step (red: the diff is projected)")
    ax.set_ylabel("training loss (task)")
    ax.set_title(f"DiffPruning on {curve['task']}: re-projection every {curve['reproject_every']} steps (Fig. 3)")
    save_png(fig, path, tight_layout=True)


def write_projection_curve(run_dir: str, json_path: str, png_path: str) -> dict:
    """Read a finished run's metrics.json, write the curve as JSON and PNG; returns the curve."""
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    if metrics.get("method") != "diffpruning" or not metrics["settings"].get("reproject_every"):
        raise ValueError(f"{run_dir} is not a diffpruning run with --reproject-every; train one first.")
    curve = projection_curve(metrics)
    write_text_atomic(Path(json_path), json.dumps(curve, indent=1))
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    plot_projection_curve(curve, Path(png_path))
    return curve
