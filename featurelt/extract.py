"""Store rows -> decode -> encode -> Arrow batches -> store: the ``featurelt extract`` pipeline.

One run embeds the samples of a store with one frozen encoder (see ``featurelt.encoders``) and
writes one embedding set per encoder *product* (table ``emb_<name>``, schema
``schemas/embeddings.json``) plus one provenance row per product in ``embedding_sets``.

Local engine (:func:`extract`)::

    samples (sample_id, split) --scan--> todo positions (split filter, --limit, minus rows already
    embedded with the same fingerprint) --> _SampleStream (torch IterableDataset; DataLoader
    workers take rows by position and decode to uint8: plain PNG / JPEG straight to a tensor by
    torchvision, other files and augmented views through PIL; with ``resize_on="host"`` PIL also
    resizes and crops; images over twice the input size are resized in the worker) --> one
    channels-last batch, or one packed buffer when the sizes differ --> (pinned on CUDA) to the
    device, resized there (DeviceResize) unless the workers did, normalised (DeviceStage) --> encoder.encode under
    torch.inference_mode() (bf16/fp16 autocast on CUDA; one batch in flight, so the GPU encodes
    batch i+1 while the host reads back batch i) --> Arrow batches --> one store
    transaction per chunk: ``chunk_rows`` samples, or fewer once ``commit_seconds`` have passed since
    the last commit (bounded loss on a kill, and few commits when the encoder is fast), written in a
    background thread while the next chunk is encoded

Each chunk is its own store transaction, so Ctrl-C or ``kill -9`` keeps every committed chunk and
leaves the store valid; re-running the same command reads ``sample_id, view`` of the rows that
carry the run's fingerprint and embeds only what is missing (no duplicates). New samples ingested
later are embedded by re-running. The provenance rows go into the first chunk's transaction and
later chunks update their row counts, so a killed run leaves the provenance of what it committed.

Ray engine (:func:`extract` with ``engine="ray"``): the same todo list is cut into shards; Ray tasks
decode, encode and write Lance fragments into the embedding tables' directories; the driver makes
ONE store commit with :meth:`featurelt.store.Transaction.append_fragments`.

Augmented views (METHODS.md section 5, ECVL): with ``views=N`` each sample gets view 0 (the plain
image, ``aug_strength`` 0) and views ``v = 1..N`` with strength ``s_v = v / N`` (evenly spread over
(0, 1], so a head can pick the view whose strength matches a sample's momentum score ``M_i``).
A view is ``torchvision.transforms.RandAugment(num_ops=2, magnitude=round(s_v * 30),
num_magnitude_bins=31)`` applied to the decoded image before the encoder's preprocessing, with the
random ops seeded by ``(seed, sample_id, view)`` so that a view is reproducible across runs and engines.

SAM ``pca_map`` (METHODS.md section 2): a product whose encoder says ``requires_fit(product)`` is
fitted on the train split (preprocessed batches) before embedding; the fitted state is part of the
encoder's provenance and fingerprint.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Literal, Sequence

import numpy as np
import pyarrow as pa

from featurelt.store import Store, StoreError, rejects_table, utcnow
from featurelt.store.core import command_line

if TYPE_CHECKING:  # torch stays a lazy import: `featurelt --help` must not load it
    import torch

    from featurelt.encoders.base import Encoder, PackedImages

Engine = Literal["local", "ray"]
ResizeOn = Literal["auto", "host", "device"]
Device = Literal["auto", "cpu", "cuda"]
VecDtype = Literal["float32", "float16"]

SAMPLE_COLUMNS = ["sample_id", "image", "uri"]
RANDAUGMENT_NUM_OPS = 2  # ops per augmented view (METHODS.md section 5: "RandAugment, k ops")
RANDAUGMENT_BINS = 31  # magnitude bins 0..30; magnitude = round(strength * 30)
AUGMENTS = ("randaugment",)


@dataclass
class LoopTimes:
    """Seconds the local engine's main thread spent in each stage of the embedding loop: where a
    slow run waits. On CUDA the GPU encodes during ``images`` and ``rows``; a GPU that is kept busy
    shows as ``device`` time, a starved one as ``images`` time."""

    images: float = 0.0  # waiting for the next batch of images (DataLoader workers; with none, the decoding itself)
    launch: float = 0.0  # handing a batch to the device and queuing its work (on the CPU: the whole forward)
    device: float = 0.0  # waiting for the device to finish a batch (CUDA)
    rows: float = 0.0    # turning the outputs into Arrow rows
    commit: float = 0.0  # waiting for a chunk commit (they run in a background thread) and the last commit

    def shares(self) -> dict[str, float]:
        """Each stage's fraction of their sum."""
        total = sum(vars(self).values())
        return {k: (v / total if total > 0 else 0.0) for k, v in vars(self).items()}

    def summary(self, device: str) -> str:
        shares = self.shares()
        line = "loop time: " + ", ".join(f"{k} {100 * v:.0f} %" for k, v in shares.items())
        if device.startswith("cuda") and shares["images"] > 0.3:
            line += (" (the GPU waited for images: more --num-workers, or images stored smaller or in a faster "
                     "format, would feed it)")
        return line


@dataclass
class ExtractResult:
    """What one extraction run did."""

    encoder: str  # registry name, e.g. "clip:ViT-B-32"
    sets: dict[str, str]  # product -> embedding set name (table emb_<name>)
    rows_added: dict[str, int]  # product -> rows (sample, view) written by this run
    samples_embedded: int  # samples with at least one new row
    samples_skipped: int  # samples whose rows with this fingerprint were already in the store
    rejected: int  # samples that failed to decode (written to `rejects`)
    chunks: int  # store transactions made
    store_version: int  # store version after the run
    seconds: float  # wall time of the embedding loop
    device: str = "cpu"
    text_rows: int = 0  # class text embeddings written (clip text tower / text encoders)
    notes: list[str] = field(default_factory=list)
    times: LoopTimes | None = None  # local engine only

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the fields, ``images_per_second`` and the loop's stage seconds."""
        return {**asdict(self), "images_per_second": self.images_per_second}

    @property
    def images_per_second(self) -> float:
        """Samples embedded per second of the embedding loop."""
        return self.samples_embedded / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        added = sum(self.rows_added.values())
        sets = ", ".join(f"emb_{n}" for n in self.sets.values()) or "(none)"
        line = (f"extract {self.encoder}: {added} rows added to {sets} ({self.samples_embedded} samples, "
                f"{self.images_per_second:.1f} img/s on {self.device}), {self.samples_skipped} skipped "
                f"(already embedded), {self.rejected} rejected; store version {self.store_version}")
        if self.text_rows:
            line += f"; {self.text_rows} class text embeddings"
        if self.times is not None and self.samples_embedded:
            line += "\n" + self.times.summary(self.device)
        return line


@dataclass
class TextExtractResult:
    """What one text extraction did."""

    encoder: str
    set_name: str
    rows_added: int
    rows_skipped: int
    store_version: int

    def summary(self) -> str:
        return (f"extract {self.encoder}: {self.rows_added} class text embeddings added to text_embeddings "
                f"set '{self.set_name}', {self.rows_skipped} skipped (already embedded); "
                f"store version {self.store_version}")


# --------------------------------------------------------------------------- small helpers
def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda`` without a GPU is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False); "
                         "use --device cpu or auto")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"unknown device '{device}'; choose auto, cpu or cuda")
    return device


def default_num_workers(device: str) -> int:
    """DataLoader workers when not given: 0 on CPU (the encoder's threads use the cores), else
    ``min(8, cores - 1)`` so that decoding keeps up with the GPU."""
    if not device.startswith("cuda"):
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def view_strength(view: int, views: int) -> float:
    """Augmentation strength of a view (METHODS.md section 5): 0 for view 0, ``view / views`` otherwise."""
    if view < 0 or view > views:
        raise ValueError(f"view must be in 0..{views}, got {view}")
    return 0.0 if view == 0 else view / views


def randaugment_magnitude(strength: float) -> int:
    """RandAugment magnitude (of 31 bins, 0..30) for a strength in [0, 1]: ``round(strength * 30)``."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"augmentation strength must be in [0, 1], got {strength}")
    return int(round(strength * (RANDAUGMENT_BINS - 1)))


def _view_seed(seed: int, sample_id: str, view: int) -> int:
    digest = hashlib.sha256(f"{seed}:{sample_id}:{view}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _set_names(encoder: "Encoder", products: list[str], name: str | None) -> dict[str, str]:
    """Embedding set per product: ``--name`` for a single product, ``<name>_<product>`` for several."""
    if name is None:
        return {p: encoder.default_set_name(p) for p in products}
    if not name or not all(c.isalnum() or c in "_-" for c in name):
        raise ValueError(f"--name must be letters, digits, '_' or '-', got {name!r}")
    if len(products) == 1:
        return {products[0]: name}
    return {p: f"{name}_{p}" for p in products}


def _split_filter(split: str | None) -> str | None:
    return None if split is None else f"split = {_sql_str(split)}"


def _check_split(store: Store, split: str | None) -> None:
    if not store.has_table("samples"):
        raise StoreError(f"store {store.root} has no samples table; run `featurelt ingest` first")
    if split is None:
        if store.count("samples") == 0:
            raise ValueError(f"store {store.root} has no samples")
        return
    if store.count("samples", _split_filter(split)) == 0:
        splits = sorted(set(store.read("samples", columns=["split"]).column("split").to_pylist()))
        raise ValueError(f"no samples with split '{split}' in store {store.root}; splits present: "
                         f"{', '.join(splits) or '(none)'}")


def _done_views(store: Store, table: str, fingerprint: str) -> dict[str, set[int]]:
    """``{sample_id: {views}}`` of the rows of ``table`` made with ``fingerprint`` (reads 2 columns)."""
    if not store.has_table(table):
        return {}
    done: dict[str, set[int]] = {}
    for b in store.scan(table, columns=["sample_id", "view"], filter=f"fingerprint = {_sql_str(fingerprint)}"):
        for sid, view in zip(b.column("sample_id").to_pylist(), b.column("view").to_pylist()):
            done.setdefault(sid, set()).add(view)
    return done


@dataclass
class _Plan:
    """The work of a run: positions of the samples to read and the views each one needs."""

    positions: np.ndarray  # int64 row positions in the samples dataset (pinned version)
    needed: list[tuple[int, ...]]  # views to compute per position
    skipped: int  # samples in range whose every view is present for every product
    samples_version: int  # Lance version of `samples` that the positions refer to


def _plan(store: Store, *, split: str | None, limit: int | None, views: int,
          done: dict[str, dict[str, set[int]]]) -> _Plan:
    """Scan ``sample_id, split`` of the samples table and list what is left to embed."""
    want = set(range(views + 1))
    interned: dict[tuple[int, ...], tuple[int, ...]] = {}
    positions: list[int] = []
    needed: list[tuple[int, ...]] = []
    skipped = 0
    seen = 0
    offset = 0
    ds = store.dataset("samples")
    for b in ds.to_batches(columns=["sample_id", "split"], batch_size=65536):
        sids = b.column("sample_id").to_pylist()
        splits = b.column("split").to_pylist() if split is not None else None
        for i, sid in enumerate(sids):
            if splits is not None and splits[i] != split:
                continue
            if limit is not None and seen >= limit:
                break
            seen += 1
            missing = set()
            for views_done in done.values():
                missing |= want - views_done.get(sid, set())
            if missing:
                key = tuple(sorted(missing))
                positions.append(offset + i)
                needed.append(interned.setdefault(key, key))  # one tuple object per distinct view set
            else:
                skipped += 1
        offset += b.num_rows
        if limit is not None and seen >= limit:
            break
    return _Plan(np.asarray(positions, dtype=np.int64), needed, skipped, ds.version)


# --------------------------------------------------------------------------- decoding in workers
class _ViewMaker:
    """Decoded PIL image -> tensor of one view (picklable: runs in DataLoader workers).

    When the encoder's transform splits (:func:`featurelt.encoders.base.split_transform`), workers
    only resize / crop and hand over ``uint8 [C, H, W]``; ``finish`` (to float, normalise) then runs
    on whole batches on the encoder's device. With ``resize_on_device`` the resize and crop move to
    ``finish`` too, and workers hand over the decoded image. Otherwise workers run the whole
    transform and ``finish`` is None.
    """

    def __init__(self, transform: Callable[[Any], "torch.Tensor"], *, views: int, augment: str | None,
                 seed: int, resize_on_device: bool = False) -> None:
        from featurelt.encoders.base import split_transform

        stages = split_transform(transform, resize_on_device=resize_on_device)
        self.host = None if stages is None else stages[0]  # a HostStage: may decode plain files without PIL
        self.preprocess = transform if stages is None else stages[0]
        self.finish = None if stages is None else stages[1]
        self.resizes_on_device = stages is not None and stages[1].resize is not None
        self.views = views
        self.augment = augment
        self.seed = seed

    def from_bytes(self, data: bytes, needed: tuple[int, ...]) -> "torch.Tensor | None":
        """View 0 straight from the encoded bytes when that is all a sample needs and the host stage
        can skip PIL (:meth:`~featurelt.encoders.base.HostStage.from_bytes`), else None."""
        return self.host.from_bytes(data) if self.host is not None and needed == (0,) else None

    def __call__(self, img: Any, sample_id: str, view: int) -> "torch.Tensor":
        if view == 0:
            return self.preprocess(img)
        import torch
        from torchvision.transforms import RandAugment

        aug = RandAugment(num_ops=RANDAUGMENT_NUM_OPS, magnitude=randaugment_magnitude(view_strength(view, self.views)),
                          num_magnitude_bins=RANDAUGMENT_BINS)
        state = torch.random.get_rng_state()
        torch.manual_seed(_view_seed(self.seed, sample_id, view))
        try:
            out = aug(img)
        finally:
            torch.random.set_rng_state(state)
        return self.preprocess(out)


def _decode_rows(table: pa.Table, needed: Sequence[tuple[int, ...]], make_view: _ViewMaker,
                 views: int) -> tuple[list["torch.Tensor"], list[str], list[int], list[float], list[tuple[str, str]]]:
    """Decode a batch of sample rows; returns tensors, sample ids, views, strengths and rejects."""
    from featurelt.data.images import decode_rgb, sample_bytes

    tensors, sids, vlist, strengths, rejects = [], [], [], [], []
    rows = table.to_pylist()
    for row, want in zip(rows, needed):
        sid = row["sample_id"]
        try:
            data, name = sample_bytes(row)
            direct = make_view.from_bytes(data, want)
            if direct is not None:
                made = [(0, direct)]
            else:
                img = decode_rgb(data, name=name)
                made = [(v, make_view(img, sid, v)) for v in want]
        except Exception as exc:  # a bad image must not stop the run: it goes to `rejects`
            rejects.append((sid, f"{type(exc).__name__}: {exc}"))
            continue
        for v, t in made:
            tensors.append(t)
            sids.append(sid)
            vlist.append(v)
            strengths.append(view_strength(v, views))
    return tensors, sids, vlist, strengths, rejects


def _samples_dataset(root: str, version: int, storage_options: dict[str, str] | None) -> Any:
    import lance

    return lance.dataset(f"{root}/samples.lance", version=version, storage_options=storage_options)


class _SampleStream:
    """A torch ``IterableDataset`` over the plan: yields ready batches (dicts), sharded over workers.

    Read batch ``i`` (``batch_size`` positions) goes to worker ``i % num_workers``; each batch is
    taken from Lance by position (``sample_id, image, uri`` only), decoded, augmented and preprocessed.

    For worker processes the plan (``positions``, ``needed``) goes into a file (:meth:`spill`) and
    the pickled stream carries its path only: the parent writes each worker's pickle into a pipe
    that the worker reads after its imports, so a pickle larger than the pipe (64 KiB) would make
    the workers start one after another (0.8 s each on a 16-core GPU machine).
    """

    def __init__(self, root: str, samples_version: int, storage_options: dict[str, str] | None,
                 positions: np.ndarray, needed: list[tuple[int, ...]], make_view: _ViewMaker, *,
                 batch_size: int, views: int) -> None:
        self.root = root
        self.samples_version = samples_version
        self.storage_options = storage_options
        self.positions = positions
        self.needed = needed
        self.make_view = make_view
        self.batch_size = batch_size
        self.views = views
        self.plan_file: str | None = None

    def spill(self) -> Callable[[], None]:
        """Write the plan to a temporary file that pickles of this stream refer to; returns the
        function that removes it."""
        import pickle
        import tempfile

        fd, self.plan_file = tempfile.mkstemp(prefix="featurelt-plan-", suffix=".pkl")
        with os.fdopen(fd, "wb") as f:
            pickle.dump((self.positions, self.needed), f, protocol=pickle.HIGHEST_PROTOCOL)
        path = self.plan_file
        return lambda: os.path.exists(path) and os.remove(path)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.plan_file is not None:
            state["positions"] = state["needed"] = None
        return state

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import torch
        from torch.utils.data import get_worker_info

        if self.positions is None:  # in a worker: the plan is in the file
            import pickle

            with open(self.plan_file, "rb") as f:  # type: ignore[arg-type]
                self.positions, self.needed = pickle.load(f)
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        ds = _samples_dataset(self.root, self.samples_version, self.storage_options)
        n = len(self.positions)
        # images per read batch: keep the encoder batch near batch_size when each sample makes views
        per_read = max(1, self.batch_size // (self.views + 1)) if self.views else self.batch_size
        for bi, start in enumerate(range(0, n, per_read)):
            if bi % nw != wid:
                continue
            pos = self.positions[start:start + per_read]
            table = ds.take(pos.tolist(), columns=SAMPLE_COLUMNS)
            tensors, sids, vlist, strengths, rejects = _decode_rows(
                table, self.needed[start:start + per_read], self.make_view, self.views)
            for s in range(0, max(len(tensors), 1), self.batch_size):
                part = tensors[s:s + self.batch_size]
                yield {"x": _collate(part) if part else None, "sample_id": sids[s:s + self.batch_size],
                       "view": vlist[s:s + self.batch_size], "aug_strength": strengths[s:s + self.batch_size],
                       "rejects": rejects if s == 0 else [], "samples": len(pos) if s == 0 else 0,
                       "embedded": len(pos) - len(rejects) if s == 0 else 0}


def _collate(images: list["torch.Tensor"]) -> "torch.Tensor | PackedImages":
    """One ``[B, C, H, W]`` tensor (channels-last, :func:`~featurelt.encoders.base.stack_images`)
    when the images have one size, else one buffer of them all
    (:class:`~featurelt.encoders.base.PackedImages`: images at their decoded size, resized on the device)."""
    from featurelt.encoders.base import PackedImages, stack_images

    shape = images[0].shape
    return stack_images(images) if all(t.shape == shape for t in images) else PackedImages.pack(images)


def _make_torch_stream_class() -> type:
    from torch.utils.data import IterableDataset

    class _TorchStream(IterableDataset):
        """torch ``IterableDataset`` wrapper of :class:`_SampleStream` (built lazily: torch is imported
        only when extracting; module ``__getattr__`` rebuilds it when a worker process unpickles it)."""

        def __init__(self, inner: _SampleStream) -> None:
            self.inner = inner

        def __iter__(self) -> Iterator[dict[str, Any]]:
            return iter(self.inner)

    _TorchStream.__module__ = __name__
    _TorchStream.__qualname__ = "_TorchStream"
    return _TorchStream


def __getattr__(name: str) -> Any:  # PEP 562: lazily defined torch classes
    if name == "_TorchStream":
        cls = _make_torch_stream_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _packages_of(obj: Any, depth: int = 0) -> set[str]:
    """Top-level packages of the classes a picklable transform is made of (``Compose`` steps,
    ``HostStage.pil_steps``, the object of a bound method), e.g. ``{"open_clip", "torchvision"}``."""
    found = {type(obj).__module__.split(".")[0]}
    if depth < 4:
        children = list(getattr(obj, "transforms", None) or [])
        children += [c for c in (getattr(obj, "pil_steps", None), getattr(obj, "__self__", None)) if c is not None]
        for child in children:
            found |= _packages_of(child, depth + 1)
    return found - {"builtins"}


def _worker_context(make_view: _ViewMaker, *, start: bool = False) -> Any:
    """The multiprocessing context of DataLoader workers: ``forkserver`` (Lance is not fork-safe) where
    there is one, else ``spawn``. ``start``: start the fork server now, so that its imports run while
    the main process does other work (it is started once per process and kept)."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    # the fork server imports these once (torch ~2 s, open_clip ~1 s when its transform classes are used,
    # pandas 0.4 s for lance), so that each worker does not. lance itself must not be loaded in a process
    # that forks: each worker imports it
    preload = ["torch", "torchvision.transforms", "PIL.Image", "numpy", "pyarrow", "pandas"]
    extra = _packages_of(make_view.preprocess) - {"featurelt", "torch", "torchvision", "PIL"}
    ctx.set_forkserver_preload(preload + sorted(extra))
    if start:
        from multiprocessing import forkserver

        forkserver.ensure_running()
    return ctx


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    """DataLoader's collate function here: batches are made by the stream (the default walks every
    list of a batch, sample ids included, converting nothing)."""
    return batch


def _loader(stream: _SampleStream, *, num_workers: int) -> Iterator[dict[str, Any]]:
    """The stream's batches through a DataLoader with ``num_workers`` processes (see
    :func:`_worker_context`); the plan file of the workers is removed when the iteration ends.

    No ``pin_memory``: DataLoader's pinning thread walks every list of a batch in Python (sample
    ids, views), holding the GIL for about 15 ms a batch; :func:`launch_batch` pins the images only."""
    from torch.utils.data import DataLoader

    if num_workers == 0:
        yield from DataLoader(__getattr__("_TorchStream")(stream), batch_size=None, num_workers=0, collate_fn=_as_is)
        return
    ctx = _worker_context(stream.make_view)
    stream = copy.copy(stream)
    remove = stream.spill()
    try:
        yield from DataLoader(__getattr__("_TorchStream")(stream), batch_size=None, num_workers=num_workers,
                              collate_fn=_as_is, prefetch_factor=4, persistent_workers=False,
                              multiprocessing_context=ctx)
    finally:
        remove()


# --------------------------------------------------------------------------- encoding
def _autocast(device: str) -> Any:
    import contextlib

    import torch

    if not device.startswith("cuda"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


class EncodedBatch:
    """The outputs of one encoded batch, ``{product: float32 tensor [B, D]}`` on the host. On CUDA
    they may still be in flight (computing, then copying into pinned memory): :meth:`result` waits
    for the copy, so the host can prepare the next batch meanwhile."""

    def __init__(self, outputs: dict[str, "torch.Tensor"], ready: Any = None) -> None:
        self.outputs, self.ready = outputs, ready  # ready: a torch.cuda.Event recorded after the copy

    def result(self) -> dict[str, np.ndarray]:
        if self.ready is not None:
            self.ready.synchronize()
        return {p: t.numpy() for p, t in self.outputs.items()}


def launch_batch(encoder: "Encoder", x: "torch.Tensor | list[torch.Tensor] | PackedImages", products: list[str], *,
                 device: str, prepare: Callable[[Any], "torch.Tensor"] | None = None,
                 min_batch: int = 1) -> EncodedBatch:
    """Start encoding ``x`` [B,C,H,W] (or B [C,H,W] images of different sizes, as a list or a
    :class:`~featurelt.encoders.base.PackedImages`, for a ``prepare`` that resizes); ``prepare``
    (e.g. a :class:`~featurelt.encoders.base.DeviceStage`
    turning uint8 into normalised floats) runs on the device first. On CUDA this returns once the
    work is queued; on the CPU the result is ready. On CUDA out-of-memory the batch is encoded in
    halves (recursively, synchronously) instead of failing."""
    import torch

    from featurelt.encoders.base import PackedImages

    try:
        with torch.inference_mode():
            # pinned host memory, so that the copy does not wait for the batch in flight
            pin = device.startswith("cuda")
            if isinstance(x, torch.Tensor):
                on_device = (x.pin_memory() if pin else x).to(device, non_blocking=True)
            else:  # images of different sizes: one buffer, one copy
                on_device = (x if isinstance(x, PackedImages) else PackedImages.pack(x)).to(device, pin=pin)
            if prepare is not None:
                on_device = prepare(on_device)
            with _autocast(device):
                out = encoder.encode(on_device, products=products)
            if not device.startswith("cuda"):
                return EncodedBatch({p: out[p].float() for p in products})
            # non_blocking device-to-host copies land in pinned memory; the event marks their end
            host = {p: out[p].float().to("cpu", non_blocking=True) for p in products}
            ready = torch.cuda.Event()
            ready.record()
            return EncodedBatch(host, ready)
    except torch.cuda.OutOfMemoryError:
        if len(x) <= min_batch:
            raise
    # out of memory; here the exception and the frames that held the batch's activations are gone
    on_device = out = None
    torch.cuda.empty_cache()
    half = len(x) // 2
    print(f"featurelt extract: CUDA out of memory at batch {len(x)}; retrying as 2 x {half}", file=sys.stderr)
    a = encode_batch(encoder, x[:half], products, device=device, prepare=prepare, min_batch=min_batch)
    b = encode_batch(encoder, x[half:], products, device=device, prepare=prepare, min_batch=min_batch)
    return EncodedBatch({p: torch.from_numpy(np.concatenate([a[p], b[p]])) for p in products})


def encode_batch(encoder: "Encoder", x: "torch.Tensor | list[torch.Tensor] | PackedImages", products: list[str], *, device: str,
                 prepare: Callable[[Any], "torch.Tensor"] | None = None,
                 min_batch: int = 1) -> dict[str, np.ndarray]:
    """Encode ``x`` [B,C,H,W] -> ``{product: float32 array [B, D]}`` (:func:`launch_batch`, then wait)."""
    return launch_batch(encoder, x, products, device=device, prepare=prepare, min_batch=min_batch).result()


def _encoded(batches: Iterable[dict[str, Any]], encoder: "Encoder", products: list[str], *, device: str,
             prepare: Callable[[Any], "torch.Tensor"] | None, times: LoopTimes | None = None
             ) -> Iterator[tuple[dict[str, Any], dict[str, np.ndarray] | None]]:
    """``(batch, {product: vectors})`` for each loader batch, in order (None where the batch has no
    images left). One batch stays in flight: batch i+1 is launched before the outputs of batch i are
    read back, so on CUDA the GPU encodes while the host turns the previous batch into Arrow rows,
    commits and waits for the loader. ``times`` accumulates the images / launch / device seconds."""
    times = times if times is not None else LoopTimes()
    clock = time.perf_counter

    def read_back(job: EncodedBatch | None) -> dict[str, np.ndarray] | None:
        t0 = clock()
        out = job.result() if job is not None else None
        times.device += clock() - t0
        return out

    held: tuple[dict[str, Any], EncodedBatch | None] | None = None
    source = iter(batches)
    while True:
        t0 = clock()
        batch = next(source, None)
        t1 = clock()
        times.images += t1 - t0
        if batch is None:
            break
        job = None if batch["x"] is None else launch_batch(encoder, batch["x"], products, device=device,
                                                           prepare=prepare)
        times.launch += clock() - t1
        if held is not None:
            yield held[0], read_back(held[1])
        held = (batch, job)
    if held is not None:
        yield held[0], read_back(held[1])


def embedding_batch(sample_ids: list[str], views: list[int], strengths: list[float], fingerprint: str,
                    vectors: np.ndarray, dtype: str) -> pa.RecordBatch:
    """Rows of an ``emb_<name>`` table: vector as ``fixed_size_list<float32|float16>[D]``."""
    if vectors.ndim != 2 or vectors.shape[0] != len(sample_ids):
        raise ValueError(f"expected vectors [{len(sample_ids)}, D], got shape={vectors.shape}")
    np_dtype = np.float16 if dtype == "float16" else np.float32
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np_dtype).reshape(-1))
    return pa.RecordBatch.from_arrays(
        [pa.array(sample_ids, pa.string()), pa.array(views, pa.int32()), pa.array(strengths, pa.float32()),
         pa.array([fingerprint] * len(sample_ids), pa.string()),
         pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])],
        names=["sample_id", "view", "aug_strength", "fingerprint", "vector"])


def _new_rows(batch: dict[str, Any], vectors: np.ndarray, done: dict[str, set[int]], fingerprint: str,
             dtype: str) -> pa.RecordBatch | None:
    """The rows of an encoded batch for one product, minus the (sample, view) pairs in ``done``
    (already in the set with this fingerprint); None when nothing is new."""
    sids, vlist, strengths = batch["sample_id"], batch["view"], batch["aug_strength"]
    keep = [i for i, (s, v) in enumerate(zip(sids, vlist)) if v not in done.get(s, ())]
    if not keep:
        return None
    if len(keep) != len(sids):
        sids, vlist, strengths = [sids[i] for i in keep], [vlist[i] for i in keep], [strengths[i] for i in keep]
        vectors = vectors[keep]
    return embedding_batch(sids, vlist, strengths, fingerprint, vectors, dtype)


def _rejects_table(rejects: list[tuple[str, str]], message: str) -> pa.Table:
    """``rejects`` rows of samples that failed to decode: ``(sample_id, reason)`` pairs."""
    return rejects_table(command=message, stage="extract",
                         rows=[{"location": f"samples/{sid}", "sample_id": sid, "reason": r} for sid, r in rejects])


# --------------------------------------------------------------------------- encoder setup
def _build_encoder(encoder_name: str, *, checkpoint: str | None, device: str, map_size: int,
                   image_size: int | None, seed: int, untrained: bool) -> "Encoder":
    from featurelt.encoders import build_encoder

    return build_encoder(encoder_name, checkpoint=checkpoint, device=device, map_size=map_size,
                         image_size=image_size, seed=seed, untrained=untrained)


def _stored_fit_state(store: Store, set_name: str, encoder_name: str, product: str) -> dict[str, Any] | None:
    """The fitted state recorded in the latest provenance row of ``set_name`` (None when there is none)."""
    if not store.has_table("embedding_sets"):
        return None
    rows = store.read("embedding_sets", filter=f"name = {_sql_str(set_name)}").to_pylist()
    for row in sorted(rows, key=lambda r: r["time"], reverse=True):
        if row["encoder"] == encoder_name and row["product"] == product:
            state = json.loads(row["provenance"]).get("fit", {}).get(product)
            if state is not None:
                return state
    return None


def _fit_encoder(store: Store, encoder: "Encoder", products: list[str], sets: dict[str, str], *, batch_size: int,
                 num_workers: int, device: str, limit: int | None) -> list[str]:
    """Fit the products that need it (SAM ``pca_map``, METHODS.md section 2) on the train split, or
    restore the fitted state stored with an existing set's provenance (same basis for later rows)."""
    need = [p for p in products if encoder.requires_fit(p)]
    if not need:
        return []
    for p in list(need):  # a set made earlier keeps its basis: later rows must use the same one
        state = _stored_fit_state(store, sets[p], encoder.name, p)
        if state is not None:
            encoder.load_fit_state(p, state)
            need.remove(p)
    if not need:
        return []
    if store.count("samples", "split = 'train'") == 0:
        raise ValueError(f"encoder {encoder.name} product(s) {need} are fitted on the train split, but store "
                         f"{store.root} has no samples with split 'train'")
    plan = _plan(store, split="train", limit=limit, views=0, done={"fit": {}})
    make_view = _ViewMaker(encoder.transform, views=0, augment=None, seed=0)
    stream = _SampleStream(store.root, plan.samples_version, store.storage_options, plan.positions, plan.needed,
                           make_view, batch_size=batch_size, views=0)

    def batches() -> Iterator["torch.Tensor"]:
        for b in _loader(stream, num_workers=num_workers):
            if b["x"] is not None:
                x = b["x"].to(device)
                yield x if make_view.finish is None else make_view.finish(x)

    import torch

    with torch.inference_mode():
        encoder.fit(batches())
    return need


# --------------------------------------------------------------------------- provenance
def _provenance_rows(encoder: "Encoder", sets: dict[str, str], fingerprints: dict[str, str], added: dict[str, int],
                     *, dtype: str, read_versions: dict[str, int], store_version: int, views: int,
                     augment: str | None, split: str | None, limit: int | None, engine: str,
                     device: str, now: Any, resize_on: str = "host") -> pa.Table:
    """One ``embedding_sets`` row per product; ``now`` (the run's start) is its ``time``."""
    from featurelt import __version__

    base = dict(encoder.provenance())
    rows = []
    for product, set_name in sets.items():
        prov = {**base, "encoder": encoder.name, "product": product, "dim": int(encoder.products[product]),
                "dtype": dtype, "featurelt_version": __version__, "time": now.isoformat() + "Z",
                "store_version_read": store_version, "tables_read": read_versions, "split": split,
                "limit": limit, "views": views, "augment": augment, "engine": engine, "device": device,
                "resize_on": resize_on,
                "command": command_line()}
        if views:
            prov["augmentation"] = {"op": "torchvision.transforms.RandAugment", "num_ops": RANDAUGMENT_NUM_OPS,
                                    "num_magnitude_bins": RANDAUGMENT_BINS,
                                    "magnitude": "round(aug_strength * 30)", "aug_strength": "view / views",
                                    "seed": "sha256(seed:sample_id:view)", "methods": "METHODS.md section 5"}
        rows.append({"name": set_name, "encoder": encoder.name, "product": product,
                     "dim": int(encoder.products[product]), "dtype": dtype, "fingerprint": fingerprints[product],
                     "provenance": json.dumps(prov, sort_keys=True, default=str), "rows": int(added[product]),
                     "time": now})
    return pa.Table.from_pylist(rows, schema=pa.schema([
        ("name", pa.string()), ("encoder", pa.string()), ("product", pa.string()), ("dim", pa.int32()),
        ("dtype", pa.string()), ("fingerprint", pa.string()), ("provenance", pa.string()), ("rows", pa.int64()),
        ("time", pa.timestamp("us"))]))


# --------------------------------------------------------------------------- text embeddings
def _read_classes(store: Store) -> tuple[list[int], list[str]]:
    if not store.has_table("classes"):
        raise StoreError(f"store {store.root} has no classes table; class text embeddings need class names "
                         "(run `featurelt ingest` first)")
    t = store.read("classes", columns=["label", "name"]).sort_by("label")
    return [int(v) for v in t.column("label").to_pylist()], [str(v) for v in t.column("name").to_pylist()]


def read_templates(path: str | os.PathLike[str] | None) -> list[str] | None:
    """Prompt templates from a file, one per line, each with one ``{}`` (blank lines and ``#`` skipped)."""
    if path is None:
        return None
    with open(path, encoding="utf-8") as fh:
        lines = [ln.strip() for ln in fh]
    templates = [ln for ln in lines if ln and not ln.startswith("#")]
    if not templates:
        raise ValueError(f"{path}: no templates (one per line, e.g. 'a photo of a {{}}.')")
    for i, t in enumerate(templates, 1):
        if t.count("{}") != 1:
            raise ValueError(f"{path}: template {i} {t!r} must contain exactly one '{{}}' for the class name")
    return templates


def _text_rows(store: Store, text_encoder: Any, encoder_name: str, set_name: str) -> tuple[pa.Table | None, int, bool]:
    """Rows for ``text_embeddings`` that are missing for this set and fingerprint.

    Returns ``(table or None, rows skipped, replace)``; ``replace`` means the set exists with another
    fingerprint, so its old rows must be deleted first (one set = one encoder configuration).
    """
    labels, names = _read_classes(store)
    fp = text_encoder.fingerprint("embedding")
    done: set[int] = set()
    replace = False
    if store.has_table("text_embeddings"):
        old = store.read("text_embeddings", columns=["label", "fingerprint"], filter=f"set_name = {_sql_str(set_name)}")
        fps = set(old.column("fingerprint").to_pylist())
        if fps and fps != {fp}:
            replace = True
        else:
            done = set(old.column("label").to_pylist())
    todo = [(lab, nm) for lab, nm in zip(labels, names) if lab not in done]
    if not todo:
        return None, len(done), False
    vecs = text_encoder.encode_classes([nm for _, nm in todo])
    vecs = vecs.detach().float().cpu().numpy()
    if vecs.shape[0] != len(todo):
        raise ValueError(f"text encoder {encoder_name} returned {vecs.shape[0]} vectors for {len(todo)} class names")
    templates = getattr(text_encoder, "templates", None) or ["{}"]
    table = pa.table({
        "set_name": [set_name] * len(todo), "encoder": [encoder_name] * len(todo),
        "label": pa.array([lab for lab, _ in todo], pa.int32()), "class_name": [nm for _, nm in todo],
        "templates": [" | ".join(templates)] * len(todo), "dim": pa.array([vecs.shape[1]] * len(todo), pa.int32()),
        "vector": pa.array([v.tolist() for v in vecs], pa.list_(pa.float32())), "fingerprint": [fp] * len(todo)})
    return table, len(done), replace


def _write_text(tx: Any, table: pa.Table | None, set_name: str, replace: bool) -> int:
    if replace:
        tx.delete("text_embeddings", f"set_name = {_sql_str(set_name)}")
    if table is None:
        return 0
    return tx.append("text_embeddings", table)


def extract_text(store: Store, encoder_name: str, *, name: str | None = None, checkpoint: str | None = None,
                 templates: list[str] | str | os.PathLike[str] | None = None, device: str = "auto",
                 seed: int = 0, untrained: bool = False, message: str | None = None) -> TextExtractResult:
    """Class-name text embeddings (METHODS.md sections 1, 3 and 6) into ``text_embeddings``.

    One row per class of the ``classes`` table, for a text encoder (``text:minilm``) or the text
    tower of an image-text encoder (``clip:<model>``), averaged over prompt ``templates`` (a list, or
    a file with one template per line). Labels already embedded with the same fingerprint are
    skipped; a set that exists with another fingerprint is replaced.
    """
    from featurelt.encoders import build_text_encoder

    if isinstance(templates, (str, os.PathLike)):
        templates = read_templates(templates)
    dev = resolve_device(device)
    enc = build_text_encoder(encoder_name, checkpoint=checkpoint, templates=templates, device=dev, seed=seed,
                             untrained=untrained)
    set_name = name or enc.default_set_name()
    table, skipped, replace = _text_rows(store, enc, encoder_name, set_name)
    added = 0
    if table is not None or replace:
        with store.transaction(message) as tx:
            added = _write_text(tx, table, set_name, replace)
    return TextExtractResult(encoder_name, set_name, added, skipped, store.version)


# --------------------------------------------------------------------------- the pipeline
def _progress(total: int, *, enabled: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc=desc, disable=not enabled, dynamic_ncols=True, smoothing=0.1)


def extract(store: Store, encoder_name: str, *, products: Sequence[str] | None = None, name: str | None = None,
            split: str | None = None, limit: int | None = None, batch_size: int = 64, num_workers: int | None = None,
            device: str = "auto", dtype: VecDtype = "float32", views: int = 0, augment: str | None = None,
            strict: bool = False, checkpoint: str | None = None, map_size: int = 16,
            image_size: int | None = None, templates: list[str] | str | os.PathLike[str] | None = None,
            seed: int = 0, untrained: bool = False, engine: Engine = "local", ray_address: str | None = None,
            ray_gpus_per_task: float = 1.0, chunk_rows: int = 16384, commit_seconds: float = 10.0,
            fit_samples: int | None = 4096, resize_on: ResizeOn = "auto", progress: bool = True,
            message: str | None = None) -> ExtractResult:
    """Embed the store's samples with ``encoder_name``; one embedding set per product.

    ``split`` / ``limit``: which samples (the first ``limit`` rows of the split, in store order).
    ``views`` / ``augment``: augmented views, METHODS.md section 5 (see the module docstring).
    ``num_workers``: DataLoader workers decoding images (None: :func:`default_num_workers`).
    ``fit_samples``: products that are fitted (SAM ``pca_map``, METHODS.md section 2) are fitted on
    the first ``fit_samples`` train-split samples (None: all), once per set; later runs reuse the
    state stored in the set's provenance. ``strict``: a sample that fails to decode raises (naming the sample) instead of going to
    ``rejects``. ``chunk_rows`` / ``commit_seconds``: a store transaction every ``chunk_rows``
    samples at most, and at least every ``commit_seconds`` seconds of work (the unit an interrupted
    run keeps; a commit costs about 15 ms on a local disk). ``engine="ray"`` runs the same work as Ray tasks with one commit (``ray_address`` or a
    local Ray with 2 CPUs; tasks encode on CPU, or with ``device="cuda"`` on the cluster's GPUs,
    ``ray_gpus_per_task`` each, decoding in ``num_workers`` DataLoader workers per task).
    ``resize_on``: where images are resized and cropped; ``device`` (:class:`~featurelt.encoders.base.DeviceResize`
    on the encoder's device, in batches, within 2 grey levels of PIL; workers then only decode, which
    is what keeps a GPU fed, and on the CPU PyTorch's uint8 resampling is 2-4x faster than PIL's) or
    ``host`` (PIL's own resize, in the workers: the reference transform exactly); ``auto`` (default):
    ``device`` (for SAM the device resizes the longer side, normalises, then pads).
    Encoders with a text tower (``clip:*``) also write class text
    embeddings when the store has a classes table. Returns an :class:`ExtractResult`.
    """
    from featurelt.encoders import ENCODERS

    spec = ENCODERS.get(encoder_name)
    if spec.kind == "text":
        raise ValueError(f"encoder '{encoder_name}' is a text encoder: use extract_text (CLI: the same "
                         "`featurelt extract` command dispatches to it)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers is not None and num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if commit_seconds < 0:
        raise ValueError(f"commit_seconds must be >= 0, got {commit_seconds}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    if views < 0:
        raise ValueError(f"views must be >= 0, got {views}")
    if views and augment is None:
        raise ValueError(f"--views {views} needs --augment (one of: {', '.join(AUGMENTS)})")
    if augment is not None and augment not in AUGMENTS:
        raise ValueError(f"unknown augment '{augment}'; available: {', '.join(AUGMENTS)}")
    if augment is not None and not views:
        raise ValueError(f"--augment {augment} needs --views N (N >= 1 augmented views per sample)")
    if engine not in ("local", "ray"):
        raise ValueError(f"unknown engine '{engine}'; choose local or ray")
    if resize_on not in ("auto", "host", "device"):
        raise ValueError(f"resize_on must be auto, host or device, got {resize_on!r}")
    if isinstance(templates, (str, os.PathLike)):
        templates = read_templates(templates)
    if store._as_of is not None:
        raise StoreError(f"this Store is pinned to --as-of {store._as_of}; extract writes to the latest version")

    if not ray_gpus_per_task > 0:
        raise ValueError(f"ray_gpus_per_task must be > 0, got {ray_gpus_per_task}")
    _check_split(store, split)
    task_device = "cpu"
    if engine == "ray":
        # Ray: --device auto = CPU tasks; cuda = GPU tasks on the cluster. The driver (encoder build,
        # SAM pca_map fit) uses a local GPU when it has one and the CPU otherwise.
        task_device = "cuda" if device.startswith("cuda") else resolve_device("cpu" if device == "auto" else device)
        dev = resolve_device("auto") if task_device == "cuda" else "cpu"
    else:
        dev = resolve_device(device)
    run_device = task_device if engine == "ray" else dev  # where the images are encoded
    if num_workers is None:  # a CPU encoder uses every core; a GPU needs decoding done in parallel
        num_workers = default_num_workers(run_device)
    resize_on_device = resize_on in ("auto", "device")
    encoder = _build_encoder(encoder_name, checkpoint=checkpoint, device=dev, map_size=map_size,
                             image_size=image_size, seed=seed, untrained=untrained)
    make_view = _ViewMaker(encoder.transform, views=views, augment=augment, seed=seed,
                           resize_on_device=resize_on_device)
    if num_workers and engine == "local":  # its imports overlap the encoder's move, fitting and planning
        _worker_context(make_view, start=True)
    encoder.to(dev)
    prods = list(products) if products else list(encoder.products)
    unknown = [p for p in prods if p not in encoder.products]
    if unknown:
        raise ValueError(f"encoder {encoder_name} has no product(s) {unknown}; products: "
                         f"{', '.join(f'{p} ({d}-d)' for p, d in encoder.products.items())}")
    sets = _set_names(encoder, prods, name)
    read_versions = store.table_versions()
    store_version = store.version
    notes: list[str] = []
    fitted = _fit_encoder(store, encoder, prods, sets, batch_size=batch_size, num_workers=num_workers, device=dev,
                          limit=fit_samples)
    if fitted:
        notes.append(f"fitted {', '.join(fitted)} on the train split")
    fingerprints = {p: encoder.fingerprint(p) for p in prods}
    for p, set_name in sets.items():  # an existing set keeps its dim / dtype: refuse a mismatch up front
        if store.has_table(f"emb_{set_name}"):
            from featurelt.store.schema import embedding_params

            have = embedding_params(store.dataset(f"emb_{set_name}").schema)
            if have != {"dim": int(encoder.products[p]), "dtype": dtype}:
                raise ValueError(f"embedding set '{set_name}' holds {have['dim']}-d {have['dtype']} vectors; this run "
                                 f"makes {encoder.products[p]}-d {dtype}: pass --name for a new set")
    done = {p: _done_views(store, f"emb_{sets[p]}", fingerprints[p]) for p in prods}
    plan = _plan(store, split=split, limit=limit, views=views, done=done)

    text = None
    if spec.has_text:
        if store.has_table("classes"):
            from featurelt.encoders import build_text_encoder

            tenc = build_text_encoder(encoder_name, checkpoint=checkpoint, templates=templates, device=dev,
                                      seed=seed, untrained=untrained)
            tname = tenc.default_set_name() if name is None else name
            text = _text_rows(store, tenc, encoder_name, tname) + (tname,)
        else:
            notes.append("no classes table: class text embeddings not written")

    msg = message or command_line()
    args = (store, encoder, prods, sets, fingerprints, done, plan, make_view)
    common = dict(dtype=dtype, views=views, batch_size=batch_size, num_workers=num_workers, device=dev, strict=strict,
                  chunk_rows=chunk_rows, commit_seconds=commit_seconds, progress=progress, message=msg)
    runner = (_RayRun(*args, **common, ray_address=ray_address, task_device=task_device,
                      ray_gpus_per_task=ray_gpus_per_task) if engine == "ray" else _LocalRun(*args, **common))

    started = utcnow()
    recorded = False  # the run's provenance rows are in the store
    text_pending = text is not None

    def record(tx: Any, added: dict[str, int]) -> int:
        """Provenance rows go in with the first chunk that adds rows and later chunks update their row
        counts, so a run killed midway leaves the provenance of what it committed; class text rows go
        in with the first commit. Returns the text rows written."""
        nonlocal recorded, text_pending
        if any(added.values()) and not recorded:
            tx.append("embedding_sets", _provenance_rows(
                encoder, sets, fingerprints, added, dtype=dtype, read_versions=read_versions,
                store_version=store_version, views=views, augment=augment, split=split, limit=limit,
                engine=engine, device=run_device, now=started,
                resize_on="device" if make_view.resizes_on_device else "host"))
            recorded = True
        elif recorded:
            when = f"TIMESTAMP '{started.isoformat(sep=' ')}'"
            for p, set_name in sets.items():
                tx.update("embedding_sets", {"rows": str(int(added[p]))},
                          where=f"name = {_sql_str(set_name)} AND fingerprint = {_sql_str(fingerprints[p])} "
                                f"AND time = {when}")
        if text_pending and text is not None:
            text_pending = False
            return _write_text(tx, text[0], text[3], text[2])
        return 0

    t0 = time.perf_counter()
    added, embedded, rejected, chunks, text_rows = runner.run(record)
    seconds = time.perf_counter() - t0
    if text is not None and text[0] is None:
        notes.append(f"class text embeddings '{text[3]}' already present")
    return ExtractResult(encoder_name, sets, added, embedded, plan.skipped, rejected, chunks, store.version, seconds,
                         device=run_device, text_rows=text_rows, notes=notes, times=runner.times)


class _LocalRun:
    """The local engine: a DataLoader over the plan, chunked commits.

    A chunk is committed in a background thread while the next one is encoded (Lance writes
    release the GIL; a chunk of 16,384 x 512 float32 rows takes about 0.22 s to write on cpu2, which
    a GPU would otherwise sit out). At most one commit is in flight, chunks commit in order, and an
    interrupted run waits for the commit in flight, so the store keeps every chunk handed over."""

    def __init__(self, store: Store, encoder: "Encoder", products: list[str], sets: dict[str, str],
                 fingerprints: dict[str, str], done: dict[str, dict[str, set[int]]], plan: _Plan,
                 make_view: _ViewMaker, *, dtype: str, views: int, batch_size: int, num_workers: int, device: str,
                 strict: bool, chunk_rows: int, commit_seconds: float, progress: bool, message: str) -> None:
        self.store, self.encoder, self.products, self.sets = store, encoder, products, sets
        self.fingerprints, self.done, self.plan, self.make_view = fingerprints, done, plan, make_view
        self.dtype, self.views, self.batch_size, self.num_workers = dtype, views, batch_size, num_workers
        self.device, self.strict, self.chunk_rows, self.progress, self.message = device, strict, chunk_rows, progress, message
        self.commit_seconds = commit_seconds
        self.times: LoopTimes | None = None  # set by the local engine's run

    def _commit(self, pending: dict[str, list[pa.RecordBatch]], rejects: list[tuple[str, str]],
                record: Callable[[Any, dict[str, int]], int], added: dict[str, int]) -> tuple[int, bool]:
        """One chunk = one store transaction (with the run's provenance rows). Returns the text rows
        written and whether a store version was made."""
        text_rows = 0
        before = self.store.version
        with self.store.transaction(self.message) as tx:
            for p, batches in pending.items():
                if batches:
                    added[p] += tx.append(f"emb_{self.sets[p]}", batches)
            if rejects:
                tx.append("rejects", _rejects_table(rejects, self.message))
            text_rows = record(tx, added)
        return text_rows, self.store.version != before

    def run(self, record: Callable[[Any, dict[str, int]], int]) -> tuple[dict[str, int], int, int, int, int]:
        plan = self.plan
        added = {p: 0 for p in self.products}
        stream = _SampleStream(self.store.root, plan.samples_version, self.store.storage_options, plan.positions,
                               plan.needed, self.make_view, batch_size=self.batch_size, views=self.views)
        pending: dict[str, list[pa.RecordBatch]] = {p: [] for p in self.products}
        rejects: list[tuple[str, str]] = []
        chunk_samples = embedded = rejected = chunks = text_rows = 0
        bar = _progress(len(plan.positions), enabled=self.progress, desc=f"extract {self.encoder.name}")
        last_commit = time.perf_counter()
        committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="featurelt-commit")
        in_flight: Future[tuple[int, bool]] | None = None
        times = self.times = LoopTimes()
        clock = time.perf_counter

        def landed() -> None:  # wait for the commit in flight (raising its error) and count it
            nonlocal in_flight, text_rows, chunks
            if in_flight is not None:
                t0 = clock()
                written, made = in_flight.result()
                times.commit += clock() - t0
                in_flight = None
                text_rows += written
                chunks += int(made)

        try:
            batches = _loader(stream, num_workers=self.num_workers)
            for batch, vecs in _encoded(batches, self.encoder, self.products, device=self.device,
                                        prepare=self.make_view.finish, times=times):
                t_rows = clock()
                if batch["rejects"]:
                    if self.strict:
                        sid, reason = batch["rejects"][0]
                        raise ValueError(f"--strict: sample {sid} failed to decode: {reason}")
                    rejects.extend(batch["rejects"])
                    rejected += len(batch["rejects"])
                if vecs is not None:
                    for p in self.products:
                        rb = _new_rows(batch, vecs[p], self.done[p], self.fingerprints[p], self.dtype)
                        if rb is not None:
                            pending[p].append(rb)
                embedded += batch["embedded"]
                chunk_samples += batch["samples"]
                bar.update(batch["samples"])
                times.rows += clock() - t_rows
                if chunk_samples >= self.chunk_rows or (
                        chunk_samples and time.perf_counter() - last_commit >= self.commit_seconds):
                    landed()
                    in_flight = committer.submit(self._commit, pending, rejects, record, added)
                    pending = {p: [] for p in self.products}
                    rejects = []
                    chunk_samples = 0
                    last_commit = time.perf_counter()
            landed()
            if any(pending.values()) or rejects or chunks == 0:  # chunks == 0: the text rows may be new
                t0 = clock()
                written, made = self._commit(pending, rejects, record, added)
                times.commit += clock() - t0
                text_rows += written
                chunks += int(made)
        finally:
            committer.shutdown(wait=True)  # an interrupted run still lands the chunk it handed over
            bar.close()
        return added, embedded, rejected, chunks, text_rows


# --------------------------------------------------------------------------- Ray engine
def _ray_shard(root: str, storage_options: dict[str, str] | None, samples_version: int, positions: np.ndarray,
               needed: list[tuple[int, ...]], encoder: "Encoder", make_view: _ViewMaker, products: list[str],
               sets: dict[str, str], fingerprints: dict[str, str], done: dict[str, dict[str, set[int]]], *,
               dtype: str, views: int, batch_size: int, device: str = "cpu", num_workers: int = 0) -> dict[str, Any]:
    """One Ray task: decode + encode a shard, write its rows as Lance fragments (no commit).

    On CPU the task decodes and encodes in its own process (one thread: Ray runs one task per CPU);
    on a GPU (``device="cuda"``, the GPU Ray assigned) ``num_workers`` DataLoader workers decode and the
    batches go to the GPU pinned.

    Returns ``{"fragments": {product: [FragmentMetadata]}, "rows": {product: n}, "rejects": [...],
    "embedded": n}``; the driver commits all shards' fragments at once.
    """
    import lance
    import torch

    from featurelt.store.schema import arrow_schema

    stream = _SampleStream(root, samples_version, storage_options, positions, needed, make_view,
                           batch_size=batch_size, views=views)
    if device == "cpu":
        torch.set_num_threads(1)
        batches: Any = stream
    else:
        encoder.to(device)
        batches = _loader(stream, num_workers=num_workers)
    out: dict[str, list[pa.RecordBatch]] = {p: [] for p in products}
    rejects: list[tuple[str, str]] = []
    embedded = 0
    for batch, vecs in _encoded(batches, encoder, products, device=device, prepare=make_view.finish):
        rejects.extend(batch["rejects"])
        embedded += batch["embedded"]
        if vecs is None:
            continue
        for p in products:
            rb = _new_rows(batch, vecs[p], done[p], fingerprints[p], dtype)
            if rb is not None:
                out[p].append(rb)
    frags: dict[str, list[Any]] = {}
    rows: dict[str, int] = {}
    for p in products:
        rows[p] = sum(b.num_rows for b in out[p])
        if not rows[p]:
            frags[p] = []
            continue
        schema = arrow_schema(f"emb_{sets[p]}", dim=int(encoder.products[p]), dtype=dtype)
        table = pa.Table.from_batches(out[p]).cast(schema)
        frags[p] = lance.fragment.write_fragments(table, f"{root}/emb_{sets[p]}.lance", schema=schema,
                                                  storage_options=storage_options)
    return {"fragments": frags, "rows": rows, "rejects": rejects, "embedded": embedded}


def _ray_task_workers(nodes: list[dict[str, Any]], wanted: int, gpus_per_task: float) -> int:
    """DataLoader workers per GPU task such that ``1 + workers`` CPUs fit beside every task on the
    poorest GPU node (a task asking for more CPUs than a node has would wait forever)."""
    per_task = [n["Resources"].get("CPU", 0) / (n["Resources"]["GPU"] // gpus_per_task)
                for n in nodes if n.get("Alive") and n.get("Resources", {}).get("GPU", 0) >= gpus_per_task]
    if not per_task:
        return 0
    return max(0, min(wanted, int(min(per_task)) - 1))


class _RayRun(_LocalRun):
    """The Ray engine: shards as remote tasks writing fragments; one store commit on the driver."""

    def __init__(self, *args: Any, ray_address: str | None, task_device: str, ray_gpus_per_task: float,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ray_address, self.task_device, self.gpus_per_task = ray_address, task_device, ray_gpus_per_task

    def run(self, record: Callable[[Any, dict[str, int]], int]) -> tuple[dict[str, int], int, int, int, int]:
        import ray

        from featurelt.store.schema import arrow_schema

        started = False
        if not ray.is_initialized():
            if self.ray_address:
                ray.init(address=self.ray_address, log_to_driver=False)
            else:
                ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            started = True
        plan = self.plan
        added = {p: 0 for p in self.products}
        try:
            n = len(plan.positions)
            resources = ray.cluster_resources()
            if self.task_device == "cuda":
                gpus = float(resources.get("GPU", 0))
                if gpus < self.gpus_per_task:
                    raise ValueError(f"--device cuda with --engine ray: the Ray cluster "
                                     f"({self.ray_address or 'local'}) has {gpus:g} GPUs, each task needs "
                                     f"{self.gpus_per_task:g} (--ray-gpus-per-task); use --device cpu or a cluster with GPUs")
                slots = int(gpus // self.gpus_per_task)
                task_workers = _ray_task_workers(ray.nodes(), self.num_workers, self.gpus_per_task)
                task = ray.remote(num_cpus=1 + task_workers, num_gpus=self.gpus_per_task)(_ray_shard)
            else:
                slots, task_workers = max(1, int(resources.get("CPU", 1))), 0
                task = ray.remote(num_cpus=1)(_ray_shard)
            n_shards = max(1, min(slots, math.ceil(n / max(self.batch_size, 1)))) if n else 0
            bounds = np.linspace(0, n, n_shards + 1).astype(int) if n_shards else []
            bar = _progress(n, enabled=self.progress, desc=f"extract {self.encoder.name} (ray)")
            rejects: list[tuple[str, str]] = []
            embedded = 0
            with self.store.transaction(self.message) as tx:
                for p in self.products:  # drop leftovers of killed runs before tasks write fragments
                    tx.reconcile(f"emb_{self.sets[p]}")
                enc_ref = ray.put(self.encoder.to("cpu"))
                refs = {task.remote(self.store.root, self.store.storage_options, plan.samples_version,
                                    plan.positions[a:b], plan.needed[a:b], enc_ref, self.make_view, self.products,
                                    self.sets, self.fingerprints, self.done, dtype=self.dtype, views=self.views,
                                    batch_size=self.batch_size, device=self.task_device,
                                    num_workers=task_workers): b - a
                        for a, b in zip(bounds[:-1], bounds[1:]) if b > a}
                results = []
                pending = list(refs)
                while pending:
                    ready, pending = ray.wait(pending, num_returns=1)
                    res = ray.get(ready[0])
                    bar.update(refs[ready[0]])
                    if res["rejects"] and self.strict:
                        sid, reason = res["rejects"][0]
                        raise ValueError(f"--strict: sample {sid} failed to decode: {reason}")
                    results.append(res)
                bar.close()
                for res in results:
                    rejects.extend(res["rejects"])
                    embedded += res["embedded"]
                for p in self.products:
                    frags = [f for res in results for f in res["fragments"][p]]
                    if frags:
                        schema = arrow_schema(f"emb_{self.sets[p]}", dim=int(self.encoder.products[p]), dtype=self.dtype)
                        tx.append_fragments(f"emb_{self.sets[p]}", frags, schema)
                        added[p] = sum(res["rows"][p] for res in results)
                if rejects:
                    tx.append("rejects", _rejects_table(rejects, self.message))
                text_rows = record(tx, added)
        finally:
            if started:
                ray.shutdown()
        return added, embedded, len(rejects), 1, text_rows


__all__ = ["extract", "extract_text", "ExtractResult", "TextExtractResult", "resolve_device", "view_strength",
           "randaugment_magnitude", "read_templates", "encode_batch", "launch_batch", "EncodedBatch",
           "embedding_batch", "AUGMENTS"]
