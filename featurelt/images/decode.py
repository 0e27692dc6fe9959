"""Decoding what the samples table holds: stored bytes or a uri's file -> PIL, or a tensor for plain PNG / JPEG.

A sample's pixels are either its ``image`` bytes (default ingest) or the file its ``uri`` points
to (``--reference`` ingest). Decoding errors raise :class:`ImageDecodeError` naming the sample.
:func:`decode_plain` is the torchvision route (no PIL) with PIL's decompression-bomb limit;
:class:`DecodedImage` is what :class:`featurelt.images.loader.StoreImageLoader` hands to its
``make_image``: the bytes, decoded on demand by either route.
"""
from __future__ import annotations

import io
from typing import Any

from PIL import Image, UnidentifiedImageError


class ImageDecodeError(ValueError):
    """An image that cannot be read or decoded; the message names the sample / file."""


def decode_bytes(data: bytes, *, name: str = "<bytes>") -> Image.Image:
    """Decode and fully load an encoded image (truncated files fail here, not later); RGB or L kept."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"{name}: cannot decode image ({exc})") from None
    return img


def read_uri(uri: str) -> bytes:
    """Bytes of a local path or fsspec/pyarrow-readable URI."""
    if "://" in uri and not uri.startswith("file://"):
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(uri)
        with fs.open_input_stream(path) as fh:
            return fh.read()
    with open(uri.removeprefix("file://"), "rb") as fh:
        return fh.read()


def sample_bytes(row: dict[str, Any]) -> tuple[bytes, str]:
    """The encoded image of a samples-table row (``image`` bytes, else the file at ``uri``) and the
    name that errors give it."""
    name = f"sample {row.get('sample_id')}"
    data = row.get("image")
    if data is None:
        uri = row.get("uri")
        if not uri:
            raise ImageDecodeError(f"{name}: has neither image bytes nor uri")
        try:
            data = read_uri(uri)
        except OSError as exc:
            raise ImageDecodeError(f"{name}: cannot read {uri} ({exc})") from None
        name = f"{name} ({uri})"
    return data, name


def decode_rgb(data: bytes, *, name: str = "<bytes>") -> Image.Image:
    """:func:`decode_bytes`, converted to RGB (what every encoder transform starts from)."""
    return decode_bytes(data, name=name).convert("RGB")


def load_sample_image(row: dict[str, Any]) -> Image.Image:
    """The RGB PIL image of a samples-table row (``image`` bytes, else ``uri``)."""
    data, name = sample_bytes(row)
    return decode_rgb(data, name=name)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_FRAMES = (0xC0, 0xC1, 0xC2)  # baseline, extended and progressive Huffman frames (what libjpeg and PIL both read)


def plain_image_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from the header of an 8-bit grey or RGB PNG or JPEG; None for any other
    image (palette, alpha, 16-bit, CMYK, arithmetic-coded, other formats) or a header that does not parse.

    These are the images whose ``convert("RGB")`` is a plain copy (grey: the channel three times),
    which :func:`decode_rgb_tensor` reproduces without PIL.
    """
    if data[:8] == _PNG_SIGNATURE:
        if len(data) < 29 or data[12:16] != b"IHDR":
            return None
        bit_depth, colour_type = data[24], data[25]  # colour type 0: grey, 2: RGB
        return (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) \
            if bit_depth == 8 and colour_type in (0, 2) else None
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 < len(data):  # walk the marker segments up to the frame header
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a frame header (SOFn)
            precision, components = data[i + 4], data[i + 9]
            if marker not in _JPEG_FRAMES or precision != 8 or components not in (1, 3):
                return None
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        if marker == 0xDA or marker == 0xD9:  # scan or end before any frame header
            return None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def decode_rgb_tensor(data: bytes) -> Any:
    """``uint8 [3, H, W]`` torch tensor (a view of interleaved ``[H, W, 3]`` pixels) of an image that
    :func:`plain_image_size` accepts, decoded by torchvision (libpng / libjpeg-turbo) without PIL:
    the same pixels as ``decode_bytes(data).convert("RGB")`` (tested) in about half the time of PIL's
    open, decode and copy. Raises what torchvision raises on a damaged file.

    Calls torchvision's ``image::decode_image`` operator, which its public ``decode_image`` wraps:
    since torchvision 0.29 that wrapper issues a DeprecationWarning (in favour of TorchCodec, same
    libraries) on every call, which with its usage logging cost 7 of its 50 us for a 64 px PNG on
    cpu2. featurelt pins torchvision; the tests compare this function with PIL, so a pin that moves
    to a torchvision without the operator fails them."""
    import torch
    from torchvision.io import ImageReadMode  # importing torchvision.io loads the operators

    return torch.ops.image.decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                        ImageReadMode.RGB.value, False)  # (data, mode, apply_exif_orientation)


def decode_plain(data: bytes) -> "tuple[Any, tuple[int, int]] | None":
    """``(uint8 [3, H, W] tensor, (width, height))`` of an 8-bit grey or RGB PNG / JPEG decoded by
    torchvision (:func:`decode_rgb_tensor`, PIL's pixels without PIL); None for any other image, one
    over PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``), or a damaged file (PIL then
    decodes it or names what is wrong)."""
    size = plain_image_size(data)
    if size is None or (Image.MAX_IMAGE_PIXELS and size[0] * size[1] > Image.MAX_IMAGE_PIXELS):
        return None
    try:
        return decode_rgb_tensor(data), size
    except RuntimeError:
        return None


class DecodedImage:
    """One sample's encoded image as a loader worker read it (stored bytes, or the file of its
    ``uri``), decoded on demand: :meth:`pil` (RGB, PIL's checks; raises :class:`ImageDecodeError`
    naming the sample) or :meth:`plain` (torchvision, None where PIL is needed). A sample that
    appears several times in a loader batch (extract's augmented views) is read and decoded once."""

    __slots__ = ("data", "name", "_pil")

    def __init__(self, data: bytes, name: str) -> None:
        self.data = data  # the encoded bytes
        self.name = name  # "sample <id>" (and the uri): what errors call it
        self._pil: Image.Image | None = None

    @classmethod
    def of_row(cls, row: dict[str, Any]) -> "DecodedImage":
        """The image of a samples-table row (``image`` bytes, else the file at ``uri``); raises
        :class:`ImageDecodeError` when neither can be read."""
        return cls(*sample_bytes(row))

    def pil(self) -> Image.Image:
        """The RGB PIL image (decoded once; callers must not modify it in place)."""
        if self._pil is None:
            self._pil = decode_rgb(self.data, name=self.name)
        return self._pil

    def plain(self) -> "tuple[Any, tuple[int, int]] | None":
        """:func:`decode_plain` of the bytes."""
        return decode_plain(self.data)
