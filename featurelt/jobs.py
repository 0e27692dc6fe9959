"""Job specs: a YAML file that lists featurelt commands to run in order against one store.

Large extractions and whole experiments are easier to review, rerun and schedule as a file::

    store: s3://bucket/imagenet-lt-store     # optional; the CLI's --store wins when given
    steps:
      - ingest: {path: /data/ImageNet_LT_train.txt, root: /data/imagenet, format: split-list, split: train}
      - extract: {encoder: "clip:ViT-B-32", pretrained: laion2b_s34b_b79k, checkpoint: /weights/vit_b32.bin,
                  engine: ray, batch-size: 256}
      - train-head: {features: clip_vit_b_32, loss: balanced-softmax}

Each step is ``{command: {option: value}}``: keys become ``--option value`` (``true`` -> a bare flag,
a list -> the option repeated), except the command's positional arguments, named in
:data:`POSITIONALS`. Steps run through :func:`featurelt.cli.main`, so a job does exactly what the same
commands typed by hand would do; it stops at the first step that fails.
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from featurelt.config import read_yaml

# command -> option keys that are positional arguments, in order
POSITIONALS: dict[str, tuple[str, ...]] = {
    "ingest": ("path",),
    "extract": ("encoder",),
    "sql": ("query",),
    "tag": ("name",),
    "versions": ("table",),
}


def step_argv(command: str, options: dict[str, Any] | None) -> list[str]:
    """``("extract", {"encoder": "pixels", "batch-size": 64})`` -> ``["extract", "pixels", "--batch-size", "64"]``."""
    options = dict(options or {})
    argv = [command]
    for key in POSITIONALS.get(command, ()):
        if key in options:
            argv.append(str(options.pop(key)))
    for key, value in options.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            for v in value:
                argv += [flag, str(v)]
        else:
            argv += [flag, str(value)]
    return argv


def load_job(path: str | Path) -> tuple[str | None, list[list[str]]]:
    """Parse a job file into ``(store, [argv, ...])``; errors name the file and the step."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"job file {path} does not exist")
    spec = read_yaml(path, "job file")
    if not isinstance(spec, dict) or not isinstance(spec.get("steps"), list) or not spec["steps"]:
        raise ValueError(f"{path}: a job needs a non-empty 'steps' list")
    steps = []
    for i, step in enumerate(spec["steps"], 1):
        if not isinstance(step, dict) or len(step) != 1:
            raise ValueError(f"{path}: step {i} must be one mapping {{command: {{options}}}}, got {step!r}")
        (command, options), = step.items()
        if options is not None and not isinstance(options, dict):
            raise ValueError(f"{path}: step {i} ({command}): options must be a mapping, got {options!r}")
        steps.append(step_argv(str(command), options))
    return spec.get("store"), steps


def run_job(path: str | Path, *, store: str | None = None, dry_run: bool = False) -> int:
    """Run every step of a job file; returns the first non-zero exit status (0 when all succeed)."""
    from featurelt.cli import main

    job_store, steps = load_job(path)
    root = store or job_store
    for i, argv in enumerate(steps, 1):
        full = (["--store", root] if root else []) + argv
        print(f"[job step {i}/{len(steps)}] featurelt {shlex.join(full)}", flush=True)
        if dry_run:
            continue
        status = main(full)
        if status:
            print(f"[job step {i}/{len(steps)}] failed with exit status {status}; later steps not run")
            return status
    return 0
