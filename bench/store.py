"""Store benchmark: Fashion-MNIST ingest rate, and SQL latency over a large embedding table.

What it measures (each the median of ``--repeats`` runs, beside a baseline measured in the same run):

1. **Ingest** of the builtin Fashion-MNIST (70 000 images, or ``--ingest-limit``) through
   ``featurelt.data.ingest.ingest`` into a fresh store: images/s. Baseline: the same reader and PNG
   encoding written straight to a Parquet file with pyarrow (no decode-validation, no store).
2. **SQL** over an ``emb_bench`` table of ``--rows`` x ``--dim`` float32 vectors (default 1M x 512),
   written through the store in streamed batches (``tx.append`` of a generator; never materialised), then
   copied to Parquet by streaming ``store.scan`` into a ``ParquetWriter``. Each query runs through
   ``Store.sql`` (DuckDB over the Lance dataset) and through DuckDB over the Parquet copy
   (``read_parquet``), in the same process. Query results are checked equal.

Peak RSS (``ru_maxrss``) is reported after each phase. ``--write-results`` replaces the
``## bench/store.py`` section of ``bench/RESULTS.md`` with the table printed.

Run: ``python bench/store.py`` (full size) or ``python bench/store.py --rows 100000`` (smaller).
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
QUERIES: dict[str, str] = {
    "GROUP BY view (count, avg aug_strength)":
        "SELECT view, count(*) AS n, avg(aug_strength) AS mean_strength FROM emb_bench GROUP BY view ORDER BY view",
    "filtered scan (aug_strength < 0.001, with vectors)":
        "SELECT sample_id, vector FROM emb_bench WHERE aug_strength < 0.001 ORDER BY sample_id",
    "GROUP BY view over vector[1] (reads all vectors)":
        "SELECT view, avg(vector[1]) AS mean_v0 FROM emb_bench GROUP BY view ORDER BY view",
}


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, list[float], object]:
    """Median seconds of ``repeats`` calls, all times, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, result


# ---------------------------------------------------------------- ingest
def bench_ingest(work: Path, *, repeats: int, limit: int | None) -> list[dict[str, object]]:
    import pyarrow.parquet as pq

    from featurelt.data.ingest import FASHION_MNIST_DIR, _validate, ingest, read_builtin
    from featurelt.store import Store

    if not FASHION_MNIST_DIR.exists():
        print(f"skip ingest: {FASHION_MNIST_DIR} missing (Debian package dataset-fashion-mnist)", file=sys.stderr)
        return []
    counts: list[int] = []

    def store_ingest() -> int:
        root = work / "ingest-store"
        shutil.rmtree(root, ignore_errors=True)
        res = ingest(Store(root), builtin="fashion-mnist", limit=limit, progress=False, message="bench ingest")
        counts.append(res.added)
        return res.added

    def parquet_baseline() -> int:
        out = work / "ingest-baseline.parquet"
        inp = read_builtin("fashion-mnist")
        label_of = {name: i for i, name in enumerate(inp.classes)}
        n = 0
        writer = None
        rows: list[dict[str, object]] = []

        def flush() -> None:
            nonlocal writer
            t = pa.table({"sample_id": [r["sample_id"] for r in rows], "split": [r["split"] for r in rows],
                          "label": pa.array([r["label"] for r in rows], pa.int32()),
                          "image": pa.array([r["image"] for r in rows], pa.large_binary())})
            if writer is None:
                writer = pq.ParquetWriter(out, t.schema)
            writer.write_table(t)
            rows.clear()

        for rec in inp.records:
            if limit is not None and n >= limit:
                break
            row, _ = _validate(rec, reference=False, dataset="fashion-mnist")  # encoded PNG; no decode (size known), like the store path
            rows.append({"sample_id": row["sample_id"], "split": rec.split, "label": label_of[rec.class_name],
                         "image": row["image"]})
            n += 1
            if len(rows) >= 512:
                flush()
        if rows:
            flush()
        if writer is not None:
            writer.close()
        return n

    med, times, n = timed(store_ingest, repeats)
    bmed, btimes, bn = timed(parquet_baseline, repeats)
    assert n == bn, (n, bn)
    return [{"what": f"ingest Fashion-MNIST ({n} images)", "featurelt": f"{n / med:,.0f} img/s ({med:.2f} s)",
             "baseline": f"{bn / bmed:,.0f} img/s ({bmed:.2f} s)", "ratio": f"{bmed / med:.2f}x speed",
             "runs": f"{', '.join(f'{t:.2f}' for t in times)} / {', '.join(f'{t:.2f}' for t in btimes)} s",
             "rss": f"{peak_rss_mib():,.0f}"}]


# ---------------------------------------------------------------- SQL over emb_bench
def emb_batches(rows: int, dim: int, *, batch: int = 16384, seed: int = 0) -> Iterator[pa.RecordBatch]:
    """Synthetic embedding rows, generated batch by batch (memory ~ batch x dim)."""
    rng = np.random.default_rng(seed)
    for start in range(0, rows, batch):
        n = min(batch, rows - start)
        idx = np.arange(start, start + n)
        vec = rng.standard_normal((n, dim), dtype=np.float32)
        yield pa.RecordBatch.from_pydict({
            "sample_id": pa.array([f"s{i:08d}" for i in idx], pa.string()),
            "view": pa.array(idx % 4, pa.int32()),
            "aug_strength": pa.array(rng.random(n, dtype=np.float32), pa.float32()),
            "fingerprint": pa.array(["bench"] * n, pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1), pa.float32()), dim),
        })


def bench_sql(work: Path, *, rows: int, dim: int, repeats: int) -> tuple[list[dict[str, object]], dict[str, str]]:
    import duckdb
    import pyarrow.parquet as pq

    from featurelt.store import Store

    root = work / "emb-store"
    shutil.rmtree(root, ignore_errors=True)
    store = Store(root)
    t0 = time.perf_counter()
    with store.transaction("bench emb_bench") as tx:
        written = tx.append("emb_bench", emb_batches(rows, dim))
    write_s = time.perf_counter() - t0
    assert written == rows and store.count("emb_bench") == rows
    rss_write = peak_rss_mib()
    parquet = work / "emb_bench.parquet"
    t0 = time.perf_counter()
    writer = None
    for b in store.scan("emb_bench", batch_size=16384):
        if writer is None:
            writer = pq.ParquetWriter(parquet, b.schema)
        writer.write_batch(b)
    assert writer is not None
    writer.close()
    copy_s = time.perf_counter() - t0
    rss_copy = peak_rss_mib()
    notes = {"write": f"{rows:,} x {dim} float32 written through the store in {write_s:.1f} s "
                      f"({rows / write_s:,.0f} rows/s; peak RSS {rss_write:,.0f} MiB); Lance "
                      f"{_du(store.uri('emb_bench')) / 2**30:.2f} GiB",
             "copy": f"Parquet copy streamed from store.scan in {copy_s:.1f} s ({parquet.stat().st_size / 2**30:.2f} GiB; "
                     f"peak RSS {rss_copy:,.0f} MiB)"}

    def via_store(q: str) -> pa.Table:
        return store.sql(q)

    def via_parquet(q: str) -> pa.Table:
        con = duckdb.connect()
        try:
            con.sql(f"CREATE VIEW emb_bench AS SELECT * FROM read_parquet('{parquet}')")
            rel = con.sql(q)
            return rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()
        finally:
            con.close()

    out = []
    for name, q in QUERIES.items():
        via_store(q), via_parquet(q)  # warm-up (page cache, DuckDB extension loading)
        med, times, res = timed(lambda: via_store(q), repeats)
        bmed, btimes, bres = timed(lambda: via_parquet(q), repeats)
        assert res.num_rows == bres.num_rows, (name, res.num_rows, bres.num_rows)
        _check_equal(name, res, bres)
        out.append({"what": f"{name} -> {res.num_rows} rows", "featurelt": f"{med * 1000:,.1f} ms",
                    "baseline": f"{bmed * 1000:,.1f} ms", "ratio": f"{med / bmed:.2f}x time",
                    "runs": f"{', '.join(f'{t * 1000:.0f}' for t in times)} / {', '.join(f'{t * 1000:.0f}' for t in btimes)} ms",
                    "rss": f"{peak_rss_mib():,.0f}"})
    return out, notes


def _check_equal(name: str, a: pa.Table, b: pa.Table) -> None:
    for col in a.column_names:
        x, y = a.column(col), b.column(col)
        if pa.types.is_floating(x.type):
            if not np.allclose(x.to_numpy(), y.to_numpy(), rtol=1e-5, atol=1e-6):
                raise AssertionError(f"{name}: column {col} differs between store and Parquet")
        elif x.to_pylist() != y.to_pylist():
            raise AssertionError(f"{name}: column {col} differs between store and Parquet")


def _du(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ---------------------------------------------------------------- report
def render(rows: list[dict[str, object]], notes: dict[str, str], args: argparse.Namespace, total_s: float) -> str:
    lines = [
        f"Command: `python bench/store.py --rows {args.rows} --dim {args.dim} --repeats {args.repeats}"
        f"{' --ingest-limit ' + str(args.ingest_limit) if args.ingest_limit else ''}` "
        f"({time.strftime('%Y-%m-%d', time.gmtime())}, machine: {args.machine}; {os.cpu_count()} CPUs visible, "
        f"{platform.python_version()}, total {total_s / 60:.1f} min).",
        "Median of the runs listed; baseline = the same work without the store (ingest: reader + PNG rows "
        "written to Parquet with pyarrow; SQL: the same query text in DuckDB over a Parquet copy of the table, "
        "same process). Ratio: for ingest, store speed / baseline speed; for SQL, store time / Parquet time "
        "(>1 = the store is slower). Peak RSS is the whole process so far.",
        "",
        "| measurement | featurelt store | baseline | ratio | runs (store / baseline) | peak RSS MiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['what']} | {r['featurelt']} | {r['baseline']} | {r['ratio']} | {r['runs']} | {r['rss']} |")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines += ["", f"- load average (1/5/15 min) when the run ended: {load}"
              f"{' -- other work shared the cores' if os.getloadavg()[0] > (os.cpu_count() or 1) else ''}"]
    lines += [f"- {v}" for v in notes.values()]
    return "\n".join(lines) + "\n"


def write_section(results: Path, body: str) -> None:
    """Replace the text under ``## bench/store.py`` (up to the next ``## ``) with ``body``."""
    text = results.read_text()
    head = "## bench/store.py\n"
    if head not in text:
        raise ValueError(f"{results} has no '{head.strip()}' section")
    start = text.index(head) + len(head)
    nxt = text.find("\n## ", start)
    end = len(text) if nxt == -1 else nxt + 1
    results.write_text(text[:start] + "\n" + body + "\n" + text[end:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="rows of the emb_bench table (default 1M)")
    p.add_argument("--dim", type=int, default=512, help="vector dimension (default 512)")
    p.add_argument("--repeats", type=int, default=5, help="runs per measurement; the median is reported (default 5)")
    p.add_argument("--ingest-repeats", type=int, default=3, help="runs of the ingest measurement (default 3)")
    p.add_argument("--ingest-limit", type=int, default=None, help="ingest only the first N Fashion-MNIST images")
    p.add_argument("--skip-ingest", action="store_true", help="only the SQL measurements")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary folder, removed after)")
    p.add_argument("--machine", default="cpu2", help="machine label written into the results (default cpu2)")
    p.add_argument("--write-results", action="store_true",
                   help="replace the '## bench/store.py' section of bench/RESULTS.md with the results")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="featurelt-bench-store-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows: list[dict[str, object]] = []
        if not args.skip_ingest:
            rows += bench_ingest(work, repeats=args.ingest_repeats, limit=args.ingest_limit)
            print(render(rows, {}, args, time.perf_counter() - t_start), flush=True)
        sql_rows, notes = bench_sql(work, rows=args.rows, dim=args.dim, repeats=args.repeats)
        rows += sql_rows
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    body = render(rows, notes, args, time.perf_counter() - t_start)
    print(body)
    if args.write_results:
        write_section(ROOT / "bench" / "RESULTS.md", body)
        print(f"wrote the bench/store.py section of {ROOT / 'bench' / 'RESULTS.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
