"""Launchers of a fine-tune run: ``local`` (this process), ``torchrun`` (DDP from RANK / WORLD_SIZE), ``ray``.

Every launcher runs :func:`featurelt.finetune.train.finetune` once per rank; each rank takes its
``[rank::world]`` share of every global batch of the one epoch plan, and only rank 0 writes to the store.
Each rank's batch loss is weighted by its share of the global batch, so DDP's gradient average is the
global batch mean of one process (exact for losses that are plain means; ``ldam`` after its DRW start takes a
class-weighted mean per rank, which differs from the global one by the ranks' weight sums). The momentum
sampler's per-sample losses are gathered from every rank, so that every rank plans the same next epoch.
BatchNorm statistics are per rank unless ``--sync-bn``.

``ray``: Ray Train's ``TorchTrainer`` with ``ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu)``;
Ray sets up the process group (gloo on CPU, NCCL on GPUs), each worker opens the store by its path (local or
object store) and runs ``finetune`` with RANK / WORLD_SIZE / LOCAL_RANK from its Ray Train context; no
distributed sampler is added (the plan is already per rank). Every rank runs under one run id chosen by the
driver, which reads rank 0's result back from the store (a FinetuneResult without the model). A local Ray
starts when none is running.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from featurelt.finetune.config import FinetuneCfg


def launch(store: Any, cfg: FinetuneCfg, *, resume: str | None = None, progress: bool = False,
           log: Callable[[str], None] | None = None, hooks: Any = None) -> Any:
    """Run ``cfg`` with its launcher. Returns rank 0's FinetuneResult (None on other ranks)."""
    from featurelt.finetune.train import dist_env, finetune

    if cfg.launcher == "local":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("WORLD_SIZE > 1 in the environment: use --launcher torchrun under torchrun")
        return finetune(store, cfg, hooks=hooks, resume=resume, progress=progress, log=log)
    if cfg.launcher == "torchrun":
        import torch
        import torch.distributed as dist

        rank, world = dist_env()
        if "RANK" not in os.environ:
            raise ValueError("--launcher torchrun: RANK / WORLD_SIZE are not set; start it as "
                             "`torchrun --nproc-per-node N -m featurelt finetune ... --launcher torchrun`")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo")
        try:
            from featurelt.finetune.train import finetune_run_id

            ids = [finetune_run_id() if rank == 0 else None]
            dist.broadcast_object_list(ids, src=0)  # one run id for every rank
            res = finetune(store, cfg, hooks=hooks, resume=resume, progress=progress, log=log, run_id=ids[0])
            dist.barrier()
        finally:
            dist.destroy_process_group()
        return res if rank == 0 else None
    return _launch_ray(store, cfg, resume=resume, hooks=hooks)


def _ray_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: rank from the Ray Train context, then ``finetune``; every worker reports (rank 0's
    numbers are the run's)."""
    import ray.train

    from featurelt.finetune.config import from_dict
    from featurelt.finetune.train import finetune

    ctx = ray.train.get_context()
    os.environ.update(RANK=str(ctx.get_world_rank()), WORLD_SIZE=str(ctx.get_world_size()),
                      LOCAL_RANK=str(ctx.get_local_rank()))
    cfg = from_dict(config["cfg"])
    finetune(config["store"], cfg, hooks=config["hooks"], resume=config["resume"], run_id=config["run_id"])
    ray.train.report({"rank": ctx.get_world_rank()})


def _launch_ray(store: Any, cfg: FinetuneCfg, *, resume: str | None, hooks: Any) -> Any:

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from featurelt.store import Store
    from featurelt.finetune.train import finetune_run_id

    root = store.root if isinstance(store, Store) else str(store)
    if "://" not in root:
        root = os.path.abspath(root)
    if not ray.is_initialized():
        ray.init(num_cpus=max(cfg.num_workers, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    device = "cuda" if cfg.use_gpu else "cpu"
    worker_cfg = cfg.replace(device=device)
    run_id = finetune_run_id()
    import tempfile

    trainer = TorchTrainer(_ray_loop, train_loop_config={"store": root, "cfg": worker_cfg.to_dict(), "hooks": hooks,
                                                         "resume": resume, "run_id": run_id},
                           scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
                           run_config=RunConfig(storage_path=tempfile.mkdtemp(prefix="featurelt-ray-")))
    trainer.fit()
    return _result_from_store(root, run_id)


def _result_from_store(root: str, run_id: str) -> Any:
    """Rank 0's FinetuneResult read back from the rows it wrote (no model)."""
    import json

    import yaml

    from featurelt.finetune.config import from_dict
    from featurelt.finetune.train import FinetuneResult
    from featurelt.store import Store

    store = Store(root)
    lit = "'" + run_id.replace("'", "''") + "'"
    rows = store.sql(f"SELECT * FROM finetune_runs WHERE run_id = {lit}").to_pylist() \
        if store.has_table("finetune_runs") else []
    if not rows or rows[0]["status"] != "finished":
        raise RuntimeError(f"Ray Train finished but run {run_id} is not recorded as finished in {root}")
    row = rows[0]
    run = store.sql(f"SELECT metrics FROM runs WHERE run_id = {lit}").to_pylist()
    metrics = json.loads(run[0]["metrics"]) if run else {}
    return FinetuneResult(run_id=run_id, config=from_dict(yaml.safe_load(row["config"])), run_dir=row["run_dir"],
                          checkpoint=row["checkpoint"], metrics=metrics, history=json.loads(row["history"]),
                          export_set=row["export_set"], trainable_params=row["trainable_params"],
                          total_params=row["total_params"])
