"""Image bytes <-> PIL: the one place that decodes what the samples table holds.

A sample's pixels are either its ``image`` bytes (default ingest) or the file its ``uri`` points
to (``--reference`` ingest). Decoding errors raise :class:`ImageDecodeError` naming the sample.
"""
from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError


class ImageDecodeError(ValueError):
    """An image that cannot be read or decoded; the message names the sample / file."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sample_id_for(data: bytes) -> str:
    """Default stable sample id: the first 32 hex digits of sha256(image bytes)."""
    return sha256_hex(data)[:32]


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


def load_sample_image(row: dict[str, Any]) -> Image.Image:
    """The RGB PIL image of a samples-table row (``image`` bytes, else ``uri``)."""
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
    return decode_bytes(data, name=name).convert("RGB")


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a HxW (grey) or HxWx3 uint8 array (deterministic, so content hashes are stable)."""
    if array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image array, got dtype={array.dtype}")
    img = Image.fromarray(array)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()
