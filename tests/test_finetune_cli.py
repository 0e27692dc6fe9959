"""featurelt finetune end to end on a small long-tailed digits store (tests/conftest.py ``ft_store``):
runs / predictions / finetune_runs rows, --export read back by train-head and equal to the model's forward,
hooks, bad input (one line each), timm encoder fidelity."""
from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from featurelt.cli import main
from featurelt.store import Store

BASE = ["--backbone", "timm:test_resnet", "--pretrained", "none", "--image-size", "32", "--epochs", "1",
        "--batch-size", "32", "--augment", "none", "--loader-workers", "0", "--eval-every", "0"]


@pytest.fixture()
def store_path(ft_store: Path, tmp_path: Path) -> Path:
    root = tmp_path / "store"
    shutil.copytree(ft_store, root)
    return root


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_cli_run_rows_export_and_train_head(store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--store", str(store_path), "finetune", *BASE, "--export", "--loss", "balanced-softmax",
               "--sampler", "class-balanced", "--eval-every", "1", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    res = json.loads(out[out.index("{"):])
    run_id = res["run_id"]
    store = Store(store_path)
    ft = store.sql(f"SELECT * FROM finetune_runs WHERE run_id = '{run_id}'").to_pylist()
    assert len(ft) == 1 and ft[0]["status"] == "finished" and ft[0]["adapt"] == "full"
    assert ft[0]["trainable_params"] == ft[0]["total_params"] > 0
    history = json.loads(ft[0]["history"])
    assert [h["epoch"] for h in history] == [1] and history[0]["acc"] == pytest.approx(ft[0]["acc_all"])
    assert ft[0]["checkpoint_sha256"] and ft[0]["export_set"] == f"ft_{run_id}"
    prov = json.loads(ft[0]["backbone_provenance"])
    assert prov["trained"] is False and prov["preprocessing"]["input_size"] == [3, 32, 32]
    run = store.sql(f"SELECT * FROM runs WHERE run_id = '{run_id}'").to_pylist()[0]
    preds = store.read("predictions", filter=f"run_id = '{run_id}'")
    assert preds.num_rows == 50 and run["acc_all"] == pytest.approx(
        float(np.mean(np.asarray(preds.column("label")) == np.asarray(preds.column("prediction")))))
    assert main(["--store", str(store_path), "eval", "--run", run_id]) == 0  # metrics recomputed from predictions
    # the exported set trains a head, and its provenance names the run
    sets = store.read("embedding_sets", filter=f"name = 'ft_{run_id}'").to_pylist()
    assert json.loads(sets[0]["provenance"])["finetune_run"] == run_id
    assert store.count(f"emb_ft_{run_id}") == store.count("samples")
    capsys.readouterr()
    assert main(["--store", str(store_path), "train-head", "--features", f"ft_{run_id}", "--epochs", "2"]) == 0
    assert main(["--store", str(store_path), "runs"]) == 0
    listing = capsys.readouterr().out
    assert run_id in listing and "finetune" in listing
    assert main(["--store", str(store_path), "report", "--run", run_id, "--out", str(store_path.parent / "report")]) == 0


def test_export_equals_model_forward_on_the_image(store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The exported vector of an image == the fine-tuned model's forward on it, through timm's own transform (1e-5).
    The Python API shows its notes on stderr by default (run id, one line per epoch), as the CLI does."""
    from PIL import Image

    from featurelt.encoders.timm import timm_transform
    from featurelt.finetune import FinetuneCfg, finetune

    cfg = FinetuneCfg(backbone="timm:test_resnet", pretrained="none", image_size=32, epochs=1, batch_size=32,
                      augment="none", loader_workers=0, eval_every=0, export=True)
    res = finetune(store_path, cfg)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"note: run {res.run_id}: ") and res.notes[0] == err[0][len("note: "):]
    assert sum(line.startswith("note: epoch 1/1: loss ") for line in err) == 1
    assert [f"note: {n}" if not n.startswith("warning:") else n for n in res.notes] == err
    store = Store(store_path)
    emb = store.read(f"emb_{res.export_set}").to_pylist()
    rows = {r["sample_id"]: r for r in store.read("samples", columns=["sample_id", "image"]).to_pylist()}
    model = res.model.eval()
    import timm.data

    transform = timm_transform(timm.data.resolve_data_config({"input_size": (3, 32, 32)}, model=model.backbone))
    for r in emb[:: max(1, len(emb) // 6)]:
        img = Image.open(io.BytesIO(rows[r["sample_id"]]["image"])).convert("RGB")
        with torch.no_grad():
            want = model.features(transform(img)[None])[0]
        torch.testing.assert_close(torch.tensor(r["vector"]), want, atol=1e-5, rtol=1e-5)


def test_hooks_are_called(store_path: Path) -> None:
    from featurelt.finetune import FinetuneCfg, FinetuneHooks, finetune

    calls: dict[str, int] = {"configure": 0, "wrap": 0, "plan": 0, "batch": 0, "loss": 0, "after": 0}

    class Recipe(FinetuneHooks):
        extra_columns = ("description",)

        def configure(self, cfg):
            calls["configure"] += 1
            return cfg.replace(lr=0.01)

        def wrap_model(self, model, ctx):
            calls["wrap"] += 1
            return model

        def train_plan(self, epoch, ctx):
            calls["plan"] += 1
            return [np.arange(0, 10), np.arange(10, 16)]

        def make_batch(self, images, targets, batch, ctx):
            calls["batch"] += 1
            assert images.dtype == torch.float32 and "description" in batch.columns
            assert all(set(e) == {"box", "flip", "size"} for e in batch.extras)
            return images, targets

        def loss(self, outputs, targets, batch, ctx):
            calls["loss"] += 1
            return outputs.logsumexp(1).mean() * 0 + torch.nn.functional.cross_entropy(outputs, targets)

        def after_step(self, per_sample_loss, batch, ctx):
            calls["after"] += 1
            assert per_sample_loss.shape == (len(batch.rows),)

    store = Store(store_path)
    val_ids = store.sql("SELECT sample_id FROM samples WHERE split = 'test' ORDER BY sample_id LIMIT 12").column(0)
    ids = ", ".join(f"'{v}'" for v in val_ids.to_pylist())
    with store.transaction("a val split") as tx:
        tx.update("samples", {"split": "'val'"}, where=f"sample_id IN ({ids})")
    cfg = FinetuneCfg(backbone="timm:test_resnet", pretrained="none", image_size=32, epochs=1, batch_size=32,
                      augment="none", loader_workers=0, eval_every=0)
    res = finetune(store_path, cfg, hooks=Recipe())
    assert res.config.lr == 0.01
    assert calls["configure"] == 1 and calls["wrap"] == 1 and calls["batch"] == calls["loss"] == calls["after"] == 2
    # the val split is evaluated too: its own runs row and predictions
    store = Store(store_path)
    splits = {r["run_id"]: r["n"] for r in store.sql("SELECT run_id, count(*) AS n FROM predictions GROUP BY run_id")
              .to_pylist()}
    assert splits == {res.run_id: 38, f"{res.run_id}-val": 12}


@pytest.mark.parametrize("argv, message", [
    (["--train-split", "nothing"], "train split 'nothing' has no rows"),
    (["--loss", "nope"], "unknown loss 'nope'"),
    (["--sampler", "nope"], "unknown sampler 'nope'"),
    (["--backbone", "timm:nope"], "'nope' is not a timm model"),
    (["--backbone", "foo:bar"], "unknown backbone family 'foo'"),
    (["--resume", "latest"], "no fine-tune runs"),
])
def test_bad_input_is_one_line(store_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                               message: str) -> None:
    assert main(["--store", str(store_path), "finetune", *BASE, *argv]) == 1
    line = _err(capsys)
    assert message in line and line.startswith("featurelt finetune: error:")


def test_checkpoint_of_another_architecture(store_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import timm

    path = tmp_path / "vit.pt"
    torch.save(timm.create_model("test_vit", num_classes=0, img_size=32).state_dict(), path)
    i = BASE.index("--pretrained")
    argv = BASE[:i] + BASE[i + 2:]
    assert main(["--store", str(store_path), "finetune", *argv, "--checkpoint", str(path)]) == 1
    line = _err(capsys)
    assert f"checkpoint {path} does not fit timm:test_resnet" in line


def test_bad_image_bytes(store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = Store(store_path)
    sid = store.sql("SELECT sample_id FROM samples WHERE split = 'train' ORDER BY sample_id LIMIT 1").column(0)[0].as_py()
    with store.transaction("damage one image") as tx:
        tx.update("samples", {"image": "X'00010203'"}, where=f"sample_id = '{sid}'")
    assert main(["--store", str(store_path), "finetune", *BASE]) == 1
    line = _err(capsys)
    assert f"sample {sid}" in line and "--skip-bad" in line
    assert main(["--store", str(store_path), "finetune", *BASE, "--skip-bad"]) == 0
    rejects = Store(store_path).read("rejects", filter="command = 'finetune'").to_pylist()
    assert [r["sample_id"] for r in rejects] == [sid]


def test_timm_encoder_matches_timm(store_path: Path, tmp_path: Path) -> None:
    """`featurelt extract timm:test_resnet` == timm create_model + resolve_data_config + create_transform (1e-5)."""
    import timm
    import timm.data
    from PIL import Image

    ckpt = tmp_path / "w.pt"
    torch.manual_seed(3)
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), ckpt)
    assert main(["--store", str(store_path), "extract", "timm:test_resnet", "--checkpoint", str(ckpt),
                 "--image-size", "48", "--split", "test", "--resize-on", "host"]) == 0
    store = Store(store_path)
    model = timm.create_model("test_resnet", num_classes=0)
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    model.eval()
    config = timm.data.resolve_data_config({"input_size": (3, 48, 48)}, model=model)
    transform = timm.data.create_transform(**config)
    emb = store.read("emb_timm_test_resnet").to_pylist()
    rows = {r["sample_id"]: r["image"] for r in store.read("samples", columns=["sample_id", "image"]).to_pylist()}
    assert len(emb) == 50
    for r in emb[::10]:
        with torch.no_grad():
            want = model(transform(Image.open(io.BytesIO(rows[r["sample_id"]])).convert("RGB"))[None])[0]
        torch.testing.assert_close(torch.tensor(r["vector"]), want, atol=1e-5, rtol=1e-5)
    prov = json.loads(store.read("embedding_sets").to_pylist()[-1]["provenance"])
    assert prov["preprocessing"]["crop_pct"] == config["crop_pct"] and prov["trained"] is True


def test_pixel_mixup_of_a_planned_pair(store_path: Path, capsys: pytest.CaptureFixture[str],
                                      caplog: pytest.LogCaptureFixture) -> None:
    """A plan entry with partners (GlobalBatch) mixes the two normalised images and the one-hot labels with lam.
    quiet=True: the notes go to the featurelt.finetune logger only, nothing on stderr."""
    from PIL import Image

    from featurelt.encoders.timm import timm_transform
    from featurelt.finetune import FinetuneCfg, FinetuneHooks, finetune
    from featurelt.finetune.data import GlobalBatch

    lam = np.array([0.25, 0.5, 0.75, 1.0], dtype=np.float32)
    seen: dict[str, object] = {}

    class Pairs(FinetuneHooks):
        def train_plan(self, epoch, ctx):
            seen["train"] = ctx.train
            return [GlobalBatch(np.arange(4), np.arange(4, 8), lam, lam)]

        def make_batch(self, images, targets, batch, ctx):
            seen.update(images=images.clone(), targets=targets.clone(), rows=batch.rows, partner=batch.partner)
            return images, targets

    cfg = FinetuneCfg(backbone="timm:test_resnet", pretrained="none", image_size=32, epochs=1, batch_size=8,
                      augment="none", loader_workers=0, eval_every=0)
    with caplog.at_level(logging.INFO, logger="featurelt.finetune"):
        res = finetune(store_path, cfg, hooks=Pairs(), write=False, quiet=True)
    assert capsys.readouterr().err == ""
    logged = [r.getMessage() for r in caplog.records if r.name == "featurelt.finetune"]
    assert logged == res.notes and any(n.startswith("epoch 1/1: loss ") for n in logged)
    train = seen["train"]
    store = Store(store_path)
    images = {r["sample_id"]: r["image"] for r in store.read("samples", columns=["sample_id", "image"]).to_pylist()}
    import timm.data

    transform = timm_transform(timm.data.resolve_data_config({"input_size": (3, 32, 32)}, model=res.model.backbone))

    def pixels(row: int) -> torch.Tensor:
        return transform(Image.open(io.BytesIO(images[train.sample_ids[row]])).convert("RGB"))

    assert seen["rows"].tolist() == [0, 1, 2, 3] and seen["partner"].tolist() == [4, 5, 6, 7]
    want = torch.stack([float(l) * pixels(i) + (1 - float(l)) * pixels(i + 4) for i, l in enumerate(lam)])
    torch.testing.assert_close(seen["images"], want, atol=1e-5, rtol=1e-5)
    k = len(Store(store_path).read("classes"))
    eye = torch.eye(k)
    y = torch.from_numpy(train.labels)
    want_t = torch.stack([float(l) * eye[y[i]] + (1 - float(l)) * eye[y[i + 4]] for i, l in enumerate(lam)])
    torch.testing.assert_close(seen["targets"], want_t)
