"""Extension points of ``featurelt finetune`` that recipes override (no-op defaults): ``FinetuneHooks``.

A recipe subclasses :class:`FinetuneHooks` and passes an instance to
:func:`featurelt.finetune.train.finetune` (``hooks=``). Every method has a default that leaves the
engine's behaviour unchanged, so a recipe overrides only what it changes. The names are stable.

``ctx`` is the :class:`HookContext` of the run: the resolved config, the device, the class statistics in
head order, the train rows (their ``samples`` row offsets, labels and the ``extra_columns``), the rank
and world size, and (once built) the model, loss and sampler.

A hook that keeps state across steps (ECVL's per-sample momentum loss M_i) returns it from ``state_dict``:
every checkpoint saves it and ``--resume`` hands it back to ``load_state_dict`` after the model, optimizer and
sampler are restored, so a resumed run continues from the same state as an uninterrupted one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from featurelt.finetune.config import FinetuneCfg
    from featurelt.finetune.data import LoaderBatch, TrainRows


@dataclass
class HookContext:
    """What a hook may read (and, for ``state``, write) during a run."""

    cfg: "FinetuneCfg"                    # resolved config of the run
    device: "torch.device"                # where the model and batches live
    train: "TrainRows"                    # train rows: offsets, head labels [N], source, extra columns
    class_counts: np.ndarray              # [K] float64 n_y in head order (LabelMap: target classes first)
    num_target: int                       # K_target
    rank: int = 0                         # this process's rank
    world_size: int = 1                   # ranks in the job
    model: Any = None                     # the FinetuneModel (set after wrap_model)
    loss_fn: Any = None                   # the featurelt.losses Loss of the run
    sampler: Any = None                   # the featurelt.samplers Sampler of the run
    epoch: int = 0                        # current epoch (0-based)
    step: int = 0                         # optimizer steps done so far (whole run)
    state: dict[str, Any] = field(default_factory=dict)  # free space for the recipe (e.g. momentum M_i)


class FinetuneHooks:
    """No-op hooks; subclass and override what a recipe changes."""

    extra_columns: tuple[str, ...] = ()  # samples columns the loader reads beside sample_id and label

    def configure(self, cfg: "FinetuneCfg") -> "FinetuneCfg":
        """Recipe defaults: return ``cfg`` with fields changed (``cfg.replace(...)``). Runs first."""
        return cfg

    def wrap_model(self, model: "nn.Module", ctx: HookContext) -> "nn.Module":
        """The model to train (e.g. a forward hook on a ResNet stage). Runs before the optimizer is built."""
        return model

    def train_plan(self, epoch: int, ctx: HookContext) -> "list[np.ndarray] | None":
        """The epoch's plan as a list of int64 arrays of train-row indices (``ctx.train``), one per
        global batch; None: the sampler's plan. An entry may also be a
        :class:`featurelt.finetune.data.GlobalBatch` (rows + ``partner`` rows and ``lam_x`` / ``lam_y``: the
        engine loads both images and mixes them in pixel space, with soft targets, before ``make_batch``)."""
        return None

    def make_batch(self, images: "Tensor", targets: "Tensor", batch: "LoaderBatch",
                   ctx: HookContext) -> "tuple[Tensor, Tensor]":
        """On the device, after normalisation: ``images`` float [B, 3, S, S], ``targets`` [B] long head
        labels or [B, K] soft targets. Returns the (images, targets) the model trains on (pixel mixup)."""
        return images, targets

    def loss(self, outputs: "Tensor", targets: "Tensor", batch: "LoaderBatch", ctx: HookContext) -> "Tensor | None":
        """A scalar loss replacing the engine's (``outputs``: logits [B, K]); None: the engine's loss."""
        return None

    def after_step(self, per_sample_loss: "Tensor", batch: "LoaderBatch", ctx: HookContext) -> None:
        """After each forward/backward of a loader batch: ``per_sample_loss`` [B] (detached), e.g. momentum updates."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """The hooks' state to checkpoint: tensors, numbers, strings and lists / dicts of them only (checkpoints
        are read with ``torch.load(weights_only=True)``). Default: none."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state_dict` returned (on ``--resume``, after the rest of the run is restored)."""
        return None


__all__ = ["FinetuneHooks", "HookContext"]
