"""Shared pieces of the subcommands: parent parsers, opening the store, printing results."""
from __future__ import annotations

import argparse
import json
import sys
from types import SimpleNamespace
from typing import Any

from featurelt.store import SchemaError, Store, StoreError
from featurelt.store.sql import ReadOnlyError


class CommandError(RuntimeError):
    """An error a command reports as one line (``featurelt CMD: error: ...``) with exit status 1."""

    # Errors that are the user's input or state, reported without a traceback.
    catch = (RuntimeError, ValueError, KeyError, FileNotFoundError, StoreError, SchemaError, ReadOnlyError)


def _store_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--store", default=argparse.SUPPRESS,
                   help="store root (overrides the global --store / FEATURELT_STORE)")
    return p


def _as_of_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--as-of", dest="as_of", default=None, metavar="VERSION_OR_TAG",
                   help="read the store as it was at this store version number or tag (default: latest)")
    return p


def _json_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    return p


def int_at_least(minimum: int):
    """An argparse ``type=`` for integers >= ``minimum`` whose error shows the value that arrived."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int>={minimum}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


# parents.store: --store; parents.as_of: --as-of; parents.json: --json
parents = SimpleNamespace(store=_store_parent(), as_of=_as_of_parent(), json=_json_parent())


def open_store(args: argparse.Namespace, *, write: bool = False) -> Store:
    """The store named by ``--store``, pinned to ``--as-of`` for reads."""
    as_of = None if write else getattr(args, "as_of", None)
    return Store(args.store, as_of=as_of)


def print_rows(rows: list[dict[str, Any]], *, as_json: bool = False, columns: list[str] | None = None) -> None:
    """Print dict rows as an aligned table (or JSON with ``--json``)."""
    if as_json:
        json.dump(rows, sys.stdout, default=str, indent=1)
        sys.stdout.write("\n")
        return
    import pyarrow as pa

    from featurelt.store.sql import format_table

    if not rows:
        print("(no rows)")
        return
    cols = columns or list(rows[0])

    def column(c: str) -> list[Any]:
        values = [None if r.get(c) is None else str(r.get(c)) if not isinstance(r.get(c), (int, float)) else r.get(c)
                  for r in rows]
        if any(isinstance(v, str) for v in values):  # text beside numbers (e.g. '' for an unfinished run): all text
            values = [f"{v:.4f}" if isinstance(v, float) else v if v is None else str(v) for v in values]
        return values

    table = pa.table({c: column(c) for c in cols})
    sys.stdout.write(format_table(table, max_rows=10_000))
