"""Store core: schemas, all-or-nothing transactions, versions, tags, time travel, SQL."""
from __future__ import annotations

import json

import lance
import pyarrow as pa
import pytest

from featurelt.cli import main
from featurelt.store import ReadOnlyError, SchemaError, Store, StoreError
from featurelt.store.schema import arrow_schema, conform, parse_type, schema_json, table_names


def samples(n: int, offset: int = 0, *, split: str = "train") -> pa.Table:
    ids = [f"s{i:05d}" for i in range(offset, offset + n)]
    return pa.table({
        "sample_id": ids, "dataset": ["t"] * n, "split": [split] * n,
        "label": pa.array([i % 3 for i in range(offset, offset + n)], pa.int32()),
        "source": ["original"] * n, "uri": [None] * n, "image": [b"\x89PNG"] * n,
        "content_sha256": ids, "width": [1] * n, "height": [1] * n, "description": [None] * n,
    })


def emb(ids: list[str], dim: int = 4) -> pa.Table:
    flat = pa.array([float(i) for i in range(len(ids) * dim)], pa.float32())
    return pa.table({"sample_id": ids, "view": pa.array([0] * len(ids), pa.int32()),
                     "aug_strength": pa.array([0.0] * len(ids), pa.float32()),
                     "fingerprint": ["fp"] * len(ids),
                     "vector": pa.FixedSizeListArray.from_arrays(flat, dim)})


@pytest.fixture()
def store(tmp_path) -> Store:
    return Store(tmp_path / "store")


# ---------------------------------------------------------------- schemas
def test_every_schema_file_is_complete() -> None:
    for name in table_names():
        spec = schema_json(name)
        assert spec["table"] == name and spec["schema_version"] >= 1
        for f in spec["fields"]:
            assert set(f) == {"name", "type", "nullable", "description"}, (name, f)
            assert f["description"], (name, f["name"])
        params = {"dim": 8} if name == "embeddings" else {}
        schema = arrow_schema("emb_x" if name == "embeddings" else name, **params)
        assert [f.name for f in schema] == [f["name"] for f in spec["fields"]]


def test_top_level_schemas_are_the_package_schemas() -> None:
    """``schemas/`` at the top of the repo (for readers) and ``featurelt/schemas/`` (installed) are one set."""
    from pathlib import Path

    from featurelt.store.schema import SCHEMA_DIR

    top = Path(__file__).resolve().parents[1] / "schemas"
    assert sorted(p.name for p in top.glob("*.json")) == sorted(p.name for p in SCHEMA_DIR.glob("*.json"))
    for p in top.glob("*.json"):
        assert p.read_text() == (SCHEMA_DIR / p.name).read_text(), p.name


def test_parse_type() -> None:
    assert parse_type("fixed_size_list<float16>[12]") == pa.list_(pa.float16(), 12)
    assert parse_type("list<int32>") == pa.list_(pa.int32())
    with pytest.raises(ValueError, match="unknown type 'complex'"):
        parse_type("complex")


# ---------------------------------------------------------------- transactions and versions
def test_append_creates_readable_lance_tables(store: Store) -> None:
    with store.transaction("first") as tx:
        assert tx.append("samples", samples(5)) == 5
    assert store.version == 1 and store.count("samples") == 5
    # any Lance client opens the table directly
    assert lance.dataset(store.uri("samples")).count_rows() == 5
    lancedb = pytest.importorskip("lancedb")
    assert lancedb.connect(store.root).open_table("samples").count_rows() == 5


def test_failed_command_leaves_latest_versions_unchanged(store: Store) -> None:
    with store.transaction("ok") as tx:
        tx.append("samples", samples(3))
    with pytest.raises(RuntimeError, match="boom"):
        with store.transaction("fails") as tx:
            tx.append("samples", samples(4, 100))
            tx.append("emb_new", emb(["a"]))
            raise RuntimeError("boom")
    fresh = Store(store.root)
    assert fresh.version == 1 and fresh.count("samples") == 3
    assert not fresh.has_table("emb_new")
    # the Lance table itself was restored, so plain lance readers agree
    assert lance.dataset(store.uri("samples")).count_rows() == 3


def test_schema_mismatch_names_field_and_commits_nothing(store: Store) -> None:
    with store.transaction("ok") as tx:
        tx.append("samples", samples(2))
    bad = samples(2, 10).set_column(3, "label", pa.array(["x", "y"]))
    with pytest.raises(SchemaError, match="field 'label' must be int32, got string"):
        with store.transaction("bad") as tx:
            tx.append("samples", iter(bad.to_batches()))
    missing = samples(2, 20).drop_columns(["split"])
    with pytest.raises(SchemaError, match=r"missing field\(s\) \['split'\]"):
        with store.transaction("bad") as tx:
            tx.append("samples", missing)
    nulls = samples(3, 30).set_column(0, "sample_id", pa.array(["a", None, "c"]))
    with pytest.raises(SchemaError, match="'sample_id' may not be null; 1 null value\\(s\\), first at row 1"):
        with store.transaction("bad") as tx:
            tx.append("samples", nulls)
    assert Store(store.root).count("samples") == 2 and Store(store.root).version == 1


def test_streamed_append_of_batches(store: Store) -> None:
    def gen():
        for i in range(5):
            yield samples(10, i * 10).to_batches()[0]

    with store.transaction("stream") as tx:
        assert tx.append("samples", gen()) == 50
    assert store.count("samples") == 50


def test_insert_new_skips_existing_keys(store: Store) -> None:
    with store.transaction("a") as tx:
        tx.append("samples", samples(5))
    with store.transaction("b") as tx:
        assert tx.insert_new("samples", samples(8)) == 3
    assert store.count("samples") == 8


def test_killed_command_is_reconciled(store: Store) -> None:
    """A Lance commit without its store-log row (process killed in between) is undone by the next write."""
    with store.transaction("a") as tx:
        tx.append("samples", samples(2))
    orphan = conform(samples(7, 50), arrow_schema("samples"), table="samples")
    lance.write_dataset(orphan, store.uri("samples"), mode="append")  # orphan version
    assert Store(store.root).count("samples") == 2  # reads follow the log, not the orphan
    with store.transaction("b") as tx:
        tx.append("samples", samples(1, 90))
    assert Store(store.root).count("samples") == 3


def test_time_travel_and_tags(store: Store, capsys) -> None:
    with store.transaction("v1") as tx:
        tx.append("samples", samples(2))
    store.tag("balanced")
    with store.transaction("v2") as tx:
        tx.update("samples", {"split": "'train_unused'"}, where="sample_id = 's00000'")
        tx.append("emb_x", emb(["s00000", "s00001"]))
    assert Store(store.root).count("samples", "split = 'train'") == 1
    old = Store(store.root, as_of="balanced")
    assert old.version == 1 and old.count("samples", "split = 'train'") == 2
    assert not old.has_table("emb_x")
    assert Store(store.root, as_of=2).has_table("emb_x")
    assert Store(store.root, as_of=-1).version == 1
    with pytest.raises(StoreError, match="unknown tag or version 'nope'"):
        Store(store.root, as_of="nope").version
    with pytest.raises(StoreError, match="no version 9"):
        Store(store.root, as_of=9).version
    with pytest.raises(StoreError, match="pinned"):
        with old.transaction("x"):
            pass
    # the Lance-native tag exists on every table that existed
    assert lance.dataset(store.uri("samples")).tags.list()["balanced"]["version"] == 1


def test_versions_lists_message_rows_and_time(store: Store) -> None:
    with store.transaction("featurelt ingest a") as tx:
        tx.append("samples", samples(2))
    with store.transaction("featurelt ingest b") as tx:
        tx.append("samples", samples(3, 10))
    rows = store.versions("samples")
    assert [(r["version"], r["rows"]) for r in rows] == [(1, 2), (2, 5)]
    assert rows[0]["message"] == "[store v1] featurelt ingest a"
    assert rows[1]["message"] == "[store v2] featurelt ingest b"


# ---------------------------------------------------------------- SQL
def test_sql_views_and_read_only(store: Store) -> None:
    with store.transaction("a") as tx:
        tx.append("samples", samples(6))
        tx.append("emb_tiny", emb([f"s{i:05d}" for i in range(4)]))
    out = store.sql("SELECT label, count(*) AS n FROM samples GROUP BY label ORDER BY label")
    assert out.to_pydict() == {"label": [0, 1, 2], "n": [2, 2, 2]}
    joined = store.sql("SELECT count(*) AS n FROM emb_tiny e JOIN samples s USING (sample_id) WHERE s.label = 0")
    assert joined.column("n").to_pylist() == [2]
    for stmt in ["DELETE FROM samples", "CREATE TABLE t AS SELECT 1", "COPY samples TO '/tmp/x.csv'",
                 "INSERT INTO samples SELECT * FROM samples", "ATTACH 'x.db'", "SELECT 1; DROP TABLE samples"]:
        with pytest.raises(ReadOnlyError, match="read-only"):
            store.sql(stmt)
    with pytest.raises(ValueError, match="tables: emb_tiny, samples"):
        store.sql("SELECT * FROM nosuchtable")


def test_sql_as_of(store: Store) -> None:
    with store.transaction("a") as tx:
        tx.append("samples", samples(2))
    with store.transaction("b") as tx:
        tx.append("samples", samples(2, 10))
    assert Store(store.root, as_of=1).sql("SELECT count(*) AS n FROM samples").column("n").to_pylist() == [2]
    assert store.sql("SELECT count(*) AS n FROM samples").column("n").to_pylist() == [4]


# ---------------------------------------------------------------- CLI
def test_cli_store_commands(store: Store, tmp_path, capsys) -> None:
    with store.transaction("featurelt ingest x") as tx:
        tx.append("samples", samples(4))
    root = store.root
    assert main(["--store", root, "tag", "v1"]) == 0
    with store.transaction("featurelt ingest y") as tx:
        tx.append("samples", samples(4, 10))
    capsys.readouterr()
    assert main(["sql", "--store", root, "--format", "json", "SELECT count(*) AS n FROM samples"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"n": 8}]
    assert main(["sql", "--store", root, "--as-of", "v1", "--format", "csv", "SELECT count(*) AS n FROM samples"]) == 0
    assert capsys.readouterr().out.splitlines() == ["n", "4"]
    out = tmp_path / "r.parquet"
    assert main(["sql", "--store", root, "--format", "parquet", "--out", str(out), "SELECT * FROM samples"]) == 0
    import pyarrow.parquet as pq

    assert pq.read_table(out).num_rows == 8
    assert main(["sql", "--store", root, "UPDATE samples SET label = 1"]) == 1
    assert "read-only" in capsys.readouterr().err
    assert main(["versions", "--store", root, "samples", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["rows"] for r in rows] == [4, 8]
    assert main(["log", "--store", root]) == 0
    assert "featurelt ingest y" in capsys.readouterr().out
    assert main(["tables", "--store", root, "--as-of", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["rows"] == 4
    assert main(["sql", "--store", root, "--as-of", "nope", "SELECT 1"]) == 1
    assert "unknown tag or version 'nope'" in capsys.readouterr().err


def test_help_of_every_command(capsys) -> None:
    from featurelt.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"sql", "versions", "tag", "log", "tables"} <= set(sub.choices)
    for name, p in sub.choices.items():
        text = p.format_help()
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"featurelt {name} {action.option_strings[0]} has no help text"
        assert "usage" in text


def test_versions_label_rolled_back_and_intermediate_steps(store: Store) -> None:
    with store.transaction("featurelt ingest a") as tx:
        tx.append("samples", samples(2))
    with pytest.raises(RuntimeError):
        with store.transaction("featurelt broken") as tx:
            tx.append("samples", samples(2, 10))
            raise RuntimeError("boom")
    with store.transaction("featurelt make-lt") as tx:
        tx.update("samples", {"split": "'train_unused'"}, where="sample_id = 's00000'")
        tx.update("samples", {"split": "'val'"}, where="sample_id = 's00001'")
    labels = [r["message"] for r in store.versions("samples")]
    assert labels[0] == "[store v1] featurelt ingest a"
    assert labels[1] == "(not in store log: rolled back or interrupted) featurelt broken"
    assert labels[-1] == "[store v2] featurelt make-lt"
    assert "[store v2, intermediate step] featurelt make-lt" in labels


def test_sql_layer_sits_on_core(store: Store) -> None:
    """store/sql.py imports store/core.py, never the reverse; Store.sql is wired in featurelt/store/__init__.py."""
    import ast
    from pathlib import Path

    import featurelt
    from featurelt.store import core, sql

    def imports(module) -> set[str]:
        tree = ast.parse(Path(module.__file__).read_text())
        return {n.module if isinstance(n, ast.ImportFrom) else a.name for n in ast.walk(tree)
                if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}

    assert not {m for m in imports(core) if m and (m.startswith("featurelt.store.sql") or m == "duckdb")}
    assert "featurelt.store.core" in imports(sql)
    with store.transaction("a") as tx:
        tx.append("samples", samples(3))
    assert featurelt.Store(store.root).sql("SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 3}]
    assert core.Store.sql is sql.run_sql


def test_sql_csv_quotes_only_what_needs_it(store: Store, capsys) -> None:
    """Standard minimal quoting: plain ids and numbers bare; commas, quotes and newlines quoted; null empty."""
    import csv
    import io

    with store.transaction("a") as tx:
        tx.append("samples", samples(2))
    q = ("SELECT sample_id, label, 'a,b' AS comma, 'say \"hi\"' AS quote, 'x' || chr(10) || 'y' AS nl, "
         "NULL::VARCHAR AS nothing, 0.5 AS half FROM samples ORDER BY sample_id")
    capsys.readouterr()
    assert main(["sql", "--store", store.root, "--format", "csv", q]) == 0
    out = capsys.readouterr().out
    assert out == ('sample_id,label,comma,quote,nl,nothing,half\n'
                   's00000,0,"a,b","say ""hi""","x\ny",,0.5\n'
                   's00001,1,"a,b","say ""hi""","x\ny",,0.5\n')
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rows[1] == {"sample_id": "s00001", "label": "1", "comma": "a,b", "quote": 'say "hi"', "nl": "x\ny",
                       "nothing": "", "half": "0.5"}
