"""Input format ``cifar``: CIFAR-10 / CIFAR-100 python pickles, images encoded as PNG."""
from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from featurelt.data.formats.base import Input, Record, register_format
from featurelt.data.images import encode_png


def _numpy_global(module: str, name: str) -> Any:
    """``numpy.<module>.<name>`` from numpy 2's ``numpy._core`` (or numpy 1's ``numpy.core``) without a deprecation warning."""
    import importlib

    for prefix in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{prefix}.{module}"), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy has no {module}.{name}")


# What a CIFAR pickle may reference: numpy array / dtype / scalar reconstruction (pickles written by numpy 1
# name numpy.core.*, by numpy 2 numpy._core.*) and Python 3's protocol-2 form of bytes (_codecs.encode).
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: __import__("codecs").encode,
    **{(f"{prefix}.multiarray", name): (lambda name=name: _numpy_global("multiarray", name))
       for prefix in ("numpy.core", "numpy._core") for name in ("_reconstruct", "scalar")},
    **{(f"{prefix}.numeric", "_frombuffer"): (lambda: _numpy_global("numeric", "_frombuffer"))
       for prefix in ("numpy.core", "numpy._core")},
}


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only what CIFAR files hold: dicts, lists, strings, numbers and numpy arrays.

    Any other global (a function or class a crafted pickle would call, e.g. ``os.system``) is refused
    before it is looked up, so loading a file never runs code from it.
    """

    def find_class(self, module: str, name: str) -> Any:
        make = _ALLOWED_GLOBALS.get((module, name))
        if make is None:
            raise pickle.UnpicklingError(f"refusing to load global '{module}.{name}': a CIFAR pickle holds only "
                                         "numpy arrays, lists, strings and numbers")
        return make()


def _unpickle(path: Path) -> dict[str, Any]:
    """The dict in a CIFAR pickle, loaded with :class:`_CifarUnpickler`; ValueError naming ``path`` otherwise."""
    with open(path, "rb") as fh:
        try:
            obj = _CifarUnpickler(fh, encoding="latin1").load()
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
            raise ValueError(f"{path}: not a CIFAR python pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict in the pickle, got {type(obj).__name__}")
    return obj


@register_format("cifar", "CIFAR-10 / CIFAR-100 python pickle folder (batches.meta or meta), with class names",
                 detect=lambda path: path.is_dir() and ((path / "batches.meta").is_file() or (path / "meta").is_file()),
                 priority=10)
def read_cifar(path: Path, *, root: Path | None = None, split: str | None = None) -> Input:
    """CIFAR-10 (``data_batch_1..5``, ``test_batch``, ``batches.meta``) or CIFAR-100 (``train``, ``test``,
    ``meta`` with fine labels) python pickles in folder ``path``."""
    if not path.is_dir():
        raise FileNotFoundError(f"CIFAR folder not found: {path}")
    if (path / "batches.meta").is_file():
        meta = _unpickle(path / "batches.meta")
        names, key = list(meta.get("label_names") or []), "labels"
        files = [(f, "train") for f in sorted(path.glob("data_batch_*"))] + \
                [(f, "test") for f in [path / "test_batch"] if f.is_file()]
        dataset = "cifar10"
    elif (path / "meta").is_file():
        meta = _unpickle(path / "meta")
        names, key = list(meta.get("fine_label_names") or []), "fine_labels"
        files = [(path / n, n) for n in ("train", "test") if (path / n).is_file()]
        dataset = "cifar100"
    else:
        raise ValueError(f"{path}: not a CIFAR folder (no batches.meta or meta file)")
    if not names:
        raise ValueError(f"{path}: the meta file has no class names")
    if not files:
        raise ValueError(f"{path}: empty input: no data_batch_* / test_batch / train / test files")

    def records() -> Iterator[Record]:
        for f, sp in files:
            batch = _unpickle(f)
            data, labels = batch.get("data"), batch.get(key)
            if data is None or labels is None:
                yield Record(location=str(f), row=None, class_name="", split=sp,
                             error=f"pickle has no 'data' and '{key}' entries (keys: {sorted(batch)[:8]})")
                continue
            data = np.asarray(data)
            if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8 or len(labels) != len(data):
                yield Record(location=str(f), row=None, class_name="", split=sp,
                             error=f"expected uint8 data [N, 3072] and N labels, got {data.dtype} {data.shape}, "
                             f"{len(labels)} labels")
                continue
            images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            for i, (img, lab) in enumerate(zip(images, labels)):
                loc = f"{f}[{i}]"
                if not 0 <= int(lab) < len(names):
                    yield Record(location=loc, row=i + 1, class_name="", split=sp, error=f"unknown label {lab}")
                    continue
                yield Record(location=loc, row=i + 1, class_name=names[int(lab)], split=split or sp,
                             data=encode_png(np.ascontiguousarray(img)), size=(32, 32))
            del batch, data, images

    return Input(dataset=dataset, classes=names, records=records(), total=None, files=False)

