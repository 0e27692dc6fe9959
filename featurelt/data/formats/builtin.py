"""Builtin data sets (``--builtin``): scikit-learn's digits and Debian's Fashion-MNIST files, by name."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from featurelt._registry import Registry
from featurelt.data.formats.base import Input, Record
from featurelt.data.formats.idx import read_idx
from featurelt.data.images import encode_png

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
DIGITS_SEED = 0          # seed of the builtin digits' stratified train/test split
DIGITS_TEST_FRACTION = 0.2
DIGITS_CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]  # label i = digit i

BuiltinReader = Callable[..., Input]  # (path: Path | None, split: str | None) -> Input
BUILTINS: Registry[BuiltinReader] = Registry("builtin data set")


@BUILTINS.register("digits", help="scikit-learn's bundled 8x8 digits (1797 images), stratified 80/20 train/test")
def read_digits(path: Path | None = None, *, split: str | None = None) -> Input:
    """scikit-learn's bundled digits: 1797 8x8 images scaled 0..16 -> 0..255 uint8 PNG, a stratified
    80/20 train/test split with seed ``DIGITS_SEED`` (same split on every machine). Classes are named by the
    digit's English word (``DIGITS_CLASSES``: label i is digit i), so text encoders embed words, not numbers."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if path is not None:
        raise ValueError("--builtin digits takes no --path (the data ships with scikit-learn)")
    d = load_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    idx = np.arange(len(images))
    _, test_idx = train_test_split(idx, test_size=DIGITS_TEST_FRACTION, stratify=d.target, random_state=DIGITS_SEED)
    test = set(test_idx.tolist())

    def records() -> Iterator[Record]:
        for i in idx:
            sp = split or ("test" if i in test else "train")
            yield Record(location=f"sklearn digits[{i}]", row=int(i) + 1, class_name=DIGITS_CLASSES[d.target[i]], split=sp,
                         data=encode_png(images[i]), size=(8, 8))

    return Input(dataset="digits", classes=list(DIGITS_CLASSES), records=records(), total=len(images),
                 files=False)


@BUILTINS.register("fashion-mnist", help="Fashion-MNIST's IDX files (/usr/share/datasets/fashion-mnist or --path)")
def read_fashion_mnist(path: Path | None = None, *, split: str | None = None) -> Input:
    """Fashion-MNIST from Debian's ``/usr/share/datasets/fashion-mnist`` (or ``path``), with its class names."""
    folder = path if path is not None else FASHION_MNIST_DIR
    if not folder.exists():
        raise FileNotFoundError(f"fashion-mnist files not found in {folder}: install the Debian package "
                                "dataset-fashion-mnist or pass --path to a folder with the four IDX files")
    return read_idx(folder, split=split, class_names=FASHION_MNIST_CLASSES, dataset="fashion-mnist")


def read_builtin(name: str, *, path: Path | None = None, split: str | None = None) -> Input:
    """The builtin data set ``name`` (``KeyError`` lists the names)."""
    try:
        reader = BUILTINS.get(name)
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None
    return reader(path, split=split)
