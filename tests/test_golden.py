"""Golden vectors: what ``featurelt extract`` writes for 64 digits images stays what it was (issue 15).

``tests/golden/extract_digits64.npz`` was recorded on the code before the image pipeline was split
out of ``extract.py`` / ``encoders/base.py`` (commit e018765 + 1aa10d3): for each embedding set
(``pixels``, ``clip_tiny``, ``sam_tiny_latent``, ``sam_tiny_pca_map``, ``dinov2_tiny_cls``) the
sample ids (sorted) and their view-0 float32 vectors. The test ingests the same 64 images
(``ingest --builtin digits --limit 64``) and runs the same commands on the CPU.

Comparison: ``pixels`` is exact everywhere (uint8 resampling and one division per value). The
neural encoders are compared within ``atol=1e-5, rtol=1e-4`` everywhere: their float32
reduction order depends on the kernels oneDNN picks for the CPU model and thread count, and two hosts
with the same torch, thread count and CPU capability string (AVX512) were measured 1.2e-7 apart
(clip_tiny). The tolerance is float32 rounding of 64- to 256-term sums, far below what a moved
transform step (a one-grey-level difference moves values by ~1e-3) would change.

Record again (only when a change of numbers is intended):
``FEATURELT_GOLDEN_RECORD=1 python -m pytest -q tests/test_golden.py``.
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np
import pytest

from featurelt.cli import main
from featurelt.store import Store

torch = pytest.importorskip("torch")

GOLDEN = Path(__file__).parent / "golden" / "extract_digits64.npz"
N_IMAGES = 64
RUNS: list[list[str]] = [  # extract arguments; each makes the sets listed in SETS
    ["pixels"],
    ["clip:tiny"],
    ["sam:tiny", "--products", "latent", "pca_map"],
    ["dinov2:tiny"],
]
SETS = {"pixels": "pixels", "clip_tiny": "clip:tiny", "sam_tiny_latent": "sam:tiny",
        "sam_tiny_pca_map": "sam:tiny", "dinov2_tiny_cls": "dinov2:tiny"}
EXACT_EVERYWHERE = {"pixels"}


def _machine() -> str:
    """The recording machine (stored with the golden file for information)."""
    return json.dumps({"machine": platform.machine(), "cpu": torch.backends.cpu.get_cpu_capability(),
                       "threads": torch.get_num_threads(), "torch": torch.__version__}, sort_keys=True)


def _extract_all(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Ingest 64 digits and run every extract of RUNS on the CPU: ``{set: (sample_ids, vectors)}``."""
    assert main(["--store", str(root), "ingest", "--builtin", "digits", "--limit", str(N_IMAGES)]) == 0
    for args in RUNS:
        assert main(["--store", str(root), "extract", *args, "--device", "cpu", "--no-progress"]) == 0, args
    store = Store(root)
    out = {}
    for set_name in SETS:
        t = store.read(f"emb_{set_name}", columns=["sample_id", "view", "vector"]).sort_by("sample_id")
        assert set(t.column("view").to_pylist()) == {0}
        ids = np.asarray(t.column("sample_id").to_pylist())
        vecs = np.asarray(t.column("vector").to_pylist(), dtype=np.float32)
        out[set_name] = (ids, vecs)
    return out


def test_extract_writes_the_golden_vectors(tmp_path: Path) -> None:
    got = _extract_all(tmp_path / "store")
    if os.environ.get("FEATURELT_GOLDEN_RECORD"):
        GOLDEN.parent.mkdir(exist_ok=True)
        arrays = {"machine": np.asarray(_machine())}
        for set_name, (ids, vecs) in got.items():
            arrays[f"{set_name}/sample_id"] = ids
            arrays[f"{set_name}/vector"] = vecs
        np.savez_compressed(GOLDEN, **arrays)
    golden = np.load(GOLDEN)
    assert sorted({k.split("/")[0] for k in golden.files if "/" in k}) == sorted(SETS)
    for set_name, (ids, vecs) in got.items():
        want_ids, want = golden[f"{set_name}/sample_id"], golden[f"{set_name}/vector"]
        assert len(want_ids) == N_IMAGES and want.dtype == np.float32
        np.testing.assert_array_equal(ids, want_ids, err_msg=set_name)
        assert vecs.shape == want.shape, set_name
        if set_name in EXACT_EVERYWHERE:
            np.testing.assert_array_equal(vecs, want, err_msg=f"{set_name} (bit-identical expected)")
        else:
            np.testing.assert_allclose(vecs, want, rtol=1e-4, atol=1e-5, err_msg=set_name)
