"""The ``featurelt`` command line: thin subcommands, each calling one library function.

Subcommands live in :mod:`featurelt.commands`; every module there defines
``register(subparsers, parents)`` and is picked up automatically. Heavy libraries (torch,
open_clip, ray) are imported inside the command functions, so ``featurelt --help`` is fast.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

import featurelt.commands as commands_pkg
from featurelt import __version__
from featurelt.commands._common import CommandError, parents


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="featurelt",
        description="Feature-store-centric embedding pipeline for long-tailed image recognition. "
        "Frozen encoders write embeddings into a versioned Lance store; light heads train from the "
        "cached features; DuckDB answers SQL over everything.",
        epilog="Every command takes --store PATH (env FEATURELT_STORE, default ./featurelt-store). "
        "Read commands take --as-of VERSION_OR_TAG. `featurelt COMMAND --help` explains each command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"featurelt {__version__}")
    parser.add_argument("--store", default=os.environ.get("FEATURELT_STORE", "./featurelt-store"),
                        help="store root: a directory or any URI pylance accepts (env FEATURELT_STORE; "
                        "default ./featurelt-store)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands_pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        importlib.import_module(f"featurelt.commands.{info.name}").register(sub, parents)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 a reported error, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # output piped into head & co.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("featurelt: interrupted; the store keeps its last committed version", file=sys.stderr)
        return 130
    except CommandError.catch as exc:  # type: ignore[misc]
        print(f"featurelt {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
