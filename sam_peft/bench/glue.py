"""Run a benchmark profile, one JSON record per finished run, resumable.

Each run trains through `sam_peft.training.run_training` (the `sam-peft train` path) in a scratch directory;
when it finishes, one line is appended (and fsync'ed) to `benchmarks/results/<name>.jsonl`. Runs already
recorded are skipped, so a killed harness restarts where it stopped; a line cut off by a kill is ignored.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from tqdm.auto import tqdm

from ..tasks import get_task
from ..training import PACKAGED_MODEL
from .profiles import PROFILES, VARIANTS, Profile

logger = logging.getLogger(__name__)


def run_key(run: dict, with_lr: bool = False) -> tuple:
    key = (run["task"], run["method"], int(run["seed"]), run.get("sparsity"))
    return (*key, float(run["lr"])) if with_lr else key


def read_records(path: Path) -> list[dict]:
    """Finished runs in a results file (a malformed last line from a killed write is skipped)."""
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s:%d is not a complete JSON record (a killed write?); ignoring it.", path, number)
            continue
        if record.get("status") == "done":
            records.append(_upgrade(record))
    return records


def _upgrade(record: dict) -> dict:
    """A record as this version writes it: records before the split rename called the held-out metric
    `dev_metric` (the official dev split's is `metric` in both)."""
    if "heldout_metric" not in record and "dev_metric" in record:
        record["heldout_metric"] = record.pop("dev_metric")
    return record


def append_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cut_off = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with open(path, "a", encoding="utf-8") as handle:
        # a line cut off by a kill stays alone on its line (and is skipped), so this record is kept
        handle.write(("\n" if cut_off else "") + json.dumps(record, default=str) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=False).stdout.strip()
    except OSError:
        return ""


def _one_run(run: dict, profile: Profile, model: str | None, data_dir: str | None, threads: int,
             command: str, commit: str) -> dict:
    import torch

    from ..training import TrainSettings, run_training

    torch.set_num_threads(threads)
    scratch = tempfile.mkdtemp(prefix="sam-peft-bench-")
    method, overrides = VARIANTS.get(run["method"], (run["method"], {}))  # a label may name a method's variant
    try:
        settings = TrainSettings(**{
            "task": run["task"], "output": scratch, "model": model, "data_dir": data_dir, "method": method,
            "sparsity": run["sparsity"] or 0.005, "seed": run["seed"],
            "lr": run.get("lr") or profile.lrs.get(run["method"]), "progress": False,
            **profile.settings, **overrides,  # a variant may set any setting, the sparsity included
        })
        metrics = run_training(settings)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "task": run["task"], "method": run["method"], "seed": run["seed"], "sparsity": run["sparsity"],
        "model": metrics["model"], "metric": metrics["metric"], "metrics": metrics["metrics"],
        "heldout_metric": metrics["heldout_metrics"].get("primary"), "train_loss": metrics.get("train_loss"),
        "status": "done", "train_seconds": metrics["train_seconds"],
        "burn_in_seconds": metrics["burn_in_seconds"], "trainable_params": metrics["trainable_params"],
        "delta_bytes": metrics["delta_bytes"], "lr": settings.lr, "profile": profile.name,
        "method_facts": metrics.get("method_facts", {}), "global_steps": metrics.get("global_steps"),
        "train_metric": metrics.get("train_metrics", {}).get("primary"), "device": _device(),
        "split_rows": metrics["split_rows"],
        # what a run needs to be trusted: the held-out curve, the dev predictions' class histogram (None for
        # regression), the best constant prediction's dev score and whether this run is one (sam_peft.tasks.constant),
        # the dev metric's 95 % bootstrap interval and whether it lies above that score (sam_peft.tasks.interval)
        "log_history": metrics["log_history"], "dev_histogram": metrics["dev_histogram"],
        "constant_score": metrics["constant_score"], "constant_class": metrics["constant_class"],
        "constant": metrics["constant"], "dev_interval": metrics["dev_interval"],
        "above_constant": metrics["above_constant"],
        "settings": {k: v for k, v in profile.settings.items()}, "variant_settings": overrides,
        "git_commit": commit, "command": command,
    }


def _device() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def choose_lrs(grid_file: str | Path) -> dict[str, float]:
    """Each method's learning rate chosen on a results file of a learning-rate search (the lrgrid or lrsearch
    profile; see `choose_lrs_from_records`)."""
    records = read_records(Path(grid_file))
    if not records:
        raise ValueError(f"{grid_file} holds no finished runs; run the learning-rate search (lrgrid, lrsearch) first.")
    return choose_lrs_from_records(records)


def choose_lrs_from_records(records: list[dict]) -> dict[str, float]:
    """The learning rate of each method with the best mean held-out metric over the grid's (task, seed) runs.

    Only learning rates that finished every (task, seed) of their method count, so a partial grid is fair.
    """
    cells: dict[str, dict[float, dict[tuple, float]]] = {}
    for r in records:
        cells.setdefault(r["method"], {}).setdefault(float(r["lr"]), {})[(r["task"], r["seed"])] = r["heldout_metric"]
    chosen = {}
    for method, by_lr in cells.items():
        complete = set.union(*(set(v) for v in by_lr.values()))
        scores = {lr: sum(v.values()) / len(v) for lr, v in by_lr.items() if set(v) == complete}
        if scores:
            chosen[method] = max(scores, key=scores.get)
    return chosen


def check_consistent(records: list[dict], profile: Profile, path: Path, model: str | None = None) -> None:
    """Refuse to mix runs made with other settings, learning rates or base model into one results file."""
    expected_model = model or PACKAGED_MODEL
    for record in records:
        if record.get("model", expected_model) != expected_model:
            raise ValueError(f"{path} holds runs of base model {record['model']!r}, not {expected_model!r}; "
                             "write to a new file with --name.")
        lr = None if profile.lr_grid is not None else profile.lrs.get(record["method"])
        if record.get("settings") != dict(profile.settings) or (lr is not None and record.get("lr") != lr):
            raise ValueError(
                f"{path} holds a run ({record['task']}, {record['method']}, seed {record['seed']}) made with other "
                f"settings (settings={record.get('settings')}, lr={record.get('lr')}) than profile "
                f"{profile.name!r} now uses ({dict(profile.settings)}); continue it with the settings it was made "
                "with, or write to a new file with --name."
            )


def _reuse(run: dict, profile: Profile, searched: list[dict], path: Path, model: str) -> bool:
    """Append to `path` the search's record of the same run (task, method, seed, sparsity, the chosen rate, the
    profile's settings and base model), marked `reused_from`; whether there was one."""
    lr = profile.lrs.get(run["method"])
    for record in searched:
        if run_key(record) == run_key(run) and lr is not None and float(record["lr"]) == float(lr) \
                and record.get("settings") == dict(profile.settings) and record.get("model", model) == model:
            append_record(path, {**record, "profile": profile.name, "reused_from": f"{record.get('profile')} run"})
            return True
    return False


def _with_grid(profile: Profile, tasks: list[str] | None, methods: list[str] | None,
               train_rows: int | None = None) -> Profile:
    """The profile with its tasks and methods replaced by those named (any known task or method, with the
    profile's settings and seeds), in the order named, and its runs trained on `train_rows` rows if given."""
    if train_rows is not None:
        if isinstance(train_rows, bool) or not isinstance(train_rows, int) or train_rows <= 0:
            raise ValueError(f"--train-rows must be a positive integer, got {train_rows!r}.")
        profile = dataclasses.replace(profile, settings={**profile.settings, "train_rows": train_rows})
    if tasks:
        profile = dataclasses.replace(profile, tasks=tuple(dict.fromkeys(get_task(t).name for t in tasks)))
    if methods:
        missing = [m for m in methods if profile.lr_grid is not None and m not in profile.lr_grid]
        if missing:
            raise ValueError(f"profile {profile.name!r} has no learning-rate grid for {', '.join(missing)}; "
                             f"it searches {', '.join(profile.lr_grid)}.")
        profile = dataclasses.replace(profile, methods=tuple(dict.fromkeys(methods)))
    return profile


def run_profile(profile_name: str, *, name: str | None = None, results_dir: str = "benchmarks/results",
                model: str | None = None, data_dir: str | None = None, jobs: int = 1,
                tasks: list[str] | None = None, methods: list[str] | None = None, train_rows: int | None = None,
                max_runs: int | None = None, lrs_from: str | None = None, command: str = "") -> Path:
    """Run (or continue) a profile; returns the results file.

    `tasks`, `methods`: the grid to run instead of the profile's (any known task, for instance one whose files
    only the caller has, and any method), with the profile's settings and seeds.
    `train_rows`: train every run on that many random rows of the training split (a setting of the runs: a
    results file holds runs of one value, and a search's runs are reused only at the same value).
    `lrs_from`: a results file of a learning-rate search (lrgrid, lrsearch); each method then uses the learning rate
    it chose. A profile that names its search (`Profile.lrs_from`) runs only with one that covers all its methods.
    """
    profile = _with_grid(PROFILES[profile_name], tasks, methods, train_rows)
    if profile.lrs_from and not lrs_from:
        raise ValueError(f"profile {profile_name!r} takes its learning rates from the {profile.lrs_from} profile's "
                         f"results: pass --lrs-from {results_dir}/{profile.lrs_from}.jsonl.")
    if lrs_from:
        chosen = choose_lrs(lrs_from)
        logger.info("learning rates chosen on %s: %s", lrs_from, chosen)
        missing = [m for m in profile.methods if m not in chosen] if profile.lrs_from else []
        if missing:
            raise ValueError(f"{lrs_from} chose no learning rate for {', '.join(missing)} (no rate finished every task "
                             f"of the search); finish the {profile.lrs_from} profile first.")
        profile = dataclasses.replace(profile, lrs={**profile.lrs, **chosen})
    cores = os.cpu_count() or 1
    if jobs < 1 or jobs > cores:
        raise ValueError(f"--jobs {jobs} would oversubscribe this machine's {cores} cores; use 1..{cores}.")
    path = Path(results_dir) / f"{name or profile_name}.jsonl"
    records = read_records(path)
    check_consistent(records, profile, path, model)
    with_lr = profile.lr_grid is not None
    done = {run_key(r, with_lr) for r in records}
    todo = [r for r in profile.runs() if run_key(r, with_lr) not in done]
    if lrs_from:  # a run the search already made with the same settings and chosen rate is not made twice
        todo = [r for r in todo if not _reuse(r, profile, read_records(Path(lrs_from)), path, model or PACKAGED_MODEL)]
    if max_runs is not None:
        todo = todo[:max_runs]
    logger.info("%s: %d runs done, %d to go -> %s", profile_name, len(done), len(todo), path)
    threads = max(1, cores // jobs)
    commit = _git_commit()  # the code the runs use: taken when they start, not when each one ends
    progress = tqdm(total=len(todo), desc=f"bench {profile_name}")
    if jobs == 1:
        for run in todo:
            append_record(path, _one_run(run, profile, model, data_dir, threads, command, commit))
            progress.update()
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(_one_run, run, profile, model, data_dir, threads, command, commit) for run in todo]
            failures = []
            for future in as_completed(futures):  # record each run as soon as it finishes
                try:
                    append_record(path, future.result())
                except Exception as exc:  # keep recording the other runs; report the failures at the end
                    logger.error("a run failed: %r", exc)
                    failures.append(exc)
                progress.update()
            if failures:
                raise RuntimeError(f"{len(failures)} run(s) failed (the others are recorded); first: {failures[0]!r}")
    progress.close()
    return path
