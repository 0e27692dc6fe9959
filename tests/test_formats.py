"""Parquet (Hugging Face datasets) and WebDataset ingest, ``--class-names``, and the text refusal for unnamed classes.

Every fixture is written by the format's own library: Parquet by pyarrow with the ``huggingface`` schema
metadata exactly as ``datasets`` writes it (and by ``datasets`` itself when installed), tar shards by
``tarfile`` (and ``webdataset.ShardWriter`` when installed). Everything runs through the CLI.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from featurelt.cli import main
from featurelt.data.classnames import read_class_names
from featurelt.data.features import load_text_embeddings
from featurelt.data.formats import detect_format
from featurelt.data.formats.shards import shard_split
from featurelt.store import Store

NAMES = ["cat", "dog", "fish"]


def png(value: int, size: tuple[int, int] = (6, 5)) -> bytes:
    """A PNG of one grey value (distinct values give distinct content hashes)."""
    buf = io.BytesIO()
    Image.new("L", size, value).save(buf, format="PNG")
    return buf.getvalue()


def ingest(store: Path, *args: str) -> int:
    return main(["--store", str(store), "ingest", "--no-progress", *args])


def hf_metadata(names: list[str] | None) -> dict[bytes, bytes]:
    """The ``huggingface`` schema metadata ``datasets`` writes for features {image: Image, label: ClassLabel}."""
    label = {"names": names, "_type": "ClassLabel"} if names is not None else {"dtype": "int64", "_type": "Value"}
    return {b"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"}, "label": label}}}).encode()}


def write_parquet(path: Path, images: list[bytes | None], labels: list, *, names: list[str] | None = NAMES,
                  label_type: pa.DataType = pa.int64()) -> Path:
    """A datasets-style shard: image struct {bytes, path}, label, the huggingface metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = pa.array([{"bytes": b, "path": None} for b in images],
                     pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({"image": image, "label": pa.array(labels, label_type)})
    pq.write_table(table.replace_schema_metadata(hf_metadata(names)), path)
    return path


def samples(store: Path) -> list[dict]:
    return Store(store).read("samples", columns=["split", "label", "image", "dataset"]).to_pylist()


def classes(store: Path) -> list[tuple[int, str]]:
    return [(c["label"], c["name"]) for c in Store(store).read("classes").sort_by("label").to_pylist()]


# ------------------------------------------------------------------------------------------------- Parquet
def test_parquet_shards_written_by_pyarrow(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import featurelt.data.formats.parquet as parquet_format

    monkeypatch.setattr(parquet_format, "READ_BATCH", 2)  # several Arrow batches per shard
    data = tmp_path / "cifarish" / "data"
    write_parquet(data / "train-00000-of-00002.parquet", [png(1), png(2), png(3)], [0, 1, 1])
    write_parquet(data / "train-00001-of-00002.parquet", [png(4), b"not an image", png(5), png(6), png(7)],
                  [2, 0, None, -1, 7])
    write_parquet(data / "validation-00000-of-00001.parquet", [png(8), png(9)], [2, 0])
    store = tmp_path / "store"
    root = tmp_path / "cifarish"
    assert detect_format(root) == "parquet"

    # a bad row fails the whole ingest, nothing committed, naming the rows
    assert ingest(store, str(root)) == 1
    err = capsys.readouterr().err
    assert err.startswith("featurelt ingest: error: 4 bad row(s)"), err
    assert "train-00001-of-00002.parquet[2]: missing label" in err and "unknown label 7" in err
    assert not Store(store).has_table("samples")

    assert ingest(store, str(root), "--skip-bad", "--batch-size", "2") == 0
    assert "ingested cifarish: 6 added, 0 duplicates skipped, 4 rejected, 3 new classes" in capsys.readouterr().out
    assert classes(store) == [(0, "cat"), (1, "dog"), (2, "fish")]  # the ClassLabel's names, in label order
    rows = samples(store)
    got = sorted((r["split"], r["label"], r["image"]) for r in rows)
    assert got == sorted([("train", 0, png(1)), ("train", 1, png(2)), ("train", 1, png(3)), ("train", 2, png(4)),
                          ("val", 2, png(8)), ("val", 0, png(9))])
    assert {r["dataset"] for r in rows} == {"cifarish"}
    rejects = Store(store).read("rejects", columns=["location", "reason"]).sort_by("location").to_pylist()
    shard = str(data / "train-00001-of-00002.parquet")
    assert [r["location"] for r in rejects] == [f"{shard}[{i}]" for i in (1, 2, 3, 4)]
    reasons = [r["reason"] for r in rejects]
    assert "missing label" == reasons[1] and "-1" in reasons[2] and "has 3 names" in reasons[3]
    assert reasons[0]  # the decoder's reason for the undecodable bytes

    # re-ingest: nothing added (only the rejects are recorded again)
    n = len(rows)
    assert ingest(store, str(data / "train-00000-of-00002.parquet"), "--dataset", "cifarish") == 0
    assert "0 added, 3 duplicates skipped" in capsys.readouterr().out
    assert len(samples(store)) == n


def test_parquet_written_by_datasets(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["ant", "bee"])})
    out = tmp_path / "bugs" / "data"
    out.mkdir(parents=True)
    for split, values in (("train", [10, 20, 30]), ("test", [40, 50])):
        ds = datasets.Dataset.from_dict({"image": [{"bytes": png(v), "path": f"{v}.png"} for v in values],
                                         "label": [i % 2 for i in range(len(values))]}, features=features)
        ds.to_parquet(str(out / f"{split}-00000-of-00001.parquet"))
    store = tmp_path / "store"
    assert ingest(store, str(tmp_path / "bugs"), "--format", "parquet") == 0
    assert classes(store) == [(0, "ant"), (1, "bee")]
    got = sorted((r["split"], r["label"], r["image"]) for r in samples(store))
    assert got == sorted([("train", 0, png(10)), ("train", 1, png(20)), ("train", 0, png(30)),
                          ("test", 0, png(40)), ("test", 1, png(50))])


def test_parquet_integer_and_string_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ints = write_parquet(tmp_path / "ints" / "train-00000-of-00001.parquet", [png(1), png(2), png(3)], [4, 0, 4],
                         names=None)
    names = tmp_path / "names.txt"
    names.write_text("0,zero\n4,four\n")
    store = tmp_path / "store"
    assert ingest(store, str(ints), "--format", "parquet", "--class-names", str(names)) == 0
    assert classes(store) == [(0, "zero"), (4, "four")]  # integer labels are store labels
    strs = write_parquet(tmp_path / "strs" / "test.parquet", [png(5), png(6)], ["owl", "bat"], names=None,
                         label_type=pa.string())
    assert ingest(store, str(strs)) == 0
    assert classes(store) == [(0, "zero"), (4, "four"), (5, "bat"), (6, "owl")]
    assert sorted(r["split"] for r in samples(store)) == ["test", "test", "train", "train", "train"]
    # --class-names is for integer labels only
    assert ingest(store, str(strs), "--class-names", str(names)) == 1
    assert "names its classes itself" in capsys.readouterr().err


def test_parquet_image_by_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A datasets Image of a local file (bytes null, path set) is read from the path, under --root if given."""
    folder = tmp_path / "local"
    folder.mkdir()
    (folder / "a.png").write_bytes(png(11))
    image = pa.array([{"bytes": None, "path": "a.png"}, {"bytes": None, "path": "gone.png"},
                      {"bytes": None, "path": None}], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({"image": image, "label": pa.array([0, 1, 0], pa.int64())})
    pq.write_table(table.replace_schema_metadata(hf_metadata(NAMES)), folder / "train-00000-of-00001.parquet")
    store = tmp_path / "store"
    assert ingest(store, str(folder), "--skip-bad") == 0
    assert "1 added, 0 duplicates skipped, 2 rejected" in capsys.readouterr().out
    assert [r["image"] for r in samples(store)] == [png(11)]
    reasons = sorted(r["reason"] for r in Store(store).read("rejects").to_pylist())
    assert reasons[0].startswith("file not found:") and reasons[0].endswith("gone.png")
    assert reasons[1] == "no image: column 'image' has neither bytes nor a path"


def test_shard_split_names() -> None:
    assert shard_split(Path("data/train-00000-of-00002.parquet")) == "train"
    assert shard_split(Path("data/validation-00000-of-00001.parquet")) == "val"
    assert shard_split(Path("unsupervised-00000-of-00001.parquet")) == "unsupervised"
    assert shard_split(Path("plain_text/test/0000.parquet")) == "test"
    assert shard_split(Path("imagenet-val-000012.tar")) == "val"
    assert shard_split(Path("shards/000001.tar")) is None  # no split word: the input states no split


def test_shards_without_splits_get_the_test_hold_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No split in any shard name and no --split: ingest holds out round(0.2 n) images of each class as test."""
    shards = tmp_path / "wds"
    members = [(f"k{i:03d}.png", png(i)) for i in range(15)]
    labels = [(f"k{i:03d}.cls", b"0" if i < 10 else b"1") for i in range(15)]
    write_shard(shards / "shard-000000.tar", [m for pair in zip(members, labels) for m in pair])
    names = tmp_path / "names.txt"
    names.write_text("zero\none\n")
    store = tmp_path / "store"
    assert ingest(store, str(shards), "--class-names", str(names)) == 0
    assert "3 images held out as split 'test'" in capsys.readouterr().out
    s = Store(store)
    assert s.sql("SELECT label, split, count(*) n FROM samples GROUP BY 1, 2 ORDER BY 1, 2").to_pylist() == [
        {"label": 0, "split": "test", "n": 2}, {"label": 0, "split": "train", "n": 8},
        {"label": 1, "split": "test", "n": 1}, {"label": 1, "split": "train", "n": 4}]
    pets = write_parquet(tmp_path / "pets" / "images.parquet", [png(100 + i) for i in range(10)], [0] * 5 + [2] * 5)
    assert ingest(tmp_path / "store2", str(pets), "--test-fraction", "0.4") == 0
    rows = Store(tmp_path / "store2").sql("SELECT label, split, count(*) n FROM samples GROUP BY 1, 2 ORDER BY 1, 2")
    assert rows.to_pylist() == [{"label": 0, "split": "test", "n": 2}, {"label": 0, "split": "train", "n": 3},
                                {"label": 2, "split": "test", "n": 2}, {"label": 2, "split": "train", "n": 3}]


# ------------------------------------------------------------------------------------------------- WebDataset
def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            add(tf, name, data)
    return path


def test_webdataset_shards_written_by_tarfile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shards = tmp_path / "wds"
    write_shard(shards / "train-000000.tar", [
        ("s0.png", png(1)), ("s0.cls", b"0"),
        ("s1.png", png(2)), ("s1.cls", b"2\n"),
        ("d/s2.jpg", png(3)), ("d/s2.json", b'{"label": 2}'),  # a json label; the key keeps its folder
        ("s3.png", b"garbage"), ("s3.cls", b"1"),               # undecodable
        ("s4.png", png(4))])                                    # no label
    write_shard(shards / "train-000001.tar", [("t0.png", png(5)), ("t0.cls", b"1"),
                                              ("t1.png", png(6)), ("t1.webp", png(7)), ("t1.cls", b"1")])  # 2 images
    write_shard(shards / "test-000000.tar", [("u0.png", png(8)), ("u0.cls", b"0"), ("u0.txt", b"a caption")])
    names = tmp_path / "names.txt"
    names.write_text("# label name\n0 kitten\n1 puppy\n2 goldfish\n")
    store = tmp_path / "store"
    assert detect_format(shards) == "webdataset"

    assert ingest(store, str(shards), "--class-names", str(names)) == 1
    err = capsys.readouterr().err
    assert "3 bad row(s)" in err and "train-000000.tar:s4: missing label: no key.cls and no key.json" in err
    assert ingest(store, str(shards), "--class-names", str(names), "--skip-bad") == 0
    assert "5 added, 0 duplicates skipped, 3 rejected" in capsys.readouterr().out
    assert classes(store) == [(0, "kitten"), (1, "puppy"), (2, "goldfish")]
    got = sorted((r["split"], r["label"], r["image"]) for r in samples(store))
    assert got == sorted([("train", 0, png(1)), ("train", 2, png(2)), ("train", 2, png(3)), ("train", 1, png(5)),
                          ("test", 0, png(8))])
    desc = Store(store).read("samples", columns=["description"], filter="split = 'test'").column(0).to_pylist()
    assert desc == ["a caption"]
    rejects = {r["location"]: r["reason"] for r in Store(store).read("rejects").to_pylist()}
    assert set(rejects) == {f"{shards / 'train-000000.tar'}:s3", f"{shards / 'train-000000.tar'}:s4",
                            f"{shards / 'train-000001.tar'}:t1"}
    assert "several images ['png', 'webp']" in rejects[f"{shards / 'train-000001.tar'}:t1"]

    # re-ingest of the good shard adds nothing and makes no store version
    version = Store(store).version
    assert ingest(store, str(shards / "test-000000.tar"), "--class-names", str(names), "--dataset", "wds") == 0
    assert "0 added, 1 duplicates skipped" in capsys.readouterr().out
    assert Store(store).version == version


def test_webdataset_damaged_shard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shard = write_shard(tmp_path / "wds" / "train-000000.tar",
                        [("a.png", png(1)), ("a.cls", b"0"), ("b.png", png(2) * 40), ("b.cls", b"1")])
    with tarfile.open(shard) as tf:
        cut = tf.getmember("b.png").offset_data + 100
        header = tf.getmember("b.cls").offset + 100
    raw = shard.read_bytes()
    for end in (cut, header):  # inside b.png's bytes; inside b.cls's header
        shard.write_bytes(raw[:end])
        store = tmp_path / f"store-{end}"
        assert ingest(store, str(shard), "--skip-bad") == 0
        assert "1 added, 0 duplicates skipped, 1 rejected" in capsys.readouterr().out
        reason = Store(store).read("rejects").to_pylist()[0]["reason"]
        assert reason.startswith("damaged shard after sample b"), reason
    shard.write_bytes(b"not a tar at all" * 100)
    assert ingest(tmp_path / "store-x", str(shard)) == 1
    assert "train-000000.tar: not a readable tar shard" in capsys.readouterr().err


def test_webdataset_written_by_shardwriter(tmp_path: Path) -> None:
    wds = pytest.importorskip("webdataset")
    out = tmp_path / "wds"
    out.mkdir()
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=2, verbose=0) as sink:
        for i, (value, name) in enumerate([(10, "owl"), (20, "bat"), (30, "owl")]):
            sink.write({"__key__": f"k{i:04d}", "png": png(value), "json": {"class": name}, "txt": f"a {name}"})
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar", "shard-000001.tar"]
    store = tmp_path / "store"
    assert ingest(store, str(out), "--format", "webdataset", "--split", "val") == 0
    assert classes(store) == [(0, "bat"), (1, "owl")]
    rows = Store(store).read("samples", columns=["split", "label", "image", "description"]).to_pylist()
    assert sorted((r["split"], r["label"], r["image"], r["description"]) for r in rows) == sorted(
        [("val", 1, png(10), "a owl"), ("val", 0, png(20), "a bat"), ("val", 1, png(30), "a owl")])


# ------------------------------------------------------------------------------------------------- class names
@pytest.mark.parametrize("text", ["tench\ngoldfish\n\nshark\n", "0 tench\n1 goldfish\n2 shark\n",
                                  "2,shark\n0,tench\n1,goldfish\n", "0\ttench\n1\tgoldfish\n2\tshark\n",
                                  "/t/tench 0\n/g/goldfish 1\n/s/shark 2\n"])
def test_class_names_file_layouts(tmp_path: Path, text: str) -> None:
    path = tmp_path / "names.txt"
    path.write_text("# ImageNet\n" + text)
    names = read_class_names(path)
    assert sorted(names) == [0, 1, 2]
    assert [names[i].rsplit("/", 1)[-1] for i in range(3)] == ["tench", "goldfish", "shark"]


def test_class_names_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "names.txt"
    path.write_text("0 a\n0 b\n")
    with pytest.raises(ValueError, match=r"names.txt:line 2: label 0 is named twice \('a' and 'b'\)"):
        read_class_names(path)
    path.write_text("a\nb\na\n")
    with pytest.raises(ValueError, match="name 'a' is given to labels 0 and 2"):
        read_class_names(path)
    path.write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="no class names"):
        read_class_names(path)
    with pytest.raises(FileNotFoundError, match="--class-names file not found"):
        read_class_names(tmp_path / "missing.txt")


def text_rows(set_name: str, names: list[str], dim: int = 4) -> pa.Table:
    k = len(names)
    vecs = np.eye(k, dim, dtype=np.float32)
    return pa.table({"set_name": [set_name] * k, "encoder": ["test"] * k, "label": pa.array(range(k), pa.int32()),
                     "class_name": names, "templates": ["{}"] * k, "dim": pa.array([dim] * k, pa.int32()),
                     "vector": pa.array(vecs.tolist(), pa.list_(pa.float32())), "fingerprint": ["t"] * k})


def test_split_list_class_names_and_text_refusal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "images"
    images.mkdir()
    lines = []
    for i in range(6):
        (images / f"{i}.png").write_bytes(png(i))
        lines.append(f"{i}.png {i % 2}")
    split_list = tmp_path / "ImageNet_LT_train.txt"
    split_list.write_text("\n".join(lines) + "\n")
    store = tmp_path / "store"
    assert ingest(store, str(split_list), "--root", str(images)) == 0
    assert classes(store) == [(0, "0"), (1, "1")]  # numbers only: today's split lists

    # text made from the numbers: text heads refuse, saying how to name the classes
    s = Store(store)
    with s.transaction("test: text of numbers") as tx:
        tx.append("text_embeddings", text_rows("nums", ["0", "1"]))
    with pytest.raises(ValueError, match="only label numbers") as info:
        load_text_embeddings(s, "nums", num_classes=2)
    assert "--class-names FILE" in str(info.value) and "extract text:" in str(info.value)
    assert main(["--store", str(store), "extract", "pixels", "--no-progress", "--num-workers", "0"]) == 0
    capsys.readouterr()
    assert main(["--store", str(store), "train-head", "--features", "pixels", "--text-set", "nums", "--head",
                 "cosine", "--head-opt", "init=text", "--epochs", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("featurelt train-head: error:") and "--class-names FILE" in err

    # naming them: the same input with --class-names adds no rows, renames the classes, drops the stale text
    names = tmp_path / "imagenet_classes.txt"
    names.write_text("tench\ngoldfish\n")
    assert ingest(store, str(split_list), "--root", str(images), "--class-names", str(names)) == 0
    assert "0 added, 6 duplicates skipped, 0 rejected, 0 new classes, 2 classes named" in capsys.readouterr().out
    s = Store(store)
    assert classes(store) == [(0, "tench"), (1, "goldfish")]
    assert s.count("samples") == 6 and s.count("text_embeddings") == 0
    with s.transaction("test: text of names") as tx:
        tx.append("text_embeddings", text_rows("names", ["tench", "goldfish"]))
    np.testing.assert_array_equal(load_text_embeddings(s, "names", num_classes=2), np.eye(2, 4, dtype=np.float32))
    # a names file that disagrees with the store's names is refused
    names.write_text("tench\ncarp\n")
    assert ingest(store, str(split_list), "--root", str(images), "--class-names", str(names)) == 1
    assert "the input names label 1 'carp', but the store's class 1 is 'goldfish'" in capsys.readouterr().err
    names.write_text("tench\n")
    assert ingest(store, str(split_list), "--root", str(images), "--class-names", str(names)) == 1
    assert "labels [1] of ImageNet have no name" in capsys.readouterr().err


def test_neighbor_search_refuses_unnamed_classes(tmp_path: Path) -> None:
    from featurelt.data.neighbors import neighbor_search

    store = tmp_path / "store"
    ints = write_parquet(tmp_path / "ints" / "train.parquet", [png(1), png(2)], [0, 1], names=None)
    assert ingest(store, str(ints)) == 0
    with pytest.raises(ValueError, match="named only by label numbers .*--class-names FILE"):
        neighbor_search(Store(store), ["owl", "bat"], classes=["0", "1"])
