"""Store safety: `featurelt sql` is read-only and reads nothing but the store; a damaged store log is an
error, never an empty store, and recovery never deletes logged data."""
from __future__ import annotations

import json
from pathlib import Path

import duckdb
import lance
import pytest

from featurelt.cli import main
from featurelt.store import ReadOnlyError, Store
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
