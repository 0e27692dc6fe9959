"""Parquet / WebDataset ingest benchmark: peak memory does not grow with the data set (O(batch)), and the rate.

For each ``--rows`` N and each format (``parquet``: Hugging Face datasets-style shards written with pyarrow,
``webdataset``: tar shards written with tarfile), N random ``--size`` px RGB PNGs (incompressible, so the
data set is about N x 3 x size^2 bytes) are written once, then ingested by ``featurelt ingest`` into a fresh
store in a fresh Python process; that process reports its peak RSS (``VmHWM``; ``ru_maxrss`` would count the
forking parent's) and the ingest time.
The format's reader alone (iterating the ``Input`` records, no decode, no store) is measured the same way,
which separates the reader's memory from the write path's. Baseline, in the same kind of fresh process: reading the whole data set into memory with the format's
library (``pyarrow.parquet.read_table``; every tar member read into a list), which grows with N.

The claim checked: the ingest's peak RSS at the largest N minus that at the smallest N is much smaller
than the data added, while the baseline's grows by about the data size. Shards have the same size for
every N: a Parquet reader holds one row group (here one shard of ``SHARD_ROWS`` images) at a time.

Run: ``python bench/ingest_formats.py --rows 2000 16000`` (``--write-results`` replaces the
``## bench/ingest_formats.py`` section of ``bench/RESULTS.md``).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SHARD_ROWS = 1000  # images per shard (one Parquet row group each, as datasets writes shards under 100 MB)

HWM = """
def hwm():  # peak RSS of this process image, MiB (VmHWM: ru_maxrss would include the forking parent's)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
"""
CHILD_INGEST = HWM + """
import sys, time
from featurelt.cli import main
t0 = time.perf_counter()
rc = main(["--store", sys.argv[1], "ingest", sys.argv[2], "--format", sys.argv[3], "--no-progress"])
print("RESULT", rc, time.perf_counter() - t0, hwm())
"""
CHILD_READ = HWM + """
import sys, time
from pathlib import Path
from featurelt.data.formats import read_input
t0 = time.perf_counter()
n = sum(len(r.data or b"") for r in read_input(Path(sys.argv[1]), fmt=sys.argv[2]).records)
print("RESULT", 0, time.perf_counter() - t0, hwm())
"""
CHILD_BASELINE = HWM + """
import sys, time, tarfile
from pathlib import Path
import pyarrow.parquet as pq
t0 = time.perf_counter()
if sys.argv[2] == "parquet":
    held = [pq.read_table(p) for p in sorted(Path(sys.argv[1]).glob("*.parquet"))]
else:
    held = []
    for p in sorted(Path(sys.argv[1]).glob("*.tar")):
        with tarfile.open(p) as tf:
            held += [tf.extractfile(m).read() for m in tf if m.isfile()]
print("RESULT", 0, time.perf_counter() - t0, hwm())
"""


def pngs(n: int, size: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG", compress_level=1)
        out.append(buf.getvalue())
    return out


def write_parquet(folder: Path, n: int, size: int, classes: int) -> int:
    meta = {b"huggingface": json.dumps({"info": {"features": {
        "image": {"_type": "Image"},
        "label": {"names": [f"class {i}" for i in range(classes)], "_type": "ClassLabel"}}}}).encode()}
    folder.mkdir(parents=True)
    shards = (n + SHARD_ROWS - 1) // SHARD_ROWS
    total = 0
    for s in range(shards):
        k = min(SHARD_ROWS, n - s * SHARD_ROWS)
        images = pngs(k, size, seed=s)
        total += sum(map(len, images))
        table = pa.table({"image": pa.array([{"bytes": b, "path": None} for b in images],
                                            pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                          "label": pa.array([(s * SHARD_ROWS + i) % classes for i in range(k)], pa.int64())})
        pq.write_table(table.replace_schema_metadata(meta), folder / f"train-{s:05d}-of-{shards:05d}.parquet")
    return total


def write_webdataset(folder: Path, n: int, size: int, classes: int) -> int:
    folder.mkdir(parents=True)
    total = 0
    for s in range((n + SHARD_ROWS - 1) // SHARD_ROWS):
        k = min(SHARD_ROWS, n - s * SHARD_ROWS)
        with tarfile.open(folder / f"train-{s:06d}.tar", "w") as tf:
            for i, data in enumerate(pngs(k, size, seed=s)):
                key = f"{s:06d}_{i:06d}"
                total += len(data)
                for ext, payload in (("png", data), ("cls", str((s * SHARD_ROWS + i) % classes).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
    return total


def child(code: str, *args: str) -> tuple[float, float]:
    """(seconds, peak RSS MiB) reported by a fresh Python process running ``code``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code, *args], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    m = re.search(r"^RESULT (\d+) ([\d.]+) ([\d.]+)$", proc.stdout, re.M)
    if proc.returncode or m is None or m.group(1) != "0":
        raise SystemExit(f"child failed ({proc.returncode}): {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return float(m.group(2)), float(m.group(3))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[2000, 16000], help="data set sizes (images)")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (random RGB: incompressible)")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--write-results", action="store_true", help="replace this script's section of bench/RESULTS.md")
    args = ap.parse_args()
    rows = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="featurelt-bench-formats-") as tmp:
        for fmt, writer in (("parquet", write_parquet), ("webdataset", write_webdataset)):
            for n in args.rows:
                data = Path(tmp) / f"{fmt}-{n}"
                mib = writer(data, n, args.size, args.classes) / 2**20
                secs, rss = child(CHILD_INGEST, str(Path(tmp) / f"store-{fmt}-{n}"), str(data), fmt)
                rsecs, rrss = child(CHILD_READ, str(data), fmt)
                bsecs, brss = child(CHILD_BASELINE, str(data), fmt)
                rows.append((fmt, n, mib, secs, rss, rrss, brss))
                print(f"{fmt} {n}: data {mib:.1f} MiB, ingest {secs:.2f} s peak {rss:.0f} MiB; reader only "
                      f"{rsecs:.2f} s peak {rrss:.0f} MiB; read-all {bsecs:.2f} s peak {brss:.0f} MiB", file=sys.stderr)
    lines = ["| format | images | PNG bytes MiB | ingest s | ingest img/s | ingest peak RSS MiB "
             "| reader-only peak RSS MiB | read-all baseline peak RSS MiB |", "|---|---|---|---|---|---|---|---|"]
    for fmt, n, mib, secs, rss, rrss, brss in rows:
        lines.append(f"| {fmt} | {n:,} | {mib:,.1f} | {secs:.2f} | {n / secs:,.0f} | {rss:,.0f} | {rrss:,.0f} "
                     f"| {brss:,.0f} |")
    for fmt in ("parquet", "webdataset"):
        sel = [r for r in rows if r[0] == fmt]
        lo, hi = sel[0], sel[-1]
        lines.append(f"- {fmt}: {hi[2] - lo[2]:,.1f} MiB more data -> ingest peak RSS {hi[4] - lo[4]:+,.0f} MiB, "
                     f"reader only {hi[5] - lo[5]:+,.0f} MiB, read-all baseline {hi[6] - lo[6]:+,.0f} MiB")
    head = (f"Command: `python bench/ingest_formats.py --rows {' '.join(map(str, args.rows))} --size {args.size}` "
            f"({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs visible, Python {platform.python_version()}, "
            f"total {(time.perf_counter() - t_start) / 60:.1f} min). One run per row, each in a fresh process; "
            f"shards of {SHARD_ROWS} images.")
    table = "\n".join([head, "", *lines])
    print(table)
    if args.write_results:
        path = ROOT / "bench" / "RESULTS.md"
        text = path.read_text()
        section = f"## bench/ingest_formats.py\n\n{table}\n"
        pattern = re.compile(r"## bench/ingest_formats\.py\n.*?(?=\n## |\Z)", re.S)
        text = pattern.sub(lambda _: section.rstrip("\n"), text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
