"""featurelt finetune checkpoints: a run killed with SIGKILL (a real subprocess, killed when its first
checkpoint file appears) and resumed with --resume latest ends with the same weights, bit for bit, as an
uninterrupted run (CPU, same seed); Ctrl-C (SIGINT) leaves a resumable checkpoint and an 'interrupted' run."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from featurelt.cli import main
from featurelt.store import Store

ARGS = ["--backbone", "timm:test_resnet", "--pretrained", "none", "--image-size", "32", "--epochs", "2",
        "--batch-size", "16", "--augment", "flip-crop", "--loader-workers", "1", "--eval-every", "0",
        "--checkpoint-every", "1", "--device", "cpu", "--loss", "ldam", "--sampler", "sqrt", "--ema"]
REPO = Path(__file__).resolve().parent.parent


def start_finetune(root: Path, args: list[str] = ARGS) -> subprocess.Popen:
    """``featurelt finetune ARGS`` as a real process on the store at ``root`` (this checkout's code)."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-m", "featurelt", "--store", str(root), "finetune", *args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for_checkpoint(proc: subprocess.Popen, root: Path, timeout: float = 240.0) -> Path:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        found = list((root / "checkpoints").glob("*/last.pt")) if (root / "checkpoints").exists() else []
        if found:
            return found[0]
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before its first checkpoint: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no checkpoint appeared")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)
    return {**{f"model.{k}": v for k, v in state["model"].items()}, **{f"ema.{k}": v for k, v in state["ema"].items()}}


def test_kill9_then_resume_is_bit_identical(ft_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    shutil.copytree(ft_store, ref)
    shutil.copytree(ft_store, killed)
    proc = start_finetune(killed)
    first = wait_for_checkpoint(proc, killed)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    state = torch.load(first, weights_only=True)
    assert state["position"]["step"] < 8  # 62 rows / 16 = 4 steps per epoch, 2 epochs: killed before the end
    assert main(["--store", str(killed), "runs", "--json"]) == 0
    (listed,) = [r for r in json.loads(capsys.readouterr().out) if r["status"] != "finished"]
    pos = state["position"]  # the listing reads the checkpoint's last.json sidecar, not the .pt
    where = f"epoch {pos['epoch'] + 1}/2" + (f" (batch {pos['batch']})" if pos["batch"] else "")
    assert listed["status"] == "unfinished (running)" and listed["epochs"] == pos["epoch"]
    assert listed["resume_at"] == f"{where}, step {pos['step']}" and listed["checkpoint"] == str(first)
    assert main(["--store", str(killed), "runs"]) == 0
    out = capsys.readouterr().out
    assert "unfinished (running)" in out
    assert f"{first.parent.name}: resume at {where}, step {pos['step']} from {first} " in out
    assert main(["--store", str(killed), "finetune", "--resume", "latest"]) == 0
    assert re.search(r"trained 2 epochs, [0-9.]+ s since the resume", capsys.readouterr().out)
    run_id = first.parent.name
    row = Store(killed).sql(f"SELECT status, epochs FROM finetune_runs WHERE run_id = '{run_id}'").to_pylist()
    assert row == [{"status": "finished", "epochs": 2}]

    assert main(["--store", str(ref), "finetune", *ARGS]) == 0
    (ref_ckpt,) = list((ref / "checkpoints").glob("*/last.pt"))
    a, b = _weights(ref_ckpt), _weights(first)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    assert main(["--store", str(killed), "finetune", "--resume", run_id]) == 1
    assert "has finished; nothing to resume" in capsys.readouterr().err


def test_ctrl_c_leaves_a_resumable_checkpoint(ft_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "store"
    shutil.copytree(ft_store, root)
    proc = start_finetune(root)
    ckpt = wait_for_checkpoint(proc, root)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    err = proc.stderr.read().decode()
    assert proc.returncode == 130, err[-2000:]
    assert "--resume latest" in err
    row = Store(root).sql("SELECT status, checkpoint FROM finetune_runs").to_pylist()
    assert row[0]["status"] == "interrupted" and row[0]["checkpoint"] == str(ckpt)
    state = torch.load(ckpt, weights_only=True)
    assert state["position"]["step"] >= 1


def test_position_sidecar_of_another_checkpoint_is_ignored(tmp_path: Path) -> None:
    """``last.json`` describes the ``last.pt`` whose size and mtime it records; a kill between the sidecar's and the
    checkpoint's ``os.replace`` leaves a sidecar of the next checkpoint, which the listing must not show."""
    from featurelt.finetune.runs import progress_text, read_position, write_position

    tmp = tmp_path / "last.pt.tmp"
    tmp.write_bytes(b"x" * 10)
    write_position(tmp_path, tmp, position={"epoch": 1, "batch": 3, "step": 7}, epochs=3)
    assert read_position(str(tmp_path)) is None  # no last.pt yet
    os.replace(tmp, tmp_path / "last.pt")
    pos = read_position(str(tmp_path))
    assert pos == {"epoch": 1, "batch": 3, "step": 7, "epochs": 3, "checkpoint": str(tmp_path / "last.pt")}
    assert progress_text(pos) == "epoch 2/3 (batch 3), step 7"
    assert progress_text({**pos, "epoch": 3, "batch": 0}) == "3/3 epochs trained, step 7"
    tmp.write_bytes(b"y" * 11)  # the next checkpoint's sidecar lands, the kill comes before its last.pt
    write_position(tmp_path, tmp, position={"epoch": 2, "batch": 0, "step": 9}, epochs=3)
    assert read_position(str(tmp_path)) is None
