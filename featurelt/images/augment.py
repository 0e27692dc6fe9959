"""Training and evaluation image transforms on uint8 in loader workers: RandomResizedCrop + flip (+ RandAugment), resize + center crop.

:class:`TrainTransform` and :class:`EvalTransform` are ``make_image`` callables of
:class:`featurelt.images.loader.StoreImageLoader` (picklable):
``(decoded, row, index) -> (uint8 [3, S, S] tensor, {"box", "flip", "size"})``. They work on uint8
and do not normalise (the device does: :class:`featurelt.images.transforms.DeviceStage`). The extra
says where the output came from, so that a recipe can cut the same region out of a stored feature
map (FINETUNE.md "SAM map fusion"):

* ``box``: ``(x0, y0, x1, y1)`` floats, the cropped region in the original image's pixels
  (``x1 - x0`` wide; ``crop(x0, y0, x1, y1)`` then resize to ``S x S`` gives the output before the flip);
* ``flip``: whether the output was flipped left-right after the resize;
* ``size``: ``(W, H)`` of the original image.

:class:`TrainTransform` draws its crop (torchvision's ``RandomResizedCrop.get_params``), its flip and
its RandAugment ops from the torch RNG seeded by ``(seed, epoch, index)`` (``index``: the position
in the epoch's plan), saving and restoring the caller's RNG state: the same triple gives the same
output in any process, worker or order. The crop is cut before the resize, so only the crop is resized.
:class:`EncodedJpeg` makes the same draws but leaves the decoding to the device (``decode_jpeg`` there).
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import warnings
from typing import TYPE_CHECKING, Any, Iterator, Literal

if TYPE_CHECKING:
    import torch

    from featurelt.images.decode import DecodedImage
    from featurelt.images.packing import PackedImages

Augment = Literal["none", "flip-crop", "randaugment"]
AUGMENTS: tuple[str, ...] = ("none", "flip-crop", "randaugment")
Interpolation = Literal["bilinear", "bicubic"]
RANDAUGMENT_NUM_OPS = 2  # ops per image (timm's rand-m9-n2 and torchvision's default)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The 63-bit torch seed of plan position ``index`` in ``epoch`` of a run seeded ``seed``."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def decode_uint8(decoded: "DecodedImage") -> "torch.Tensor":
    """The RGB pixels of a decoded sample as ``uint8 [3, H, W]`` (a view of interleaved pixels):
    torchvision for plain PNG / JPEG (:meth:`DecodedImage.plain`), else PIL."""
    import numpy as np
    import torch

    plain = decoded.plain()
    if plain is not None:
        return plain[0]
    return torch.from_numpy(np.array(decoded.pil(), dtype=np.uint8)).permute(2, 0, 1)


def resize_crop(x: "torch.Tensor", box: tuple[int, int, int, int], size: int, interpolation: Interpolation) -> "torch.Tensor":
    """Cut ``box = (x0, y0, x1, y1)`` (whole pixels) out of ``uint8 [3, H, W]`` and resize only the cut to
    ``size x size`` (antialiased, PyTorch's uint8 resampling: PIL's fixed-point passes). Returns uint8 [3, size, size]."""
    import torch
    import torch.nn.functional as F

    x0, y0, x1, y1 = box
    crop = x[:, y0:y1, x0:x1]
    if crop.shape[-2:] == (size, size):
        return crop.contiguous()
    out = F.interpolate(crop[None].contiguous(memory_format=torch.channels_last), size=(size, size),
                        mode=interpolation, antialias=True, align_corners=False)
    return out[0]


class EvalTransform:
    """``make_image`` for evaluation: resize the shorter side to ``floor(image_size / crop_pct)``
    (torchvision ``resize`` sizes), center crop ``image_size`` (timm's eval transform without its
    normalisation). Returns ``(uint8 [3, S, S], {"box", "flip": False, "size"})``; ``box`` is the
    center crop mapped back to original pixels. Picklable."""

    def __init__(self, image_size: int, *, crop_pct: float = 1.0, interpolation: Interpolation = "bilinear") -> None:
        if image_size <= 0:
            raise ValueError(f"image_size must be > 0, got {image_size}")
        if not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        if interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"interpolation must be bilinear or bicubic, got {interpolation!r}")
        self.image_size, self.crop_pct, self.interpolation = image_size, crop_pct, interpolation

    @property
    def resize_to(self) -> int:
        """The shorter side before the crop (timm: ``floor(image_size / crop_pct)``)."""
        return math.floor(self.image_size / self.crop_pct)

    def __call__(self, decoded: "DecodedImage", row: dict[str, Any], index: int) -> tuple["torch.Tensor", dict[str, Any]]:
        return self.apply(decode_uint8(decoded))

    def apply(self, x: "torch.Tensor") -> tuple["torch.Tensor", dict[str, Any]]:
        """``uint8 [3, H, W]`` -> the eval image and its extra."""
        import torch
        import torch.nn.functional as F

        from featurelt.images.transforms import resized_size

        h, w = x.shape[-2:]
        nh, nw = resized_size(h, w, self.resize_to)
        s = self.image_size
        if (nh, nw) != (h, w):
            x = F.interpolate(x[None].contiguous(memory_format=torch.channels_last), size=(nh, nw),
                              mode=self.interpolation, antialias=True, align_corners=False)[0]
        top, left = int(round((nh - s) / 2.0)), int(round((nw - s) / 2.0))  # torchvision center_crop
        if top < 0 or left < 0:
            raise ValueError(f"image of {w}x{h} px resized to {nw}x{nh} is smaller than the crop {s}")
        return x[:, top:top + s, left:left + s], {"box": _center_box(int(w), int(h), self.resize_to, s), "flip": False,
                                                   "size": (int(w), int(h))}


class TrainTransform:
    """``make_image`` for training (picklable): ``(decoded, row, index) -> (uint8 [3, S, S], extra)``.

    ``augment``:
      * ``none``: resize the shorter side to ``image_size`` and center crop (:class:`EvalTransform`
        with ``crop_pct=1``), no randomness;
      * ``flip-crop``: RandomResizedCrop (``scale``: area fraction, ``ratio``: aspect range; the box
        from torchvision's ``RandomResizedCrop.get_params``), cut then resized to ``S x S``, then a
        horizontal flip with p = 0.5;
      * ``randaugment``: ``flip-crop``, then torchvision.transforms.v2 ``RandAugment`` (2 ops of
        magnitude ``randaugment_magnitude`` of 31 bins) on the uint8 image.

    Randomness comes from the torch RNG seeded by :func:`sample_seed` ``(seed, epoch, index)``;
    :meth:`set_epoch` before each epoch's loader is made (the loader pickles this object).
    """

    def __init__(self, image_size: int, augment: Augment = "none", *, seed: int = 0,
                 scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 randaugment_magnitude: int = 9, interpolation: Interpolation = "bilinear") -> None:
        if augment not in AUGMENTS:
            raise ValueError(f"unknown augment {augment!r}; available: {', '.join(AUGMENTS)}")
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"scale must be 0 < min <= max <= 1, got {tuple(scale)}")
        if not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must be 0 < min <= max, got {tuple(ratio)}")
        if not 0 <= randaugment_magnitude <= 30:
            raise ValueError(f"randaugment_magnitude must be in 0..30, got {randaugment_magnitude}")
        self.eval = EvalTransform(image_size, crop_pct=1.0, interpolation=interpolation)
        self.image_size, self.augment, self.seed = image_size, augment, seed
        self.scale, self.ratio = (float(scale[0]), float(scale[1])), (float(ratio[0]), float(ratio[1]))
        self.randaugment_magnitude, self.interpolation = randaugment_magnitude, interpolation
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the next images from epoch ``epoch``'s seeds."""
        self.epoch = int(epoch)

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` from ``RandomResizedCrop.get_params`` for an image of ``width x height``,
        drawn from the current torch RNG (the caller seeds it)."""
        import torch
        from torchvision.transforms import RandomResizedCrop

        shape = torch.empty((3, height, width), device="meta")  # get_params reads only the size
        i, j, h, w = RandomResizedCrop.get_params(shape, list(self.scale), list(self.ratio))
        return j, i, j + w, i + h

    def __call__(self, decoded: "DecodedImage", row: dict[str, Any], index: int) -> tuple["torch.Tensor", dict[str, Any]]:
        return self.apply(decode_uint8(decoded), index)

    def apply(self, x: "torch.Tensor", index: int) -> tuple["torch.Tensor", dict[str, Any]]:
        """``uint8 [3, H, W]`` at plan position ``index`` -> the training image and its extra."""
        if self.augment == "none":
            return self.eval.apply(x)
        h, w = x.shape[-2:]
        with self._seeded(index):
            box, flip = self.draw(int(w), int(h))
            out = resize_crop(x, box, self.image_size, self.interpolation)
            if flip:
                out = out.flip(-1)
            if self.augment == "randaugment":
                from torchvision.transforms import v2

                out = v2.RandAugment(num_ops=RANDAUGMENT_NUM_OPS, magnitude=self.randaugment_magnitude)(out)
        return out, {"box": tuple(float(v) for v in box), "flip": flip, "size": (int(w), int(h))}

    def draw(self, width: int, height: int) -> tuple[tuple[int, int, int, int], bool]:
        """The crop box and the flip, drawn (in this order) from the current torch RNG."""
        import torch

        box = self.crop_box(width, height)
        return box, bool(torch.rand(1).item() < 0.5)

    @contextlib.contextmanager
    def _seeded(self, index: int) -> Iterator[None]:
        """torchvision draws from torch's default CPU generator: seed it for plan position ``index`` and
        put the caller's state back after (3 us; ``torch.manual_seed`` and ``fork_rng`` also touch CUDA's
        generators: 0.3-0.8 ms an image)."""
        import torch

        gen = torch.default_generator
        state = gen.get_state()
        gen.manual_seed(sample_seed(self.seed, self.epoch, index))
        try:
            yield
        finally:
            gen.set_state(state)


class EncodedJpeg:
    """``make_image`` for decoding on the device: workers only read the JPEG header and draw the crop
    box and flip of ``train`` (the same draws as :meth:`TrainTransform.apply` at the same position), and
    hand over the encoded bytes as ``uint8 [1, 1, N]`` (a batch arrives as one
    :class:`~featurelt.images.packing.PackedImages` buffer); :meth:`finish` decodes them with
    ``torchvision.io.decode_jpeg(device=...)`` (nvJPEG on CUDA), crops, resizes and flips. For
    ``augment`` ``none`` or ``flip-crop``; a sample that is not an 8-bit grey / RGB JPEG fails (the
    loader's ``failed``)."""

    def __init__(self, train: TrainTransform) -> None:
        if train.augment == "randaugment":
            raise ValueError("EncodedJpeg: RandAugment runs on decoded images in the workers; use augment "
                             "'none' or 'flip-crop' with device decoding")
        self.train = train

    def __call__(self, decoded: "DecodedImage", row: dict[str, Any], index: int) -> tuple["torch.Tensor", dict[str, Any]]:
        import torch

        from featurelt.images.decode import ImageDecodeError, plain_image_size

        data = decoded.data
        size = plain_image_size(data) if data[:2] == b"\xff\xd8" else None
        if size is None:
            raise ImageDecodeError(f"{decoded.name}: not an 8-bit grey or RGB JPEG (device decoding takes JPEG only)")
        w, h = size
        t = self.train
        if t.augment == "none":
            box, flip = _center_box(w, h, t.eval.resize_to, t.image_size), False
        else:
            with t._seeded(index):
                box, flip = t.draw(w, h)
        return (torch.frombuffer(bytearray(data), dtype=torch.uint8).view(1, 1, -1),
                {"box": tuple(float(v) for v in box), "flip": flip, "size": (w, h)})

    def finish(self, images: "PackedImages | torch.Tensor", extras: list[dict[str, Any]], *, device: str) -> "torch.Tensor":
        """A batch of this ``make_image``'s outputs -> ``uint8 [B, 3, S, S]`` on ``device``: ``decode_jpeg``
        of the whole batch there, then per image the crop of its ``box`` resized (antialiased, in float32,
        rounded) and flipped; ``none``: resize, then the center crop (:class:`EvalTransform`'s order).
        On the CPU the same code runs (tested against :class:`TrainTransform`, within rounding)."""
        import torch
        import torch.nn.functional as F
        from torchvision.io import ImageReadMode, decode_jpeg

        from featurelt.images.transforms import resized_size

        t = self.train
        s, mode = t.image_size, t.interpolation
        data = [x.reshape(-1) for x in (images.unpack() if hasattr(images, "unpack") else images)]
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders (for TorchCodec) on every call
            warnings.simplefilter("ignore", DeprecationWarning)
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        out = torch.empty((len(data), 3, s, s), dtype=torch.uint8, device=device)
        for i, (x, extra) in enumerate(zip(decoded, extras)):
            x0, y0, x1, y1 = extra["box"]
            if t.augment == "none":
                h, w = x.shape[-2:]
                nh, nw = resized_size(h, w, t.eval.resize_to)
                full = F.interpolate(x[None].float(), size=(nh, nw), mode=mode, antialias=True, align_corners=False)
                top, left = int(round((nh - s) / 2.0)), int(round((nw - s) / 2.0))
                crop = full[..., top:top + s, left:left + s]
            else:
                crop = x[:, int(y0):int(y1), int(x0):int(x1)][None].float()
                crop = F.interpolate(crop, size=(s, s), mode=mode, antialias=True, align_corners=False)
            img = crop[0].round_().clamp_(0, 255).to(torch.uint8)
            out[i] = img.flip(-1) if extra["flip"] else img
        return out


def _center_box(w: int, h: int, resize_to: int, size: int) -> tuple[float, float, float, float]:
    """:class:`EvalTransform`'s center crop in original pixels."""
    from featurelt.images.transforms import resized_size

    nh, nw = resized_size(h, w, resize_to)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    sx, sy = w / nw, h / nh
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy
