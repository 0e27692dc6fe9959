"""Image transforms split between loader workers (uint8 HostStage) and the device (DeviceResize, DeviceStage).

:class:`Preprocess` is the per-image reference transform (PIL image -> normalised float tensor)
that encoders declare; :func:`split_transform` cuts it (or an open_clip / torchvision ``Compose``)
into a :class:`HostStage` run in loader workers on each image (uint8 out) and a :class:`DeviceStage`
run on whole batches on the encoder's device (to float, normalise; with a :class:`DeviceResize`
also resize and crop), bit-identical to the whole transform (within 2 grey levels when the resize
moves to the device).
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any, Literal, Sequence

import torch
from torch import Tensor

from featurelt.images.packing import PackedImages, stack_images

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


Interpolation = Literal["nearest", "bilinear", "bicubic"]
ResizeMode = Literal["squash", "shortest_crop", "longest_pad"]


@dataclass(frozen=True)
class Preprocess:
    """PIL image -> ``[3, size, size]`` float tensor. Picklable (plain dataclass), so it can run in
    DataLoader worker processes.

    resize_mode:
      * ``squash``        -- resize to ``size x size`` ignoring the aspect ratio;
      * ``shortest_crop`` -- resize the shorter side to ``resize_to`` (default ``size``), center crop
        ``size`` (CLIP / DINOv2 evaluation transform);
      * ``longest_pad``   -- resize the longer side to ``size``, normalise, pad bottom/right with zeros
        to ``size x size`` (SAM's ``ResizeLongestSide`` + ``preprocess``).
    """

    size: int                                   # output height = width, pixels, > 0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)  # per-channel mean subtracted, on the [0,1] scale
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)   # per-channel std divided by, on the [0,1] scale
    interpolation: Interpolation = "bicubic"    # resampling filter of the resize
    resize_mode: ResizeMode = "shortest_crop"   # see the class docstring
    resize_to: int | None = None                # shorter side before the crop (shortest_crop only)
    grey: bool = False                          # convert to one luminance channel, repeated 3 times

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError(f"preprocess size must be > 0, got {self.size}")

    def resize(self, img: Any) -> Any:
        """The PIL part: mode conversion, resize and crop (everything before ``to_tensor``)."""
        from PIL import Image
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        if not isinstance(img, Image.Image):
            raise TypeError(f"preprocess expects a PIL.Image.Image, got {type(img).__name__}")
        interp = InterpolationMode(self.interpolation)
        img = img.convert("L" if self.grey else "RGB")
        if self.resize_mode == "squash":
            return TF.resize(img, [self.size, self.size], interpolation=interp, antialias=True)
        if self.resize_mode == "shortest_crop":
            img = TF.resize(img, self.resize_to or self.size, interpolation=interp, antialias=True)
            return TF.center_crop(img, [self.size, self.size])
        if self.resize_mode == "longest_pad":
            return TF.resize(img, list(longest_side_size(img.height, img.width, self.size)), interpolation=interp,
                             antialias=True)
        raise ValueError(f"unknown resize_mode {self.resize_mode!r}")

    def __call__(self, img: Any) -> Tensor:
        from torchvision.transforms import functional as TF

        x = TF.to_tensor(self.resize(img))  # [C,H,W] in [0,1]
        if self.grey:
            x = x.expand(3, -1, -1).contiguous()
        x = TF.normalize(x, list(self.mean), list(self.std))
        if self.resize_mode == "longest_pad":
            x = torch.nn.functional.pad(x, (0, self.size - x.shape[2], 0, self.size - x.shape[1]))
        return x

    def describe(self) -> dict[str, Any]:
        """The provenance ``preprocessing`` entry (size, mean, std, interpolation, resize mode ...)."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


@dataclass(frozen=True)
class ConvertMode:
    """PIL image -> the same image in ``mode`` (``"RGB"`` or ``"L"``); picklable."""

    mode: str

    def __call__(self, img: Any) -> Any:
        return img.convert(self.mode)


@dataclass(frozen=True)
class HostStage:
    """PIL image -> ``uint8 [C, H, W]`` tensor: the PIL steps of a transform (runs in DataLoader workers).

    Handing uint8 over instead of float32 moves 4x fewer bytes between worker and main process (and to
    the GPU); :class:`DeviceStage` finishes the transform on the encoder's device. The tensor is a
    ``[C, H, W]`` view of interleaved ``[H, W, C]`` pixels, as decoders produce them
    (:func:`stack_images` batches such views channels-last with one plain copy per image).

    With ``resize`` (a :class:`DeviceResize`, which then runs on the device) ``pil_steps`` only
    converts the mode and the image goes over at its decoded size, except an image of more than
    ``resize.max_pixels`` pixels: it is resized here (no crop; the device then only crops it), which
    bounds what a batch holds and moves. ``resize_first``: the transform resizes before it converts
    the mode (open_clip), which matters for palette and alpha images (PIL resizes ``P`` with the
    nearest filter, ``RGBA`` with premultiplied alpha): those are resized here too, in that order.

    ``to_rgb``: with ``resize``, ``pil_steps`` only convert to RGB, so :meth:`from_bytes` may skip
    PIL for plain grey / RGB PNG and JPEG files.
    """

    pil_steps: Any  # picklable callable PIL -> PIL (resize, crop, mode conversion)
    resize: "DeviceResize | None" = None
    resize_first: bool = False
    to_rgb: bool = False

    def from_bytes(self, data: bytes) -> Tensor | None:
        """What :meth:`__call__` returns for the decoded ``data``, decoded straight into a tensor by
        torchvision (:func:`~featurelt.images.decode.decode_plain`, the same pixels as PIL, in
        about half its time), for an 8-bit grey or RGB PNG / JPEG when this stage only converts to
        RGB; None for any other image or stage (and for a file torchvision cannot decode, or one over
        PIL's decompression-bomb limit), which then goes through PIL and :meth:`__call__`.

        An image of more than ``resize.max_pixels`` pixels is resized here with PyTorch's uint8
        kernels (:meth:`DeviceResize.resample_uint8`) where :meth:`__call__` has PIL resize it:
        within 2 grey levels of PIL, like the device's resize, and 2.5-4.7x faster for 640 px to 1,920
        px photos (decode and resize, one core; bench/RESULTS.md)."""
        from featurelt.images.decode import decode_plain

        if self.resize is None or not self.to_rgb:
            return None
        decoded = decode_plain(data)  # None for a damaged file: PIL decodes it or names what is wrong (the reject reason)
        if decoded is None:
            return None
        x, size = decoded
        w, h = size
        if w * h > self.resize.max_pixels:  # resized here, not cropped: the device then only crops it
            x = self.resize.resample_uint8(x[None], *self.resize.output_size(h, w))[0]
        return x

    def __call__(self, img: Any) -> Tensor:
        import numpy as np

        r = self.resize
        if r is not None and (img.width * img.height > r.max_pixels or (self.resize_first and img.mode not in ("RGB", "L"))):
            img = self.pil_steps(r.pil(img)) if self.resize_first else r.pil(self.pil_steps(img))
        else:
            img = self.pil_steps(img)
        a = np.array(img, dtype=np.uint8)  # one copy of PIL's interleaved pixels
        a = a[:, :, None] if a.ndim == 2 else a
        return torch.from_numpy(a).permute(2, 0, 1)  # to_tensor's [C, H, W] (minus its float cast), as a view


def resized_size(h: int, w: int, size: int) -> tuple[int, int]:
    """Output ``(height, width)`` of torchvision's ``resize(img, size)`` with an int ``size``: the
    shorter side becomes ``size``, the longer one ``int(size * long / short)``."""
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    return (new_long, size) if w <= h else (size, new_long)


def longest_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    """Output ``(height, width)`` when the longer side becomes ``size`` (SAM's ``ResizeLongestSide``,
    :class:`Preprocess` ``longest_pad``), rounded to the nearest pixel, at least 1."""
    scale = size / max(w, h)
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


@dataclass(frozen=True)
class DeviceResize:
    """Resize (and center crop) uint8 images on the encoder's device, the way PIL does it.

    PIL's antialiased resampling runs one horizontal pass, rounds to uint8, then one vertical pass,
    and rounds again. On CUDA each pass is ``torch.nn.functional.interpolate(antialias=True)`` in
    float32 along one axis (the other axis at scale 1 is left exactly as it is), rounded and clamped
    to 0..255 (:meth:`resample_float`); on the CPU, ``interpolate`` takes the uint8 batch itself
    (:meth:`resample_uint8`, PIL's fixed-point passes). Both are within 2 grey levels of PIL; most
    values are equal (up to 17 % are one level off in a mild downscale of a smooth image; tests in
    tests/test_encoders.py). Output sizes and crop offsets follow torchvision's ``resize`` and
    ``center_crop``.

    Input: a ``uint8 [B, C, h, w]`` batch (:class:`DeviceStage` batches a list of images of
    different sizes by size). Output: ``float32 [B, C, size, size]`` holding whole numbers 0..255. An image already at :meth:`output_size` is only cropped. Mode ``longest``
    (SAM) resizes the longer side to ``size`` and does not crop: a batch comes out at its
    :meth:`output_size` (the device stage pads it after normalising).
    """

    size: int                          # output height = width (longest: the longer side)
    resize_to: int | None = None       # shorter side before the crop (shortest_crop); None: size
    mode: Literal["shortest_crop", "squash", "longest"] = "shortest_crop"
    interpolation: Literal["bilinear", "bicubic"] = "bicubic"

    @property
    def max_pixels(self) -> int:
        """Images up to twice the resize target per side go to the device at their decoded size;
        larger ones (a 4000 x 3000 photo is 36 MB as uint8) are resized by PIL in the worker."""
        return (2 * (self.resize_to or self.size)) ** 2

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """Size after the resize, before the crop."""
        s = self.size
        if self.mode == "longest":  # Preprocess's longest_pad
            return longest_side_size(h, w, s)
        return (s, s) if self.mode == "squash" else resized_size(h, w, self.resize_to or s)

    def pil(self, img: Any) -> Any:
        """The same resize (no crop) with PIL, as torchvision's ``resize`` does it on a PIL image. An
        image resized here is already at :meth:`output_size` on the device, which then only crops it."""
        from PIL import Image

        nh, nw = self.output_size(img.height, img.width)
        return img.resize((nw, nh), Image.BICUBIC if self.interpolation == "bicubic" else Image.BILINEAR)

    def __call__(self, x: Tensor) -> Tensor:
        """Resize and crop a batch of one size: :meth:`resample_uint8` on the CPU, else
        :meth:`resample_float` (CUDA has no uint8 ``interpolate``)."""
        h, w = x.shape[-2:]
        nh, nw = self.output_size(h, w)
        s = self.size
        if self.mode == "longest":  # no crop
            rows, cols = slice(None), slice(None)
        else:  # torchvision center_crop
            top, left = int(round((nh - s) / 2.0)), int(round((nw - s) / 2.0))
            rows, cols = slice(top, top + s), slice(left, left + s)
        if x.device.type == "cpu" and (nh, nw) != (h, w):
            x = self.resample_uint8(x, nh, nw)[..., rows, cols]
            return x.to(torch.float32, memory_format=torch.contiguous_format)  # to float and out of channels-last at once
        return self.resample_float(x, nh, nw)[..., rows, cols]

    def resample_float(self, x: Tensor, nh: int, nw: int) -> Tensor:
        """uint8 ``[B, C, h, w]`` -> float32 ``[B, C, nh, nw]`` of whole numbers, on any device: PIL's
        two passes (horizontal first), each rounded and clamped to 0..255."""
        import torch.nn.functional as F

        h, w = x.shape[-2:]
        x = x.to(torch.float32, memory_format=torch.contiguous_format)  # a channels-last batch, too
        if nw != w:
            x = F.interpolate(x, size=(h, nw), mode=self.interpolation, antialias=True, align_corners=False)
            x = x.round_().clamp_(0, 255)
        if nh != h:
            x = F.interpolate(x, size=(nh, nw), mode=self.interpolation, antialias=True, align_corners=False)
            x = x.round_().clamp_(0, 255)
        return x

    def resample_uint8(self, x: Tensor, nh: int, nw: int) -> Tensor:
        """uint8 ``[B, C, h, w]`` -> uint8 ``[B, C, nh, nw]`` on the CPU, where PyTorch resamples uint8
        itself in PIL's fixed-point way (fastest channels-last): 4-8x faster than
        :meth:`resample_float` on the CPU, as close to PIL."""
        import torch.nn.functional as F

        return F.interpolate(x.contiguous(memory_format=torch.channels_last), size=(nh, nw), mode=self.interpolation,
                             antialias=True, align_corners=False)


@dataclass(frozen=True)
class DeviceStage:
    """``uint8 [B, C, H, W]`` -> ``float32 [B, 3, H, W]``: ``x / 255`` (torchvision ``to_tensor``), one
    channel repeated 3 times when ``grey``, then ``(x - mean) / std`` per channel (``normalize``).
    The same float operations in the same order as the per-image transform, so the result is identical.

    With ``resize`` (a :class:`DeviceResize`), the input is the images at their decoded size (a
    batch, or a list / :class:`PackedImages` when the sizes differ: each size is finished as one
    batch) and they are resized and cropped first. With ``pad_to`` (SAM's ``longest_pad``), each
    normalised image is zero-padded at the bottom and right to ``pad_to x pad_to``, as the per-image
    transform does.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    grey: bool = False
    resize: DeviceResize | None = None
    pad_to: int | None = None

    def __call__(self, x: Tensor | Sequence[Tensor] | PackedImages) -> Tensor:
        if isinstance(x, PackedImages):
            x = x.unpack()
        batches = self.resize is not None or self.pad_to is not None  # can make one batch of different sizes
        if isinstance(x, Tensor):
            ok, got = x.dtype == torch.uint8 and x.ndim == 4, f"{x.dtype} {tuple(x.shape)}"
        else:
            ok = batches and len(x) > 0 and all(t.dtype == torch.uint8 and t.ndim == 3 for t in x)
            got = f"a list of {len(x)} images" + ("" if batches else " (and neither resize nor pad_to)")
        if not ok:
            raise TypeError(f"DeviceStage expects a uint8 [B, C, H, W] batch (or, with resize or pad_to, a list of "
                            f"uint8 [C, H, W] images), got {got}")
        if not isinstance(x, Tensor):  # images of different sizes: each size as one batch
            groups: dict[tuple[int, ...], list[int]] = {}
            for i, im in enumerate(x):
                groups.setdefault(tuple(im.shape), []).append(i)
            done: list[Tensor] = [x[0]] * len(x)
            for idx in groups.values():
                for i, row in zip(idx, self(stack_images([x[i] for i in idx]))):
                    done[i] = row
            # one stack back in the input order (indexing the output with a list of positions would copy
            # that list to the GPU and make the host wait for the batch in flight)
            return torch.stack(done)
        if self.resize is not None:
            x = self.resize(x)  # whole numbers 0..255 in float32: the division below is the same
        # divide by a tensor on x's device: CUDA turns division by a Python number into a multiplication by
        # its reciprocal (1 ulp off for half of the 256 values); this is the exact division to_tensor does
        x = x.to(torch.float32, memory_format=torch.contiguous_format).div(torch.full((), 255.0, device=x.device))
        if self.grey:
            x = x.expand(-1, 3, -1, -1)
        x = x.sub(_channel_constants(self.mean, str(x.device))).div(_channel_constants(self.std, str(x.device)))
        if self.pad_to is not None:
            x = torch.nn.functional.pad(x, (0, self.pad_to - x.shape[-1], 0, self.pad_to - x.shape[-2]))
        return x


@functools.lru_cache(maxsize=64)
def _channel_constants(values: tuple[float, ...], device: str) -> Tensor:
    """``values`` as a float32 ``[1, C, 1, 1]`` tensor on ``device``, made once per device: copying
    it from the host for every batch would make the host wait for the batch in flight on CUDA."""
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1).to(device)


def _conversion_mode(step: Any) -> str | None:
    """The mode that ``step`` converts to, if it is a mode conversion (open_clip's ``MaybeConvertMode``
    / ``_convert_to_rgb`` or our :class:`ConvertMode`), else None."""
    if isinstance(step, ConvertMode) or type(step).__name__ == "MaybeConvertMode":
        return step.mode
    return "RGB" if getattr(step, "__name__", None) == "_convert_to_rgb" else None


def _device_resize_of(pil: list[Any]) -> DeviceResize | None:
    """The :class:`DeviceResize` doing a torchvision ``[Resize(int), CenterCrop(square)]`` prefix of
    PIL steps (bilinear or bicubic, antialiased), or None."""
    from torchvision import transforms as T

    if len(pil) < 2 or not isinstance(pil[0], T.Resize) or not isinstance(pil[1], T.CenterCrop):
        return None
    resize, crop = pil[0], pil[1]
    size = resize.size if isinstance(resize.size, int) else (resize.size[0] if len(resize.size) == 1 else None)
    crop_hw = tuple(crop.size) if not isinstance(crop.size, int) else (crop.size, crop.size)
    interp = getattr(resize.interpolation, "value", resize.interpolation)
    if size is None or resize.max_size is not None or resize.antialias is False or crop_hw[0] != crop_hw[1] \
            or interp not in ("bilinear", "bicubic") or size < crop_hw[0]:
        return None
    return DeviceResize(int(crop_hw[0]), int(size), "shortest_crop", interp)


def split_transform(transform: Any, *, resize_on_device: bool = False) -> tuple[HostStage, DeviceStage] | None:
    """Split an image transform into a uint8 :class:`HostStage` and a batched :class:`DeviceStage`.

    Handles :class:`Preprocess` and a torchvision ``Compose`` of PIL steps ending in ``ToTensor`` (or
    open_clip's ``MaybeToTensor``) + ``Normalize``, like open_clip's evaluation transform. Returns None
    for any other transform: it then runs whole in the workers. For ``longest_pad`` (SAM) the images
    differ in size after the resize, and the device stage pads them after normalising.

    ``resize_on_device``: move the resize and crop too (a :class:`DeviceResize`), so that workers
    only decode and convert the mode; for ``squash`` / ``shortest_crop`` / ``longest_pad`` with
    bilinear or bicubic resampling, and for a ``Compose`` made of ``Resize(int)``, ``CenterCrop`` and mode conversion.
    Otherwise the resize stays in the workers.
    """
    from torchvision import transforms as T

    if isinstance(transform, Preprocess):
        norm = (tuple(transform.mean), tuple(transform.std))
        pad_to = transform.size if transform.resize_mode == "longest_pad" else None  # SAM pads after normalising
        if resize_on_device and transform.interpolation in ("bilinear", "bicubic"):
            mode = "longest" if pad_to else transform.resize_mode
            resize = DeviceResize(transform.size, transform.resize_to if mode == "shortest_crop" else None,
                                  mode, transform.interpolation)  # type: ignore[arg-type]
            return (HostStage(ConvertMode("L" if transform.grey else "RGB"), resize, to_rgb=not transform.grey),
                    DeviceStage(*norm, grey=transform.grey, resize=resize, pad_to=pad_to))
        return HostStage(transform.resize), DeviceStage(*norm, grey=transform.grey, pad_to=pad_to)
    if isinstance(transform, T.Compose) and len(transform.transforms) >= 2:
        *pil, to_tensor, norm = transform.transforms
        if type(to_tensor).__name__ in ("ToTensor", "MaybeToTensor") and isinstance(norm, T.Normalize) \
                and not norm.inplace and all(not isinstance(t, (T.ToTensor, T.Normalize)) for t in pil):
            mean, std = tuple(float(v) for v in norm.mean), tuple(float(v) for v in norm.std)
            resize = _device_resize_of(pil) if resize_on_device else None
            modes = [_conversion_mode(t) for t in pil[2:]]
            if resize is not None and None not in modes:
                return (HostStage(T.Compose(pil[2:]), resize, resize_first=True, to_rgb=set(modes) == {"RGB"}),
                        DeviceStage(mean, std, resize=resize))
            return HostStage(T.Compose(pil)), DeviceStage(mean, std)
    return None
