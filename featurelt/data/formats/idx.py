"""Input format ``idx``: MNIST-style IDX images + labels (plain or ``.gz``), streamed in chunks."""
from __future__ import annotations

import gzip
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from featurelt.data.formats.base import SPLIT_NAMES, Input, Record, register_format, split_from_name
from featurelt.data.images import encode_png


def _open_maybe_gz(path: Path) -> BinaryIO:
    """A binary reader of ``path``, decompressing ``.gz``."""
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _idx_header(fh: BinaryIO, path: Path, ndim: int) -> list[int]:
    """Dimensions from an IDX header (unsigned-byte data of ``ndim`` dimensions), or ValueError naming the file."""
    head = fh.read(4)
    if len(head) < 4 or head[0] != 0 or head[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic {head!r})")
    if head[2] != 0x08:
        raise ValueError(f"{path}: IDX data type 0x{head[2]:02x} is not supported (only unsigned byte, 0x08)")
    if head[3] != ndim:
        raise ValueError(f"{path}: expected a {ndim}-d IDX file, got {head[3]} dimensions")
    raw = fh.read(4 * ndim)
    if len(raw) < 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header")
    return list(struct.unpack(">" + "I" * ndim, raw))


def idx_pairs(path: Path) -> list[tuple[Path, Path, str]]:
    """(images file, labels file, split) pairs in a folder, or for one images file."""
    if path.is_file():
        images = [path]
    elif path.is_dir():
        images = sorted(p for p in path.iterdir() if "idx3-ubyte" in p.name)
    else:
        raise FileNotFoundError(f"IDX path not found: {path}")
    pairs = []
    for img in images:
        lab = img.with_name(img.name.replace("images", "labels").replace("idx3", "idx1"))
        if not lab.is_file():
            raise FileNotFoundError(f"labels file for {img} not found (expected {lab})")
        pairs.append((img, lab, split_from_name(img.name, "train")))
    order = {name: i for i, name in enumerate(SPLIT_NAMES)}
    pairs.sort(key=lambda t: (order.get(t[2], len(order)), t[0].name))  # train first (matters for --limit)
    if not pairs:
        raise ValueError(f"{path}: empty input: no *-images-idx3-ubyte[.gz] files")
    return pairs


def _is_idx(path: Path) -> bool:
    if path.is_dir():
        return any("idx3-ubyte" in p.name for p in path.iterdir())
    return "idx3-ubyte" in path.name.lower()


@register_format("idx", "MNIST-style IDX files (*-images-idx3-ubyte[.gz] + *-labels-idx1-ubyte[.gz]), a file or a folder",
                 detect=_is_idx, priority=20)
def read_idx(path: Path, *, root: Path | None = None, split: str | None = None,
             class_names: Sequence[str] | None = None, dataset: str | None = None, chunk: int = 1024) -> Input:
    """MNIST-style IDX images + labels (plain or ``.gz``), streamed ``chunk`` images at a time."""
    pairs = idx_pairs(path)
    total = 0
    labels_seen: set[int] = set()
    for img, lab, _ in pairs:
        with _open_maybe_gz(img) as fh:
            n_img = _idx_header(fh, img, 3)[0]
        with _open_maybe_gz(lab) as fh:
            (n_lab,) = _idx_header(fh, lab, 1)
            labels_seen.update(np.frombuffer(fh.read(), np.uint8).tolist())
        if n_img != n_lab:
            raise ValueError(f"{img} has {n_img} images but {lab} has {n_lab} labels")
        total += n_img
    if total == 0:
        raise ValueError(f"{path}: empty input: the IDX files hold 0 images")
    if class_names is not None:
        bad = sorted(i for i in labels_seen if i >= len(class_names))
        if bad:
            raise ValueError(f"{path}: labels {bad} have no class name (there are {len(class_names)} names)")
        classes = list(class_names)
    else:
        classes = [str(i) for i in sorted(labels_seen)]

    def records() -> Iterator[Record]:
        for img, lab, sp in pairs:
            with _open_maybe_gz(img) as fi, _open_maybe_gz(lab) as fl:
                n, h, w = _idx_header(fi, img, 3)
                _idx_header(fl, lab, 1)
                done = 0
                while done < n:
                    k = min(chunk, n - done)
                    raw = fi.read(k * h * w)
                    labs = fl.read(k)
                    if len(raw) < k * h * w or len(labs) < k:
                        yield Record(location=f"{img}[{done}]", row=done + 1, class_name="", split=sp,
                                     error=f"truncated IDX file: header says {n} images, data ends near image {done + len(raw) // (h * w)}")
                        return
                    arr = np.frombuffer(raw, np.uint8).reshape(k, h, w)
                    for j in range(k):
                        name = classes[labs[j]] if class_names is not None else str(labs[j])
                        yield Record(location=f"{img}[{done + j}]", row=done + j + 1, class_name=name,
                                     split=split or sp, data=encode_png(arr[j]), size=(w, h))
                    done += k

    name = dataset or (path.name if path.is_dir() else path.name.split("-")[0])
    class_ids = {} if class_names is not None else {str(i): i for i in labels_seen}
    return Input(dataset=name, classes=classes, records=records(), total=total, files=False, class_ids=class_ids)

