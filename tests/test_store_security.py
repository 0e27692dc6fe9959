"""Store safety: `featurelt sql` is read-only and reads nothing but the store; a damaged store log is an
error, never an empty store, and recovery never deletes logged data."""
from __future__ import annotations

import json
from pathlib import Path

import duckdb
import lance
import pytest

from featurelt.cli import main
from featurelt.store import ReadOnlyError, Store, StoreError
from featurelt.store.sql import connect


# ---------------------------------------------------------------- read-only SQL
def test_explain_analyze_copy_writes_no_file(digits_store: Path, tmp_path: Path) -> None:
    store = Store(digits_store)
    target = tmp_path / "leak.csv"
    for q in [f"EXPLAIN ANALYZE COPY (SELECT * FROM samples) TO '{target}'",
              f"/* note */ explain /* x */ analyze COPY samples TO '{target}' (FORMAT csv)",
              f"EXPLAIN (FORMAT json) COPY (SELECT 1) TO '{target}'",
              f"COPY (SELECT sample_id FROM samples) TO '{target}'"]:
        with pytest.raises(ReadOnlyError, match="featurelt sql is read-only: refused (EXPLAIN of )?a COPY statement"):
            store.sql(q)
    assert not target.exists()
    # EXPLAIN [ANALYZE] of a query still runs
    plan = store.sql("EXPLAIN ANALYZE SELECT count(*) FROM samples WHERE label = 3")
    assert "SEQ_SCAN" in str(plan.to_pylist()).upper() or "ARROW" in str(plan.to_pylist()).upper()
    assert store.sql("EXPLAIN SELECT 1").num_rows >= 1


@pytest.mark.parametrize("query", ["SELECT * FROM read_csv('/etc/passwd')", "SELECT * FROM read_text('/etc/passwd')",
                                   "SELECT * FROM glob('/etc/*')",
                                   "SELECT * FROM read_blob('{root}/commits.lance/_versions/*')",
                                   "SELECT * FROM read_csv('https://example.com/x.csv')"])
def test_outside_reads_are_refused(digits_store: Path, query: str) -> None:
    with pytest.raises(ReadOnlyError, match="featurelt sql reads only the store's tables: Permission Error"):
        Store(digits_store).sql(query.format(root=digits_store))


def test_a_file_name_is_not_a_table(digits_store: Path) -> None:
    with pytest.raises(ValueError, match="Table with name /etc/passwd does not exist.*tables: classes, samples"):
        Store(digits_store).sql("SELECT * FROM '/etc/passwd'")


@pytest.mark.parametrize("query, kind", [
    ("INSTALL httpfs", "LOAD"), ("INSTALL httpfs FROM 'https://extensions.duckdb.org'", "LOAD"),
    ("FORCE INSTALL httpfs", "LOAD"), ("LOAD httpfs", "LOAD"), ("ATTACH '{tmp}/x.db' AS x", "ATTACH"),
    ("SET enable_external_access = true", "SET"), ("RESET lock_configuration", "SET"),
    ("PRAGMA enable_profiling", "PRAGMA"), ("CREATE TABLE t AS SELECT 1", "CREATE"),
    ("INSERT INTO samples SELECT * FROM samples", "INSERT"), ("UPDATE samples SET label = 0", "UPDATE"),
    ("DELETE FROM samples", "DELETE"), ("EXPORT DATABASE '{tmp}/db'", "EXPORT"),
    ("IMPORT DATABASE '{tmp}/db'", "PRAGMA"), ("CALL pragma_version()", "CALL"),
    ("SELECT 1; DROP TABLE samples", "DROP"), ("EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1", "EXPLAIN of a CREATE"),
    ("EXPLAIN ANALYZE INSERT INTO samples SELECT * FROM samples", "EXPLAIN of a INSERT")])
def test_statements_that_are_not_queries_are_refused(digits_store: Path, tmp_path: Path, query: str,
                                                     kind: str) -> None:
    with pytest.raises(ReadOnlyError, match=f"read-only: refused (a )?{kind} statement"):
        Store(digits_store).sql(query.format(tmp=tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_connection_is_locked_even_without_the_statement_check(digits_store: Path, tmp_path: Path) -> None:
    """The second line of defence: the DuckDB connection itself can neither reach files nor be unlocked."""
    con = connect(Store(digits_store))
    target = tmp_path / "x.csv"
    with pytest.raises(duckdb.Error, match="locked"):
        con.execute("SET enable_external_access = true")
    with pytest.raises(duckdb.PermissionException):
        con.execute(f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{target}'")
    with pytest.raises(duckdb.PermissionException):
        con.execute("INSTALL httpfs")
    with pytest.raises(duckdb.PermissionException):
        con.execute(f"ATTACH '{tmp_path}/x.db'")
    assert con.execute("SELECT current_setting('enable_external_access')").fetchone() == (False,)
    assert con.execute("SELECT count(*) FROM samples").fetchone() == (1797,)  # the Lance views still scan
    assert not target.exists() and not (tmp_path / "x.db").exists()


def test_filters_and_projections_reach_lance(digits_store: Path, monkeypatch) -> None:
    calls = []
    scanner = lance.LanceDataset.scanner

    def recording(self, *args, **kwargs):
        calls.append(kwargs)
        return scanner(self, *args, **kwargs)

    monkeypatch.setattr(lance.LanceDataset, "scanner", recording)
    store = Store(digits_store)
    want = store.count("samples", "label = 3 AND split = 'test'")
    calls.clear()
    n = store.sql("SELECT count(sample_id) AS n FROM samples WHERE label = 3 AND split = 'test'")
    assert n.column("n").to_pylist() == [want] and 30 < want < 40  # about 20% of the 183 threes
    (call,) = calls
    assert sorted(call["columns"]) == ["label", "sample_id", "split"] or call["columns"] == ["sample_id"]
    assert "label" in str(call["filter"]) and "split" in str(call["filter"])


def test_readme_queries_still_run(digits_store: Path, capsys) -> None:
    root = str(digits_store)
    capsys.readouterr()
    assert main(["sql", "--store", root, "--format", "json", "SELECT c.bucket, count(*) AS n FROM samples s "
                 "JOIN classes c USING (label) WHERE s.split='train' GROUP BY 1 ORDER BY 1"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"bucket": "few", "n": 30}, {"bucket": "many", "n": 393},
                                                   {"bucket": "medium", "n": 139}]
    assert main(["sql", "--store", root, "--as-of", "1", "--format", "json",
                 "SELECT count(*) AS n FROM samples WHERE split = 'train'"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"n": 1437}]
    assert main(["sql", "--store", root, "--format", "json", "SELECT bucket, count(*) AS classes, "
                 "sum(train_count) AS images FROM classes GROUP BY bucket ORDER BY bucket"]) == 0
    rows = json.loads(capsys.readouterr().out)  # sum() of BIGINT is a HUGEINT, printed as a string
    assert [(r["bucket"], r["classes"], int(r["images"])) for r in rows] == [("few", 2, 30), ("many", 4, 393),
                                                                             ("medium", 4, 139)]
    assert main(["sql", "--store", root, "PIVOT (SELECT split, label FROM samples) ON split USING count(*)"]) == 0
    assert "train_unused" in capsys.readouterr().out
    assert main(["sql", "--store", root, "SELECT * FROM read_text('/etc/passwd')"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("featurelt sql: error: featurelt sql reads only the store's tables") and "Traceback" not in err


# ---------------------------------------------------------------- a damaged log never deletes data
def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (but the lock file) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".featurelt.lock"}


def newest_manifest(dataset: Path) -> Path:
    version = lance.dataset(str(dataset)).version  # Lance names it v.manifest, or (2**64 - 1 - v).manifest
    (path,) = [p for p in (dataset / "_versions").glob("*.manifest") if p.stem in {str(version), str(2**64 - 1 - version)}]
    return path


def image_folder(root: Path) -> Path:
    from PIL import Image

    for k, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (40 * k, 10 * i, 0)).save(root / name / f"{i}.png")
    return root


def test_damaged_log_is_an_error_and_deletes_nothing(digits_store: Path, tmp_path: Path, capsys) -> None:
    import shutil

    root = tmp_path / "store"
    shutil.copytree(digits_store, root)
    manifest = newest_manifest(root / "commits.lance")
    manifest.write_bytes(b"not a lance manifest" * 4)
    before = tree(root)
    capsys.readouterr()
    assert main(["log", "--store", str(root)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("featurelt log: error: cannot read ") and str(manifest) in err, err
    assert main(["--store", str(root), "ingest", str(image_folder(tmp_path / "images"))]) == 1
    err = capsys.readouterr().err
    assert err.startswith("featurelt ingest: error: cannot read ") and str(manifest) in err, err
    assert main(["sql", "--store", str(root), "SELECT count(*) FROM samples"]) == 1
    assert str(manifest) in capsys.readouterr().err
    assert tree(root) == before  # no table removed, no version added or restored
    with pytest.raises(StoreError, match="cannot read"):
        with Store(root).transaction("write") as tx:
            tx.append("classes", Store(root, as_of=1).read("classes"))
    assert tree(root) == before


class Transient(OSError):
    """What an object store's hiccup looks like to pylance."""


def failing(monkeypatch, table: str) -> None:
    real = lance.dataset

    def dataset(uri, *args, **kwargs):
        if str(uri).endswith(f"/{table}.lance"):
            raise Transient("Generic S3 error: connection reset by peer")
        return real(uri, *args, **kwargs)

    monkeypatch.setattr(lance, "dataset", dataset)


@pytest.mark.parametrize("unreadable", ["commits", "samples", "emb_x"])
def test_transient_read_error_fails_the_write_and_drops_nothing(tmp_store: Store, monkeypatch, unreadable) -> None:
    from tests.test_store import emb, samples

    with tmp_store.transaction("v1") as tx:
        tx.append("samples", samples(4))
        tx.append("emb_x", emb(["s00000", "s00001"]))
    root = Path(tmp_store.root)
    before = tree(root)
    failing(monkeypatch, unreadable)
    with pytest.raises(StoreError, match=f"cannot read {root}/{unreadable}.lance.*connection reset by peer"):
        with Store(root).transaction("v2") as tx:
            tx.append("samples", samples(2, 10))
            tx.append("emb_x", emb(["s00010"]))
            tx.append("emb_new", emb(["s00010"]))
    monkeypatch.undo()
    after = Store(root)
    assert after.version == 1 and after.count("samples") == 4 and after.count("emb_x") == 2
    now = tree(root)
    if unreadable == "commits":
        assert now == before  # it failed before writing anything
    # every file of a logged version is still there, unchanged (the undone versions are newer ones)
    assert all(now.get(p) == data for p, data in before.items() if not p.endswith("latest_version_hint.json"))
    with after.transaction("v3") as tx:  # and the next write recovers what the failed one left
        tx.append("emb_new", emb(["s00010"]))
    assert Store(root).count("samples") == 4 and Store(root).count("emb_new") == 1


def test_recovery_removes_only_what_no_store_version_names(tmp_store: Store) -> None:
    """A table the log does not name is what a killed command created: the next write to it starts it
    afresh. A table the log names is never removed, even when the transaction's view of the log is
    older than the log (another writer committed meanwhile)."""
    from tests.test_store import emb, samples

    with tmp_store.transaction("v1") as tx:
        tx.append("samples", samples(2))
    lance.write_dataset(emb(["s00000"]), tmp_store.uri("emb_killed"))  # a command killed before its log row
    with tmp_store.transaction("v2") as tx:
        tx.append("samples", samples(2, 10))
    with tmp_store.transaction("v3") as tx:
        tx.append("emb_killed", emb(["s00010", "s00011"]))
    assert Store(tmp_store.root).count("emb_killed") == 2 and lance.dataset(tmp_store.uri("emb_killed")).version == 1
    with tmp_store.transaction("v4") as tx:
        tx.base_versions.pop("emb_killed")  # as if v3 had been committed by another writer after we began
        with pytest.raises(StoreError, match=r"not removing .*emb_killed.lance: the store log refers to it "
                                             r"\(store versions 3\)"):
            tx.append("emb_killed", emb(["s00012"]))
        tx.discard()
    assert Store(tmp_store.root).count("emb_killed") == 2


def test_only_a_missing_dataset_is_absent() -> None:
    from featurelt.store.core import _not_found

    assert _not_found(ValueError("Dataset at path b/t.lance was not found: Not found: b/t.lance/_versions, x.rs:1"))
    assert not _not_found(ValueError("Dataset at path b/t.lance/_versions/9.manifest was not found: Not found"))
    assert not _not_found(ValueError("LanceError(IO): file size is too small"))
    assert not _not_found(OSError("Generic S3 error: connection reset by peer"))
