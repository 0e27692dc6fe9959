"""What a new user sees of ``featurelt finetune`` (tests/conftest.py ``ft_store``): the run id and one line per
epoch on stderr (also without a terminal), the history's lr = the lr the epoch's last step used, train-head's
collapse warning and metrics, the export listed as trained, ``report`` projecting the run's own export, and a
``FinetuneResult`` that prints without the whole model."""
from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from featurelt.cli import main
from featurelt.store import Store

LR = 0.01
ARGV = ["finetune", "--backbone", "timm:test_resnet", "--pretrained", "none", "--image-size", "32", "--epochs", "1",
        "--batch-size", "16", "--lr", str(LR), "--augment", "none", "--loader-workers", "0", "--eval-every", "0",
        "--export"]


@pytest.fixture(scope="module")
def run(ft_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("ftusage") / "store"
    shutil.copytree(ft_store, root)
    # another embedding set, listed before ft_<run_id>: report must still pick the run's own export
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["--store", str(root), "extract", "pixels", "--name", "a_pixels", "--no-progress"]) == 0
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["--store", str(root), *ARGV])
    assert rc == 0, err.getvalue()
    run_id = Store(root).sql("SELECT run_id FROM finetune_runs").column("run_id")[0].as_py()
    return {"root": root, "out": out.getvalue(), "err": err.getvalue(), "run_id": run_id}


def test_run_id_and_one_line_per_epoch_on_stderr(run: dict) -> None:
    """No terminal (a job, a log file): the progress bar is off, the notes still say which run and each epoch."""
    err = run["err"]
    start = re.search(rf"note: run {run['run_id']}: 62 'train' rows, (\d+) batches per epoch, 1 epochs on cpu; "
                      rf"checkpoints in (\S+)", err)
    assert start, err
    assert Path(start.group(2)).name == run["run_id"]
    history = json.loads(Store(run["root"]).sql("SELECT history FROM finetune_runs").column("history")[0].as_py())
    line = re.search(r"note: epoch 1/1: loss ([0-9.]+), lr ([0-9.e+-]+), (\d+) img/s", err)
    assert line, err
    assert float(line.group(1)) == pytest.approx(history[0]["loss"], abs=1e-4)
    assert float(line.group(2)) == pytest.approx(history[0]["lr"], rel=1e-2)
    assert err.index(start.group(0)) < err.index(line.group(0))
    assert re.search(r"trained 1 epoch, [0-9.]+ s \(", run["out"])


def test_history_lr_is_the_lr_of_the_epochs_last_step(run: dict) -> None:
    """Cosine per step from LR to 0 over T = n steps (1 epoch, n batches, no warmup): the last step used the lr
    after n - 1 updates, 0.5 LR (1 + cos(pi (n - 1) / n)) -- not the 0 the schedule reaches after it."""
    n = int(re.search(r"(\d+) batches per epoch", run["err"]).group(1))
    assert n == math.ceil(62 / 16)
    history = json.loads(Store(run["root"]).sql("SELECT history FROM finetune_runs").column("history")[0].as_py())
    want = 0.5 * LR * (1 + math.cos(math.pi * (n - 1) / n))
    assert history[0]["lr"] == pytest.approx(want, rel=1e-9) and want > 0


def test_collapse_metrics_match_the_predictions(run: dict) -> None:
    store = Store(run["root"])
    rid = run["run_id"]
    metrics = json.loads(store.sql(f"SELECT metrics FROM runs WHERE run_id = '{rid}'").column("metrics")[0].as_py())
    pred = np.asarray(store.read("predictions", filter=f"run_id = '{rid}'").column("prediction"))
    top = np.unique(pred, return_counts=True)[1].max() / len(pred)
    assert metrics["top_class_fraction"] == pytest.approx(top)
    assert metrics["collapsed"] is bool(top > 0.9)
    assert ("collapsed to one class" in run["err"]) is bool(top > 0.9)


def test_collapse_warning_names_the_class(ft_store: Path) -> None:
    from featurelt.finetune import FinetuneCfg
    from featurelt.finetune.train import collapse_warning

    classes = Store(ft_store).read("classes")
    cfg = FinetuneCfg(backbone="timm:test_resnet", lr=0.5, epochs=3)
    pred = np.array([5] * 46 + [1, 2, 3, 4])  # 92 % on class 5
    msg = collapse_warning(pred, classes, cfg)
    assert msg == ("warning: the fine-tuned model predicts class 5 ('five') for 92% of the 50 'test' rows: it has "
                   "collapsed to one class (lr 0.5, optimizer adamw, 3 epochs; try another --lr or more --epochs)")
    assert collapse_warning(np.array([5] * 45 + [1, 2, 3, 4, 6]), classes, cfg) is None  # 90 %: not above


def test_export_is_listed_as_trained_and_report_projects_it(run: dict, capsys: pytest.CaptureFixture[str]) -> None:
    root, rid = run["root"], run["run_id"]
    assert main(["--store", str(root), "embeddings", "--json"]) == 0
    sets = {s["name"]: s for s in json.loads(capsys.readouterr().out)}
    assert sets[f"ft_{rid}"]["trained"] is True
    assert Store(root).embedding_sets()[0] == "a_pixels"  # the old default (the store's first set)
    out = root.parent / "report"
    assert main(["--store", str(root), "report", "--run", "latest", "--out", str(out), "--examples", "0",
                 "--max-points", "50"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["projection"]["embedding_set"] == f"ft_{rid}"


def test_result_repr_leaves_the_model_out() -> None:
    import torch

    from featurelt.finetune import FinetuneCfg
    from featurelt.finetune.train import FinetuneResult

    res = FinetuneResult(run_id="r", config=FinetuneCfg(backbone="timm:test_resnet"), run_dir="d", checkpoint=None,
                         metrics={}, history=[], model=torch.nn.Linear(2, 2))
    assert "Linear" not in repr(res) and "run_id='r'" in repr(res)
    assert isinstance(res.model, torch.nn.Linear)


def test_readme_python_line_is_valid() -> None:
    """README's "Python mirrors the CLI" finetune call: its FinetuneCfg builds, and the result attributes and the
    ``log=`` keyword it names exist."""
    import dataclasses
    import inspect

    import featurelt.finetune
    from featurelt.finetune.train import FinetuneResult

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    call = re.search(r"`featurelt\.finetune\.finetune\(store, (featurelt\.finetune\.FinetuneCfg\([^`]*\))\)`", readme)
    assert call, "README lost its finetune Python line"
    cfg = eval(call.group(1), {"featurelt": featurelt})  # our own README
    assert cfg.export
    import yaml

    job = yaml.safe_load((Path(__file__).resolve().parents[1] / "jobs" / "finetune-digits-tiny.yaml").read_text())
    step = next(s["finetune"] for s in job["steps"] if "finetune" in s)  # the worked example: same settings
    for key in ("backbone", "pretrained", "image-size", "epochs", "batch-size", "lr", "loss", "augment"):
        assert getattr(cfg, key.replace("-", "_")) == step[key], key
    fields = {f.name for f in dataclasses.fields(FinetuneResult)}
    assert {"run_id", "metrics", "history", "export_set", "model"} <= fields
    assert "log" in inspect.signature(featurelt.finetune.finetune).parameters


def test_missing_text_set_says_where_text_sets_are_listed() -> None:
    """`featurelt embeddings` lists image embedding sets only: the error points at the text_embeddings table."""
    from featurelt.finetune import FinetuneCfg

    with pytest.raises(ValueError, match=r'--head text needs --text-set NAME .*featurelt sql "SELECT DISTINCT set_name '
                                         r'FROM text_embeddings"'):
        FinetuneCfg(backbone="clip:tiny", head="text")


def test_runs_lists_finished_runs_beside_an_unfinished_one(run: dict, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A killed fine-tune run (finetune_runs status running, no metrics) listed beside finished runs with numbers:
    the empty cells used to make `featurelt runs` fail ("Could not convert '' with type str")."""
    import pyarrow as pa

    root = tmp_path / "store"
    shutil.copytree(run["root"], root)
    store = Store(root)
    row = store.read("finetune_runs")
    for name, value in (("run_id", "20991231_000000_abcdef"), ("status", "running")):
        row = row.set_column(row.schema.get_field_index(name), name, pa.array([value]))
    with store.transaction("test: a killed fine-tune run") as tx:
        tx.append("finetune_runs", row)
    capsys.readouterr()
    assert main(["--store", str(root), "runs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    finished = next(line for line in lines if line.startswith(run["run_id"]))
    acc = Store(root).sql(f"SELECT acc_all FROM runs WHERE run_id = '{run['run_id']}'").column(0)[0].as_py()
    assert f"{round(acc, 4):.4f}" in finished and finished.rstrip().endswith("finished")
    unfinished = next(line for line in lines if line.startswith("20991231_000000_abcdef"))
    assert unfinished.rstrip().endswith("unfinished (running)")


def test_print_rows_mixes_text_and_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    from featurelt.commands._common import print_rows

    print_rows([{"a": 0.5, "b": 3}, {"a": "", "b": "x"}, {"a": None, "b": 4}])
    out = capsys.readouterr().out.splitlines()
    assert out[2].split() == ["0.5000", "3"] and out[3].split() == ["x"] and out[4].split()[1] == "4"
