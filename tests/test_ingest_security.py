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


# ---------------------------------------------------------------- issue 13 point 6 (ingest parts)
def _png(value: int = 7) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (4, 4), value).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose header claims width x height grey pixels (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def _ingest(store: Path, *args: str) -> int:
    return main(["--store", str(store), "ingest", "--no-progress", *args])


def test_reference_of_a_relative_folder_stores_absolute_uris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    (tmp_path / "imgs" / "a" / "x.png").write_bytes(_png())
    monkeypatch.chdir(tmp_path)
    assert _ingest(tmp_path / "store", "--reference", "imgs") == 0
    uri = Store(tmp_path / "store").read("samples", columns=["uri"]).column("uri")[0].as_py()
    assert uri == str(tmp_path / "imgs" / "a" / "x.png") and Path(uri).is_absolute()


@pytest.mark.parametrize("size", [(20000, 20000), (10000, 10000)])  # PIL's error (> 2x the limit) and warning
def test_decompression_bomb_is_rejected_with_skip_bad(tmp_path: Path, size: tuple[int, int],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    (tmp_path / "imgs" / "a" / "ok.png").write_bytes(_png())
    bomb = tmp_path / "imgs" / "a" / "bomb.png"
    bomb.write_bytes(_bomb_png(*size))
    assert len(bomb.read_bytes()) < 2048
    store_path = tmp_path / "store"
    assert _ingest(store_path, str(tmp_path / "imgs")) == 1
    err = capsys.readouterr().err
    assert err.startswith("featurelt ingest: error:") and str(bomb) in err and "decompression bomb" in err, err
    assert _ingest(store_path, "--skip-bad", str(tmp_path / "imgs")) == 0
    store = Store(store_path)
    assert store.count("samples") == 1
    rejects = store.read("rejects").to_pylist()
    assert [r["location"] for r in rejects] == [str(bomb)] and "decompression bomb" in rejects[0]["reason"]


def test_non_utf8_csv_names_the_file_and_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x.png").write_bytes(_png())
    manifest = tmp_path / "m.csv"
    manifest.write_bytes("path,label\nx.png,caf\u00e9\n".encode("latin-1"))
    assert _ingest(tmp_path / "store", str(manifest)) == 1
    err = capsys.readouterr().err
    assert err.startswith("featurelt ingest: error:") and str(manifest) in err and "UTF-8" in err, err
    lst = tmp_path / "train.txt"
    lst.write_bytes(b"x.png 0\n\xe9.png 1\n")
    assert _ingest(tmp_path / "store", str(lst), "--root", str(tmp_path)) == 1
    err = capsys.readouterr().err
    assert err.startswith("featurelt ingest: error:") and str(lst) in err and "UTF-8" in err, err


def test_non_utf8_file_name_is_a_named_bad_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "imgs"
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "ok.png").write_bytes(_png(1))
    bad = os.path.join(os.fsencode(folder / "a"), b"caf\xe9.png")
    with open(bad, "wb") as fh:
        fh.write(_png(2))
    store_path = tmp_path / "store"
    assert _ingest(store_path, str(folder)) == 1
    err = capsys.readouterr().err
    assert err.startswith("featurelt ingest: error:") and "caf\\xe9.png" in err and "UTF-8" in err, err
    assert _ingest(store_path, "--skip-bad", str(folder)) == 0
    store = Store(store_path)
    assert store.count("samples") == 1
    [rej] = store.read("rejects").to_pylist()
    assert rej["location"].endswith("caf\\xe9.png") and "UTF-8" in rej["reason"]
    # a class folder whose name is not UTF-8: an error naming it
    os.mkdir(os.path.join(os.fsencode(folder), b"b\xff"))
    with open(os.path.join(os.fsencode(folder), b"b\xff", b"x.png"), "wb") as fh:
        fh.write(_png(9))
    capsys.readouterr()
    assert _ingest(store_path, "--skip-bad", str(folder)) == 1
    err = capsys.readouterr().err
    assert err.startswith("featurelt ingest: error:") and "b\\xff" in err and "not valid UTF-8" in err, err


def test_folder_ingest_does_not_follow_symlinks_out_of_the_folder(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    outside = tmp_path / "secret"
    (outside / "sub").mkdir(parents=True)
    (outside / "key.png").write_bytes(_png(3))
    (outside / "sub" / "other.png").write_bytes(_png(4))
    folder = tmp_path / "imgs"
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "ok.png").write_bytes(_png(5))
    (folder / "a" / "inside.png").symlink_to(folder / "a" / "ok.png")  # a link within the folder is fine
    (folder / "a" / "link.png").symlink_to(outside / "key.png")
    (folder / "a" / "dirlink").symlink_to(outside / "sub", target_is_directory=True)
    store_path = tmp_path / "store"
    assert _ingest(store_path, str(folder)) == 1
    err = capsys.readouterr().err
    assert str(folder / "a" / "link.png") in err and "outside" in err, err
    assert _ingest(store_path, "--skip-bad", str(folder)) == 0
    store = Store(store_path)
    uris = store.read("samples", columns=["uri"]).column("uri").to_pylist()
    assert all(str(outside) not in u for u in uris), uris
    locations = sorted(r["location"] for r in store.read("rejects").to_pylist())
    assert str(folder / "a" / "link.png") in locations
