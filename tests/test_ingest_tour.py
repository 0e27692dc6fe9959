"""README's tour on a plain folder of class subfolders (issue 19 point 7): ingest holds out a stratified,
seeded test fraction, so ``extract`` and ``train-head`` run as printed; identical images under two labels
(issue 19 point 8) go through extract and training as two samples."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featurelt.cli import main
from featurelt.data.ingest import HoldOut
from featurelt.store import Store

SIZES = {"ant": 10, "bee": 7, "cat": 3}


def plain_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for name, n in SIZES.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    (root / "cat" / "same-as-ant0.png").write_bytes((root / "ant" / "0.png").read_bytes())  # one image, two labels
    return root


def test_holdout_is_stratified_exact_and_seeded() -> None:
    counts = {"a": 10, "b": 7, "c": 3, "d": 1}
    # round(0.2 n) halves up, at least one train image: 2, 1 (1.4), 1 (0.6), 0
    assert [HoldOut.test_count(n, 0.2) for n in counts.values()] == [2, 1, 1, 0]
    assert HoldOut.test_count(2, 0.9) == 1

    def choice(seed: int) -> dict[str, list[int]]:
        h = HoldOut(counts, 0.2, seed)
        picked = {c: [i for i in range(n) if h.is_test(c)] for c, n in counts.items()}
        assert h.held_out == 4 and not h.is_test("a") and not h.is_test("zzz")
        return picked

    first = choice(0)
    assert {c: len(v) for c, v in first.items()} == {"a": 2, "b": 1, "c": 1, "d": 0}
    assert choice(0) == first
    assert any(choice(s) != first for s in (1, 2, 3))
    with pytest.raises(ValueError, match="test-fraction"):
        HoldOut(counts, 1.0, 0)


def test_tour_on_a_plain_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = plain_folder(tmp_path / "imgs")
    store_path = tmp_path / "store"
    assert main(["--store", str(store_path), "ingest", "--no-progress", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "4 images held out as split 'test'" in out and "1 added image(s) have the same content" in out, out
    store = Store(store_path)
    label = {c["name"]: c["label"] for c in store.read("classes").to_pylist()}
    test = store.read("samples", columns=["label"], filter="split = 'test'").column("label").to_pylist()
    assert sorted(test) == sorted([label["ant"]] * 2 + [label["bee"]] * 1 + [label["cat"]] * 1)
    assert store.count("samples") == 21
    # the same folder into another store with the same seed: the same test images
    again = tmp_path / "again"
    assert main(["--store", str(again), "ingest", "--no-progress", str(folder)]) == 0
    capsys.readouterr()
    ids = lambda p: sorted(Store(p).read("samples", columns=["sample_id"], filter="split = 'test'")  # noqa: E731
                           .column("sample_id").to_pylist())
    assert ids(again) == ids(store_path)
    # re-ingest: nothing added, nothing reported held out
    assert main(["--store", str(again), "ingest", "--no-progress", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "0 added, 21 duplicates skipped" in out and "held out" not in out, out
    # README's next steps run as printed
    assert main(["--store", str(store_path), "extract", "pixels"]) == 0
    assert Store(store_path).count("emb_pixels") == 21
    assert main(["--store", str(store_path), "train-head", "--features", "pixels", "--epochs", "2"]) == 0
    runs = Store(store_path).read("runs").to_pylist()
    assert len(runs) == 1
    n_pred = Store(store_path).count("predictions")
    assert n_pred == 4  # every held-out test image predicted


def test_test_fraction_zero_and_explicit_split_keep_all(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = plain_folder(tmp_path / "imgs")
    for args in (["--test-fraction", "0"], ["--split", "train"]):
        store_path = tmp_path / f"store{len(args[1])}"
        assert main(["--store", str(store_path), "ingest", "--no-progress", *args, str(folder)]) == 0
        assert "held out" not in capsys.readouterr().out
        assert Store(store_path).count("samples", "split = 'test'") == 0
    # a folder with split folders states its splits, even if only train/ is there
    only_train = tmp_path / "only"
    (only_train / "train" / "a").mkdir(parents=True)
    for i in range(5):
        Image.new("L", (8, 8), 100 + i).save(only_train / "train" / "a" / f"{i}.png")
    assert main(["--store", str(tmp_path / "only-store"), "ingest", "--no-progress", str(only_train)]) == 0
    assert Store(tmp_path / "only-store").count("samples", "split = 'test'") == 0
    # auxiliary images are never held out
    store_path = tmp_path / "store1"  # the --test-fraction 0 store
    aux = tmp_path / "aux"
    (aux / "ant-like").mkdir(parents=True)
    for i in range(5):
        Image.new("L", (8, 8), 200 + i).save(aux / "ant-like" / f"{i}.png")
    assert main(["--store", str(store_path), "ingest", "--no-progress", "--source", "auxiliary", "--neighbor-of", "ant",
                 str(aux)]) == 0
    assert Store(store_path).count("samples", "source = 'auxiliary' AND split = 'test'") == 0
