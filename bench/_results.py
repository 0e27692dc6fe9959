"""bench/RESULTS.md upkeep shared by the benchmark scripts: replace one script's section in place."""
from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, section: str, text: str) -> None:
    """Replace the ``section`` heading's part of RESULTS.md (up to the next ``## ``) with ``text``; append when absent."""
    content = path.read_text()
    start = content.find(section)
    if start < 0:
        content = content.rstrip("\n") + "\n\n" + text
    else:
        nxt = content.find("\n## ", start + len(section))
        content = content[:start] + text + ("\n" + content[nxt + 1:] if nxt >= 0 else "")
    path.write_text(content)
