"""The versioned feature store: one Lance dataset per table and one store log (SQL on top: store/sql.py).

Layout of a store at ``ROOT`` (a local directory or any URI pylance accepts)::

    ROOT/samples.lance  classes.lance  rejects.lance  emb_<name>.lance  ...
    ROOT/commits.lance   store log: one row per successful command -> {table: lance version}
    ROOT/tags.lance      named store versions

Every table opens with plain ``lance.dataset(ROOT + "/samples.lance")`` or
``lancedb.connect(ROOT).open_table("samples")``. A command writes through a
:class:`Transaction`: each table it touches gets one Lance commit (carrying the command line as
its commit message), and only when all of them succeed is a row appended to ``commits`` -- the
single atomic step that makes the new versions visible to featurelt. If the command fails, the
touched tables are restored to their previous versions; if the process is killed, the next
transaction finds Lance versions newer than the log and restores them before writing.

No torch here: the store layer is pure Arrow / Lance / DuckDB.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import lance
import pyarrow as pa

from featurelt.store.schema import EMBEDDING_PREFIX, SchemaError, arrow_schema, conform, embedding_params, table_kind

DEFAULT_STORE = "./featurelt-store"
LOG_TABLE = "commits"
TAG_TABLE = "tags"
SYSTEM_TABLES = (LOG_TABLE, TAG_TABLE)

Data = pa.Table | pa.RecordBatch | pa.RecordBatchReader | Iterable[pa.RecordBatch]


class StoreError(RuntimeError):
    """A store operation that cannot be done (missing table, unknown version or tag, ...)."""


def utcnow() -> datetime:
    """Naive UTC timestamp, the form stored in ``timestamp[us]`` columns."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def rejects_table(*, command: str, stage: str, rows: list[dict[str, Any]]) -> pa.Table:
    """Rows of the ``rejects`` table (schemas/rejects.json), one per refused input, all stamped with one
    time: each dict gives ``location`` and ``reason``, and may give ``row`` (1-based line of a manifest)
    and ``sample_id``."""
    now, n = utcnow(), len(rows)
    return pa.table({"command": [command] * n, "stage": [stage] * n, "location": [r["location"] for r in rows],
                     "row": pa.array([r.get("row") for r in rows], pa.int64()),
                     "sample_id": pa.array([r.get("sample_id") for r in rows], pa.string()),
                     "reason": [r["reason"] for r in rows], "time": pa.array([now] * n, pa.timestamp("us"))})


def command_line() -> str:
    """The command line of this process, used as the default commit message."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(("featurelt", "featurelt/__main__.py", "cli.py")):
        argv[0] = "featurelt"
    return " ".join(argv)


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _manifests(uri: str) -> dict[int, Path]:
    """``{lance version: manifest file}`` of a local dataset (``{}`` when there is none)."""
    out = {}
    for f in Path(uri.removeprefix("file://"), "_versions").glob("*.manifest"):
        if f.stem.isdigit():
            n = int(f.stem)  # Lance's V2 naming stores u64::MAX - version, so the newest sorts first
            out[n if n < 2**63 else 2**64 - 1 - n] = f
    return out


def _describe(uri: str, version: int | None) -> str:
    """``uri`` and, for a local dataset, the manifest file that holds ``version`` (default: the newest)."""
    if not _is_local(uri):
        return uri if version is None else f"{uri} (version {version})"
    manifests = _manifests(uri)
    if version is None and manifests:
        version = max(manifests)
    if version in manifests:
        return f"{uri} (manifest of version {version}: {manifests[version]})"
    return uri if version is None else f"{uri} (version {version}: no manifest in {uri}/_versions)"


def _not_found(exc: Exception) -> bool:
    """Whether Lance's error says the dataset does not exist (no versions at all), not that it failed."""
    match = re.search(r"Dataset at path (\S+) was not found", str(exc))
    return isinstance(exc, ValueError) and match is not None and not match.group(1).endswith(".manifest")


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0] or type(exc).__name__


@dataclass(frozen=True)
class Commit:
    """One row of the store log."""

    store_version: int
    time: datetime
    message: str
    tables: dict[str, int]
    changed: list[str]


class Store:
    """A featurelt store rooted at ``path`` (default ``$FEATURELT_STORE`` or ``./featurelt-store``).

    ``as_of`` pins every read to a store version (int) or tag name (str); ``None`` reads the latest.
    ``store.sql(query) -> pa.Table`` (read-only DuckDB SQL over the tables) comes from the layer above,
    :func:`featurelt.store.sql.run_sql`, attached in ``featurelt/store/__init__.py``: this module does not
    import the SQL layer.
    """

    sql: Callable[[str], pa.Table]

    def __init__(self, path: str | os.PathLike[str] | None = None, *, as_of: int | str | None = None,
                 storage_options: dict[str, str] | None = None) -> None:
        root = str(path if path is not None else os.environ.get("FEATURELT_STORE", DEFAULT_STORE))
        if _is_local(root):
            root = str(Path(root.removeprefix("file://")).expanduser().resolve())
        self.root = root.rstrip("/")
        self.storage_options = storage_options
        self._as_of = as_of
        self._pinned: Commit | None = None  # resolved lazily

    def __repr__(self) -> str:
        return f"Store({self.root!r}, as_of={self._as_of!r})"

    # ------------------------------------------------------------------ paths / raw datasets
    def uri(self, table: str) -> str:
        """URI of a table's Lance dataset: ``ROOT/<table>.lance``."""
        return f"{self.root}/{table}.lance"

    def _raw(self, table: str, version: int | None = None) -> lance.LanceDataset | None:
        """The table's Lance dataset (latest or ``version``); ``None`` only when it does not exist at all.

        Anything else that stops it opening (a damaged manifest, a missing version, a transient
        object-store error) is a :class:`StoreError` naming the file: reading such a table as absent
        would make the log look empty and recovery drop logged tables.
        """
        uri = self.uri(table)
        if version is None and _is_local(uri) and not _manifests(uri):
            return None
        try:
            return lance.dataset(uri, version=version, storage_options=self.storage_options)
        except Exception as exc:
            if version is None and not _is_local(uri) and _not_found(exc):
                return None
            raise StoreError(f"cannot read {_describe(uri, version)}: {_first_line(exc)}") from exc

    # ------------------------------------------------------------------ the log
    def log(self) -> list[Commit]:
        """All commits of the store, oldest first (``[]`` only for a store that has never been written).
        A log that exists but cannot be read is a :class:`StoreError` naming the file."""
        ds = self._raw(LOG_TABLE)
        if ds is None:
            return []
        try:
            rows = ds.to_table().sort_by("store_version").to_pylist()
            return [Commit(r["store_version"], r["time"], r["message"], json.loads(r["tables"]),
                           [c for c in r["changed"].split(",") if c]) for r in rows]
        except Exception as exc:
            raise StoreError(f"cannot read the store log {_describe(self.uri(LOG_TABLE), ds.version)}: "
                             f"{_first_line(exc)}") from exc

    def head(self) -> Commit | None:
        """The latest commit, or ``None`` for an empty store."""
        log = self.log()
        return log[-1] if log else None

    def resolve(self, as_of: int | str | None) -> Commit | None:
        """The commit named by a store version number, a tag, or ``None`` (latest)."""
        if as_of is None or as_of == "latest":
            return self.head()
        log = self.log()
        if isinstance(as_of, str) and as_of.lstrip("-").isdigit():
            as_of = int(as_of)
        if isinstance(as_of, int):
            if as_of < 0:  # -1 = previous, like python indexing from the end
                if -as_of > len(log):
                    raise StoreError(f"store has {len(log)} versions; cannot go back {-as_of}")
                return log[as_of - 1] if as_of != 0 else log[-1]
            for c in log:
                if c.store_version == as_of:
                    return c
            raise StoreError(f"store {self.root} has no version {as_of}; versions are 1..{len(log)}")
        tags = {t["name"]: t["store_version"] for t in self.tags()}
        if as_of not in tags:
            raise StoreError(f"unknown tag or version '{as_of}'; tags: {', '.join(sorted(tags)) or '(none)'}")
        return self.resolve(tags[as_of])

    @property
    def pinned(self) -> Commit | None:
        """The commit reads are pinned to (resolved once per Store object, refreshed after writes)."""
        if self._pinned is None:
            self._pinned = self.resolve(self._as_of)
        return self._pinned

    @property
    def version(self) -> int:
        """Store version reads see (0 for an empty store)."""
        return self.pinned.store_version if self.pinned else 0

    def table_versions(self) -> dict[str, int]:
        """``{table: lance version}`` at the pinned store version."""
        return dict(self.pinned.tables) if self.pinned else {}

    def refresh(self) -> None:
        """Forget the resolved version (after a write, to see the new head)."""
        self._pinned = None

    # ------------------------------------------------------------------ reading
    def tables(self) -> list[str]:
        """Tables present at the pinned version (system tables excluded)."""
        return sorted(self.table_versions())

    def has_table(self, table: str) -> bool:
        return table in self.table_versions()

    def dataset(self, table: str) -> lance.LanceDataset:
        """The table's Lance dataset checked out at the pinned version."""
        versions = self.table_versions()
        if table not in versions:
            have = ", ".join(sorted(versions)) or "(none: run `featurelt ingest` first)"
            raise StoreError(f"table '{table}' does not exist in store {self.root} at version {self.version}; tables: {have}")
        ds = self._raw(table, versions[table])
        if ds is None:
            raise StoreError(f"table '{table}' is in the store log but {self.uri(table)} cannot be opened")
        return ds

    def scan(self, table: str, *, columns: list[str] | None = None, filter: str | None = None,
             batch_size: int = 8192) -> Iterator[pa.RecordBatch]:
        """Stream a table in record batches (memory independent of table size)."""
        yield from self.dataset(table).to_batches(columns=columns, filter=filter, batch_size=batch_size)

    def read(self, table: str, *, columns: list[str] | None = None, filter: str | None = None) -> pa.Table:
        """Read (a projection / filter of) a table into memory."""
        return self.dataset(table).to_table(columns=columns, filter=filter)

    def count(self, table: str, filter: str | None = None) -> int:
        if not self.has_table(table):
            return 0
        return self.dataset(table).count_rows(filter=filter)

    def embedding_sets(self) -> list[str]:
        """Names of embedding sets (tables ``emb_<name>``) at the pinned version."""
        return [t[len(EMBEDDING_PREFIX):] for t in self.tables() if t.startswith(EMBEDDING_PREFIX)]

    # ------------------------------------------------------------------ versions and tags
    def versions(self, table: str | None = None) -> list[dict[str, Any]]:
        """Lance versions of one table (or all), with time, rows and commit message."""
        names = [table] if table else [t for t in self.tables()]
        # Lance versions a committed command made: its final one, and the steps before it
        # (a command may write a table more than once, e.g. several updates)
        logged: dict[tuple[str, int], tuple[str, str]] = {}  # (table, version) -> (label, command)
        previous: dict[str, int] = {}
        for c in self.log():
            for t in c.changed:
                final = c.tables[t]
                for v in range(previous.get(t, 0) + 1, final):
                    logged.setdefault((t, v), (f"[store v{c.store_version}, intermediate step] {c.message}", c.message))
                logged[(t, final)] = (f"[store v{c.store_version}] {c.message}", c.message)
            previous.update(c.tables)
        out = []
        for name in names:
            ds = self._raw(name)
            if ds is None:
                raise StoreError(f"table '{name}' does not exist in store {self.root}")
            messages = {}
            for v in ds.versions():
                with contextlib.suppress(Exception):
                    tx = ds.read_transaction(v["version"])
                    messages[v["version"]] = (tx.transaction_properties or {}).get("__lance_commit_message", "")
            for v in ds.versions():
                own = messages.get(v["version"], "")
                label, command = logged.get((name, v["version"]), ("", ""))
                if not label or (own and own != command):  # a step of a command that failed or was killed
                    label = f"(not in store log: rolled back or interrupted) {own}".strip()
                out.append({"table": name, "version": v["version"], "time": v["timestamp"],
                            "rows": int(v["metadata"].get("total_rows", 0)), "message": label})
        return sorted(out, key=lambda r: (r["time"], r["table"]))

    def tags(self) -> list[dict[str, Any]]:
        ds = self._raw(TAG_TABLE)
        return ds.to_table().to_pylist() if ds is not None else []

    def tag(self, name: str) -> int:
        """Name the current store version (all tables' current versions). Returns that version."""
        head = self.head()
        if head is None:
            raise StoreError(f"store {self.root} is empty; nothing to tag")
        if name.lstrip("-").isdigit() or name == "latest":
            raise StoreError(f"tag name '{name}' is reserved (numbers and 'latest' name versions)")
        if any(t["name"] == name for t in self.tags()):
            raise StoreError(f"tag '{name}' exists already")
        with self._lock():
            row = pa.table({"name": [name], "store_version": [head.store_version], "time": [utcnow()]})
            self._write_raw(TAG_TABLE, conform(row, arrow_schema(TAG_TABLE), table=TAG_TABLE),
                            message=f"tag {name}")
            for table, version in head.tables.items():  # Lance-native tags too, for other clients (best effort)
                with contextlib.suppress(Exception):
                    self.dataset(table).tags.create(name, version)
        return head.store_version

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """One writer at a time (a file lock for local stores; object stores rely on Lance's commits)."""
        if not _is_local(self.root):
            yield
            return
        Path(self.root).mkdir(parents=True, exist_ok=True)
        with open(Path(self.root) / ".featurelt.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _write_raw(self, table: str, data: Any, *, message: str, mode: str = "append",
                   schema: pa.Schema | None = None) -> lance.LanceDataset:
        exists = self._raw(table) is not None
        return lance.write_dataset(data, self.uri(table), schema=schema, mode=mode if exists else "create",
                                   commit_message=message, storage_options=self.storage_options)

    @contextlib.contextmanager
    def transaction(self, message: str | None = None) -> Iterator["Transaction"]:
        """All-or-nothing write of one command: ``with store.transaction() as tx: tx.append(...)``.

        Reads through ``store`` inside the block see the latest committed state, read after the store
        lock was taken: a decision made from them (labels to assign, rows already present, what is left
        to embed) cannot be raced by another writer of the same local store.
        """
        if self._as_of is not None:
            raise StoreError(f"this Store is pinned to --as-of {self._as_of}; writes go to the latest version only")
        with self._lock():
            self.refresh()
            tx = Transaction(self, message or command_line())
            try:
                yield tx
                if tx.discarded:
                    tx._rollback()
                else:
                    tx._commit()
            except BaseException:
                tx._rollback()
                raise
            finally:
                self.refresh()


class Transaction:
    """The writes of one command. Created by :meth:`Store.transaction`; do not build directly."""

    def __init__(self, store: Store, message: str) -> None:
        self.store = store
        self.message = message
        self.head = store.head()
        self.base_versions = dict(self.head.tables) if self.head else {}
        self.new_versions: dict[str, int] = {}
        self._reconciled: set[str] = set()
        self._stream_errors: list[BaseException] = []
        self.discarded = False

    def discard(self) -> None:
        """End the block without a store version: the writes made so far are rolled back, as on an
        error, but without raising (e.g. an ingest that found nothing new)."""
        self.discarded = True

    # -- helpers
    def _prepare(self, table: str) -> lance.LanceDataset | None:
        """Bring ``table`` back to its logged version if a killed command left newer Lance versions.

        Only versions newer than the logged one are undone (restored over, never deleted), and only a
        table no store version refers to is removed: anything else that disagrees with the log is a
        :class:`StoreError`.
        """
        if table in SYSTEM_TABLES:
            raise StoreError(f"'{table}' is a system table")
        ds = self.store._raw(table)
        if table in self._reconciled:
            return ds
        logged = self.base_versions.get(table)
        if ds is None and logged is not None:
            raise StoreError(f"table '{table}' is at Lance version {logged} in the store log, but "
                             f"{self.store.uri(table)} does not exist; not writing to it")
        if ds is not None and logged is None:
            # created by a command that never committed: not part of the store
            self._drop(table)
            ds = None
        elif ds is not None and ds.version != logged:
            ds = self._restore(table, ds, logged)
        self._reconciled.add(table)
        return ds

    def _restore(self, table: str, ds: lance.LanceDataset, logged: int) -> lance.LanceDataset:
        """Undo the Lance versions of ``table`` newer than ``logged`` (a new version with the logged rows)."""
        if ds.version < logged:
            raise StoreError(f"table '{table}' is at Lance version {ds.version} but the store log says {logged} "
                             f"({_describe(self.store.uri(table), None)}): versions are missing; not writing to it")
        self.store._raw(table, logged).restore()
        return self.store._raw(table)

    def _drop(self, table: str) -> None:
        """Remove a table that no logged store version refers to (what a killed or failed command created);
        refuse one the log names."""
        uri = self.store.uri(table)
        log = self.store.log()  # read again: what is logged now, not what was logged when we began
        if any(table in c.tables for c in log):
            raise StoreError(f"not removing {uri}: the store log refers to it (store versions "
                             f"{', '.join(str(c.store_version) for c in log if table in c.tables)})")
        if _is_local(self.store.root):
            shutil.rmtree(uri.removeprefix("file://"))
        elif self.store._raw(table) is not None:
            lance.LanceDataset.drop(uri, storage_options=self.store.storage_options)  # type: ignore[attr-defined]

    def schema_for(self, table: str, sample: pa.Schema | None = None, **params: Any) -> pa.Schema:
        """The Arrow schema a write to ``table`` must have (embedding params from the table or ``params``)."""
        if table_kind(table) == "embeddings" and not params:
            ds = self.store._raw(table)
            if ds is not None and table in self.base_versions:
                params = embedding_params(ds.schema)
            elif sample is not None and "vector" in sample.names:
                vtype = sample.field("vector").type
                params = {"dim": getattr(vtype, "list_size", -1),
                          "dtype": "float16" if vtype.value_type == pa.float16() else "float32"}
        return arrow_schema(table, **params)

    def _reader(self, table: str, data: Data, schema_params: dict[str, Any]) -> tuple[pa.RecordBatchReader, list[int]]:
        """A validating reader over ``data``; the returned list receives the row count as it streams."""
        if isinstance(data, pa.Table):
            batches: Iterable[pa.RecordBatch] = data.to_batches()
            first_schema = data.schema
        elif isinstance(data, pa.RecordBatch):
            batches, first_schema = [data], data.schema
        else:
            it = iter(data)
            try:
                first = next(it)
            except StopIteration:
                first = None
            first_schema = first.schema if first is not None else None

            def chain() -> Iterator[pa.RecordBatch]:
                if first is not None:
                    yield first
                yield from it

            batches = chain()
        schema = self.schema_for(table, first_schema, **schema_params)
        counter = [0]
        errors = self._stream_errors

        def gen() -> Iterator[pa.RecordBatch]:
            try:
                for b in batches:
                    b = conform(b, schema, table=table)
                    counter[0] += b.num_rows
                    if b.num_rows:
                        yield b
            except BaseException as exc:  # Lance wraps errors raised in the stream; keep the original
                errors.append(exc)
                raise

        return pa.RecordBatchReader.from_batches(schema, gen()), counter

    @contextlib.contextmanager
    def _unwrap(self) -> Iterator[None]:
        """Re-raise the original error of a failed input stream instead of Lance's wrapper."""
        self._stream_errors.clear()
        try:
            yield
        except Exception:
            if self._stream_errors:
                raise self._stream_errors[0] from None
            raise

    def _record(self, table: str, ds: lance.LanceDataset) -> None:
        self.new_versions[table] = ds.version

    # -- operations
    def append(self, table: str, data: Data, **schema_params: Any) -> int:
        """Append rows (a table, batch, reader or iterator of batches, streamed). Returns rows written."""
        self._prepare(table)
        reader, counter = self._reader(table, data, schema_params)
        ds = self.store._raw(table)
        with self._unwrap():
            ds = lance.write_dataset(reader, self.store.uri(table) if ds is None else ds,
                                     mode="create" if ds is None else "append", commit_message=self.message,
                                     storage_options=self.store.storage_options)
        self._record(table, ds)
        return counter[0]

    def overwrite(self, table: str, data: Data, **schema_params: Any) -> int:
        """Replace a table's rows (a new version; old versions stay readable with --as-of)."""
        self._prepare(table)
        reader, counter = self._reader(table, data, schema_params)
        ds = self.store._raw(table)
        with self._unwrap():
            ds = lance.write_dataset(reader, self.store.uri(table), mode="overwrite" if ds is not None else "create",
                                     commit_message=self.message, storage_options=self.store.storage_options)
        self._record(table, ds)
        return counter[0]

    def insert_new(self, table: str, data: Data, *, on: str | list[str] = "sample_id", **schema_params: Any) -> int:
        """Insert only rows whose key ``on`` is not yet in the table (Lance merge-insert). Returns rows inserted."""
        ds = self._prepare(table)
        if ds is None:
            return self.append(table, data, **schema_params)
        reader, _ = self._reader(table, data, schema_params)
        with self._unwrap():
            stats = ds.merge_insert(on).when_not_matched_insert_all().execute(reader)
        self._record(table, self.store._raw(table))
        return int(stats.get("num_inserted_rows", 0))

    def reconcile(self, table: str) -> str:
        """Undo what killed commands left in ``table`` (as the first write would) and return its URI.

        Call it before other processes write fragments for :meth:`append_fragments` into the
        table's directory, so that this clean-up cannot remove them.
        """
        self._prepare(table)
        return self.store.uri(table)

    def append_fragments(self, table: str, fragments: list[Any], schema: pa.Schema) -> int:
        """Commit Lance fragments written elsewhere (``lance.fragment.write_fragments``, e.g. by Ray
        workers) to ``table`` as one new version. ``schema`` must be the table's schema. Returns rows added."""
        ds = self._prepare(table)
        expected = self.schema_for(table, schema)
        if not schema.equals(expected, check_metadata=False):
            raise SchemaError(f"table '{table}': fragments have schema {schema}, expected {expected}")
        if ds is not None and not ds.schema.equals(expected, check_metadata=False):
            raise SchemaError(f"table '{table}': fragments have schema {schema}, the table has {ds.schema}")
        fragments = list(fragments)
        if ds is None:
            op = lance.LanceOperation.Overwrite(expected, fragments)
            ds = lance.LanceDataset.commit(self.store.uri(table), op, commit_message=self.message,
                                           storage_options=self.store.storage_options)
        else:
            op = lance.LanceOperation.Append(fragments)
            ds = lance.LanceDataset.commit(ds, op, read_version=ds.version, commit_message=self.message,
                                           storage_options=self.store.storage_options)
        self._record(table, ds)
        return sum(int(f.physical_rows or 0) - (f.deletion_file.num_deleted_rows if f.deletion_file else 0)
                   for f in fragments)

    def update(self, table: str, values: dict[str, str], where: str | None = None) -> int:
        """SQL-expression update (``values={"split": "'train_unused'"}``). Returns rows updated."""
        ds = self._prepare(table)
        if ds is None:
            raise StoreError(f"cannot update missing table '{table}'")
        stats = ds.update(values, where=where)
        self._record(table, self.store._raw(table))
        return int(stats.get("num_rows_updated", 0)) if isinstance(stats, dict) else 0

    def delete(self, table: str, where: str) -> None:
        ds = self._prepare(table)
        if ds is None:
            return
        ds.delete(where)
        self._record(table, self.store._raw(table))

    # -- end
    def _commit(self) -> None:
        if not self.new_versions:
            return
        tables = dict(self.base_versions)
        tables.update(self.new_versions)
        version = (self.head.store_version if self.head else 0) + 1
        row = pa.table({"store_version": [version], "time": [utcnow()], "message": [self.message],
                        "tables": [json.dumps(tables, sort_keys=True)],
                        "changed": [",".join(sorted(self.new_versions))]})
        self.store._write_raw(LOG_TABLE, conform(row, arrow_schema(LOG_TABLE), table=LOG_TABLE),
                              message=self.message)

    def _rollback(self) -> None:
        """Best effort after a failed command: undo this transaction's versions (the next transaction's
        :meth:`_prepare` finishes what cannot be done now, e.g. after a transient read error)."""
        for table in self.new_versions:
            logged = self.base_versions.get(table)
            with contextlib.suppress(Exception):
                if logged is None:
                    self._drop(table)
                else:
                    ds = self.store._raw(table)
                    if ds is not None and ds.version != logged:
                        self._restore(table, ds, logged)


def open_store(path: str | os.PathLike[str] | None = None, *, as_of: int | str | None = None) -> Store:
    """``Store(path, as_of=as_of)``."""
    return Store(path, as_of=as_of)


__all__ = ["Store", "Transaction", "Commit", "StoreError", "SchemaError", "open_store", "utcnow", "command_line"]
