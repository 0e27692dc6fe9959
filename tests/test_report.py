"""Reports: files, valid PNG/HTML, every number table equal to SQL over runs / predictions / classes."""
from __future__ import annotations

import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from featurelt.cli import main
from featurelt.report import (collect, confusion_counts, project_2d, sample_embeddings, select_confused_classes,
                              top_confused_pairs, write_report)
from featurelt.store import Store

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRAIN_COUNTS = [300, 150, 80, 40, 12, 4]          # many, many, medium, medium, few, few (100 / 20 thresholds)
BUCKETS = ["many", "many", "medium", "medium", "few", "few"]
NAMES = ["t-shirt", "trouser", "pull<over>", "dress & co", "coat \"long\"", "sandal"]
PER_TEST = 10


def _classes() -> pa.Table:
    k = len(TRAIN_COUNTS)
    return pa.table({"label": pa.array(range(k), pa.int32()), "name": NAMES, "source": ["original"] * k,
                     "neighbor_of": pa.array([None] * k, pa.int32()), "train_count": TRAIN_COUNTS,
                     "bucket": BUCKETS, "bucket_many": [100] * k, "bucket_few": [20] * k})


def _image(y: int, i: int) -> np.ndarray:
    """An 8x8 grey image: a bar whose position is the class, brightness varying with i."""
    img = np.full((8, 8), 20 + (i * 7) % 60, np.uint8)
    img[:, y] = 255
    return img


def _samples(img_dir: Path) -> pa.Table:
    """Train images stored as PNG bytes, test images as files referenced by uri."""
    from featurelt.data.images import encode_png

    ids, labels, splits, images, uris = [], [], [], [], []
    for y, n in enumerate(TRAIN_COUNTS):
        for i in range(n):
            ids.append(f"tr{y}_{i}"), labels.append(y), splits.append("train")
            images.append(encode_png(_image(y, i))), uris.append(None)
        for i in range(PER_TEST):
            ids.append(f"te{y}_{i}"), labels.append(y), splits.append("test")
            path = img_dir / f"te{y}_{i}.png"
            path.write_bytes(encode_png(_image(y, i)))
            images.append(None), uris.append(str(path))
    n = len(ids)
    return pa.table({"sample_id": ids, "dataset": ["synthetic"] * n, "split": splits,
                     "label": pa.array(labels, pa.int32()), "source": ["original"] * n, "uri": uris,
                     "image": pa.array(images, pa.large_binary()), "content_sha256": ids,
                     "width": pa.array([8] * n, pa.int32()), "height": pa.array([8] * n, pa.int32()),
                     "description": [None] * n})


def _embeddings(samples: pa.Table, dim: int = 12) -> pa.Table:
    rng = np.random.default_rng(0)
    labels = np.asarray(samples.column("label"))
    x = (rng.normal(size=(len(labels), dim)) + 3.0 * np.eye(dim)[labels]).astype(np.float32)
    n = len(labels)
    return pa.table({"sample_id": samples.column("sample_id"), "view": pa.array([0] * n, pa.int32()),
                     "aug_strength": pa.array([0.0] * n, pa.float32()), "fingerprint": ["fp"] * n,
                     "vector": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim)})


def _predictions(run_id: str, n_wrong: list[int]) -> tuple[pa.Table, dict[str, float]]:
    """Test predictions with ``n_wrong[y]`` errors in class y (predicted as class y-1, top5 filled),
    and the metrics they imply (computed here by hand, per bucket over samples)."""
    rows = []
    for y in range(len(TRAIN_COUNTS)):
        for i in range(PER_TEST):
            pred = (y - 1) % len(TRAIN_COUNTS) if i < n_wrong[y] else y
            rows.append({"run_id": run_id, "sample_id": f"te{y}_{i}", "split": "test", "label": y,
                         "prediction": pred, "top5": [pred, (pred + 1) % 6, (pred + 2) % 6, (pred + 3) % 6,
                                                      (pred + 4) % 6], "score": 0.9})
    table = pa.Table.from_pylist(rows)
    acc = {b: 1 - sum(w for w, bb in zip(n_wrong, BUCKETS) if bb == b) / (PER_TEST * BUCKETS.count(b))
           for b in ("many", "medium", "few")}
    acc["all"] = 1 - sum(n_wrong) / (PER_TEST * len(TRAIN_COUNTS))
    return table, acc


def _run_row(run_id: str, head: str, loss: str, acc: dict[str, float], macro_f1: float, day: int) -> dict:
    return {"run_id": run_id, "time": np.datetime64(f"2026-01-{day:02d}T00:00:00").astype("datetime64[us]").item(),
            "head": head, "loss": loss, "sampler": "instance", "features": "pixels",
            "config": f"head: {head}\nloss: {loss}\nnote: '<script>alert(1)</script>'\n",
            "pinned_versions": json.dumps({"store_version": 3, "tables": {"samples": 1, "emb_pixels": 1}}),
            "metrics": json.dumps({"acc_all": acc["all"]}), "acc_all": acc["all"], "acc_many": acc["many"],
            "acc_medium": acc["medium"], "acc_few": acc["few"], "macro_f1": macro_f1,
            "head_tail_gap": acc["many"] - acc["few"], "train_seconds": 1.25, "epochs": 3, "seed": 0,
            "checkpoint": None}


RUNS = {"run-ce": ("linear", "ce", [0, 1, 2, 3, 6, 8], 0.61),
        "run-bs": ("linear", "balanced_softmax", [1, 1, 2, 2, 4, 5], 0.7)}


@pytest.fixture(scope="module")
def report_store(tmp_path_factory) -> Store:
    """A store with classes, samples, emb_pixels and two runs with predictions, written as train-head would."""
    root = tmp_path_factory.mktemp("report")
    store = Store(root / "store")
    samples = _samples(root)
    with store.transaction("synthetic data") as tx:
        tx.append("samples", samples)
        tx.append("classes", _classes())
        tx.append("emb_pixels", _embeddings(samples))
    for day, (run_id, (head, loss, wrong, f1)) in enumerate(RUNS.items(), start=1):  # run-bs is the latest
        preds, acc = _predictions(run_id, wrong)
        with store.transaction(f"train-head {run_id}") as tx:
            tx.append("runs", pa.Table.from_pylist([_run_row(run_id, head, loss, acc, f1, day)]))
            tx.append("predictions", preds)
    store.refresh()
    return store


@pytest.fixture(scope="module")
def full_report(report_store: Store, tmp_path_factory) -> Path:
    """The report of run-ce compared with run-bs, default options (written once for the tests that read it)."""
    return write_report(report_store, "run-ce", compare=["run-bs"], out_dir=tmp_path_factory.mktemp("full") / "rep")


class _Page(HTMLParser):
    """Collects images, tables (id -> rows of cell text) and checks that tags balance."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.images: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.stack: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag not in self.VOID:
            self.stack.append(tag)
        if tag == "img":
            self.images.append(a["src"])
        elif tag == "table":
            self._table = a.get("id", f"table{len(self.tables)}")
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}>; open: {self.stack[-3:]}"
        self.stack.pop()
        if tag in ("td", "th") and self._table is not None and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def parse_page(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    assert page.stack == [], f"unclosed tags {page.stack}"
    return page


def table_dicts(page: _Page, table_id: str) -> list[dict[str, str]]:
    rows = page.tables[table_id]
    return [dict(zip(rows[0], r)) for r in rows[1:]]


def same(cell: str, value) -> bool:
    """An HTML cell (4-decimal text) shows ``value`` from SQL."""
    if value is None:
        return cell == "–"
    if isinstance(value, float):
        return cell == f"{value:.4f}"
    return cell == str(value)


# ---------------------------------------------------------------- unit pieces
def test_confusion_counts_and_top_pairs(report_store: Store) -> None:
    labels, names, counts = confusion_counts(report_store, "run-ce", "test")
    assert labels == list(range(6)) and names == NAMES
    assert counts.sum() == 6 * PER_TEST
    # class 4 has 6 errors, all predicted as class 3; class 0 none
    assert counts[4, 4] == 4 and counts[4, 3] == 6 and counts[0, 0] == PER_TEST
    top = top_confused_pairs(labels, names, counts, k=3)
    assert [(t["label"], t["prediction"], t["n"]) for t in top] == [(5, 4, 8), (4, 3, 6), (3, 2, 3)]
    assert top[0]["row_fraction"] == pytest.approx(0.8)


def test_select_confused_classes_keeps_the_most_confused() -> None:
    counts = np.diag([10] * 30)
    counts[7, 21] = 5
    counts[12, 7] = 2
    keep = select_confused_classes(counts, 3)
    assert list(keep) == [7, 12, 21]
    assert list(select_confused_classes(counts, 40)) == list(range(30))


def test_sample_embeddings_streams_a_bounded_sample(report_store: Store) -> None:
    x, rows = sample_embeddings(report_store, "pixels", "test", max_points=25, batch_size=7)
    assert x.shape == (25, 12) and len(rows) == 25
    # the vectors are the stored ones for those samples
    stored = report_store.sql("SELECT sample_id, vector FROM emb_pixels").to_pylist()
    by_id = {r["sample_id"]: r["vector"] for r in stored}
    for r, v in zip(rows, x):
        np.testing.assert_allclose(v, by_id[r["sample_id"]], rtol=1e-6)
        assert r["sample_id"].startswith("te")
    # deterministic
    x2, rows2 = sample_embeddings(report_store, "pixels", "test", max_points=25, batch_size=1000)
    assert [r["sample_id"] for r in rows2] == [r["sample_id"] for r in rows]
    with pytest.raises(ValueError, match="embedding set 'nope' does not exist.*pixels"):
        sample_embeddings(report_store, "nope", "test", max_points=5)


def test_project_2d_pca_matches_sklearn() -> None:
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 5)).astype(np.float32) * np.array([5, 3, 1, 0.5, 0.1], np.float32)
    y, desc = project_2d(x, method="pca")
    ref = PCA(n_components=2, random_state=0).fit_transform(x)
    np.testing.assert_allclose(np.abs(y), np.abs(ref), rtol=1e-4, atol=1e-4)
    assert desc.startswith("PCA")
    with pytest.raises(ValueError, match="at least 3"):
        project_2d(x[:2])


# ---------------------------------------------------------------- the report
def test_report_files_figures_and_numbers(report_store: Store, full_report: Path) -> None:
    from PIL import Image

    index = full_report
    out = index.parent
    assert index == out / "index.html"
    page = parse_page(index)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["buckets.png", "confusion-run-bs.png", "confusion-run-ce.png", "few_shot_examples.png",
                    "per_class_accuracy.png", "projection.png"]
    assert sorted(page.images) == pngs
    for name in pngs:
        raw = (out / name).read_bytes()
        assert raw[:8] == PNG_MAGIC, name
        with Image.open(out / name) as im:
            im.verify()
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 400 and im.size[1] > 300
            # a real plot: not a blank canvas
            assert len(np.unique(np.asarray(im.convert("L")))) > 20

    # -- runs table in the HTML and in report.json == SQL over runs
    sql_runs = {r["run_id"]: r for r in report_store.sql(
        "SELECT run_id, head, loss, acc_all, acc_many, acc_medium, acc_few, macro_f1, head_tail_gap, epochs, "
        "train_seconds FROM runs").to_pylist()}
    html_runs = table_dicts(page, "runs_all")
    assert [r["run_id"] for r in html_runs] == ["run-ce", "run-bs"]
    doc = json.loads((out / "report.json").read_text())
    assert [r["run_id"] for r in doc["runs"]] == ["run-ce", "run-bs"] and doc["compare"] == ["run-bs"]
    for html_row, json_row in zip(html_runs, doc["runs"]):
        ref = sql_runs[html_row["run_id"]]
        for col, value in ref.items():
            assert same(html_row[col], value), (col, html_row[col], value)
            assert json_row[col] == value, (col, json_row[col], value)
    # the hand-computed metrics of the fixture
    _, acc = _predictions("run-ce", RUNS["run-ce"][2])
    assert html_runs[0]["acc_few"] == f"{acc['few']:.4f}" == "0.3000"

    # -- per-class tables == predictions JOIN classes
    for run_id in RUNS:
        ref = report_store.sql(
            "SELECT c.label, c.name, c.bucket, c.train_count, count(*) AS n, "
            "sum((p.prediction = p.label)::INT) AS correct, avg((p.prediction = p.label)::INT) AS accuracy "
            f"FROM predictions p JOIN classes c USING (label) WHERE p.run_id = '{run_id}' "
            "GROUP BY ALL ORDER BY c.label").to_pylist()
        html_rows = table_dicts(page, f"per_class-{run_id}")
        assert len(html_rows) == len(ref) == 6
        for h, j, r in zip(html_rows, doc["per_class"][run_id], ref):
            for col in ("label", "name", "bucket", "train_count", "n", "correct", "accuracy"):
                assert same(h[col], r[col]), (run_id, col, h[col], r[col])
                assert j[col] == pytest.approx(r[col]) if isinstance(r[col], float) else j[col] == r[col]
        assert html_rows[2]["name"] == "pull<over>"   # escaped in the file, text again once parsed

    # -- bucket accuracy recomputed from predictions agrees with the runs table
    check = table_dicts(page, "bucket_from_predictions")
    assert len(check) == 2 * 4
    for row in check:
        col = "acc_all" if row["bucket"] == "all" else f"acc_{row['bucket']}"
        assert row["accuracy"] == f"{sql_runs[row['run_id']][col]:.4f}", row
    for j in doc["bucket_from_predictions"]:
        col = "acc_all" if j["bucket"] == "all" else f"acc_{j['bucket']}"
        assert math.isclose(j["accuracy"], sql_runs[j["run_id"]][col], abs_tol=1e-12)

    # -- confusion, one matrix per run
    for run_id in RUNS:
        conf = report_store.sql("SELECT label, prediction, count(*) AS n FROM predictions "
                                f"WHERE run_id = '{run_id}' GROUP BY ALL").to_pylist()
        counts = np.array(doc["confusion"][run_id]["counts"])
        for r in conf:
            assert counts[r["label"], r["prediction"]] == r["n"]
        assert counts.sum() == sum(r["n"] for r in conf)
        assert doc["figures"][f"confusion-{run_id}"] == f"confusion-{run_id}.png"
    top = table_dicts(page, "top_confusions-run-ce")
    assert (top[0]["label"], top[0]["prediction"], top[0]["n"]) == ("5", "4", "8")
    top = table_dicts(page, "top_confusions-run-bs")
    assert (top[0]["label"], top[0]["prediction"], top[0]["n"]) == ("5", "4", "5")

    # -- projection, config and pinned versions, escaping
    assert doc["projection"]["embedding_set"] == "pixels" and doc["projection"]["n"] == 6 * PER_TEST
    assert sum(doc["projection"]["points_per_bucket"].values()) == len(doc["projection"]["points"])
    raw = index.read_text()
    assert "<script>" not in raw and "&lt;script&gt;alert(1)&lt;/script&gt;" in raw
    text = "".join(page.text)
    assert "head: linear" in text and '"store_version": 3' in text and "emb_pixels" in text


def test_report_single_run_and_many_classes_confusion(report_store: Store, tmp_path: Path) -> None:
    index = write_report(report_store, "run-bs", out_dir=tmp_path / "one", max_confusion_classes=3,
                         max_points=20)
    doc = json.loads((tmp_path / "one" / "report.json").read_text())
    assert doc["compare"] == [] and len(doc["runs"]) == 1
    assert len(doc["confusion"]["run-bs"]["shown_labels"]) == 3
    assert len(doc["projection"]["points"]) == 20
    page = parse_page(index)
    assert "3 classes with the most errors" in "".join(page.text)


def test_report_errors(report_store: Store, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown run id\(s\) nope; latest runs: .*run-ce"):
        write_report(report_store, "nope", out_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="embedding set 'clip' does not exist"):
        write_report(report_store, "run-ce", out_dir=tmp_path / "x", embedding_set="clip")
    data, points = collect(report_store, "run-ce", compare=["run-bs"])
    assert data.eval_split == "test" and points is not None and points.shape == (60, 2)


def test_report_cli(report_store: Store, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    rc = main(["report", "--store", report_store.root, "--run", "run-bs", "--compare", "run-ce", "--out", str(out),
               "--embedding-set", "pixels"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert str(out / "index.html") in captured.out
    doc = json.loads((out / "report.json").read_text())
    assert [r["run_id"] for r in doc["runs"]] == ["run-bs", "run-ce"]
    rc = main(["report", "--store", report_store.root, "--run", "missing", "--out", str(out)])
    assert rc == 1
    assert "featurelt report: error: unknown run id(s) missing" in capsys.readouterr().err


def test_run_label_names_loss_and_sampler_only_when_they_apply():
    from featurelt.report import run_label

    assert run_label({"head": "linear", "loss": "ce", "sampler": "instance", "run_id": "r1"}) == "linear / ce (r1)"
    assert run_label({"head": "adapter", "loss": "ce", "sampler": "class-balanced", "run_id": "r2"}) == \
        "adapter / ce [class-balanced] (r2)"
    assert run_label({"head": "knn", "loss": "none", "sampler": "none", "run_id": "r3"}) == "knn (r3)"
    # the legend names the features each run used (issue 19, point 12)
    assert run_label({"head": "fusion", "loss": "ce", "sampler": "instance", "features": "clip_tiny,sam_tiny_latent",
                      "run_id": "r4"}) == "fusion / ce on clip_tiny+sam_tiny_latent (r4)"


# ---------------------------------------------------------------- --run latest / latest~N
def test_resolve_run_id_latest(report_store: Store, tmp_path: Path) -> None:
    from featurelt.report import resolve_run_id

    assert resolve_run_id(report_store, "latest") == "run-bs"          # 2026-01-02
    assert resolve_run_id(report_store, "latest~0") == "run-bs"
    assert resolve_run_id(report_store, "latest~1") == "run-ce"        # 2026-01-01
    assert resolve_run_id(report_store, "run-ce") == "run-ce"          # an id passes through
    with pytest.raises(ValueError, match=r"run 'latest~2': the store has 2 run\(s\), so the oldest is latest~1"):
        resolve_run_id(report_store, "latest~2")
    empty = Store(tmp_path / "empty")
    with pytest.raises(ValueError, match="run 'latest': store .* has no runs yet"):
        resolve_run_id(empty, "latest")
    # --as-of pins the runs table: at the version of the first run, latest is run-ce
    first = Store(report_store.root, as_of=report_store.version - 1)
    assert resolve_run_id(first, "latest") == "run-ce"


def test_cli_run_latest_in_report_eval_runs(report_store: Store, tmp_path: Path, capsys) -> None:
    out = tmp_path / "latest"
    rc = main(["report", "--store", report_store.root, "--run", "latest", "--compare", "latest~1", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads((out / "report.json").read_text())
    assert doc["run_id"] == "run-bs" and doc["compare"] == ["run-ce"]
    capsys.readouterr()
    assert main(["runs", "--store", report_store.root, "--run", "latest~1", "--json"]) == 0
    assert [r["run_id"] for r in json.loads(capsys.readouterr().out)] == ["run-ce"]
    # eval recomputes the latest run (the fixture's macro_f1 is made up, so it differs: status 1)
    rc = main(["eval", "--store", report_store.root, "--run", "latest"])
    captured = capsys.readouterr()
    assert captured.out.startswith("run run-bs: 60 predictions") and rc == 1 and "macro_f1" in captured.err
    for argv in (["eval", "--run", "latest~7"], ["runs", "--run", "latest~7"],
                 ["report", "--run", "run-ce", "--compare", "latest~7", "--out", str(out)]):
        assert main([argv[0], "--store", report_store.root, *argv[1:]]) == 1
        assert f"featurelt {argv[0]}: error: run 'latest~7': the store has 2 run(s)" in capsys.readouterr().err


# ---------------------------------------------------------------- issue 19, point 12: a report people can read
def test_report_runs_table_wraps_and_shows_fewer_columns(full_report: Path) -> None:
    from featurelt.report import CSS, RUNS_TABLE_ALL, RUNS_TABLE_COLUMNS

    index = full_report
    page = parse_page(index)
    assert page.tables["runs"][0] == list(RUNS_TABLE_COLUMNS) and len(RUNS_TABLE_COLUMNS) <= 10
    assert "checkpoint" not in RUNS_TABLE_ALL and "config" not in RUNS_TABLE_ALL
    assert page.tables["runs_all"][0] == list(RUNS_TABLE_ALL)      # the rest, folded in <details>
    raw = index.read_text()
    assert '<div class="scroll"><table id="runs">' in raw         # scrolls sideways instead of overflowing
    assert "div.scroll { overflow-x: auto" in CSS and "overflow-wrap: anywhere" in CSS


def test_report_bucket_chart_macro_f1_on_its_own_axis(report_store: Store, tmp_path: Path) -> None:
    from featurelt.report import plot_buckets

    data, _ = collect(report_store, "run-ce", compare=["run-bs"], examples=0)
    fig = plot_buckets(data, tmp_path / "b.png")
    acc_ax, f1_ax = fig.axes[:2]
    assert [t.get_text().split("\n")[0] for t in acc_ax.get_xticklabels()] == ["all", "many", "medium", "few"]
    assert [t.get_text() for t in f1_ax.get_xticklabels()] == ["macro-F1"]
    assert "macro-F1" in f1_ax.get_ylabel() and "accuracy" in acc_ax.get_ylabel()
    heights = [p.get_height() for p in f1_ax.patches]
    assert heights == pytest.approx([RUNS["run-ce"][3], RUNS["run-bs"][3]])  # 0.61, 0.7 from the runs table
    _, acc = _predictions("run-ce", RUNS["run-ce"][2])
    assert [p.get_height() for p in acc_ax.patches][:4] == pytest.approx([acc[b] for b in ("all", "many", "medium",
                                                                                           "few")])
    # the legend names each run's features
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["linear / ce on pixels (run-ce)", "linear / balanced_softmax on pixels (run-bs)"]


def test_report_buckets_show_class_and_image_counts(report_store: Store, full_report: Path, tmp_path: Path) -> None:
    from featurelt.report import plot_buckets

    index = full_report
    doc = json.loads((index.parent / "report.json").read_text())
    # by hand from the fixture: train counts 300+150 / 80+40 / 12+4, PER_TEST test images per class
    want = [("many", 2, 450), ("medium", 2, 120), ("few", 2, 16)]
    assert [(b["bucket"], b["classes"], b["train_images"]) for b in doc["buckets"]] == want
    assert [b["eval_images"] for b in doc["buckets"]] == [2 * PER_TEST] * 3
    assert doc["buckets"][2]["caption"] == "few (2 classes, 16 train imgs)"
    assert [r["caption"] for r in table_dicts(parse_page(index), "buckets")] == [
        "many (2 classes, 450 train imgs)", "medium (2 classes, 120 train imgs)", "few (2 classes, 16 train imgs)"]
    data, _ = collect(report_store, "run-ce", examples=0)
    ticks = [t.get_text() for t in plot_buckets(data, tmp_path / "b.png").axes[0].get_xticklabels()]
    assert ticks == ["all\n6 classes\n586 train imgs", "many\n2 classes\n450 train imgs",
                     "medium\n2 classes\n120 train imgs", "few\n2 classes\n16 train imgs"]
    from featurelt.report import bucket_caption

    assert bucket_caption({"bucket": "few", "classes": 136, "train_images": 1234}) == "few (136 classes, 1,234 train imgs)"
    assert bucket_caption({"bucket": "many", "classes": 1, "train_images": 1}) == "many (1 class, 1 train img)"


def test_report_one_confusion_matrix_per_run(report_store: Store, tmp_path: Path) -> None:
    index = write_report(report_store, "run-ce", compare=["run-bs"], out_dir=tmp_path / "r", examples=0,
                         max_confusion_classes=3)
    doc = json.loads((tmp_path / "r" / "report.json").read_text())
    page = parse_page(index)
    assert {"confusion-run-ce.png", "confusion-run-bs.png"} <= set(page.images)
    # both matrices show the same classes: the most confused over the two runs together
    total = sum(np.array(doc["confusion"][r]["counts"]) for r in RUNS)
    shown = list(select_confused_classes(total, 3))
    assert doc["confusion"]["run-ce"]["shown_labels"] == doc["confusion"]["run-bs"]["shown_labels"] == shown
    for run_id in RUNS:
        labels, _, counts = confusion_counts(report_store, run_id, "test")
        np.testing.assert_array_equal(np.array(doc["confusion"][run_id]["counts"]), counts)


def test_report_few_shot_examples_and_nearest_train_images(report_store: Store, full_report: Path,
                                                           tmp_path: Path) -> None:
    from featurelt.report import few_shot_examples, sample_images

    index = full_report
    out = index.parent
    doc = json.loads((out / "report.json").read_text())
    ex = doc["examples"]
    assert ex["embedding_set"] == "pixels" and ex["k"] == 5 and ex["split"] == "test"
    rows = ex["rows"]
    assert [r["label"] for r in rows] == [4, 5]                        # the few classes
    preds = {r["sample_id"]: r["prediction"] for r in report_store.sql(
        "SELECT sample_id, prediction FROM predictions WHERE run_id = 'run-ce'").to_pylist()}
    # numpy brute force: cosine of the test vector against every train vector of emb_pixels
    emb = report_store.sql("SELECT e.sample_id, e.vector, s.label FROM emb_pixels e JOIN samples s USING "
                           "(sample_id) WHERE s.split = 'train' AND e.view = 0").to_pylist()
    train = np.array([r["vector"] for r in emb], np.float64)
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    vec = {r["sample_id"]: np.array(r["vector"]) for r in report_store.sql(
        "SELECT sample_id, vector FROM emb_pixels").to_pylist()}
    for r in rows:
        assert r["sample_id"].startswith(f"te{r['label']}_")
        # run-ce got 6 / 8 of these classes wrong: a misclassified image is shown
        assert r["prediction"] == preds[r["sample_id"]] != r["label"]
        assert r["predicted_name"] == NAMES[r["prediction"]] and r["name"] == NAMES[r["label"]]
        q = vec[r["sample_id"]] / np.linalg.norm(vec[r["sample_id"]])
        cos = train @ q
        best = np.argsort(-cos, kind="stable")[:5]
        assert [n["sample_id"] for n in r["neighbors"]] == [emb[i]["sample_id"] for i in best]
        assert [n["cosine"] for n in r["neighbors"]] == pytest.approx(cos[best].tolist(), abs=1e-5)
        assert [n["label"] for n in r["neighbors"]] == [emb[i]["label"] for i in best]
    page = parse_page(index)
    assert "few_shot_examples.png" in page.images
    html_rows = table_dicts(page, "examples")
    assert [h["sample_id"] for h in html_rows] == [r["sample_id"] for r in rows]
    assert html_rows[0]["neighbors"].startswith(f"{rows[0]['neighbors'][0]['name']} (")
    # the images come from the store: test rows by uri (files), train rows as stored bytes
    ids = [rows[0]["sample_id"], rows[0]["neighbors"][0]["sample_id"]]
    images = sample_images(report_store, [*ids, "nope"])
    for sid in ids:
        y, i = (int(t) for t in sid[2:].split("_"))
        np.testing.assert_array_equal(images[sid], np.repeat(_image(y, i)[:, :, None], 3, axis=2))
    assert images["nope"] == "sample nope: not in the samples table"
    from PIL import Image

    with Image.open(out / "few_shot_examples.png") as im:
        assert im.size[0] > 600 and len(np.unique(np.asarray(im.convert("L")))) > 20
    # fewer classes, other k, a small batch size (the train rows streamed into the index in many batches)
    one = few_shot_examples(report_store, "run-bs", "test", "pixels", n_classes=1, k=2, batch_size=7)
    assert [r["label"] for r in one] == [4] and len(one[0]["neighbors"]) == 2
    # examples=0 leaves the panel out
    write_report(report_store, "run-ce", out_dir=tmp_path / "none", examples=0)
    assert not (tmp_path / "none" / "few_shot_examples.png").exists()
