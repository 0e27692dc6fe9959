"""featurelt.metrics against hand-computed values (METHODS.md section 0)."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from featurelt.metrics import (accuracy, bucket_accuracy, buckets_from_classes, compute_metrics, confusion_pairs,
                               head_tail_gap, macro_f1, per_class_accuracy)

# 4 classes: 0 many, 1 medium, 2 few, 3 few
BUCKETS = np.array(["many", "medium", "few", "few"], dtype=object)
LABELS = np.array([0, 0, 0, 0, 1, 1, 2, 2, 3, 3])
PREDS = np.array([0, 0, 0, 1, 1, 0, 2, 0, 0, 0])


def test_accuracy_and_buckets_by_hand():
    assert accuracy(LABELS, PREDS) == pytest.approx(5 / 10)  # rows 0, 1, 2, 4, 6
    acc = bucket_accuracy(LABELS, PREDS, BUCKETS)
    assert acc == {"many": pytest.approx(3 / 4), "medium": pytest.approx(1 / 2), "few": pytest.approx(1 / 4)}
    assert head_tail_gap(acc) == pytest.approx(3 / 4 - 1 / 4)


def test_per_class_accuracy_nan_for_absent_class():
    pca = per_class_accuracy(LABELS, PREDS, num_classes=5)
    np.testing.assert_allclose(pca[:4], [0.75, 0.5, 0.5, 0.0])
    assert math.isnan(pca[4])


def test_macro_f1_by_hand():
    # class 0: tp 3, fp 4 (1 from class1, 1 from class2, 2 from class3), fn 1 -> P 3/7 R 3/4 F1 = 6/11
    # class 1: tp 1, fp 1, fn 1 -> F1 1/2; class 2: tp 1, fp 0, fn 1 -> F1 2/3; class 3: F1 0
    expected = (6 / 11 + 1 / 2 + 2 / 3 + 0) / 4
    assert macro_f1(LABELS, PREDS) == pytest.approx(expected)


def test_empty_bucket_is_none_and_gap_none():
    acc = bucket_accuracy(np.array([0, 1]), np.array([0, 1]), np.array(["many", "medium"], dtype=object))
    assert acc["few"] is None
    assert head_tail_gap(acc) is None


def test_confusion_pairs_order():
    assert confusion_pairs(LABELS, PREDS, top=2) == [(3, 0, 2), (0, 1, 1)]
    assert confusion_pairs(LABELS, LABELS) == []


def test_buckets_from_classes_and_compute_metrics():
    classes = pa.table({"label": pa.array([2, 0, 1, 3, 4], pa.int32()),
                        "bucket": ["few", "many", "medium", "few", None]})
    b = buckets_from_classes(classes)
    assert b.tolist() == ["many", "medium", "few", "few", None]
    m = compute_metrics(LABELS, PREDS, b)
    assert m["acc_all"] == pytest.approx(0.5) and m["acc_few"] == pytest.approx(0.25)
    assert m["per_class_accuracy"][4] is None and len(m["per_class_accuracy"]) == 5
    assert m["confusion_pairs"][0] == [3, 0, 2]


def test_bad_input_names_shapes():
    with pytest.raises(ValueError, match="same length"):
        accuracy(np.array([0, 1]), np.array([0]))
    with pytest.raises(ValueError, match="labels must be 0.."):
        buckets_from_classes(pa.table({"label": pa.array([0, 2], pa.int32()), "bucket": ["many", "few"]}))
