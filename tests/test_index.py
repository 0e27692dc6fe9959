"""featurelt.index: exact cosine search with faiss against numpy, and the kNN vote by hand (METHODS.md section 1)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from featurelt import index as fidx
from featurelt.index import VectorIndex, knn_votes


def test_search_matches_brute_force_cosine(monkeypatch):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(500, 24)) * rng.uniform(0.1, 10, size=(500, 1))  # norms differ: cosine, not dot
    queries = rng.normal(size=(70, 24))
    monkeypatch.setattr(fidx, "SEARCH_ROWS", 32)  # several search calls
    index = VectorIndex(24)
    for start in range(0, 500, 128):  # added in batches: ids follow the order added
        index.add(base[start:start + 128])
    assert len(index) == 500
    sims, ids = index.search(queries, 7)
    cos = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (base / np.linalg.norm(base, axis=1, keepdims=True)).T
    expect = np.argsort(-cos, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(ids, expect)
    np.testing.assert_allclose(sims, np.take_along_axis(cos, expect, axis=1), atol=1e-5)
    assert sims.dtype == np.float32 and ids.dtype == np.int64


def test_k_is_capped_and_bad_input_is_named():
    index = VectorIndex(3)
    with pytest.raises(ValueError, match="empty"):
        index.search(np.ones((1, 3)), 1)
    index.add(np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 0]]))  # a zero row stays zero: cosine 0 to all
    sims, ids = index.search(np.array([[2.0, 1.0, 0]]), 10)
    assert ids.tolist() == [[0, 1, 2]]
    np.testing.assert_allclose(sims, [[2 / math.sqrt(5), 1 / math.sqrt(5), 0.0]], atol=1e-6)
    with pytest.raises(ValueError, match=r"must be \[N, 3\], got shape=\(1, 4\)"):
        index.add(np.ones((1, 4)))
    with pytest.raises(ValueError, match="row 1 has a non-finite value"):
        index.add(np.array([[1.0, 0, 0], [np.nan, 0, 0]]))
    with pytest.raises(ValueError, match="2-D"):
        index.search(np.ones(3), 1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        index.search(np.ones((1, 3)), 0)


def test_serialised_index_searches_the_same():
    rng = np.random.default_rng(1)
    index = VectorIndex(8)
    index.add(rng.normal(size=(50, 8)))
    again = VectorIndex.from_bytes(index.to_bytes())
    q = rng.normal(size=(5, 8))
    for a, b in zip(index.search(q, 4), again.search(q, 4)):
        np.testing.assert_array_equal(a, b)


def test_knn_votes_by_hand():
    sims = np.array([[0.9, 0.5, 0.1], [0.2, 0.2, -0.3]])
    labels = np.array([[2, 0, 2], [1, 1, 1]])
    votes = knn_votes(sims, labels, 3, temperature=0.1)
    expect = np.array([[math.exp(5.0), 0.0, math.exp(9.0) + math.exp(1.0)],
                       [0.0, 2 * math.exp(2.0) + math.exp(-3.0), 0.0]])
    np.testing.assert_allclose(votes, expect, rtol=1e-12)
    with pytest.raises(ValueError, match="must be in 0..2"):
        knn_votes(sims, labels + 1, 3)
    with pytest.raises(ValueError, match="both be"):
        knn_votes(sims, labels[:, :2], 3)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        knn_votes(sims, labels, 3, temperature=0)


# -- backends (issue 18 point 5) ---------------------------------------------------------------------------
def test_torch_backend_on_cpu_finds_the_same_neighbours_as_faiss(monkeypatch):
    import featurelt.index as index_mod
    from featurelt.index import VectorIndex

    rng = np.random.default_rng(7)
    base = rng.normal(size=(600, 24)).astype(np.float32)
    queries = rng.normal(size=(70, 24)).astype(np.float32)
    ref = VectorIndex(24, backend="faiss-cpu")
    tch = VectorIndex(24, backend="torch", device="cpu")
    assert (ref.backend, tch.backend) == ("faiss-cpu", "torch")
    for part in np.array_split(base, 3):  # added in batches, as from Store.scan
        ref.add(part)
        tch.add(part)
    monkeypatch.setattr(index_mod, "TORCH_BLOCK", 600 * 16)  # 16 queries per block: the blocking is exercised
    s_ref, i_ref = ref.search(queries, 10)
    s_t, i_t = tch.search(queries, 10)
    np.testing.assert_array_equal(i_t, i_ref)
    np.testing.assert_allclose(s_t, s_ref, atol=1e-6)
    unit = base / np.linalg.norm(base, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    np.testing.assert_allclose(s_t[:, 0], (q @ unit.T).max(1), atol=1e-6)  # the formula, by hand
    assert len(tch) == 600 and tch.search(queries[:2], 1000)[1].shape == (2, 600)  # k capped
    back = VectorIndex.from_bytes(tch.to_bytes())  # checkpoints hold a CPU faiss index whatever the backend
    assert back.backend == "faiss-cpu"
    np.testing.assert_array_equal(back.search(queries, 10)[1], i_ref)
    moved = VectorIndex.from_bytes(ref.to_bytes(), backend="torch", device="cpu")
    np.testing.assert_array_equal(moved.search(queries, 10)[1], i_ref)


def test_backend_choice(monkeypatch):
    import featurelt.index as index_mod

    monkeypatch.setattr(index_mod, "faiss_gpus", lambda: 0)
    monkeypatch.setattr(index_mod, "_cuda_available", lambda: False)
    assert index_mod.resolve_backend("auto") == "faiss-cpu"
    monkeypatch.setattr(index_mod, "_cuda_available", lambda: True)
    assert index_mod.resolve_backend("auto") == "torch"
    monkeypatch.setattr(index_mod, "faiss_gpus", lambda: 1)
    assert index_mod.resolve_backend("auto") == "faiss-gpu"
    monkeypatch.setattr(index_mod, "faiss_gpus", lambda: 0)
    with pytest.raises(ValueError, match="faiss built with CUDA"):
        index_mod.resolve_backend("faiss-gpu")
    with pytest.raises(ValueError, match="unknown kNN backend 'gpu'"):
        index_mod.resolve_backend("gpu")


def test_index_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, featurelt.index as m; m.VectorIndex(4, backend='faiss-cpu'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "faiss-gpu"])
def test_gpu_backends_match_cpu_faiss(backend):
    import torch

    from featurelt.index import VectorIndex, faiss_gpus

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if backend == "faiss-gpu" and faiss_gpus() == 0:
        pytest.skip("the installed faiss has no GPU support (pip install 'featurelt[gpu]')")
    rng = np.random.default_rng(8)
    base = rng.normal(size=(20000, 64)).astype(np.float32)
    queries = rng.normal(size=(500, 64)).astype(np.float32)
    ref, gpu = VectorIndex(64, backend="faiss-cpu"), VectorIndex(64, backend=backend)
    ref.add(base)
    gpu.add(base)
    s_ref, i_ref = ref.search(queries, 10)
    s_g, i_g = gpu.search(queries, 10)
    assert (i_g == i_ref).mean() > 0.999  # float32 sums in another order may swap exact near-ties
    np.testing.assert_allclose(s_g, s_ref, atol=1e-5)
