"""Launchers of a fine-tune run: ``local`` (this process), ``torchrun`` (DDP from RANK / WORLD_SIZE), ``ray``.

Every launcher runs :func:`featurelt.finetune.train.finetune` once per rank; each rank takes its
``[rank::world]`` share of every global batch of the one epoch plan, and only rank 0 writes to the store.
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
            res = finetune(store, cfg, hooks=hooks, resume=resume, progress=progress, log=log)
            dist.barrier()
        finally:
            dist.destroy_process_group()
        return res if rank == 0 else None
    raise ValueError(f"--launcher {cfg.launcher} is not available in this build yet (use local or torchrun)")


__all__ = ["launch"]
