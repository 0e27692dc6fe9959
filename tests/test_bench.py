"""The benchmark scripts in bench/ run end to end at toy sizes and print their tables (no timing is
asserted: speed targets live in bench/RESULTS.md, measured by these scripts at full size)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "bench" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _row(out: str, start: str) -> list[str]:
    """The cells of the first markdown table row that starts with ``start``."""
    line = next(line for line in out.splitlines() if line.startswith(start))
    return [c.strip() for c in line.strip("|").split("|")]


def _number(cell: str) -> float:
    return float(re.match(r"[\d,.]+", cell).group(0).replace(",", ""))


@pytest.mark.slow
def test_bench_extract_runs_at_toy_size() -> None:
    out = _bench("extract.py", "--images", "48", "--size", "40", "--max-size", "72", "--runs", "1",
                 "--encoders", "clip:tiny", "--batch-size", "16", "--device", "cpu", "--host-workers", "0",
                 "--memory", "48")
    row = _row(out, "| clip:tiny | cpu |")
    forward, loop, ratio = _number(row[6]), _number(row[7]), _number(row[8])
    assert forward > 0 and loop > 0 and ratio == pytest.approx(loop / forward, abs=0.01)
    assert "loop time: images" in out
    assert _number(_row(out, "| clip:tiny | decoded uint8 | 0 |")[4]) > 0  # host side alone
    assert _number(_row(out, "| clip:tiny | 48 | 16 | 0 |")[4]) > 100  # peak RSS in MiB (torch alone is more)


@pytest.mark.slow
def test_bench_store_runs_at_toy_size() -> None:
    out = _bench("store.py", "--rows", "2048", "--dim", "8", "--repeats", "1", "--skip-ingest")
    assert _row(out, "| filtered scan")[1].endswith("ms")
    assert _row(out, "| GROUP BY view over vector[1]")[2].endswith("ms")


@pytest.mark.slow
def test_bench_train_head_runs_at_toy_size() -> None:
    out = _bench("train_head.py", "--rows", "1024", "--dim", "8", "--classes", "5", "--repeats", "1",
                 "--heads", "linear", "--device", "cpu", "--knn", "64")
    row = _row(out, "| linear |")
    assert _number(row[1]) >= 0 and _number(row[3]) > 0
    assert "kNN head (k = 20, 64 queries" in out
    same = re.search(r"the same class for ([0-9.]+) % of the queries", out)
    assert same is not None and float(same.group(1)) >= 95  # faiss and the PyTorch search agree


@pytest.mark.slow
def test_bench_ingest_formats_runs_at_toy_size() -> None:
    out = _bench("ingest_formats.py", "--rows", "20", "40", "--size", "8")
    for fmt in ("parquet", "webdataset"):
        rows = [_row(out, f"| {fmt} | {n} |") for n in (20, 40)]
        assert all(_number(r[5]) > 0 and _number(r[6]) > 0 and _number(r[7]) > 0 for r in rows)
        assert f"- {fmt}: " in out


@pytest.mark.slow
def test_bench_finetune_runs_at_toy_size(tmp_path: Path) -> None:
    out = _bench("finetune.py", "--workdir", str(tmp_path), "--images", "48", "--min-size", "40", "--max-size", "56",
                 "--image-size", "32", "--batch-size", "16", "--runs", "1", "--steps", "1", "--step-model",
                 "test_resnet", "--step-image-size", "32", "--sections", "loader,step,gpu,memory", "--device", "cpu",
                 "--gpu-models", "test_vit:lora", "--gpu-decode", "--memory-rows", "64,128", "--memory-runs", "1")
    row = _row(out, "| JPEG bytes in the store |")
    assert _number(row[1]) > 0 and _number(row[2]) > 0 and _number(row[3].strip("*")) > 0
    assert _number(_row(out, "| test_resnet | cpu | fp32 | CPU workers | 32 |")[7].strip("*")) > 0
    assert _number(_row(out, "| test_vit:lora | cpu | bf16 | GPU | 32 |")[5]) > 0  # decode_jpeg path, on the CPU here
    small, large = _row(out, "| 64 |"), _row(out, "| 128 |")
    assert _number(small[3]) > 100 and _number(large[4].strip("*")) > 0  # tree peak MiB (torch alone is more)


def test_knn_bench_runs_at_toy_size():
    out = _bench("knn.py", "--queries", "64", "--rows", "2000", "--dim", "16", "--runs", "1", "--cpu-queries", "32")
    cpu = _row(out, "| faiss-cpu")
    assert "32 queries, x2" in cpu[0]
    torch_row = _row(out, "| torch")
    assert _number(torch_row[5]) == 1.0  # the same neighbours as CPU faiss
