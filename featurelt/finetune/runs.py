"""``finetune_runs`` rows (schemas/finetune_runs.json) and the one transaction that ends a fine-tune run.

:func:`write_started` appends the row with status ``running`` when a run starts (its own transaction);
:func:`mark` changes the status (``interrupted`` on Ctrl-C); :func:`write_finished` replaces the row with the
finished one and, in the same transaction, appends the ``runs`` + ``predictions`` rows of each evaluated
split (train-head's row builders), the ``rejects`` rows and the ``--export`` embedding set with its
``embedding_sets`` row. :func:`write_position` / :func:`read_position`: the checkpoint's ``last.json`` sidecar (a
file beside ``last.pt``, no store write), read by ``featurelt runs`` for unfinished runs.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa

from featurelt.store import Store, utcnow


def _lit(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def pinned_versions(pinned: Store, cfg: Any) -> dict[str, Any]:
    versions = pinned.table_versions()
    read = ["samples", "classes"] + (["text_embeddings"] if cfg.text_set else [])
    return {"store_version": pinned.version, "as_of": cfg.as_of, "tables": {t: versions[t] for t in read if t in versions}}


def _row(*, run_id: str, cfg: Any, backbone: Any, pinned: Store, trainable: int, total: int, run_dir: str,
         status: str, time: Any, finished: Any = None, history: list[dict[str, Any]] | None = None,
         acc_all: float | None = None, checkpoint: str | None = None, perf: dict[str, Any] | None = None,
         export_set: str | None = None) -> pa.Table:
    from featurelt.encoders.weights import file_sha256

    perf = perf or {}
    return pa.table({
        "run_id": [run_id], "time": pa.array([time], pa.timestamp("us")), "status": [status],
        "finished_time": pa.array([finished], pa.timestamp("us")), "backbone": [cfg.backbone],
        "pretrained": pa.array([cfg.pretrained], pa.string()), "adapt": [cfg.adapt], "head": [cfg.head],
        "loss": [cfg.loss], "sampler": [cfg.sampler], "config": [cfg.to_yaml()],
        "pinned_versions": [json.dumps(pinned_versions(pinned, cfg), sort_keys=True)],
        "backbone_provenance": [json.dumps(backbone.provenance, sort_keys=True, default=str)],
        "trainable_params": pa.array([trainable], pa.int64()), "total_params": pa.array([total], pa.int64()),
        "epochs": pa.array([len(history or [])], pa.int32()),
        "history": [json.dumps(history or [], default=float)],
        "acc_all": pa.array([acc_all], pa.float64()), "checkpoint": pa.array([checkpoint], pa.string()),
        "checkpoint_sha256": pa.array([file_sha256(checkpoint) if checkpoint else None], pa.string()),
        "run_dir": [run_dir], "wall_seconds": pa.array([perf.get("train_seconds")], pa.float64()),
        "images_per_second": pa.array([perf.get("images_per_second")], pa.float64()),
        "data_stall_fraction": pa.array([perf.get("data_stall_fraction")], pa.float64()),
        "peak_memory_bytes": pa.array([perf.get("peak_memory_bytes")], pa.int64()),
        "export_set": pa.array([export_set], pa.string()),
    })


def write_started(root: str, storage_options: Any, *, run_id: str, cfg: Any, backbone: Any, trainable: int,
                  total: int, pinned: Store, run_dir: str) -> None:
    row = _row(run_id=run_id, cfg=cfg, backbone=backbone, pinned=pinned, trainable=trainable, total=total,
               run_dir=run_dir, status="running", time=utcnow())
    with Store(root, storage_options=storage_options).transaction(f"finetune {run_id}: started") as tx:
        tx.append("finetune_runs", row)


def mark(root: str, storage_options: Any, run_id: str, *, status: str, checkpoint: str | None) -> None:
    from featurelt.encoders.weights import file_sha256

    values = {"status": _lit(status)}
    if checkpoint:
        values.update(checkpoint=_lit(checkpoint), checkpoint_sha256=_lit(file_sha256(checkpoint)))
    with Store(root, storage_options=storage_options).transaction(f"finetune {run_id}: {status}") as tx:
        tx.update("finetune_runs", values, where=f"run_id = {_lit(run_id)}")


def write_finished(root: str, storage_options: Any, *, run_id: str, cfg: Any, backbone: Any, pinned: Store,
                   trainable: int, total: int, evaluated: dict[str, dict[str, Any]], metrics: dict[str, Any],
                   checkpoint: str | None, run_dir: str, export: Any, export_set: str | None,
                   rejects: list[dict[str, Any]], message: str) -> None:
    """The finishing transaction (module docstring)."""
    from featurelt.train.head import predictions_table, runs_row

    store = Store(root, storage_options=storage_options)
    started = None
    if store.has_table("finetune_runs"):
        old = store.read("finetune_runs", columns=["time"], filter=f"run_id = {_lit(run_id)}")
        started = old.column("time")[0].as_py() if old.num_rows else None
    history = metrics.get("history", [])
    pv = pinned_versions(pinned, cfg)
    row = _row(run_id=run_id, cfg=cfg, backbone=backbone, pinned=pinned, trainable=trainable, total=total,
               run_dir=run_dir, status="finished", time=started or utcnow(), finished=utcnow(), history=history,
               acc_all=metrics["acc_all"], checkpoint=checkpoint, perf=metrics, export_set=export_set)
    with store.transaction(message or f"finetune {run_id}") as tx:
        if store.has_table("finetune_runs"):
            tx.delete("finetune_runs", f"run_id = {_lit(run_id)}")
        tx.append("finetune_runs", row)
        for split, res in evaluated.items():
            rid = run_id if split == cfg.eval_split else f"{run_id}-{split}"
            m = {**res["metrics"], **{k: v for k, v in metrics.items() if k not in res["metrics"]}, "split": split,
                 "finetune_run": run_id}
            tx.append("runs", runs_row(rid, head=f"finetune-{cfg.head}", loss=cfg.loss, sampler=cfg.sampler,
                                       features=f"finetune:{cfg.backbone}", config_yaml=cfg.to_yaml(), pinned_versions=pv,
                                       metrics=m, train_seconds=float(metrics.get("train_seconds", 0.0)),
                                       epochs=len(history), seed=cfg.seed, checkpoint=checkpoint))
            tx.append("predictions", predictions_table(rid, res["sample_ids"], split, res["labels"], res["pred"],
                                                       res["top5"], res["score"]))
        if rejects:
            tx.append("rejects", pa.Table.from_pylist(rejects, schema=pa.schema([
                ("command", pa.string()), ("stage", pa.string()), ("location", pa.string()), ("row", pa.int64()),
                ("sample_id", pa.string()), ("reason", pa.string()), ("time", pa.timestamp("us"))])))
        if export is not None:
            vectors, prov_row = export
            tx.append(f"emb_{export_set}", vectors)
            tx.append("embedding_sets", prov_row)


POSITION = "last.json"


def write_position(run_dir: Path, checkpoint_tmp: Path, *, position: dict[str, int], epochs: int) -> None:
    """Write ``run_dir/last.json`` atomically for the checkpoint ``checkpoint_tmp`` about to become ``last.pt``
    (``os.replace`` keeps its size and mtime, recorded here so that a sidecar of another checkpoint is not trusted)."""
    st = os.stat(checkpoint_tmp)
    side = {"position": {k: int(v) for k, v in position.items()}, "epochs": int(epochs),
            "checkpoint_bytes": st.st_size, "checkpoint_mtime_ns": st.st_mtime_ns}
    tmp = Path(run_dir) / (POSITION + ".tmp")
    tmp.write_text(json.dumps(side, sort_keys=True))
    os.replace(tmp, Path(run_dir) / POSITION)


def read_position(run_dir: str) -> dict[str, Any] | None:
    """``{"epoch", "batch", "step", "epochs", "checkpoint"}`` of ``run_dir/last.pt`` from its sidecar; None when
    there is no checkpoint, no sidecar, or the sidecar describes another file than the ``last.pt`` there."""
    path = os.path.join(run_dir, "last.pt")
    try:
        st = os.stat(path)
        with open(os.path.join(run_dir, POSITION)) as f:
            side = json.load(f)
        if side["checkpoint_bytes"] != st.st_size or side["checkpoint_mtime_ns"] != st.st_mtime_ns:
            return None
        pos = side["position"]
        return {"epoch": int(pos["epoch"]), "batch": int(pos.get("batch", 0)), "step": int(pos["step"]),
                "epochs": int(side["epochs"]), "checkpoint": path}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def progress_text(pos: dict[str, Any]) -> str:
    """``epoch 2/3 (batch 4), step 40`` (where ``--resume`` continues) or ``3/3 epochs trained, step 40``."""
    if pos["epoch"] >= pos["epochs"]:
        return f"{pos['epochs']}/{pos['epochs']} epochs trained, step {pos['step']}"
    batch = f" (batch {pos['batch']})" if pos["batch"] else ""
    return f"epoch {pos['epoch'] + 1}/{pos['epochs']}{batch}, step {pos['step']}"


__all__ = ["POSITION", "mark", "pinned_versions", "progress_text", "read_position", "write_finished", "write_position",
           "write_started"]
