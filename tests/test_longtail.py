"""Long-tailed splits: profiles against hand-computed counts, make-lt on digits, determinism, time travel."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from featurelt.cli import main
from featurelt.data.classes import assign_buckets, bucket_for, classes_table, check_thresholds
from featurelt.data.longtail import choose_subset, exp_profile, imagenet_lt_profile, pareto_profile, profile_counts
from featurelt.store import Store

# digits after the 80/20 split: the smallest class (8) has 139 train rows -> n_max = 139.
# floor(139 * 0.1^(y/9)): 139, 107.3, 82.9(83.0-), ... computed by hand below
DIGITS_N_MAX = 139
DIGITS_LT10 = [139, 107, 83, 64, 49, 38, 29, 23, 17, 13]


# ---------------------------------------------------------------- pure functions
def test_exp_profile_hand_computed() -> None:
    # n_y = floor(600 * 0.01^(y/9)): 600, 359.4, 215.4, 129.3, 77.4, 46.4, 27.8, 16.7, 10.0, 6
    assert exp_profile(600, 10, 100) == [600, 359, 215, 129, 77, 46, 27, 16, 10, 6]
    # 139 * 0.1^(1/9) = 107.31, 139 * 0.1^(2/9) = 83.28, ..., 139 * 0.1 = 13.9
    assert exp_profile(DIGITS_N_MAX, 10, 10) == DIGITS_LT10
    assert exp_profile(500, 2, 50) == [500, 10]
    assert exp_profile(70, 1, 10) == [70]
    assert exp_profile(144, 10, 1) == [144] * 10


def test_profile_input_checks() -> None:
    with pytest.raises(ValueError, match="imbalance must be >= 1"):
        exp_profile(100, 10, 0.5)
    with pytest.raises(ValueError, match="fewer than 1 image"):
        exp_profile(10, 10, 100)
    with pytest.raises(ValueError, match="unknown profile 'zipf'"):
        profile_counts("zipf", 100, 10, 10)  # type: ignore[arg-type]


def test_pareto_profile_range_and_seed() -> None:
    a = pareto_profile(1280, 50, 256, seed=3)
    assert a[0] == 1280 and a[-1] == 5                      # 1280 / 256 = 5
    assert all(x >= y for x, y in zip(a, a[1:]))
    assert pareto_profile(1280, 50, 256, seed=3) == a        # seeded
    assert pareto_profile(1280, 50, 256, seed=4) != a
    # heavy tail: with shape 6 most classes sit near the bottom of the range
    assert sorted(a)[len(a) // 2] < 1280 / 2


def test_imagenet_lt_profile_matches_the_published_buckets() -> None:
    # ImageNet-LT (Liu et al. 2019): 1000 classes, 1280 to 5 train images, 385 many (> 100), 479 medium,
    # 136 few (< 20) classes, 115,846 images
    c = imagenet_lt_profile(1280, 1000)
    assert c[0] == 1280 and c[-1] == 5 and all(x >= y for x, y in zip(c, c[1:]))
    many, few = sum(n > 100 for n in c), sum(n < 20 for n in c)
    for got, published in ((many, 385), (1000 - many - few, 479), (few, 136)):
        assert abs(got - published) <= 0.05 * published
    assert (many, few) == (385, 136)
    assert sum(c) == pytest.approx(115846, rel=0.01)
    # the pareto profile does not: about 316 / 521 / 163
    p = pareto_profile(1280, 1000, 256, seed=0)
    assert abs(sum(n > 100 for n in p) - 385) > 0.05 * 385
    assert profile_counts("imagenet-lt", 1280, 1000, 256) == c
    # the same shape scaled: 100 classes from 139 images, imbalance 10
    small = imagenet_lt_profile(139, 100, 10)
    assert small[0] == 139 and small[-1] == 13 and all(x >= y for x, y in zip(small, small[1:]))


def test_buckets_pure() -> None:
    assert [bucket_for(n) for n in (101, 100, 20, 19)] == ["many", "medium", "medium", "few"]
    assert assign_buckets({0: 61, 1: 60, 2: 20, 3: 19}, many=60, few=20) == {0: "many", 1: "medium", 2: "medium", 3: "few"}
    with pytest.raises(ValueError, match="--few \\(50\\) must be <= --many"):
        check_thresholds(10, 50)
    t = classes_table([{"label": 1, "name": "b", "source": "auxiliary", "neighbor_of": 0},
                       {"label": 0, "name": "a", "source": "original", "neighbor_of": None}], {0: 5, 1: 500}, many=4, few=2)
    assert t.column("label").to_pylist() == [0, 1]
    assert t.column("bucket").to_pylist() == ["many", None]
    assert t.column("train_count").to_pylist() == [5, 500]


def test_choose_subset_ignores_input_order() -> None:
    import numpy as np

    ids = [f"id{i:03d}" for i in range(50)]
    a = choose_subset(ids, 7, np.random.default_rng(1))
    b = choose_subset(list(reversed(ids)), 7, np.random.default_rng(1))
    assert a == b and len(set(a)) == 7
    with pytest.raises(ValueError, match="cannot keep 51 of 50"):
        choose_subset(ids, 51, np.random.default_rng(1))


# ---------------------------------------------------------------- make-lt on the store
def _train_counts(store: Store) -> list[int]:
    t = store.sql("SELECT label, count(*) AS n FROM samples WHERE split = 'train' GROUP BY label ORDER BY label")
    return t.column("n").to_pylist()


def test_make_lt_counts_equal_the_formula(digits_store: Path) -> None:
    store = Store(digits_store)
    assert store.version == 2
    assert _train_counts(store) == DIGITS_LT10
    classes = store.read("classes").sort_by("label")
    assert classes.column("train_count").to_pylist() == DIGITS_LT10
    # many > 60, few < 20
    assert classes.column("bucket").to_pylist() == ["many"] * 4 + ["medium"] * 4 + ["few"] * 2
    assert store.count("samples") == 1797                                  # nothing deleted
    assert store.count("samples", "split = 'train_unused'") == 1437 - sum(DIGITS_LT10)
    per_bucket = store.sql("SELECT c.bucket, count(*) AS n FROM samples s JOIN classes c USING (label) "
                           "WHERE s.split = 'train' GROUP BY 1 ORDER BY 1").to_pylist()
    assert per_bucket == [{"bucket": "few", "n": 30}, {"bucket": "many", "n": 393}, {"bucket": "medium", "n": 139}]


def test_as_of_reads_the_balanced_version(digits_store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = Store(digits_store, as_of=1)
    counts = _train_counts(old)
    assert sum(counts) == 1437 and min(counts) == DIGITS_N_MAX and max(counts) == 146
    assert main(["--store", str(digits_store), "classes", "--as-of", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["train_count"] for r in rows] == counts
    assert {r["bucket"] for r in rows} == {"many"}                          # defaults 100 / 20 before make-lt


def test_make_lt_is_deterministic_and_rerunnable(digits_store: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(digits_store, a)
    shutil.copytree(digits_store, b)

    def kept(root: Path) -> list[str]:
        return sorted(Store(root).read("samples", columns=["sample_id"], filter="split = 'train'")
                      .column("sample_id").to_pylist())

    original = kept(digits_store)
    # same settings again: the pool is restored first, so the same rows are kept
    assert main(["--store", str(a), "make-lt", "--imbalance", "10", "--seed", "0"]) == 0
    assert kept(a) == original
    assert main(["--store", str(b), "make-lt", "--imbalance", "10", "--seed", "1"]) == 0
    assert kept(b) != original and _train_counts(Store(b)) == DIGITS_LT10
    # re-run with imbalance 100 from the same balanced pool; thresholds kept from the last run (60 / 20)
    assert main(["--store", str(a), "make-lt", "--imbalance", "100", "--profile", "exp"]) == 0
    sa = Store(a)
    assert _train_counts(sa) == exp_profile(DIGITS_N_MAX, 10, 100) == [139, 83, 49, 29, 17, 10, 6, 3, 2, 1]
    assert sa.read("classes").column("bucket_many").to_pylist() == [60] * 10
    assert sa.version == 4 and Store(a, as_of=2).count("samples", "split = 'train'") == sum(DIGITS_LT10)


def test_make_lt_pareto_and_max_per_class(digits_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "s"
    shutil.copytree(digits_store, root)
    assert main(["--store", str(root), "make-lt", "--imbalance", "10", "--profile", "pareto", "--seed", "5",
                 "--max-per-class", "120", "--many", "50", "--few", "15"]) == 0
    expected = pareto_profile(120, 10, 10, seed=5)
    assert expected[0] == 120 and expected[-1] == 12
    store = Store(root)
    assert _train_counts(store) == expected
    assert store.read("classes").column("bucket_few").to_pylist() == [15] * 10
    capsys.readouterr()
    before = store.version
    assert main(["--store", str(root), "make-lt", "--imbalance", "10", "--max-per-class", "145"]) == 1
    err = capsys.readouterr().err
    assert "class 0 ('zero') has 142 train rows" in err and "asks for 145" in err
    assert Store(root).version == before


def test_make_lt_imagenet_lt_profile_from_cli(digits_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "s"
    shutil.copytree(digits_store, root)
    assert main(["--store", str(root), "make-lt", "--profile", "imagenet-lt", "--imbalance", "10"]) == 0
    assert _train_counts(Store(root)) == imagenet_lt_profile(DIGITS_N_MAX, 10, 10)
    assert main(["--store", str(root), "make-lt", "--profile", "imagenet-lt"]) == 1  # 139 / 256 < 1 image
    assert "fewer than 1 image" in capsys.readouterr().err
    assert main(["--store", str(root), "make-lt", "--profile", "exp"]) == 1
    assert "needs --imbalance" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["make-lt", "--help"])
    assert "imagenet-lt" in capsys.readouterr().out
