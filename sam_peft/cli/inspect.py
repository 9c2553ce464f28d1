"""`sam-peft inspect`: summarise a saved adapter."""

from __future__ import annotations

import argparse
import json

from .common import print_table


def add_parser(sub) -> None:
    inspect = sub.add_parser("inspect", help="summarise a saved adapter")
    inspect.add_argument("directory")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..storage.adapter_dir import adapter_summary

    summary = adapter_summary(args.directory)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    rows = [(k, v) for k, v in summary.items() if not isinstance(v, dict)]
    print_table([(k, f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else v) for k, v in rows])
    total = summary["entries"] or 1
    print("\nentries per layer:")
    for layer, count in sorted(summary["per_layer"].items(), key=lambda x: (x[0] == "other", x[0].zfill(4))):
        print(f"  {layer:>6}  {count:>9,}  ({100 * count / total:5.1f} % of entries)")
    print("\nentries per module kind:")
    for kind, count in sorted(summary["per_kind"].items(), key=lambda x: -x[1]):
        print(f"  {kind:<40} {count:>9,}")
    return 0
