"""Ingest image data sets into the ``samples`` table (and the label registry ``classes``).

Formats (``--format``, auto-detected by default):

- ``folder``: ``PATH/<class>/<image>`` (one subfolder per class; also ``PATH/<split>/<class>/<image>``
  when every top-level folder is train / val / test);
- ``csv`` / ``jsonl``: a manifest with columns ``path,label[,split][,class_name][,sample_id]``; ``label`` is
  a class name or an integer; relative paths are resolved against ``--root`` (default: the manifest's folder);
- ``split-list``: ImageNet-LT / Places-LT lists, ``relative/path label`` per line, paths under ``--root``;
- ``inat``: iNaturalist-2018 COCO-style JSON (``images``, ``annotations``, ``categories``);
- ``cifar``: CIFAR-10 / CIFAR-100 python pickles (``data_batch_*``, ``test_batch``, ``batches.meta`` or
  ``train``, ``test``, ``meta``), with their real class names;
- ``idx``: MNIST-style IDX files (``*-images-idx3-ubyte[.gz]`` + ``*-labels-idx1-ubyte[.gz]``);
- builtins ``digits`` (scikit-learn's bundled 8x8 digits) and ``fashion-mnist`` (Debian's files).

Labels: the ``classes`` table is the registry across ingests. Named classes (folders, CIFAR, iNat,
Fashion-MNIST, manifest names) keep their label if the name is known and otherwise get the next free
label after the existing ones (in the source's class order). Integer labels without names (split lists,
manifests with integer ``label``, plain IDX files) *are* store labels: they join the class with that
label, or create it named ``str(label)``; a manifest ``class_name`` that disagrees with the store's
name for that label is refused.

Every reader yields :class:`Record` objects lazily; :func:`ingest` validates them (decoding every
image), turns them into Arrow batches of ``batch_size`` rows and streams them into one store
transaction (``samples`` via ``insert_new``, ``rejects``, ``classes``), so memory does not grow with the
data set (apart from the set of sample ids seen, ~100 bytes per image, used to find duplicates).
"""
from __future__ import annotations

import csv
import gzip
import json
import os
import pickle
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, get_args

import numpy as np
import pyarrow as pa

from featurelt.data.images import ImageDecodeError, decode_bytes, encode_png, sample_id_for, sha256_hex

if TYPE_CHECKING:
    from featurelt.store.core import Store

Format = Literal["auto", "folder", "csv", "jsonl", "split-list", "inat", "cifar", "idx"]
Builtin = Literal["digits", "fashion-mnist"]
Source = Literal["original", "auxiliary", "generated"]
FORMATS: tuple[str, ...] = get_args(Format)
BUILTINS: tuple[str, ...] = get_args(Builtin)
SOURCES: tuple[str, ...] = get_args(Source)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
SPLIT_NAMES = ("train", "val", "test")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
DIGITS_SEED = 0          # seed of the builtin digits' stratified train/test split
DIGITS_TEST_FRACTION = 0.2
MAX_LISTED_ERRORS = 5    # bad rows named in an error message


@dataclass(slots=True)
class Record:
    """One input image before validation.

    location: the file, or ``manifest:row`` it came from (named in errors and rejects).
    row: 1-based row / line number in a manifest or list, else None.
    class_name: the class key in the registry (a name; integer labels without names become ``str(int)``).
    path: the image file to read (file sources); data: encoded bytes (array sources).
    size: (width, height) when the bytes were encoded here (no decode needed).
    error: a problem found while reading the input (missing file, unknown label, ...).
    """

    location: str
    row: int | None
    class_name: str
    split: str
    path: str | None = None
    data: bytes | None = None
    sample_id: str | None = None
    size: tuple[int, int] | None = None
    description: str | None = None
    error: str | None = None


@dataclass
class Input:
    """What a reader found: dataset name, class names in label order, the lazy records, and a size hint."""

    dataset: str
    classes: list[str]
    records: Iterator[Record]
    total: int | None = None
    files: bool = True  # records point at files (so --reference is possible)
    class_ids: dict[str, int] = field(default_factory=dict)  # integer labels the source gives: name -> label
    named: set[str] = field(default_factory=set)  # of those, names the source states (not just str(label))


@dataclass
class IngestResult:
    """Summary of one ingest (printed by the CLI)."""

    dataset: str
    added: int
    duplicates: int
    rejected: int
    store_version: int
    new_classes: list[str] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        return (f"ingested {self.dataset}: {self.added} added, {self.duplicates} duplicates skipped, "
                f"{self.rejected} rejected, {len(self.new_classes)} new classes; store version {self.store_version}")


# ====================================================================== helpers
def _is_int(text: str) -> bool:
    return text.strip().lstrip("-").isdigit()


def _split_from_name(name: str, default: str) -> str:
    low = name.lower()
    for split in SPLIT_NAMES:
        if split in low:
            return split
    if "t10k" in low:
        return "test"
    return default


def _within(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _resolve(rel: str, root: Path, *, check_root: bool) -> tuple[str, str | None]:
    """Absolute path of ``rel`` under ``root`` and an error if it escapes ``root`` or does not exist."""
    p = Path(rel).expanduser()
    full = p if p.is_absolute() else root / p
    if check_root and not _within(full, root):
        return str(full), f"path '{rel}' is outside --root {root}"
    if not full.is_file():
        return str(full), f"file not found: {full}"
    return str(full.resolve()), None


def _check_not_empty(path: Path) -> None:
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"{path}: empty input (0 bytes)")


def _int_label_classes(labels: Sequence[int], names: dict[int, str]) -> list[str]:
    return [names.get(i, str(i)) for i in sorted(set(labels))]


# ====================================================================== readers
def read_folder(path: Path, *, split: str | None = None) -> Input:
    """``PATH/<class>/<image>``; also ``PATH/<split>/<class>/<image>`` when every top folder is a split name."""
    if not path.is_dir():
        raise FileNotFoundError(f"image folder not found: {path}")
    top = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not top:
        raise ValueError(f"{path}: empty input: no class subfolders (expected PATH/<class>/<image files>)")
    if all(d.name in SPLIT_NAMES for d in top):
        roots = [(d, d.name) for d in top]
    else:
        roots = [(path, split or "train")]
    class_dirs: list[tuple[Path, str, str]] = []
    for root, sp in roots:
        for d in sorted(x for x in root.iterdir() if x.is_dir() and not x.name.startswith(".")):
            class_dirs.append((d, d.name, split or sp))
    classes = sorted({name for _, name, _ in class_dirs})

    def files(d: Path) -> list[Path]:
        return sorted(f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)

    total = sum(len(files(d)) for d, _, _ in class_dirs)

    def records() -> Iterator[Record]:
        for d, name, sp in class_dirs:
            for f in files(d):
                yield Record(location=str(f), row=None, class_name=name, split=sp, path=str(f))

    return Input(dataset=path.resolve().name, classes=classes, records=records(), total=total)


_MANIFEST_COLUMNS = ("path", "label", "split", "class_name", "sample_id", "description")


def _manifest_rows(path: Path, kind: Literal["csv", "jsonl"]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number, raw dict) of a CSV (header row 1, data from row 2) or JSONL (line number) manifest."""
    with open(path, newline="" if kind == "csv" else None, encoding="utf-8") as fh:
        if kind == "csv":
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            missing = [c for c in ("path", "label") if c not in header]
            if missing:
                raise ValueError(f"{path}: manifest needs columns path,label[,split][,class_name][,sample_id]; "
                                 f"missing {missing}, header is {header}")
            for i, row in enumerate(reader, start=2):
                yield i, {k: v for k, v in row.items() if k is not None}
        else:
            for i, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield i, {"__error__": f"not valid JSON ({exc.msg})"}
                    continue
                if not isinstance(obj, dict):
                    yield i, {"__error__": f"expected a JSON object, got {type(obj).__name__}"}
                    continue
                yield i, obj


def _manifest_label(raw: dict[str, Any], kind: str) -> tuple[int | str | None, str | None]:
    """(label as int or name, error) of one manifest row."""
    value = raw.get("label")
    if value is None or value == "":
        return None, "missing label"
    if kind == "jsonl":
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            return None, f"label must be an integer or a class name, got {type(value).__name__} {value!r}"
        if isinstance(value, int):
            return (value, None) if value >= 0 else (None, f"label must be >= 0, got {value}")
    value = str(value).strip()
    if _is_int(value):
        n = int(value)
        return (n, None) if n >= 0 else (None, f"label must be >= 0, got {value}")
    try:
        float(value)
    except ValueError:
        return value, None
    return None, f"label must be an integer or a class name, got number {value!r}"


def _manifest_str(raw: dict[str, Any], key: str) -> tuple[str | None, str | None]:
    value = raw.get(key)
    if value is None or value == "":
        return None, None
    if key == "sample_id" and isinstance(value, int) and not isinstance(value, bool):
        return str(value), None
    if not isinstance(value, str):
        return None, f"column '{key}' must be a string, got {type(value).__name__} {value!r}"
    return value, None


def read_manifest(path: Path, *, kind: Literal["csv", "jsonl"], root: Path | None = None,
                  split: str | None = None) -> Input:
    """CSV / JSONL manifest: ``path,label[,split][,class_name][,sample_id][,description]``."""
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    _check_not_empty(path)
    base = root if root is not None else path.parent
    # pass 1 (text only): the class list, so labels are assigned in a stable order
    int_names: dict[int, str] = {}
    int_labels: set[int] = set()
    names: set[str] = set()
    n = 0
    for _, raw in _manifest_rows(path, kind):
        n += 1
        if "__error__" in raw:
            continue
        label, err = _manifest_label(raw, kind)
        cname, cerr = _manifest_str(raw, "class_name")
        if err or cerr:
            continue
        if isinstance(label, int):
            int_labels.add(label)
            if cname and label not in int_names:
                int_names[label] = cname
        else:
            names.add(label)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError(f"{path}: empty input: the manifest has no rows")
    classes = _int_label_classes(sorted(int_labels), int_names) + sorted(names - set(int_names.values()))

    def records() -> Iterator[Record]:
        for i, raw in _manifest_rows(path, kind):
            loc = f"{path}:row {i}"
            if "__error__" in raw:
                yield Record(location=loc, row=i, class_name="", split="", error=raw["__error__"])
                continue
            errors = [k for k in raw if k not in _MANIFEST_COLUMNS and kind == "jsonl"]
            rel, perr = _manifest_str(raw, "path")
            label, lerr = _manifest_label(raw, kind)
            sp, serr = _manifest_str(raw, "split")
            cname, cerr = _manifest_str(raw, "class_name")
            sid, iderr = _manifest_str(raw, "sample_id")
            desc, derr = _manifest_str(raw, "description")
            err = perr or lerr or serr or cerr or iderr or derr
            if errors and not err:
                err = f"unknown field(s) {errors}; manifest fields are {list(_MANIFEST_COLUMNS)}"
            if rel is None and not err:
                err = "missing path"
            if err:
                yield Record(location=loc, row=i, class_name="", split="", error=err)
                continue
            full, ferr = _resolve(rel, base, check_root=root is not None)  # type: ignore[arg-type]
            if isinstance(label, int):
                name = int_names.get(label, str(label))
                if cname and cname != name:
                    ferr = ferr or f"label {label} is named '{name}' earlier in the manifest but '{cname}' here"
            else:
                name = label  # type: ignore[assignment]
            yield Record(location=loc, row=i, class_name=name, split=split or sp or "train", path=full,
                         sample_id=sid, description=desc, error=ferr)

    class_ids = {int_names.get(i, str(i)): i for i in int_labels}
    return Input(dataset=path.stem, classes=classes, records=records(), total=n, class_ids=class_ids,
                 named={int_names[i] for i in int_names})


def read_split_list(path: Path, *, root: Path | None, split: str | None = None) -> Input:
    """ImageNet-LT / Places-LT split list: ``relative/path label`` per line, paths under ``root``."""
    if root is None:
        raise ValueError(f"{path}: a split list needs --root (the folder its relative paths start from)")
    if not path.is_file():
        raise FileNotFoundError(f"split list not found: {path}")
    if not root.is_dir():
        raise FileNotFoundError(f"--root {root} is not a folder")
    _check_not_empty(path)

    def parse(line: str) -> tuple[str | None, int | None, str | None]:
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            return None, None, f"expected 'relative/path label', got {line.strip()!r}"
        rel, lab = parts
        if not _is_int(lab) or int(lab) < 0:
            return rel, None, f"unknown label {lab!r} (split lists need integer labels >= 0)"
        return rel, int(lab), None

    labels: set[int] = set()
    n = 0
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                n += 1
                _, lab, err = parse(line)
                if lab is not None:
                    labels.add(lab)
    if n == 0:
        raise ValueError(f"{path}: empty input: the split list has no lines")
    sp = split or _split_from_name(path.stem, "train")

    def records() -> Iterator[Record]:
        with open(path, encoding="utf-8") as fh:
            for i, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                loc = f"{path}:line {i}"
                rel, lab, err = parse(line)
                if err:
                    yield Record(location=loc, row=i, class_name="", split=sp, error=err)
                    continue
                full, ferr = _resolve(rel, root, check_root=True)  # type: ignore[arg-type]
                yield Record(location=loc, row=i, class_name=str(lab), split=sp, path=full, error=ferr)

    dataset = path.stem.split("_")[0] if "_" in path.stem else path.stem
    return Input(dataset=dataset, classes=[str(i) for i in sorted(labels)], records=records(), total=n,
                 class_ids={str(i): i for i in labels})


def read_inat(path: Path, *, root: Path | None = None, split: str | None = None) -> Input:
    """iNaturalist-2018 COCO-style JSON: ``images`` (id, file_name), ``annotations`` (image_id,
    category_id), ``categories`` (id, name). The image id becomes the sample id (``<dataset>:<id>``)."""
    if not path.is_file():
        raise FileNotFoundError(f"iNaturalist JSON not found: {path}")
    _check_not_empty(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise ValueError(f"{path}: expected a COCO-style object with 'images', 'annotations', 'categories'")
    images = doc["images"]
    if not images:
        raise ValueError(f"{path}: empty input: 'images' is empty")
    cats = {}
    for c in doc.get("categories") or []:
        if isinstance(c, dict) and isinstance(c.get("id"), int):
            cats[c["id"]] = str(c.get("name", c["id"]))
    ann: dict[Any, Any] = {}
    for a in doc.get("annotations") or []:
        if isinstance(a, dict):
            ann[a.get("image_id")] = a.get("category_id")
    base = root if root is not None else path.parent
    sp = split or _split_from_name(path.stem, "train")
    used = sorted({c for c in ann.values() if isinstance(c, int)} | set(cats))
    classes = [cats.get(c, str(c)) for c in used]
    dataset = "inat2018" if "2018" in path.stem else path.stem

    def records() -> Iterator[Record]:
        for i, img in enumerate(images, start=1):
            loc = f"{path}:images[{i - 1}]"
            if not isinstance(img, dict) or not isinstance(img.get("file_name"), str) or "id" not in img:
                yield Record(location=loc, row=i, class_name="", split=sp,
                             error=f"image entry needs 'id' and a string 'file_name', got {img!r:.80}")
                continue
            cat = ann.get(img["id"])
            if not isinstance(cat, int):
                yield Record(location=loc, row=i, class_name="", split=sp,
                             error=f"image id {img['id']} has no annotation with an integer category_id (got {cat!r})")
                continue
            if cats and cat not in cats:
                yield Record(location=loc, row=i, class_name="", split=sp,
                             error=f"unknown label: category_id {cat} is not in 'categories'")
                continue
            full, err = _resolve(img["file_name"], base, check_root=root is not None)
            yield Record(location=loc, row=i, class_name=cats.get(cat, str(cat)), split=sp, path=full,
                         sample_id=f"{dataset}:{img['id']}", error=err)

    return Input(dataset=dataset, classes=classes, records=records(), total=len(images))


def _unpickle(path: Path) -> dict[str, Any]:
    with open(path, "rb") as fh:
        try:
            obj = pickle.load(fh, encoding="latin1")
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
            raise ValueError(f"{path}: not a CIFAR python pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict in the pickle, got {type(obj).__name__}")
    return obj


def read_cifar(path: Path, *, split: str | None = None) -> Input:
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
        pairs.append((img, lab, _split_from_name(img.name, "train")))
    order = {name: i for i, name in enumerate(SPLIT_NAMES)}
    pairs.sort(key=lambda t: (order.get(t[2], len(order)), t[0].name))  # train first (matters for --limit)
    if not pairs:
        raise ValueError(f"{path}: empty input: no *-images-idx3-ubyte[.gz] files")
    return pairs


def read_idx(path: Path, *, split: str | None = None, class_names: Sequence[str] | None = None,
             dataset: str | None = None, chunk: int = 1024) -> Input:
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


def read_digits(*, split: str | None = None) -> Input:
    """scikit-learn's bundled digits: 1797 8x8 images scaled 0..16 -> 0..255 uint8 PNG, a stratified
    80/20 train/test split with seed ``DIGITS_SEED`` (same split on every machine)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    idx = np.arange(len(images))
    _, test_idx = train_test_split(idx, test_size=DIGITS_TEST_FRACTION, stratify=d.target, random_state=DIGITS_SEED)
    test = set(test_idx.tolist())

    def records() -> Iterator[Record]:
        for i in idx:
            sp = split or ("test" if i in test else "train")
            yield Record(location=f"sklearn digits[{i}]", row=int(i) + 1, class_name=str(d.target[i]), split=sp,
                         data=encode_png(images[i]), size=(8, 8))

    return Input(dataset="digits", classes=[str(i) for i in range(10)], records=records(), total=len(images),
                 files=False)


def read_builtin(name: str, *, path: Path | None = None, split: str | None = None) -> Input:
    """``digits`` or ``fashion-mnist`` (Debian's ``/usr/share/datasets/fashion-mnist`` or ``path``)."""
    if name == "digits":
        if path is not None:
            raise ValueError("--builtin digits takes no --path (the data ships with scikit-learn)")
        return read_digits(split=split)
    if name == "fashion-mnist":
        folder = path if path is not None else FASHION_MNIST_DIR
        if not folder.exists():
            raise FileNotFoundError(f"fashion-mnist files not found in {folder}: install the Debian package "
                                    "dataset-fashion-mnist or pass --path to a folder with the four IDX files")
        return read_idx(folder, split=split, class_names=FASHION_MNIST_CLASSES, dataset="fashion-mnist")
    raise ValueError(f"unknown builtin '{name}'; available: {', '.join(BUILTINS)}")


def detect_format(path: Path) -> str:
    """The format of ``path`` by its name and contents (``--format auto``)."""
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if path.is_dir():
        if (path / "batches.meta").is_file() or (path / "meta").is_file():
            return "cifar"
        if any("idx3-ubyte" in p.name for p in path.iterdir()):
            return "idx"
        return "folder"
    name = path.name.lower()
    if "idx3-ubyte" in name:
        return "idx"
    for ext, fmt in ((".csv", "csv"), (".jsonl", "jsonl"), (".json", "inat"), (".txt", "split-list")):
        if name.endswith(ext):
            return fmt
    raise ValueError(f"cannot tell the format of {path}; pass --format ({', '.join(FORMATS[1:])})")


def open_input(path: Path | None = None, *, fmt: Format = "auto", builtin: Builtin | None = None,
               root: Path | None = None, split: str | None = None) -> Input:
    """The reader for a path (or builtin), as an :class:`Input`."""
    if builtin is not None:
        return read_builtin(builtin, path=path, split=split)
    if path is None:
        raise ValueError("give a PATH to ingest or --builtin digits|fashion-mnist")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format '{fmt}'; available: {', '.join(FORMATS)}")
    kind = detect_format(path) if fmt == "auto" else fmt
    if kind == "folder":
        return read_folder(path, split=split)
    if kind in ("csv", "jsonl"):
        return read_manifest(path, kind=kind, root=root, split=split)  # type: ignore[arg-type]
    if kind == "split-list":
        return read_split_list(path, root=root, split=split)
    if kind == "inat":
        return read_inat(path, root=root, split=split)
    if kind == "cifar":
        return read_cifar(path, split=split)
    return read_idx(path, split=split)


# ====================================================================== the registry
class ClassRegistry:
    """Class name -> label across ingests: existing classes keep their labels, new names follow them."""

    def __init__(self, rows: Sequence[dict[str, Any]]) -> None:
        self.rows = {r["name"]: dict(r) for r in rows}
        self.by_label = {r["label"]: r["name"] for r in rows}
        self.new: list[str] = []
        self.alias: dict[str, int] = {}  # integer-label keys that joined an existing class of another name

    def resolve(self, key: str) -> int:
        """Label of a class given by name or label number (``--neighbor-of``)."""
        if key in self.rows:
            return int(self.rows[key]["label"])
        if _is_int(key) and int(key) in self.by_label:
            return int(key)
        known = ", ".join(f"{lab}:{name}" for lab, name in sorted(self.by_label.items())[:20])
        raise ValueError(f"unknown class '{key}'; known classes: {known or '(none: ingest the target classes first)'}")

    def add(self, name: str, *, source: str, neighbor_of: int | None, label_id: int | None = None,
            named: bool = True) -> int:
        """Label of ``name``, registering it after the existing labels if new.

        label_id: the integer label the source gives (split lists, manifests and IDX files without names):
        it is the store label. If that label exists, the source's rows join it (``named``: the source also
        states a name, which must then agree); if not, the class is created with exactly that label.
        """
        if label_id is not None:
            if label_id in self.by_label:
                existing = self.by_label[label_id]
                if named and name != existing:
                    raise ValueError(f"the input names label {label_id} '{name}', but the store's class {label_id} "
                                     f"is '{existing}'")
                self.alias[name] = label_id
                return label_id
            if name in self.rows:
                raise ValueError(f"the input gives class '{name}' label {label_id}, but the store has it as label "
                                 f"{self.rows[name]['label']}")
            label = label_id
        elif name in self.rows:
            return int(self.rows[name]["label"])
        else:
            label = max(self.by_label, default=-1) + 1
        self.rows[name] = {"label": label, "name": name,
                           "source": "auxiliary" if source == "auxiliary" else "original",
                           "neighbor_of": neighbor_of if source == "auxiliary" else None}
        self.by_label[label] = name
        self.new.append(name)
        return label

    def label(self, name: str) -> int:
        """Label of a registered class key."""
        if name in self.alias:
            return self.alias[name]
        return int(self.rows[name]["label"])

    def as_rows(self) -> list[dict[str, Any]]:
        return sorted(self.rows.values(), key=lambda r: r["label"])


# ====================================================================== ingest
class BadInput(ValueError):
    """Input rows that cannot be ingested; the message names the first ones and the count."""


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _validate(rec: Record, *, reference: bool) -> tuple[dict[str, Any] | None, str | None]:
    """The samples row of a record (without label / dataset / source), or the reason it is bad."""
    if rec.error:
        return None, rec.error
    if rec.data is not None:
        data = rec.data
    else:
        try:
            with open(rec.path, "rb") as fh:  # type: ignore[arg-type]
                data = fh.read()
        except OSError as exc:
            return None, f"cannot read {rec.path} ({exc.strerror or exc})"
        if not data:
            return None, f"empty file {rec.path}"
    if rec.size is not None:
        width, height = rec.size
    else:
        try:
            img = decode_bytes(data, name=rec.location)
        except ImageDecodeError as exc:  # the location is reported beside the reason already
            return None, str(exc).removeprefix(f"{rec.location}: ")
        width, height = img.size
    digest = sha256_hex(data)
    return {"sample_id": rec.sample_id or sample_id_for(data), "uri": rec.path,
            "image": None if reference else data, "content_sha256": digest,
            "width": width, "height": height, "description": rec.description}, None


def ingest(store: "Store", path: str | os.PathLike[str] | None = None, *, fmt: Format = "auto",
           builtin: Builtin | None = None, root: str | os.PathLike[str] | None = None, split: str | None = None,
           source: Source = "original", neighbor_of: str | None = None, reference: bool = False,
           skip_bad: bool = False, dataset: str | None = None, limit: int | None = None,
           batch_size: int = 512, message: str | None = None, progress: bool = True) -> IngestResult:
    """Ingest one data set into ``store`` in ONE transaction (samples, rejects, classes).

    Re-ingesting the same data adds no rows (``insert_new`` on ``sample_id``). Bad rows (undecodable
    or missing files, unknown labels, paths outside ``root``, duplicate ids with different content,
    wrong column types) abort the ingest with :class:`BadInput` naming the first ones and the count,
    nothing committed -- unless ``skip_bad``, which ingests the good rows and writes the bad ones to
    ``rejects`` in the same transaction.
    """
    from tqdm import tqdm

    from featurelt.data.classes import rebuild_classes
    from featurelt.store.core import rejects_table

    if source not in SOURCES:
        raise ValueError(f"unknown source '{source}'; available: {', '.join(SOURCES)}")
    if neighbor_of is not None and source != "auxiliary":
        raise ValueError("--neighbor-of names the target class of auxiliary data: use it with --source auxiliary")
    if limit is not None and limit <= 0:
        raise ValueError(f"--limit must be a positive number of images, got {limit}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    p = Path(path).expanduser() if path is not None else None
    r = Path(root).expanduser() if root is not None else None
    inp = open_input(p, fmt=fmt, builtin=builtin, root=r, split=split)
    if reference and not inp.files:
        raise ValueError(f"--reference stores file URIs, but {inp.dataset} is decoded from arrays; "
                         "ingest it without --reference")
    name = dataset or inp.dataset
    where = str(p) if p is not None else f"--builtin {builtin}"

    existing = store.read("classes", columns=["label", "name", "source", "neighbor_of"]).to_pylist() \
        if store.has_table("classes") else []
    registry = ClassRegistry(existing)
    neighbor_label = registry.resolve(neighbor_of) if neighbor_of is not None else None
    for cname in inp.classes:
        registry.add(cname, source=source, neighbor_of=neighbor_label, label_id=inp.class_ids.get(cname),
                     named=cname in inp.named)
    has_samples = store.has_table("samples")

    bad: list[dict[str, Any]] = []
    seen: dict[str, str] = {}   # sample_id -> content sha ("" for content-hash ids) seen in this ingest
    stats = {"good": 0, "input_dup": 0, "read": 0}
    bar = tqdm(total=min(inp.total, limit) if inp.total is not None and limit else inp.total, unit="img",
               desc=f"ingest {name}", disable=None if progress else True, mininterval=0.5)

    def reject(rec: Record, reason: str, sample_id: str | None = None) -> None:
        bad.append({"location": rec.location, "row": rec.row, "sample_id": sample_id, "reason": reason})

    def flush(rows: list[dict[str, Any]]) -> pa.RecordBatch:
        # ids the source gave must not clash with stored rows of different content
        if has_samples:
            given = [r["sample_id"] for r in rows if r["_given"]]
            if given:
                clash = store.read("samples", columns=["sample_id", "content_sha256"],
                                   filter=f"sample_id IN ({', '.join(_sql_str(s) for s in given)})")
                stored = dict(zip(clash.column("sample_id").to_pylist(), clash.column("content_sha256").to_pylist()))
                keep = []
                for r_ in rows:
                    old = stored.get(r_["sample_id"])
                    if old is not None and old != r_["content_sha256"]:
                        bad.append({"location": r_["_loc"], "row": r_["_row"], "sample_id": r_["sample_id"],
                                    "reason": f"duplicate sample_id {r_['sample_id']} with different content "
                                              f"(stored sha256 {old[:12]}..., this file {r_['content_sha256'][:12]}...)"})
                        stats["good"] -= 1
                    else:
                        keep.append(r_)
                rows = keep
        cols = ["sample_id", "dataset", "split", "label", "source", "uri", "image", "content_sha256", "width",
                "height", "description"]
        data = {c: [r_[c] for r_ in rows] for c in cols}
        return pa.RecordBatch.from_pydict({
            "sample_id": pa.array(data["sample_id"], pa.string()), "dataset": pa.array(data["dataset"], pa.string()),
            "split": pa.array(data["split"], pa.string()), "label": pa.array(data["label"], pa.int32()),
            "source": pa.array(data["source"], pa.string()), "uri": pa.array(data["uri"], pa.string()),
            "image": pa.array(data["image"], pa.large_binary()),
            "content_sha256": pa.array(data["content_sha256"], pa.string()),
            "width": pa.array(data["width"], pa.int32()), "height": pa.array(data["height"], pa.int32()),
            "description": pa.array(data["description"], pa.string())})

    def batches() -> Iterator[pa.RecordBatch]:
        rows: list[dict[str, Any]] = []
        for rec in inp.records:
            if limit is not None and stats["read"] >= limit:
                break
            stats["read"] += 1
            bar.update(1)
            row, reason = _validate(rec, reference=reference)
            if row is None:
                reject(rec, reason or "invalid")
                continue
            sid = row["sample_id"]
            prev = seen.get(sid)
            # content-hash ids imply their content: keep the sha only for ids the source gave (less memory)
            digest = row["content_sha256"] if rec.sample_id is not None else ""
            if prev is not None:
                if prev != digest:
                    reject(rec, f"duplicate sample_id {sid} with different content within the input", sid)
                else:
                    stats["input_dup"] += 1
                continue
            seen[sid] = digest
            row.update(dataset=name, split=rec.split, label=registry.label(rec.class_name), source=source,
                       _given=rec.sample_id is not None, _loc=rec.location, _row=rec.row)
            stats["good"] += 1
            rows.append(row)
            if len(rows) >= batch_size:
                b = flush(rows)
                rows = []
                if b.num_rows:
                    yield b
        if rows:
            b = flush(rows)
            if b.num_rows:
                yield b
        bar.close()
        if stats["read"] == 0:
            raise BadInput(f"{where}: empty input: no images found")
        if bad and not skip_bad:
            raise BadInput(_bad_message(where, bad))
        if stats["good"] == 0:
            raise BadInput(f"{where}: no good rows to ingest; " + _bad_message(where, bad))

    with store.transaction(message) as tx:
        try:
            if has_samples:
                added = tx.insert_new("samples", batches(), on="sample_id")
            else:
                added = tx.append("samples", batches())
        finally:
            bar.close()
        if bad:
            tx.append("rejects", rejects_table(command=tx.message, stage="ingest", rows=bad))
        if added == 0 and not bad and not registry.new:
            tx.discard()  # nothing new: no store version
        else:
            rebuild_classes(tx, registry=registry.as_rows())
    store.refresh()
    duplicates = stats["good"] - added + stats["input_dup"]
    return IngestResult(dataset=name, added=added, duplicates=duplicates, rejected=len(bad),
                        store_version=store.version, new_classes=list(registry.new), rejects=bad)


def _bad_message(where: str, bad: list[dict[str, Any]]) -> str:
    first = "; ".join(
        f"{b['location']}" + (f" (sample {b['sample_id']})" if b["sample_id"] else "") + f": {b['reason']}"
        for b in bad[:MAX_LISTED_ERRORS])
    more = f" (and {len(bad) - MAX_LISTED_ERRORS} more)" if len(bad) > MAX_LISTED_ERRORS else ""
    return (f"{len(bad)} bad row(s) in {where}, nothing committed; first: {first}{more}. "
            "Fix them, or pass --skip-bad to ingest the good rows and record the bad ones in the rejects table")


__all__ = ["Record", "Input", "IngestResult", "ClassRegistry", "BadInput", "ingest", "open_input", "detect_format",
           "read_folder", "read_manifest", "read_split_list", "read_inat", "read_cifar", "read_idx", "read_digits",
           "read_builtin", "FORMATS", "BUILTINS", "SOURCES", "FASHION_MNIST_CLASSES"]
