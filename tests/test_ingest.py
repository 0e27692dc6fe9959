"""Ingest: every format on tiny generated data, through the CLI; re-ingest; bad input; --skip-bad; builtins."""
from __future__ import annotations

import gzip
import io
import json
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featurelt.cli import main
from featurelt.data.images import decode_bytes, sample_id_for, sha256_hex
from featurelt.data.ingest import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, detect_format
from featurelt.data.formats.builtin import DIGITS_CLASSES
from featurelt.store import Store


# ---------------------------------------------------------------- tiny data
def png(value: int, size: tuple[int, int] = (6, 5), mode: str = "L") -> bytes:
    """A PNG of one grey value (distinct values give distinct content hashes)."""
    buf = io.BytesIO()
    color = value if mode == "L" else (value, 255 - value, 7)
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def make_folder(root: Path, classes: dict[str, int], *, start: int = 0) -> Path:
    """root/<class>/<i>.png with ``n`` images per class, grey values start, start+1, ..."""
    v = start
    for name, n in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / name / f"{i}.png").write_bytes(png(v))
            v += 1
    return root


def run(store: Path, *args: str) -> int:
    return main(["--store", str(store), "ingest", "--no-progress", *args])


def ids(store: Path, filter: str | None = None) -> list[str]:
    return sorted(Store(store).read("samples", columns=["sample_id"], filter=filter).column("sample_id").to_pylist())


@pytest.fixture()
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store"


def assert_refused(store: Path, capsys: pytest.CaptureFixture[str], *args: str, version: int,
                   expect: list[str]) -> str:
    """The ingest exits 1, names ``expect`` in its message, and the store version is unchanged."""
    capsys.readouterr()
    assert run(store, *args) == 1
    err = capsys.readouterr().err
    assert err.startswith("featurelt ingest: error:"), err
    for text in expect:
        assert text in err, (text, err)
    assert Store(store).version == version
    return err


# ---------------------------------------------------------------- image folder
def test_folder_ingest_reingest_and_registry(tmp_path: Path, store_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    folder = make_folder(tmp_path / "pets", {"dog": 3, "cat": 2})
    assert detect_format(folder) == "folder"
    assert run(store_path, str(folder), "--test-fraction", "0") == 0  # all in train
    out = capsys.readouterr().out
    assert "ingested pets: 5 added, 0 duplicates skipped, 0 rejected, 2 new classes; store version 1" in out
    store = Store(store_path)
    classes = store.read("classes").sort_by("label").to_pylist()
    assert [(c["label"], c["name"], c["train_count"]) for c in classes] == [(0, "cat", 2), (1, "dog", 3)]
    t = store.read("samples").sort_by("uri")
    first = t.slice(0, 1).to_pylist()[0]                      # cat/0.png, grey value 3
    assert first["uri"] == str((folder / "cat" / "0.png").resolve())
    assert first["sample_id"] == "pets:cat/0.png" and first["image"] == png(3)  # DATASET:PATH for files
    assert first["content_sha256"] == sha256_hex(png(3))
    assert (first["width"], first["height"], first["split"], first["dataset"]) == (6, 5, "train", "pets")
    # re-ingest: no rows added, and no new store version
    assert run(store_path, str(folder), "--test-fraction", "0") == 0
    assert "0 added, 5 duplicates skipped, 0 rejected, 0 new classes; store version 1" in capsys.readouterr().out
    assert Store(store_path).count("samples") == 5 and Store(store_path).version == 1
    assert Store(store_path).dataset("samples").version == store.dataset("samples").version  # rolled back
    # a second folder: known names keep their labels, new names come after
    more = make_folder(tmp_path / "more", {"cat": 1, "bird": 2}, start=100)
    assert run(store_path, str(more), "--split", "val") == 0
    classes = Store(store_path).read("classes").sort_by("label").to_pylist()
    assert [(c["label"], c["name"]) for c in classes] == [(0, "cat"), (1, "dog"), (2, "bird")]
    assert [c["train_count"] for c in classes] == [2, 3, 0]   # val rows are not train rows
    assert Store(store_path).count("samples", "split = 'val'") == 3


def test_folder_with_split_subfolders_and_reference(tmp_path: Path, store_path: Path) -> None:
    root = tmp_path / "ds"
    make_folder(root / "train", {"a": 2, "b": 2})
    make_folder(root / "test", {"a": 1, "b": 1}, start=50)
    assert run(store_path, str(root), "--reference") == 0
    store = Store(store_path)
    assert store.count("samples", "split = 'train'") == 4 and store.count("samples", "split = 'test'") == 2
    rows = store.read("samples", columns=["image", "uri", "content_sha256", "width"]).to_pylist()
    assert all(r["image"] is None and Path(r["uri"]).is_file() and r["width"] == 6 for r in rows)


def test_auxiliary_classes_with_neighbor_of(digits_store: Path, tmp_path: Path) -> None:
    root = tmp_path / "store"
    shutil.copytree(digits_store, root)
    aux = make_folder(tmp_path / "aux", {"seven-ish": 4})
    assert run(root, str(aux), "--source", "auxiliary", "--neighbor-of", "7") == 0
    store = Store(root)
    c = store.read("classes", filter="name = 'seven-ish'").to_pylist()[0]
    assert (c["label"], c["source"], c["neighbor_of"], c["train_count"], c["bucket"]) == (10, "auxiliary", 7, 0, None)
    # target classes keep their long-tailed counts and buckets (thresholds 60 / 20 kept)
    assert store.read("classes", filter="label = 9").to_pylist()[0]["train_count"] == 13
    assert store.count("samples", "source = 'auxiliary' AND split = 'train'") == 4


def test_neighbor_of_unknown_class(digits_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "store"
    shutil.copytree(digits_store, root)
    aux = make_folder(tmp_path / "aux", {"x": 1})
    assert_refused(root, capsys, str(aux), "--source", "auxiliary", "--neighbor-of", "zebra", version=2,
                   expect=["unknown class 'zebra'"])


# ---------------------------------------------------------------- manifests
def test_csv_manifest_int_labels_names_and_ids(tmp_path: Path, store_path: Path) -> None:
    (tmp_path / "img").mkdir()
    for i in range(4):
        (tmp_path / "img" / f"{i}.png").write_bytes(png(10 + i))
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,split,class_name,sample_id\n"
                        "img/0.png,1,train,tulip,t0\n"
                        "img/1.png,0,train,rose,t1\n"
                        "img/2.png,1,test,,t2\n"
                        f"{tmp_path / 'img' / '3.png'},0,val,rose,\n")
    assert run(store_path, str(manifest)) == 0
    store = Store(store_path)
    classes = store.read("classes").sort_by("label").to_pylist()
    assert [(c["label"], c["name"]) for c in classes] == [(0, "rose"), (1, "tulip")]
    rows = {r["sample_id"]: r for r in store.read("samples").to_pylist()}
    path_id = f"m:{tmp_path / 'img' / '3.png'}"  # no id given: DATASET:PATH as the manifest writes it
    assert set(rows) == {"t0", "t1", "t2", path_id}
    assert (rows["t0"]["label"], rows["t2"]["split"], rows[path_id]["split"]) == (1, "test", "val")


def test_jsonl_manifest_names(tmp_path: Path, store_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(png(20 + i, mode="RGB"))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in [
        {"path": "0.png", "label": "zebra"}, {"path": "1.png", "label": "ant", "split": "val"},
        {"path": "2.png", "label": "zebra", "description": "a zebra"}]) + "\n")
    assert run(store_path, str(manifest), "--dataset", "zoo") == 0
    store = Store(store_path)
    assert [c["name"] for c in store.read("classes").sort_by("label").to_pylist()] == ["ant", "zebra"]
    assert store.count("samples", "dataset = 'zoo' AND label = 1 AND split = 'train'") == 2
    assert store.count("samples", "description = 'a zebra'") == 1


def test_manifest_wrong_column_types(tmp_path: Path, store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "0.png").write_bytes(png(1))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"path": "0.png", "label": 0}\n{"path": "0.png", "label": 1.5}\n'
                        '{"path": 7, "label": 0}\n{"path": "0.png", "label": 0, "split": 3}\n')
    assert_refused(store_path, capsys, str(manifest), version=0,
                   expect=["3 bad row(s)", "m.jsonl:row 2: label must be an integer or a class name, got float 1.5",
                           "row 3: column 'path' must be a string, got int 7",
                           "row 4: column 'split' must be a string"])
    csv_manifest = tmp_path / "m.csv"
    csv_manifest.write_text("file,label\n0.png,0\n")
    assert_refused(store_path, capsys, str(csv_manifest), version=0, expect=["missing ['path']"])


# ---------------------------------------------------------------- split lists
def make_split_root(tmp_path: Path) -> Path:
    root = tmp_path / "imagenet"
    for d, v in (("n01/a.png", 1), ("n01/b.png", 2), ("n02/c.png", 3), ("n03/d.png", 4)):
        (root / d).parent.mkdir(parents=True, exist_ok=True)
        (root / d).write_bytes(png(v))
    return root


def test_split_list(tmp_path: Path, store_path: Path) -> None:
    root = make_split_root(tmp_path)
    lst = tmp_path / "ImageNet_LT_train.txt"
    lst.write_text("n01/a.png 0\nn01/b.png 0\nn02/c.png 5\n")
    assert detect_format(lst) == "split-list"
    assert run(store_path, str(lst), "--root", str(root)) == 0
    val = tmp_path / "ImageNet_LT_val.txt"
    val.write_text("n03/d.png 5\n")
    assert run(store_path, str(val), "--root", str(root)) == 0
    store = Store(store_path)
    # integer labels are store labels: classes 0 and 5, named by their numbers
    assert [(c["label"], c["name"]) for c in store.read("classes").sort_by("label").to_pylist()] == [(0, "0"), (5, "5")]
    assert store.count("samples", "split = 'train'") == 3 and store.count("samples", "split = 'val' AND label = 5") == 1
    assert store.count("samples", "dataset = 'ImageNet'") == 4


def test_split_list_joins_named_classes(tmp_path: Path, store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = make_folder(tmp_path / "pets", {"cat": 1, "dog": 1}, start=100)  # cat = 0, dog = 1
    assert run(store_path, str(folder)) == 0
    root = make_split_root(tmp_path)
    lst = tmp_path / "pets_val.txt"
    lst.write_text("n01/a.png 1\nn02/c.png 0\n")
    assert run(store_path, str(lst), "--root", str(root)) == 0
    assert "2 added, 0 duplicates skipped, 0 rejected, 0 new classes" in capsys.readouterr().out
    store = Store(store_path)
    assert [c["name"] for c in store.read("classes").sort_by("label").to_pylist()] == ["cat", "dog"]
    assert store.count("samples", "split = 'val' AND label = 1 AND uri LIKE '%a.png'") == 1
    # a manifest that names label 0 differently is refused
    (tmp_path / "m.csv").write_text(f"path,label,class_name\n{root / 'n03/d.png'},0,tulip\n")
    assert_refused(store_path, capsys, str(tmp_path / "m.csv"), version=2,
                   expect=["names label 0 'tulip', but the store's class 0 is 'cat'"])


def test_split_list_bad_lines(tmp_path: Path, store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_split_root(tmp_path)
    (tmp_path / "outside.png").write_bytes(png(9))
    lst = tmp_path / "list_train.txt"
    lst.write_text("n01/a.png 0\nn01/b.png cat\n../outside.png 1\nn09/missing.png 1\n")
    err = assert_refused(store_path, capsys, str(lst), "--root", str(root), version=0,
                         expect=["3 bad row(s)", "list_train.txt:line 2: unknown label 'cat'",
                                 "line 3: path '../outside.png' is outside --root", "line 4: file not found"])
    assert "--skip-bad" in err
    # a good ingest first, then the bad list leaves that version alone
    good = tmp_path / "good.txt"
    good.write_text("n02/c.png 1\n")
    assert run(store_path, str(good), "--root", str(root)) == 0
    assert_refused(store_path, capsys, str(lst), "--root", str(root), version=1, expect=["line 2"])
    assert Store(store_path).count("samples") == 1
    # --skip-bad: good rows in, bad rows in rejects, one transaction
    assert run(store_path, str(lst), "--root", str(root), "--skip-bad") == 0
    assert "1 added, 0 duplicates skipped, 3 rejected" in capsys.readouterr().out
    store = Store(store_path)
    assert store.version == 2 and store.count("samples") == 2
    rejects = store.read("rejects").sort_by("row").to_pylist()
    assert [r["row"] for r in rejects] == [2, 3, 4]
    assert "unknown label 'cat'" in rejects[0]["reason"] and rejects[0]["stage"] == "ingest"
    assert {r["command"] for r in rejects} == {store.head().message}   # written by that same transaction
    assert_refused(store_path, capsys, str(lst), version=2, expect=["split list needs --root"])


# ---------------------------------------------------------------- bad images, duplicates, empty input
def test_corrupt_and_truncated_images(tmp_path: Path, store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = make_folder(tmp_path / "f", {"a": 2, "b": 1})
    (folder / "a" / "corrupt.png").write_bytes(b"this is not a png")
    (folder / "b" / "truncated.png").write_bytes(png(200, size=(64, 64))[:60])
    err = assert_refused(store_path, capsys, str(folder), version=0,
                         expect=["2 bad row(s)", "corrupt.png: cannot decode image", "truncated.png"])
    assert "nothing committed" in err
    assert not Store(store_path).has_table("samples")
    assert run(store_path, str(folder), "--skip-bad") == 0
    store = Store(store_path)
    assert store.count("samples") == 3 and store.count("rejects") == 2
    assert sorted(Path(r["location"]).name for r in store.read("rejects").to_pylist()) == ["corrupt.png", "truncated.png"]
    # every stored image decodes
    for r in store.read("samples", columns=["image"]).to_pylist():
        decode_bytes(r["image"])
    # the same folder again: its good rows are already stored, so --skip-bad succeeds and adds nothing
    assert run(store_path, str(folder), "--skip-bad") == 0
    assert "0 added, 3 duplicates skipped, 2 rejected" in capsys.readouterr().out
    assert Store(store_path).count("samples") == 3


def test_duplicate_id_with_different_content(tmp_path: Path, store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(png(i))
    within = tmp_path / "within.csv"
    within.write_text("path,label,sample_id\n0.png,a,x1\n1.png,a,x1\n")
    assert_refused(store_path, capsys, str(within), version=0,
                   expect=["within.csv:row 3", "duplicate sample_id x1 with different content"])
    first = tmp_path / "first.csv"
    first.write_text("path,label,sample_id\n0.png,a,x1\n")
    assert run(store_path, str(first)) == 0
    second = tmp_path / "second.csv"
    second.write_text("path,label,sample_id\n0.png,a,x1\n2.png,a,x1b\n1.png,a,x1\n")
    assert_refused(store_path, capsys, str(second), version=1,
                   expect=["1 bad row(s)", "second.csv:row 4", "duplicate sample_id x1 with different content"])
    assert ids(store_path) == ["x1"]


def test_empty_inputs(tmp_path: Path, store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert_refused(store_path, capsys, str(tmp_path / "empty"), version=0, expect=["empty input"])
    (tmp_path / "empty.csv").write_text("")
    assert_refused(store_path, capsys, str(tmp_path / "empty.csv"), version=0, expect=["empty input"])
    (tmp_path / "header.csv").write_text("path,label\n")
    assert_refused(store_path, capsys, str(tmp_path / "header.csv"), version=0, expect=["empty input"])
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "a" / "notes.txt").write_text("x")
    assert_refused(store_path, capsys, str(tmp_path / "noimg"), version=0, expect=["empty input: no images found"])
    assert_refused(store_path, capsys, str(tmp_path / "nope"), version=0, expect=["input not found"])


# ---------------------------------------------------------------- iNaturalist, CIFAR, IDX
def test_inat_json(tmp_path: Path, store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "train_val2018" / "Plantae").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "train_val2018" / "Plantae" / f"{i}.jpg").write_bytes(png(40 + i))
    doc = {"images": [{"id": 10 + i, "file_name": f"train_val2018/Plantae/{i}.jpg", "width": 6, "height": 5}
                      for i in range(3)],
           "annotations": [{"id": 1, "image_id": 10, "category_id": 4}, {"id": 2, "image_id": 11, "category_id": 2},
                           {"id": 3, "image_id": 12, "category_id": 4}],
           "categories": [{"id": 2, "name": "Aloe vera"}, {"id": 4, "name": "Quercus robur"}]}
    path = tmp_path / "train2018.json"
    path.write_text(json.dumps(doc))
    assert run(store_path, str(path)) == 0
    store = Store(store_path)
    assert [c["name"] for c in store.read("classes").sort_by("label").to_pylist()] == ["Aloe vera", "Quercus robur"]
    rows = {r["sample_id"]: r for r in store.read("samples").to_pylist()}
    assert sorted(rows) == ["inat2018:10", "inat2018:11", "inat2018:12"]
    assert rows["inat2018:11"]["label"] == 0 and rows["inat2018:10"]["label"] == 1
    # an annotation pointing at an unknown category is a bad row
    doc["annotations"][0]["category_id"] = 99
    path.write_text(json.dumps(doc))
    assert_refused(store_path, capsys, str(path), version=1,
                   expect=["train2018.json:images[0]", "unknown label: category_id 99 is not in 'categories'"])


def _pickle(path: Path, obj: dict) -> None:
    path.write_bytes(pickle.dumps(obj))


def test_cifar10_and_cifar100(tmp_path: Path, store_path: Path) -> None:
    rng = np.random.default_rng(0)
    c10 = tmp_path / "cifar-10-batches-py"
    c10.mkdir()
    _pickle(c10 / "batches.meta", {"label_names": ["airplane", "automobile", "bird"]})
    train = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    _pickle(c10 / "data_batch_1", {"data": train, "labels": [0, 2, 1, 2]})
    _pickle(c10 / "test_batch", {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [1, 0]})
    assert detect_format(c10) == "cifar"
    assert run(store_path, str(c10)) == 0
    store = Store(store_path)
    assert [c["name"] for c in store.read("classes").sort_by("label").to_pylist()] == ["airplane", "automobile", "bird"]
    assert store.count("samples", "split = 'train'") == 4 and store.count("samples", "split = 'test'") == 2
    # pixels survive: CHW planes -> HWC PNG
    want = train[1].reshape(3, 32, 32).transpose(1, 2, 0)
    row = store.read("samples", filter=f"sample_id = '{sample_id_for(_png_of(want))}'").to_pylist()[0]
    assert row["label"] == 2 and np.array_equal(np.asarray(decode_bytes(row["image"])), want)

    c100 = tmp_path / "cifar-100-python"
    c100.mkdir()
    _pickle(c100 / "meta", {"fine_label_names": ["apple", "aquarium_fish"], "coarse_label_names": ["x"]})
    _pickle(c100 / "train", {"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), "fine_labels": [1, 1, 0],
                             "coarse_labels": [0, 0, 0]})
    _pickle(c100 / "test", {"data": rng.integers(0, 256, (1, 3072), dtype=np.uint8), "fine_labels": [0],
                            "coarse_labels": [0]})
    assert run(store_path, str(c100)) == 0
    store = Store(store_path)
    names = [c["name"] for c in store.read("classes").sort_by("label").to_pylist()]
    assert names == ["airplane", "automobile", "bird", "apple", "aquarium_fish"]
    assert store.count("samples", "dataset = 'cifar100' AND label = 4") == 2


def _png_of(array: np.ndarray) -> bytes:
    from featurelt.data.images import encode_png

    return encode_png(np.ascontiguousarray(array))


def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, *, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    img = struct.pack(">BBBBIII", 0, 0, 8, 3, n, h, w) + images.astype(np.uint8).tobytes()
    lab = struct.pack(">BBBBI", 0, 0, 8, 1, n) + labels.astype(np.uint8).tobytes()
    opener = gzip.compress if gz else (lambda b: b)
    suffix = ".gz" if gz else ""
    (folder / f"{prefix}-images-idx3-ubyte{suffix}").write_bytes(opener(img))
    (folder / f"{prefix}-labels-idx1-ubyte{suffix}").write_bytes(opener(lab))


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files(tmp_path: Path, store_path: Path, gz: bool, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    folder = tmp_path / "mnistish"
    write_idx(folder, "train", train, np.array([0, 1, 2, 1, 0]), gz=gz)
    write_idx(folder, "t10k", rng.integers(0, 256, (2, 4, 3), dtype=np.uint8), np.array([2, 2]), gz=gz)
    assert detect_format(folder) == "idx"
    assert run(store_path, str(folder)) == 0
    store = Store(store_path)
    assert store.count("samples", "split = 'train'") == 5 and store.count("samples", "split = 'test' AND label = 2") == 2
    row = store.read("samples", filter=f"sample_id = '{sample_id_for(_png_of(train[3]))}'").to_pylist()[0]
    assert (row["label"], row["width"], row["height"]) == (1, 3, 4)
    assert np.array_equal(np.asarray(decode_bytes(row["image"])), train[3])
    # truncated image file: refused, naming the file
    raw = (folder / f"train-images-idx3-ubyte{'.gz' if gz else ''}")
    data = gzip.decompress(raw.read_bytes()) if gz else raw.read_bytes()
    raw.write_bytes(gzip.compress(data[:-5]) if gz else data[:-5])
    capsys.readouterr()
    assert run(store_path, str(folder), "--dataset", "again") == 1
    assert "truncated IDX file" in capsys.readouterr().err and Store(store_path).version == 1


# ---------------------------------------------------------------- builtins
def test_builtin_digits(digits_store: Path) -> None:
    store = Store(digits_store, as_of=1)
    assert store.count("samples") == 1797
    assert store.count("samples", "split = 'test'") == 360 and store.count("samples", "split = 'train'") == 1437
    assert [c["name"] for c in store.read("classes").sort_by("label").to_pylist()] == DIGITS_CLASSES
    # stratified: every class has 35 or 36 test rows (20% of 174..183)
    per_class = store.sql("SELECT label, count(*) n FROM samples WHERE split = 'test' GROUP BY label").column("n").to_pylist()
    assert min(per_class) >= 35 and max(per_class) <= 37
    row = store.read("samples", columns=["image", "width", "height"], filter="split = 'train'").slice(0, 1).to_pylist()[0]
    assert (row["width"], row["height"]) == (8, 8) and decode_bytes(row["image"]).mode == "L"


def test_builtin_digits_is_deterministic(digits_store: Path, tmp_path: Path) -> None:
    assert run(tmp_path / "again", "--builtin", "digits") == 0
    assert ids(tmp_path / "again", "split = 'test'") == sorted(
        Store(digits_store, as_of=1).read("samples", columns=["sample_id"], filter="split = 'test'")
        .column("sample_id").to_pylist())


def test_builtin_fashion_mnist_limit(store_path: Path) -> None:
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"{FASHION_MNIST_DIR} is missing (Debian package dataset-fashion-mnist not installed)")
    assert run(store_path, "--builtin", "fashion-mnist", "--limit", "40") == 0
    store = Store(store_path)
    assert store.count("samples") == 40 and store.count("samples", "dataset = 'fashion-mnist' AND split = 'train'") == 40
    assert [c["name"] for c in store.read("classes").sort_by("label").to_pylist()] == FASHION_MNIST_CLASSES
    row = store.read("samples", columns=["image", "width"]).slice(0, 1).to_pylist()[0]
    assert row["width"] == 28 and decode_bytes(row["image"]).size == (28, 28)
    # the first training image of Fashion-MNIST is an ankle boot (label 9)
    first = store.read("samples", columns=["label", "uri"]).to_pylist()
    assert 9 in [r["label"] for r in first]


def test_builtin_fashion_mnist_from_path(tmp_path: Path, store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "fm"
    rng = np.random.default_rng(2)
    write_idx(folder, "train", rng.integers(0, 256, (4, 28, 28), dtype=np.uint8), np.array([9, 0, 0, 3]), gz=True)
    write_idx(folder, "t10k", rng.integers(0, 256, (1, 28, 28), dtype=np.uint8), np.array([5]), gz=True)
    assert run(store_path, "--builtin", "fashion-mnist", "--path", str(folder)) == 0
    store = Store(store_path)
    assert [c["name"] for c in store.read("classes").sort_by("label").to_pylist()] == FASHION_MNIST_CLASSES
    assert store.sql("SELECT c.name, count(*) AS n FROM samples s JOIN classes c USING (label) "
                     "WHERE s.split = 'train' GROUP BY 1 ORDER BY 1").to_pylist() == [
        {"name": "Ankle boot", "n": 1}, {"name": "Dress", "n": 1}, {"name": "T-shirt/top", "n": 2}]
    capsys.readouterr()
    assert run(store_path, str(folder), "--path", str(folder)) == 1
    assert "--path is the folder of --builtin fashion-mnist" in capsys.readouterr().err
    assert run(store_path, "--builtin", "fashion-mnist", "--path", str(tmp_path / "missing")) == 1
    assert "install the Debian package dataset-fashion-mnist" in capsys.readouterr().err


def test_generated_rows_join_target_classes(digits_store: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "store"
    shutil.copytree(digits_store, root)
    gen = make_folder(tmp_path / "gen", {"nine": 3})              # class "nine" exists: label 9
    assert_refused(root, capsys, str(gen), "--neighbor-of", "9", version=2, expect=["use it with --source auxiliary"])
    assert run(root, str(gen), "--source", "generated") == 0
    store = Store(root)
    assert store.count("samples", "source = 'generated' AND label = 9 AND split = 'train'") == 3
    nine = store.read("classes", filter="label = 9").to_pylist()[0]
    assert (nine["train_count"], nine["bucket"], nine["source"]) == (13, "few", "original")  # generated rows not counted
    assert store.count("classes") == 10


def test_limit_and_reference_of_arrays(tmp_path: Path, store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = make_folder(tmp_path / "f", {"a": 3, "b": 3})
    assert run(store_path, str(folder), "--limit", "4") == 0
    assert Store(store_path).count("samples") == 4
    assert_refused(store_path, capsys, "--builtin", "digits", "--reference", version=1, expect=["decoded from arrays"])


def test_identical_images_under_two_labels_or_splits_are_kept(tmp_path: Path, store_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "ds"
    make_folder(root / "train", {"a": 2, "b": 1})
    (root / "train" / "b" / "copy.png").write_bytes(png(0))   # train/a/0.png's image under class b
    make_folder(root / "test", {"a": 1})
    (root / "test" / "a" / "0.png").write_bytes(png(1))       # train/a/1.png's image in the test split
    assert run(store_path, str(root)) == 0
    out = capsys.readouterr().out
    assert "ingested ds: 5 added, 0 duplicates skipped, 0 rejected, 2 new classes" in out
    assert "2 added image(s) have the same content as another sample" in out
    store = Store(store_path)
    rows = {r["sample_id"]: r for r in store.read("samples").to_pylist()}
    assert set(rows) == {"ds:train/a/0.png", "ds:train/a/1.png", "ds:train/b/0.png", "ds:train/b/copy.png",
                         "ds:test/a/0.png"}
    assert rows["ds:train/b/copy.png"]["content_sha256"] == rows["ds:train/a/0.png"]["content_sha256"]
    assert (rows["ds:train/b/copy.png"]["label"], rows["ds:train/a/0.png"]["label"]) == (1, 0)
    assert rows["ds:test/a/0.png"]["content_sha256"] == rows["ds:train/a/1.png"]["content_sha256"]
    # sql lists them
    assert main(["--store", str(store_path), "sql", "--format", "json", "SELECT content_sha256, count(*) AS n "
                 "FROM samples GROUP BY 1 HAVING count(*) > 1"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    # the same folder again: nothing new (ids are the paths); a copy at a new path is one more sample
    assert run(store_path, str(root)) == 0
    assert "0 added, 5 duplicates skipped" in capsys.readouterr().out
    (root / "train" / "a" / "again.png").write_bytes(png(0))
    assert run(store_path, str(root)) == 0
    out = capsys.readouterr().out
    assert "1 added, 5 duplicates skipped" in out and "1 added image(s) have the same content" in out
