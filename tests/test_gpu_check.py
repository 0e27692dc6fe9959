"""bench/gpu_check.sh, the one prepared GPU script, checked where no GPU is: its bash parses, ``--dry-run`` lists
the five time-boxed steps within 8 minutes, and every command line in it parses: featurelt's through the CLI's
own parser, the bench scripts' options appear in their ``--help``, the pytest step selects existing GPU tests.
(Its COMPARE snippet runs on a CPU store in tests/test_finetuned_encoder.py.)"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _steps() -> dict[str, tuple[int, str]]:
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    steps = {}
    for line in out.splitlines():
        m = re.match(r"step (\w+) budget=(\d+)s: (.*)", line)
        if m:
            steps[m.group(1)] = (int(m.group(2)), m.group(3))
    return steps


def _commands(line: str) -> list[list[str]]:
    """The simple commands of a step's line (split at ``&&`` and ``;`` outside quotes), each as argv."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    out: list[list[str]] = [[]]
    for token in lexer:
        if token in (";", "&&"):
            out.append([])
        else:
            out[-1].append(token)
    return [argv for argv in out if argv]


def test_script_parses_and_dry_run_lists_the_steps_within_8_minutes() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    steps = _steps()
    assert list(steps) == ["setup", "pytest_gpu", "knn", "finetune_bench", "finetune_cli"]
    assert sum(b for b, _ in steps.values()) <= 460 < 8 * 60
    bad = subprocess.run(["bash", str(SCRIPT), "--nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_every_featurelt_command_of_the_script_parses() -> None:
    from featurelt.cli import build_parser

    parsed = []
    for _, line in _steps().values():
        for argv in _commands(line):
            if argv[:3] == ["python3", "-m", "featurelt"]:
                args = build_parser().parse_args(argv[3:])  # exits (SystemExit) on an unknown option or choice
                parsed.append(args.command)
    assert parsed == ["ingest", "make-lt", "finetune", "extract"]
    finetune = next(a for _, l in _steps().values() for a in _commands(l) if "finetune" in a[3:6])
    args = build_parser().parse_args(finetune[3:])
    assert (args.amp, args.device, args.export) == ("bf16", "cuda", True)


def test_bench_options_exist_and_the_gpu_tests_are_selected() -> None:
    steps = _steps()
    for name, script in (("knn", "knn.py"), ("finetune_bench", "finetune.py")):
        (argv,) = _commands(steps[name][1])
        assert argv[:2] == ["python3", f"bench/{script}"]
        help_ = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--help"], capture_output=True,
                               text=True, cwd=ROOT, check=True).stdout
        for opt in (a for a in argv[2:] if a.startswith("--")):
            assert opt in help_, f"{script} has no option {opt}"
    assert "gpu" in steps["finetune_bench"][1].split("--sections ")[1].split()[0].split(",")
    (argv,) = _commands(steps["pytest_gpu"][1])
    files = [a for a in argv if a.startswith("tests/")]
    assert files and all((ROOT / f).is_file() for f in files)
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                          *files], capture_output=True, text=True, cwd=ROOT).stdout
    selected = [line for line in out.splitlines() if "::" in line]
    assert any("test_extract_finetuned_on_cuda_matches_the_cpu_export" in s for s in selected)
    assert any("test_cuda_matches_cpu" in s for s in selected) and len(selected) >= 10
