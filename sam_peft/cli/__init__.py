"""`sam-peft`: train, evaluate, inspect and merge sparse deltas, and run the reproduction harness.

A thin layer over the library: one module per subcommand, each adding its parser and its `run` function.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from contextlib import contextmanager

from ..errors import SamPeftError
from . import bench, evaluate, inspect, merge, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sam-peft", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (train, inspect, evaluate, merge, bench):
        command.add_parser(sub)
    return parser


@contextmanager
def quiet_expected_noise(enabled: bool = True):
    """Silence what the libraries print that tells a `sam-peft` user nothing: deprecation notices about their own
    internals, and transformers' weight-loading progress bars. Other warnings stay (-v shows everything)."""
    if not enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    with warnings.catch_warnings():
        for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
            warnings.filterwarnings("ignore", category=category,
                                    module=r"(transformers|peft|accelerate|datasets|torch|trl)(\.|$)")
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            if bars:
                hf_logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        with quiet_expected_noise(not args.verbose):
            return args.func(args)
    except (SamPeftError, OSError, ValueError) as exc:  # OSError: files, and models that cannot be found
        if args.verbose:  # -v shows everything, the traceback included
            raise
        print(f"sam-peft: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
