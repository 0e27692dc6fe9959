"""Long-tailed train splits from balanced data (``featurelt make-lt``), METHODS.md section 0.

Profiles (pure functions of their arguments; class ``y`` is the y-th target class in label order):

- ``exp`` (CIFAR-LT): ``n_y = floor(n_max * (1/imbalance)^(y/(K-1)))``;
- ``pareto`` (ImageNet-LT / Places-LT style): K draws from a Pareto distribution with shape 6
  (``numpy.random.default_rng(seed).pareto(6, K)``), sorted in decreasing order and mapped linearly so
  the largest is ``n_max`` and the smallest ``n_max / imbalance``, then floored. It does not reproduce
  ImageNet-LT's buckets: for 1000 classes from 1280 to 5 images it gives about 316 / 521 / 163
  many / medium / few classes where ImageNet-LT has 385 / 479 / 136;
- ``imagenet-lt``: the published ImageNet-LT distribution (Liu et al. 2019: 1000 classes, 1280 to 5
  train images, 385 many (> 100) / 479 medium / 136 few (< 20) classes, 115,846 images). The per-class
  list is not shipped, so the profile is a curve through those statistics in log space:
  ``n(q) = n_max * imbalance^(-g(q))`` at ``q = y / (K-1)``, with ``g`` rising from 0 to ``g_a`` on
  ``[0, 0.385]`` as ``g_a (1 - (1 - q/0.385)^3.71)`` (the exponent fits the image total), linear to
  ``g_b`` at 0.864 and to 1 at 1, where ``g_a = log(1280/101) / log 256`` and ``g_b = log(1280/20) / log 256``
  put 101 and 20 images at the bucket edges. With n_max 1280 and imbalance 256 (its default) it gives
  exactly 385 / 479 / 136 classes for K = 1000 (115,880 images); other K, n_max and imbalance scale
  the same shape.

:func:`make_lt` keeps a seeded random subset of each class's train rows (original source only) and
moves the rest to split ``train_unused``, in one transaction that also rebuilds ``classes``. Rows
already in ``train_unused`` are returned to the pool first, so ``make-lt`` can be re-run with other
settings and always starts from the balanced data. The choice depends only on the seed, the
profile and the sorted sample ids (not on storage order), so it is deterministic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np

if TYPE_CHECKING:
    from featurelt.store.core import Store

Profile = Literal["exp", "pareto", "imagenet-lt"]
PROFILES: tuple[str, ...] = get_args(Profile)
PARETO_SHAPE = 6.0  # ImageNet-LT's Pareto shape (alpha = 6)
# imagenet-lt curve (module docstring): ImageNet-LT's 1280..5 images and its many / few bucket edges
IMAGENET_LT_IMBALANCE = 256.0            # 1280 / 5
IMAGENET_LT_EDGES = (0.385, 0.864)       # fractions of classes above 100 and at >= 20 images (385, 385 + 479 of 1000)
IMAGENET_LT_LOG_DROPS = (math.log(1280 / 101) / math.log(256), math.log(1280 / 20) / math.log(256))
IMAGENET_LT_HEAD_POWER = 3.71            # fits the 115,846 images of ImageNet-LT's train split
UNUSED_SPLIT = "train_unused"
_EPS = 1e-9  # floor() guard against 144 * 0.1 = 14.399999...


def _check(n_max: int, num_classes: int, imbalance: float) -> None:
    if not isinstance(n_max, (int, np.integer)) or n_max < 1:
        raise ValueError(f"n_max must be a positive integer, got {n_max!r}")
    if num_classes < 1:
        raise ValueError(f"need at least one class, got num_classes={num_classes}")
    if not imbalance >= 1:
        raise ValueError(f"imbalance must be >= 1 (n_max / n_min), got {imbalance}")
    if n_max / imbalance < 1 - _EPS:
        raise ValueError(f"imbalance {imbalance} leaves the smallest class fewer than 1 image (n_max={n_max})")


def exp_profile(n_max: int, num_classes: int, imbalance: float) -> list[int]:
    """CIFAR-LT counts ``floor(n_max * (1/imbalance)^(y/(K-1)))`` for ``y = 0..K-1``."""
    _check(n_max, num_classes, imbalance)
    if num_classes == 1:
        return [int(n_max)]
    return [int(math.floor(n_max * (1.0 / imbalance) ** (y / (num_classes - 1)) + _EPS)) for y in range(num_classes)]


def pareto_profile(n_max: int, num_classes: int, imbalance: float, *, seed: int = 0,
                   shape: float = PARETO_SHAPE) -> list[int]:
    """ImageNet-LT style counts: sorted Pareto(shape) draws mapped to ``[n_max / imbalance, n_max]``."""
    _check(n_max, num_classes, imbalance)
    if num_classes == 1:
        return [int(n_max)]
    draws = np.sort(np.random.default_rng(seed).pareto(shape, num_classes))[::-1]
    lo, hi = float(draws[-1]), float(draws[0])
    n_min = n_max / imbalance
    if hi == lo:
        return [int(n_max)] * num_classes
    scaled = n_min + (draws - lo) / (hi - lo) * (n_max - n_min)
    counts = [int(math.floor(v + _EPS)) for v in scaled]
    counts[0] = int(n_max)
    return counts


def imagenet_lt_profile(n_max: int, num_classes: int, imbalance: float = IMAGENET_LT_IMBALANCE) -> list[int]:
    """ImageNet-LT's published class-size curve (module docstring) for ``y = 0..K-1``, largest first."""
    _check(n_max, num_classes, imbalance)
    if num_classes == 1:
        return [int(n_max)]
    (a, b), (ga, gb) = IMAGENET_LT_EDGES, IMAGENET_LT_LOG_DROPS
    q = np.arange(num_classes) / (num_classes - 1)
    head = ga * (1.0 - np.clip(1.0 - q / a, 0.0, 1.0) ** IMAGENET_LT_HEAD_POWER)
    g = np.where(q < a, head, np.where(q < b, ga + (gb - ga) * (q - a) / (b - a), gb + (1.0 - gb) * (q - b) / (1.0 - b)))
    counts = np.floor(n_max * np.power(float(imbalance), -g) + _EPS).astype(np.int64)
    return [int(max(1, c)) for c in counts]


def profile_counts(profile: Profile, n_max: int, num_classes: int, imbalance: float, *, seed: int = 0) -> list[int]:
    """Counts of ``profile`` (``exp`` | ``pareto`` | ``imagenet-lt``) for classes 0..K-1 in label order."""
    if profile == "exp":
        return exp_profile(n_max, num_classes, imbalance)
    if profile == "pareto":
        return pareto_profile(n_max, num_classes, imbalance, seed=seed)
    if profile == "imagenet-lt":
        return imagenet_lt_profile(n_max, num_classes, imbalance)
    raise ValueError(f"unknown profile '{profile}'; available: {', '.join(PROFILES)}")


def choose_subset(sample_ids: list[str], n: int, rng: np.random.Generator) -> list[str]:
    """``n`` of ``sample_ids`` chosen by ``rng`` from their sorted order (independent of storage order)."""
    if n > len(sample_ids):
        raise ValueError(f"cannot keep {n} of {len(sample_ids)} rows")
    ordered = sorted(sample_ids)
    pick = rng.permutation(len(ordered))[:n]
    return [ordered[i] for i in sorted(pick.tolist())]


@dataclass
class LongTailResult:
    """What make-lt did: counts kept per label (label order), rows moved, store version."""

    counts: dict[int, int]
    kept: int
    moved: int
    store_version: int

    def summary(self) -> str:
        shown = ", ".join(str(n) for n in self.counts.values())
        return (f"make-lt: kept {self.kept} train rows ({shown}), {self.moved} moved to split '{UNUSED_SPLIT}'; "
                f"store version {self.store_version}")


def _in_list(ids: list[str]) -> str:
    return ", ".join("'" + s.replace("'", "''") + "'" for s in ids)


def make_lt(store: "Store", *, imbalance: float | None, profile: Profile = "exp", seed: int = 0,
            max_per_class: int | None = None, many: int | None = None, few: int | None = None,
            message: str | None = None, chunk: int = 20000) -> LongTailResult:
    """Make the train split long-tailed in one transaction (see module docstring).

    n_max is ``max_per_class`` if given, else the smallest per-class pool (train + train_unused rows
    of source original), so every class can supply its count. many / few: bucket thresholds for the
    rebuilt classes table (default: the current ones, else 100 / 20). imbalance: n_max / n_min; None is
    ImageNet-LT's 256 for profile ``imagenet-lt`` and an error for the others.
    """
    from featurelt.data.classes import check_thresholds, current_thresholds, rebuild_classes

    if profile not in PROFILES:
        raise ValueError(f"unknown profile '{profile}'; available: {', '.join(PROFILES)}")
    if imbalance is None:
        if profile != "imagenet-lt":
            raise ValueError(f"profile {profile} needs --imbalance (n_max / n_min, e.g. 100)")
        imbalance = IMAGENET_LT_IMBALANCE
    if not store.has_table("samples") or not store.has_table("classes"):
        raise ValueError(f"store {store.root} has no samples: run `featurelt ingest` first")
    cur_many, cur_few = current_thresholds(store)
    check_thresholds(cur_many if many is None else many, cur_few if few is None else few)
    classes = store.read("classes", columns=["label", "name", "source"]).to_pylist()
    targets = sorted(c["label"] for c in classes if c["source"] != "auxiliary")
    names = {c["label"]: c["name"] for c in classes}
    pool_filter = f"split IN ('train', '{UNUSED_SPLIT}') AND source = 'original'"
    pool: dict[int, list[str]] = {y: [] for y in targets}
    for batch in store.scan("samples", columns=["sample_id", "label"], filter=pool_filter, batch_size=65536):
        for sid, lab in zip(batch.column("sample_id").to_pylist(), batch.column("label").to_pylist()):
            if lab in pool:
                pool[lab].append(sid)
    targets = [y for y in targets if pool[y]]
    if len(targets) < 2:
        raise ValueError(f"make-lt needs train rows in at least 2 target classes, found {len(targets)}")
    smallest = min(targets, key=lambda y: len(pool[y]))
    n_max = max_per_class if max_per_class is not None else len(pool[smallest])
    counts = profile_counts(profile, n_max, len(targets), imbalance, seed=seed)
    for y, n in zip(targets, counts):
        if n > len(pool[y]):
            raise ValueError(f"class {y} ('{names[y]}') has {len(pool[y])} train rows but the {profile} profile "
                             f"with n_max={n_max} asks for {n}; lower --max-per-class")
    rng = np.random.default_rng(seed)
    kept: dict[int, list[str]] = {y: choose_subset(pool[y], n, rng) for y, n in zip(targets, counts)}
    kept_ids = [s for y in targets for s in kept[y]]
    kept_set = set(kept_ids)
    drop = [s for y in targets for s in sorted(pool[y]) if s not in kept_set]
    pool_where = f"split IN ('train', '{UNUSED_SPLIT}') AND source = 'original'"
    # two kinds of update: the whole pool to one split, then the smaller id list to the other
    if len(kept_ids) <= len(drop):
        base, other, ids = UNUSED_SPLIT, "train", kept_ids
    else:
        base, other, ids = "train", UNUSED_SPLIT, drop
    with store.transaction(message) as tx:
        if store.count("samples", f"{pool_where} AND split != '{base}'"):
            tx.update("samples", {"split": f"'{base}'"}, where=f"{pool_where} AND split != '{base}'")
        changed = 0
        for i in range(0, len(ids), chunk):
            part = ids[i:i + chunk]
            changed += tx.update("samples", {"split": f"'{other}'"},
                                 where=f"split = '{base}' AND sample_id IN ({_in_list(part)})")
        if changed != len(ids):
            raise RuntimeError(f"make-lt set split '{other}' on {changed} rows but meant {len(ids)}")
        rebuild_classes(tx, many=many, few=few)
    store.refresh()
    return LongTailResult(counts={y: n for y, n in zip(targets, counts)}, kept=len(kept_ids),
                          moved=len(drop), store_version=store.version)


__all__ = ["exp_profile", "pareto_profile", "imagenet_lt_profile", "profile_counts", "choose_subset", "make_lt", "LongTailResult",
           "PROFILES", "UNUSED_SPLIT"]
