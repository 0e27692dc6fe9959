"""``FinetuneCfg``: the frozen, commented configuration of a ``featurelt finetune`` run, YAML in and out.

Resolved like ``train-head``'s (LIFT-style, later wins): defaults < ``--config FILE`` < recipe
(``FinetuneHooks.configure``) < CLI flags. The resolved config is saved with the run (``config.yaml`` in
the run directory and the ``finetune_runs.config`` column), so ``--config <run dir>/config.yaml`` re-runs it.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping


from featurelt.config import ConfigRecord

Adapt = Literal["full", "lora", "last-n", "ln", "bias", "frozen"]
HeadKind = Literal["linear", "cosine", "text"]
Amp = Literal["bf16", "fp16", "off"]
Augment = Literal["none", "flip-crop", "randaugment"]
Launcher = Literal["local", "torchrun", "ray"]
Device = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class FinetuneCfg(ConfigRecord):
    """Everything ``featurelt finetune`` needs; one flat record so each CLI flag maps to one field."""

    # --- backbone
    backbone: str = ""                      # timm:<name> | clip:<model>|tiny | dinov2:<size>|tiny | sam:<variant>|tiny
    pretrained: str = "default"             # default: timm's default weights / the --checkpoint; a timm or open_clip tag;
                                            # none: random init (recorded untrained)
    checkpoint: str | None = None           # weights file (timm / clip / sam) or folder (dinov2) to start from
    image_size: int | None = None           # input side in pixels; None = the backbone's own (timm pretrained_cfg)
    # --- adaptation (featurelt.finetune.adapt)
    adapt: Adapt = "full"                   # full | lora | last-n | ln (norm affine) | bias | frozen (head only)
    lora_rank: int = 8                      # LoRA rank r, >= 1
    lora_alpha: float = 16.0                # LoRA scale alpha (update = alpha / r * B A), > 0
    lora_dropout: float = 0.0               # dropout on the LoRA input, in [0, 1)
    lora_targets: tuple[str, ...] = ()      # Linear module name suffixes; () = the family default (adapt.LORA_TARGETS)
    last_n: int = 1                         # last-n: trainable last layer groups of the backbone, >= 1
    # --- head (featurelt.finetune.model)
    head: HeadKind = "linear"               # linear | cosine (scale * cos) | text (cosine to fixed class text embeddings)
    head_scale: float = 16.0                # logit scale of the cosine and text heads, > 0
    text_set: str | None = None             # text_embeddings.set_name for --head text (dim = backbone feature dim)
    # --- loss and sampler (registries LOSSES, SAMPLERS, as in train-head)
    loss: str = "ce"                        # loss name: ce | balanced-softmax | logit-adjust | ldam | focal | ...
    loss_opts: dict[str, Any] = field(default_factory=dict)     # keyword options of the loss, e.g. {drw_epoch: 8}
    sampler: str = "instance"               # sampler name: instance | class-balanced | sqrt | lfm | balancemix | momentum
    sampler_opts: dict[str, Any] = field(default_factory=dict)  # keyword options of the sampler
    aux_cap: int = 50                       # most rows of one auxiliary class per epoch (section 3), >= 0
    # --- optimisation (timm create_optimizer_v2 / CosineLRScheduler / ModelEmaV3)
    epochs: int = 10                        # passes of the sampler, >= 1
    batch_size: int = 64                    # global batch (all ranks together, before accumulation), >= 1
    accum: int = 1                          # loader batches per optimizer step (gradient accumulation), >= 1
    lr: float = 1e-3                        # peak learning rate, > 0 (warmup, then cosine to lr * min_lr_ratio per optimizer step)
    min_lr_ratio: float = 0.0               # the cosine schedule's floor as a fraction of lr, in [0, 1) (LFM's code: 1e-3)
    optimizer: str = "adamw"                # timm optimizer name: adamw | sgd | adam | lamb | ...
    momentum: float = 0.9                   # SGD momentum in [0, 1)
    weight_decay: float = 0.05              # weight decay, >= 0 (none on norms, biases and 1-d parameters)
    layer_decay: float | None = None        # layer-wise lr decay in (0, 1] (lr * D^(L - layer)); None = off
    warmup: int = 0                         # linear warmup optimizer steps, >= 0
    amp: Amp = "off"                        # autocast dtype: bf16 | fp16 (with a GradScaler) | off
    ema: bool = False                       # keep an EMA of the weights (timm ModelEmaV3); eval and export use it
    ema_decay: float = 0.9998               # EMA decay in (0, 1)
    seed: int = 0                           # seeds torch, numpy, python, the sampler and the augmentation
    # --- data
    augment: Augment = "flip-crop"          # train augmentation: none | flip-crop | randaugment (featurelt.images.augment)
    train_split: str = "train"              # samples.split trained on
    eval_split: str = "test"                # samples.split evaluated at the end (runs + predictions rows)
    val_split: str | None = "val"           # also evaluated when the store has rows in it; None = never
    as_of: str | None = None                # store version or tag every read is pinned to (None = latest)
    loader_workers: int = 2                 # DataLoader worker processes decoding images, >= 0
    skip_bad: bool = False                  # a sample whose image cannot be read: a rejects row (else an error)
    # --- schedule of evaluation and checkpoints
    eval_every: int = 1                     # evaluate on the eval split every E epochs (history); 0 = only at the end
    checkpoint_every: int = 0               # also checkpoint every N optimizer steps; 0 = at epoch ends only
    # --- launch
    launcher: Launcher = "local"            # local (one process) | torchrun (DDP from RANK / WORLD_SIZE) | ray
    num_workers: int = 1                    # ray: Ray Train workers (ranks)
    use_gpu: bool = False                   # ray: one GPU per worker
    device: Device = "auto"                 # local / torchrun: auto = cuda when available, else cpu
    sync_bn: bool = False                   # DDP: convert BatchNorm to SyncBatchNorm
    # --- recipe (featurelt.finetune.recipes; `featurelt recipes` lists them)
    recipe: str | None = None               # a seed's backbone stage: sam-fusion | auxiliary | ltgc-lora | ecvl-stage1 | lfm-stage1
    recipe_opts: dict[str, Any] = field(default_factory=dict)  # the recipe's own options, e.g. {fuse_stage: 3}
    # --- outputs
    export: bool = False                    # write emb_ft_<run_id> (the fine-tuned backbone's features of every sample)
    out_dir: str | None = None              # run directory root (default <store>/checkpoints/<run_id>)

    def __post_init__(self) -> None:
        check(self)


def check(cfg: FinetuneCfg) -> None:
    """Refuse values outside their documented ranges, naming the field and the value."""
    def bad(name: str, why: str) -> ValueError:
        return ValueError(f"config field '{name}' {why}, got {getattr(cfg, name)!r}")

    for name in ("epochs", "batch_size", "accum", "lora_rank", "last_n", "num_workers"):
        if getattr(cfg, name) < 1:
            raise bad(name, "must be >= 1")
    for name in ("aux_cap", "warmup", "loader_workers", "eval_every", "checkpoint_every", "weight_decay"):
        if getattr(cfg, name) < 0:
            raise bad(name, "must be >= 0")
    for name in ("lr", "lora_alpha", "head_scale"):
        if not getattr(cfg, name) > 0:
            raise bad(name, "must be > 0")
    if not 0 <= cfg.min_lr_ratio < 1:
        raise bad("min_lr_ratio", "must be in [0, 1)")
    if cfg.layer_decay is not None and not 0 < cfg.layer_decay <= 1:
        raise bad("layer_decay", "must be in (0, 1]")
    if not 0 < cfg.ema_decay < 1:
        raise bad("ema_decay", "must be in (0, 1)")
    if not 0 <= cfg.momentum < 1:
        raise bad("momentum", "must be in [0, 1)")
    if not 0 <= cfg.lora_dropout < 1:
        raise bad("lora_dropout", "must be in [0, 1)")
    if cfg.image_size is not None and cfg.image_size < 1:
        raise bad("image_size", "must be >= 1")
    for name, tp in (("adapt", Adapt), ("head", HeadKind), ("amp", Amp), ("augment", Augment),
                     ("launcher", Launcher), ("device", Device)):
        if getattr(cfg, name) not in typing.get_args(tp):
            raise bad(name, f"must be one of {', '.join(typing.get_args(tp))}")
    if cfg.head == "text" and not cfg.text_set:
        raise ValueError("--head text needs --text-set NAME (a text_embeddings set_name, written by `extract "
                         "text:minilm` or `extract clip:<model>`; list them: featurelt sql \"SELECT DISTINCT set_name "
                         "FROM text_embeddings\")")


def from_dict(data: Mapping[str, Any], *, source: str = "config") -> FinetuneCfg:
    """``FinetuneCfg`` from a mapping; unknown keys are an error naming ``source`` and the known fields."""
    return FinetuneCfg.from_dict(data, source=source)


def from_yaml(path: str | Path) -> FinetuneCfg:
    """Read a config written by :meth:`FinetuneCfg.to_yaml` (or by hand; missing fields keep defaults)."""
    return FinetuneCfg.from_yaml(path)


def merge(base: FinetuneCfg, overrides: Mapping[str, Any], *, source: str = "command line") -> FinetuneCfg:
    """``base`` with every non-None value of ``overrides`` applied; ``*_opts`` dicts are merged key by key."""
    return base.merged(overrides, source=source)


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(FinetuneCfg)]


__all__ = ["FinetuneCfg", "from_dict", "from_yaml", "merge", "field_names", "check"]
