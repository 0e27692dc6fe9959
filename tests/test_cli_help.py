"""Help texts and README say only true things: every `featurelt CMD --option` they show exists, and every
repository file they name is there. Commands are discovered from the CLI's parser, not listed by hand."""
from __future__ import annotations

import argparse
import glob
import re
from pathlib import Path

import pytest

from featurelt.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]

# Subcommands another branch adds that this one does not have yet: a mention of one is skipped (and only
# those). Remove an entry once its command is merged.
ALLOWED_MISSING_COMMANDS = {
}

# `featurelt` followed by its words, up to what ends a shell command in prose or code
# (the words are captured in a lookahead, so that a mention inside another's words is found too)
MENTION = re.compile(r"(?<![\w./-])featurelt(?=([ \t][^;|&`'\"()\n]*))")
# repository paths: a top-level folder of the repo, then a file name or glob
REPO_PATH = re.compile(r"(?<![\w/.~-])((?:jobs|schemas|bench|tests|featurelt)/[\w.*-]*[\w*])")
GLOBAL_WITH_VALUE = {"--store"}
GLOBAL_FLAGS = {"--help", "-h", "--version"}


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """COMMAND -> its parser, from the CLI's own subparsers action."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


PARSER = build_parser()
COMMANDS = subparsers(PARSER)


def options_of(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings}


def mention_words(words: str) -> list[str]:
    """The words of one mention: up to the first that ends a sentence or clause (``.``, ``,``, ``:``)."""
    out = []
    for w in words.split():
        if w == "featurelt":                     # the next mention
            break
        if w[-1] in ".,:" and not w.startswith(".") and "/" not in w[-2:]:
            out.append(w[:-1])
            break
        out.append(w)
    return [w for w in out if w]


def check_text(text: str, where: str, *, code: bool = False) -> list[str]:
    """Problems in ``text``: `featurelt CMD --opt` mentions whose command or option does not exist, and
    repository paths (or globs; an upper-case word such as FILE stands for any name) that match no file.
    In prose (``code=False``) a mention names a command only when an option follows it
    ("the same featurelt command typed by hand" is English, not a command)."""
    problems = []
    for m in MENTION.finditer(text):
        words = mention_words(m.group(1))
        i = 0
        while i < len(words) and words[i].startswith("-"):       # global options before the command
            if words[i] in GLOBAL_WITH_VALUE:
                i += 2
            elif words[i] in GLOBAL_FLAGS:
                i += 1
            else:
                problems.append(f"{where}: 'featurelt {' '.join(words)}': unknown global option {words[i]}")
                i = len(words) + 1
        if i >= len(words):
            continue
        cmd = words[i]
        if cmd.isupper() or not re.fullmatch(r"[a-z][a-z0-9-]*", cmd):
            continue                                              # a placeholder: featurelt COMMAND --help
        if cmd not in COMMANDS:
            if cmd not in ALLOWED_MISSING_COMMANDS and (code or any(w.startswith("--") for w in words[i + 1:])):
                problems.append(f"{where}: 'featurelt {' '.join(words)}': no command {cmd!r}")
            continue
        known = options_of(COMMANDS[cmd])
        for w in words[i + 1:]:
            opt = re.match(r"--?[A-Za-z][\w-]*", w)
            if w.startswith("-") and opt and opt.group(0) not in known:
                problems.append(f"{where}: 'featurelt {' '.join(words)}': {cmd} has no option {opt.group(0)}")
    for m in REPO_PATH.finditer(text):
        path = m.group(1).rstrip(".")
        if not glob.glob(str(ROOT / re.sub(r"\b[A-Z][A-Z_]+\b", "*", path))):
            problems.append(f"{where}: {path} does not exist in the repository")
    return problems


def help_text(argv: list[str], capsys, monkeypatch) -> str:
    """What `featurelt ARGV --help` prints, after the usage lines, on a terminal too wide to wrap lines
    (argparse wraps anywhere, also inside an example command or at the hyphen of an option)."""
    monkeypatch.setenv("COLUMNS", "100000")
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: featurelt")
    return out.split("\n\n", 1)[1]


def test_every_command_is_discovered() -> None:
    assert {"ingest", "extract", "embeddings", "encoders", "train-head", "runs", "eval", "report", "demo", "sql",
            "job"} <= set(COMMANDS)


@pytest.mark.parametrize("command", [None, *sorted(COMMANDS)])
def test_help_mentions_only_existing_commands_options_and_files(command: str | None, capsys, monkeypatch) -> None:
    text = help_text([command] if command else [], capsys, monkeypatch)
    assert check_text(text, f"featurelt {command or ''} --help") == []


def readme_code() -> list[tuple[int, str]]:
    """(line number, text) of README.md's fenced code blocks and of its inline code spans."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    out, fence = [], None
    for n, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            fence = None if fence is not None else n
            continue
        if fence is not None:
            out.append((n, line))
        else:
            out += [(n, span) for span in re.findall(r"`([^`]+)`", line)]
    return out


def test_readme_code_mentions_only_existing_commands_options_and_files() -> None:
    code = readme_code()
    assert sum("featurelt " in t for _, t in code) > 20      # the README's tour and examples were read
    problems = [p for n, t in code for p in check_text(t, f"README.md:{n}", code=True)]
    assert problems == []


def test_the_checker_finds_what_was_wrong() -> None:
    """The mistakes issue 19 found would be reported."""
    assert check_text("List the encoders `featurelt extract --encoder NAME` accepts", "x") == [
        "x: 'featurelt extract --encoder NAME': extract has no option --encoder"]
    assert check_text("YAML job file, e.g. jobs/demo-digits.yaml", "x") == [
        "x: jobs/demo-digits.yaml does not exist in the repository"]
    assert check_text("featurelt frobnicate --x", "x") == ["x: 'featurelt frobnicate --x': no command 'frobnicate'"]
    assert check_text("featurelt frobnicate", "x", code=True) == ["x: 'featurelt frobnicate': no command 'frobnicate'"]
    assert check_text("each run as the same featurelt command typed by hand", "x") == []
    assert check_text("see featurelt runs, then featurelt eval --run ID.", "x") == []
    assert check_text("featurelt runs --limit 3, featurelt runs --lmit 3.", "x") == [
        "x: 'featurelt runs --lmit 3': runs has no option --lmit"]
    assert check_text("featurelt finetune --adapt lora --lora-rank 4", "x") == []
    assert check_text("featurelt finetune --adapt lora --lora-rnak 4", "x") == [
        "x: 'featurelt finetune --adapt lora --lora-rnak 4': finetune has no option --lora-rnak"]
    assert check_text("featurelt --store s sql --format csv; featurelt COMMAND --help; jobs/*.yaml", "x") == []
    assert check_text("featurelt --stor s sql", "x") == ["x: 'featurelt --stor s sql': unknown global option --stor"]


def test_demo_summary_lines_end_between_words() -> None:
    from featurelt.demo import summary_line

    line = ("wrote /tmp/demo/report/index.html (figures and report.json in /tmp/demo/report) and the comparison "
            "table of the sweep")
    for width in (110, 60, 41, 40, 25):
        got = summary_line(line, width)
        assert len(got) <= width and got.endswith(" …"), (width, got)
        kept = got[:-2]
        assert line.startswith(kept) and line[len(kept)] == " ", (width, got)   # whole words only
    assert summary_line(line, 40) == "wrote /tmp/demo/report/index.html …"
    assert summary_line("short  line\n", 110) == "short line"
    assert summary_line("x" * 30, 10) == "xxxxxxxx …"                           # one long word: cut inside it


def test_readme_help_and_messages_agree_on_names(capsys, monkeypatch) -> None:
    """One name for one thing: DINOv2 set names are the default set names of dinov2:<size>, weights come
    with `hf download` (huggingface-cli is gone), the Debian package is dataset-fashion-mnist."""
    from featurelt.demo import choose_dataset
    from featurelt.encoders.dinov2 import DINOV2_CONFIGS, _how, dinov2_products

    texts = {"README.md": (ROOT / "README.md").read_text(encoding="utf-8")}
    for command in [None, *sorted(COMMANDS)]:
        texts[f"featurelt {command or ''} --help"] = help_text([command] if command else [], capsys, monkeypatch)
    texts["dinov2 missing-weights message"] = _how("small")
    texts["demo dataset message"] = choose_dataset("auto", fashion_dir=ROOT / "no-such-dir")[1]
    with pytest.raises(FileNotFoundError) as exc:
        choose_dataset("fashion-mnist", fashion_dir=ROOT / "no-such-dir")
    texts["demo --dataset fashion-mnist error"] = str(exc.value)

    set_names = {f"dinov2_{size}_{p}" for size in (*DINOV2_CONFIGS, "tiny") for p in dinov2_products(size)}
    packages = re.compile(r"(?:Debian package|apt(?:-get)? install)\s+(?:files\s+)?(?:of\s+)?([\w.-]+)")
    seen_hf = seen_package = 0
    for where, text in texts.items():
        assert "huggingface-cli" not in text, where
        for name in re.findall(r"\bdinov2_\w+", text):
            assert name in set_names, (where, name, sorted(set_names))
        for pkg in packages.findall(text):
            assert pkg == "dataset-fashion-mnist", (where, pkg)
            seen_package += 1
        seen_hf += text.count("hf download facebook/dinov2-")
    assert seen_hf >= 3 and seen_package >= 4   # README, extract / encoders --help and the error all say it
