"""``--export``: the fine-tuned backbone's pooled features of every sample as embedding set ``ft_<run_id>``.

Every ``samples`` row at the pinned version (all splits, as ``extract`` does by default) goes through the
backbone's evaluation transform (uint8 in workers, normalised on the device) and ``model.features`` (EMA
weights with ``--ema``). The rows (view 0) and an ``embedding_sets`` row whose provenance names the run
(run id, checkpoint path and sha256, backbone provenance, adapt mode) are written by the run's finishing
transaction (:func:`featurelt.finetune.runs.write_finished`); ``train-head --features ft_<run_id>`` reads them.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from featurelt.store import Store, command_line, utcnow


def export_rows(model: Any, pinned: Store, *, run_id: str, cfg: Any, backbone: Any, eval_image: Any, norm: Any,
                device: torch.device, checkpoint: str | None, rejects: list[dict[str, Any]]) -> tuple[pa.Table, pa.Table]:
    """(``emb_ft_<run_id>`` rows, its ``embedding_sets`` row)."""
    from featurelt import __version__
    from featurelt.encoders.weights import file_sha256
    from featurelt.finetune.data import TrainRows
    from featurelt.finetune.train import forward_rows

    table = pinned.dataset("samples").to_table(columns=["sample_id"])
    n = table.num_rows
    ids = np.asarray(table.column("sample_id").to_pylist(), dtype=object)
    rows = TrainRows(np.arange(n, dtype=np.int64), ids, np.zeros(n, np.int64), np.zeros(n, np.int64),
                     np.full(n, "original"))
    kept, feats = forward_rows(model, pinned, rows, eval_image, norm, device, batch_size=cfg.batch_size,
                               num_workers=cfg.loader_workers, fn=model.features, skip_bad=True, rejects=rejects,
                               amp=cfg.amp, stage="export")
    feats = feats.float().numpy()
    if len(kept) == 0:
        raise ValueError(f"--export: no sample image of store version {pinned.version} could be read")
    name = f"ft_{run_id}"
    sha = file_sha256(checkpoint) if checkpoint else None
    run_prov = run_provenance(run_id, cfg=cfg, backbone=backbone, checkpoint=checkpoint, checkpoint_sha256=sha)
    fingerprint = export_fingerprint(run_id, sha, run_prov["preprocessing"])
    dim = int(feats.shape[1])
    vectors = pa.table({"sample_id": pa.array(ids[kept].tolist(), pa.string()),
                        "view": pa.array(np.zeros(len(kept), np.int32)),
                        "aug_strength": pa.array(np.zeros(len(kept), np.float32)),
                        "fingerprint": pa.array([fingerprint] * len(kept), pa.string()),
                        "vector": pa.FixedSizeListArray.from_arrays(pa.array(feats.ravel(), pa.float32()), dim)})
    now = utcnow()
    prov = {**run_prov, "product": "embedding", "dim": dim, "dtype": "float32", "featurelt_version": __version__,
            "store_version_read": pinned.version, "views": 0, "time": now.isoformat() + "Z", "command": command_line()}
    meta = pa.table({"name": [name], "encoder": [f"finetuned:{run_id}"], "product": ["embedding"],
                     "dim": pa.array([dim], pa.int32()), "dtype": ["float32"], "fingerprint": [fingerprint],
                     "provenance": [json.dumps(prov, sort_keys=True, default=str)],
                     "rows": pa.array([len(kept)], pa.int64()), "time": pa.array([now], pa.timestamp("us"))})
    return vectors, meta


def export_fingerprint(run_id: str, checkpoint_sha256: str | None, preprocessing: Any) -> str:
    """The fingerprint of ``ft_<run_id>`` rows: sha256 of the run id, its checkpoint's sha256 and the evaluation
    preprocessing. ``featurelt extract finetuned:<run_id>`` (:mod:`featurelt.encoders.finetuned`) uses the same,
    so it skips the rows the export wrote."""
    return hashlib.sha256(json.dumps({"finetune_run": run_id, "checkpoint_sha256": checkpoint_sha256,
                                      "preprocessing": preprocessing}, sort_keys=True,
                                     default=str).encode()).hexdigest()


def run_provenance(run_id: str, *, cfg: Any, backbone: Any, checkpoint: str | None,
                   checkpoint_sha256: str | None) -> dict[str, Any]:
    """The provenance entries naming the run (encoder ``finetuned:<run_id>``, run id, backbone, adapt mode, EMA,
    checkpoint path and sha256, backbone provenance, preprocessing, trained): the export's and the encoder's."""
    return {"encoder": f"finetuned:{run_id}", "family": "finetuned", "finetune_run": run_id,
            "backbone": backbone.name, "adapt": cfg.adapt, "ema": cfg.ema, "checkpoint": checkpoint,
            "checkpoint_sha256": checkpoint_sha256, "backbone_provenance": backbone.provenance,
            "preprocessing": backbone.provenance.get("preprocessing"),
            # trained: pretrained weights, or a backbone that fine-tuning changed (not --adapt frozen on random init)
            "trained": bool(backbone.provenance.get("trained", True)) or cfg.adapt != "frozen"}


__all__ = ["export_rows", "export_fingerprint", "run_provenance"]
