"""Two real ``featurelt ingest`` processes at once (issue 13 point 4): labels and duplicates are decided under
the store lock, so new classes never share a label and the same rows are never added twice."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from featurelt.cli import main
from featurelt.store import Store

REPO = Path(__file__).resolve().parents[1]
N_PER_CLASS = 400  # enough images that one ingest is still writing while the other starts


def make_folder(root: Path, classes: list[str], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(N_PER_CLASS):
            Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def ingest_at_once(store: Path, *folders: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    procs = [subprocess.Popen([sys.executable, "-m", "featurelt", "--store", str(store), "ingest", "--no-progress",
                               str(f)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for f in folders]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, (out, err)


def check_consistent(store_path: Path) -> Store:
    store = Store(store_path)
    classes = store.read("classes").to_pylist()
    names = [c["name"] for c in classes]
    labels = [c["label"] for c in classes]
    assert len(set(names)) == len(names) and len(set(labels)) == len(labels), classes
    ids = store.read("samples", columns=["sample_id"]).column("sample_id").to_pylist()
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} duplicate sample_ids"
    return store


def test_two_ingests_of_new_classes_get_distinct_labels(tmp_path: Path) -> None:
    store_path = tmp_path / "store"
    base = make_folder(tmp_path / "base", ["a", "b"], seed=0)
    assert main(["--store", str(store_path), "ingest", "--no-progress", str(base)]) == 0
    ingest_at_once(store_path, make_folder(tmp_path / "x", ["x"], seed=1), make_folder(tmp_path / "y", ["y"], seed=2))
    store = check_consistent(store_path)
    label = {c["name"]: c["label"] for c in store.read("classes").to_pylist()}
    assert sorted(label.values()) == [0, 1, 2, 3] and label["a"] == 0 and label["b"] == 1
    for name in ("x", "y"):  # every row of a folder carries its class's one label
        got = set(store.read("samples", columns=["label"], filter=f"dataset = '{name}'").column("label").to_pylist())
        assert got == {label[name]}, (name, got, label)
    assert store.count("samples") == 4 * N_PER_CLASS


def test_same_first_ingest_twice_at_once_adds_rows_once(tmp_path: Path) -> None:
    store_path = tmp_path / "store"
    folder = make_folder(tmp_path / "pets", ["cat", "dog"], seed=3)
    ingest_at_once(store_path, folder, folder)
    store = check_consistent(store_path)
    assert store.count("samples") == 2 * N_PER_CLASS
    # both processes held out the same seeded test fifth of each class (ingest's default for a plain folder)
    assert [c["train_count"] for c in store.read("classes").sort_by("label").to_pylist()] == [N_PER_CLASS * 4 // 5] * 2
    assert store.count("samples", "split = 'test'") == 2 * N_PER_CLASS // 5
