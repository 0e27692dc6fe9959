"""Recipe hook state across resume and ranks (issue 17 follow-ups), on ``ecvl-stage1`` (METHODS.md section 5).

- ``FinetuneHooks.state_dict`` goes into every checkpoint: ECVL's momentum state M_i round-trips through
  ``torch.load(weights_only=True)``; a ``--recipe ecvl-stage1`` run killed with SIGKILL after its first
  checkpoint (real subprocess) and resumed ends with the same weights, bit for bit, as an uninterrupted run.
- Under DDP (2 gloo ranks) every rank's per-sample losses reach every rank: both ranks hold the same M_i state
  as one process with the same global batch.
- ``train_text=true`` fine-tunes the CLIP text tower (logits against its embeddings of the class prompts);
  without it the class text embeddings stay the stored ones and no text parameter exists.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from featurelt.cli import main
from featurelt.finetune.recipes.ecvl_stage1 import ECVLStage1Hooks, MomentumState
from featurelt.store import Store
from tests.test_finetune_resume import start_finetune, wait_for_checkpoint

REPO = Path(__file__).resolve().parent.parent
ARGS = ["--recipe", "ecvl-stage1", "--backbone", "clip:tiny", "--text-set", "clip_tiny", "--image-size", "32",
        "--epochs", "2", "--batch-size", "16", "--augment", "flip-crop", "--loader-workers", "1", "--eval-every", "0",
        "--checkpoint-every", "1", "--device", "cpu", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def ecvl_store(ft_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ft_store`` (62 train rows) with clip:tiny class text embeddings ``clip_tiny`` (copy it before writing)."""
    from featurelt.extract import extract_text

    root = tmp_path_factory.mktemp("ecvl") / "store"
    shutil.copytree(ft_store, root)
    extract_text(Store(root), "clip:tiny", name="clip_tiny", templates=["A photo of a {}"], device="cpu")
    return root


def assert_same_momentum(a: dict, b: dict) -> None:
    """Two ``MomentumState.by_sample()`` maps are equal, bit for bit (NaN = never folded equals NaN)."""
    assert a.keys() == b.keys()
    np.testing.assert_array_equal(np.array([a[s] for s in a]), np.array([b[s] for s in a]))


def test_momentum_state_round_trips_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    hooks = ECVLStage1Hooks(beta=0.5)
    hooks.start_epoch(0, seed=3)
    hooks.state.add(["a", "b", "c"], torch.tensor([1.0, 2.0, 6.0]))
    hooks.start_epoch(1, seed=3)                          # fold: Lm = (1, 2, 6), M = momentum_strength(Lm)
    hooks.state.add(["c", "d"], torch.tensor([2.0, 4.0]))
    torch.rand(5, generator=hooks.generator)              # the augmentation stream moved on
    torch.save({"hooks": hooks.state_dict()}, tmp_path / "s.pt")
    back = ECVLStage1Hooks(beta=0.9)
    back.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True)["hooks"])
    assert back.state.beta == 0.5 and back._epoch == 1
    assert_same_momentum(back.state.by_sample(), hooks.state.by_sample())
    assert torch.equal(torch.rand(4, generator=back.generator), torch.rand(4, generator=hooks.generator))
    for st in (hooks.state, back.state):                   # both fold epoch 1 the same way: c -> 0.5 * 6 + 0.5 * 2
        st.fold()
    np.testing.assert_array_equal(back.state.lm, hooks.state.lm)
    assert back.state.by_sample()["c"][0] == 4.0 and back.state.by_sample()["d"][0] == 4.0
    with pytest.raises(ValueError, match="no momentum state"):
        ECVLStage1Hooks().load_state_dict({})


def test_ecvl_killed_after_first_checkpoint_resumes_bit_identical(ecvl_store: Path, tmp_path: Path) -> None:
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    shutil.copytree(ecvl_store, ref)
    shutil.copytree(ecvl_store, killed)
    proc = start_finetune(killed, ARGS)
    first = wait_for_checkpoint(proc, killed)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    state = torch.load(first, weights_only=True)
    assert state["position"]["step"] < 8                   # 62 rows / 16 = 4 steps per epoch, 2 epochs
    assert state["hooks"]["momentum"]["sample_ids"]         # M_i's sums so far are in the checkpoint
    assert main(["--store", str(killed), "finetune", "--resume", "latest"]) == 0

    assert main(["--store", str(ref), "finetune", *ARGS]) == 0
    (ref_ckpt,) = list((ref / "checkpoints").glob("*/last.pt"))
    a, b = torch.load(ref_ckpt, weights_only=True), torch.load(first, weights_only=True)
    assert a["position"] == b["position"] == {"epoch": 2, "batch": 0, "step": 8}
    assert a["model"].keys() == b["model"].keys()
    different = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not different, different[:5]
    ma, mb = MomentumState(), MomentumState()
    ma.load_state_dict(a["hooks"]["momentum"])
    mb.load_state_dict(b["hooks"]["momentum"])
    assert_same_momentum(ma.by_sample(), mb.by_sample())
    assert len(ma.index) == 62


DDP_SCRIPT = """
import json, os, sys
from featurelt.finetune.config import FinetuneCfg
from featurelt.finetune.launch import launch
from featurelt.finetune.recipes import resolve
root, out = sys.argv[1:3]
cfg, hooks = resolve("ecvl-stage1", FinetuneCfg(), {**json.loads(sys.argv[3]), "launcher": "torchrun"}, store=root)
launch(root, cfg, hooks=hooks)
with open(os.path.join(out, "rank%s.json" % os.environ["RANK"]), "w") as f:
    json.dump({s: list(v) for s, v in hooks.state.by_sample().items()}, f)
"""
# L_v->l only (l2v_weight 0): L_l->v is a batch-level term, computed over each rank's share under DDP, so its
# per-sample values differ from one process's by construction (launch.py); L_v->l's do not. clip:tiny has
# LayerNorm only (no per-rank BatchNorm statistics).
DDP_FLAGS = {"backbone": "clip:tiny", "text_set": "clip_tiny", "image_size": 32, "epochs": 1, "batch_size": 16,
             "augment": "flip-crop", "loader_workers": 0, "eval_every": 0, "device": "cpu", "lr": 1e-3,
             "val_split": "none", "loss_opts": {"l2v_weight": 0.0}}


def test_ddp_ranks_share_every_ranks_momentum_losses(ecvl_store: Path, tmp_path: Path) -> None:
    """2 gloo ranks (torchrun): after an epoch both ranks hold the same M_i sums, bit for bit, and they are
    one process's (same global batch) to float rounding."""
    import json

    from featurelt.finetune.config import FinetuneCfg
    from featurelt.finetune.recipes import resolve
    from featurelt.finetune.train import finetune

    two = tmp_path / "two"
    shutil.copytree(ecvl_store, two)
    script = tmp_path / "ddp_ecvl.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(port), str(script), str(two), str(tmp_path), json.dumps(DDP_FLAGS)],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(r0) == 62                                   # every train row, also those rank 0 never loaded
    assert_same_momentum(r0, r1)                           # the ranks agree bit for bit

    cfg, hooks = resolve("ecvl-stage1", FinetuneCfg(), DDP_FLAGS, store=ecvl_store)
    finetune(ecvl_store, cfg, hooks=hooks, write=False)
    single = hooks.state.by_sample()
    assert single.keys() == r0.keys()
    a = np.array([single[s] for s in single])
    b = np.array([r0[s] for s in single])
    np.testing.assert_array_equal(a[:, 2], b[:, 2])        # the same counts: each rank saw every rank's rows
    np.testing.assert_allclose(b[:, 1], a[:, 1], rtol=1e-5, atol=1e-6)  # the same loss sums (float rounding)
    st = [MomentumState(), MomentumState()]                # folded: the same M_i
    for m, d in zip(st, (single, r0)):
        m.add(list(d), torch.tensor([v[1] / v[2] for v in d.values()]))
        m.fold()
    np.testing.assert_allclose(st[1].strength(list(single)).numpy(), st[0].strength(list(single)).numpy(), atol=1e-4)


def test_train_text_trains_the_clip_text_tower_only_when_asked(ecvl_store: Path, tmp_path: Path) -> None:
    """Default: no text parameter, the class texts stay the stored rows bit for bit. train_text=true: the text
    tower starts as the stored set's tower (same prompt, same weights) and its parameters change."""
    from featurelt.data.features import load_text_embeddings
    from featurelt.finetune.config import FinetuneCfg
    from featurelt.finetune.recipes import resolve
    from featurelt.finetune.recipes.ecvl_stage1 import clip_text_tower
    from featurelt.finetune.train import finetune

    flags = {**DDP_FLAGS, "lr": 1e-2}
    stored = torch.from_numpy(load_text_embeddings(Store(ecvl_store), "clip_tiny"))
    names = Store(ecvl_store).read("classes").sort_by("label").column("name").to_pylist()

    cfg, hooks = resolve("ecvl-stage1", FinetuneCfg(), flags, store=ecvl_store)
    frozen = finetune(ecvl_store, cfg, hooks=hooks, write=False).model
    assert not [k for k, _ in frozen.named_parameters() if "text" in k]
    assert frozen.text_tower is None
    torch.testing.assert_close(frozen.text, torch.nn.functional.normalize(stored, dim=1), rtol=0, atol=0)

    cfg, _ = resolve("ecvl-stage1", FinetuneCfg(), flags, opts={"train_text": True}, store=ecvl_store)
    assert cfg.recipe_opts == {"train_text": True}          # kept for --resume and the other ranks
    start = clip_text_tower(cfg, names)
    with torch.no_grad():                                   # the tower of the stored set: same weights, same prompt
        torch.testing.assert_close(torch.nn.functional.normalize(start(), dim=1), stored, rtol=1e-5, atol=1e-5)
    root = tmp_path / "store"                               # the command line, end to end
    shutil.copytree(ecvl_store, root)
    assert main(["--store", str(root), "finetune", *ARGS[:-2], "--lr", "1e-2", "--epochs", "1",
                 "--recipe-opt", "train_text=true"]) == 0
    (path,) = list((root / "checkpoints").glob("*/last.pt"))
    model = torch.load(path, weights_only=True)["model"]
    end = {k[len("text_tower."):]: v for k, v in model.items() if k.startswith("text_tower.")}
    assert end.keys() == dict(start.named_parameters()).keys()
    moved = [k for k, p in start.named_parameters() if not torch.equal(p, end[k])]
    assert "net.token_embedding.weight" in moved and "net.text_projection" in moved
    with pytest.raises(ValueError, match="needs a clip: backbone"):
        clip_text_tower(cfg.replace(backbone="timm:test_vit"), names)
    assert main(["--store", str(root), "finetune", *ARGS[:-2], "--recipe-opt", "train_text=maybe"]) == 1
