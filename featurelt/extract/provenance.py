"""Provenance of embedding sets: the ``embedding_sets`` rows of a run, and the fitted state recorded in them."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from featurelt.extract.plan import sql_str
from featurelt.extract.views import RANDAUGMENT_BINS, RANDAUGMENT_NUM_OPS
from featurelt.store import Store
from featurelt.store.core import command_line

if TYPE_CHECKING:
    from featurelt.encoders.base import Encoder


def stored_fit_state(store: Store, set_name: str, encoder_name: str, product: str) -> dict[str, Any] | None:
    """The fitted state recorded in the latest provenance row of ``set_name`` (None when there is none)."""
    if not store.has_table("embedding_sets"):
        return None
    rows = store.read("embedding_sets", filter=f"name = {sql_str(set_name)}").to_pylist()
    for row in sorted(rows, key=lambda r: r["time"], reverse=True):
        if row["encoder"] == encoder_name and row["product"] == product:
            state = json.loads(row["provenance"]).get("fit", {}).get(product)
            if state is not None:
                return state
    return None


def provenance_rows(encoder: "Encoder", sets: dict[str, str], fingerprints: dict[str, str], added: dict[str, int],
                     *, dtype: str, read_versions: dict[str, int], store_version: int, views: int,
                     augment: str | None, split: str | None, limit: int | None, engine: str,
                     device: str, now: Any, resize_on: str = "host") -> pa.Table:
    """One ``embedding_sets`` row per product; ``now`` (the run's start) is its ``time``."""
    from featurelt import __version__

    base = dict(encoder.provenance())
    rows = []
    for product, set_name in sets.items():
        prov = {**base, "encoder": encoder.name, "product": product, "dim": int(encoder.products[product]),
                "dtype": dtype, "featurelt_version": __version__, "time": now.isoformat() + "Z",
                "store_version_read": store_version, "tables_read": read_versions, "split": split,
                "limit": limit, "views": views, "augment": augment, "engine": engine, "device": device,
                "resize_on": resize_on,
                "command": command_line()}
        if views:
            prov["augmentation"] = {"op": "torchvision.transforms.RandAugment", "num_ops": RANDAUGMENT_NUM_OPS,
                                    "num_magnitude_bins": RANDAUGMENT_BINS,
                                    "magnitude": "round(aug_strength * 30)", "aug_strength": "view / views",
                                    "seed": "sha256(seed:sample_id:view)", "methods": "METHODS.md section 5"}
        rows.append({"name": set_name, "encoder": encoder.name, "product": product,
                     "dim": int(encoder.products[product]), "dtype": dtype, "fingerprint": fingerprints[product],
                     "provenance": json.dumps(prov, sort_keys=True, default=str), "rows": int(added[product]),
                     "time": now})
    return pa.Table.from_pylist(rows, schema=pa.schema([
        ("name", pa.string()), ("encoder", pa.string()), ("product", pa.string()), ("dim", pa.int32()),
        ("dtype", pa.string()), ("fingerprint", pa.string()), ("provenance", pa.string()), ("rows", pa.int64()),
        ("time", pa.timestamp("us"))]))
