"""`featurelt job FILE`: run the featurelt commands listed in a YAML job spec (see featurelt.jobs)."""
from __future__ import annotations

import argparse
import os


def register(sub: argparse._SubParsersAction, parents) -> None:
    p = sub.add_parser("job", help="run the featurelt commands listed in a YAML job file, in order",
                       description="Run a job file (jobs/*.yaml): a list of steps {command: {option: value}}, "
                       "each run as the same featurelt command typed by hand; stops at the first failure.",
                       epilog="examples: featurelt job jobs/digits-baselines.yaml --dry-run;  "
                       "featurelt job jobs/auxiliary-classes.yaml --store aux-store")
    p.add_argument("file", help="YAML job file, e.g. jobs/digits-baselines.yaml")
    p.add_argument("--store", default=argparse.SUPPRESS, help="store root; overrides the job's 'store' key")
    p.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    p.set_defaults(func=cmd_job)


def cmd_job(args: argparse.Namespace) -> int:
    from featurelt.jobs import run_job

    default = os.environ.get("FEATURELT_STORE", "./featurelt-store")
    explicit = args.store if args.store != default else None  # the job's own 'store' applies otherwise
    return run_job(args.file, store=explicit, dry_run=args.dry_run)
