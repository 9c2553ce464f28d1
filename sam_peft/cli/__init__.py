"""`sam-peft`: train, evaluate, inspect and merge sparse deltas, and run the reproduction harness.

A thin layer over the library: one module per subcommand, each adding its parser and its `run` function.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import SamPeftError
from . import bench, evaluate, inspect, merge, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sam-peft", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (train, inspect, evaluate, merge, bench):
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (SamPeftError, FileNotFoundError, ValueError) as exc:
        print(f"sam-peft: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
