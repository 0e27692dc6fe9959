"""The ``classes`` table: the label registry, per-class train counts and many / medium / few buckets.

Buckets follow METHODS.md section 0: ``many`` when ``train_count > many``, ``few`` when
``train_count < few``, ``medium`` otherwise (defaults 100 / 20, configurable because small data sets
need relative thresholds). ``train_count`` counts rows with ``split='train'`` and ``source='original'``;
auxiliary classes get a null bucket. The table is rebuilt (``tx.overwrite``) by every command that
changes samples' splits or labels (``ingest``, ``make-lt``).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa

if TYPE_CHECKING:
    import lance

    from featurelt.store.core import Store, Transaction

Bucket = Literal["many", "medium", "few"]
DEFAULT_MANY = 100  # many when train_count > 100 (METHODS.md section 0)
DEFAULT_FEW = 20    # few when train_count < 20
TRAIN_FILTER = "split = 'train' AND source = 'original'"


def check_thresholds(many: int, few: int) -> None:
    """Refuse thresholds that cannot define three ordered buckets."""
    if isinstance(many, bool) or isinstance(few, bool) or not isinstance(many, int) or not isinstance(few, int):
        raise ValueError(f"bucket thresholds must be integers, got many={many!r}, few={few!r}")
    if few < 0 or many < 0:
        raise ValueError(f"bucket thresholds must be >= 0, got many={many}, few={few}")
    if few > many + 1:
        raise ValueError(f"--few ({few}) must be <= --many + 1 ({many + 1}): few means train_count < few, "
                         f"many means train_count > many")


def bucket_for(train_count: int, *, many: int = DEFAULT_MANY, few: int = DEFAULT_FEW) -> Bucket:
    """``many`` if ``train_count > many``, ``few`` if ``train_count < few``, else ``medium``."""
    if train_count > many:
        return "many"
    if train_count < few:
        return "few"
    return "medium"


def assign_buckets(train_counts: Mapping[int, int], *, many: int = DEFAULT_MANY,
                   few: int = DEFAULT_FEW) -> dict[int, Bucket]:
    """Bucket of every label in ``train_counts`` (a pure function of the counts and thresholds)."""
    check_thresholds(many, few)
    return {label: bucket_for(n, many=many, few=few) for label, n in train_counts.items()}


def train_counts(samples: "lance.LanceDataset") -> dict[int, int]:
    """``{label: rows with split='train' and source='original'}`` of a samples dataset (streamed)."""
    counts: dict[int, int] = {}
    for batch in samples.to_batches(columns=["label"], filter=TRAIN_FILTER, batch_size=65536):
        vc = batch.column("label").value_counts()
        for item in vc:
            label = item["values"].as_py()
            counts[label] = counts.get(label, 0) + item["counts"].as_py()
    return counts


def classes_table(rows: Iterable[Mapping[str, Any]], counts: Mapping[int, int], *, many: int,
                  few: int) -> pa.Table:
    """The classes table from registry rows (label, name, source, neighbor_of) and train counts."""
    check_thresholds(many, few)
    out: dict[str, list[Any]] = {k: [] for k in ("label", "name", "source", "neighbor_of", "train_count",
                                                 "bucket", "bucket_many", "bucket_few")}
    for r in sorted(rows, key=lambda r: r["label"]):
        n = int(counts.get(r["label"], 0))
        out["label"].append(r["label"])
        out["name"].append(r["name"])
        out["source"].append(r["source"])
        out["neighbor_of"].append(r.get("neighbor_of"))
        out["train_count"].append(n)
        out["bucket"].append(None if r["source"] == "auxiliary" else bucket_for(n, many=many, few=few))
        out["bucket_many"].append(many)
        out["bucket_few"].append(few)
    return pa.table({
        "label": pa.array(out["label"], pa.int32()), "name": pa.array(out["name"], pa.string()),
        "source": pa.array(out["source"], pa.string()), "neighbor_of": pa.array(out["neighbor_of"], pa.int32()),
        "train_count": pa.array(out["train_count"], pa.int64()), "bucket": pa.array(out["bucket"], pa.string()),
        "bucket_many": pa.array(out["bucket_many"], pa.int64()), "bucket_few": pa.array(out["bucket_few"], pa.int64()),
    })


def current_thresholds(store: "Store") -> tuple[int, int]:
    """The thresholds the store's classes table uses (defaults 100 / 20 when there is none yet)."""
    if not store.has_table("classes") or store.count("classes") == 0:
        return DEFAULT_MANY, DEFAULT_FEW
    t = store.read("classes", columns=["bucket_many", "bucket_few"])
    return int(t.column("bucket_many")[0].as_py()), int(t.column("bucket_few")[0].as_py())


def samples_in_transaction(tx: "Transaction") -> "lance.LanceDataset":
    """The samples dataset as the transaction has written it so far (else as the store has it)."""
    import lance

    version = tx.new_versions.get("samples", tx.base_versions.get("samples"))
    if version is None:
        raise ValueError("the store has no samples table yet: run `featurelt ingest` first")
    return lance.dataset(tx.store.uri("samples"), version=version, storage_options=tx.store.storage_options)


def rebuild_classes(tx: "Transaction", *, registry: Iterable[Mapping[str, Any]] | None = None,
                    many: int | None = None, few: int | None = None) -> pa.Table:
    """Overwrite ``classes`` inside ``tx`` from the samples the transaction sees.

    registry: rows with label, name, source, neighbor_of (default: the store's current classes table).
    many / few: bucket thresholds (default: those the classes table uses now, else 100 / 20).
    Returns the written table.
    """
    store = tx.store
    if registry is None:
        if not store.has_table("classes"):
            raise ValueError(f"store {store.root} has no classes table: run `featurelt ingest` first")
        registry = store.read("classes", columns=["label", "name", "source", "neighbor_of"]).to_pylist()
    cur_many, cur_few = current_thresholds(store)
    many = cur_many if many is None else many
    few = cur_few if few is None else few
    registry = list(registry)
    counts = train_counts(samples_in_transaction(tx))
    unknown = sorted(set(counts) - {r["label"] for r in registry})
    if unknown:
        raise ValueError(f"samples have labels {unknown[:10]} that the classes table does not name")
    table = classes_table(registry, counts, many=many, few=few)
    tx.overwrite("classes", table)
    return table
