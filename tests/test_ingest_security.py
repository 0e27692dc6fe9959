"""Ingest of hostile or odd input: CIFAR pickles never run code (issue 13 point 1); real-format CIFAR still ingests."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from featurelt.cli import main
from featurelt.store import Store


class _Payload:
    """Unpickling this calls os.system (what a crafted batches.meta would do)."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):  # noqa: D105
        return (os.system, (f"touch {self.target}",))


def test_cifar_pickle_with_code_is_refused_and_runs_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    target = tmp_path / "pwned"
    # the payload runs while unpickling, before the reader could check the type
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": ["a"], "x": _Payload(target)}))
    (folder / "data_batch_1").write_bytes(pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [0]}))
    assert pickle.loads(pickle.dumps(1)) == 1
    assert main(["--store", str(tmp_path / "store"), "ingest", "--no-progress", str(folder)]) == 1
    err = capsys.readouterr().err
    assert not target.exists()
    assert err.startswith("featurelt ingest: error:"), err
    assert str(folder / "batches.meta") in err and "refusing to load global" in err and "system" in err, err
    # the same refusal for a data batch
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": ["a"]}))
    (folder / "data_batch_1").write_bytes(pickle.dumps({"data": _Payload(target), "labels": [0]}))
    assert main(["--store", str(tmp_path / "store"), "ingest", "--no-progress", "--skip-bad", str(folder)]) == 1
    err = capsys.readouterr().err
    assert not target.exists()
    assert str(folder / "data_batch_1") in err and "refusing to load global" in err, err


def _py2_style(obj: dict) -> bytes:
    """A protocol-2 pickle naming numpy.core.multiarray._reconstruct, as the published CIFAR files (numpy 1) do."""
    data = pickle.dumps(obj, protocol=2)
    assert (b"numpy._core.multiarray\n_reconstruct" in data) == ("data" in obj)
    return data.replace(b"numpy._core.multiarray\n_reconstruct", b"numpy.core.multiarray\n_reconstruct")


def test_real_format_cifar_still_ingests(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "batches.meta").write_bytes(_py2_style({"label_names": ["cat", "dog"], "num_cases_per_batch": 3,
                                                      "num_vis": 3072}))
    train = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    (folder / "data_batch_1").write_bytes(_py2_style({"batch_label": "training batch 1 of 5", "data": train,
                                                      "labels": [1, 0, 1], "filenames": ["a.png", "b.png", "c.png"]}))
    (folder / "test_batch").write_bytes(_py2_style({"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8),
                                                    "labels": [0, 1]}))
    store_path = tmp_path / "store"
    assert main(["--store", str(store_path), "ingest", "--no-progress", str(folder)]) == 0
    store = Store(store_path)
    assert store.count("samples", "split = 'train'") == 3 and store.count("samples", "split = 'test'") == 2
    assert store.count("samples", "label = 1") == 3
