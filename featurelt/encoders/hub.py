"""Weights from the Hugging Face hub / open_clip's URL cache, offline decided per call (never per process).

Every function here first looks in the local cache (``huggingface_hub``'s cache, ``HF_HOME`` /
``HF_HUB_CACHE``; open_clip's ``~/.cache/clip`` for URL tags) and, when the files are there, loads
them with ``local_files_only=True``: no request is made. Only when they are missing does it try the
network; when that fails too the error is one line: ``'<id>' is not cached (<where>) and could not be
downloaded (<why>): run once with network, or pass --checkpoint ...``.

Nothing here sets ``HF_HUB_OFFLINE`` (or any environment variable): other code in the same process
(another encoder, a user's notebook) keeps its own choice.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from featurelt.encoders.weights import MissingWeightsError


class NotCachedError(MissingWeightsError):
    """Hub files are neither in the local cache nor downloadable now."""

    def __init__(self, name: str, repo: str, why: str, how: str) -> None:
        FileNotFoundError.__init__(
            self, f"encoder '{name}': '{repo}' is not cached ({_cache_dir()}) and could not be downloaded "
                  f"({why}): run once with network, or pass --checkpoint with local weights. {how}".rstrip())
        self.name, self.checkpoint, self._how = name, None, how
        self.repo, self.why = repo, why

    def __reduce__(self):
        return (NotCachedError, (self.name, self.repo, self.why, self._how))


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def hub_reachable(url: str | None = None, *, timeout: float = 3.0) -> str | None:
    """None when the hub's host (or ``url``'s) accepts a TCP connection within ``timeout`` s, else why
    not. Checked once before downloading so that an offline machine fails at once, not after the
    download client's retries."""
    import socket
    from urllib.parse import urlparse

    if url is None:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return "HF_HUB_OFFLINE is set"
        url = constants.ENDPOINT
    parsed = urlparse(url)
    host, port = parsed.hostname or "", parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"{host} unreachable: {exc}"
    return None


def cached_file(repo: str, filename: str, *, revision: str | None = None) -> str | None:
    """Path of ``filename`` of hub repo ``repo`` in the local cache, or None (no network)."""
    from huggingface_hub import try_to_load_from_cache

    got = try_to_load_from_cache(repo, filename, revision=revision)
    return got if isinstance(got, str) and os.path.isfile(got) else None


def hub_file(name: str, repo: str, filenames: Sequence[str], *, how: str = "",
             revision: str | None = None) -> str:
    """The first of ``filenames`` (alternatives, e.g. ``open_clip_model.safetensors`` then
    ``open_clip_pytorch_model.bin``) of ``repo``: from the cache when there (local_files_only), else
    downloaded. Raises :class:`NotCachedError` when neither works."""
    for fn in filenames:
        if (path := cached_file(repo, fn, revision=revision)) is not None:
            return path
    from huggingface_hub import hf_hub_download

    if (why := hub_reachable()) is not None:
        raise NotCachedError(name, repo, why, how)
    errors = []
    for fn in filenames:
        try:
            return hf_hub_download(repo, fn, revision=revision)
        except Exception as exc:  # network down, file absent: try the next name, report all
            errors.append(f"{fn}: {_short(exc)}")
    raise NotCachedError(name, repo, "; ".join(errors), how)


def hub_snapshot(name: str, repo: str, *, allow_patterns: Sequence[str] | None = None,
                 required: Sequence[str] = (), how: str = "", revision: str | None = None) -> Path:
    """Local folder of ``repo`` (the files matching ``allow_patterns``): the cached snapshot when it
    has every ``required`` file (``local_files_only=True``), else downloaded. Raises :class:`NotCachedError`."""
    from huggingface_hub import snapshot_download

    pats = list(allow_patterns) if allow_patterns else None
    try:
        folder = snapshot_download(repo, revision=revision, allow_patterns=pats, local_files_only=True)
        if _has_files(folder) and all((Path(folder) / f).is_file() for f in required):
            return Path(folder)
    except Exception:  # not in the cache: go to the network below
        pass
    if (why := hub_reachable()) is not None:
        raise NotCachedError(name, repo, why, how)
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=pats))
    except Exception as exc:
        raise NotCachedError(name, repo, _short(exc), how) from None


def is_cached(repo: str, *, allow_patterns: Sequence[str] | None = None) -> bool:
    """True when a snapshot of ``repo`` is in the local cache (no network)."""
    from huggingface_hub import snapshot_download

    try:
        return _has_files(snapshot_download(repo, allow_patterns=list(allow_patterns) if allow_patterns else None,
                                            local_files_only=True))
    except Exception:
        return False


def _has_files(folder: str | os.PathLike) -> bool:
    return any(p.is_file() for p in Path(folder).iterdir()) if Path(folder).is_dir() else False


def cached_url_file(url: str, *, cache_dir: str | None = None) -> str | None:
    """The file open_clip downloaded from ``url`` (``~/.cache/clip/<basename>``), or None (no network)."""
    target = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
    return str(target) if target.is_file() else None


def url_file(name: str, url: str, *, how: str = "", cache_dir: str | None = None) -> str:
    """An open_clip URL download (``pretrained`` tags without a hub repo, e.g. OpenAI's ``.pt``): the
    file in open_clip's cache (``~/.cache/clip/<basename>``) when there, else downloaded by open_clip
    (which checks the sha256 in the URL). Raises :class:`NotCachedError`."""
    root = Path(cache_dir or os.path.expanduser("~/.cache/clip"))
    if (cached := cached_url_file(url, cache_dir=str(root))) is not None:
        return cached
    from open_clip.pretrained import download_pretrained_from_url

    if (why := hub_reachable(url)) is not None:
        raise NotCachedError(name, url, why, how)
    try:
        return download_pretrained_from_url(url, cache_dir=str(root))
    except Exception as exc:
        raise NotCachedError(name, url, _short(exc), how) from None
