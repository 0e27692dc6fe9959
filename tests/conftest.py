"""Shared pytest fixtures.

``tmp_store``
    An empty :class:`featurelt.Store` rooted at ``tmp_path / "store"`` (function scope).

``digits_store``
    Session-scoped *path* (``pathlib.Path``) of a store built once per test session through the CLI:

    1. ``featurelt ingest --builtin digits`` -- scikit-learn's 1797 8x8 digits as PNG, a deterministic
       stratified 80/20 train/test split: 1437 train rows (139..146 per class, 10 classes "zero".."nine"),
       360 test rows;
    2. ``featurelt make-lt --imbalance 10 --profile exp --seed 0 --many 60 --few 20`` -- exponential
       profile ``n_y = floor(n_max * (1/10)^(y/9))`` with ``n_max`` = 139 (the smallest balanced train
       count): train counts 139, 107, 83, 64, 49, 38, 29, 23, 17, 13 (562 rows; the other 875 train rows
       move to split ``train_unused``), so the classes table has all three buckets: many (> 60) labels
       0-3, medium labels 4-7, few (< 20) labels 8-9.

    Store versions: 1 = balanced ingest, 2 = long-tailed. The store is shared by all tests of the
    session: tests that write must copy it first::

        root = tmp_path / "store"
        shutil.copytree(digits_store, root)
        store = Store(root)
"""
from __future__ import annotations

from pathlib import Path

import pytest

from featurelt.store import Store

DIGITS_MAKE_LT = ["--imbalance", "10", "--profile", "exp", "--seed", "0", "--many", "60", "--few", "20"]


@pytest.fixture()
def tmp_store(tmp_path: Path) -> Store:
    """An empty store in ``tmp_path / "store"``."""
    return Store(tmp_path / "store")


@pytest.fixture(scope="session")
def digits_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a read-only-by-convention store: builtin digits ingested (v1), then make-lt (v2)."""
    from featurelt.cli import main

    root = tmp_path_factory.mktemp("digits") / "store"
    rc = main(["--store", str(root), "ingest", "--builtin", "digits"])
    assert rc == 0, f"ingest --builtin digits failed with exit status {rc}"
    rc = main(["--store", str(root), "make-lt", *DIGITS_MAKE_LT])
    assert rc == 0, f"make-lt {' '.join(DIGITS_MAKE_LT)} failed with exit status {rc}"
    return root


@pytest.fixture(scope="session")
def ft_store(digits_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a small long-tailed digits store for fine-tuning tests (copy it before writing): ``digits_store``
    with train rows cut to ``max(2, round(16 * 0.75**y))`` per class y (16, 12, 9, 7, 5, 4, 3, 2, 2, 2: 62 rows),
    5 test rows per class (50) and no ``train_unused`` rows (the classes table keeps digits_store's buckets)."""
    import shutil

    root = tmp_path_factory.mktemp("ftdigits") / "store"
    shutil.copytree(digits_store, root)
    store = Store(root)
    rows = store.read("samples", columns=["sample_id", "split", "label"]).to_pylist()
    seen: dict[tuple[str, int], int] = {}
    drop = []
    for r in rows:
        cap = {"train": max(2, round(16 * 0.75 ** r["label"])), "test": 5}.get(r["split"], 0)
        key = (r["split"], r["label"])
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > cap:
            drop.append(r["sample_id"])
    ids = ", ".join("'" + s.replace("'", "''") + "'" for s in drop)
    with store.transaction("ft_store: a small long-tailed train split, 5 test rows per class") as tx:
        tx.delete("samples", f"sample_id IN ({ids})")
    return root
