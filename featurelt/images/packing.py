"""Batches of images: one size stacked channels-last, mixed sizes in one buffer (PackedImages), collate picking one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor


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


def collate(images: Sequence[Tensor]) -> "Tensor | PackedImages":
    """One ``[B, C, H, W]`` tensor (channels-last, :func:`stack_images`) when the images have one
    size, else one buffer of them all (:class:`PackedImages`: images at their decoded size, resized
    on the device)."""
    shape = images[0].shape
    return stack_images(images) if all(t.shape == shape for t in images) else PackedImages.pack(images)
