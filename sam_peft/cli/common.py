"""Helpers shared by the subcommands: plain tables and the metrics.json of a run."""

from __future__ import annotations

import json
from pathlib import Path


def print_table(rows: list[tuple[str, object]]) -> None:
    width = max(len(str(k)) for k, _ in rows)
    for key, value in rows:
        print(f"{str(key):<{width}}  {value}")


def run_info(adapter_dir: Path) -> dict:
    for candidate in (adapter_dir / "metrics.json", adapter_dir.parent / "metrics.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return {}
