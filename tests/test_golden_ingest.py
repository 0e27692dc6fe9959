"""Golden ingest fixture: the ``samples`` and ``classes`` rows of a small folder / CSV / split-list ingest.

Recorded before the input formats moved into ``featurelt/data/formats/`` (issue 15): re-ingesting the
same tiny inputs must give exactly these rows. Regenerate deliberately (and say why in the commit) with
``FEATURELT_REGEN_GOLDEN=1 python -m pytest tests/test_golden_ingest.py``.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from featurelt.cli import main
from featurelt.data.images import encode_png
from featurelt.store import Store

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("FEATURELT_REGEN_GOLDEN") == "1"


def digit_pngs(n: int, offset: int) -> list[tuple[int, bytes]]:
    """``n`` sklearn digits from index ``offset`` as (class, 8x8 grey PNG bytes), scaled 0..16 -> 0..255."""
    from sklearn.datasets import load_digits

    d = load_digits()
    out = []
    for i in range(offset, offset + n):
        img = np.clip(np.rint(d.images[i] * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        out.append((int(d.target[i]), encode_png(img)))
    return out


def make_inputs(base: Path) -> dict[str, list[str]]:
    """The three inputs under ``base`` and the ingest arguments of each (relative to ``base``)."""
    # folder with split subfolders: base/folder/<split>/d<class>/<i>.png
    for k, (cls, data) in enumerate(digit_pngs(12, 0)):
        split = "test" if k % 4 == 3 else "train"
        d = base / "folder" / split / f"d{cls}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{k:02d}.png").write_bytes(data)
    # CSV manifest: names, integer-free labels, one given sample id, a description, a split column
    (base / "csvimgs").mkdir()
    lines = ["path,label,split,sample_id,description"]
    for k, (cls, data) in enumerate(digit_pngs(8, 20)):
        (base / "csvimgs" / f"img{k}.png").write_bytes(data)
        sid = "given-7" if k == 7 else ""
        desc = "a hand-written digit" if k == 2 else ""
        lines.append(f"csvimgs/img{k}.png,digit{cls},{'val' if k % 3 == 0 else 'train'},{sid},{desc}")
    (base / "manifest.csv").write_text("\n".join(lines) + "\n")
    # split list: base/lt/<i>.png with integer labels
    (base / "lt").mkdir()
    split_lines = []
    for k, (cls, data) in enumerate(digit_pngs(6, 40)):
        (base / "lt" / f"{k}.png").write_bytes(data)
        split_lines.append(f"lt/{k}.png {cls + 20}")
    (base / "Small_LT_train.txt").write_text("\n".join(split_lines) + "\n")
    return {"folder": ["folder"], "csv": ["manifest.csv"],
            "split_list": ["Small_LT_train.txt", "--root", "."]}


def table_rows(store: Store, name: str, base: Path) -> list[dict[str, Any]]:
    """Rows of a table as JSON-able dicts: bytes as sha256, file URIs relative to ``base``."""
    t = store.read(name)
    out = []
    for row in t.to_pylist():
        r = {}
        for k, v in row.items():
            if isinstance(v, bytes):
                v = "sha256:" + hashlib.sha256(v).hexdigest()
            elif k == "uri" and isinstance(v, str) and Path(v).is_absolute():
                v = Path(v).relative_to(base.resolve()).as_posix()
            r[k] = v
        out.append(r)
    key = "sample_id" if name == "samples" else "label"
    return sorted(out, key=lambda r: r[key])


@pytest.mark.parametrize("kind", ["folder", "csv", "split_list"])
def test_golden_ingest(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path / "in"
    base.mkdir()
    args = make_inputs(base)[kind]
    monkeypatch.chdir(base)
    store_path = tmp_path / "store"
    assert main(["--store", str(store_path), "ingest", "--no-progress", *args]) == 0
    store = Store(store_path)
    got = {"samples": table_rows(store, "samples", base), "classes": table_rows(store, "classes", base)}
    path = GOLDEN / f"samples_{kind}.json"
    if REGEN:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(path.read_text())
    assert got["classes"] == want["classes"]
    assert len(got["samples"]) == len(want["samples"])
    for g, w in zip(got["samples"], want["samples"]):
        assert g == w
