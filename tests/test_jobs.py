"""Job specs: YAML steps become the same featurelt commands a user types."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from featurelt.cli import main
from featurelt.jobs import load_job, step_argv
from featurelt.store import Store

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def test_step_argv() -> None:
    assert step_argv("extract", {"encoder": "clip:tiny", "batch-size": 8, "strict": True, "split": None}) == \
        ["extract", "clip:tiny", "--batch-size", "8", "--strict"]
    assert step_argv("train-head", {"sweep": ["loss=ce,focal", "sampler=instance"]}) == \
        ["train-head", "--sweep", "loss=ce,focal", "--sweep", "sampler=instance"]


def test_every_job_file_parses() -> None:
    files = sorted(JOBS.glob("*.yaml"))
    assert files
    from featurelt.cli import build_parser

    parser = build_parser()
    for f in files:
        _, steps = load_job(f)
        assert steps and all(argv[0] for argv in steps)
        for argv in steps:  # every step is a valid featurelt command line (parsed, not run)
            assert parser.parse_args(argv).func, (f.name, argv)


def test_bad_job_names_the_step(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps:\n  - ingest: {builtin: digits}\n  - [extract, pixels]\n")
    with pytest.raises(ValueError, match="step 2 must be one mapping"):
        load_job(bad)
    assert main(["job", str(tmp_path / "missing.yaml")]) == 1


def test_job_runs_the_commands(digits_store, tmp_path, capsys) -> None:
    root = tmp_path / "store"
    shutil.copytree(digits_store, root)
    job = tmp_path / "job.yaml"
    job.write_text("steps:\n  - extract: {encoder: pixels, no-progress: true}\n"
                   "  - train-head: {features: pixels, loss: balanced-softmax, epochs: 2}\n"
                   "  - train-head: {features: nope}\n  - tag: {name: never}\n")
    before = Store(root).version
    assert main(["job", str(job), "--store", str(root)]) == 1  # step 3 fails, step 4 never runs
    store = Store(root)
    assert store.count("runs") == 1 and store.has_table("emb_pixels")
    assert store.version == before + 2
    assert "[job step 3/4] failed" in capsys.readouterr().out
    assert store.tags() == []


def test_bad_yaml_is_one_line_naming_the_file(tmp_path, capsys) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("steps:\n  - ingest: {builtin: digits\n  - extract: pixels\n")
    assert main(["job", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"featurelt job: error: job file {bad} is not valid YAML at line") and "Traceback" not in err
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("steps: [caf\xe9]\n".encode("latin-1"))
    assert main(["job", str(latin)]) == 1
    assert f"job file {latin} is not UTF-8 text" in capsys.readouterr().err


def test_job_set_names_are_names_extract_writes() -> None:
    """Every embedding / text set a job step reads (--features, --text-set) is written in the form extract names
    sets (``clip:ViT-B-32`` -> ``clip_vit_b_32``), so a job file never refers to a set that cannot exist."""
    from featurelt.cli import build_parser
    from featurelt.encoders.base import sanitize

    parser = build_parser()
    seen = 0
    for f in sorted(JOBS.glob("*.yaml")):
        for argv in load_job(f)[1]:
            args = parser.parse_args(argv)
            for attr in ("features", "text_set"):
                value = getattr(args, attr, None)
                names = value if isinstance(value, (list, tuple)) else ([] if value is None else [value])
                for name in (n.strip() for v in names for n in str(v).split(",")):
                    seen += 1
                    assert name == sanitize(name), (f.name, argv[0], attr, name, sanitize(name))
    assert seen > 10
