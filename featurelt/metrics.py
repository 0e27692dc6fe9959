"""Evaluation metrics of long-tailed recognition (METHODS.md section 0; macro-F1 and gap from section 5).

Pure functions over numpy arrays of true labels and predictions (both ``[N]`` int). Bucket accuracies
are sample-level: ``acc_few`` is the fraction of correct predictions among evaluated samples whose true
class is in the few bucket -- exactly what ``SELECT avg((label = prediction)::int) FROM predictions JOIN
classes USING (label) GROUP BY bucket`` gives, so the ``runs`` row and SQL over ``predictions`` agree.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

BUCKETS = ("many", "medium", "few")


def _check(labels: np.ndarray, preds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, preds = np.asarray(labels), np.asarray(preds)
    if labels.ndim != 1 or labels.shape != preds.shape:
        raise ValueError(f"labels and predictions must be 1-D of the same length, got shapes "
                         f"{labels.shape} and {preds.shape}")
    if len(labels) == 0:
        raise ValueError("no evaluated samples")
    return labels.astype(np.int64), preds.astype(np.int64)


def accuracy(labels: np.ndarray, preds: np.ndarray) -> float:
    """Top-1 accuracy: mean of ``labels == preds`` over ``[N]`` samples."""
    labels, preds = _check(labels, preds)
    return float(np.mean(labels == preds))


def per_class_accuracy(labels: np.ndarray, preds: np.ndarray, *, num_classes: int) -> np.ndarray:
    """``[K]`` accuracy of each true class (NaN for classes without evaluated samples)."""
    labels, preds = _check(labels, preds)
    n = np.bincount(labels, minlength=num_classes).astype(float)[:num_classes]
    hit = np.bincount(labels[labels == preds], minlength=num_classes).astype(float)[:num_classes]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, hit / np.maximum(n, 1), np.nan)


def bucket_accuracy(labels: np.ndarray, preds: np.ndarray, buckets: np.ndarray) -> dict[str, float | None]:
    """``{many, medium, few: accuracy}`` over samples whose true class is in the bucket (None if none).

    buckets: ``[K]`` str, the bucket of each class label (``None``/"" for auxiliary classes).
    """
    labels, preds = _check(labels, preds)
    buckets = np.asarray(buckets, dtype=object)
    if labels.max() >= len(buckets):
        raise ValueError(f"label {int(labels.max())} has no bucket (buckets cover {len(buckets)} classes)")
    of_sample = buckets[labels]
    out: dict[str, float | None] = {}
    for b in BUCKETS:
        m = of_sample == b
        out[b] = float(np.mean(labels[m] == preds[m])) if m.any() else None
    return out


def macro_f1(labels: np.ndarray, preds: np.ndarray) -> float:
    """Macro-averaged F1 over the classes present in ``labels`` (the evaluated target classes, section 5).

    A prediction of any other class counts as a false negative of its true class.
    """
    from sklearn.metrics import f1_score

    labels, preds = _check(labels, preds)
    return float(f1_score(labels, preds, labels=np.unique(labels), average="macro", zero_division=0))


def head_tail_gap(acc: dict[str, float | None]) -> float | None:
    """``acc_many - acc_few`` (None when either bucket is empty)."""
    if acc.get("many") is None or acc.get("few") is None:
        return None
    return float(acc["many"]) - float(acc["few"])  # type: ignore[arg-type]


def confusion_pairs(labels: np.ndarray, preds: np.ndarray, *, top: int = 10) -> list[tuple[int, int, int]]:
    """The ``top`` most frequent off-diagonal ``(true, predicted, count)`` pairs, most frequent first
    (ties by true then predicted label)."""
    labels, preds = _check(labels, preds)
    wrong = labels != preds
    if not wrong.any():
        return []
    pairs, counts = np.unique(np.stack([labels[wrong], preds[wrong]], axis=1), axis=0, return_counts=True)
    order = np.lexsort((pairs[:, 1], pairs[:, 0], -counts))[:top]
    return [(int(pairs[i, 0]), int(pairs[i, 1]), int(counts[i])) for i in order]


def buckets_from_classes(classes: "pa.Table") -> np.ndarray:
    """``[K]`` object array: bucket of each label from the classes table (None for auxiliary classes).

    Labels must be 0..K-1 (the classes table's contract).
    """
    labels = np.asarray(classes.column("label").to_pylist(), dtype=np.int64)
    if not np.array_equal(np.sort(labels), np.arange(len(labels))):
        raise ValueError(f"classes table labels must be 0..{len(labels) - 1}, got {sorted(labels.tolist())[:10]}...")
    out = np.empty(len(labels), dtype=object)
    out[labels] = classes.column("bucket").to_pylist()
    return out


def compute_metrics(labels: np.ndarray, preds: np.ndarray, buckets: np.ndarray, *,
                    confusions: int = 10) -> dict[str, Any]:
    """All metrics of one evaluation (section 0): acc_all / many / medium / few, macro_f1, head_tail_gap,
    per_class_accuracy (list over the K classes of ``buckets``, None where not evaluated), confusion_pairs."""
    labels, preds = _check(labels, preds)
    acc = bucket_accuracy(labels, preds, buckets)
    pca = per_class_accuracy(labels, preds, num_classes=len(buckets))
    return {
        "acc_all": accuracy(labels, preds),
        "acc_many": acc["many"],
        "acc_medium": acc["medium"],
        "acc_few": acc["few"],
        "macro_f1": macro_f1(labels, preds),
        "head_tail_gap": head_tail_gap(acc),
        "num_evaluated": int(len(labels)),
        "per_class_accuracy": [None if np.isnan(v) else float(v) for v in pca],
        "confusion_pairs": [list(p) for p in confusion_pairs(labels, preds, top=confusions)],
    }


__all__ = ["BUCKETS", "accuracy", "per_class_accuracy", "bucket_accuracy", "macro_f1", "head_tail_gap",
           "confusion_pairs", "buckets_from_classes", "compute_metrics"]
