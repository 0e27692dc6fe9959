"""Read-only SQL over the store with DuckDB.

Each table is registered as a DuckDB view with its own name (embedding sets as ``emb_<name>``),
backed by the Lance dataset at the pinned store version: DuckDB scans it lazily through the
Arrow dataset interface, pushing projections and filters down, so nothing is copied in full.
Float16 vectors (``extract --dtype float16``) are seen as float32: DuckDB has no float16 type.
Statements other than queries (INSERT, UPDATE, DELETE, CREATE, COPY, ATTACH, SET, INSTALL,
EXPLAIN ANALYZE of any of them, ...) are refused before anything runs, and the connection is
locked first (:data:`LOCKDOWN`): no file, network or extension access, no configuration changes.
"""
from __future__ import annotations

import contextlib
from typing import Any, Literal

import duckdb
import lance
import pyarrow as pa

from featurelt.store.core import Store

OutputFormat = Literal["table", "csv", "json", "parquet"]

# What the connection is locked to before a user's SQL runs: no file, network or extension access
# (read_csv, read_text, COPY ... TO, ATTACH, INSTALL / LOAD), no scans of Python variables, and no
# way back (lock_configuration makes every later SET / RESET an error). The registered Lance views
# are Python objects, not files, so they still scan, with projections and filters pushed down.
LOCKDOWN = ("SET enable_external_access = false", "SET python_enable_replacements = false",
            "SET autoinstall_known_extensions = false", "SET autoload_known_extensions = false",
            "SET lock_configuration = true")


class ReadOnlyError(ValueError):
    """A SQL statement that would modify data or state, or reach outside the store."""


def _refuse(what: str, text: str) -> ReadOnlyError:
    return ReadOnlyError(f"featurelt sql is read-only: refused {what} ({text.strip()[:80]!r}); "
                         "only queries (SELECT, WITH, FROM, VALUES, DESCRIBE, SHOW, SUMMARIZE, PIVOT, EXPLAIN of a "
                         "query) run; write to the store with featurelt commands")


def _words(text: str) -> list[tuple[int, str]]:
    """DuckDB's tokens of ``text`` (comments left out) as ``(position, token text)``."""
    tokens = duckdb.tokenize(text)
    ends = [pos for pos, _ in tokens[1:]] + [len(text)]
    return [(pos, text[pos:end].strip()) for (pos, kind), end in zip(tokens, ends) if kind != duckdb.token_type.comment]


def _explained(text: str) -> str:
    """The statement that ``EXPLAIN [ANALYZE] [(options)] STATEMENT`` explains ('' if none)."""
    words = _words(text)[1:]  # after EXPLAIN
    i = 0
    while i < len(words):
        pos, word = words[i]
        if word.upper() == "ANALYZE":
            i += 1
        elif word == "(" and not _is_query(text[pos:]):  # an option list such as (FORMAT json)
            depth = 0
            for i in range(i, len(words)):
                depth += {"(": 1, ")": -1}.get(words[i][1], 0)
                if depth == 0:
                    break
            i += 1
        else:
            return text[pos:]
    return ""


def _is_query(text: str) -> bool:
    try:
        statements = duckdb.extract_statements(text)
    except duckdb.Error:
        return False
    return len(statements) == 1 and statements[0].type.name == "SELECT"


def check_read_only(con: duckdb.DuckDBPyConnection, query: str) -> None:
    """Raise :class:`ReadOnlyError` unless every statement in ``query`` is a query, an ``EXPLAIN
    [ANALYZE]`` of a query, or a ``PIVOT`` statement (DuckDB runs it as a query after defining a
    temporary enum). Decided from DuckDB's own parse (statement types), not from the text."""
    try:
        statements = con.extract_statements(query)
    except duckdb.Error as exc:
        raise ValueError(f"SQL does not parse: {exc}") from None
    if not statements:
        raise ValueError("empty SQL query")
    for st in statements:
        kind = st.type.name
        if kind == "SELECT":
            continue
        if kind == "EXPLAIN":
            inner = _explained(st.query)
            if _is_query(inner):
                continue
            inner_kind = "unparsable"
            with contextlib.suppress(duckdb.Error):
                inner_kind = " / ".join(s.type.name for s in duckdb.extract_statements(inner)) or "empty"
            raise _refuse(f"EXPLAIN of a {inner_kind} statement", st.query)
        if kind == "MULTI" and _first_word(st.query) in {"PIVOT", "UNPIVOT"}:
            continue
        raise _refuse(f"a {kind} statement", st.query)


def _first_word(text: str) -> str:
    words = _words(text)
    return words[0][1].upper() if words else ""


def _widen(schema: pa.Schema) -> pa.Schema:
    """``schema`` with every ``fixed_size_list<float16>[D]`` as ``fixed_size_list<float32>[D]``."""
    fields = []
    for f in schema:
        if pa.types.is_fixed_size_list(f.type) and pa.types.is_float16(f.type.value_type):
            f = f.with_type(pa.list_(pa.float32(), f.type.list_size))
        fields.append(f)
    return pa.schema(fields, metadata=schema.metadata)


class _Float32Scanner:
    """What DuckDB reads from :class:`_Float16AsFloat32`: the Lance scanner's batches, cast."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def to_reader(self) -> pa.RecordBatchReader:
        reader = self.inner.to_reader()
        target = _widen(reader.schema)
        return pa.RecordBatchReader.from_batches(target, (b.cast(target) for b in reader))


class _Float16AsFloat32(lance.LanceDataset):
    """A Lance dataset holding float16 vectors (``extract --dtype float16``) as DuckDB can read it:
    DuckDB has no float16 type, so the schema it sees says float32 and every scanned batch is cast.
    DuckDB still hands its projection and filter to Lance's ``scanner``."""

    @classmethod
    def of(cls, ds: lance.LanceDataset) -> "_Float16AsFloat32":
        view = cls.__new__(cls)
        view.__dict__.update(ds.__dict__)  # the same open dataset (same version), another class
        return view

    @property
    def schema(self) -> pa.Schema:  # type: ignore[override]
        return _widen(lance.LanceDataset.schema.fget(self))  # type: ignore[attr-defined]

    def scanner(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return _Float32Scanner(super().scanner(*args, **kwargs))


def connect(store: Store) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with every store table registered as a view at the pinned version, then
    locked down (:data:`LOCKDOWN`): it can read those views and nothing else."""
    con = duckdb.connect()
    for table in store.tables():
        ds = store.dataset(table)
        con.register(table, _Float16AsFloat32.of(ds) if _widen(ds.schema) != ds.schema else ds)
    for setting in LOCKDOWN:
        con.execute(setting)
    return con


def run_sql(store: Store, query: str) -> pa.Table:
    """Execute a read-only query over the store's tables at its pinned version; the result as an Arrow
    table. Also ``Store.sql(query)`` (attached in ``featurelt/store/__init__.py``)."""
    con = connect(store)
    try:
        check_read_only(con, query)
        try:
            return con.sql(query).to_arrow_table() if hasattr(duckdb.DuckDBPyRelation, "to_arrow_table") else con.sql(query).arrow()
        except duckdb.PermissionException as exc:
            raise ReadOnlyError(f"featurelt sql reads only the store's tables: {str(exc).splitlines()[0]}") from None
        except duckdb.CatalogException as exc:
            raise ValueError(f"{str(exc).splitlines()[0]}; tables: {', '.join(store.tables()) or '(none)'}") from None
        except duckdb.Error as exc:
            raise ValueError(f"SQL error: {exc}") from None
    finally:
        con.close()


def write_result(result: pa.Table, fmt: OutputFormat, out: str | None) -> str | None:
    """Format ``result``: returns text for table/csv/json to stdout when ``out`` is None, else writes ``out``."""
    import io
    import json

    if fmt == "parquet":
        if not out:
            raise ValueError("--format parquet needs --out FILE")
        import pyarrow.parquet as pq

        pq.write_table(result, out)
        return None
    if fmt == "csv":
        import csv

        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")  # standard minimal quoting: only values that need it
        writer.writerow(result.column_names)
        writer.writerows(zip(*_text_columns(result)))
        text = buf.getvalue()
    elif fmt == "json":
        text = json.dumps(result.to_pylist(), default=str, indent=1) + "\n"
    elif fmt == "table":
        text = format_table(result)
    else:
        raise ValueError(f"unknown format '{fmt}'; choose table, csv, json or parquet")
    if out:
        with open(out, "w") as fh:
            fh.write(text)
        return None
    return text


def _text_columns(t: pa.Table) -> list[list[str | None]]:
    """Every column as text, formatted as Arrow casts it (``true``, ``1.5``, ``2024-01-02 03:04:05``); lists,
    binaries and what Arrow cannot cast (structs, maps) as Python prints them; nulls stay ``None``."""
    import pyarrow.compute as pc

    cols = []
    for col in t.columns:
        if not (pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)):  # bytes print as Python's b'..'
            try:
                cols.append(pc.cast(col, pa.string()).to_pylist())
                continue
            except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
                pass
        cols.append([None if v is None else str(v) for v in col.to_pylist()])
    return cols


def format_table(t: pa.Table, *, max_rows: int = 200, max_width: int = 60) -> str:
    """A plain aligned text table (what a terminal user reads)."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            s = f"{v:.4f}"
        elif isinstance(v, (bytes, bytearray)):
            s = f"<{len(v)} bytes>"
        else:
            s = str(v)
        return s if len(s) <= max_width else s[: max_width - 3] + "..."

    rows = t.slice(0, max_rows).to_pylist()
    header = t.column_names
    body = [[cell(r[c]) for c in header] for r in rows]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)) for b in body]
    if t.num_rows > max_rows:
        lines.append(f"... {t.num_rows - max_rows} more rows (use --format csv --out FILE for all)")
    lines.append(f"({t.num_rows} row{'s' if t.num_rows != 1 else ''})")
    return "\n".join(lines) + "\n"
