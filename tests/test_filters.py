"""The filters of featurelt.data.filters on hand-made stores: the auxiliary image filter (METHODS.md
section 3: cosines to the target prototypes by hand, the caption check) and the quality filter of
generated images (section 4: CLIP scores set through clip:tiny's text tower); the moves, rejects, CLI."""
from __future__ import annotations

import json
import math
from datetime import datetime
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
    assert out["dry_run"] and out["kept"] == 2 and out["thresholds"] == {"gamma1": 0.3, "gamma2": 0.95}
    assert main(["--store", root, "filter-auxiliary", "--features", "toy", "--gamma1", "-0.5"]) == 0
    printed = capsys.readouterr().out
    assert "kitten" in printed
    assert "moved 2 to split 'filtered' (1 caption, 1 near-duplicate)" in printed
    assert "filter-auxiliary on toy (gamma1 -0.5, gamma2 0.95): 5 train images, 3 kept" in printed
    assert main(["--store", root, "filter-auxiliary", "--features", "toy", "--gamma1", "0.9", "--gamma2", "0.5"]) == 1
    assert "gamma1 < gamma2" in capsys.readouterr().err
    assert main(["--store", root, "filter-auxiliary", "--features", "nope"]) == 1
    assert "nope" in capsys.readouterr().err


# ------------------------------------------------------------------------------ generated images (section 4)
def build_generated(root: Path, clip_text) -> tuple[Store, dict[str, float]]:
    """cat / dog with generated rows whose clip:tiny image vectors are set from the text tower, so that
    each S = cos(image, text) is known: returns the store and S per generated sample."""
    rng = np.random.default_rng(0)
    cat_t = clip_text.encode_text(["a fluffy cat"]).numpy()[0]
    dog_t = clip_text.encode_classes(["dog"]).numpy()[0]  # no description: the class name's prompt ensemble
    noise = rng.normal(size=(3, len(cat_t))).astype(np.float32)
    rows = {  # sample_id: (label, source, description, image vector)
        "o1": (0, "original", None, noise[0]),
        "g_good": (0, "generated", "a fluffy cat", 2.5 * cat_t),
        "g_bad": (0, "generated", "a fluffy cat", -cat_t),
        "g_dog": (1, "generated", None, dog_t),
        "g_rand": (1, "generated", None, noise[1]),
    }
    score = {"g_good": 1.0, "g_bad": -1.0, "g_dog": 1.0,
             "g_rand": float(noise[1] @ dog_t / np.linalg.norm(noise[1]) / np.linalg.norm(dog_t))}
    ids = list(rows)
    n, dim = len(ids), len(cat_t)
    registry = [{"label": 0, "name": "cat", "source": "original", "neighbor_of": None},
                {"label": 1, "name": "dog", "source": "original", "neighbor_of": None}]
    samples = pa.table({
        "sample_id": ids, "dataset": ["toy"] * n, "split": ["train"] * n, "label": pa.array([rows[s][0] for s in ids], pa.int32()),
        "source": [rows[s][1] for s in ids], "uri": pa.array([None] * n, pa.string()),
        "image": pa.array([None] * n, pa.large_binary()), "content_sha256": ["0" * 64] * n,
        "width": pa.array([1] * n, pa.int32()), "height": pa.array([1] * n, pa.int32()),
        "description": pa.array([rows[s][2] for s in ids], pa.string())})
    flat = np.stack([rows[s][3] for s in ids]).astype(np.float32).ravel()
    store = Store(root)
    with store.transaction("test: generated rows") as tx:
        tx.append("samples", samples)
        tx.append("classes", classes_table(registry, {0: 1, 1: 0}, many=100, few=20))
        for name, encoder in (("clip_tiny", "clip:tiny"), ("pix", "pixels")):
            tx.append(f"emb_{name}", pa.table({
                "sample_id": ids, "view": pa.array([0] * n, pa.int32()), "aug_strength": pa.array([0.0] * n, pa.float32()),
                "fingerprint": [name] * n, "vector": pa.FixedSizeListArray.from_arrays(pa.array(flat), dim)}))
            tx.append("embedding_sets", pa.table({
                "name": [name], "encoder": [encoder], "product": ["embedding"], "dim": pa.array([dim], pa.int32()),
                "dtype": ["float32"], "fingerprint": [name],
                "provenance": [json.dumps({"trained": False, "seed": 0, "checkpoint_sha256": None})],
                "rows": pa.array([n], pa.int64()), "time": pa.array([datetime(2026, 1, 1)], pa.timestamp("us"))}))
    return store, score


def test_filter_generated_by_clip_score(tmp_path, capsys):
    from featurelt.data.filters import filter_generated
    from featurelt.encoders import build_text_encoder

    store, score = build_generated(tmp_path / "store", build_text_encoder("clip:tiny", untrained=True))
    assert abs(score["g_rand"]) < 0.5  # seeded noise: nearly orthogonal to the text
    mu = 0.5
    dry = filter_generated(store, "clip_tiny", mu=mu, dry_run=True)
    assert (dry.checked, dry.kept, dry.rejected) == (4, 2, {"low-score": 2})
    by_class = {r["class"]: r for r in dry.per_class}
    assert by_class["cat"]["score_min"] == pytest.approx(-1.0, abs=1e-4)
    assert by_class["cat"]["score_max"] == pytest.approx(1.0, abs=1e-4)
    assert by_class["dog"]["score_min"] == pytest.approx(score["g_rand"], abs=1e-4)
    before = store.version
    res = filter_generated(store, "clip_tiny", mu=mu)
    assert res.store_version == before + 1
    split = {r["sample_id"]: r["split"] for r in store.sql("SELECT sample_id, split FROM samples").to_pylist()}
    assert {s for s, sp in split.items() if sp == FILTERED_SPLIT} == {"g_bad", "g_rand"}
    reasons = {r["sample_id"]: r["reason"] for r in store.read("rejects").to_pylist()}
    assert reasons["g_bad"].startswith(f"CLIP score -1.0000 < mu {mu:g} (text: 'a fluffy cat')")
    assert "class 'dog'" in reasons["g_rand"]
    # a set without a text tower cannot be scored
    with pytest.raises(ValueError, match="made by pixels, which has no text tower"):
        filter_generated(store, "pix", mu=0.0)
    assert main(["--store", str(store.root), "filter-generated", "--features", "clip_tiny", "--mu", "-2",
                 "--dry-run"]) == 1
    assert "mu is a cosine threshold in [-1, 1]" in capsys.readouterr().err
    assert main(["--store", str(store.root), "filter-generated", "--features", "clip_tiny", "--mu", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["checked"] == 2  # the two kept ones, both above 0
