"""`featurelt embeddings`: one row per embedding set with its provenance (encoder, weights, trained, rows, time)."""
from __future__ import annotations

import json
from datetime import datetime

import numpy as np
import pyarrow as pa

from featurelt.cli import main
from featurelt.store import Store
from featurelt.store.schema import arrow_schema

SHA = "0123456789abcdef" * 4


def _set_rows(store: Store, name: str, prov: dict, when: datetime, n: int = 3, dim: int = 4) -> None:
    """An emb_<name> table of n rows and its embedding_sets row, as extract writes them."""
    ids = store.read("samples", columns=["sample_id"]).column(0).to_pylist()[:n]
    x = np.arange(n * dim, dtype=np.float32)
    emb = pa.table({"sample_id": ids, "view": pa.array([0] * n, pa.int32()),
                    "aug_strength": pa.array([0.0] * n, pa.float32()), "fingerprint": ["fp"] * n,
                    "vector": pa.FixedSizeListArray.from_arrays(pa.array(x), dim)})
    row = {"name": name, "encoder": prov["encoder"], "product": "cls", "dim": dim, "dtype": "float32",
           "fingerprint": f"fp-{name}", "provenance": json.dumps(prov), "rows": n, "time": when}
    with store.transaction(f"extract {name}") as tx:
        tx.append(f"emb_{name}", emb)
        tx.append("embedding_sets", pa.Table.from_pylist([row], schema=arrow_schema("embedding_sets")))


def test_embeddings_lists_provenance(tmp_path, capsys) -> None:
    root = str(tmp_path / "store")
    assert main(["--store", root, "ingest", "--builtin", "digits", "--limit", "40", "--no-progress"]) == 0
    assert main(["--store", root, "extract", "pixels", "--no-progress"]) == 0
    store = Store(root)
    _set_rows(store, "dino", {"encoder": "dinov2:small", "family": "dinov2", "checkpoint_sha256": SHA,
                              "trained": True, "seed": None}, datetime(2026, 3, 4, 5, 6, 7))
    _set_rows(store, "tuned", {"encoder": "clip:ViT-B-32", "family": "clip", "checkpoint_sha256": SHA,
                               "tag": "lora-r8", "trained": True}, datetime(2026, 3, 5, 0, 0, 0), n=5)
    capsys.readouterr()

    assert main(["--store", root, "embeddings"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header == ["name", "encoder", "product", "dim", "dtype", "rows", "trained", "weights", "runs", "time"]
    rows = {ln.split()[0]: ln.split() for ln in lines[2:] if ln and not ln.startswith("(")}
    assert rows["dino"][1:8] == ["dinov2:small", "cls", "4", "float32", "3", "true", SHA[:12]]
    assert " ".join(rows["dino"][9:]) == "2026-03-04 05:06:07"
    assert rows["tuned"][5:8] == ["5", "true", "lora-r8"]                       # a tag names the weights
    assert rows["pixels"][1:8] == ["pixels", "pixels", "784", "float32", "40", "false", "none"]

    assert main(["--store", root, "embeddings", "--json"]) == 0
    listed = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert listed["dino"]["trained"] is True and listed["dino"]["weights"] == SHA[:12]
    assert listed["dino"]["provenance"]["checkpoint_sha256"] == SHA              # the full provenance
    prov = json.loads(Store(root).read("embedding_sets", filter="name = 'pixels'").column("provenance")[0].as_py())
    assert listed["pixels"]["provenance"] == prov and listed["pixels"]["fingerprint"]
