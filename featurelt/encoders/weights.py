"""Encoder checkpoints: the missing-weights error, sha256 of files and folders, path checks, seeded init."""
from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal

import torch


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


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU RNG seeded to ``seed``; the global RNG state is restored after.

    Model initialisation happens on CPU, so the same seed gives the same weights on every device."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
