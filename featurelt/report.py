"""HTML reports of train-head runs: figures (matplotlib, PNG) and tables of numbers read from the store.

``write_report(store, run_id, compare=[...], out_dir=DIR)`` writes ``DIR/index.html``, one PNG per
figure and ``DIR/report.json`` (the same numbers, for scripts). Every number comes from SQL over the
store, so the page agrees with ``featurelt sql``:

- the per-bucket table is the ``runs`` row of each run as stored (acc_all / many / medium / few,
  macro-F1, head-tail gap), beside the same accuracies recomputed from ``predictions`` joined to
  ``classes`` (a consistency check);
- per-class accuracy is ``predictions`` joined to ``classes`` on the evaluation split;
- the confusion matrix counts ``(label, prediction)`` pairs of the evaluation split.

Figures: per-class accuracy against train count (log x, bucket regions shaded), a grouped bar chart
per bucket comparing runs, the row-normalised confusion matrix (the most confused classes when there
are many), and a 2-D projection (PCA, or UMAP when ``umap-learn`` is installed) of an embedding set
coloured by bucket, computed on at most ``max_points`` evaluation samples streamed from the store.
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
    bucket_from_predictions: list[dict[str, Any]]  # run_id, bucket, n, correct, accuracy
    per_class: dict[str, list[dict[str, Any]]]      # run_id -> label, name, train_count, bucket, n, correct, accuracy
    confusion_labels: list[int]             # labels of the confusion matrix rows/columns
    confusion_names: list[str]
    confusion_counts: list[list[int]]       # [K, K] counts, rows = true label
    top_confusions: list[dict[str, Any]]    # label, name, prediction, predicted_name, n, row_fraction
    projection: dict[str, Any] = field(default_factory=dict)
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
            max_confusion_classes: int = 20) -> tuple[ReportData, np.ndarray | None]:
    """Read everything a report needs. Returns the data and the 2-D projection points (or None).
    ``run_id`` and ``compare`` may name runs as ``latest`` / ``latest~N`` (:func:`resolve_run_id`)."""
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
    labels, names, counts = confusion_counts(store, run_id, split)
    data = ReportData(
        store_root=store.root, store_version=store.version, run_ids=run_ids, runs=runs, eval_split=split,
        bucket_thresholds={"bucket_many": thresholds["bucket_many"], "bucket_few": thresholds["bucket_few"]},
        bucket_from_predictions=bucket_accuracy(store, run_ids, split),
        per_class={r: per_class_accuracy(store, r, split) for r in run_ids},
        confusion_labels=labels, confusion_names=names, confusion_counts=counts.tolist(),
        top_confusions=top_confused_pairs(labels, names, counts), notes=notes)
    data.projection = {"max_confusion_classes": max_confusion_classes}

    # -- embedding projection
    points = None
    name = embedding_set
    if name is None:
        features = [f for f in (runs[0]["features"] or "").split(",") if f]
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
    """Legend label of a run: ``head / loss [sampler] (run_id)``; ``head (run_id)`` for a fitted head
    (knn, ncm: its runs row says loss none)."""
    sampler = f" [{run['sampler']}]" if run.get("sampler") and run["sampler"] not in ("none", "instance") else ""
    loss = f" / {run['loss']}" if run.get("loss") not in (None, "none") else ""
    return f"{run['head']}{loss}{sampler} ({run['run_id']})"


def plot_per_class(data: ReportData, path: Path) -> None:
    """Per-class accuracy against train count (log x), bucket regions shaded, one marker per run."""
    fig = _figure(9, 5.2)
    ax = fig.add_subplot()
    all_counts = [max(r["train_count"], 1) for rows in data.per_class.values() for r in rows]
    if not all_counts:
        all_counts = [1, 10]
    lo, hi = min(all_counts) / 1.6, max(all_counts) * 1.6
    few, many = data.bucket_thresholds["bucket_few"], data.bucket_thresholds["bucket_many"]
    if few is not None and many is not None:
        regions = (("few", lo, few), ("medium", few, many), ("many", many, hi))
        for bucket, a, b in regions:
            a, b = max(a, lo), min(b, hi)
            if b <= a:
                continue
            ax.axvspan(a, b, color=BUCKET_COLORS[bucket], alpha=0.10, lw=0)
            ax.text(math.sqrt(a * b), 1.035, bucket, ha="center", va="bottom", fontsize=10,
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


def plot_buckets(data: ReportData, path: Path) -> None:
    """Grouped bars: accuracy on all / many / medium / few and macro-F1, one bar per run (runs table)."""
    n_runs = len(data.runs)
    fig = _figure(max(8.0, 1.8 + 1.1 * len(BAR_GROUPS) * max(1, n_runs) * 0.45), 5.2)
    ax = fig.add_subplot()
    width = 0.8 / n_runs
    x = np.arange(len(BAR_GROUPS))
    for i, run in enumerate(data.runs):
        vals = [run[col] for _, col in BAR_GROUPS]
        heights = [v if v is not None else 0.0 for v in vals]
        pos = x - 0.4 + width * (i + 0.5)
        bars = ax.bar(pos, heights, width=width * 0.92, color=RUN_COLORS[i % len(RUN_COLORS)],
                      label=run_label(run), zorder=3)
        if n_runs <= 6:
            for bar, v in zip(bars, vals):
                ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01,
                        "n/a" if v is None else f"{v:.2f}", ha="center", va="bottom",
                        fontsize=8 if n_runs <= 3 else 7, rotation=0 if n_runs <= 3 else 90)
    ax.set_xticks(x, [g for g, _ in BAR_GROUPS])
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("top-1 accuracy (macro-F1 for the last group)")
    ax.set_xlabel("class bucket by train count")
    ax.set_title(f"Accuracy per bucket on '{data.eval_split}' (runs table)")
    ax.grid(axis="x", visible=False)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=min(2, n_runs), frameon=False)
    _save(fig, path)


def plot_confusion(data: ReportData, path: Path, *, max_classes: int = 20) -> list[int]:
    """Row-normalised confusion matrix; with more than ``max_classes`` classes only the most confused.
    Returns the labels shown."""
    counts = np.asarray(data.confusion_counts, dtype=np.float64)
    keep = select_confused_classes(counts.astype(np.int64), max_classes)
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
    names = [data.confusion_names[i] for i in keep]
    short = [n if len(n) <= 18 else n[:17] + "…" for n in names]
    ax.set_xticks(range(k), short, rotation=60 if k > 4 else 0, ha="right" if k > 4 else "center",
                  rotation_mode="anchor", fontsize=9 if k <= 20 else 7)
    ax.set_yticks(range(k), short, fontsize=9 if k <= 20 else 7)
    ax.grid(False)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total_k = counts.shape[0]
    title = f"Confusion matrix on '{data.eval_split}' (rows normalised)"
    if k < total_k:
        title += f"\n{k} most confused of {total_k} classes"
    ax.set_title(title)
    if k <= 15:
        for i in range(k):
            for j in range(k):
                v = sub[i, j]
                if v >= 0.005:
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if v > 0.55 else "black")
    # colour the tick labels by bucket
    bucket_of = {r["label"]: r["bucket"] for r in data.per_class.get(data.run_ids[0], [])}
    for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
        for lab_idx, t in zip(keep, ticks):
            b = bucket_of.get(data.confusion_labels[lab_idx])
            if b in BUCKET_COLORS:
                t.set_color(BUCKET_COLORS[b])
    cb = fig.colorbar(im, ax=ax, shrink=0.8)
    cb.set_label("fraction of the true class (sqrt scale; tick colour = bucket)")
    _save(fig, path)
    return [data.confusion_labels[i] for i in keep]


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
    return (f'<table id="{_e(table_id)}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def render_html(data: ReportData, figures: dict[str, str], *, shown_confusion: list[int]) -> str:
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

    parts.append("<h2>Accuracy per bucket</h2>")
    parts.append('<p class="muted">From the <code>runs</code> table: <code>SELECT run_id, head, loss, '
                 + ", ".join(METRIC_COLUMNS) + " FROM runs</code>.</p>")
    cols = ["run_id", "head", "loss", "sampler", "features", *METRIC_COLUMNS, "epochs", "train_seconds"]
    parts.append(_table(data.runs, cols, table_id="runs", text_cols=("run_id", "head", "loss", "sampler", "features")))
    if "buckets" in figures:
        parts.append(f'<p><img src="{_e(figures["buckets"])}" alt="accuracy per bucket, one bar per run"></p>')

    parts.append("<h3>Check: the same accuracies from <code>predictions</code></h3>")
    parts.append('<p class="muted"><code>predictions</code> joined to <code>classes</code> on the label, '
                 f"split <code>{_e(data.eval_split)}</code>, averaged over samples of each bucket.</p>")
    parts.append(_table(data.bucket_from_predictions, ["run_id", "bucket", "n", "correct", "accuracy"],
                        table_id="bucket_from_predictions", text_cols=("run_id", "bucket")))

    parts.append("<h2>Per-class accuracy</h2>")
    if "per_class" in figures:
        parts.append(f'<p><img src="{_e(figures["per_class"])}" alt="per-class accuracy against train count"></p>')
    for run_id in data.run_ids:
        rows = data.per_class.get(run_id, [])
        parts.append(f"<details{' open' if run_id == data.run_ids[0] and len(rows) <= 30 else ''}>"
                     f"<summary>classes of run <code>{_e(run_id)}</code> ({len(rows)} classes)</summary>")
        parts.append(_table(rows, ["label", "name", "bucket", "train_count", "n", "correct", "accuracy"],
                            table_id=f"per_class-{run_id}", text_cols=("name", "bucket")))
        parts.append("</details>")

    parts.append("<h2>Confusion matrix</h2>")
    if "confusion" in figures:
        parts.append(f'<p><img src="{_e(figures["confusion"])}" alt="confusion matrix"></p>')
    if len(shown_confusion) < len(data.confusion_labels):
        parts.append(f'<p class="muted">Showing the {len(shown_confusion)} classes with the most errors '
                     f"(as true or predicted class) of {len(data.confusion_labels)}.</p>")
    parts.append("<h3>Most frequent confusions</h3>")
    parts.append(_table(data.top_confusions, ["label", "name", "prediction", "predicted_name", "n", "row_fraction"],
                        table_id="top_confusions", text_cols=("name", "predicted_name")))

    parts.append("<h2>Embedding projection</h2>")
    if "projection" in figures:
        p = data.projection
        parts.append(f'<p class="muted">Embedding set <code>emb_{_e(p["embedding_set"])}</code>, {p["n"]} samples '
                     f'of split <code>{_e(p["split"])}</code> (deterministic hash sample, streamed from the store), '
                     f'{_e(p["method"])}.</p>')
        parts.append(f'<p><img src="{_e(figures["projection"])}" alt="2-D projection of embeddings by bucket"></p>')
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
def write_report(store: "Store", run_id: str, *, compare: list[str] | tuple[str, ...] = (),
                 out_dir: str | Path, embedding_set: str | None = None, max_points: int = 3000,
                 projection: ProjectionMethod = "auto", max_confusion_classes: int = 20) -> Path:
    """Write ``out_dir/index.html`` (+ PNG figures, ``report.json``) for ``run_id`` compared with ``compare``.

    ``embedding_set``: set to project (default: the first feature set of the run that is in the store).
    ``max_points``: at most this many evaluation samples in the projection. Returns the HTML path.
    """
    if max_confusion_classes < 2:
        raise ValueError(f"max_confusion_classes must be >= 2, got {max_confusion_classes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data, points = collect(store, run_id, compare=compare, embedding_set=embedding_set, max_points=max_points,
                           projection=projection, max_confusion_classes=max_confusion_classes)
    import matplotlib

    figures: dict[str, str] = {}
    with matplotlib.rc_context(_style()):
        plot_per_class(data, out / "per_class_accuracy.png")
        figures["per_class"] = "per_class_accuracy.png"
        plot_buckets(data, out / "buckets.png")
        figures["buckets"] = "buckets.png"
        shown = plot_confusion(data, out / "confusion.png", max_classes=max_confusion_classes)
        figures["confusion"] = "confusion.png"
        if points is not None:
            plot_projection(data, points, out / "projection.png")
            figures["projection"] = "projection.png"
    html_path = out / "index.html"
    html_path.write_text(render_html(data, figures, shown_confusion=shown), encoding="utf-8")
    proj = {k: v for k, v in data.projection.items() if k not in ("sample_ids", "buckets", "labels")}
    if points is not None:
        proj["points"] = [{"sample_id": s, "label": lab, "bucket": b, "x": float(p[0]), "y": float(p[1])}
                          for s, lab, b, p in zip(data.projection["sample_ids"], data.projection["labels"],
                                                  data.projection["buckets"], points)]
    doc = {"run_id": data.run_ids[0], "compare": data.run_ids[1:], "store": data.store_root,
           "store_version": data.store_version, "eval_split": data.eval_split,
           "bucket_thresholds": data.bucket_thresholds, "runs": data.runs,
           "bucket_from_predictions": data.bucket_from_predictions, "per_class": data.per_class,
           "confusion": {"labels": data.confusion_labels, "names": data.confusion_names,
                         "counts": data.confusion_counts, "shown_labels": shown},
           "top_confusions": data.top_confusions, "projection": proj, "figures": figures, "notes": data.notes}
    (out / "report.json").write_text(json.dumps(doc, indent=1, default=_plain), encoding="utf-8")
    return html_path


__all__ = ["write_report", "collect", "ReportData", "project_2d", "sample_embeddings", "per_class_accuracy",
           "bucket_accuracy", "confusion_counts", "load_runs", "evaluation_split"]
