"""The fine-tuning loop: ``finetune(store, cfg, *, hooks=None) -> FinetuneResult``.

1. resolve the config (``hooks.configure``), pin the store (``cfg.as_of``), read the classes (head order,
   :class:`featurelt.train.head.LabelMap`) and the train split's rows; build backbone, adaptation, head
   (``hooks.wrap_model``), loss (``LOSSES``), sampler (``SAMPLERS``), timm optimizer (no weight decay on
   norms / biases, ``--layer-decay``), warmup + cosine per optimizer step (timm ``CosineLRScheduler``),
   ``ModelEmaV3`` (``--ema``), autocast + GradScaler (``--amp``);
2. each epoch: the sampler's plan (or ``hooks.train_plan``), rank r's share ``[r::N]`` of each global batch,
   images from the store (:mod:`featurelt.finetune.data`), normalised on the device, mixed where the sampler
   pairs rows, ``hooks.make_batch``, loss (``hooks.loss`` or the registry loss), ``--accum`` batches per step,
   ``hooks.after_step``; a tqdm bar (img/s, loss, lr); checkpoints every ``--checkpoint-every`` steps and at
   each epoch end (:mod:`featurelt.finetune.checkpoint`); an eval-split accuracy every ``--eval-every`` epochs;
3. at the end evaluate the eval split (and the val split when it has rows) like ``train-head`` (auxiliary
   logits dropped), export ``emb_ft_<run_id>`` with ``--export``, and write in one transaction (rank 0,
   after a barrier): ``runs`` + ``predictions`` rows, the ``finetune_runs`` row (status finished), the export.

A ``finetune_runs`` row with status ``running`` is written when the run starts, so a killed run is listed
as unfinished and ``--resume RUN_ID|latest`` finds it; Ctrl-C saves a checkpoint and marks it
``interrupted``. On CPU with the same seed a resumed run ends with the same weights, bit for bit.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor

from featurelt.finetune import checkpoint as ckpt
from featurelt.finetune import runs as runrows
from featurelt.finetune.config import FinetuneCfg
from featurelt.finetune.data import (EvalImage, GlobalBatch, MappedImage, TrainRows, epoch_plan, global_positions,
                                     make_loader, rank_share, split_rows, train_image)
from featurelt.finetune.hooks import FinetuneHooks, HookContext
from featurelt.store import Store, command_line, utcnow

logger = logging.getLogger("featurelt.finetune")


@dataclass
class LoaderBatch:
    """One loader batch as the loop and the hooks see it (after failed rows were dropped)."""

    rows: Tensor                    # [B] long train-row indices (ctx.train)
    sample_ids: list[str]           # [B]
    columns: dict[str, list[Any]]   # the loader's columns (sample_id, label, hooks.extra_columns)
    extras: list[Any]               # per image: {"box", "flip", "size"} from make_image
    partner: Tensor | None = None   # [B] partner rows (mixup samplers), lam_x / lam_y their weights
    lam_x: Tensor | None = None
    lam_y: Tensor | None = None
    partner_extras: list[Any] | None = None


@dataclass
class FinetuneResult:
    """What one ``finetune`` call did."""

    run_id: str
    config: FinetuneCfg
    run_dir: str
    checkpoint: str | None              # last checkpoint path
    metrics: dict[str, Any]             # eval-split metrics (compute_metrics) + timing
    history: list[dict[str, Any]]       # per epoch: epoch, loss, lr, acc (eval split, when evaluated)
    export_set: str | None = None       # ft_<run_id> with --export
    trainable_params: int = 0
    total_params: int = 0
    model: Any = field(default=None, repr=False)  # the trained FinetuneModel (EMA weights when --ema), on CPU
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)  # the run's notes in order (run id, one line per epoch, warnings)


def finetune_run_id() -> str:
    """A new run id, ``YYYYMMDD_HHMMSS_xxxxxx``: train-head's form with underscores, so that ``emb_ft_<run_id>``
    is a plain SQL identifier."""
    from featurelt.train.head import new_run_id

    return new_run_id().replace("-", "_")


def dist_env() -> tuple[int, int]:
    """(rank, world size) from ``RANK`` / ``WORLD_SIZE`` (torchrun, Ray Train), (0, 1) otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def run_dir_of(root: str, cfg: FinetuneCfg, run_id: str) -> Path:
    if cfg.out_dir:
        return Path(cfg.out_dir).expanduser() / run_id
    if "://" not in root or root.startswith("file://"):
        return Path(root.removeprefix("file://")) / "checkpoints" / run_id
    raise ValueError(f"store {root} is not a local directory: pass --out-dir for the run directory")


class _Normalize:
    """uint8 [B, 3, S, S] -> float normalised on the device (DeviceStage's arithmetic)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        from featurelt.images.transforms import DeviceStage

        self.stage = DeviceStage(tuple(mean), tuple(std))

    def __call__(self, images: Any, device: torch.device) -> Tensor:
        from featurelt.images.packing import PackedImages

        if isinstance(images, PackedImages):
            raise ValueError(f"images of different sizes in one batch: {images.shapes[:4]}")
        return self.stage(images.to(device, non_blocking=True))


def _loader_failed(failed: list[tuple[int, str | None, str]], *, skip_bad: bool, rejects: list[dict[str, Any]],
                   stage: str) -> None:
    for pos, sid, reason in failed:
        if not skip_bad:
            raise ValueError(f"sample {sid}: its image cannot be used ({reason}); pass --skip-bad to leave it out "
                             f"(a rejects row)")
        if not any(r["sample_id"] == sid for r in rejects):
            rejects.append({"command": "finetune", "stage": stage, "location": str(sid), "row": None,
                            "sample_id": sid, "reason": reason, "time": utcnow()})


@torch.no_grad()
def forward_rows(model: Any, store: Store, rows: TrainRows, make_image: Any, norm: _Normalize, device: torch.device, *,
                 batch_size: int, num_workers: int, fn: Callable[[Tensor], Tensor], skip_bad: bool,
                 rejects: list[dict[str, Any]], amp: str = "off", stage: str = "eval") -> tuple[np.ndarray, Tensor]:
    """``fn(normalised images)`` for every row of ``rows`` in order. Returns (kept row numbers [M], outputs [M, ...])."""
    plan = [rows.offsets[s:s + batch_size] for s in range(0, len(rows), batch_size)]
    loader = make_loader(store, plan, make_image, columns=(), num_workers=num_workers,
                         pin_memory=device.type == "cuda")
    kept, outs = [], []
    was = model.training
    model.eval()
    # modules that read per-image data beside the pixels (sam-fusion's SAM maps) get each loader batch first
    batch_readers = [m for m in model.modules() if hasattr(m, "set_loader_batch")]
    try:
        for b in loader:
            _loader_failed(b.failed, skip_bad=skip_bad, rejects=rejects, stage=stage)
            if b.images is None:
                continue
            x = norm(b.images, device)
            for m in batch_readers:
                m.set_loader_batch(x, b)
            with _autocast(device, amp):
                out = fn(x)
            outs.append(out.float().cpu())
            kept.append(b.index)
    finally:
        model.train(was)
    if not outs:
        return np.zeros(0, dtype=np.int64), torch.zeros(0)
    return np.concatenate(kept), torch.cat(outs)


def _autocast(device: torch.device, amp: str) -> Any:
    import contextlib

    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def finetune(store: Store | str | os.PathLike[str], cfg: FinetuneCfg, *, hooks: FinetuneHooks | None = None,
             resume: str | None = None, progress: bool = False, log: Callable[[str], None] | None = None,
             write: bool = True, run_id: str | None = None, quiet: bool = False) -> FinetuneResult:
    """Fine-tune, evaluate, record (module docstring). ``store``: a Store or its root path.

    resume: a fine-tune run id or ``latest`` (the newest unfinished run): continue it from its last
    checkpoint with its saved config (``cfg`` is then ignored). write: write the store rows (False: compute only).
    run_id: the new run's id (launchers pass one to every rank; default a fresh one).
    log: called with each note of the run when it arises (run id and checkpoint folder, one line per epoch,
    ``warning: ...`` lines), like train-head's ``log``. Default: printed to stderr as the CLI does (``note: ...``;
    warnings as they are), so that a script sees the run's progress without configuring logging; ``quiet=True``
    sends them to the ``featurelt.finetune`` logger instead (INFO; warnings at WARNING, as train-head does). The notes
    are also in ``FinetuneResult.notes``.
    """
    from featurelt.finetune.adapt import apply_adapt
    from featurelt.finetune.backbones import build_backbone
    from featurelt.finetune.model import FinetuneModel, count_parameters
    from featurelt.losses import LOSSES, LossContext
    from featurelt.samplers import SAMPLERS, Sampler, SamplerContext
    from featurelt.train.head import (_accepts, _classes, build, class_counts_of, deterministic, neighbor_of_head,
                                      resolve_device, seed_everything)

    notes: list[str] = []

    def note(line: str) -> None:
        notes.append(line)
        if log is not None:
            log(line)
        elif quiet:
            logger.log(logging.WARNING if line.startswith("warning:") else logging.INFO, line)
        else:
            print(line if line.startswith("warning:") else f"note: {line}", file=sys.stderr, flush=True)

    root = store.root if isinstance(store, Store) else str(store)
    storage_options = store.storage_options if isinstance(store, Store) else None
    rank, world = dist_env()
    state = None
    if resume:
        run_id, cfg, state_path = ckpt.find_resume(Store(root, storage_options=storage_options), resume)
        state = ckpt.load(state_path)
        note(f"resuming run {run_id} from {state_path} (epoch {state['position']['epoch']}, "
             f"step {state['position']['step']})")
    if hooks is None:  # the config's recipe (also on resume and on every rank), else none
        from featurelt.finetune.recipes import hooks_for

        hooks = hooks_for(cfg, Store(root, storage_options=storage_options)) or FinetuneHooks()
    if not resume:
        cfg = hooks.configure(cfg)
        run_id = run_id or finetune_run_id()
    if not cfg.backbone:
        raise ValueError("no backbone given: --backbone NAME (timm:<name>, clip:<model>, dinov2:<size>, sam:<variant>)")
    LOSSES.get(cfg.loss)
    sampler_cls = SAMPLERS.get(cfg.sampler)
    pinned = Store(root, as_of=cfg.as_of, storage_options=storage_options)
    if pinned.version == 0:
        raise ValueError(f"store {root} is empty: ingest data first (featurelt ingest)")
    cfg = cfg.replace(as_of=str(pinned.version))
    device = resolve_device(cfg.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    classes, label_map = _classes(pinned)
    k = classes.num_rows
    train = split_rows(pinned, cfg.train_split, label_map, extra_columns=hooks.extra_columns)
    if len(train) == 0:
        raise ValueError(f"train split '{cfg.train_split}' has no rows at store version {pinned.version}")
    counts = class_counts_of(train.labels, train.source, k)
    neighbor = neighbor_of_head(classes, label_map)
    text = None
    if cfg.text_set:
        from featurelt.data.features import load_text_embeddings

        rows = load_text_embeddings(pinned, cfg.text_set, num_classes=int(label_map.to_store.max()) + 1)
        text = torch.from_numpy(np.ascontiguousarray(rows[label_map.to_store])).float()
    run_dir = run_dir_of(root, cfg, run_id)
    ctx = HookContext(cfg=cfg, device=device, train=train, class_counts=counts, num_target=label_map.num_target,
                      rank=rank, world_size=world)

    with deterministic(device):
        seed_everything(cfg.seed)
        backbone = build_backbone(cfg.backbone, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint,
                                  image_size=cfg.image_size, seed=cfg.seed)
        apply_adapt(backbone, cfg.adapt, last_n=cfg.last_n, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                    lora_dropout=cfg.lora_dropout, lora_targets=cfg.lora_targets)
        model = FinetuneModel(backbone, k, head=cfg.head, scale=cfg.head_scale,
                              text=text if cfg.head == "text" else None)
        model = hooks.wrap_model(model, ctx).to(device)
        if cfg.sync_bn and world > 1:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        trainable, total = count_parameters(model)
        if trainable == 0:
            raise ValueError(f"--adapt {cfg.adapt} with --head {cfg.head} leaves no parameter to train")
        ctx.model = model
        loss_fn = build("loss", cfg.loss, LOSSES.get(cfg.loss),
                        LossContext(class_counts=torch.from_numpy(counts).float(), neighbor_of=torch.from_numpy(neighbor),
                                    num_target=label_map.num_target, epochs=cfg.epochs), cfg.loss_opts).to(device)
        text_sim = None
        if text is not None:
            t = F.normalize(text.double(), dim=1)
            text_sim = (t @ t.T).numpy()
        sctx = SamplerContext(labels=train.labels, class_counts=counts, source=train.source, neighbor_of=neighbor,
                              num_target=label_map.num_target, text_sim=text_sim, num_views=1,
                              batch_size=cfg.batch_size, seed=cfg.seed, aux_cap=cfg.aux_cap)
        sopts = dict(cfg.sampler_opts)
        many, few = classes.column("bucket_many")[0].as_py(), classes.column("bucket_few")[0].as_py()
        for name, value in (("many", many), ("few", few)):
            if value is not None and _accepts(sampler_cls, name):
                sopts.setdefault(name, int(value))
        sampler = build("sampler", cfg.sampler, sampler_cls, sctx, sopts)
        wants_feedback = type(sampler).feedback is not Sampler.feedback
        ctx.loss_fn, ctx.sampler = loss_fn, sampler
        for line in loss_fn.schedule_notes(cfg.epochs):
            note(line)

        import timm.optim
        import timm.scheduler
        import timm.utils

        opt_kwargs: dict[str, Any] = {"momentum": cfg.momentum} if cfg.optimizer in ("sgd", "momentum", "nesterov") else {}
        optimizer = timm.optim.create_optimizer_v2(model, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                                   layer_decay=cfg.layer_decay, **opt_kwargs)
        batches_per_epoch = len(epoch_plan(sampler, 0)) if hooks.train_plan(0, ctx) is None else \
            len(hooks.train_plan(0, ctx))  # type: ignore[arg-type]
        steps_per_epoch = math.ceil(batches_per_epoch / cfg.accum)
        total_steps = max(1, steps_per_epoch * cfg.epochs)
        sched = timm.scheduler.CosineLRScheduler(optimizer, t_initial=total_steps, lr_min=cfg.lr * cfg.min_lr_ratio,
                                                 warmup_t=cfg.warmup,
                                                 warmup_lr_init=0.0 if cfg.warmup else cfg.lr, warmup_prefix=True,
                                                 t_in_epochs=False)
        ema = timm.utils.ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema else None
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        train_model: Any = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

        position = {"epoch": 0, "batch": 0, "step": 0}
        history: list[dict[str, Any]] = []
        if state is not None:
            ckpt.restore(state, model=model, optimizer=optimizer, scheduler=sched, scaler=scaler, ema=ema,
                         sampler=sampler, path=str(state.get("_path")), hooks=hooks)
            position, history = dict(state["position"]), list(state["history"])
        norm = _Normalize(backbone.mean, backbone.std)
        ctx.state["normalize"] = (tuple(backbone.mean), tuple(backbone.std))  # for hooks that undo it (ECVL)
        eval_image = EvalImage(backbone.transform, backbone.image_size)
        columns = ("label", *hooks.extra_columns)
        rejects: list[dict[str, Any]] = []
        is_writer = rank == 0 and write

        def save(pos: dict[str, int]) -> str:
            path = ckpt.save(run_dir, model=model, optimizer=optimizer, scheduler=sched, scaler=scaler, ema=ema,
                             sampler=sampler, position=pos, history=history, cfg=cfg, backbone=backbone.name,
                             hooks=hooks)
            return path

        if is_writer:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(cfg.to_yaml())
            if state is None:
                runrows.write_started(root, storage_options, run_id=run_id, cfg=cfg, backbone=backbone,
                                      trainable=trainable, total=total, pinned=pinned, run_dir=str(run_dir))
        if rank == 0:  # the run id early: --resume needs it if the run is killed
            note(f"run {run_id}: {len(train)} '{cfg.train_split}' rows, {batches_per_epoch} batches per epoch, "
                 f"{cfg.epochs} epochs on {device}; checkpoints in {run_dir}")
        t_run = time.perf_counter()
        images_seen, wait_s, step_s = 0, 0.0, 0.0
        step_lr = float(optimizer.param_groups[0]["lr"])
        checkpoint_path: str | None = None
        interrupted = False
        bar = None
        try:
            for epoch in range(position["epoch"], cfg.epochs):
                ctx.epoch = epoch
                custom = hooks.train_plan(epoch, ctx)
                plan = [a if isinstance(a, GlobalBatch) else GlobalBatch(np.asarray(a, dtype=np.int64)) for a in custom] \
                    if custom is not None else epoch_plan(sampler, epoch)
                start_batch = position["batch"] if epoch == position["epoch"] else 0
                shares = [rank_share(b, rank, world) for b in plan]
                loader_plan = [np.concatenate([train.offsets[s.index]] + ([train.offsets[s.partner]]
                                                                          if s.partner is not None else []))
                               for s in shares]
                make_image = train_image(cfg.augment, transform=backbone.transform, image_size=backbone.image_size,
                                         seed=cfg.seed, epoch=epoch)
                bases = np.concatenate([[0], np.cumsum([len(p) for p in loader_plan[start_batch:]])])
                if start_batch or world > 1:  # augmentation seeded by the global plan position
                    make_image = MappedImage(make_image, np.concatenate(
                        global_positions(plan, rank, world)[start_batch:] or [np.zeros(0, np.int64)]))
                loader = make_loader(pinned, loader_plan[start_batch:], make_image, columns=columns,
                                     num_workers=cfg.loader_workers, pin_memory=device.type == "cuda")
                if progress and rank == 0:
                    from tqdm import tqdm

                    bar = tqdm(total=len(plan), initial=start_batch, desc=f"finetune epoch {epoch + 1}/{cfg.epochs}",
                               unit="batch", leave=False, disable=None)
                losses: list[float] = []
                t_wait = time.perf_counter()
                bi = start_batch
                for lb in _iterate(loader):
                    t_got = time.perf_counter()
                    wait_s += t_got - t_wait
                    share = shares[bi]
                    batch, x, target = _prepare(lb, share, int(bases[lb.batch]), train, norm, device, k, skip_bad=cfg.skip_bad,
                                                rejects=rejects)
                    if x is not None:
                        x, target = hooks.make_batch(x, target, batch, ctx)
                        with _autocast(device, cfg.amp):
                            logits = train_model(x)
                        logits = logits.float()
                        custom_loss = hooks.loss(logits, target, batch, ctx)
                        per = loss_fn.per_sample(logits, target, epoch=epoch)
                        loss = custom_loss if custom_loss is not None else loss_fn.reduce(per, target, epoch=epoch)
                        backward = loss
                        if world > 1 and custom_loss is None and not loss_fn.weighted_mean:
                            # DDP averages the ranks' gradients: weight each rank's mean by its share of the global
                            # batch, so that unequal shares still give the global batch mean of one process
                            backward = loss * (len(per) * world / len(plan[bi].index))
                        scaler.scale(backward / cfg.accum).backward()
                        hooks.after_step(per.detach(), batch, ctx)
                        if wants_feedback and batch.partner is None:
                            rows_fb, loss_fb = batch.rows, per.detach().float().cpu()
                            if world > 1:  # every rank's sampler sees every rank's losses: the plans stay equal
                                import torch.distributed as dist

                                parts: list[Any] = [None] * world
                                dist.all_gather_object(parts, (rows_fb, loss_fb))
                                rows_fb = torch.cat([p[0] for p in parts])
                                loss_fb = torch.cat([p[1] for p in parts])
                            sampler.feedback(rows_fb, loss_fb, None)
                        losses.append(float(loss.detach()))
                        images_seen += len(batch.rows)
                    bi += 1
                    if bi % cfg.accum == 0 or bi == len(plan):
                        scaler.step(optimizer)
                        scaler.update()
                        optimizer.zero_grad(set_to_none=True)
                        position["step"] += 1
                        ctx.step = position["step"]
                        if ema is not None:
                            ema.update(model, step=position["step"])
                        step_lr = float(optimizer.param_groups[0]["lr"])  # the lr this step used (history)
                        sched.step_update(num_updates=position["step"])
                        position["batch"], position["epoch"] = bi, epoch
                        if cfg.checkpoint_every and position["step"] % cfg.checkpoint_every == 0 and rank == 0 and write:
                            checkpoint_path = save(dict(position))
                    if bar is not None:
                        el = max(time.perf_counter() - t_run, 1e-9)
                        bar.set_postfix(loss=f"{losses[-1]:.4f}" if losses else "-", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                                        img_s=f"{images_seen / el:.0f}")
                        bar.update(1)
                    t_wait = time.perf_counter()
                    step_s += t_wait - t_got
                if bar is not None:
                    bar.close()
                    bar = None
                entry: dict[str, Any] = {"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else None,
                                         "lr": step_lr}
                if entry["loss"] is not None and not math.isfinite(entry["loss"]):
                    raise FloatingPointError(f"training loss is {entry['loss']} in epoch {epoch + 1} (lr {cfg.lr} too high?)")
                if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and epoch + 1 < cfg.epochs:
                    entry["acc"] = _accuracy(ema.module if ema is not None else model, pinned, cfg, label_map,
                                             eval_image, norm, device, rejects)
                history.append(entry)
                position = {"epoch": epoch + 1, "batch": 0, "step": position["step"]}
                if rank == 0 and write:
                    checkpoint_path = save(dict(position))
                if rank == 0:  # one line per epoch, also where no progress bar shows (logs, jobs, CI)
                    note(epoch_line(entry, cfg.epochs, images_seen / max(time.perf_counter() - t_run, 1e-9)))
        except KeyboardInterrupt:
            interrupted = True
            if bar is not None:
                bar.close()
            if rank == 0 and write:
                checkpoint_path = save(dict(position))
                runrows.mark(root, storage_options, run_id, status="interrupted", checkpoint=checkpoint_path)
            note(f"interrupted: checkpoint {checkpoint_path}; continue with --resume {run_id}")
            raise
        train_seconds = time.perf_counter() - t_run
        final = ema.module if ema is not None else model
        # -- evaluation (train-head's rows) ------------------------------------------------------------------
        t_eval = time.perf_counter()
        evaluated = {}
        splits = [cfg.eval_split] + ([cfg.val_split] if cfg.val_split and cfg.val_split != cfg.eval_split else [])
        for split in splits:
            res = _evaluate_split(final, pinned, split, cfg, label_map, classes, eval_image, norm, device, rejects)
            if res is None:
                if split == cfg.eval_split:
                    raise ValueError(f"eval split '{split}' has no original rows of target classes")
                continue
            evaluated[split] = res
        eval_seconds = time.perf_counter() - t_eval
    if world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()  # every rank has finished before rank 0 writes
    metrics = dict(evaluated[cfg.eval_split]["metrics"])
    warning = collapse_warning(evaluated[cfg.eval_split]["pred"], classes, cfg)
    metrics["top_class_fraction"] = float(np.unique(evaluated[cfg.eval_split]["pred"], return_counts=True)[1].max()
                                          / len(evaluated[cfg.eval_split]["pred"]))
    metrics["collapsed"] = warning is not None
    if warning and rank == 0:
        note(warning)
    if history and cfg.eval_every and "acc" not in history[-1]:  # the last epoch's accuracy is the final evaluation's
        history[-1]["acc"] = float(metrics["acc_all"])
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_rss()
    perf = {"train_seconds": train_seconds, "eval_seconds": eval_seconds, "images_per_second":
            images_seen / max(train_seconds, 1e-9), "data_stall_fraction": wait_s / max(wait_s + step_s, 1e-9),
            "peak_memory_bytes": int(peak), "device": str(device), "world_size": world, "history": history,
            "trainable_params": trainable, "total_params": total, "rejects": len(rejects)}
    metrics.update(perf)
    export_set = None
    if rank == 0 and write:
        export_table = None
        if cfg.export:
            from featurelt.finetune.export import export_rows

            export_set = f"ft_{run_id}"
            export_table = export_rows(final, pinned, run_id=run_id, cfg=cfg, backbone=backbone, eval_image=eval_image,
                                       norm=norm, device=device, checkpoint=checkpoint_path, rejects=rejects)
        runrows.write_finished(root, storage_options, run_id=run_id, cfg=cfg, backbone=backbone, pinned=pinned,
                               trainable=trainable, total=total, evaluated=evaluated, metrics=metrics,
                               checkpoint=checkpoint_path, run_dir=str(run_dir), export=export_table,
                               export_set=export_set, rejects=rejects, message=command_line())
    final_cpu = final.to("cpu")
    return FinetuneResult(run_id=run_id, config=cfg, run_dir=str(run_dir), checkpoint=checkpoint_path, metrics=metrics,
                          history=history, export_set=export_set, trainable_params=trainable, total_params=total,
                          model=final_cpu, interrupted=interrupted, notes=notes)


def epoch_line(entry: dict[str, Any], epochs: int, images_per_second: float) -> str:
    """The line logged after each epoch: ``epoch 2/10: loss 0.8123, lr 9.05e-04, acc 0.7120, 41 img/s``
    (the history entry: mean train loss, the lr of the epoch's last optimizer step, eval-split accuracy when
    evaluated; images/s since the run (or its resume) started)."""
    parts = [f"epoch {entry['epoch']}/{epochs}: loss " + ("-" if entry.get("loss") is None else f"{entry['loss']:.4f}"),
             f"lr {entry['lr']:.2e}"]
    if entry.get("acc") is not None:
        parts.append(f"acc {entry['acc']:.4f}")
    parts.append(f"{images_per_second:.0f} img/s")
    return ", ".join(parts)


def collapse_warning(pred: np.ndarray, classes: pa.Table, cfg: FinetuneCfg) -> str | None:
    """train-head's collapse warning for a fine-tune run: the eval-split predictions [N] (store labels) put more
    than ``COLLAPSE_FRACTION`` of the rows on one class -> the warning line, else None."""
    from featurelt.train.head import COLLAPSE_FRACTION, dominant_prediction

    top_class, top_fraction = dominant_prediction(pred)
    if top_fraction <= COLLAPSE_FRACTION:
        return None
    names = dict(zip(classes.column("label").to_pylist(), classes.column("name").to_pylist()))
    return (f"warning: the fine-tuned model predicts class {top_class} ('{names.get(top_class, '?')}') for "
            f"{100 * top_fraction:.0f}% of the {len(pred)} '{cfg.eval_split}' rows: it has collapsed to one class "
            f"(lr {cfg.lr:g}, optimizer {cfg.optimizer}, {cfg.epochs} epochs; try another --lr or more --epochs)")


def _iterate(loader: Any) -> Any:
    """The loader's batches; its DataLoader iterator is made with torch's RNG state put back afterwards (it draws
    the workers' base seed from it), so a resumed epoch leaves the RNG where the uninterrupted run does."""
    it = iter(loader)
    with torch.random.fork_rng(devices=[]):
        first = next(it, None)
    if first is None:
        return
    yield first
    yield from it


def _peak_rss() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _prepare(lb: Any, share: GlobalBatch, base: int, train: TrainRows, norm: _Normalize, device: torch.device,
             k: int, *, skip_bad: bool, rejects: list[dict[str, Any]]) -> tuple[LoaderBatch, Tensor | None, Tensor]:
    """A loaded batch -> (LoaderBatch, normalised images on the device or None, targets [B] or [B, K])."""
    _loader_failed(lb.failed, skip_bad=skip_bad, rejects=rejects, stage="train")
    n = len(share.index)
    local = lb.index - base  # each kept entry's place in this batch (failed entries leave gaps)
    x = None if lb.images is None else norm(lb.images, device)
    if share.partner is None:
        keep = local
        rows = torch.from_numpy(share.index[keep]).long()
        target = torch.from_numpy(train.labels[share.index[keep]]).long().to(device)
        batch = LoaderBatch(rows=rows, sample_ids=list(lb.columns.get("sample_id", [])), columns=lb.columns,
                            extras=list(lb.extras))
        return batch, x, target
    # mixup: entries [0, n) are the rows, [n, 2n) their partners; keep pairs whose both images loaded
    where = {int(p): j for j, p in enumerate(local)}
    pairs = [i for i in range(n) if i in where and i + n in where]
    a = torch.tensor([where[i] for i in pairs], dtype=torch.long)
    b = torch.tensor([where[i + n] for i in pairs], dtype=torch.long)
    idx = share.index[pairs]
    lam_x = torch.from_numpy(np.asarray(share.lam_x)[pairs]).float()
    lam_y = torch.from_numpy(np.asarray(share.lam_y if share.lam_y is not None else share.lam_x)[pairs]).float()
    batch = LoaderBatch(rows=torch.from_numpy(idx).long(), sample_ids=[lb.columns["sample_id"][j] for j in a.tolist()],
                        columns={c: [v[j] for j in a.tolist()] for c, v in lb.columns.items()},
                        extras=[lb.extras[j] for j in a.tolist()], partner=torch.from_numpy(share.partner[pairs]).long(),
                        lam_x=lam_x, lam_y=lam_y, partner_extras=[lb.extras[j] for j in b.tolist()])
    if x is None or not pairs:
        return batch, None, torch.zeros(0, k, device=device)
    lx = lam_x.to(device)[:, None, None, None]
    x = lx * x[a.to(device)] + (1 - lx) * x[b.to(device)]
    y_i = F.one_hot(torch.from_numpy(train.labels[idx]).long(), k).float()
    y_j = F.one_hot(torch.from_numpy(train.labels[share.partner[pairs]]).long(), k).float()
    target = (lam_y[:, None] * y_i + (1 - lam_y[:, None]) * y_j).to(device)
    return batch, x, target


def _eval_rows(pinned: Store, split: str, label_map: Any) -> TrainRows | None:
    if split not in _splits(pinned):
        return None
    rows = split_rows(pinned, split, label_map)
    keep = (rows.source == "original") & (rows.labels < label_map.num_target)
    return rows.select(keep) if keep.any() else None


def _splits(pinned: Store) -> set[str]:
    return set(pinned.dataset("samples").to_table(columns=["split"]).column("split").unique().to_pylist())


def _logits(model: Any, pinned: Store, rows: TrainRows, cfg: FinetuneCfg, eval_image: Any, norm: _Normalize,
            device: torch.device, rejects: list[dict[str, Any]]) -> tuple[np.ndarray, Tensor]:
    return forward_rows(model, pinned, rows, eval_image, norm, device, batch_size=cfg.batch_size,
                        num_workers=cfg.loader_workers, fn=model, skip_bad=cfg.skip_bad, rejects=rejects, amp=cfg.amp)


def _accuracy(model: Any, pinned: Store, cfg: FinetuneCfg, label_map: Any, eval_image: Any, norm: _Normalize,
              device: torch.device, rejects: list[dict[str, Any]]) -> float | None:
    rows = _eval_rows(pinned, cfg.eval_split, label_map)
    if rows is None:
        return None
    kept, logits = _logits(model, pinned, rows, cfg, eval_image, norm, device, rejects)
    pred = logits[:, :label_map.num_target].argmax(1).numpy()
    return float((pred == rows.labels[kept]).mean()) if len(kept) else None


def _evaluate_split(model: Any, pinned: Store, split: str, cfg: FinetuneCfg, label_map: Any, classes: pa.Table,
                    eval_image: Any, norm: _Normalize, device: torch.device,
                    rejects: list[dict[str, Any]]) -> dict[str, Any] | None:
    """train-head's evaluation of one split: target classes only, auxiliary logits dropped, store labels."""
    from featurelt.metrics import buckets_from_classes, compute_metrics

    rows = _eval_rows(pinned, split, label_map)
    if rows is None:
        return None
    kept, logits = _logits(model, pinned, rows, cfg, eval_image, norm, device, rejects)
    probs = torch.softmax(logits[:, :label_map.num_target].float(), dim=1)
    score, top = probs.topk(min(5, label_map.num_target), dim=1)
    top = label_map.to_store[top.numpy()].astype(np.int32)
    labels = rows.store_labels[kept]
    metrics = compute_metrics(labels, top[:, 0], buckets_from_classes(classes))
    return {"metrics": metrics, "sample_ids": rows.sample_ids[kept], "labels": labels, "pred": top[:, 0], "top5": top,
            "score": score[:, 0].numpy().astype(np.float32)}


__all__ = ["finetune", "FinetuneResult", "LoaderBatch", "forward_rows", "dist_env", "run_dir_of"]
