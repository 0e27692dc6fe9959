"""Base classes of the frozen encoders: image ``Encoder``, ``TextEncoder``, preprocessing, provenance.

Every encoder is a thin frozen wrapper around a model from its own library (open_clip,
segment-anything, transformers, sentence-transformers). It owns

* ``transform`` -- a picklable :class:`Preprocess` (or library transform) turning a PIL image into a
  ``[3, H, W]`` float tensor; ``preprocess(img)`` calls it. Pass ``encoder.transform`` (not the bound
  method, which would pickle the model too) to DataLoader workers;
* ``encode(x)`` -- ``[B, 3, H, W]`` -> ``{product: [B, D] float32}`` on the encoder's device;
* ``provenance()`` -- everything that determines the numbers: architecture, checkpoint sha256,
  preprocessing, trained or random init, seed, fitted state of stateful products;
* ``fingerprint(product)`` -- sha256 over the provenance (without the checkpoint *path*, so moving a
  file does not invalidate cached rows) and the product.

Stateful products (SAM ``pca_map``, METHODS.md section 2) must be fitted on train-split maps first:
``requires_fit(product)`` says so, ``fit(maps_iter)`` fits, ``fit_state(product)`` returns the
fitted state (JSON-able, stored with the embedding set's provenance) and ``load_fit_state(product,
state)`` restores it so a later run reuses the same basis.

A named model without weights raises :class:`MissingWeightsError`; random weights are only built
when asked for with ``untrained=True`` (benchmarks, tests) and are recorded as ``trained: false``.
"""
from __future__ import annotations

import abc
import functools
import hashlib
import json
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Literal, Sequence

import torch
from torch import Tensor

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)  # METHODS.md sections 5 and 6

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class MissingWeightsError(FileNotFoundError):
    """A named (pretrained) model was requested but its weights were not supplied or not found."""

    def __init__(self, name: str, *, checkpoint: str | os.PathLike | None, how: str) -> None:
        where = "no checkpoint was given" if checkpoint is None else f"checkpoint not found: {checkpoint}"
        super().__init__(
            f"encoder '{name}' needs pretrained weights but {where}. {how} "
            f"Random weights are never used silently: pass --untrained (python: untrained=True; for "
            f"benchmarks only) to get them explicitly, or use a 'tiny' variant for tests."
        )
        self.name = name
        self.checkpoint = checkpoint
        self._how = how

    def __reduce__(self):  # picklable (DataLoader workers, Ray) despite the keyword-only arguments
        return (_missing_weights, (self.name, self.checkpoint, self._how))


def _missing_weights(name: str, checkpoint: Any, how: str) -> MissingWeightsError:
    return MissingWeightsError(name, checkpoint=checkpoint, how=how)


# ---------------------------------------------------------------------------------------------
# checkpoint hashing
_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file, streamed; cached per (path, size, mtime) within the process."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(chunk), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """sha256 of a checkpoint: of the file, or for a directory (Hugging Face layout) of the sorted
    ``relative/path:sha256`` lines of every file in it (hidden files and ``.cache`` skipped)."""
    p = Path(path)
    if p.is_file():
        return file_sha256(p)
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    lines = []
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        rel = f.relative_to(p).as_posix()
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        lines.append(f"{rel}:{file_sha256(f)}")
    if not lines:
        raise FileNotFoundError(f"checkpoint directory is empty: {path}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def resolve_checkpoint(name: str, checkpoint: str | os.PathLike | None, *, kind: Literal["file", "dir"],
                       how: str) -> Path:
    """Return ``checkpoint`` as an absolute existing path of the right kind, or raise
    :class:`MissingWeightsError` (missing) / ``ValueError`` (a file where a directory is needed ...)."""
    if checkpoint is None or str(checkpoint) == "":
        raise MissingWeightsError(name, checkpoint=None, how=how)
    p = Path(checkpoint).expanduser().resolve()
    if not p.exists():
        raise MissingWeightsError(name, checkpoint=checkpoint, how=how)
    if kind == "file" and not p.is_file():
        raise ValueError(f"encoder '{name}': checkpoint must be a file, got a directory: {checkpoint}")
    if kind == "dir" and not p.is_dir():
        raise ValueError(f"encoder '{name}': checkpoint must be a directory (Hugging Face save_pretrained "
                         f"layout with config.json), got a file: {checkpoint}")
    return p


# ---------------------------------------------------------------------------------------------
# seeding
@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU RNG seeded to ``seed``; the global RNG state is restored after.

    Model initialisation happens on CPU, so the same seed gives the same weights on every device."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def sanitize(text: str) -> str:
    """``clip:ViT-B-32`` -> ``clip_vit_b_32``: lower case, runs of other characters -> ``_``."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# preprocessing
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
        torchvision (:func:`~featurelt.data.images.decode_rgb_tensor`, the same pixels as PIL, in
        about half its time), for an 8-bit grey or RGB PNG / JPEG when this stage only converts to
        RGB; None for any other image or stage (and for a file torchvision cannot decode, or one over
        PIL's decompression-bomb limit), which then goes through PIL and :meth:`__call__`.

        An image of more than ``resize.max_pixels`` pixels is resized here with PyTorch's uint8
        kernels (:meth:`DeviceResize.resample_uint8`) where :meth:`__call__` has PIL resize it:
        within 2 grey levels of PIL, like the device's resize, and 2.5-4.7x faster for 640 px to 1,920
        px photos (decode and resize, one core; bench/RESULTS.md)."""
        from PIL import Image

        from featurelt.data.images import decode_rgb_tensor, plain_image_size

        if self.resize is None or not self.to_rgb:
            return None
        size = plain_image_size(data)
        if size is None or (Image.MAX_IMAGE_PIXELS and size[0] * size[1] > Image.MAX_IMAGE_PIXELS):
            return None
        try:
            x = decode_rgb_tensor(data)
        except RuntimeError:  # a damaged file: PIL decodes it or names what is wrong (the sample's reject reason)
            return None
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


def stack_images(images: Sequence[Tensor]) -> Tensor:
    """Same-size ``[C, H, W]`` images -> one ``[B, C, H, W]`` batch, in the images' own layout.

    Decoders and :class:`HostStage` hand over ``[C, H, W]`` views of interleaved ``[H, W, C]``
    pixels: stacking them channels-last is one plain copy per image, where a contiguous ``[B, C, H,
    W]`` batch would gather every channel plane (5x slower for 64 px RGB on cpu2); channels-last is
    also the layout :meth:`DeviceResize.resample_uint8` wants. Values are the same either way, and
    :class:`DeviceStage` returns a contiguous float batch. Contiguous images (a whole transform's
    float output) make a contiguous batch, as the encoder expects it."""
    if images[0].is_contiguous() or not images[0].permute(1, 2, 0).is_contiguous():
        return torch.stack(list(images))
    return torch.stack([t.permute(1, 2, 0) for t in images]).permute(0, 3, 1, 2)


@dataclass(frozen=True)
class PackedImages:
    """A batch of images of different sizes in one flat ``uint8`` buffer: what a worker hands over
    when a batch's images differ in size (photo data sets) and the resize runs on the device.

    A list of tensors crosses from a DataLoader worker to the main process as one shared-memory
    segment, and one file descriptor, per image: 280-420 us of the main process's time per image on
    cpu2, against 7-8 us for a stacked batch (bench/RESULTS.md). Packed, a batch is one segment, one
    pinned copy and one host-to-device copy. :meth:`unpack` gives the ``[C, H, W]`` views (of
    interleaved pixels) on whatever device the buffer is; :class:`DeviceStage` takes a packed batch
    as it takes a list.
    """

    data: Tensor                              # uint8 [sum of C * H * W]: each image's [H, W, C] pixels, in order
    shapes: tuple[tuple[int, int, int], ...]  # (C, H, W) of each image

    @classmethod
    def pack(cls, images: Sequence[Tensor]) -> "PackedImages":
        """Copy ``[C, H, W]`` uint8 images (interleaved or not) into one buffer."""
        return cls(torch.cat([t.permute(1, 2, 0).reshape(-1) for t in images]),
                   tuple((int(c), int(h), int(w)) for c, h, w in (t.shape for t in images)))

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: slice) -> "PackedImages":
        """A slice of the batch (the out-of-memory retry encodes halves), sharing the buffer."""
        start, stop, step = index.indices(len(self.shapes))
        if step != 1:
            raise ValueError("PackedImages slices must be contiguous")
        sizes = [c * h * w for c, h, w in self.shapes]
        first = sum(sizes[:start])
        return PackedImages(self.data[first:first + sum(sizes[start:stop])], self.shapes[start:stop])

    def to(self, device: str | torch.device, *, pin: bool = False) -> "PackedImages":
        """The batch on ``device`` (``pin``: through pinned host memory, so that the copy is asynchronous)."""
        data = self.data.pin_memory() if pin else self.data
        return PackedImages(data.to(device, non_blocking=True), self.shapes)

    def unpack(self) -> list[Tensor]:
        out, offset = [], 0
        for c, h, w in self.shapes:
            out.append(self.data[offset:offset + c * h * w].view(h, w, c).permute(2, 0, 1))
            offset += c * h * w
        return out


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


# ---------------------------------------------------------------------------------------------
class _Provenanced(abc.ABC):
    """Shared provenance / fingerprint logic of image and text encoders."""

    name: str
    products: dict[str, int]
    # provenance keys that do not change the numbers and stay out of the fingerprint
    _not_fingerprinted: ClassVar[tuple[str, ...]] = ("checkpoint", "library_versions")

    @abc.abstractmethod
    def provenance(self) -> dict[str, Any]:
        """The provenance dict recorded with every embedding set."""

    def fingerprint(self, product: str) -> str:
        """sha256 hex of the provenance (checkpoint path and library versions excluded; checkpoint
        sha256 included) and ``product``. Changes when the weights, the preprocessing, the seed of
        an untrained model or a fitted state change."""
        self._check_product(product)
        prov = {k: v for k, v in self.provenance().items() if k not in self._not_fingerprinted}
        # only this product's own parts: fitting pca_map must not change latent's fingerprint
        prov["products"] = {product: self.products[product]}
        for key in ("fit", "product_details"):
            if key in prov:
                prov[key] = prov[key].get(product)
        prov["unit_norm"] = product in prov.get("unit_norm", [])
        return _sha256_json({"provenance": prov, "product": product, "dim": self.products[product]})

    def _check_product(self, product: str) -> None:
        if product not in self.products:
            raise KeyError(f"encoder '{self.name}' has no product '{product}'; products: "
                           f"{', '.join(self.products)}")


class Encoder(_Provenanced):
    """A frozen image encoder (see the module docstring for the contract)."""

    family: ClassVar[str] = ""          # "clip", "sam", "dinov2", "pixels"
    unit_norm: ClassVar[frozenset[str]] = frozenset()  # products returned with unit L2 norm

    def __init__(self, name: str, *, products: dict[str, int], transform: Any, image_size: int,
                 checkpoint: str | os.PathLike | None, trained: bool, seed: int,
                 device: str | torch.device = "cpu") -> None:
        self.name = name
        self.products = dict(products)
        self.transform = transform
        self.image_size = int(image_size)
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.checkpoint_sha256 = None if checkpoint is None else checkpoint_sha256(checkpoint)
        self.trained = bool(trained)
        self.seed = int(seed)
        self.device = torch.device(device)

    # -- model ------------------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module | None:
        """The wrapped frozen module (``None`` for model-free encoders such as ``pixels``)."""
        return getattr(self, "_model", None)

    def _set_model(self, model: torch.nn.Module | None) -> None:
        if model is not None:
            model.eval()
            model.requires_grad_(False)
            model.to(self.device)
        self._model = model

    def to(self, device: str | torch.device) -> "Encoder":
        """Move the model to ``device`` (``cpu``, ``cuda``, ``cuda:1``, ``mps`` ...); returns self."""
        self.device = torch.device(device)
        if self.model is not None:
            self.model.to(self.device)
        return self

    # -- preprocessing --------------------------------------------------------------------
    def preprocess(self, img: Any) -> Tensor:
        """PIL image -> ``[3, H, W]`` float32 tensor (``self.transform``, picklable)."""
        return self.transform(img)

    def preprocessing(self) -> dict[str, Any]:
        """The provenance ``preprocessing`` entry."""
        t = self.transform
        if hasattr(t, "describe"):
            return t.describe()
        raise TypeError(f"{type(self).__name__}: its transform must have describe() for the provenance")

    # -- encoding ---------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"encoder '{self.name}' expects a [B, 3, H, W] tensor, got {shape}")
        if x.shape[2] != self.image_size or x.shape[3] != self.image_size:
            raise ValueError(f"encoder '{self.name}' expects images of {self.image_size}x{self.image_size} "
                             f"(use encoder.preprocess), got {tuple(x.shape)}")
        return x.to(self.device, non_blocking=True)

    def _select(self, products: Sequence[str] | None) -> list[str]:
        wanted = list(self.products) if products is None else list(products)
        for p in wanted:
            self._check_product(p)
        for p in wanted:
            if self.requires_fit(p):
                raise RuntimeError(f"product '{p}' of encoder '{self.name}' must be fitted first: call "
                                   f"encoder.fit(...) on train-split data or load_fit_state(...), or pass "
                                   f"products=[...] without it")
        return wanted

    @abc.abstractmethod
    def encode(self, x: Tensor, *, products: Sequence[str] | None = None) -> dict[str, Tensor]:
        """x: ``[B, 3, H, W]`` preprocessed images. Returns ``{product: [B, D] float32}`` on the
        encoder's device for ``products`` (default: all). Runs without gradients."""

    # -- stateful products --------------------------------------------------------------------
    def requires_fit(self, product: str) -> bool:
        """True when ``product`` is stateful and not fitted yet (default: no stateful products)."""
        self._check_product(product)
        return False

    def fit(self, maps_iter: Iterable[Tensor]) -> None:
        """Fit the stateful products on train-split data (see the subclass)."""
        raise RuntimeError(f"encoder '{self.name}' has no product that needs fitting")

    def fit_state(self, product: str) -> dict[str, Any] | None:
        """JSON-able fitted state of ``product`` (``None`` for stateless or unfitted products)."""
        self._check_product(product)
        return None

    def load_fit_state(self, product: str, state: dict[str, Any]) -> None:
        """Restore a state returned by :meth:`fit_state` (e.g. read back from an embedding set's provenance)."""
        raise RuntimeError(f"product '{product}' of encoder '{self.name}' has no fitted state")

    # -- provenance ---------------------------------------------------------------------------
    @abc.abstractmethod
    def architecture(self) -> dict[str, Any]:
        """Model architecture description (subclasses)."""

    def product_details(self, product: str) -> dict[str, Any] | None:
        """How ``product`` is computed from the model output when that has options (e.g. SAM's map size)."""
        self._check_product(product)
        return None

    def library_versions(self) -> dict[str, str]:
        import torch as _torch

        return {"torch": _torch.__version__}

    def provenance(self) -> dict[str, Any]:
        """Everything that determines this encoder's numbers. Keys: encoder, family, architecture,
        checkpoint (path or None), checkpoint_sha256 (None for untrained), trained, seed (None when
        trained: the weights come from the checkpoint), preprocessing, products (name -> dim),
        unit_norm (products returned unit-norm), product_details (product -> options), fit (product ->
        fitted state), library_versions. ``fingerprint(p)`` keeps only product p's entries."""
        fit = {p: s for p in self.products if (s := self.fit_state(p)) is not None}
        details = {p: d for p in self.products if (d := self.product_details(p)) is not None}
        return {
            "encoder": self.name,
            "family": self.family,
            "architecture": self.architecture(),
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "trained": self.trained,
            "seed": None if self.trained else self.seed,
            "preprocessing": self.preprocessing(),
            "image_size": self.image_size,
            "products": dict(self.products),
            "unit_norm": sorted(p for p in self.products if p in self.unit_norm),
            "product_details": details,
            "fit": fit,
            "library_versions": self.library_versions(),
        }

    def fingerprint(self, product: str) -> str:
        if self.requires_fit(product):
            raise RuntimeError(f"product '{product}' of encoder '{self.name}' is not fitted yet; its "
                               f"fingerprint depends on the fitted state (call fit or load_fit_state first)")
        return super().fingerprint(product)

    def default_set_name(self, product: str) -> str:
        """Embedding set name ``<family>_<model>_<product>`` sanitised; the product is left out for
        single-product encoders (``clip_tiny``, ``pixels``, ``sam_tiny_latent``, ``dinov2_tiny_cls``)."""
        self._check_product(product)
        base = sanitize(self.name)
        return base if len(self.products) == 1 else f"{base}_{sanitize(product)}"

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, products={self.products}, "
                f"image_size={self.image_size}, trained={self.trained}, device={str(self.device)!r})")


def load_templates(templates: str | os.PathLike | Sequence[str] | None) -> tuple[str, ...]:
    """Prompt templates: ``None`` -> ("a photo of a {}.",); a sequence of strings; or a file path with
    one template per line (blank lines and lines starting with ``#`` skipped). Each must contain ``{}``."""
    if templates is None:
        out: tuple[str, ...] = DEFAULT_TEMPLATES
    elif isinstance(templates, (str, os.PathLike)) and "{}" not in str(templates):
        p = Path(templates)
        if not p.is_file():
            raise FileNotFoundError(f"templates file not found: {templates}")
        out = tuple(ln.strip() for ln in p.read_text().splitlines()
                    if ln.strip() and not ln.strip().startswith("#"))
        if not out:
            raise ValueError(f"templates file has no templates: {templates}")
    elif isinstance(templates, str):
        out = (templates,)
    else:
        out = tuple(str(t) for t in templates)
    if not out:
        raise ValueError("templates must not be empty")
    bad = [t for t in out if "{}" not in t]
    if bad:
        raise ValueError(f"every template must contain '{{}}' for the class name; got {bad}")
    return out


class TextEncoder(_Provenanced):
    """A frozen text encoder: ``encode_text(texts) -> [N, D]`` unit-norm float32 (on CPU) and
    ``encode_classes(names)`` = the prompt-template ensemble of METHODS.md sections 5 and 6: for each
    class the mean of the unit-norm embeddings of every template filled with the name, renormalised."""

    family: ClassVar[str] = ""

    def __init__(self, name: str, *, dim: int, templates: str | os.PathLike | Sequence[str] | None,
                 checkpoint: str | os.PathLike | None, trained: bool, seed: int | None,
                 device: str | torch.device = "cpu") -> None:
        self.name = name
        self.products = {"embedding": int(dim)}
        self.templates = load_templates(templates)
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.checkpoint_sha256 = None if checkpoint is None else checkpoint_sha256(checkpoint)
        self.trained = bool(trained)
        self.seed = seed
        self.device = torch.device(device)

    @property
    def dim(self) -> int:
        return self.products["embedding"]

    def to(self, device: str | torch.device) -> "TextEncoder":
        self.device = torch.device(device)
        model = getattr(self, "_model", None)
        if model is not None:
            model.to(self.device)
        return self

    @abc.abstractmethod
    def _encode(self, texts: list[str]) -> Tensor:
        """Raw (not necessarily normalised) embeddings [N, D]."""

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str], *, batch_size: int = 256) -> Tensor:
        """texts: N strings. Returns ``[N, D]`` float32 unit-norm on CPU."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("encode_text expects a list of strings")
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.dim)
        out = [self._encode(texts[i:i + batch_size]).float().cpu() for i in range(0, len(texts), batch_size)]
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    def encode_classes(self, class_names: Sequence[str]) -> Tensor:
        """class_names: K names. Returns ``[K, D]`` unit-norm class text embeddings (template ensemble)."""
        names = list(class_names)
        prompts = [t.format(n) for n in names for t in self.templates]
        e = self.encode_text(prompts).view(len(names), len(self.templates), self.dim)
        return torch.nn.functional.normalize(e.mean(1), dim=-1)

    @abc.abstractmethod
    def architecture(self) -> dict[str, Any]:
        """Text model architecture description (subclasses)."""

    def provenance(self) -> dict[str, Any]:
        """encoder, family, architecture, checkpoint, checkpoint_sha256, trained, seed, templates, products."""
        return {
            "encoder": self.name,
            "family": self.family,
            "kind": "text",
            "architecture": self.architecture(),
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "trained": self.trained,
            "seed": None if self.trained else self.seed,
            "templates": list(self.templates),
            "products": dict(self.products),
            "unit_norm": ["embedding"],
        }

    def default_set_name(self, product: str = "embedding") -> str:
        """``text_embeddings.set_name``: ``minilm`` for text:minilm, ``clip_tiny`` for clip:tiny."""
        self._check_product(product)
        n = self.name[len("text:"):] if self.name.startswith("text:") else self.name
        return sanitize(n)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, templates={len(self.templates)})"
