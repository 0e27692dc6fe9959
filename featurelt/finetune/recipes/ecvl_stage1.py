"""Recipe ``ecvl-stage1`` (seed 003, METHODS.md section 5): image-text contrastive fine-tuning with
momentum-driven RandAugment in pixel space.

- Loss: ``L_v->l + L_l->v`` (InfoNCE with temperature) on ``logits = cos(f_i, t_k) / tau`` against the class
  texts "A photo of a {class}" (``--head text --text-set``, ``head_scale = 1 / tau``): ``contrastive-vl`` with
  ``l2v_weight = 1``.
- Text tower: the paper trains both towers in stage 1 (seed 003, section 3.3: "The parameters of the text
  encoder and image encoder are updated instantly during training"; Algorithm 1 "simultaneously trains the
  visual and language branches"). Here it stays frozen by default: the class texts are then the stored
  ``--text-set`` rows, the very embeddings stage 2's ``train-head --text-set`` reads, and a step costs one image
  forward. ``--recipe-opt train_text=true`` follows the paper: the ``clip:`` backbone's text tower (same weights
  as the image tower: ``--pretrained`` / ``--checkpoint`` / ``--seed``) encodes "A photo of a {class}" for every
  class at every forward and is trained in full with the image tower (whatever ``--adapt`` does to the image
  tower); the stored set is then only checked for shape. Its fine-tuned class embeddings are in the checkpoint
  (``text_tower.*``), not written as a text set: stage 2 still reads ``--text-set``.
- Augmentation: each sample's momentum loss ``Lm_i = beta Lm_i + (1 - beta) L_i`` (per epoch, the mean of its
  losses; :func:`featurelt.samplers.momentum_update`) gives ``M_i`` in [0, 1]
  (:func:`featurelt.samplers.momentum_strength`); every step, each image gets ``k`` RandAugment operations
  chosen at random, each applied with probability ``M_i`` and strength ``M_i * zeta``, ``zeta ~ U(0, 1)``
  (:func:`momentum_randaugment`; the pixel form of what cached views approximate in stage 2's sampler).
  Samples not seen yet have ``M_i = 0`` (plain image).
- Resume and DDP: the momentum state and the augmentation generator are the hooks' ``state_dict`` (saved in every
  checkpoint, restored on ``--resume``: bit-identical to an uninterrupted run on CPU); under DDP every rank
  gathers every rank's per-sample losses, so all ranks hold one process's M_i. ``L_l->v`` is a batch term: under
  DDP it is computed over each rank's share of the batch (not gathered), so with ``l2v_weight > 0`` the losses,
  and M_i, differ from one process's by that.
- Stage 2: ``train-head --head adapter --loss contrastive-vl --sampler class-balanced`` on the exported set.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor, nn

from featurelt.finetune.recipes.base import RecipeHooks
from featurelt.samplers.momentum import fold_epoch_losses, momentum_strength

DEFAULTS: dict[str, Any] = {
    "head": "text",                    # cosine to the frozen class text embeddings / tau
    "head_scale": 1 / 0.07,            # 1 / tau (CLIP's initial temperature; the paper gives no value)
    "loss": "contrastive-vl",
    "loss_opts": {"l2v_weight": 1.0},  # L_v->l + L_l->v
    "sampler": "instance",
    "augment": "flip-crop",            # the loader's crop / flip; RandAugment is this recipe's, per sample
    "optimizer": "adamw",
    "lr": 1e-5,
}
TEMPLATE = "A photo of a {}"


def _signed(v: float, sign: bool) -> float:
    return -v if sign else v


# op(image [C,H,W] float in [0, 1], strength s in [0, 1], sign) -> image; magnitudes at s = 1 are
# torchvision RandAugment's largest bin (shear 0.3, translate 150/331 = 0.45 of the side, rotate 30 deg, enhance
# factors 1 +- 0.9, posterize to 4 bits, solarize threshold 0); autocontrast has no strength.
OPS: dict[str, Callable[[Tensor, float, bool], Tensor]] = {
    "shear_x": lambda x, s, n: TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0,
                                         shear=[math.degrees(math.atan(_signed(0.3 * s, n))), 0.0]),
    "shear_y": lambda x, s, n: TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0,
                                         shear=[0.0, math.degrees(math.atan(_signed(0.3 * s, n)))]),
    "translate_x": lambda x, s, n: TF.affine(x, angle=0.0, translate=[int(_signed(0.45 * s * x.shape[-1], n)), 0],
                                             scale=1.0, shear=[0.0, 0.0]),
    "translate_y": lambda x, s, n: TF.affine(x, angle=0.0, translate=[0, int(_signed(0.45 * s * x.shape[-2], n))],
                                             scale=1.0, shear=[0.0, 0.0]),
    "rotate": lambda x, s, n: TF.rotate(x, _signed(30.0 * s, n)),
    "brightness": lambda x, s, n: TF.adjust_brightness(x, 1.0 + _signed(0.9 * s, n)),
    "color": lambda x, s, n: TF.adjust_saturation(x, 1.0 + _signed(0.9 * s, n)),
    "contrast": lambda x, s, n: TF.adjust_contrast(x, 1.0 + _signed(0.9 * s, n)),
    "sharpness": lambda x, s, n: TF.adjust_sharpness(x, 1.0 + _signed(0.9 * s, n)),
    "solarize": lambda x, s, n: TF.solarize(x, 1.0 - s),
    "posterize": lambda x, s, n: TF.posterize((x * 255).round().to(torch.uint8), 8 - int(round(4 * s))).float() / 255,
    "autocontrast": lambda x, s, n: TF.autocontrast(x),
}


def momentum_randaugment(images: Tensor, strength: Tensor, *, k: int = 2, generator: torch.Generator,
                         ops: Sequence[str] = tuple(OPS)) -> Tensor:
    """ECVL's memory-driven RandAugment (METHODS.md section 5) on images [B, C, H, W] float in [0, 1].

    strength: [B] M_i in [0, 1]. Per image: ``k`` distinct operations of ``ops`` at random; each is applied
    with probability M_i, at strength ``M_i * zeta`` (zeta ~ U(0, 1)) with a random sign where the
    operation has one. M_i = 0 leaves the image unchanged. Returns a new [B, C, H, W] tensor.
    """
    if images.dim() != 4 or strength.shape != (images.shape[0],):
        raise ValueError(f"expected images [B, C, H, W] and strength [B], got {tuple(images.shape)} / {tuple(strength.shape)}")
    if not 0 < k <= len(ops):
        raise ValueError(f"k must be in 1..{len(ops)}, got {k}")
    out = images.clone()
    m = strength.detach().float().cpu()
    for i in range(images.shape[0]):
        chosen = torch.randperm(len(ops), generator=generator)[:k].tolist()
        apply = (torch.rand(k, generator=generator) < m[i]).tolist()
        zeta = torch.rand(k, generator=generator).tolist()
        neg = (torch.rand(k, generator=generator) < 0.5).tolist()
        x = out[i]
        for c, a, z, n in zip(chosen, apply, zeta, neg):
            if a:
                x = OPS[ops[c]](x, float(m[i]) * z, bool(n)).clamp(0.0, 1.0)
        out[i] = x
    return out


class MomentumState:
    """Per-sample momentum loss over the train rows, keyed by sample_id (METHODS.md section 5).

    ``add(sample_ids, losses)`` accumulates this epoch's losses; ``fold()`` (at the start of an epoch) turns
    each seen sample's mean loss into ``Lm`` by :func:`momentum_update`; ``strength(sample_ids)`` is M_i.
    """

    def __init__(self, beta: float = 0.9) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"momentum beta must be in [0, 1), got {beta}")
        self.beta = float(beta)
        self.index: dict[str, int] = {}
        self.lm = np.zeros(0)
        self.sum = np.zeros(0)
        self.cnt = np.zeros(0)
        self.m = np.zeros(0)

    def _rows(self, sample_ids: Sequence[str]) -> np.ndarray:
        new = [s for s in dict.fromkeys(map(str, sample_ids)) if s not in self.index]
        if new:
            for s in new:
                self.index[s] = len(self.index)
            grow = len(new)
            self.lm = np.concatenate([self.lm, np.full(grow, np.nan)])
            self.sum = np.concatenate([self.sum, np.zeros(grow)])
            self.cnt = np.concatenate([self.cnt, np.zeros(grow)])
            self.m = np.concatenate([self.m, np.zeros(grow)])
        return np.array([self.index[str(s)] for s in sample_ids], dtype=np.int64)

    def add(self, sample_ids: Sequence[str], losses: Tensor | np.ndarray) -> None:
        rows = self._rows(sample_ids)
        loss = torch.as_tensor(losses).detach().float().cpu().numpy().astype(np.float64)
        if loss.shape != rows.shape:
            raise ValueError(f"momentum: {rows.size} samples and {loss.size} losses")
        np.add.at(self.sum, rows, loss)
        np.add.at(self.cnt, rows, 1.0)

    def fold(self) -> None:
        if self.cnt.any():
            self.lm = fold_epoch_losses(self.lm, self.sum, self.cnt, self.beta)
            self.sum[:] = 0.0
            self.cnt[:] = 0.0
        self.m = momentum_strength(self.lm)

    def strength(self, sample_ids: Sequence[str]) -> Tensor:
        rows = self._rows(sample_ids)  # first: it may grow ``m``
        return torch.from_numpy(self.m[rows].astype(np.float32))

    def state_dict(self) -> dict[str, Any]:
        """The whole state as a checkpoint holds it: sample ids in row order and float64 tensors."""
        return {"beta": self.beta, "sample_ids": list(self.index),
                **{k: torch.from_numpy(getattr(self, k).copy()) for k in ("lm", "sum", "cnt", "m")}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ids = [str(s) for s in state["sample_ids"]]
        arrays = {k: state[k].numpy().astype(np.float64).copy() for k in ("lm", "sum", "cnt", "m")}
        if any(a.shape != (len(ids),) for a in arrays.values()):
            raise ValueError(f"momentum state: {len(ids)} sample ids but arrays of shapes "
                             f"{[tuple(a.shape) for a in arrays.values()]}")
        self.beta = float(state["beta"])
        self.index = {s: i for i, s in enumerate(ids)}
        for k, a in arrays.items():
            setattr(self, k, a)

    def by_sample(self) -> dict[str, tuple[float, float, float, float]]:
        """sample_id -> (Lm, loss sum, count, M) this epoch: the state independent of row order (tests, DDP checks)."""
        return {s: (float(self.lm[i]), float(self.sum[i]), float(self.cnt[i]), float(self.m[i]))
                for s, i in self.index.items()}


class ClipTextTower(nn.Module):
    """A CLIP text tower over fixed prompts: ``forward() -> [K, D]`` = ``encode_text(tokens)`` (trainable)."""

    def __init__(self, net: nn.Module, tokens: Tensor) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("tokens", tokens.long(), persistent=False)

    def forward(self) -> Tensor:
        return self.net.encode_text(self.tokens)


def clip_text_tower(cfg: Any, class_names: Sequence[str]) -> ClipTextTower:
    """The trainable text tower of ``cfg.backbone`` (``clip:<model>``; the weights ``build_backbone`` gives the
    image tower) over ``TEMPLATE`` of each class name, in head order."""
    from featurelt.encoders.clip import ClipTextEncoder

    family, _, model = str(cfg.backbone).partition(":")
    if family != "clip":
        raise ValueError(f"recipe 'ecvl-stage1' train_text=true trains a CLIP text tower: needs a clip: backbone, "
                         f"got {cfg.backbone!r}")
    pretrained = cfg.pretrained if cfg.pretrained is None or cfg.pretrained.lower() != "default" else None
    untrained = pretrained is not None and pretrained.lower() == "none"
    enc = ClipTextEncoder(model, checkpoint=cfg.checkpoint, seed=cfg.seed, device="cpu",
                          untrained=untrained and model != "tiny",
                          pretrained=None if untrained or pretrained is None else pretrained)
    net = enc._model
    net.requires_grad_(True)
    net.train()
    tokens = enc._tokenizer([TEMPLATE.format(n) for n in class_names])
    return ClipTextTower(net, tokens)


class ECVLStage1Hooks(RecipeHooks):
    """Momentum-driven RandAugment on the device batch; per-sample losses fed back after each step.

    Recipe options: beta, momentum of ``Lm`` in [0, 1) (default 0.9; the paper gives none); k, RandAugment
    operations per image (default 2); train_text, train the CLIP text tower too (default false; module
    docstring). The augmentation draws of epoch e on rank r are seeded by (config seed, e, r).
    """

    name = "ecvl-stage1"
    defaults = DEFAULTS

    def __init__(self, *, beta: float = 0.9, k: int = 2, train_text: bool = False, store: Any = None) -> None:
        if not 0 < int(k) <= len(OPS):
            raise ValueError(f"ecvl-stage1 k must be in 1..{len(OPS)}, got {k}")
        if not isinstance(train_text, bool):
            raise ValueError(f"ecvl-stage1 train_text must be true or false, got {train_text!r}")
        self.state = MomentumState(beta)
        self.k = int(k)
        self.train_text = train_text
        self.store = store
        self.generator = torch.Generator()
        self._epoch: int | None = None

    def check(self, cfg: Any) -> None:
        if not cfg.text_set:
            raise ValueError("recipe 'ecvl-stage1' needs class text embeddings 'A photo of a {class}': --text-set NAME")
        if cfg.head != "text":
            raise ValueError(f"recipe 'ecvl-stage1' scores images against the class texts: --head text, got {cfg.head!r}")

    def wrap_model(self, model: Any, ctx: Any) -> Any:
        """With train_text: the model's text head scores against the trained text tower's class prompts."""
        if not self.train_text:
            return model
        from featurelt.store import Store
        from featurelt.train.head import _classes

        if self.store is None:
            raise ValueError("recipe 'ecvl-stage1' train_text=true reads the class names: build the hooks with the store")
        if isinstance(self.store, Store):
            pinned = Store(self.store.root, as_of=ctx.cfg.as_of, storage_options=self.store.storage_options)
        else:
            pinned = Store(str(self.store), as_of=ctx.cfg.as_of)
        classes, _ = _classes(pinned)
        model.text_tower = clip_text_tower(ctx.cfg, classes.column("name").to_pylist())
        return model

    def train_plan(self, epoch: int, ctx: Any) -> None:
        if epoch != self._epoch:
            self.start_epoch(epoch, seed=ctx.cfg.seed, rank=ctx.rank)
        return None  # the configured sampler's plan

    def start_epoch(self, epoch: int, *, seed: int = 0, rank: int = 0) -> None:
        """Fold the last epoch's losses into ``Lm`` and seed this epoch's augmentation draws with (seed, epoch,
        rank): each rank augments its own share of the batch with its own stream."""
        self.state.fold()
        self.generator.manual_seed(int(seed) * 1_000_003 + int(epoch) + 1_000_000_007 * int(rank))
        self._epoch = epoch

    def state_dict(self) -> dict[str, Any]:
        """M_i's state, the augmentation generator and the epoch folded last (checkpointed; see FinetuneHooks)."""
        return {"momentum": self.state.state_dict(), "generator": self.generator.get_state(),
                "epoch": -1 if self._epoch is None else int(self._epoch)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            raise ValueError("recipe 'ecvl-stage1': the checkpoint holds no momentum state (written before hook "
                             "state was checkpointed?); start the run again")
        self.state.load_state_dict(state["momentum"])
        self.generator.set_state(state["generator"])
        self._epoch = None if int(state["epoch"]) < 0 else int(state["epoch"])

    def augment(self, images: Tensor, sample_ids: Sequence[str], mean: Tensor, std: Tensor) -> Tensor:
        """Normalised images [B, C, H, W] -> augmented, normalised again (mean / std [C])."""
        m = self.state.strength(sample_ids)
        if not (m > 0).any():
            return images
        mean = mean.to(images).view(1, -1, 1, 1)
        std = std.to(images).view(1, -1, 1, 1)
        x01 = (images * std + mean).clamp(0.0, 1.0)
        aug = momentum_randaugment(x01.float().cpu(), m, k=self.k, generator=self.generator).to(images)
        keep = (m <= 0).to(images.device)[:, None, None, None]
        return torch.where(keep, images, (aug - mean) / std)

    def make_batch(self, images: Tensor, targets: Tensor, batch: Any, ctx: Any) -> tuple[Tensor, Tensor]:
        mean, std = ctx.state["normalize"]
        return self.augment(images, batch.sample_ids, torch.tensor(mean), torch.tensor(std)), targets

    def after_step(self, per_sample_loss: Tensor, batch: Any, ctx: Any) -> None:
        """Add the batch's per-sample losses to this epoch's sums. Under DDP every rank gathers every rank's
        (train rows, losses) and adds them in the global batch's order (rank r held entries r, r + N, ...), so
        every rank holds the M_i of one process."""
        ids, loss = list(batch.sample_ids), per_sample_loss.detach().float().cpu()
        if ctx.world_size > 1:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                parts: list[Any] = [None] * ctx.world_size
                dist.all_gather_object(parts, (batch.rows.cpu(), loss))
                pos = torch.cat([r + ctx.world_size * torch.arange(len(p[0])) for r, p in enumerate(parts)])
                order = torch.argsort(pos, stable=True)
                rows = torch.cat([p[0] for p in parts])[order]
                loss = torch.cat([p[1] for p in parts])[order]
                ids = ctx.train.sample_ids[rows.numpy()].tolist()
        self.state.add(ids, loss)
