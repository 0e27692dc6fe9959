"""One loader over store rows: a plan of ``samples`` row offsets -> decoded image batches from DataLoader workers.

Used by ``featurelt extract`` (:mod:`featurelt.extract.batches`) and meant for training on images
(augmentations, sampler plans) without copying or importing from ``extract``::

    loader = StoreImageLoader(store.root, store.dataset("samples").version, store.storage_options,
                              plan, make_image, columns=("sample_id", "label"), num_workers=4,
                              pin_memory=True)
    for batch in loader:           # one LoadedBatch per plan batch, in plan order
        batch.images               # uint8 [B, C, H, W] (channels-last) or PackedImages (mixed sizes)
        batch.columns["label"]     # the requested columns, one value per image
        batch.index                # int64 [B]: each image's position in the whole plan
        batch.extras               # per image: what make_image returned beside the tensor (or None)
        batch.failed               # [(position, sample_id, reason)] of rows that did not give an image

Arguments:

* ``root``, ``samples_version``, ``storage_options``: the store and the pinned Lance version of
  its ``samples`` table; each worker opens the dataset itself at that version.
* ``plan``: an iterable of int64 arrays, one per batch, of row offsets into that dataset (an offset
  may repeat: each occurrence gives its own image, e.g. augmented views or oversampling). It is
  materialised once; worker ``w`` of ``n`` handles batches ``w, w + n, ...`` and batches come back
  in plan order.
* ``make_image(decoded, row, index)``: picklable; ``decoded`` a :class:`~featurelt.images.decode.DecodedImage`
  (the stored bytes or the ``uri``'s file, decoded on demand by torchvision or PIL, PIL's
  decompression-bomb limit applied), ``row`` the row's read columns as a dict (``sample_id``,
  ``image``, ``uri`` and ``columns``), ``index`` the position in the whole plan. Returns a ``[C, H, W]``
  tensor (uint8 from a :class:`~featurelt.images.transforms.HostStage`, or a whole transform's float)
  or ``(tensor, extra)``, e.g. an augmentation's crop box.
* ``num_workers``: DataLoader worker processes (0: in this process). Workers start from a
  ``forkserver`` (Lance is not fork-safe) that preloads torch, PIL and the packages
  ``make_image`` is made of; the plan and ``make_image`` go to them through a temporary file, removed
  when the iteration ends, so that each worker's pickle stays small (see :meth:`StoreImageLoader._spill`).
* ``pin_memory``: the main process pins each batch's images (the image buffer only: DataLoader's own
  pinning walks every list of a batch in Python, holding the GIL); on a machine without CUDA it does nothing.

A row whose bytes cannot be read or decoded, or whose ``make_image`` raises, gives no image: it is
in ``failed`` with ``"<ExceptionType>: <message>"`` (the message names the sample and its uri), so
that callers can write ``rejects`` or raise naming the sample.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:  # torch stays a lazy import here
    import torch

    from featurelt.images.packing import PackedImages

READ_COLUMNS = ("sample_id", "image", "uri")  # what decoding needs from a samples row
PRELOAD = ["torch", "torchvision.transforms", "PIL.Image", "numpy", "pyarrow", "pandas"]


@dataclass
class LoadedBatch:
    """The images one plan batch gave, in plan order, and the rows that gave none."""

    batch: int  # number of the plan batch (0-based)
    images: "torch.Tensor | PackedImages | None"  # [B, C, H, W] (one size) or PackedImages; None when no row gave one
    index: np.ndarray  # int64 [B]: position of each image in the whole plan
    columns: dict[str, list[Any]]  # requested column -> one value per image
    extras: list[Any]  # per image: make_image's second value (None when it returned a tensor)
    failed: list[tuple[int, str | None, str]] = field(default_factory=list)  # (position, sample_id, reason)

    def __len__(self) -> int:
        return len(self.index)


def load_batch(ds: Any, offsets: np.ndarray, start: int, make_image: Callable[..., Any], columns: Sequence[str],
               batch: int = 0) -> LoadedBatch:
    """Read one plan batch from the Lance dataset ``ds`` with one ``take`` (sorted unique offsets),
    decode each row once and make one image per plan entry, in plan order. ``start``: the plan
    position of the batch's first entry."""
    from featurelt.images.decode import DecodedImage
    from featurelt.images.packing import collate

    read = list(dict.fromkeys([*READ_COLUMNS, *columns]))
    uniq, inverse = np.unique(offsets, return_inverse=True)
    rows = ds.take(uniq.tolist(), columns=read).to_pylist()
    decoded: dict[int, DecodedImage | Exception] = {}
    images, index, extras = [], [], []
    cols: dict[str, list[Any]] = {c: [] for c in columns}
    failed: list[tuple[int, str | None, str]] = []
    for j, u in enumerate(inverse.tolist()):
        row, pos = rows[u], start + j
        try:
            if u not in decoded:
                try:
                    decoded[u] = DecodedImage.of_row(row)
                except Exception as exc:  # noqa: BLE001  (kept: every entry of the row fails with it)
                    decoded[u] = exc
            d = decoded[u]
            if isinstance(d, Exception):
                raise d
            out = make_image(d, row, pos)
        except Exception as exc:  # a bad image must not stop the loader: the caller decides
            failed.append((pos, row.get("sample_id"), f"{type(exc).__name__}: {exc}"))
            continue
        tensor, extra = out if isinstance(out, tuple) else (out, None)
        images.append(tensor)
        extras.append(extra)
        index.append(pos)
        for c in columns:
            cols[c].append(row[c])
    return LoadedBatch(batch, collate(images) if images else None, np.asarray(index, dtype=np.int64), cols, extras,
                       failed)


class _Shard:
    """The picklable iterable each worker runs: its share of the plan batches, read and made into images."""

    def __init__(self, root: str, samples_version: int, storage_options: dict[str, str] | None,
                 plan: list[np.ndarray], make_image: Callable[..., Any], columns: Sequence[str]) -> None:
        self.root, self.samples_version, self.storage_options = root, samples_version, storage_options
        self.plan: list[np.ndarray] | None = plan
        self.make_image: Callable[..., Any] | None = make_image
        self.columns = tuple(columns)
        self.plan_file: str | None = None  # set: plan and make_image are in this file, not in the pickle

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.plan_file is not None:
            state["plan"] = state["make_image"] = None
        return state

    def __iter__(self) -> Iterator[LoadedBatch]:
        import lance
        from torch.utils.data import get_worker_info

        if self.plan is None:  # in a worker: the plan is in the file
            with open(self.plan_file, "rb") as f:  # type: ignore[arg-type]
                self.plan, self.make_image = pickle.load(f)
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        ds = lance.dataset(f"{self.root}/samples.lance", version=self.samples_version,
                           storage_options=self.storage_options)
        rows = ds.count_rows()
        start = 0
        for b, offsets in enumerate(self.plan):
            if b % nw == wid:
                if len(offsets) and (offsets.min() < 0 or offsets.max() >= rows):
                    bad = int(offsets.min() if offsets.min() < 0 else offsets.max())
                    raise ValueError(f"plan batch {b}: row offset {bad} is out of range: samples version "
                                     f"{self.samples_version} has {rows} rows")
                yield load_batch(ds, offsets, start, self.make_image, self.columns, b)  # type: ignore[arg-type]
            start += len(offsets)


class StoreImageLoader:
    """Iterable of :class:`LoadedBatch`: the images of ``plan``'s rows of the pinned ``samples``
    table (see the module docstring for every argument)."""

    def __init__(self, root: str, samples_version: int, storage_options: dict[str, str] | None,
                 plan: Iterable[np.ndarray], make_image: Callable[..., Any], *, columns: Sequence[str] = ("sample_id",),
                 num_workers: int = 0, pin_memory: bool = False, prefetch_factor: int = 4) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.plan = [np.asarray(b, dtype=np.int64) for b in plan]
        self.shard = _Shard(str(root), samples_version, storage_options, self.plan, make_image, columns)
        self.make_image = make_image
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor

    def __len__(self) -> int:
        """Plan batches (each gives one :class:`LoadedBatch`, possibly without images)."""
        return len(self.plan)

    def _spill(self, shard: _Shard) -> Callable[[], None]:
        """Put the plan and ``make_image`` in a temporary file that the pickles of ``shard`` refer
        to; returns the function that removes it. The parent writes each worker's pickle into a pipe
        that the worker reads after its imports, so a pickle larger than the pipe (64 KiB) would make
        the workers start one after another (0.8 s each on a 16-core GPU machine)."""
        fd, shard.plan_file = tempfile.mkstemp(prefix="featurelt-plan-", suffix=".pkl")
        with os.fdopen(fd, "wb") as f:
            pickle.dump((shard.plan, shard.make_image), f, protocol=pickle.HIGHEST_PROTOCOL)
        path = shard.plan_file
        return lambda: os.path.exists(path) and os.remove(path)

    def __iter__(self) -> Iterator[LoadedBatch]:
        for batch in self._batches():
            if self.pin_memory and batch.images is not None:
                batch.images = _pinned(batch.images)
            yield batch

    def _batches(self) -> Iterator[LoadedBatch]:
        if self.num_workers == 0:
            yield from self.shard
            return
        import copy

        from torch.utils.data import DataLoader

        ctx = worker_context(self.make_image)
        shard = copy.copy(self.shard)
        remove = self._spill(shard)
        try:
            yield from DataLoader(__getattr__("_TorchShard")(shard), batch_size=None, num_workers=self.num_workers,
                                  collate_fn=_as_is, prefetch_factor=self.prefetch_factor, persistent_workers=False,
                                  multiprocessing_context=ctx)
        finally:
            remove()


def _pinned(images: "torch.Tensor | PackedImages") -> "torch.Tensor | PackedImages":
    import torch

    from featurelt.images.packing import PackedImages

    if not torch.cuda.is_available():
        return images
    if isinstance(images, PackedImages):
        return PackedImages(images.data.pin_memory(), images.shapes)
    return images.pin_memory()


def _as_is(batch: LoadedBatch) -> LoadedBatch:
    """DataLoader's collate function here: batches are made by the shard."""
    return batch


def _packages_of(obj: Any, depth: int = 0) -> set[str]:
    """Top-level packages of the classes a picklable transform is made of (``Compose`` steps,
    ``HostStage.pil_steps``, a ``preprocess`` / ``transform`` attribute, the object of a bound
    method), e.g. ``{"open_clip", "torchvision"}``."""
    found = {type(obj).__module__.split(".")[0]}
    if depth < 4:
        children = list(getattr(obj, "transforms", None) or [])
        children += [c for c in (getattr(obj, a, None) for a in ("pil_steps", "__self__", "preprocess", "transform"))
                     if c is not None]
        for child in children:
            found |= _packages_of(child, depth + 1)
    return found - {"builtins"}


def worker_context(make_image: Any, *, start: bool = False) -> Any:
    """The multiprocessing context of loader workers: ``forkserver`` (Lance is not fork-safe) where
    there is one, else ``spawn``. ``start``: start the fork server now, so that its imports run while
    the main process does other work (it is started once per process and kept)."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    # the fork server imports these once (torch ~2 s, open_clip ~1 s when its transform classes are used,
    # pandas 0.4 s for lance), so that each worker does not. lance itself must not be loaded in a process
    # that forks: each worker imports it
    extra = _packages_of(make_image) - {"featurelt", "torch", "torchvision", "PIL"}
    ctx.set_forkserver_preload(PRELOAD + sorted(extra))
    if start:
        from multiprocessing import forkserver

        forkserver.ensure_running()
    return ctx


def _make_torch_shard_class() -> type:
    from torch.utils.data import IterableDataset

    class _TorchShard(IterableDataset):
        """torch ``IterableDataset`` wrapper of :class:`_Shard` (built lazily: torch is imported only
        when loading; module ``__getattr__`` rebuilds it when a worker process unpickles it)."""

        def __init__(self, inner: _Shard) -> None:
            self.inner = inner

        def __iter__(self) -> Iterator[LoadedBatch]:
            return iter(self.inner)

    _TorchShard.__module__ = __name__
    _TorchShard.__qualname__ = "_TorchShard"
    return _TorchShard


def __getattr__(name: str) -> Any:  # PEP 562: lazily defined torch classes
    if name == "_TorchShard":
        cls = _make_torch_shard_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
