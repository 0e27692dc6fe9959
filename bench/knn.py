"""Exact cosine kNN (featurelt.index.VectorIndex): each backend that can run here vs CPU faiss (the baseline).

Issue 18 point 5's size is ``--queries 100000 --rows 1000000 --dim 512`` (k = 10). CPU faiss at that size
takes tens of minutes on a few cores, so ``--cpu-queries N`` searches only the first N queries on the
CPU baseline and scales its time linearly to all queries (flat search costs queries x rows x dim; the
line says so). Every backend's neighbours are compared with CPU faiss's on those N queries.

    python bench/knn.py --queries 2000 --rows 100000 --dim 512 --runs 3            # cpu2
    python bench/knn.py --queries 100000 --rows 1000000 --dim 512 --cpu-queries 2000 --runs 3   # GPU machine

Prints one markdown table: backend, build (add) seconds, search seconds (median of --runs), queries/s,
ratio of CPU faiss time / backend time, agreement of the ids with CPU faiss.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featurelt.index import VectorIndex, faiss_gpus  # noqa: E402


def _data(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 65536):  # in blocks: bounded temporary memory
        out[s:s + 65536] = rng.standard_normal((min(65536, n - s), dim), dtype=np.float32)
    return out


def _sync(backend: str) -> None:
    if backend in ("torch", "faiss-gpu"):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


def run(backend: str, base: np.ndarray, queries: np.ndarray, k: int, runs: int, device: str | None):
    t0 = time.perf_counter()
    index = VectorIndex(base.shape[1], backend=backend, device=device)
    index.add(base)
    if backend == "torch":
        index._matrix()  # the concatenation belongs to the build, not the first search
    _sync(backend)
    build = time.perf_counter() - t0
    times, ids = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        _, ids = index.search(queries, k)
        _sync(backend)
        times.append(time.perf_counter() - t0)
    return build, times, ids


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--rows", type=int, default=100000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cpu-queries", type=int, default=None,
                    help="CPU faiss searches only this many queries; its time is scaled to --queries")
    ap.add_argument("--backends", default="auto",
                    help="comma-separated backends to time besides faiss-cpu (default: those that can run)")
    ap.add_argument("--device", default=None, help="torch backend device (default cuda when visible, else cpu)")
    args = ap.parse_args()

    base, queries = _data(args.rows, args.dim, 0), _data(args.queries, args.dim, 1)
    nq_cpu = min(args.queries, args.cpu_queries or args.queries)
    import faiss

    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, faiss {faiss.__version__} "
          f"(GPUs seen by faiss: {faiss_gpus()}), python {platform.python_version()}")
    print(f"command: python bench/knn.py {' '.join(sys.argv[1:])}")
    b_cpu, t_cpu, ids_cpu = run("faiss-cpu", base, queries[:nq_cpu], args.k, args.runs, None)
    cpu_full = statistics.median(t_cpu) * args.queries / nq_cpu
    rows = [("faiss-cpu" + (f" ({nq_cpu} queries, x{args.queries / nq_cpu:g})" if nq_cpu < args.queries else ""),
             b_cpu, t_cpu, cpu_full, 1.0, 1.0)]
    if args.backends == "auto":
        import torch

        wanted = (["faiss-gpu"] if faiss_gpus() else []) + ["torch"]
        if not torch.cuda.is_available() and args.device is None:
            args.device = "cpu"
    else:
        wanted = [b for b in args.backends.split(",") if b and b != "faiss-cpu"]
    for backend in wanted:
        build, times, ids = run(backend, base, queries, args.k, args.runs, args.device)
        med = statistics.median(times)
        agree = float((ids[:nq_cpu] == ids_cpu).mean())
        label = backend + (f" ({args.device})" if backend == "torch" and args.device else "")
        rows.append((label, build, times, med, cpu_full / med, agree))
    print(f"\n{args.queries} queries x {args.rows} rows x {args.dim} dims, k={args.k}; median of {args.runs} runs\n")
    print("| backend | build s | search s (median) | queries/s | CPU faiss time / this | ids = CPU faiss | runs s |")
    print("|---|---|---|---|---|---|---|")
    for label, build, times, full, ratio, agree in rows:
        print(f"| {label} | {build:.2f} | {full:.3f} | {args.queries / full:,.0f} | {ratio:.2f}x | {agree:.4f} | "
              f"{', '.join(f'{t:.3f}' for t in times)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
