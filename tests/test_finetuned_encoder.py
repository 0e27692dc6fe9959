"""``featurelt extract finetuned:<run_id>``: the fine-tune run's backbone as an encoder of its store.

One tiny run (timm:test_resnet at 32 px, one epoch, ``--export``) on the long-tailed digits store; then
extract with ``finetuned:<run_id>`` / ``finetuned:latest``: the exported rows are skipped (same fingerprint),
samples ingested after the run get vectors equal to the fine-tuned model's forward (1e-5), a re-extracted set
equals the export (1e-5), provenance names the run and its checkpoint sha256; bad names are one line each.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featurelt.cli import main
from featurelt.store import Store

FT = ["--backbone", "timm:test_resnet", "--pretrained", "none", "--image-size", "32", "--epochs", "1",
      "--batch-size", "32", "--augment", "none", "--loader-workers", "0", "--eval-every", "0", "--export"]
EXTRACT = ["--num-workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def finetuned_store(ft_store: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(store path, run id) of a store with one finished fine-tune run exported to ``ft_<run_id>`` (copy it
    before writing)."""
    root = tmp_path_factory.mktemp("ftenc") / "store"
    shutil.copytree(ft_store, root)
    assert main(["--store", str(root), "finetune", *FT, "--json"]) == 0
    row = Store(root).sql("SELECT run_id FROM finetune_runs").to_pylist()
    assert len(row) == 1
    return root, row[0]["run_id"]


@pytest.fixture()
def store_run(finetuned_store: tuple[Path, str], tmp_path: Path) -> tuple[Path, str]:
    root = tmp_path / "store"
    shutil.copytree(finetuned_store[0], root)
    return root, finetuned_store[1]


def _vectors(store: Store, table: str) -> dict[str, np.ndarray]:
    t = store.read(table, columns=["sample_id", "vector"])
    return dict(zip(t.column("sample_id").to_pylist(), np.asarray(t.column("vector").to_pylist(), np.float32)))


def _ingest_new(root: Path, tmp_path: Path, n: int = 6) -> list[str]:
    """Ingest n new RGB images of odd sizes (a CSV manifest through the CLI); returns their sample ids."""
    rng = np.random.default_rng(7)
    folder = tmp_path / "new"
    folder.mkdir()
    lines = ["path,label,split"]
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (20 + 3 * i, 26, 3), dtype=np.uint8)).save(folder / f"n{i}.png")
        lines.append(f"n{i}.png,{i % 10},test")
    (folder / "new.csv").write_text("\n".join(lines) + "\n")
    before = set(Store(root).read("samples", columns=["sample_id"]).column("sample_id").to_pylist())
    assert main(["--store", str(root), "ingest", str(folder / "new.csv"), "--dataset", "new", "--no-progress"]) == 0
    after = set(Store(root).read("samples", columns=["sample_id"]).column("sample_id").to_pylist())
    assert len(after - before) == n
    return sorted(after - before)


def _forward(root: Path, run_id: str, sample_ids: list[str]) -> np.ndarray:
    """The fine-tuned model's features of the samples, computed here from the checkpoint: timm's own evaluation
    transform on the PIL image, ``FinetuneModel.features`` of the model rebuilt by hand."""
    import timm

    from featurelt.finetune import checkpoint as ckpt
    from featurelt.images.decode import load_sample_image

    store = Store(root)
    row = store.sql(f"SELECT checkpoint FROM finetune_runs WHERE run_id = '{run_id}'").to_pylist()[0]
    state = ckpt.load(row["checkpoint"])
    net = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    net.load_state_dict({k[len("backbone."):]: v for k, v in state["model"].items() if k.startswith("backbone.")})
    net.eval()
    data = timm.data.resolve_data_config({}, model=net)
    data["input_size"] = (3, 32, 32)
    transform = timm.data.create_transform(**data, is_training=False)
    ids = ", ".join(f"'{s}'" for s in sample_ids)
    rows = {r["sample_id"]: r for r in store.read("samples", filter=f"sample_id IN ({ids})").to_pylist()}
    with torch.no_grad():
        x = torch.stack([transform(load_sample_image(rows[s])) for s in sample_ids])
        return net(x).numpy()


def test_extract_finetuned_skips_the_export_and_embeds_new_samples(store_run: tuple[Path, str], tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    root, run_id = store_run
    store = Store(root)
    exported = _vectors(store, f"emb_ft_{run_id}")
    assert len(exported) == store.count("samples")
    # right after the export: every sample is already embedded with the same fingerprint, nothing written
    version = store.version
    assert main(["--store", str(root), "extract", f"finetuned:{run_id}", *EXTRACT]) == 0
    assert "0 rows added" in capsys.readouterr().out
    store.refresh()
    assert store.version == version
    # newly ingested samples: only they are embedded, into ft_<run_id>, and they equal the model's forward
    new = _ingest_new(root, tmp_path)
    capsys.readouterr()
    assert main(["--store", str(root), "extract", "finetuned:latest", *EXTRACT, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["sets"] == {"embedding": f"ft_{run_id}"} and res["rows_added"] == {"embedding": len(new)}
    assert res["samples_skipped"] == len(exported) and res["encoder"] == "finetuned:latest"
    store.refresh()
    got = _vectors(store, f"emb_ft_{run_id}")
    assert set(got) == set(exported) | set(new)
    np.testing.assert_allclose(np.stack([got[s] for s in new]), _forward(root, run_id, new), atol=1e-5, rtol=0)
    fps = set(store.read(f"emb_ft_{run_id}", columns=["fingerprint"]).column("fingerprint").to_pylist())
    assert len(fps) == 1  # the export's fingerprint
    # provenance of the extract run: the run, its checkpoint sha256 (the one finetune_runs recorded)
    ft = store.sql(f"SELECT checkpoint, checkpoint_sha256 FROM finetune_runs WHERE run_id = '{run_id}'").to_pylist()[0]
    sets = sorted(store.read("embedding_sets", filter=f"name = 'ft_{run_id}'").to_pylist(), key=lambda r: r["time"])
    assert [r["rows"] for r in sets] == [len(exported), len(new)]
    assert {r["encoder"] for r in sets} == {f"finetuned:{run_id}"} and sets[0]["fingerprint"] == sets[1]["fingerprint"]
    prov = json.loads(sets[1]["provenance"])
    assert prov["finetune_run"] == run_id and prov["checkpoint_sha256"] == ft["checkpoint_sha256"]
    assert prov["checkpoint"] == ft["checkpoint"] and prov["resize_on"] == "host" and prov["backbone"] == "timm:test_resnet"
    # the set trains a head like any other
    assert main(["--store", str(root), "train-head", "--features", f"ft_{run_id}", "--epochs", "1"]) == 0


def test_extract_finetuned_equals_the_export(store_run: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    """Into a new set (--name), every sample: the vectors equal the export's (1e-5)."""
    root, run_id = store_run
    assert main(["--store", str(root), "extract", f"finetuned:{run_id}", "--name", "again", *EXTRACT,
                 "--batch-size", "50"]) == 0
    store = Store(root)
    exported, again = _vectors(store, f"emb_ft_{run_id}"), _vectors(store, "emb_again")
    assert set(again) == set(exported)
    ids = sorted(exported)
    np.testing.assert_allclose(np.stack([again[s] for s in ids]), np.stack([exported[s] for s in ids]), atol=1e-5, rtol=0)
    capsys.readouterr()
    assert main(["--store", str(root), "embeddings", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["again"]["encoder"] == f"finetuned:{run_id}"
    assert rows["again"]["weights"] == rows[f"ft_{run_id}"]["weights"] != "(unknown)"  # the checkpoint's sha256


@pytest.mark.parametrize(("name", "extra", "message"), [
    ("finetuned:20990101_000000_nope", [], "unknown fine-tune run"),
    ("finetuned:bad name!", [], "unknown encoder 'finetuned:bad name!'"),
    ("finetuned:latest", ["--checkpoint", "x.pt"], "--checkpoint do not apply"),
])
def test_bad_finetuned_names_are_one_line(store_run: tuple[Path, str], capsys: pytest.CaptureFixture[str],
                                          name: str, extra: list[str], message: str) -> None:
    root, _ = store_run
    capsys.readouterr()
    assert main(["--store", str(root), "extract", name, *extra, *EXTRACT]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]


def test_changed_checkpoint_and_unfinished_run_are_refused(store_run: tuple[Path, str],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    root, run_id = store_run
    store = Store(root)
    path = store.sql(f"SELECT checkpoint FROM finetune_runs WHERE run_id = '{run_id}'").to_pylist()[0]["checkpoint"]
    changed = root / "changed.pt"  # the row's path is the module fixture's file: change a copy, point the row at it
    changed.write_bytes(Path(path).read_bytes() + b"\0")
    with store.transaction("test: the checkpoint file changed") as tx:
        tx.update("finetune_runs", {"checkpoint": f"'{changed}'"}, where=f"run_id = '{run_id}'")
    capsys.readouterr()
    assert main(["--store", str(root), "extract", f"finetuned:{run_id}", *EXTRACT]) == 1
    assert "the file changed after the run" in capsys.readouterr().err
    with store.transaction("test: an unfinished run") as tx:
        tx.update("finetune_runs", {"status": "'interrupted'"}, where=f"run_id = '{run_id}'")
    assert main(["--store", str(root), "extract", f"finetuned:{run_id}", *EXTRACT]) == 1
    assert f"--resume {run_id}" in capsys.readouterr().err
    assert main(["--store", str(root), "extract", "finetuned:latest", *EXTRACT]) == 1
    assert "no finished fine-tune run" in capsys.readouterr().err


def test_encoders_lists_the_family(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["encoders", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["finetuned:<run_id>"]["kind"] == "image" and rows["finetuned:<run_id>"]["checkpoint"] == "run"


def test_gpu_check_compare_runs_on_cpu(store_run: tuple[Path, str]) -> None:
    """bench/gpu_check.sh's last finetune_cli command (COMPARE, printed by --dry-run), run here on a CPU store
    where the set it compares was made on the CPU: it passes and prints the comparison."""
    import os
    import subprocess
    import sys

    root, run_id = store_run
    assert main(["--store", str(root), "extract", "finetuned:latest", "--name", "ft_cuda_again", *EXTRACT]) == 0
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"
    dry = subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True, check=True).stdout
    compare = dry.split("COMPARE (python, finetune_cli):\n", 1)[1].split("\ntotal budget", 1)[0]
    env = {**os.environ, "STORE": str(root), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", compare], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"'run_id': '{run_id}'" in out.stdout and "max abs diff 0, min cosine 1.000000" in out.stdout


@pytest.mark.gpu
def test_extract_finetuned_on_cuda_matches_the_cpu_export(store_run: tuple[Path, str]) -> None:
    """On CUDA (pinned uint8 batches normalised on the GPU, the run's --amp off: extract's bf16 autocast switched
    off), the vectors equal the CPU export up to TF32 convolutions."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    root, run_id = store_run
    assert main(["--store", str(root), "extract", f"finetuned:{run_id}", "--name", "gpu", "--device", "cuda",
                 "--num-workers", "2", "--no-progress"]) == 0
    store = Store(root)
    cpu, gpu = _vectors(store, f"emb_ft_{run_id}"), _vectors(store, "emb_gpu")
    ids = sorted(cpu)
    x, y = np.stack([cpu[s] for s in ids]), np.stack([gpu[s] for s in ids])
    assert set(gpu) == set(cpu) and np.abs(x - y).max() <= 2e-3 * np.abs(x).max()


def test_lora_ema_run_rebuilds_to_the_export(ft_store: Path, tmp_path: Path) -> None:
    """A LoRA run with --ema: the encoder rebuilds peft's layers and loads the EMA weights (what the export
    forwards); its vectors equal the export's (1e-5) and the EMA weights differ from the trained ones."""
    from featurelt.encoders import build_encoder

    root = tmp_path / "store"
    shutil.copytree(ft_store, root)
    assert main(["--store", str(root), "finetune", *FT, "--adapt", "lora", "--ema", "--ema-decay", "0.5",
                 "--lr", "0.05"]) == 0
    store = Store(root)
    run_id = store.sql("SELECT run_id FROM finetune_runs").to_pylist()[0]["run_id"]
    enc = build_encoder("finetuned:latest", store=store)
    assert enc.name == f"finetuned:{run_id}" and enc.default_set_name("embedding") == f"ft_{run_id}"
    assert any("lora_A" in n for n, _ in enc.model.named_parameters())
    from featurelt.finetune import checkpoint as ckpt

    state = ckpt.load(enc.checkpoint)
    trained = {k[len("backbone."):]: v for k, v in state["model"].items() if k.startswith("backbone.")}
    own = enc.model.state_dict()
    assert any(not torch.equal(own[k], trained[k]) for k in own)  # the EMA weights, not the last step's
    assert main(["--store", str(root), "extract", f"finetuned:{run_id}", "--name", "again", *EXTRACT]) == 0
    store.refresh()
    exported, again = _vectors(store, f"emb_ft_{run_id}"), _vectors(store, "emb_again")
    ids = sorted(exported)
    assert set(again) == set(exported)
    np.testing.assert_allclose(np.stack([again[s] for s in ids]), np.stack([exported[s] for s in ids]), atol=1e-5, rtol=0)


def test_python_api_needs_the_store() -> None:
    from featurelt.encoders import build_encoder

    with pytest.raises(ValueError, match=r"reads its run from a store: build_encoder\(\.\.\., store=STORE\)"):
        build_encoder("finetuned:latest")
    with pytest.raises(KeyError, match="is a family"):
        build_encoder("finetuned:<run_id>", store=object())
