"""The demo end to end on digits (small sizes) through the CLI; its printed table agrees with SQL."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from featurelt.cli import main
from featurelt.data.longtail import exp_profile
from featurelt.demo import TABLE_COLUMNS, bucket_thresholds, choose_dataset
from featurelt.store import Store


# ---------------------------------------------------------------- pieces
def test_choose_dataset(tmp_path: Path) -> None:
    assert choose_dataset("auto", fashion_dir=tmp_path)[0] == "digits"
    assert "no fashion-mnist files" in choose_dataset("auto", fashion_dir=tmp_path)[1]
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz"):
        choose_dataset("fashion-mnist", fashion_dir=tmp_path)
    for f in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
              "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / f).write_bytes(b"")
    name, why = choose_dataset("auto", fashion_dir=tmp_path)
    assert name == "fashion-mnist" and str(tmp_path) in why
    assert choose_dataset("digits", fashion_dir=tmp_path)[0] == "digits"


def test_exponential_profile_and_thresholds() -> None:
    # n_y = floor(600 * 0.01^(y/9)): 600, 359.7, 215.6, 129.3, 77.5, 46.5, 27.8, 16.7, 10.0, 6
    counts = exp_profile(600, 10, 100)
    assert counts == [600, 359, 215, 129, 77, 46, 27, 16, 10, 6]
    assert bucket_thresholds(counts) == (100, 20)          # the paper's thresholds give all three buckets
    small = exp_profile(100, 10, 100)              # nothing above 100: relative thresholds
    assert small == [100, 59, 35, 21, 12, 7, 4, 2, 1, 1]
    assert bucket_thresholds(small) == (21, 3)             # > 21: 100, 59, 35; < 3: 2, 1, 1
    with pytest.raises(ValueError, match="cannot split"):
        bucket_thresholds([5, 5, 5])


def test_demo_refuses_to_overwrite(tmp_path: Path, capsys) -> None:
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    assert main(["demo", "--store", str(other), "--dataset", "digits"]) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["demo", "--store", str(other), "--dataset", "digits", "--fresh"]) == 1
    assert "not a featurelt store" in capsys.readouterr().err
    assert (other / "todo.txt").read_text() == "keep me"


# ---------------------------------------------------------------- end to end
def _printed_table(out: str) -> list[dict[str, str]]:
    """Rows of the comparison table the demo printed (between its header line and the row count)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["run_id", "head"])
    header = lines[start].split()
    rows = []
    for line in lines[start + 2:]:
        if re.fullmatch(r"\(\d+ rows?\)", line.strip()):
            break
        rows.append(dict(zip(header, line.split())))
    return rows


@pytest.mark.slow
def test_demo_end_to_end_on_digits(tmp_path: Path, capsys) -> None:
    store_dir, report_dir = tmp_path / "store", tmp_path / "report"
    rc = main(["demo", "--store", str(store_dir), "--dataset", "digits", "--out", str(report_dir),
               "--epochs", "3", "--image-size", "16"])
    captured = capsys.readouterr()
    assert rc == 0, captured.out[-3000:] + captured.err[-3000:]
    out = captured.out
    assert "dataset: digits" in out

    store = Store(store_dir)
    runs = store.sql(f"SELECT {', '.join(TABLE_COLUMNS)} FROM runs").to_pylist()
    by_id = {r["run_id"]: r for r in runs}
    printed = _printed_table(out)
    assert len(printed) == 6
    sweep = printed
    # the heads the issue asks for: CE, balanced softmax, LFM, fusion with prototype losses, adapter; and kNN
    kinds = {(r["head"], r["loss"], r["sampler"]) for r in sweep}
    assert ("linear", "ce", "instance") in kinds and ("linear", "balanced-softmax", "instance") in kinds
    assert ("lfm-projection", "ce", "lfm") in kinds and ("adapter", "ce", "class-balanced") in kinds
    assert any(h == "fusion" for h, _, _ in kinds) and ("knn", "none", "none") in kinds
    fusion_cfg = store.sql("SELECT config, features FROM runs WHERE head = 'fusion'").to_pylist()[0]
    assert "tail-dist" in fusion_cfg["config"] and fusion_cfg["features"].count(",") >= 3
    # every printed number is the runs row, as featurelt sql prints it
    for row in sweep:
        ref = by_id[row["run_id"]]
        for col in ("acc_all", "acc_many", "acc_medium", "acc_few", "macro_f1"):
            expect = "None" if ref[col] is None else f"{ref[col]:.4f}"
            assert row[col] == expect, (row["run_id"], col, row[col], ref[col])
    # all three buckets exist, and the runs table's bucket accuracies match predictions joined to classes
    assert {r["bucket"] for r in store.sql("SELECT DISTINCT bucket FROM classes").to_pylist()} >= {
        "many", "medium", "few"}
    check = store.sql("""
        SELECT p.run_id, c.bucket, avg((p.prediction = p.label)::DOUBLE) AS acc
        FROM predictions p JOIN classes c USING (label) GROUP BY ALL""").to_pylist()
    for r in check:
        assert r["acc"] == pytest.approx(by_id[r["run_id"]][f"acc_{r['bucket']}"], abs=1e-9), r

    # the re-run line and the timing against the whole pipeline
    m = re.search(r"re-trained .* in ([\d.]+) s .* full pipeline ([\d.]+) s", out)
    assert m, out[-2000:]
    assert 0 < float(m.group(1)) < float(m.group(2)), m.group(0)
    same = re.search(r"same seed, same cached features: .*", out)
    assert same and "identical" in same.group(0), same and same.group(0)  # same seed, same features: the same run
    # the report of the sweep
    doc = json.loads((report_dir / "report.json").read_text())
    assert [r["run_id"] for r in doc["runs"]] == [r["run_id"] for r in sweep]
    assert (report_dir / "index.html").exists()
    assert {p.name for p in report_dir.glob("*.png")} == {
        "per_class_accuracy.png", "buckets.png", "projection.png", "few_shot_examples.png",
        *(f"confusion-{r['run_id']}.png" for r in sweep)}      # one confusion matrix per run

    # a second demo into the same store is refused unless --fresh
    rc = main(["demo", "--store", str(store_dir), "--dataset", "digits"])
    assert rc == 1 and "--fresh" in capsys.readouterr().err
