"""Fine-tune checkpoints: atomic ``last.pt`` in the run directory, read back with ``weights_only=True``; resume lookup.

A checkpoint holds tensors and plain containers only: the model's ``state_dict`` (LoRA layers included),
optimizer, scheduler, GradScaler and EMA states, the sampler's array state (momentum's per-sample losses), the
recipe hooks' ``state_dict()`` (ECVL's momentum loss M_i),
the position (``epoch``, ``batch`` within it, optimizer ``step``), the history so far, the RNG states (torch,
CUDA, numpy, python) and the run's config as YAML. It is written to ``last.pt.tmp`` and moved over ``last.pt``
with ``os.replace``, so a kill at any moment leaves the previous or the new checkpoint, never a torn file.
Beside it, ``last.json`` (:func:`featurelt.finetune.runs.write_position`, replaced just before ``last.pt``) holds the
position, the run's epoch count and ``last.pt``'s size and mtime, so that ``featurelt runs`` shows where a killed or
interrupted run resumes without loading the checkpoint (a sidecar whose size / mtime do not match is ignored).
"""
from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featurelt.store import Store

CHECKPOINT = "last.pt"


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py = random.getstate()
    return {"torch": torch.random.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
            "python": {"version": py[0], "state": torch.tensor(py[1], dtype=torch.int64), "gauss": py[2]}}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.random.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))


def _sampler_state(sampler: Any) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in vars(sampler).items()
            if isinstance(v, np.ndarray) and v.dtype.kind in "fiub"}


def save(run_dir: Path, *, model: Any, optimizer: Any, scheduler: Any, scaler: Any, ema: Any, sampler: Any,
         position: dict[str, int], history: list[dict[str, Any]], cfg: Any, backbone: str, hooks: Any = None) -> str:
    """Write ``run_dir/last.pt`` atomically (module docstring). Returns its path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CHECKPOINT
    tmp = run_dir / (CHECKPOINT + ".tmp")
    state = {"format": "featurelt-finetune-1", "backbone": backbone, "config": cfg.to_yaml(),
             "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "ema": None if ema is None else ema.state_dict(),
             "sampler": _sampler_state(sampler), "position": {k: int(v) for k, v in position.items()},
             "history": history, "rng": _rng_state(), "hooks": {} if hooks is None else hooks.state_dict()}
    torch.save(state, tmp)
    from featurelt.finetune.runs import write_position

    write_position(run_dir, tmp, position=state["position"], epochs=int(cfg.epochs))  # before last.pt: see docstring
    os.replace(tmp, path)
    return str(path)


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``; a damaged or foreign file is a ValueError naming it."""
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"fine-tune checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"fine-tune checkpoint {path} cannot be read (damaged, or not a featurelt checkpoint): "
                         f"{type(exc).__name__}: {first}") from None
    if not isinstance(state, dict) or state.get("format") != "featurelt-finetune-1":
        raise ValueError(f"{path} is not a featurelt fine-tune checkpoint")
    state["_path"] = path
    return state


def restore(state: dict[str, Any], *, model: Any, optimizer: Any, scheduler: Any, scaler: Any, ema: Any, sampler: Any,
            path: str, hooks: Any = None) -> None:
    """Load every part of ``state`` back; a model of another architecture is a ValueError naming the file."""
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:300]
        raise ValueError(f"checkpoint {path} does not fit this model (another architecture, adapt mode or "
                         f"head?): {first}") from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    if ema is not None and state.get("ema") is not None:
        ema.load_state_dict(state["ema"])
    for k, v in (state.get("sampler") or {}).items():
        if hasattr(sampler, k):
            setattr(sampler, k, v.numpy().copy())
    if hooks is not None:
        hooks.load_state_dict(state.get("hooks") or {})
    _set_rng_state(state["rng"])


def find_resume(store: Store, resume: str) -> tuple[str, Any, str]:
    """``(run_id, config, checkpoint path)`` of ``resume``: a fine-tune run id, or ``latest`` = the newest
    run whose status is not ``finished``."""
    from featurelt.finetune.config import from_dict
    from featurelt.report import sql_literal

    if not store.has_table("finetune_runs"):
        raise ValueError(f"--resume {resume}: store {store.root} has no fine-tune runs (table finetune_runs)")
    if resume == "latest":
        rows = store.sql("SELECT * FROM finetune_runs WHERE status <> 'finished' ORDER BY time DESC LIMIT 1").to_pylist()
        if not rows:
            raise ValueError("--resume latest: no unfinished fine-tune run (see featurelt runs)")
    else:
        rows = store.sql(f"SELECT * FROM finetune_runs WHERE run_id = {sql_literal(resume)}").to_pylist()
        if not rows:
            raise ValueError(f"--resume {resume}: unknown fine-tune run (see featurelt runs)")
        if rows[0]["status"] == "finished":
            raise ValueError(f"--resume {resume}: that run has finished; nothing to resume")
    row = rows[0]
    import yaml

    cfg = from_dict(yaml.safe_load(row["config"]) or {}, source=f"finetune_runs.config of {row['run_id']}")
    path = os.path.join(row["run_dir"], CHECKPOINT)
    if not os.path.exists(path):
        raise ValueError(f"--resume {row['run_id']}: no checkpoint yet at {path} (the run stopped before its first "
                         f"checkpoint; start it again)")
    return row["run_id"], cfg, path


__all__ = ["save", "load", "restore", "find_resume", "CHECKPOINT"]
