"""Offline neighbor-class search (featurelt.data.neighbors, METHODS.md section 3) with the bundled
all-MiniLM-L6-v2: against numpy over the same embeddings, the label-set exclusion, and the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from featurelt.cli import main
from featurelt.data.classes import classes_table
from featurelt.data.neighbors import name_key, neighbor_search, read_vocabulary
from featurelt.store import Store

# Fashion-MNIST's classes with made-up train counts: many > 100, medium 20..100, few < 20
CLASSES = {"T-shirt/top": 500, "Trouser": 400, "Pullover": 300, "Dress": 60, "Coat": 50, "Sandal": 30,
           "Shirt": 200, "Sneaker": 10, "Bag": 5, "Ankle boot": 3}
VOCAB = ["running shoe", "flip-flop", "backpack", "jeans", "trouser", "banana", "sports car", "cardigan",
         "handbag", "ankle_boot", "slipper", "raincoat", "hiking boot", "Handbag", "sweater"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    root = tmp_path_factory.mktemp("neighbors") / "store"
    registry = [{"label": i, "name": n, "source": "original", "neighbor_of": None} for i, n in enumerate(CLASSES)]
    st = Store(root)
    with st.transaction("test: classes") as tx:
        tx.append("classes", classes_table(registry, dict(enumerate(CLASSES.values())), many=100, few=20))
    return st


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vocab") / "names.txt"
    path.write_text("# candidate names\n\n" + "\n".join(VOCAB) + "\n")
    return path


def test_vocabulary_file_and_name_keys(vocab_file, tmp_path):
    names = read_vocabulary(vocab_file)
    assert "Handbag" not in names and names.count("handbag") == 1  # the same name twice: first spelling kept
    assert len(names) == len(VOCAB) - 1
    assert name_key("Ankle_boot") == name_key(" ankle  boot") == name_key("ankle-boot") == "ankle boot"
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="empty.txt: no names"):
        read_vocabulary(empty)


def test_neighbors_match_numpy_and_skip_the_label_set(store, vocab_file):
    from featurelt.encoders import build_text_encoder

    rows = neighbor_search(store, vocab_file, k=3)
    medium_few = [n for n, c in CLASSES.items() if c <= 100]
    assert sorted({r["class"] for r in rows}) == sorted(medium_few)
    # names of the label set never come back ("trouser", and "ankle_boot" spelled otherwise)
    assert not {name_key(r["neighbor"]) for r in rows} & {name_key(n) for n in CLASSES}
    # the same ranking as numpy over the same embeddings
    enc = build_text_encoder("text:minilm")
    cands = [n for n in read_vocabulary(vocab_file) if name_key(n) not in {name_key(c) for c in CLASSES}]
    sims = enc.encode_classes(medium_few).numpy() @ enc.encode_classes(cands).numpy().T
    for i, cls in enumerate(medium_few):
        got = [r for r in rows if r["class"] == cls]
        order = np.argsort(-sims[i], kind="stable")[:3]
        assert [r["neighbor"] for r in got] == [cands[j] for j in order]
        np.testing.assert_allclose([r["cosine"] for r in got], sims[i, order], atol=1e-4)
        assert [r["rank"] for r in got] == [1, 2, 3]
    # a real text model: the nearest names make sense
    top = {r["class"]: r["neighbor"] for r in rows if r["rank"] == 1}
    assert top["Sneaker"] == "running shoe" and top["Bag"] == "handbag" and top["Ankle boot"] == "hiking boot"
    assert top["Coat"] == "raincoat"


def test_neighbors_cli(store, vocab_file, capsys):
    root = str(store.root)
    assert main(["--store", root, "neighbors", "--vocab", str(vocab_file), "--k", "2", "--classes", "bag,Coat",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["class"], r["rank"]) for r in rows] == [("Bag", 1), ("Bag", 2), ("Coat", 1), ("Coat", 2)]
    assert {r["neighbor"] for r in rows if r["class"] == "Bag"} == {"handbag", "backpack"}
    assert main(["--store", root, "neighbors", "--vocab", str(vocab_file), "--buckets", "many"]) == 0
    assert "T-shirt/top" in capsys.readouterr().out
    assert main(["--store", root, "neighbors", "--vocab", str(vocab_file), "--buckets", "tail"]) == 1
    assert "unknown bucket(s) ['tail']" in capsys.readouterr().err
    assert main(["--store", root, "neighbors", "--vocab", str(vocab_file), "--classes", "Hat"]) == 1
    assert "no target class named ['Hat']" in capsys.readouterr().err
