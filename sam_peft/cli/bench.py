"""`sam-peft bench`: the reproduction harness (glue runs, reports, the Fig. 3 curve)."""

from __future__ import annotations

import argparse
import os
import sys

from ..bench.profiles import PROFILES, VARIANTS
from ..methods import METHODS, describe_methods


def add_parser(sub) -> None:
    bench = sub.add_parser("bench", help="reproduction harness").add_subparsers(dest="bench", required=True)
    glue = bench.add_parser("glue", help="run (or resume) a profile: smoke, quick, paper or sweep")
    glue.add_argument("--profile", default="quick", choices=list(PROFILES),
                      help="smoke (tests), quick (2-core CPU, ~2 h), lrgrid (learning-rate search), paper, "
                           "perturb (Table 2), sweep (Fig. 5), unified (He et al.'s methods, quick settings), "
                           "lrsearch (learning-rate search at 3 epochs, max length 128), evidence (5 seeds at the "
                           "rates lrsearch chose; needs --lrs-from)")
    glue.add_argument("--name", help="results file name (default: the profile name)")
    glue.add_argument("--results-dir", default="benchmarks/results")
    glue.add_argument("--data-dir", help="directory of the official task files (default: the hub)")
    glue.add_argument("--model", help="base model (default: the packaged all-MiniLM-L6-v2)")
    glue.add_argument("--jobs", type=int, default=1, help="parallel runs (at most the number of cores)")
    glue.add_argument("--tasks", nargs="+", help="run these tasks instead of the profile's (any task sam-peft "
                      "knows, with the profile's settings and seeds)")
    glue.add_argument("--methods", nargs="+", choices=[*METHODS, *VARIANTS], metavar="METHOD",
                      help="run these methods instead of the profile's: " + describe_methods() + "; variants: "
                      + ", ".join(VARIANTS))
    glue.add_argument("--train-rows", type=int,
                      help="train every run on N random rows of the training split (seeded; held-out and dev stay "
                           "whole): the protocol on a large task at a bounded cost; recorded in each run's settings")
    glue.add_argument("--max-runs", type=int, help="stop after this many new runs (run a profile in parts)")
    glue.add_argument("--lrs-from", help="results file of a learning-rate search (lrgrid, lrsearch): use each "
                                         "method's chosen learning rate")
    glue.set_defaults(func=run_glue)
    report = bench.add_parser("report", help="tables and plots from results files")
    report.add_argument("results", nargs="+", help="results .jsonl files")
    report.add_argument("--output", default="docs/benchmarks-report.md")
    report.add_argument("--pairs", nargs="+", default=[], metavar="A:B",
                        help="also test method A against method B (paired over task and seed), e.g. mam:full")
    report.add_argument("--data-dir", help="directory of the official task files: judges records written before the "
                                           "`constant` field from the dev labels (otherwise unknown)")
    report.set_defaults(func=run_report)
    projection = bench.add_parser("projection", help="Fig. 3 curve from a diffpruning run with --reproject-every")
    projection.add_argument("run", help="output directory of the run")
    projection.add_argument("--json", default="benchmarks/results/projection.json")
    projection.add_argument("--png", default="docs/images/projection.png")
    projection.set_defaults(func=run_projection)


def run_glue(args: argparse.Namespace) -> int:
    from ..bench.glue import run_profile

    path = run_profile(args.profile, name=args.name, results_dir=args.results_dir, model=args.model,
                       data_dir=args.data_dir, jobs=args.jobs, tasks=args.tasks, methods=args.methods,
                       train_rows=args.train_rows, max_runs=args.max_runs, lrs_from=args.lrs_from,
                       command=_portable_command(sys.argv[1:]))
    print(f"results in {path}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from ..bench.report import write_report

    pairs = []
    for pair in args.pairs:
        a, sep, b = pair.partition(":")
        if not sep or not a or not b:
            raise SystemExit(f"--pairs {pair!r}: write each pair as METHOD_A:METHOD_B, e.g. mam:full")
        pairs.append((a, b))
    print(f"report written to {write_report(args.results, args.output, pairs, data_dir=args.data_dir)}")
    return 0


def run_projection(args: argparse.Namespace) -> int:
    from ..bench.reprojection import write_projection_curve

    curve = write_projection_curve(args.run, args.json, args.png)
    print(f"{len(curve['steps'])} logged steps, projections at {curve['projections']}: {args.json}, {args.png}")
    return 0


def _portable_command(argv: list[str]) -> str:
    """The command as typed, with absolute paths made relative to the working directory: results files are
    committed and must not name a machine's folders."""
    return "sam-peft " + " ".join(os.path.relpath(a) if os.path.isabs(a) else a for a in argv)
