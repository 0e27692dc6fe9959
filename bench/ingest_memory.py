"""Ingest memory benchmark: peak RSS of ``featurelt ingest`` of N images into an existing store (issue 13 point 5).

The input is one synthetic Fashion-MNIST-like IDX file pair (28x28 uint8 noise images, ~900 B as PNG,
seeded) of ``max(--sizes)`` images; each size is ingested with ``--limit N`` into a copy of a store
that already holds ``--existing`` other images (so the write path is the one into an existing store),
and, for comparison, into a new store. Every run is a fresh Python process; its peak RSS is its own
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at exit. The median of ``--repeats`` runs is reported.

Run: ``python bench/ingest_memory.py`` (2k / 20k / 40k, 3 runs each); ``--write-results`` replaces the
``## bench/ingest_memory.py`` section of ``bench/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CHILD = """
import resource, sys
from featurelt.cli import main
rc = main(sys.argv[1:])
print("maxrss_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(rc)
"""


def write_idx(folder: Path, n: int, *, seed: int, prefix: str = "train") -> Path:
    """``prefix-images-idx3-ubyte`` + labels (10 classes) of ``n`` seeded 28x28 noise images in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = folder / f"{prefix}-images-idx3-ubyte"
    with open(images, "wb") as fh:
        fh.write(bytes([0, 0, 8, 3]) + struct.pack(">III", n, 28, 28))
        for start in range(0, n, 4096):
            fh.write(rng.integers(0, 256, (min(4096, n - start), 28, 28), dtype=np.uint8).tobytes())
    with open(folder / f"{prefix}-labels-idx1-ubyte", "wb") as fh:
        fh.write(bytes([0, 0, 8, 1]) + struct.pack(">I", n) + (np.arange(n) % 10).astype(np.uint8).tobytes())
    return images


def ingest_rss(store: Path, inp: Path, limit: int) -> float:
    """Peak RSS (MiB) of one ``featurelt ingest INPUT --limit N`` in a fresh process."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", CHILD, "--store", str(store), "ingest", "--no-progress",
                          "--limit", str(limit), str(inp)], env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"ingest failed: {out.stderr[-2000:]}")
    line = [x for x in out.stdout.splitlines() if x.startswith("maxrss_kib")][-1]
    return int(line.split()[1]) / 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="2000,20000,40000", help="images per ingest, comma-separated")
    p.add_argument("--existing", type=int, default=2000, help="images already in the store (default 2000)")
    p.add_argument("--repeats", type=int, default=3, help="runs per size; the median is reported (default 3)")
    p.add_argument("--machine", default="cpu2", help="machine label written into the results (default cpu2)")
    p.add_argument("--write-results", action="store_true",
                   help="replace the '## bench/ingest_memory.py' section of bench/RESULTS.md with the results")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="featurelt-bench-ingest-mem-"))
    try:
        inp = write_idx(work / "input", max(sizes), seed=1)
        base = work / "base-store"
        ingest_rss(base, write_idx(work / "existing", args.existing, seed=0), args.existing)
        rows = []
        for n in sizes:
            runs: dict[str, list[float]] = {"existing": [], "new": []}
            for _ in range(args.repeats):
                for kind in runs:
                    store = work / "store"
                    shutil.rmtree(store, ignore_errors=True)
                    if kind == "existing":
                        shutil.copytree(base, store)
                    runs[kind].append(ingest_rss(store, inp, n))
            rows.append((n, runs))
            print(n, {k: [round(v) for v in vs] for k, vs in runs.items()}, file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [f"Command: `python bench/ingest_memory.py --sizes {args.sizes} --existing {args.existing} "
             f"--repeats {args.repeats}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, machine: "
             f"{args.machine}; {os.cpu_count()} CPUs visible, Python {platform.python_version()}, "
             f"total {time.perf_counter() - t0:.0f} s, load average {load}).", "",
             "Peak RSS of one `featurelt ingest` process (median of the runs; all runs in parentheses), MiB:", "",
             f"| images | into a store of {args.existing} images | into a new store |", "|---:|---:|---:|"]
    for n, runs in rows:
        cells = [f"{statistics.median(v):,.0f} ({', '.join(f'{x:.0f}' for x in v)})" for v in runs.values()]
        lines.append(f"| {n:,} | {cells[0]} | {cells[1]} |")
    body = "\n".join(lines) + "\n"
    print(body)
    if args.write_results:
        results = ROOT / "bench" / "RESULTS.md"
        text = results.read_text()
        head = "## bench/ingest_memory.py\n"
        if head in text:
            start = text.index(head) + len(head)
            nxt = text.find("\n## ", start)
            end = len(text) if nxt == -1 else nxt + 1
            text = text[:start] + "\n" + body + "\n" + text[end:]
        else:
            text = text.rstrip("\n") + "\n\n" + head + "\n" + body
        results.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
