"""Input formats of ``featurelt ingest``, one per file, behind the ``FORMATS`` registry.

Contract (adding a format is one new file in this folder; every module here is imported on first use
of the package, so its ``@register_format`` runs):

.. code-block:: python

    from featurelt.data.formats.base import Input, Record, register_format

    @register_format("myformat", "one line for `featurelt ingest --help`",
                     detect=lambda path: path.suffix == ".my", priority=50)
    def read_myformat(path: Path, *, root: Path | None = None, split: str | None = None) -> Input:
        ...
        return Input(dataset=..., classes=[...], records=records(), total=n)

- ``detect(path) -> bool`` is asked for ``--format auto`` in ``priority`` order (lower first; the plain
  ``folder`` format is the fallback for folders at 100); it must be cheap (names, a folder listing).
- ``read(path, *, root, split) -> Input``: ``root`` is ``--root`` (where relative image paths start; a
  format that has none ignores it), ``split`` the ``--split`` that overrides every row's split. Return
  :class:`~featurelt.data.formats.base.Input`: the data set name, class names in label order, the
  **lazy** iterator of :class:`~featurelt.data.formats.base.Record` (one per image: a ``path`` to a file,
  or encoded ``data`` bytes; a problem with one row goes in ``Record.error``, not an exception), a total if
  known. Ids: set ``Record.sample_id`` when the source has ids, else ``Record.key`` (the image's path within
  the source: the id becomes ``<dataset>:<key>``), else the content hash is the id. A source that states no
  splits at all sets ``Input.unsplit_class_counts`` (records per class) so ingest can hold out a test split. Errors about the whole input (missing file, wrong header) raise ValueError / FileNotFoundError
  naming the file. Import heavy or optional libraries inside ``read``, so ``featurelt --help`` stays fast.
- ``featurelt.data.ingest`` validates the records (decodes every image), assigns labels and writes;
  formats never touch the store.

``BUILTINS`` (``--builtin``) is the registry of bundled data sets (``builtin.py``).
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from featurelt.data.formats.base import FORMATS, Input, InputFormat, Record, register_format

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_") and _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

from featurelt.data.formats.builtin import BUILTINS  # noqa: E402  (after the format modules are loaded)


def detect_format(path: Path) -> str:
    """The format of ``path`` (``--format auto``): the first registered format, by priority, whose ``detect`` says yes."""
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    for fmt in sorted((FORMATS.get(n) for n in FORMATS.names()), key=lambda f: (f.priority, f.name)):
        if fmt.detect(path):
            return fmt.name
    raise ValueError(f"cannot tell the format of {path}; pass --format ({', '.join(FORMATS.names())})")


def read_input(path: Path, *, fmt: str = "auto", root: Path | None = None, split: str | None = None) -> Input:
    """The :class:`Input` of ``path`` read by format ``fmt`` (``auto``: :func:`detect_format`)."""
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown format '{fmt}'; available: auto, {', '.join(FORMATS.names())}")
    name = detect_format(path) if fmt == "auto" else fmt
    return FORMATS.get(name).read(path, root=root, split=split)


__all__ = ["FORMATS", "BUILTINS", "InputFormat", "Input", "Record", "register_format", "detect_format", "read_input"]
