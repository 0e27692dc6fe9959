"""Ingest image data sets into the ``samples`` table (and the label registry ``classes``).

The input formats (``--format``) live one per file in :mod:`featurelt.data.formats` (registry ``FORMATS``,
listed by ``featurelt ingest --help``), the bundled data sets (``--builtin``) in ``formats/builtin.py``;
this module is the write path: labels, validation, deduplication and the store transaction.

Labels: the ``classes`` table is the registry across ingests. Named classes (folders, CIFAR, iNat,
Fashion-MNIST, manifest names) keep their label if the name is known and otherwise get the next free
label after the existing ones (in the source's class order). Integer labels without names (split lists,
manifests with integer ``label``, plain IDX files) *are* store labels: they join the class with that
label, or create it named ``str(label)``; a manifest ``class_name`` that disagrees with the store's
name for that label is refused. ``--class-names FILE`` names integer labels (:mod:`featurelt.data.classnames`);
a class still called ``str(label)`` in the store takes the name the input states (its class-name text
embeddings, made from the number, are deleted in the same transaction: re-run ``extract text:...``).

Sample ids: the id the source gives (manifest ``sample_id``, iNat image id), else for path sources
(folders, manifests, split lists) ``<dataset>:<path>`` with the path relative to the folder or as the
manifest / list writes it, else (array sources: CIFAR, IDX, builtins) the content hash. Identical images at
two paths (another label or split) are two samples, counted in the summary; ``content_sha256`` finds them.

Test hold-out: when the source states no splits at all (a plain folder of class subfolders, a manifest
without a split column), no ``--split`` is given and the data is original, a stratified, seeded
``test_fraction`` of each class goes to split ``test`` (:class:`HoldOut`), so a plain folder is ready to
train and evaluate on; ``test_fraction=0`` keeps every image in train.

Every reader yields :class:`Record` objects lazily; :func:`ingest` validates them (decoding every
image), turns them into Arrow batches of ``batch_size`` rows and streams them into one store
transaction (``samples`` appended, ``rejects``, ``classes``). Inside the transaction (under the store
lock) the labels are assigned from the latest ``classes`` and the stored ``sample_id`` / ``content_sha256``
keys are read once; rows already stored are skipped (counted as duplicates). Memory does not grow with the
images, only with the ids (~150 bytes per stored or ingested image).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import pyarrow as pa

from featurelt.data.classnames import is_label_number, name_input, read_class_names
from featurelt.data.formats import BUILTINS, FORMATS, Input, Record, detect_format, read_input
from featurelt.data.formats.base import is_int, printable
from featurelt.data.formats.builtin import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, read_builtin
from featurelt.data.images import ImageDecodeError, decode_bytes, sample_id_for, sha256_hex

if TYPE_CHECKING:
    from featurelt.store.core import Store

Source = Literal["original", "auxiliary", "generated"]
SOURCES: tuple[str, ...] = get_args(Source)
MAX_LISTED_ERRORS = 5    # bad rows named in an error message
DEFAULT_TEST_FRACTION = 0.2


class HoldOut:
    """Stratified, seeded test hold-out over a stream: of the ``n_c`` records of class ``c``, exactly
    ``test_count(n_c)`` go to test, a uniformly random subset chosen one record at a time (selection
    sampling, Knuth's Algorithm S) with a generator seeded by ``(seed, class name)``, so the choice does
    not depend on the other classes and needs no second pass over the input."""

    def __init__(self, counts: dict[str, int], fraction: float, seed: int) -> None:
        import zlib

        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"--test-fraction must be in [0, 1), got {fraction}")
        self.left = {c: [n, self.test_count(n, fraction)] for c, n in counts.items()}
        self.rng = {c: np.random.default_rng([seed, zlib.crc32(c.encode("utf-8", "surrogateescape"))])
                    for c in counts}
        self.held_out = 0

    @staticmethod
    def test_count(n: int, fraction: float) -> int:
        """``round(fraction * n)`` (halves up), keeping at least one training image of every class."""
        return min(int(fraction * n + 0.5), max(n - 1, 0))

    def is_test(self, class_name: str) -> bool:
        """Whether the next record of ``class_name`` goes to test."""
        left = self.left.get(class_name)
        if left is None or left[0] <= 0:
            return False
        n, t = left
        take = bool(self.rng[class_name].random() * n < t)
        left[0], left[1] = n - 1, t - take
        self.held_out += take
        return take


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
    copies: int = 0  # added rows whose image (content_sha256) another sample already has: kept, counted
    held_out: int = 0  # added rows of a source without splits put in split test
    test_fraction: float = 0.0
    named_classes: dict[int, str] = field(default_factory=dict)  # label -> name given to a class called str(label)

    def summary(self) -> str:
        named = f", {len(self.named_classes)} classes named" if self.named_classes else ""
        text = (f"ingested {self.dataset}: {self.added} added, {self.duplicates} duplicates skipped, "
                f"{self.rejected} rejected, {len(self.new_classes)} new classes{named}; "
                f"store version {self.store_version}")
        if self.held_out:
            text += (f"\nthe input has no test split: {self.held_out} images held out as split 'test' (stratified "
                     f"--test-fraction {self.test_fraction:g}; --test-fraction 0 keeps all in train)")
        if self.copies:
            text += (f"\n{self.copies} added image(s) have the same content as another sample (another path, label "
                     "or split), kept; list them: featurelt sql \"SELECT content_sha256, list(sample_id), list(label), "
                     "list(split) FROM samples GROUP BY 1 HAVING count(*) > 1\"")
        return text


def open_input(path: Path | None = None, *, fmt: str = "auto", builtin: str | None = None,
               root: Path | None = None, split: str | None = None) -> Input:
    """The reader for a path (``FORMATS``) or a builtin data set (``BUILTINS``), as an :class:`Input`."""
    if builtin is not None:
        return read_builtin(builtin, path=path, split=split)
    if path is None:
        raise ValueError(f"give a PATH to ingest or --builtin {'|'.join(BUILTINS.names())}")
    return read_input(path, fmt=fmt, root=root, split=split)


# ====================================================================== the registry
class ClassRegistry:
    """Class name -> label across ingests: existing classes keep their labels, new names follow them."""

    def __init__(self, rows: Sequence[dict[str, Any]]) -> None:
        self.rows = {r["name"]: dict(r) for r in rows}
        self.by_label = {r["label"]: r["name"] for r in rows}
        self.new: list[str] = []
        self.alias: dict[str, int] = {}  # integer-label keys that joined an existing class of another name
        self.named: dict[int, str] = {}  # label -> the name the input gave a class called str(label)

    def resolve(self, key: str) -> int:
        """Label of a class given by name or label number (``--neighbor-of``)."""
        if key in self.rows:
            return int(self.rows[key]["label"])
        if is_int(key) and int(key) in self.by_label:
            return int(key)
        known = ", ".join(f"{lab}:{name}" for lab, name in sorted(self.by_label.items())[:20])
        raise ValueError(f"unknown class '{key}'; known classes: {known or '(none: ingest the target classes first)'}")

    def add(self, name: str, *, source: str, neighbor_of: int | None, label_id: int | None = None,
            named: bool = True) -> int:
        """Label of ``name``, registering it after the existing labels if new.

        label_id: the integer label the source gives (split lists, manifests and IDX files without names):
        it is the store label. If that label exists, the source's rows join it (``named``: the source also
        states a name, which must then agree, unless the class is still called ``str(label)``: it then takes
        that name); if not, the class is created with exactly that label.
        """
        if label_id is not None:
            if label_id in self.by_label:
                existing = self.by_label[label_id]
                if named and name != existing and existing == str(label_id) and not is_label_number(name) \
                        and name not in self.rows:
                    row = self.rows.pop(existing)
                    self.rows[name] = {**row, "name": name}
                    self.by_label[label_id] = name
                    self.named[label_id] = name
                    return label_id
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


def _decode_checked(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) of encoded image bytes, decoded in full; PIL's decompression-bomb warning is an error here."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return decode_bytes(data, name=name).size
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageDecodeError(f"{name}: refused as a decompression bomb ({exc})") from None


def _validate(rec: Record, *, reference: bool, dataset: str) -> tuple[dict[str, Any] | None, str | None]:
    """The samples row of a record (without label / dataset / source), or the reason it is bad.

    sample_id: the source's id, else ``<dataset>:<key>`` for path sources, else the content hash."""
    if rec.error:
        return None, rec.error
    uri = None
    if rec.data is not None:
        data = rec.data
    else:
        uri = os.path.abspath(rec.path)  # type: ignore[arg-type]
        if printable(uri) != uri:
            return None, "the file name is not valid UTF-8 (rename the file)"
        try:
            with open(uri, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            return None, f"cannot read {uri} ({exc.strerror or exc})"
        if not data:
            return None, f"empty file {uri}"
    if rec.size is not None:
        width, height = rec.size
    else:
        try:
            width, height = _decode_checked(data, rec.location)
        except ImageDecodeError as exc:  # the location is reported beside the reason already
            return None, str(exc).removeprefix(f"{rec.location}: ")
    digest = sha256_hex(data)
    sid = rec.sample_id or (f"{dataset}:{rec.key}" if rec.key is not None else sample_id_for(data))
    return {"sample_id": sid, "uri": uri,
            "image": None if reference else data, "content_sha256": digest,
            "width": width, "height": height, "description": rec.description}, None


def ingest(store: "Store", path: str | os.PathLike[str] | None = None, *, fmt: str = "auto",
           builtin: str | None = None, root: str | os.PathLike[str] | None = None, split: str | None = None,
           source: Source = "original", neighbor_of: str | None = None, reference: bool = False,
           skip_bad: bool = False, dataset: str | None = None, limit: int | None = None,
           batch_size: int = 512, class_names: str | os.PathLike[str] | None = None, message: str | None = None,
           progress: bool = True, test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = 0) -> IngestResult:
    """Ingest one data set into ``store`` in ONE transaction (samples, rejects, classes).

    ``class_names``: a names file for the input's integer labels (:func:`~featurelt.data.classnames.read_class_names`).

    Re-ingesting the same data adds no rows (rows whose ``sample_id`` is stored are skipped). Bad rows (undecodable
    or missing files, unknown labels, paths outside ``root``, duplicate ids with different content,
    wrong column types) abort the ingest with :class:`BadInput` naming the first ones and the count,
    nothing committed -- unless ``skip_bad``, which ingests the good rows and writes the bad ones to
    ``rejects`` in the same transaction.

    test_fraction / seed: the stratified test hold-out of a source without splits (:class:`HoldOut`).
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
    names = read_class_names(class_names) if class_names is not None else None
    inp = open_input(p, fmt=fmt, builtin=builtin, root=r, split=split)
    if names is not None:
        inp = name_input(inp, names, source=str(class_names))
    if reference and not inp.files:
        raise ValueError(f"--reference stores file URIs, but {inp.dataset} is decoded from arrays; "
                         "ingest it without --reference")
    name = dataset or inp.dataset
    where = str(p) if p is not None else f"--builtin {builtin}"
    holdout = HoldOut(inp.unsplit_class_counts or {}, test_fraction, seed)
    if split is not None or source != "original" or test_fraction == 0:
        holdout.left.clear()  # an explicit split, or auxiliary / generated images: all stay where they are

    bad: list[dict[str, Any]] = []
    seen: dict[str, str] = {}   # sample_id -> content sha ("" for content-hash ids) seen in this ingest
    stored: dict[str, bytes] = {}  # sample_id -> first 16 bytes of the content sha256 of rows already stored
    contents: set[bytes] = set()  # content sha256 prefixes of the stored and added rows (to count copies)
    stats = {"good": 0, "input_dup": 0, "stored_dup": 0, "read": 0, "copies": 0, "held_out": 0}
    bar = tqdm(total=min(inp.total, limit) if inp.total is not None and limit else inp.total, unit="img",
               desc=f"ingest {name}", disable=None if progress else True, mininterval=0.5)

    def reject(rec: Record, reason: str, sample_id: str | None = None) -> None:
        bad.append({"location": printable(rec.location), "row": rec.row, "sample_id": sample_id,
                    "reason": printable(reason)})

    def batches(registry: ClassRegistry) -> Iterator[pa.RecordBatch]:
        rows: list[dict[str, Any]] = []
        for rec in inp.records:
            if limit is not None and stats["read"] >= limit:
                break
            stats["read"] += 1
            bar.update(1)
            held_out = rec.split == "train" and holdout.is_test(rec.class_name)  # (a position even if bad)
            if held_out:
                rec.split = "test"
            row, reason = _validate(rec, reference=reference, dataset=name)
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
            old = stored.get(sid)
            if old is not None:
                if old != bytes.fromhex(row["content_sha256"])[:16]:
                    reject(rec, f"duplicate sample_id {sid} with different content (stored sha256 {old.hex()[:12]}..., "
                                f"this file {row['content_sha256'][:12]}...)", sid)
                else:
                    stats["stored_dup"] += 1
                continue
            content = bytes.fromhex(row["content_sha256"])[:16]
            if content in contents:  # the same image as another sample (another path, label or split): kept
                stats["copies"] += 1
            contents.add(content)
            row.update(dataset=name, split=rec.split, label=registry.label(rec.class_name), source=source)
            stats["good"] += 1
            stats["held_out"] += held_out
            rows.append(row)
            if len(rows) >= batch_size:
                yield _samples_batch(rows)
                rows = []
        if rows:
            yield _samples_batch(rows)
        bar.close()
        if stats["read"] == 0:
            raise BadInput(f"{where}: empty input: no images found")
        if bad and not skip_bad:
            raise BadInput(_bad_message(where, bad))
        if stats["good"] + stats["stored_dup"] == 0 and bad:  # rows already stored are good rows too
            raise BadInput(f"{where}: no good rows to ingest; " + _bad_message(where, bad))

    with store.transaction(message) as tx:
        # labels and duplicates are decided from the store as it is under the store lock (the transaction
        # re-reads it after locking), so a concurrent ingest cannot give two new classes the same label or
        # add the same rows twice
        existing = store.read("classes", columns=["label", "name", "source", "neighbor_of"]).to_pylist() \
            if store.has_table("classes") else []
        registry = ClassRegistry(existing)
        neighbor_label = registry.resolve(neighbor_of) if neighbor_of is not None else None
        for cname in inp.classes:
            registry.add(cname, source=source, neighbor_of=neighbor_label, label_id=inp.class_ids.get(cname),
                         named=cname in inp.named)
        # the stored ids (key columns only, streamed): new rows are filtered against them and appended, so
        # memory grows with the number of stored rows (~150 bytes each), never with the images
        if store.has_table("samples"):
            for b in store.scan("samples", columns=["sample_id", "content_sha256"], batch_size=65536):
                stored.update(zip(b.column(0).to_pylist(),
                                  (bytes.fromhex(h)[:16] for h in b.column(1).to_pylist())))
            contents.update(stored.values())
        try:
            added = tx.append("samples", batches(registry))
        finally:
            bar.close()
        if bad:
            tx.append("rejects", rejects_table(command=tx.message, stage="ingest", rows=bad))
        if registry.named and store.has_table("text_embeddings"):  # embeddings of the label numbers: stale
            tx.delete("text_embeddings", f"label IN ({', '.join(str(lab) for lab in sorted(registry.named))})")
        if added == 0 and not bad and not registry.new and not registry.named:
            tx.discard()  # nothing new: no store version
        else:
            rebuild_classes(tx, registry=registry.as_rows())
    store.refresh()
    duplicates = stats["input_dup"] + stats["stored_dup"]
    return IngestResult(dataset=name, added=added, duplicates=duplicates, rejected=len(bad),
                        store_version=store.version, new_classes=list(registry.new), rejects=bad,
                        copies=stats["copies"], held_out=stats["held_out"], test_fraction=test_fraction,
                        named_classes=dict(registry.named))


_SAMPLES_TYPES = {"sample_id": pa.string(), "dataset": pa.string(), "split": pa.string(), "label": pa.int32(),
                  "source": pa.string(), "uri": pa.string(), "image": pa.large_binary(),
                  "content_sha256": pa.string(), "width": pa.int32(), "height": pa.int32(),
                  "description": pa.string()}


def _samples_batch(rows: list[dict[str, Any]]) -> pa.RecordBatch:
    """The ``samples`` record batch of validated rows."""
    return pa.RecordBatch.from_pydict({c: pa.array([r[c] for r in rows], t) for c, t in _SAMPLES_TYPES.items()})


def _bad_message(where: str, bad: list[dict[str, Any]]) -> str:
    first = "; ".join(
        f"{b['location']}" + (f" (sample {b['sample_id']})" if b["sample_id"] else "") + f": {b['reason']}"
        for b in bad[:MAX_LISTED_ERRORS])
    more = f" (and {len(bad) - MAX_LISTED_ERRORS} more)" if len(bad) > MAX_LISTED_ERRORS else ""
    return (f"{len(bad)} bad row(s) in {where}, nothing committed; first: {first}{more}. "
            "Fix them, or pass --skip-bad to ingest the good rows and record the bad ones in the rejects table")


__all__ = ["Record", "Input", "IngestResult", "ClassRegistry", "BadInput", "ingest", "open_input", "detect_format",
           "read_builtin", "FORMATS", "BUILTINS", "SOURCES", "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR"]
