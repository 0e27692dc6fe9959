"""Cached embeddings -> numpy: embedding sets joined on ``sample_id``, text embeddings by label.

Heads never see images: they read the ``emb_<name>`` tables written by ``featurelt extract`` at the
store version the :class:`~featurelt.store.Store` is pinned to. ``load_features`` reads the samples
of one split (sample_id, label, source), then streams every embedding set in Arrow batches and
scatters each batch into a preallocated float32 matrix by the position of its ``sample_id`` -- an
inner join on ``sample_id`` whose memory is the output matrix plus one batch, whatever the table size.
Rows are ordered by ``sample_id`` so that the order does not depend on how Lance laid out fragments.

When the joined matrix would not fit in RAM (``stream="auto"``: more than ``MEMORY_FRACTION`` of the
memory available now; or ``stream="always"``), ``load_features`` reads only ``sample_id, view`` of each
set and returns a :class:`StoreRows` in place of ``x``: for every sample (and view) it holds the row
offset of its vector in each pinned Lance dataset, and reads the vectors of a batch of rows with
``LanceDataset.take`` when asked. Memory is then O(N) row offsets, not O(N x D) floats.

No torch here: heads convert the numpy arrays themselves.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    from featurelt.store import Store

SCAN_BATCH = 16384  # rows per streamed Arrow batch
MEMORY_FRACTION = 0.5  # stream="auto" reads rows from the store when the matrix needs more of the available RAM
StreamMode = Literal["auto", "always", "never"]
STREAM_MODES: tuple[str, ...] = ("auto", "always", "never")


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" when there is no limit


def available_memory() -> int:
    """Bytes of RAM available to new allocations now: Linux ``MemAvailable``, capped by the container's
    cgroup limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``) minus its usage; elsewhere the
    physical memory (``sysconf``)."""
    free = None
    try:
        with open("/proc/meminfo") as f:
            free = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None)
    except OSError:
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None:
            room = max(0, limit - usage)
            free = room if free is None else min(free, room)
            break
    if free is not None:
        return free
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def non_finite_message(name: str, sample_id: str) -> str:
    return (f"embedding set '{name}' has a NaN or infinite value in the vector of sample {sample_id}: "
            f"re-extract it (featurelt extract) or leave the set out of --features")


class StoreRows:
    """Features of a split left in the store: ``[N, D_total]`` (view 0) read by row on demand.

    ``positions[i]`` is ``[N, V]`` int64: the row offset (``LanceDataset.take`` index) of sample n's view v
    in the pinned dataset of set i. Indexing (``rows[a:b]``, ``rows[index_array]``) and :meth:`take`
    return float32 numpy arrays; :meth:`subset` keeps a lazy selection of samples.
    """

    def __init__(self, datasets: list[Any], positions: list[np.ndarray], dims: tuple[int, ...],
                 sample_ids: np.ndarray | None = None, names: tuple[str, ...] | None = None) -> None:
        self.datasets = datasets
        self.positions = positions
        self.dims = dims
        self.sample_ids = sample_ids  # [N] str, to name a sample with a non-finite vector
        self.names = names            # embedding set names, in block order
        self.offsets = np.concatenate([[0], np.cumsum(dims)]).astype(int)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.positions[0].shape[0]), int(self.offsets[-1]))

    @property
    def num_views(self) -> int:
        return int(self.positions[0].shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, rows: np.ndarray, view: np.ndarray | None = None) -> np.ndarray:
        """``[B, D_total]`` float32 vectors of samples ``rows`` (view ``view[b]``, default view 0)."""
        rows = np.asarray(rows, dtype=np.int64)
        views = 0 if view is None else np.asarray(view, dtype=np.int64)
        out = np.empty((len(rows), self.shape[1]), dtype=np.float32)
        for i, (ds, pos) in enumerate(zip(self.datasets, self.positions)):
            wanted = pos[rows, views]
            # each distinct row once, in file order (Lance reads sorted offsets fastest); then scatter back
            uniq, inverse = np.unique(wanted, return_inverse=True)
            table = ds.take(uniq, columns=["vector"])
            block = _vectors(table)[inverse]
            if not np.isfinite(block).all():
                bad = int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
                name = self.names[i] if self.names else f"#{i}"
                sid = self.sample_ids[rows[bad]] if self.sample_ids is not None else f"row {int(rows[bad])}"
                raise ValueError(non_finite_message(name, str(sid)))
            out[:, self.offsets[i]:self.offsets[i + 1]] = block
        return out

    def __getitem__(self, key: int | slice | np.ndarray) -> np.ndarray:
        """Rows like a ``[N, D_total]`` array: ``x[i]`` -> ``[D]``, ``x[a:b]`` / ``x[index_array]`` -> ``[B, D]``."""
        if isinstance(key, (int, np.integer)):
            return self.take(np.array([range(len(self))[key]]))[0]
        if isinstance(key, slice):
            r = range(len(self))[key]
            return self.take(np.arange(r.start, r.stop, r.step))
        return self.take(np.arange(len(self))[key])

    def subset(self, rows: np.ndarray) -> "StoreRows":
        """The samples ``rows`` (index array or boolean mask), still lazy."""
        return StoreRows(self.datasets, [p[rows] for p in self.positions], self.dims,
                         None if self.sample_ids is None else self.sample_ids[rows], self.names)


@dataclass(frozen=True)
class FeatureSet:
    """Features of one split: ``N`` samples, embedding sets concatenated in the order asked for."""

    sample_ids: np.ndarray          # [N] str, sorted
    labels: np.ndarray              # [N] int64 class labels
    source: np.ndarray              # [N] str: original | auxiliary | generated
    x: np.ndarray | StoreRows       # [N, D_total] float32, view 0, blocks concatenated in `sets` order
    sets: tuple[str, ...]           # embedding set names, in block order
    dims: tuple[int, ...]           # D of each block (sum = D_total)
    views: np.ndarray | StoreRows | None = None  # [N, V, D_total] float32, view 0 first (views=True only);
                                                 # streamed: the same StoreRows as x (take(rows, view))
    view_strength: np.ndarray | None = None  # [N, V] float32 aug_strength of each view (0 for view 0)

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def streamed(self) -> bool:
        """True when ``x`` is a :class:`StoreRows` (vectors stay in the store, read per batch)."""
        return isinstance(self.x, StoreRows)

    def select(self, mask: np.ndarray) -> "FeatureSet":
        """The samples where ``mask`` is True (lazy when streamed)."""
        idx = np.flatnonzero(mask)
        x = self.x.subset(idx) if isinstance(self.x, StoreRows) else self.x[idx]
        views = None if self.views is None else (
            self.views.subset(idx) if isinstance(self.views, StoreRows) else self.views[idx])
        return FeatureSet(sample_ids=self.sample_ids[idx], labels=self.labels[idx], source=self.source[idx], x=x,
                          sets=self.sets, dims=self.dims, views=views,
                          view_strength=None if self.view_strength is None else self.view_strength[idx])


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _check_set(store: "Store", name: str) -> str:
    table = f"emb_{name}"
    if not store.has_table(table):
        have = ", ".join(store.embedding_sets()) or "(none: run `featurelt extract` first)"
        raise ValueError(f"embedding set '{name}' (table {table}) does not exist in store {store.root} at version "
                         f"{store.version}; embedding sets: {have}")
    return table


LATEST_FINETUNED = "ft_latest"


def resolve_set_names(store: "Store", names: list[str] | tuple[str, ...]) -> list[str]:
    """Embedding set names with ``ft_latest`` replaced by the newest ``featurelt finetune --export`` set
    (``ft_<run_id>``, newest ``embedding_sets.time``) at the store's pinned version; other names unchanged.
    Job files chain a fine-tune and its head this way (stage 1 -> export -> ``train-head --features ft_latest``)."""
    if LATEST_FINETUNED not in names:
        return list(names)
    sets = store.read("embedding_sets", columns=["name", "time"]) if store.has_table("embedding_sets") else None
    ft = [] if sets is None else sorted((t, n) for n, t in zip(sets.column("name").to_pylist(), sets.column("time").to_pylist())
                                        if n.startswith("ft_") and n != LATEST_FINETUNED)
    if not ft:
        raise ValueError(f"--features {LATEST_FINETUNED}: the store has no fine-tuned embedding set at version "
                         f"{store.version} (run `featurelt finetune ... --export` first)")
    return [ft[-1][1] if n == LATEST_FINETUNED else n for n in names]


def load_samples(store: "Store", *, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(sample_ids [N] str sorted, labels [N] int64, source [N] str)`` of the samples in ``split``."""
    if not store.has_table("samples"):
        raise ValueError(f"store {store.root} has no samples table: run `featurelt ingest` first")
    t = store.read("samples", columns=["sample_id", "label", "source"], filter=f"split = {_sql_str(split)}")
    if t.num_rows == 0:
        splits = store.sql("SELECT DISTINCT split FROM samples ORDER BY 1").column(0).to_pylist()
        raise ValueError(f"split '{split}' has no samples in store {store.root} at version {store.version}; "
                         f"splits: {', '.join(splits)}")
    ids = t.column("sample_id").to_numpy(zero_copy_only=False).astype(str)
    order = np.argsort(ids, kind="stable")  # numpy's string order: the one np.searchsorted assumes
    ids = ids[order]
    if (ids[1:] == ids[:-1]).any():
        raise ValueError(f"samples table has duplicate sample_id values in split '{split}'")
    return (ids, t.column("label").to_numpy().astype(np.int64)[order],
            t.column("source").to_numpy(zero_copy_only=False).astype(str)[order])


def _vectors(batch: pa.RecordBatch | pa.Table) -> np.ndarray:
    """``[n, D]`` float32 from a ``fixed_size_list<float16|float32>[D]`` column."""
    col = batch.column("vector")
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    flat = col.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(col), col.type.list_size).astype(np.float32, copy=False)


def _positions_in(ids: np.ndarray, sample_ids: pa.Array) -> np.ndarray:
    """Position of each of ``sample_ids`` in the sorted ``ids`` (-1 where absent): a binary search, so a
    batch costs O(B log N) however large the split."""
    query = sample_ids.to_numpy(zero_copy_only=False).astype(str)
    pos = np.searchsorted(ids, query)
    found = pos < len(ids)
    found[found] = ids[pos[found]] == query[found]
    return np.where(found, pos, -1)


def load_features(store: "Store", sets: list[str] | tuple[str, ...], *, split: str, views: bool = False,
                  batch_size: int = SCAN_BATCH, stream: StreamMode = "auto",
                  memory_fraction: float = MEMORY_FRACTION) -> FeatureSet:
    """Embedding sets of the samples in ``split``, inner-joined on ``sample_id`` (ARCHITECTURE.md).

    sets: embedding set names (tables ``emb_<name>``), concatenated in this order.
    views: also return every view (``[N, V, D_total]``, view 0 first, for the momentum sampler of
        METHODS.md section 5); every sample must then have the same views in every set.
    stream: ``never`` reads the vectors into memory; ``always`` leaves them in the store
        (``x`` and ``views`` are a :class:`StoreRows`); ``auto`` streams when the matrix would take more
        than ``memory_fraction`` of :func:`available_memory`.
    Raises ``ValueError`` for an unknown set (listing the sets that exist) and when a set lacks vectors
    for samples of the split (naming the set, the count and a few ids), rather than dropping rows.
    """
    if not sets:
        raise ValueError("no embedding sets given (--features NAME[,NAME...])")
    if stream not in STREAM_MODES:
        raise ValueError(f"stream must be one of {', '.join(STREAM_MODES)}, got {stream!r}")
    tables = [_check_set(store, s) for s in sets]
    ids, labels, source = load_samples(store, split=split)
    n = len(ids)

    dims = [store.dataset(table).schema.field("vector").type.list_size for table in tables]
    offsets = np.concatenate([[0], np.cumsum(dims)]).astype(int)
    n_views = 1
    if views:
        counts = [store.sql(f"SELECT max(view) AS v FROM {t}").column(0)[0].as_py() for t in tables]
        n_views = 1 + int(max(c or 0 for c in counts))
    nbytes = n * n_views * int(offsets[-1]) * 4
    streamed = stream == "always" or (stream == "auto" and nbytes > memory_fraction * available_memory())
    # streamed: scan only sample_id / view of every row (no filter, so that the running row count is
    # the LanceDataset.take offset); in memory: scan the vectors too and scatter them into x
    x = None if streamed else np.zeros((n, n_views, int(offsets[-1])), dtype=np.float32)
    positions = [np.full((n, n_views), -1, dtype=np.int64) for _ in tables] if streamed else []
    strength = np.zeros((n, n_views), dtype=np.float32)
    columns = ["sample_id", "view"] + (["aug_strength"] if views else []) + ([] if streamed else ["vector"])
    filt = None if views or streamed else "view = 0"
    for i, (name, table) in enumerate(zip(sets, tables)):
        seen = np.zeros((n, n_views), dtype=bool)
        first_row = 0  # row offset of the batch in the dataset (streamed: no filter)
        for batch in store.scan(table, columns=columns, filter=filt, batch_size=batch_size):
            pos = _positions_in(ids, batch.column("sample_id"))
            view = batch.column("view").to_numpy()
            keep = (pos >= 0) & (view < n_views) & (view >= 0)
            if keep.any():
                rows, v = pos[keep].astype(np.int64), view[keep].astype(np.int64)
                if streamed:
                    positions[i][rows, v] = first_row + np.flatnonzero(keep)
                else:
                    x[rows, v, offsets[i]:offsets[i + 1]] = _vectors(batch)[keep]  # type: ignore[index]
                seen[rows, v] = True
                if views:
                    strength[rows, v] = batch.column("aug_strength").to_numpy()[keep]
            first_row += batch.num_rows
        if not streamed:  # one vectorised pass per set: name the first sample (in sample_id order) with a bad value
            finite = np.isfinite(x[:, :, offsets[i]:offsets[i + 1]]).all(axis=(1, 2))  # type: ignore[index]
            if not finite.all():
                raise ValueError(non_finite_message(name, str(ids[np.flatnonzero(~finite)[0]])))
        missing = ~seen.all(axis=1)
        if missing.any():
            examples = ", ".join(ids[missing][:3])
            what = f"all {n_views} views" if views else "a view-0 vector"
            raise ValueError(f"embedding set '{name}' lacks {what} for {int(missing.sum())} of {n} samples in split "
                             f"'{split}' (e.g. {examples}); extract them first: featurelt extract ... "
                             f"(store {store.root}, version {store.version})")
    if streamed:
        rows_ = StoreRows([store.dataset(t) for t in tables], positions, tuple(dims), ids, tuple(sets))
        return FeatureSet(sample_ids=ids, labels=labels, source=source, x=rows_, sets=tuple(sets), dims=tuple(dims),
                          views=rows_ if views else None, view_strength=strength if views else None)
    return FeatureSet(sample_ids=ids, labels=labels, source=source, x=np.ascontiguousarray(x[:, 0]),  # type: ignore[index]
                      sets=tuple(sets), dims=tuple(dims), views=x if views else None,
                      view_strength=strength if views else None)


def text_sets(store: "Store") -> list[str]:
    """Names of the text embedding sets in the store (``text_embeddings.set_name``)."""
    if not store.has_table("text_embeddings"):
        return []
    return store.sql("SELECT DISTINCT set_name FROM text_embeddings ORDER BY 1").column(0).to_pylist()


def load_text_embeddings(store: "Store", set_name: str, *, num_classes: int | None = None) -> np.ndarray:
    """``[K, D]`` float32 class text embeddings of ``set_name``, row y = class label y (METHODS.md section 1, 6).

    num_classes: the K the caller needs (every label 0..K-1 must be present); default: labels present
    must be exactly 0..max label.

    Every use of class text by a head goes through here, so this is where a set whose class names are all
    label numbers (``"0"``, ``"1"``, ...: integer labels that were never named) is refused: its vectors
    embed the numbers, not the classes.
    """
    from featurelt.data.classnames import HOW_TO_NAME, unnamed

    have = text_sets(store)
    if set_name not in have:
        raise ValueError(f"text embedding set '{set_name}' does not exist in store {store.root} at version "
                         f"{store.version}; text sets: {', '.join(have) or '(none: run `featurelt extract text:...`)'}")
    t = store.read("text_embeddings", columns=["label", "class_name", "vector"],
                   filter=f"set_name = {_sql_str(set_name)}")
    t = t.sort_by("label")
    names = t.column("class_name").to_pylist()
    if unnamed(names):
        shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
        raise ValueError(f"text embedding set '{set_name}' embeds class names that are only label numbers ({shown}): "
                         f"the classes have no names, so text would describe numbers, not classes; {HOW_TO_NAME}, then run `featurelt extract text:...` again")
    labels = t.column("label").to_numpy().astype(np.int64)
    k = num_classes if num_classes is not None else int(labels.max()) + 1
    if len(np.unique(labels)) != len(labels):
        raise ValueError(f"text embedding set '{set_name}' has several rows for one label")
    absent = sorted(set(range(k)) - set(labels.tolist()))
    if absent:
        raise ValueError(f"text embedding set '{set_name}' lacks labels {absent[:10]} (needs 0..{k - 1}); "
                         f"re-run the text extraction after the classes changed")
    rows = t.filter(pc.less(t.column("label"), k))
    vecs = rows.column("vector").to_pylist()
    dims = {len(v) for v in vecs}
    if len(dims) != 1:
        raise ValueError(f"text embedding set '{set_name}' mixes vector lengths {sorted(dims)}")
    return np.asarray(vecs, dtype=np.float32)


__all__ = ["FeatureSet", "StoreRows", "available_memory", "load_features", "load_samples", "load_text_embeddings", "text_sets"]
