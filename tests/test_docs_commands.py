"""Every ``ftikd ...`` command shown in the README and docs/ parses with the real CLI.

A renamed flag or subcommand then fails here instead of failing a reader who copies the line.
Parsing only: no command is run, so paths in the examples need not exist. Placeholders are read
as a reader would fill them: ``...`` (more flags) is dropped, a shell variable ``$x`` stands for a
number; a synopsis line (``A|B`` alternatives) is not a command and is left out.
"""

import shlex
from pathlib import Path

import pytest

from ftikd.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def shown_commands(path: Path) -> list[str]:
    """``ftikd`` command lines inside the file's fenced code blocks, continuation lines joined."""
    commands, fenced, pending = [], False, ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("```"):
            fenced, pending = not fenced, ""
            continue
        if not fenced:
            continue
        line = pending + line
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        for part in line.split("&&"):
            words = [w for w in shlex.split(part, comments=True) if w != "..."]
            if words and words[0] == "ftikd" and not any("|" in w for w in words):
                commands.append(shlex.join("1" if w.startswith("$") else w for w in words))
    return commands


CASES = [(path, cmd) for path in DOCS for cmd in shown_commands(path)]


def test_the_docs_show_commands():
    assert len(CASES) >= 15, CASES


@pytest.mark.parametrize("path,command", CASES, ids=[f"{p.name}:{c[:40]}" for p, c in CASES])
def test_documented_command_parses(path, command):
    args = shlex.split(command)[1:]
    try:
        build_parser().parse_args(args)
    except SystemExit as exc:
        if "--help" in args or "-h" in args:
            assert exc.code == 0
            return
        pytest.fail(f"{path.name}: `{command}` does not parse (exit {exc.code})")
