"""Store commands: tables, versions, log, tag, sql."""
from __future__ import annotations

import argparse
import sys

from featurelt.commands._common import open_store, print_rows


def register(sub: argparse._SubParsersAction, parents) -> None:
    p = sub.add_parser("tables", parents=[parents.store, parents.as_of, parents.json],
                       help="list the store's tables with row counts and Lance versions",
                       description="List the tables of the store at a store version: name, Lance version, rows, URI.")
    p.set_defaults(func=cmd_tables)

    p = sub.add_parser("versions", parents=[parents.store, parents.json],
                       help="list the Lance versions of a table (or all tables)",
                       description="List every Lance version of TABLE (or of all tables): table, version, "
                       "time, rows, and the message (the command line that made it, with its store version).")
    p.add_argument("table", nargs="?", help="table name, e.g. samples or emb_clip_tiny (default: all)")
    p.set_defaults(func=cmd_versions)

    p = sub.add_parser("log", parents=[parents.store, parents.json],
                       help="list store versions (one per successful command)",
                       description="The store log: store version, time, command, tables changed. "
                       "Pass a store version or tag to --as-of of any read command to read the store as it was.")
    p.set_defaults(func=cmd_log)

    p = sub.add_parser("tag", parents=[parents.store],
                       help="name the current store version (all tables' current versions)",
                       description="Name the current store version; `--as-of NAME` then reads it. Also creates a "
                       "Lance tag NAME on every table, for other Lance clients.")
    p.add_argument("name", help="tag name (not a number, not 'latest')")
    p.set_defaults(func=cmd_tag)

    p = sub.add_parser("sql", parents=[parents.store, parents.as_of],
                       help="run a read-only DuckDB query over the store's tables",
                       description="Run read-only SQL with DuckDB. Every table is a view with its own name "
                       "(samples, classes, rejects, runs, predictions, text_embeddings, embedding_sets, "
                       "emb_<name> per embedding set), scanned lazily from Lance. Only queries run: statements that "
                       "would modify data or settings (INSERT, COPY, ATTACH, INSTALL, SET, ...) are refused, and so "
                       "are reads of anything but the store's tables (read_csv, read_text, files, URLs). CSV output "
                       "quotes only the values that need it.",
                       epilog="example: featurelt sql \"SELECT c.bucket, count(*) FROM samples s JOIN classes c "
                       "USING (label) WHERE s.split='train' GROUP BY 1\"")
    p.add_argument("query", help="SQL text (SELECT / WITH / FROM / DESCRIBE / EXPLAIN [ANALYZE] of a query)")
    p.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table",
                   help="output format (default: table; parquet needs --out)")
    p.add_argument("--out", help="write the result to this file instead of stdout")
    p.set_defaults(func=cmd_sql)


def cmd_tables(args: argparse.Namespace) -> int:
    store = open_store(args)
    rows = [{"table": t, "lance_version": v, "rows": store.count(t), "uri": store.uri(t)}
            for t, v in sorted(store.table_versions().items())]
    print_rows(rows, as_json=args.json, columns=["table", "lance_version", "rows", "uri"])
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    store = open_store(args)
    print_rows(store.versions(args.table), as_json=args.json, columns=["table", "version", "time", "rows", "message"])
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    store = open_store(args)
    tags: dict[int, list[str]] = {}
    for t in store.tags():
        tags.setdefault(t["store_version"], []).append(t["name"])
    rows = [{"store_version": c.store_version, "time": c.time, "tags": ",".join(tags.get(c.store_version, [])),
             "changed": ",".join(c.changed), "message": c.message} for c in store.log()]
    print_rows(rows, as_json=args.json, columns=["store_version", "time", "tags", "changed", "message"])
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    store = open_store(args, write=True)
    version = store.tag(args.name)
    print(f"tagged store version {version} as '{args.name}'")
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    from featurelt.store.sql import write_result

    store = open_store(args)
    result = store.sql(args.query)
    text = write_result(result, args.format, args.out)
    if text is not None:
        sys.stdout.write(text)
    elif args.out:
        print(f"wrote {result.num_rows} rows to {args.out}", file=sys.stderr)
    return 0
