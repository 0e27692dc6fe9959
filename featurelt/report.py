"""HTML reports of train-head runs: figures (matplotlib, PNG) and tables of numbers read from the store.

``write_report(store, run_id, compare=[...], out_dir=DIR)`` writes ``DIR/index.html``, one PNG per
figure and ``DIR/report.json`` (the same numbers, for scripts). Every number comes from SQL over the
store, so the page agrees with ``featurelt sql``:

- the per-bucket table is the ``runs`` row of each run as stored (acc_all / many / medium / few,
  macro-F1, head-tail gap), beside the same accuracies recomputed from ``predictions`` joined to
  ``classes`` (a consistency check);
- per-class accuracy is ``predictions`` joined to ``classes`` on the evaluation split;
- the confusion matrix counts ``(label, prediction)`` pairs of the evaluation split.

Figures: per-class accuracy against train count (log x, bucket regions shaded), accuracy per bucket
comparing runs (x labels with each bucket's classes and train images) beside macro-F1 on its own axis,
one row-normalised confusion matrix per run (the most confused classes when there are many, the same
classes in every run's), a 2-D projection (PCA, or UMAP when ``umap-learn`` is installed) of an
embedding set coloured by bucket, computed on at most ``max_points`` evaluation samples streamed from
the store, and a panel of few-shot examples: a test image of each few class shown, the run's prediction
and its nearest train images (exact cosine over the embedding set with :class:`featurelt.index.VectorIndex`),
decoded from the ``samples`` table (stored bytes or uri). Legends name each run's head, loss, sampler
and feature sets. The HTML runs table shows the main columns and folds the rest.
Buckets follow METHODS.md section 0 (thresholds stored in the classes table).
"""
from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from featurelt.store import Store

BUCKETS = ("many", "medium", "few")
BUCKET_COLORS = {"many": "#3b6fb6", "medium": "#e0892b", "few": "#c43c4b"}
# columns of the runs table shown as the per-bucket comparison (order = table order)
METRIC_COLUMNS = ("acc_all", "acc_many", "acc_medium", "acc_few", "macro_f1", "head_tail_gap")
RUN_COLUMNS = ("run_id", "time", "head", "loss", "sampler", "features", "epochs", "seed", "train_seconds",
               *METRIC_COLUMNS, "checkpoint", "config", "pinned_versions")
# bar chart groups: (label, runs column)
BAR_GROUPS = (("all", "acc_all"), ("many", "acc_many"), ("medium", "acc_medium"), ("few", "acc_few"),
              ("macro-F1", "macro_f1"))
RUN_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
              "#bcbd22", "#17becf")
RUN_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")

ProjectionMethod = Literal["auto", "pca", "umap"]


def sql_literal(value: str) -> str:
    """A SQL string literal (single quotes doubled)."""
    return "'" + str(value).replace("'", "''") + "'"


def _plain(value: Any) -> Any:
    """JSON-friendly scalar (timestamps as ISO text, NaN as null)."""
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return value


def fmt(value: Any) -> str:
    """How a number appears in the HTML tables: floats with 4 decimals (as ``featurelt sql`` prints)."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


# ====================================================================== numbers from the store
@dataclass
class ReportData:
    """Everything a report shows, read from the store (also what ``report.json`` holds)."""

    store_root: str
    store_version: int
    run_ids: list[str]                      # [run_id, *compare]
    runs: list[dict[str, Any]]              # runs rows (RUN_COLUMNS), in run_ids order
    eval_split: str                         # split of the primary run's predictions shown
    bucket_thresholds: dict[str, int]       # {"bucket_many": .., "bucket_few": ..}
    bucket_sizes: list[dict[str, Any]]      # bucket, classes, train_images, eval_images, caption
    bucket_from_predictions: list[dict[str, Any]]  # run_id, bucket, n, correct, accuracy
    per_class: dict[str, list[dict[str, Any]]]      # run_id -> label, name, train_count, bucket, n, correct, accuracy
    # run_id -> labels, names (matrix rows / columns), counts [K, K] (rows = true label), shown_labels (the
    # classes drawn: the same for every run when they share the labels), top (the most frequent confusions)
    confusion: dict[str, dict[str, Any]]
    projection: dict[str, Any] = field(default_factory=dict)
    # embedding_set, split, k, rows: [{sample_id, label, name, train_count, prediction, predicted_name,
    # neighbors: [{sample_id, label, name, cosine}]}]: few-shot test images and their nearest train images
    examples: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


LATEST_RUN = re.compile(r"latest(?:~(\d+))?")


def resolve_run_id(store: "Store", ref: str) -> str:
    """The run id ``ref`` names: ``latest`` is the newest run of the ``runs`` table (by ``time``; the
    store as pinned by ``--as-of``), ``latest~N`` the one N runs before it; any other text is returned as
    given (an id, checked where it is used). ``ValueError`` when there are no runs or fewer than N + 1."""
    m = LATEST_RUN.fullmatch(ref.strip())
    if m is None:
        return ref
    back = int(m.group(1) or 0)
    n_runs = store.sql("SELECT count(*) FROM runs").column(0)[0].as_py() if store.has_table("runs") else 0
    if n_runs == 0:
        raise ValueError(f"run '{ref}': store {store.root} has no runs yet; train a head first (featurelt train-head)")
    if back >= n_runs:
        raise ValueError(f"run '{ref}': the store has {n_runs} run(s), so the oldest is latest~{n_runs - 1} "
                         "(see featurelt runs)")
    q = f"SELECT run_id FROM runs ORDER BY time DESC, run_id DESC LIMIT 1 OFFSET {back}"
    return store.sql(q).column(0)[0].as_py()


def load_runs(store: "Store", run_ids: list[str]) -> list[dict[str, Any]]:
    """``runs`` rows of ``run_ids`` in that order; ``ValueError`` names the runs that do not exist."""
    if not store.has_table("runs"):
        raise ValueError(f"store {store.root} has no runs table yet; train a head first (featurelt train-head)")
    ids = ", ".join(sql_literal(r) for r in run_ids)
    rows = store.sql(f"SELECT {', '.join(RUN_COLUMNS)} FROM runs WHERE run_id IN ({ids})").to_pylist()
    by_id = {r["run_id"]: {k: _plain(v) for k, v in r.items()} for r in rows}
    missing = [r for r in run_ids if r not in by_id]
    if missing:
        known = [r["run_id"] for r in store.sql("SELECT run_id FROM runs ORDER BY time DESC LIMIT 20").to_pylist()]
        raise ValueError(f"unknown run id(s) {', '.join(missing)}; latest runs: {', '.join(known) or '(none)'}")
    return [by_id[r] for r in run_ids]


def evaluation_split(store: "Store", run_id: str) -> str:
    """The split a run's predictions were made on (``test`` preferred, then ``val``, else the largest)."""
    if not store.has_table("predictions"):
        raise ValueError(f"store {store.root} has no predictions table; run {run_id} wrote no predictions")
    rows = store.sql(f"SELECT split, count(*) AS n FROM predictions WHERE run_id = {sql_literal(run_id)} "
                     "GROUP BY split ORDER BY n DESC, split").to_pylist()
    if not rows:
        raise ValueError(f"run {run_id} has no rows in the predictions table")
    splits = [r["split"] for r in rows]
    for preferred in ("test", "val"):
        if preferred in splits:
            return preferred
    return splits[0]


def per_class_accuracy(store: "Store", run_id: str, split: str) -> list[dict[str, Any]]:
    """Per-class accuracy of a run: ``predictions`` joined to ``classes`` (one row per evaluated class)."""
    q = f"""
        SELECT c.label, c.name, c.train_count, c.bucket,
               count(*) AS n,
               sum(CASE WHEN p.prediction = p.label THEN 1 ELSE 0 END)::BIGINT AS correct,
               avg(CASE WHEN p.prediction = p.label THEN 1.0 ELSE 0.0 END)::DOUBLE AS accuracy
        FROM predictions p JOIN classes c ON c.label = p.label
        WHERE p.run_id = {sql_literal(run_id)} AND p.split = {sql_literal(split)}
        GROUP BY c.label, c.name, c.train_count, c.bucket
        ORDER BY c.label"""
    return [{k: _plain(v) for k, v in r.items()} for r in store.sql(q).to_pylist()]


def bucket_accuracy(store: "Store", run_ids: list[str], split: str) -> list[dict[str, Any]]:
    """Accuracy per (run, bucket) and over all target classes, recomputed from ``predictions``."""
    ids = ", ".join(sql_literal(r) for r in run_ids)
    q = f"""
        SELECT p.run_id, coalesce(c.bucket, 'all') AS bucket, count(*) AS n,
               sum(CASE WHEN p.prediction = p.label THEN 1 ELSE 0 END)::BIGINT AS correct,
               avg(CASE WHEN p.prediction = p.label THEN 1.0 ELSE 0.0 END)::DOUBLE AS accuracy
        FROM predictions p JOIN classes c ON c.label = p.label
        WHERE p.run_id IN ({ids}) AND p.split = {sql_literal(split)} AND c.bucket IS NOT NULL
        GROUP BY GROUPING SETS ((p.run_id, c.bucket), (p.run_id))
        """
    rows = [{k: _plain(v) for k, v in r.items()} for r in store.sql(q).to_pylist()]
    order = {b: i for i, b in enumerate(("all", *BUCKETS))}
    rank = {r: i for i, r in enumerate(run_ids)}
    return sorted(rows, key=lambda r: (rank[r["run_id"]], order.get(r["bucket"], 9)))


def count_of(n: int, singular: str, plural: str) -> str:
    """``1 class``, ``1,234 classes``."""
    return f"{n:,} {singular if n == 1 else plural}"


def bucket_caption(row: dict[str, Any]) -> str:
    """``few (136 classes, 1,234 train imgs)`` for a :func:`bucket_sizes` row."""
    return (f"{row['bucket']} ({count_of(row['classes'], 'class', 'classes')}, "
            f"{count_of(row['train_images'], 'train img', 'train imgs')})")


def bucket_sizes(store: "Store", split: str) -> list[dict[str, Any]]:
    """Per bucket (many, medium, few): target classes, their train images (``classes.train_count``) and
    their images of ``split`` (``samples``), with a :func:`bucket_caption`."""
    q = f"""
        SELECT c.bucket, count(*) AS classes, coalesce(sum(c.train_count), 0)::BIGINT AS train_images,
               coalesce(sum(e.n), 0)::BIGINT AS eval_images
        FROM classes c LEFT JOIN (SELECT label, count(*) AS n FROM samples WHERE split = {sql_literal(split)}
                                  GROUP BY label) e ON e.label = c.label
        WHERE c.bucket IS NOT NULL GROUP BY c.bucket"""
    by_bucket = {r["bucket"]: {k: _plain(v) for k, v in r.items()} for r in store.sql(q).to_pylist()}
    rows = [by_bucket.get(b, {"bucket": b, "classes": 0, "train_images": 0, "eval_images": 0}) for b in BUCKETS]
    return [{**r, "caption": bucket_caption(r)} for r in rows]


def few_shot_examples(store: "Store", run_id: str, split: str, embedding_set: str, *, n_classes: int = 8,
                      k: int = 5, batch_size: int = 4096) -> list[dict[str, Any]]:
    """Example ``split`` images of few-shot classes with the run's prediction and their ``k`` nearest
    train images by exact cosine over ``emb_<embedding_set>`` (view 0, :class:`featurelt.index.VectorIndex`).

    At most ``n_classes`` few classes, evenly spaced in label order; one image each, a misclassified one
    when the run got any wrong (first by ``hash(sample_id)``). The train rows are streamed from the
    store into the index batch by batch. Returns one dict per image: sample_id, label, name,
    train_count, prediction, predicted_name, neighbors ``[{sample_id, label, name, cosine}]`` best first."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from featurelt.index import VectorIndex

    if n_classes < 1 or k < 1:
        raise ValueError(f"examples and neighbors must be >= 1, got examples={n_classes}, neighbors={k}")
    table = f"emb_{embedding_set}"
    few = store.sql("SELECT label FROM classes WHERE bucket = 'few' ORDER BY label").column(0).to_pylist()
    if not few:
        return []
    few = [few[i] for i in sorted({int(round(x)) for x in np.linspace(0, len(few) - 1, min(n_classes, len(few)))})]
    picked = store.sql(f"""
        SELECT sample_id, label, prediction FROM (
            SELECT p.sample_id, p.label, p.prediction, row_number() OVER (
                PARTITION BY p.label ORDER BY (p.prediction = p.label), hash(p.sample_id), p.sample_id) AS r
            FROM predictions p
            WHERE p.run_id = {sql_literal(run_id)} AND p.split = {sql_literal(split)}
              AND p.label IN ({', '.join(str(int(x)) for x in few)})
              AND p.sample_id IN (SELECT sample_id FROM {table} WHERE view = 0))
        WHERE r = 1 ORDER BY label""").to_pylist()
    if not picked:
        return []
    train = store.sql("SELECT sample_id, label FROM samples WHERE split = 'train'").to_pylist()
    train_label = {r["sample_id"]: r["label"] for r in train}
    wanted = {r["sample_id"]: i for i, r in enumerate(picked)}
    train_ids = pa.array(list(train_label), pa.string())
    query_ids = pa.array(list(wanted), pa.string())
    index: VectorIndex | None = None
    queries: np.ndarray | None = None
    ids: list[str] = []
    for batch in store.scan(table, columns=["sample_id", "vector"], filter="view = 0", batch_size=batch_size):
        vec = batch.column("vector")
        x = vec.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, vec.type.list_size)
        sid = batch.column("sample_id")
        if index is None:
            index = VectorIndex(x.shape[1])
            queries = np.zeros((len(picked), x.shape[1]), np.float32)
        is_train = pc.is_in(sid, value_set=train_ids).to_numpy(zero_copy_only=False)
        if is_train.any():
            index.add(x[is_train])
            ids += [s for s, t in zip(sid.to_pylist(), is_train) if t]
        is_query = np.flatnonzero(pc.is_in(sid, value_set=query_ids).to_numpy(zero_copy_only=False))
        for j in is_query:
            queries[wanted[sid[int(j)].as_py()]] = x[j]
    if index is None or len(index) == 0:
        raise ValueError(f"embedding set '{embedding_set}' has no vectors of split 'train' to search")
    cos, nn = index.search(queries, k)
    classes = {r["label"]: r for r in store.sql("SELECT label, name, train_count FROM classes").to_pylist()}

    def name(label: int) -> str:
        return classes[label]["name"] if label in classes else f"label {label}"

    return [{"sample_id": p["sample_id"], "label": p["label"], "name": name(p["label"]),
             "train_count": _plain(classes.get(p["label"], {}).get("train_count")), "prediction": p["prediction"],
             "predicted_name": name(p["prediction"]),
             "neighbors": [{"sample_id": ids[j], "label": train_label[ids[j]], "name": name(train_label[ids[j]]),
                            "cosine": float(c)} for c, j in zip(cos[i], nn[i])]}
            for i, p in enumerate(picked)]


def sample_images(store: "Store", sample_ids: list[str]) -> dict[str, "np.ndarray | str"]:
    """RGB arrays [H, W, 3] uint8 of samples (their stored bytes, else the file at their uri); an image
    that cannot be read maps to the reason (a string), shown in its place."""
    from featurelt.images.decode import ImageDecodeError, load_sample_image

    if not sample_ids:
        return {}
    lits = ", ".join(sql_literal(s) for s in dict.fromkeys(sample_ids))
    out: dict[str, np.ndarray | str] = {}
    for row in store.sql(f"SELECT sample_id, image, uri FROM samples WHERE sample_id IN ({lits})").to_pylist():
        try:
            out[row["sample_id"]] = np.asarray(load_sample_image(row))
        except ImageDecodeError as exc:
            out[row["sample_id"]] = str(exc)
    for s in sample_ids:
        out.setdefault(s, f"sample {s}: not in the samples table")
    return out


def confusion_counts(store: "Store", run_id: str, split: str) -> tuple[list[int], list[str], np.ndarray]:
    """``(labels, names, counts[K, K])`` over the target classes; rows = true label, columns = prediction."""
    classes = store.sql("SELECT label, name FROM classes WHERE source = 'original' ORDER BY label").to_pylist()
    pairs = store.sql(f"SELECT label, prediction, count(*) AS n FROM predictions "
                      f"WHERE run_id = {sql_literal(run_id)} AND split = {sql_literal(split)} "
                      "GROUP BY label, prediction").to_pylist()
    labels = [c["label"] for c in classes]
    names = [c["name"] for c in classes]
    extra = sorted({p[k] for p in pairs for k in ("label", "prediction")} - set(labels))
    labels += extra
    names += [f"label {x}" for x in extra]
    index = {lab: i for i, lab in enumerate(labels)}
    counts = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for p in pairs:
        counts[index[p["label"]], index[p["prediction"]]] += p["n"]
    return labels, names, counts


def top_confused_pairs(labels: list[int], names: list[str], counts: np.ndarray, k: int = 10) -> list[dict[str, Any]]:
    """The ``k`` largest off-diagonal cells: true class, predicted class, count, fraction of the row."""
    off = counts.copy()
    np.fill_diagonal(off, 0)
    row_tot = counts.sum(1)
    flat = np.argsort(-off, axis=None, kind="stable")[:k]
    out = []
    for f in flat:
        i, j = divmod(int(f), counts.shape[1])
        if off[i, j] == 0:
            break
        out.append({"label": labels[i], "name": names[i], "prediction": labels[j], "predicted_name": names[j],
                    "n": int(off[i, j]), "row_fraction": float(off[i, j] / row_tot[i])})
    return out


def select_confused_classes(counts: np.ndarray, max_classes: int) -> np.ndarray:
    """Indices of the classes to show: all when ``K <= max_classes``, else those with most confusions
    (errors as true class + errors as predicted class), in label order."""
    k = counts.shape[0]
    if k <= max_classes:
        return np.arange(k)
    off = counts.astype(np.float64).copy()
    np.fill_diagonal(off, 0)
    score = off.sum(0) + off.sum(1)
    return np.sort(np.argsort(-score, kind="stable")[:max_classes])


def sample_embeddings(store: "Store", embedding_set: str, split: str, *, max_points: int,
                      batch_size: int = 4096) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """At most ``max_points`` view-0 vectors of ``split`` samples (a deterministic hash sample),
    streamed from ``emb_<embedding_set>`` batch by batch. Returns ``(x [N, D] float32, rows)`` with rows
    ``sample_id, label, bucket`` aligned to ``x``."""
    table = f"emb_{embedding_set}"
    if not store.has_table(table):
        raise ValueError(f"embedding set '{embedding_set}' does not exist in store {store.root}; "
                         f"sets: {', '.join(store.embedding_sets()) or '(none: run featurelt extract)'}")
    if max_points <= 0:
        raise ValueError(f"max_points must be > 0, got {max_points}")
    picked = store.sql(f"""
        SELECT s.sample_id, s.label, c.bucket FROM samples s JOIN classes c ON c.label = s.label
        WHERE s.split = {sql_literal(split)} AND c.bucket IS NOT NULL
          AND s.sample_id IN (SELECT sample_id FROM {table} WHERE view = 0)
        ORDER BY hash(s.sample_id) LIMIT {int(max_points)}""").to_pylist()
    if not picked:
        return np.zeros((0, 0), np.float32), []
    import pyarrow as pa
    import pyarrow.compute as pc

    wanted = pa.array([r["sample_id"] for r in picked], pa.string())
    position = {r["sample_id"]: i for i, r in enumerate(picked)}
    x: np.ndarray | None = None
    seen = np.zeros(len(picked), dtype=bool)
    for batch in store.scan(table, columns=["sample_id", "vector"], filter="view = 0", batch_size=batch_size):
        mask = pc.is_in(batch.column("sample_id"), value_set=wanted)
        if not pc.any(mask).as_py():
            continue
        sub = batch.filter(mask)
        vec = sub.column("vector")
        dim = vec.type.list_size
        flat = vec.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
        if x is None:
            x = np.zeros((len(picked), dim), dtype=np.float32)
        for sid, v in zip(sub.column("sample_id").to_pylist(), flat):
            i = position[sid]
            x[i] = v
            seen[i] = True
    assert x is not None  # picked rows exist in the table by construction
    rows = [r for r, s in zip(picked, seen) if s]
    return x[seen], rows


def project_2d(x: np.ndarray, *, method: ProjectionMethod = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D projection of ``x`` [N, D]: UMAP when ``umap-learn`` is importable (method auto/umap), else PCA.
    Returns ``(y [N, 2], description)``."""
    if x.ndim != 2 or x.shape[0] < 3:
        raise ValueError(f"need at least 3 vectors [N, D] to project, got shape={x.shape}")
    if method in ("auto", "umap"):
        try:
            import umap  # type: ignore[import-not-found]
        except ImportError:
            if method == "umap":
                raise ValueError("projection 'umap' needs umap-learn (pip install umap-learn)") from None
        else:
            y = umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, len(x) - 1)).fit_transform(x)
            return np.asarray(y, dtype=np.float32), "UMAP"
    from sklearn.decomposition import PCA

    n_comp = min(2, x.shape[1])
    pca = PCA(n_components=n_comp, random_state=seed).fit(x)
    y = pca.transform(x)
    if n_comp == 1:
        y = np.concatenate([y, np.zeros_like(y)], axis=1)
    var = ", ".join(f"{v:.1%}" for v in pca.explained_variance_ratio_)
    return y.astype(np.float32), f"PCA (explained variance {var})"


def collect(store: "Store", run_id: str, *, compare: list[str] | tuple[str, ...] = (),
            embedding_set: str | None = None, max_points: int = 3000, projection: ProjectionMethod = "auto",
            max_confusion_classes: int = 20, examples: int = 8,
            neighbors: int = 5) -> tuple[ReportData, np.ndarray | None]:
    """Read everything a report needs. Returns the data and the 2-D projection points (or None).
    ``run_id`` and ``compare`` may name runs as ``latest`` / ``latest~N`` (:func:`resolve_run_id`).
    ``examples``: few-shot classes shown with their nearest train images (0: none), ``neighbors`` each."""
    run_id = resolve_run_id(store, run_id)
    compare = [resolve_run_id(store, c) for c in compare]
    run_ids = [run_id, *[c for c in compare if c != run_id]]
    if len(set(run_ids)) != len(run_ids):
        raise ValueError(f"--compare lists a run twice: {', '.join(compare)}")
    runs = load_runs(store, run_ids)
    split = evaluation_split(store, run_id)
    notes: list[str] = []
    for r in run_ids[1:]:
        other = store.sql(f"SELECT DISTINCT split FROM predictions WHERE run_id = {sql_literal(r)}")
        other = other.column(0).to_pylist()
        if split not in other:
            notes.append(f"run {r} has no predictions on split '{split}' (it has: {', '.join(other) or 'none'}); "
                         "its per-class points are missing")
    thresholds = store.sql("SELECT min(bucket_many) AS bucket_many, min(bucket_few) AS bucket_few, "
                           "count(DISTINCT bucket_many) AS n_many, count(DISTINCT bucket_few) AS n_few FROM classes "
                           "WHERE source = 'original'").to_pylist()[0]
    if (thresholds["n_many"] or 0) > 1 or (thresholds["n_few"] or 0) > 1:
        notes.append("the classes table holds more than one pair of bucket thresholds; the smallest is shaded")
    current_classes = store.table_versions().get("classes")
    for run in runs:
        try:
            read = json.loads(run["pinned_versions"] or "{}").get("tables", {}).get("classes")
        except (ValueError, AttributeError):
            read = None
        if read is not None and current_classes is not None and read != current_classes:
            notes.append(f"run {run['run_id']} read the classes table at Lance version {read}; this report joins "
                         f"its predictions to classes at Lance version {current_classes} (store version "
                         f"{store.version}): train counts and buckets may have changed since (make-lt / ingest)")
    confusion: dict[str, dict[str, Any]] = {}
    for r in run_ids:
        labels, names, counts = confusion_counts(store, r, split)
        confusion[r] = {"labels": labels, "names": names, "counts": counts.tolist(),
                        "top": top_confused_pairs(labels, names, counts)}
    # the same classes in every run's matrix (chosen on their summed counts) when the runs share the labels
    shared = all(c["labels"] == confusion[run_id]["labels"] for c in confusion.values())
    total = sum(np.asarray(c["counts"], dtype=np.int64) for c in confusion.values()) if shared else None
    for c in confusion.values():
        keep = select_confused_classes(total if shared else np.asarray(c["counts"], dtype=np.int64),
                                       max_confusion_classes)
        c["shown_labels"] = [c["labels"][i] for i in keep]
    data = ReportData(
        store_root=store.root, store_version=store.version, run_ids=run_ids, runs=runs, eval_split=split,
        bucket_thresholds={"bucket_many": thresholds["bucket_many"], "bucket_few": thresholds["bucket_few"]},
        bucket_sizes=bucket_sizes(store, split), bucket_from_predictions=bucket_accuracy(store, run_ids, split),
        per_class={r: per_class_accuracy(store, r, split) for r in run_ids}, confusion=confusion, notes=notes)

    # -- embedding projection
    points = None
    name = embedding_set
    if name is None:
        features = [f for f in (runs[0]["features"] or "").split(",") if f]
        features.append(f"ft_{runs[0]['run_id']}")  # a fine-tune run: its own --export set
        name = next((f for f in features if store.has_table(f"emb_{f}")), None)
        if name is None and store.embedding_sets():
            name = store.embedding_sets()[0]
    if name is None:
        notes.append("no embedding set in the store: projection skipped")
        data.projection = {"embedding_set": None}
    else:
        x, rows = sample_embeddings(store, name, split, max_points=max_points)
        if len(rows) < 3:
            notes.append(f"embedding set '{name}' has {len(rows)} vectors on split '{split}': projection skipped")
            data.projection = {"embedding_set": name, "n": len(rows)}
        else:
            points, method = project_2d(x, method=projection)
            counts_by_bucket = {b: sum(r["bucket"] == b for r in rows) for b in BUCKETS}
            data.projection = {"embedding_set": name, "split": split, "n": len(rows), "dim": int(x.shape[1]),
                               "method": method, "points_per_bucket": counts_by_bucket,
                               "sample_ids": [r["sample_id"] for r in rows],
                               "buckets": [r["bucket"] for r in rows], "labels": [r["label"] for r in rows]}
    if name is not None and examples > 0:
        rows = few_shot_examples(store, run_id, split, name, n_classes=examples, k=neighbors)
        data.examples = {"embedding_set": name, "split": split, "k": neighbors, "rows": rows}
        if not rows:
            notes.append(f"no few-shot class has '{split}' predictions of run {run_id} with vectors in "
                         f"emb_{name}: no example images")
    return data, points


# ====================================================================== figures
def _figure(width: float = 8.0, height: float = 5.0) -> "Figure":
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    return fig


def _save(fig: "Figure", path: Path) -> None:
    fig.savefig(path, format="png", bbox_inches="tight", pad_inches=0.15)


def _style() -> dict[str, Any]:
    return {"font.size": 11, "axes.titlesize": 13, "axes.labelsize": 11, "legend.fontsize": 9,
            "xtick.labelsize": 10, "ytick.labelsize": 10, "axes.grid": True, "grid.alpha": 0.3,
            "axes.spines.top": False, "axes.spines.right": False}


def run_label(run: dict[str, Any]) -> str:
    """Legend label of a run: ``head / loss [sampler] on FEATURES (run_id)``, the feature sets joined
    by ``+``; no loss for a fitted head (knn, ncm: its runs row says loss none), no sampler when it is
    instance (the default) or none."""
    sampler = f" [{run['sampler']}]" if run.get("sampler") and run["sampler"] not in ("none", "instance") else ""
    loss = f" / {run['loss']}" if run.get("loss") not in (None, "none") else ""
    features = "+".join(f.strip() for f in (run.get("features") or "").split(",") if f.strip())
    on = f" on {features}" if features else ""
    return f"{run['head']}{loss}{sampler}{on} ({run['run_id']})"


def plot_per_class(data: ReportData, path: Path) -> None:
    """Per-class accuracy against train count (log x), bucket regions shaded, one marker per run."""
    fig = _figure(9, 5.2)
    ax = fig.add_subplot()
    all_counts = [max(r["train_count"], 1) for rows in data.per_class.values() for r in rows]
    if not all_counts:
        all_counts = [1, 10]
    lo, hi = min(all_counts) / 1.6, max(all_counts) * 1.6
    few, many = data.bucket_thresholds["bucket_few"], data.bucket_thresholds["bucket_many"]
    n_classes_of = {r["bucket"]: r["classes"] for r in data.bucket_sizes}
    if few is not None and many is not None:
        regions = (("few", lo, few), ("medium", few, many), ("many", many, hi))
        for bucket, a, b in regions:
            a, b = max(a, lo), min(b, hi)
            if b <= a:
                continue
            ax.axvspan(a, b, color=BUCKET_COLORS[bucket], alpha=0.10, lw=0)
            ax.text(math.sqrt(a * b), 1.035, f"{bucket} ({count_of(n_classes_of.get(bucket, 0), 'class', 'classes')})",
                    ha="center",
                    va="bottom", fontsize=10,
                    color=BUCKET_COLORS[bucket], fontweight="bold", transform=ax.get_xaxis_transform())
    n_runs = len(data.run_ids)
    for i, run in enumerate(data.runs):
        rows = data.per_class.get(run["run_id"], [])
        if not rows:
            continue
        xs = np.array([max(r["train_count"], 1) for r in rows], dtype=float)
        # spread runs sideways a little so markers at one train count do not hide each other
        jitter = 1.0 + 0.04 * (i - (n_runs - 1) / 2)
        ys = np.array([r["accuracy"] for r in rows], dtype=float)
        ax.scatter(xs * jitter, ys, s=34, marker=RUN_MARKERS[i % len(RUN_MARKERS)],
                   color=RUN_COLORS[i % len(RUN_COLORS)], alpha=0.85, edgecolor="white", linewidth=0.5,
                   label=run_label(run), zorder=3)
        if len(xs) > 30:  # many classes: a trend line, mean accuracy in log-spaced bins of train count
            edges = np.geomspace(xs.min(), xs.max() * 1.0001, num=9)
            idx = np.clip(np.digitize(xs, edges) - 1, 0, len(edges) - 2)
            used = [b for b in range(len(edges) - 1) if (idx == b).any()]
            ax.plot([math.sqrt(edges[b] * edges[b + 1]) for b in used], [ys[idx == b].mean() for b in used],
                    color=RUN_COLORS[i % len(RUN_COLORS)], alpha=0.7, lw=1.8, zorder=2)
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("train images of the class (log scale)")
    ax.set_ylabel(f"top-1 accuracy on '{data.eval_split}'")
    ax.set_title("Per-class accuracy against train count", pad=26)
    n_classes = max((len(v) for v in data.per_class.values()), default=0)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=min(2, n_runs), frameon=False,
              title="run" + (" (line: mean over log-spaced bins of train count)" if n_classes > 30 else ""),
              title_fontsize=9)
    _save(fig, path)


def plot_buckets(data: ReportData, path: Path) -> "Figure":
    """Grouped bars from the runs table, one bar per run: top-1 accuracy on all / many / medium / few (left
    panel, x labels with each bucket's class and train image counts) and macro-F1 on its own axis (right)."""
    n_runs = len(data.runs)
    acc_groups = [g for g in BAR_GROUPS if g[1] != "macro_f1"]
    fig = _figure(max(9.0, 2.5 + 0.3 * (len(acc_groups) + 1) * max(1, n_runs)), 5.6)
    ax_acc, ax_f1 = fig.subplots(1, 2, width_ratios=[len(acc_groups), 1.3])
    total = {"bucket": "all", "classes": sum(r["classes"] for r in data.bucket_sizes),
             "train_images": sum(r["train_images"] for r in data.bucket_sizes)}
    caption = {r["bucket"]: f"{r['bucket']}\n{count_of(r['classes'], 'class', 'classes')}\n"
               f"{count_of(r['train_images'], 'train img', 'train imgs')}" for r in (*data.bucket_sizes, total)}
    width = 0.8 / n_runs
    for ax, groups in ((ax_acc, acc_groups), (ax_f1, [g for g in BAR_GROUPS if g[1] == "macro_f1"])):
        x = np.arange(len(groups))
        for i, run in enumerate(data.runs):
            vals = [run[col] for _, col in groups]
            pos = x - 0.4 + width * (i + 0.5)
            bars = ax.bar(pos, [v if v is not None else 0.0 for v in vals], width=width * 0.92,
                          color=RUN_COLORS[i % len(RUN_COLORS)], label=run_label(run), zorder=3)
            if n_runs <= 6:
                for bar, v in zip(bars, vals):
                    ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01,
                            "n/a" if v is None else f"{v:.2f}", ha="center", va="bottom",
                            fontsize=8 if n_runs <= 3 else 7, rotation=0 if n_runs <= 3 else 90)
        ax.set_xticks(x, [caption.get(g, g) for g, _ in groups], fontsize=9)
        ax.set_ylim(0, 1.12)
        ax.grid(axis="x", visible=False)
    ax_acc.set_ylabel(f"top-1 accuracy on '{data.eval_split}'")
    ax_acc.set_title("Accuracy per bucket (class bucket by train count)")
    ax_f1.set_ylabel("macro-F1 (over the target classes)")
    ax_f1.set_title("Macro-F1")
    fig.legend(*ax_acc.get_legend_handles_labels(), loc="outside lower center", ncol=min(2, n_runs),
               frameon=False, title="run: head / loss [sampler] on features (run id)", title_fontsize=9)
    _save(fig, path)
    return fig


def plot_confusion(data: ReportData, run_id: str, path: Path) -> "Figure":
    """Row-normalised confusion matrix of one run over its ``shown_labels`` (all classes, or the most
    confused when there are more than ``max_confusion_classes``)."""
    conf = data.confusion[run_id]
    counts = np.asarray(conf["counts"], dtype=np.float64)
    index = {lab: i for i, lab in enumerate(conf["labels"])}
    keep = np.array([index[lab] for lab in conf["shown_labels"]], dtype=np.int64)
    row_tot = counts.sum(1, keepdims=True)
    norm = np.divide(counts, row_tot, out=np.zeros_like(counts), where=row_tot > 0)
    sub = norm[np.ix_(keep, keep)]
    k = len(keep)
    size = min(11.0, 4.5 + 0.32 * k)
    fig = _figure(size + 1.2, size)
    ax = fig.add_subplot()
    from matplotlib.colors import PowerNorm

    # square-root colour scale: a 5% confusion is visible next to a 90% diagonal
    im = ax.imshow(sub, cmap="Blues", norm=PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0), interpolation="nearest")
    names = [conf["names"][i] for i in keep]
    short = [n if len(n) <= 18 else n[:17] + "…" for n in names]
    ax.set_xticks(range(k), short, rotation=60 if k > 4 else 0, ha="right" if k > 4 else "center",
                  rotation_mode="anchor", fontsize=9 if k <= 20 else 7)
    ax.set_yticks(range(k), short, fontsize=9 if k <= 20 else 7)
    ax.grid(False)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    run = next(r for r in data.runs if r["run_id"] == run_id)
    title = f"Confusion matrix on '{data.eval_split}' (rows normalised)\n{run_label(run)}"
    if k < counts.shape[0]:
        title += f"\n{k} most confused of {counts.shape[0]} classes"
    ax.set_title(title, fontsize=11)
    if k <= 15:
        for i in range(k):
            for j in range(k):
                v = sub[i, j]
                if v >= 0.005:
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if v > 0.55 else "black")
    # colour the tick labels by bucket
    bucket_of = {r["label"]: r["bucket"] for rows in data.per_class.values() for r in rows}
    for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
        for lab_idx, t in zip(keep, ticks):
            b = bucket_of.get(conf["labels"][lab_idx])
            if b in BUCKET_COLORS:
                t.set_color(BUCKET_COLORS[b])
    cb = fig.colorbar(im, ax=ax, shrink=0.8)
    cb.set_label("fraction of the true class (sqrt scale; tick colour = bucket)")
    _save(fig, path)
    return fig


def plot_examples(data: ReportData, images: dict[str, "np.ndarray | str"], path: Path) -> "Figure":
    """One row per few-shot example: the test image (title: true and predicted class, red when wrong)
    and its nearest train images (title: class and cosine; bold when of the true class)."""
    rows = data.examples["rows"]
    k = max(len(r["neighbors"]) for r in rows)
    cell = 1.45
    from matplotlib.figure import Figure

    # a fixed grid (no constrained layout: it would lay out every thumbnail's axes, several seconds)
    height = cell * 1.35 * len(rows) + 1.1
    fig = Figure(figsize=(cell * (k + 1.4), height), dpi=110)
    grid = fig.add_gridspec(len(rows), k + 2, width_ratios=[1, 0.25] + [1] * k, left=0.06, right=0.99,
                            bottom=0.1 / height, top=1 - 1.1 / height, wspace=0.08, hspace=0.45)
    fig.suptitle(f"Few-shot classes: a '{data.examples['split']}' image, the run's prediction and its {k} "
                 f"nearest train images\n(exact cosine over emb_{data.examples['embedding_set']}; "
                 f"misclassified images chosen first; bold: a train image of the true class)", fontsize=11,
                 y=1 - 0.08 / height, va="top")

    def show(ax, sid: str, title: str, color: str = "black", weight: str = "normal") -> None:
        img = images.get(sid)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
        for side in ("top", "right", "bottom", "left"):
            ax.spines[side].set_visible(True)
            ax.spines[side].set_color(color)
        if isinstance(img, np.ndarray):
            ax.imshow(img, interpolation="nearest" if max(img.shape[:2]) < 96 else "antialiased")
        else:
            ax.text(0.5, 0.5, "image\nunavailable", ha="center", va="center", fontsize=8, color="#999",
                    transform=ax.transAxes)
        ax.set_title(title, fontsize=8, color=color, fontweight=weight)

    for i, row in enumerate(rows):
        ok = row["prediction"] == row["label"]
        ax = fig.add_subplot(grid[i, 0])
        show(ax, row["sample_id"], f"true: {_short(row['name'])}\npred: {_short(row['predicted_name'])}",
             color="#2a7a2a" if ok else "#c43c4b", weight="bold")
        ax.set_ylabel(f"few: {row['train_count']} train imgs", fontsize=8)
        for j, nb in enumerate(row["neighbors"]):
            same_class = nb["label"] == row["label"]
            show(fig.add_subplot(grid[i, j + 2]), nb["sample_id"], f"{_short(nb['name'])}\ncos {nb['cosine']:.2f}",
                 weight="bold" if same_class else "normal")
    fig.savefig(path, format="png")
    return fig


def _short(name: str, width: int = 16) -> str:
    return name if len(name) <= width else name[:width - 1] + "…"


def plot_projection(data: ReportData, points: np.ndarray, path: Path) -> None:
    """Scatter of the 2-D projection coloured by bucket."""
    proj = data.projection
    fig = _figure(7.5, 6.2)
    ax = fig.add_subplot()
    buckets = np.array(proj["buckets"])
    size = 28 if len(buckets) <= 500 else 12 if len(buckets) <= 2000 else 7
    markers = {"many": "o", "medium": "s", "few": "^"}
    for b in BUCKETS:  # many first, so few-shot points are drawn on top
        m = buckets == b
        if m.any():
            ax.scatter(points[m, 0], points[m, 1], s=size, alpha=0.7, color=BUCKET_COLORS[b], lw=0,
                       marker=markers[b], label=f"{b} ({int(m.sum())} points)")
    method = proj["method"]
    axis = "UMAP" if method.startswith("UMAP") else "PC"
    ax.set_xlabel(f"{axis} 1")
    ax.set_ylabel(f"{axis} 2")
    ax.set_title(f"emb_{proj['embedding_set']} ({proj['dim']}-d), {proj['n']} '{proj['split']}' samples\n{method}",
                 fontsize=12)
    ax.legend(title="class bucket", markerscale=2.0, loc="best", framealpha=0.9)
    _save(fig, path)


# ====================================================================== HTML
CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
div.scroll { overflow-x: auto; max-width: 100%; }
td.t { overflow-wrap: anywhere; max-width: 18em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.t, th.t { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.muted { color: #666; } .note { background: #fff6dd; padding: 0.4em 0.8em; border-left: 4px solid #e0a800; }
.many { color: #3b6fb6; } .medium { color: #e0892b; } .few { color: #c43c4b; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(rows: list[dict[str, Any]], columns: list[str], *, table_id: str, text_cols: tuple[str, ...] = ()) -> str:
    """An HTML table; numbers formatted by :func:`fmt`, every cell escaped."""
    head = "".join(f'<th class="{"t" if c in text_cols else "n"}">{_e(c)}</th>' for c in columns)
    body = []
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            cls = "t" if c in text_cols else "n"
            if c == "bucket" and v in BUCKET_COLORS:
                cls += f" {v}"
            cells.append(f'<td class="{cls}">{_e(fmt(v))}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table id="{_e(table_id)}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


# runs table columns: shown by default, and all of them (folded)
RUNS_TABLE_COLUMNS = ("run_id", "head", "loss", "sampler", "features", "acc_all", "acc_many", "acc_medium", "acc_few",
                      "macro_f1")
RUNS_TABLE_ALL = (*RUNS_TABLE_COLUMNS, "head_tail_gap", "epochs", "seed", "train_seconds", "time")
RUN_TEXT = ("run_id", "head", "loss", "sampler", "features", "time")


def _img(src: str, alt: str) -> str:
    return f'<p><img src="{_e(src)}" alt="{_e(alt)}"></p>'


def render_html(data: ReportData, figures: dict[str, str]) -> str:
    primary = data.runs[0]
    title = f"featurelt report: run {primary['run_id']}"
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>{_e(title)}</h1>",
             f'<p class="muted">{_e(run_label(primary))} &middot; store <code>{_e(data.store_root)}</code> '
             f"at store version {data.store_version} &middot; evaluation split <code>{_e(data.eval_split)}</code>"
             f" &middot; buckets: many &gt; {_e(fmt(data.bucket_thresholds['bucket_many']))}, few &lt; "
             f"{_e(fmt(data.bucket_thresholds['bucket_few']))} train images</p>"]
    for note in data.notes:
        parts.append(f'<p class="note">{_e(note)}</p>')

    parts.append("<h2>Buckets</h2>")
    parts.append('<p class="muted">Target classes per bucket, their train images (<code>classes.train_count</code>) '
                 f"and their images of split <code>{_e(data.eval_split)}</code> (<code>samples</code>).</p>")
    parts.append(_table(data.bucket_sizes, ["bucket", "classes", "train_images", "eval_images", "caption"],
                        table_id="buckets", text_cols=("bucket", "caption")))

    parts.append("<h2>Accuracy per bucket</h2>")
    parts.append('<p class="muted">From the <code>runs</code> table: <code>SELECT run_id, head, loss, '
                 + ", ".join(METRIC_COLUMNS) + " FROM runs</code>.</p>")
    parts.append(_table(data.runs, list(RUNS_TABLE_COLUMNS), table_id="runs", text_cols=RUN_TEXT))
    parts.append("<details><summary>all columns</summary>"
                 + _table(data.runs, list(RUNS_TABLE_ALL), table_id="runs_all", text_cols=RUN_TEXT) + "</details>")
    if "buckets" in figures:
        parts.append(_img(figures["buckets"], "accuracy per bucket and macro-F1, one bar per run"))

    parts.append("<h3>Check: the same accuracies from <code>predictions</code></h3>")
    parts.append('<p class="muted"><code>predictions</code> joined to <code>classes</code> on the label, '
                 f"split <code>{_e(data.eval_split)}</code>, averaged over samples of each bucket.</p>")
    parts.append(_table(data.bucket_from_predictions, ["run_id", "bucket", "n", "correct", "accuracy"],
                        table_id="bucket_from_predictions", text_cols=("run_id", "bucket")))

    parts.append("<h2>Per-class accuracy</h2>")
    if "per_class" in figures:
        parts.append(_img(figures["per_class"], "per-class accuracy against train count"))
    for run_id in data.run_ids:
        rows = data.per_class.get(run_id, [])
        parts.append(f"<details{' open' if run_id == data.run_ids[0] and len(rows) <= 30 else ''}>"
                     f"<summary>classes of run <code>{_e(run_id)}</code> ({len(rows)} classes)</summary>")
        parts.append(_table(rows, ["label", "name", "bucket", "train_count", "n", "correct", "accuracy"],
                            table_id=f"per_class-{run_id}", text_cols=("name", "bucket")))
        parts.append("</details>")

    if data.examples.get("rows"):
        ex = data.examples
        parts.append("<h2>Few-shot examples</h2>")
        parts.append(f'<p class="muted">One <code>{_e(ex["split"])}</code> image per few-shot class shown (a '
                     "misclassified one when there is one), the prediction of run "
                     f'<code>{_e(primary["run_id"])}</code> and its {ex["k"]} nearest train images by exact cosine '
                     f'similarity over <code>emb_{_e(ex["embedding_set"])}</code>.</p>')
        if "examples" in figures:
            parts.append(_img(figures["examples"], "few-shot test images with their nearest train images"))
        flat = [{**r, "neighbors": ", ".join(f"{n['name']} ({n['cosine']:.2f})" for n in r["neighbors"])}
                for r in ex["rows"]]
        parts.append(_table(flat, ["sample_id", "name", "train_count", "predicted_name", "neighbors"],
                            table_id="examples", text_cols=("sample_id", "name", "predicted_name", "neighbors")))

    parts.append("<h2>Confusion matrices</h2>")
    if len(data.run_ids) > 1:
        parts.append('<p class="muted">One per run (over the same classes when the runs share their labels); '
                     "open a run to see its matrix.</p>")
    for run_id, run in zip(data.run_ids, data.runs):
        conf = data.confusion[run_id]
        parts.append(f"<details{' open' if run_id == data.run_ids[0] else ''}><summary>run <code>{_e(run_id)}</code>: "
                     f"{_e(run_label(run))}</summary>")
        if f"confusion-{run_id}" in figures:
            parts.append(_img(figures[f"confusion-{run_id}"], f"confusion matrix of run {run_id}"))
        if len(conf["shown_labels"]) < len(conf["labels"]):
            parts.append(f'<p class="muted">Showing the {len(conf["shown_labels"])} classes with the most errors '
                         f"(as true or predicted class) of {len(conf['labels'])}.</p>")
        parts.append("<h4>most frequent confusions</h4>")
        parts.append(_table(conf["top"], ["label", "name", "prediction", "predicted_name", "n", "row_fraction"],
                            table_id=f"top_confusions-{run_id}", text_cols=("name", "predicted_name")))
        parts.append("</details>")

    parts.append("<h2>Embedding projection</h2>")
    if "projection" in figures:
        p = data.projection
        parts.append(f'<p class="muted">Embedding set <code>emb_{_e(p["embedding_set"])}</code>, {p["n"]} samples '
                     f'of split <code>{_e(p["split"])}</code> (deterministic hash sample, streamed from the store), '
                     f'{_e(p["method"])}.</p>')
        parts.append(_img(figures["projection"], "2-D projection of embeddings by bucket"))
    else:
        parts.append('<p class="muted">No projection (see the notes above).</p>')

    parts.append("<h2>Config and pinned store versions</h2>")
    for run in data.runs:
        open_ = " open" if run is primary else ""
        try:
            pinned = json.dumps(json.loads(run["pinned_versions"]), indent=2, sort_keys=True)
        except (TypeError, ValueError):
            pinned = str(run["pinned_versions"])
        parts.append(f"<details{open_}><summary>run <code>{_e(run['run_id'])}</code>: {_e(run_label(run))}</summary>"
                     f"<h4>config (YAML)</h4><pre>{_e(run['config'])}</pre>"
                     f"<h4>pinned store versions</h4><pre>{_e(pinned)}</pre>"
                     + (f'<p class="muted">checkpoint: <code>{_e(run["checkpoint"])}</code></p>'
                        if run.get("checkpoint") else "") + "</details>")
    parts.append(f'<p class="muted">Numbers as JSON: <a href="report.json">report.json</a>. Generated '
                 f"{_e(datetime.now().isoformat(timespec='seconds'))} by featurelt report.</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


# ====================================================================== entry point
def figure_name(kind: str, run_id: str | None = None) -> str:
    """PNG file name of a figure; per-run figures carry the run id (characters other than letters,
    digits, ``-`` and ``_`` replaced)."""
    return f"{kind}.png" if run_id is None else f"{kind}-{re.sub(r'[^A-Za-z0-9_-]', '_', run_id)}.png"


def write_report(store: "Store", run_id: str, *, compare: list[str] | tuple[str, ...] = (),
                 out_dir: str | Path, embedding_set: str | None = None, max_points: int = 3000,
                 projection: ProjectionMethod = "auto", max_confusion_classes: int = 20, examples: int = 8,
                 neighbors: int = 5) -> Path:
    """Write ``out_dir/index.html`` (+ PNG figures, ``report.json``) for ``run_id`` compared with ``compare``.

    ``embedding_set``: set to project and to search for the nearest train images of the few-shot examples
    (default: the first feature set of the run that is in the store; for a fine-tune run its export
    ``ft_<run_id>``; else the store's first set). ``max_points``: at most this many
    evaluation samples in the projection. ``examples``: few-shot classes shown with an image each (0: none);
    ``neighbors``: nearest train images per example. Returns the HTML path.
    """
    if max_confusion_classes < 2:
        raise ValueError(f"max_confusion_classes must be >= 2, got {max_confusion_classes}")
    if examples < 0 or neighbors < 1:
        raise ValueError(f"examples must be >= 0 and neighbors >= 1, got examples={examples}, neighbors={neighbors}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data, points = collect(store, run_id, compare=compare, embedding_set=embedding_set, max_points=max_points,
                           projection=projection, max_confusion_classes=max_confusion_classes, examples=examples,
                           neighbors=neighbors)
    import matplotlib

    figures: dict[str, str] = {}

    def draw(key: str, name: str, plot: Any, *args: Any) -> None:
        plot(*args, out / name)
        figures[key] = name

    with matplotlib.rc_context(_style()):
        draw("per_class", figure_name("per_class_accuracy"), plot_per_class, data)
        draw("buckets", figure_name("buckets"), plot_buckets, data)
        for r in data.run_ids:
            draw(f"confusion-{r}", figure_name("confusion", r), plot_confusion, data, r)
        if points is not None:
            draw("projection", figure_name("projection"), plot_projection, data, points)
        if data.examples.get("rows"):
            ids = [s for r in data.examples["rows"] for s in (r["sample_id"], *(n["sample_id"] for n in r["neighbors"]))]
            images = sample_images(store, ids)
            unreadable = sorted({v for v in images.values() if isinstance(v, str)})
            if unreadable:
                data.notes.append(f"{len(unreadable)} example image(s) could not be read, e.g. {unreadable[0]}")
            draw("examples", figure_name("few_shot_examples"), plot_examples, data, images)
    html_path = out / "index.html"
    html_path.write_text(render_html(data, figures), encoding="utf-8")
    proj = {k: v for k, v in data.projection.items() if k not in ("sample_ids", "buckets", "labels")}
    if points is not None:
        proj["points"] = [{"sample_id": s, "label": lab, "bucket": b, "x": float(p[0]), "y": float(p[1])}
                          for s, lab, b, p in zip(data.projection["sample_ids"], data.projection["labels"],
                                                  data.projection["buckets"], points)]
    doc = {"run_id": data.run_ids[0], "compare": data.run_ids[1:], "store": data.store_root,
           "store_version": data.store_version, "eval_split": data.eval_split,
           "bucket_thresholds": data.bucket_thresholds, "buckets": data.bucket_sizes, "runs": data.runs,
           "bucket_from_predictions": data.bucket_from_predictions, "per_class": data.per_class,
           "confusion": data.confusion, "projection": proj, "examples": data.examples, "figures": figures,
           "notes": data.notes}
    (out / "report.json").write_text(json.dumps(doc, indent=1, default=_plain), encoding="utf-8")
    return html_path


__all__ = ["write_report", "collect", "ReportData", "project_2d", "sample_embeddings", "per_class_accuracy",
           "bucket_accuracy", "bucket_sizes", "confusion_counts", "few_shot_examples", "load_runs", "evaluation_split",
           "resolve_run_id"]
