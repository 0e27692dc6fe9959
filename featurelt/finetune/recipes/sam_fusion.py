"""Recipe ``sam-fusion`` (seed 000, METHODS.md section 2): SAM PCA map fused into a timm ResNet stage.

The store's ``sam_*_pca_map`` set holds, per image, the one-component PCA map of SAM's padded square input
(longest side resized to SAM's input size, zero padding bottom / right), flattened ``map_size x map_size``.
During fine-tuning each image is cropped / flipped by the augmentation; its map must follow:

1. the crop box ``(x0, y0, x1, y1)`` in original pixels becomes map cells by ``* map_size / longest_side``
   (:func:`map_boxes`; the padding is bottom / right, so no offset);
2. ``torchvision.ops.roi_align(aligned=True)`` cuts that box and resizes it to the stage's ``H_i x W_i`` in
   one step, then the map is flipped with the image (:func:`crop_maps`);
3. normalised per image to zero mean / unit std (:func:`normalise_maps`; the paper's "resize and normalise",
   ``F_norm``);
4. ``F_fused = Conv1x1(F_norm) * F_res + F_res`` on stage ``fuse_stage`` (1..4) by a forward hook
   (:class:`MapFusion`, :func:`attach_map_fusion`). The 1x1 conv starts at zero, so before the first step the
   fused network is exactly the plain one.

Optional (``proto``): the prototype losses of section 2 (:class:`featurelt.losses.prototype.ProtoLoss`) on the
backbone's pooled feature, added to the classification loss. Paper setting: SGD lr 0.1, momentum 0.9.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from featurelt.finetune.recipes.base import RecipeHooks

DEFAULTS: dict[str, Any] = {
    "adapt": "full",          # the whole ResNet trains, as in the paper
    "optimizer": "sgd",       # paper: SGD, momentum 0.9
    "lr": 0.1,                # paper: 0.1 (ImageNet-LT), 0.2 (iNat18)
    "momentum": 0.9,
    "loss": "ce",
    "sampler": "instance",    # hard labels (the map of a mixed image is not defined)
    "augment": "flip-crop",   # the map follows the crop and the flip
}


def map_boxes(boxes: Tensor, sizes: Tensor, map_size: int) -> Tensor:
    """Crop boxes in original pixels -> boxes in map cells (SAM's longest-side padding, METHODS.md section 2).

    boxes: [B, 4] ``(x0, y0, x1, y1)`` original pixels; sizes: [B, 2] ``(W, H)`` of the original images.
    The map covers the padded square ``longest x longest`` (padding bottom / right), so each coordinate
    is scaled by ``map_size / max(W, H)``. Returns [B, 4] float.
    """
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    sizes = torch.as_tensor(sizes, dtype=torch.float32)
    if boxes.dim() != 2 or boxes.shape[1] != 4 or sizes.shape != (boxes.shape[0], 2):
        raise ValueError(f"expected boxes [B, 4] and sizes [B, 2], got boxes={tuple(boxes.shape)} sizes={tuple(sizes.shape)}")
    if (sizes <= 0).any():
        raise ValueError(f"image sizes must be > 0, got {sizes.tolist()[:4]}")
    scale = map_size / sizes.max(dim=1).values
    return boxes * scale[:, None]


def crop_maps(maps: Tensor, boxes: Tensor, sizes: Tensor, flips: Tensor, out_hw: tuple[int, int]) -> Tensor:
    """Cut each image's crop out of its map, resize to ``out_hw``, flip with the image.

    maps: [B, m*m] flattened or [B, 1, m, m]; boxes: [B, 4] original pixels; sizes: [B, 2] (W, H);
    flips: [B] bool (horizontal flip after the crop). Returns [B, 1, H_i, W_i] (``roi_align``,
    ``aligned=True``: a box on whole cells at one sample per output cell reads the cells exactly).
    """
    from torchvision.ops import roi_align

    if maps.dim() == 2:
        m = math.isqrt(maps.shape[1])
        if m * m != maps.shape[1]:
            raise ValueError(f"a flattened map must have map_size**2 values, got {maps.shape[1]}")
        maps = maps.reshape(-1, 1, m, m)
    if maps.dim() != 4 or maps.shape[1] != 1 or maps.shape[2] != maps.shape[3]:
        raise ValueError(f"expected maps [B, 1, m, m], got shape={tuple(maps.shape)}")
    b, m = maps.shape[0], maps.shape[-1]
    cells = map_boxes(boxes, sizes, m).to(maps)
    rois = torch.cat([torch.arange(b, dtype=maps.dtype, device=maps.device)[:, None], cells], dim=1)
    out = roi_align(maps, rois, output_size=tuple(out_hw), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    flips = torch.as_tensor(flips, dtype=torch.bool, device=maps.device)
    return torch.where(flips[:, None, None, None], out.flip(-1), out)


def normalise_maps(maps: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-image standardisation of [B, 1, H, W] maps: zero mean, unit std (``F_norm``; a constant map -> 0)."""
    mean = maps.mean(dim=(1, 2, 3), keepdim=True)
    std = maps.std(dim=(1, 2, 3), keepdim=True, unbiased=False)
    return (maps - mean) / (std + eps)


class MapFusion(nn.Module):
    """``F_fused = Conv1x1(F_norm) * F_res + F_res`` (METHODS.md section 2) for one stage of ``channels``.

    The conv (1 -> C_i, with bias) starts at zero: the fused stage equals the plain one until it learns.
    The batch's raw maps and crop parameters are set before the forward, with :meth:`set_batch` or, from a
    loader batch and the ``table`` of maps, :meth:`set_loader_batch` (the engine calls it before evaluation
    and export forwards, the recipe's ``make_batch`` before training ones); the hook crops them to the
    stage's spatial size (known only there).
    """

    def __init__(self, channels: int, table: "MapTable | None" = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, int(channels), kernel_size=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.table = table
        self._batch: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    def set_loader_batch(self, images: Tensor, batch: Any) -> None:
        """The maps of a loader batch (``sample_ids`` or ``columns["sample_id"]``, ``extras`` = per-image
        ``{"box", "flip", "size"}``) from ``table``, on ``images``' device."""
        if self.table is None:
            raise RuntimeError("MapFusion: no map table to look the batch's maps up in")
        ids = batch.sample_ids if hasattr(batch, "sample_ids") else batch.columns["sample_id"]
        boxes, sizes, flips = aug_params(batch.extras)
        self.set_batch(self.table.maps(list(ids)).to(images.device), boxes, sizes, flips)

    def set_batch(self, maps: Tensor, boxes: Tensor, sizes: Tensor, flips: Tensor) -> None:
        """maps [B, m*m] (or [B, 1, m, m]), boxes [B, 4] original px, sizes [B, 2] (W, H), flips [B] bool."""
        self._batch = (maps, boxes, sizes, flips)

    def clear(self) -> None:
        self._batch = None

    def forward(self, feat: Tensor) -> Tensor:
        """feat: [B, C_i, H_i, W_i] stage output -> same shape, fused with the batch's maps."""
        if self._batch is None:
            raise RuntimeError("MapFusion: no SAM maps set for this batch (set_batch before the forward)")
        maps, boxes, sizes, flips = self._batch
        if maps.shape[0] != feat.shape[0]:
            raise ValueError(f"MapFusion: {maps.shape[0]} maps for a batch of {feat.shape[0]} images")
        fmap = normalise_maps(crop_maps(maps.to(feat.device, torch.float32), boxes, sizes, flips, feat.shape[-2:]))
        return self.conv(fmap.to(feat.dtype)) * feat + feat


def stage_module(model: nn.Module, stage: int) -> tuple[str, nn.Module]:
    """The ResNet stage ``layer{stage}`` (timm naming), found anywhere inside ``model`` (it may be wrapped)."""
    if stage not in (1, 2, 3, 4):
        raise ValueError(f"--fuse-stage must be 1..4, got {stage}")
    for name, mod in model.named_modules():
        if name == f"layer{stage}" or name.endswith(f".layer{stage}"):
            return name, mod
    raise ValueError(f"sam-fusion needs a ResNet with stages layer1..layer4 (timm ResNet); "
                     f"{type(model).__name__} has no 'layer{stage}'")


def stage_channels(stage: nn.Module) -> int:
    """Output channels of a ResNet stage (last conv / norm of its last block)."""
    for mod in reversed(list(stage.modules())):
        if isinstance(mod, nn.BatchNorm2d):
            return int(mod.num_features)
        if isinstance(mod, nn.Conv2d):
            return int(mod.out_channels)
    raise ValueError("cannot tell the stage's output channels (no Conv2d / BatchNorm2d inside)")


def attach_map_fusion(model: nn.Module, stage: int, table: "MapTable | None" = None) -> MapFusion:
    """Register ``MapFusion`` on ``layer{stage}`` of ``model`` by a forward hook; it becomes the submodule
    ``model.sam_fusion`` (so its conv trains and checkpoints with the model). Returns the fusion module."""
    _, mod = stage_module(model, stage)
    fusion = MapFusion(stage_channels(mod), table)
    p = next(model.parameters(), None)
    if p is not None:
        fusion.to(p.device)
    model.add_module("sam_fusion", fusion)
    mod.register_forward_hook(lambda _m, _inp, out: fusion(out))
    return fusion


class MapTable:
    """The store's ``emb_<set>`` PCA maps (view 0) in memory: ``maps(sample_ids) -> [B, m*m] float32``."""

    def __init__(self, sample_ids: Sequence[str], vectors: np.ndarray, set_name: str) -> None:
        self.set_name = set_name
        self.vectors = np.asarray(vectors, dtype=np.float32)
        if self.vectors.ndim != 2 or math.isqrt(self.vectors.shape[1]) ** 2 != self.vectors.shape[1]:
            raise ValueError(f"embedding set '{set_name}' is not a square map (dim {self.vectors.shape[-1]})")
        self.row = {str(s): i for i, s in enumerate(sample_ids)}

    @classmethod
    def from_store(cls, store: Any, set_name: str | None = None) -> "MapTable":
        """Read ``emb_<set_name>`` (default: the only ``sam_*_pca_map`` set of the store)."""
        if set_name is None:
            names = _pca_map_sets(store)
            if len(names) != 1:
                raise ValueError(f"sam-fusion needs one sam_*_pca_map embedding set (extract sam:... --products "
                                 f"pca_map); found {names or 'none'}: pass --map-set NAME")
            set_name = names[0]
        table = f"emb_{set_name}"
        if not store.has_table(table):
            raise ValueError(f"embedding set '{set_name}' does not exist (no table {table})")
        t = store.read(table, columns=["sample_id", "vector"], filter="view = 0")
        vec = np.asarray(t.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
        n = t.num_rows
        return cls(t.column("sample_id").to_pylist(), vec.reshape(n, -1) if n else vec.reshape(0, 1), set_name)

    @property
    def map_size(self) -> int:
        return math.isqrt(self.vectors.shape[1])

    def maps(self, sample_ids: Sequence[str]) -> Tensor:
        missing = [s for s in sample_ids if str(s) not in self.row]
        if missing:
            raise ValueError(f"embedding set '{self.set_name}' has no map for sample {missing[0]!r} "
                             f"({len(missing)} missing in this batch): extract it for every train / test sample")
        return torch.from_numpy(self.vectors[[self.row[str(s)] for s in sample_ids]])


def _pca_map_sets(store: Any) -> list[str]:
    if not store.has_table("embedding_sets"):
        return []
    names = store.read("embedding_sets", columns=["name"]).column("name").to_pylist()
    return sorted(n for n in names if n.startswith("sam_") and n.endswith("_pca_map"))


def aug_params(extras: Sequence[dict | None]) -> tuple[Tensor, Tensor, Tensor]:
    """The loader's per-image augmentation records ``{"box", "flip", "size"}`` -> boxes [B, 4], sizes [B, 2],
    flips [B] bool (the engine's train and evaluation images both carry one)."""
    boxes, sizes, flips = [], [], []
    for i, e in enumerate(extras):
        if not isinstance(e, dict) or "box" not in e or "size" not in e:
            raise ValueError(f"sam-fusion: image {i} of the batch has no augmentation record (box / flip / size)")
        boxes.append([float(v) for v in e["box"]])
        sizes.append([float(v) for v in e["size"]])
        flips.append(bool(e.get("flip", False)))
    return torch.tensor(boxes), torch.tensor(sizes), torch.tensor(flips)


class SamFusionHooks(RecipeHooks):
    """Fuse the SAM PCA map into ResNet stage ``fuse_stage``; optional prototype losses (``proto``).

    store: the store (or its root) holding the ``sam_*_pca_map`` set, read at the run's pinned version.
    map_set: the embedding set (default: the store's only ``sam_*_pca_map`` set). proto: add
    ``ProtoLoss`` (section 2) on the pooled backbone feature; proto_beta: its weight beta.
    """

    name = "sam-fusion"
    defaults = DEFAULTS

    def __init__(self, *, store: Any = None, fuse_stage: int = 3, map_set: str | None = None, proto: bool = False,
                 proto_beta: float = 1e-4) -> None:
        if fuse_stage not in (1, 2, 3, 4):
            raise ValueError(f"--fuse-stage must be 1..4, got {fuse_stage}")
        self.store = store
        self.fuse_stage, self.map_set, self.proto, self.proto_beta = int(fuse_stage), map_set, bool(proto), float(proto_beta)
        self.fusion: MapFusion | None = None
        self.table: MapTable | None = None
        self.proto_loss: nn.Module | None = None
        self._pooled: Tensor | None = None

    def check(self, cfg: Any) -> None:
        if not str(cfg.backbone).startswith("timm:"):
            raise ValueError(f"recipe 'sam-fusion' fuses into a timm ResNet stage: --backbone timm:<resnet>, "
                             f"got {cfg.backbone!r}")
        if cfg.sampler in ("lfm", "balancemix"):
            raise ValueError(f"recipe 'sam-fusion' needs one SAM map per image: a mixup sampler ({cfg.sampler}) "
                             f"mixes two images")

    def wrap_model(self, model: nn.Module, ctx: Any) -> nn.Module:
        from featurelt.store import Store

        if self.store is None:
            raise ValueError("recipe 'sam-fusion' needs the store (its sam_*_pca_map set): build_hooks(store=...)")
        store = (Store(self.store.root, as_of=ctx.cfg.as_of, storage_options=self.store.storage_options)
                 if isinstance(self.store, Store) else Store(self.store, as_of=ctx.cfg.as_of))
        self.table = MapTable.from_store(store, self.map_set)
        self.fusion = attach_map_fusion(model, self.fuse_stage, self.table)
        if self.proto:
            from featurelt.losses import LossContext
            from featurelt.losses.prototype import ProtoLoss

            self.proto_loss = ProtoLoss(LossContext(torch.as_tensor(ctx.class_counts, dtype=torch.float32)),
                                        beta=self.proto_beta)
            backbone = getattr(model, "backbone", model)
            backbone.register_forward_hook(lambda _m, _i, out: setattr(self, "_pooled", out))
        return model

    def make_batch(self, images: Tensor, targets: Tensor, batch: Any, ctx: Any) -> tuple[Tensor, Tensor]:
        assert self.fusion is not None
        self.fusion.set_loader_batch(images, batch)
        return images, targets

    def loss(self, outputs: Tensor, targets: Tensor, batch: Any, ctx: Any) -> Tensor | None:
        if self.proto_loss is None:
            return None
        if self._pooled is None:
            raise RuntimeError("sam-fusion --proto: the pooled backbone feature of the batch was not seen")
        if targets.dim() != 1:
            raise ValueError("sam-fusion --proto needs hard labels (no mixup sampler)")
        base = ctx.loss_fn(outputs, targets)
        self.proto_loss.to(self._pooled.device)
        return base + self.proto_loss(self._pooled.float(), targets)
