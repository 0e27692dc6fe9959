"""Image bytes for the samples table (ingest side): PNG encoding of arrays, content hashes, default sample ids.

Decoding lives in :mod:`featurelt.images.decode`; ``decode_bytes`` and ``ImageDecodeError`` are
re-exported here for ``data/ingest.py``, which validates every image it writes.
"""
from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image

from featurelt.images.decode import ImageDecodeError, decode_bytes  # noqa: F401  (re-exported for ingest)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sample_id_for(data: bytes) -> str:
    """Default stable sample id: the first 32 hex digits of sha256(image bytes)."""
    return sha256_hex(data)[:32]


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a HxW (grey) or HxWx3 uint8 array (deterministic, so content hashes are stable)."""
    if array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image array, got dtype={array.dtype}")
    img = Image.fromarray(array)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()
