"""featurelt finetune launchers: 2 CPU processes under torchrun (DDP, gloo), each taking its [rank::2] share of
the one epoch plan, end with the weights of one process with the same global batch (1e-5); rank shares and
global plan positions (tests/test_finetune_cli.py covers the local launcher)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from featurelt.cli import main
from featurelt.finetune.data import GlobalBatch, global_positions, rank_share

# timm:test_vit: LayerNorm only (BatchNorm statistics of a rank's share differ from the global batch's without
# --sync-bn); flip-crop augmentation seeded by the global plan position; SGD with warmup; the momentum sampler
# (its second epoch is planned from the losses of every rank)
ARGS = ["--backbone", "timm:test_vit", "--pretrained", "none", "--image-size", "32", "--epochs", "2",
        "--batch-size", "16", "--augment", "flip-crop", "--loader-workers", "0", "--eval-every", "0", "--device", "cpu",
        "--optimizer", "sgd", "--lr", "0.05", "--warmup", "1", "--sampler", "momentum", "--val-split", "none"]
REPO = Path(__file__).resolve().parent.parent


def test_rank_shares_cover_the_global_batch_in_order() -> None:
    b = GlobalBatch(np.arange(10, 17), np.arange(20, 27), np.linspace(0, 1, 7).astype(np.float32))
    shares = [rank_share(b, r, 3) for r in range(3)]
    assert [s.index.tolist() for s in shares] == [[10, 13, 16], [11, 14], [12, 15]]
    assert [s.partner.tolist() for s in shares] == [[20, 23, 26], [21, 24], [22, 25]]
    # one process loads [index, partner] of batch 0 at positions 0..13, batch 1 (5 rows, no partner) at 14..18
    plan = [b, GlobalBatch(np.arange(5))]
    assert global_positions(plan, 1, 3)[0].tolist() == [1, 4, 8, 11]
    assert global_positions(plan, 1, 3)[1].tolist() == [15, 18]
    assert np.concatenate(global_positions(plan, 0, 1)).tolist() == list(range(19))


def _model_state(root: Path) -> dict[str, torch.Tensor]:
    (path,) = list((root / "checkpoints").glob("*/last.pt"))
    return torch.load(path, weights_only=True)["model"]


def test_torchrun_two_cpu_ranks_equal_one_process(ft_store: Path, tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(ft_store, one)
    shutil.copytree(ft_store, two)
    assert main(["--store", str(one), "finetune", *ARGS]) == 0
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(29500 + os.getpid() % 1000), "-m", "featurelt", "--store", str(two), "finetune", *ARGS,
                           "--launcher", "torchrun"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _model_state(one), _model_state(two)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5, msg=k)
    from featurelt.finetune.backbones import build_backbone

    init = build_backbone("timm:test_vit", pretrained="none", image_size=32, seed=0).module.state_dict()
    assert any(not torch.equal(a[f"backbone.{k}"], v) for k, v in init.items())  # it trained: weights moved
    from featurelt.store import Store

    rows = Store(two).sql("SELECT status FROM finetune_runs").to_pylist()
    assert rows == [{"status": "finished"}]  # rank 0 alone wrote
    assert Store(two).count("runs") == 1


def test_torchrun_launcher_needs_torchrun(ft_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "s"
    shutil.copytree(ft_store, root)
    assert main(["--store", str(root), "finetune", *ARGS, "--launcher", "torchrun"]) == 1
    assert "RANK / WORLD_SIZE are not set" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.slow
def test_ray_two_workers_equal_one_process(ft_store: Path, tmp_path: Path) -> None:
    """Ray Train (local, 2 CPU workers) ends with the weights of the single-process run (1e-5)."""
    pytest.importorskip("ray.train.torch")
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(ft_store, one)
    shutil.copytree(ft_store, two)
    assert main(["--store", str(one), "finetune", *ARGS]) == 0
    assert main(["--store", str(two), "finetune", *ARGS, "--launcher", "ray", "--num-workers", "2"]) == 0
    a, b = _model_state(one), _model_state(two)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5, msg=k)
    from featurelt.store import Store

    assert Store(two).sql("SELECT status FROM finetune_runs").to_pylist() == [{"status": "finished"}]
