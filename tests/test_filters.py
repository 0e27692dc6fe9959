"""The auxiliary image filter (featurelt.data.filters, METHODS.md section 3) on a hand-made store:
cosines to the target prototypes by hand, the caption check, the moves, rejects and classes, the CLI."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from featurelt.cli import main
from featurelt.data.classes import classes_table
from featurelt.data.filters import FILTERED_SPLIT, filter_auxiliary, prototype_cosines
from featurelt.store import Store

REGISTRY = [{"label": 0, "name": "cat", "source": "original", "neighbor_of": None},
            {"label": 1, "name": "dog", "source": "original", "neighbor_of": None},
            {"label": 2, "name": "kitten", "source": "auxiliary", "neighbor_of": 0},
            {"label": 3, "name": "puppy", "source": "auxiliary", "neighbor_of": 1}]
# sample_id: (label, split, source, feature, description)
ROWS = {
    "c1": (0, "train", "original", [2.0, 0.0, 0.0], None),
    "c2": (0, "train", "original", [1.0, 1.0, 0.0], None),   # p_cat = mean(c1, c2) = (1.5, 0.5, 0)
    "d1": (1, "train", "original", [0.0, 1.0, 0.0], None),   # p_dog = (0, 1, 0)
    "ct": (0, "test", "original", [5.0, 5.0, 5.0], None),    # not train: not in the prototype
    "k_dup": (2, "train", "auxiliary", [3.0, 1.0, 0.0], None),             # cos 1 to p_cat: near-duplicate
    "k_ok": (2, "train", "auxiliary", [1.0, 1.0, 0.0], "a kitten asleep"),  # cos 2/sqrt5 = 0.894: kept
    "k_far": (2, "train", "auxiliary", [0.0, 0.0, 1.0], None),             # cos 0: dissimilar
    "k_cap": (2, "train", "auxiliary", [1.0, 1.0, 0.0], "a dog on grass"),  # caption lacks "kitten"
    "p_ok": (3, "train", "auxiliary", [1.0, 2.0, 0.0], "Puppy_photo"),      # cos 2/sqrt5 to p_dog: kept
}
COS = {"k_dup": 1.0, "k_ok": 2 / math.sqrt(5), "k_far": 0.0, "k_cap": 2 / math.sqrt(5), "p_ok": 2 / math.sqrt(5)}


def build(root: Path) -> Store:
    ids = list(ROWS)
    n = len(ids)
    col = lambda i: [ROWS[s][i] for s in ids]  # noqa: E731
    samples = pa.table({
        "sample_id": ids, "dataset": ["toy"] * n, "split": col(1), "label": pa.array(col(0), pa.int32()),
        "source": col(2), "uri": pa.array([None] * n, pa.string()), "image": pa.array([None] * n, pa.large_binary()),
        "content_sha256": ["0" * 64] * n, "width": pa.array([1] * n, pa.int32()), "height": pa.array([1] * n, pa.int32()),
        "description": pa.array(col(4), pa.string())})
    counts = {r["label"]: sum(1 for s in ids if ROWS[s][0] == r["label"] and ROWS[s][1] == "train") for r in REGISTRY}
    flat = np.asarray(col(3), dtype=np.float32).ravel()
    store = Store(root)
    with store.transaction("test: toy store") as tx:
        tx.append("samples", samples)
        tx.append("classes", classes_table(REGISTRY, counts, many=100, few=20))
        tx.append("emb_toy", pa.table({
            "sample_id": ids, "view": pa.array([0] * n, pa.int32()), "aug_strength": pa.array([0.0] * n, pa.float32()),
            "fingerprint": ["toy"] * n, "vector": pa.FixedSizeListArray.from_arrays(pa.array(flat), 3)}))
    return store


def test_prototype_cosines_by_hand():
    x = np.array([[2.0, 0, 0], [1, 1, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    labels = np.array([0, 0, 1, 9, 9])
    cos = prototype_cosines(x, labels, prototype_rows=np.array([0, 1, 2]), query_rows=np.array([3, 4, 3]),
                            query_classes=np.array([0, 0, 1]))
    np.testing.assert_allclose(cos, [2 / math.sqrt(5), 0.0, 1 / math.sqrt(2)], atol=1e-12)
    assert np.isnan(prototype_cosines(x, labels, prototype_rows=np.array([0]), query_rows=np.array([3]),
                                      query_classes=np.array([1])))[0]  # no row of class 1: no prototype


def test_filter_moves_rejects_and_rebuilds_classes(tmp_path):
    store = build(tmp_path / "store")
    before = store.version
    dry = filter_auxiliary(store, ["toy"], gamma1=0.3, gamma2=0.95, dry_run=True)
    assert store.version == before and dry.dry_run
    assert (dry.checked, dry.kept, dry.rejected) == (5, 2, {"caption": 1, "dissimilar": 1, "near-duplicate": 1})
    kitten = next(r for r in dry.per_class if r["class"] == "kitten")
    assert kitten["neighbor_of"] == "cat" and (kitten["checked"], kitten["kept"]) == (4, 1)
    assert kitten["cos_min"] == pytest.approx(0.0, abs=1e-4) and kitten["cos_max"] == pytest.approx(1.0, abs=1e-4)
    assert kitten["cos_mean"] == pytest.approx(np.mean([COS[s] for s in ("k_dup", "k_ok", "k_far", "k_cap")]), abs=1e-4)

    res = filter_auxiliary(store, ["toy"], gamma1=0.3, gamma2=0.95)
    assert res.store_version == before + 1 and res.kept == 2
    split = {r["sample_id"]: r["split"] for r in store.sql("SELECT sample_id, split FROM samples").to_pylist()}
    assert {s for s, sp in split.items() if sp == FILTERED_SPLIT} == {"k_dup", "k_far", "k_cap"}
    assert split["k_ok"] == split["p_ok"] == "train"
    reasons = {r["sample_id"]: r["reason"] for r in store.read("rejects").to_pylist()}
    assert set(reasons) == {"k_dup", "k_far", "k_cap"}
    assert "cos 1.0000 to the prototype of 'cat' >= gamma2 0.95" in reasons["k_dup"]
    assert "cos 0.0000 to the prototype of 'cat' <= gamma1 0.3" in reasons["k_far"]
    assert "does not name class 'kitten'" in reasons["k_cap"]
    assert store.read("rejects").column("stage").to_pylist() == ["filter-auxiliary"] * 3
    # train-head no longer sees them; the classes table keeps every class
    from featurelt.data.features import load_features

    assert sorted(load_features(store, ["toy"], split="train").sample_ids) == ["c1", "c2", "d1", "k_ok", "p_ok"]
    assert store.count("classes") == 4
    # a second run finds nothing more to drop and makes no version
    again = filter_auxiliary(store, ["toy"], gamma1=0.3, gamma2=0.95)
    assert (again.checked, again.kept) == (2, 2) and store.version == before + 1
    # without the caption check, k_cap would have been kept: the check is what rejected it
    fresh = build(tmp_path / "fresh")
    assert filter_auxiliary(fresh, ["toy"], gamma1=0.3, gamma2=0.95, caption=False, dry_run=True).kept == 3


def test_filter_cli_and_errors(tmp_path, capsys):
    store = build(tmp_path / "store")
    root = str(store.root)
    assert main(["--store", root, "filter-auxiliary", "--features", "toy", "--dry-run", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dry_run"] and out["kept"] == 2 and out["gamma1"] == 0.3 and out["gamma2"] == 0.95
    assert main(["--store", root, "filter-auxiliary", "--features", "toy", "--gamma1", "-0.5"]) == 0
    printed = capsys.readouterr().out
    assert "kitten" in printed and "5 auxiliary train images, 3 kept" in printed
    assert "moved 2 to split 'filtered' (1 caption, 1 near-duplicate)" in printed
    assert main(["--store", root, "filter-auxiliary", "--features", "toy", "--gamma1", "0.9", "--gamma2", "0.5"]) == 1
    assert "gamma1 < gamma2" in capsys.readouterr().err
    assert main(["--store", root, "filter-auxiliary", "--features", "nope"]) == 1
    assert "nope" in capsys.readouterr().err
