"""The README documents only commands and flags that parse."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from conftest import ROOT

from qwenvl_tune import commands

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _command_lines(text: str) -> list[str]:
    """Every `qwenvl-tune ...` command in fenced code blocks, continuation lines joined, comments dropped."""
    lines, blocks, current = [], [], None
    for raw in text.splitlines():
        if raw.startswith("```"):
            if current is None:
                current = [] if raw.strip() in ("```", "```bash", "```sh", "```console") else None
                if current is None:
                    current = ["<skip>"]
            else:
                if current[:1] != ["<skip>"]:
                    blocks.append("\n".join(current) + "\n")
                current = None
        elif current is not None:
            current.append(raw)
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            m = re.search(r"(?:^|\s)(?:qwenvl-tune|-m qwenvl_tune\.cli)\s+(.*)$", line)
            if m and not line.startswith(("pip", "#")):
                lines.append(m.group(1))
    return lines


def _argv(line: str) -> list[str]:
    line = line.replace("[", " ").replace("]", " ").replace("...", " ")
    line = re.sub(r"<[^>]+>", "NAME", line)
    return shlex.split(line)


def _all_lines() -> list[tuple[str, str]]:
    return [(doc.name, line) for doc in DOCS for line in _command_lines(doc.read_text(encoding="utf-8"))]


def test_the_readme_has_commands_to_check():
    found = {line.split()[0] for _, line in _all_lines()}
    assert {"train", "evaluate", "predict", "export", "serve", "check"} <= found, found


@pytest.mark.parametrize("doc,line", _all_lines(), ids=lambda x: x if isinstance(x, str) and len(x) < 60 else None)
def test_every_documented_command_parses(doc, line):
    parser = commands.parser("test")
    argv = _argv(line)
    try:
        args, unknown = parser.parse_known_args(argv)
    except SystemExit as e:  # argparse's way to say no
        pytest.fail(f"{doc}: `qwenvl-tune {line}` does not parse (exit {e.code})")
    assert not unknown, f"{doc}: `qwenvl-tune {line}`: unknown {unknown}"


def test_every_flag_mentioned_anywhere_exists():
    parser = commands.parser("test")
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    known = {o for p in sub.choices.values() for a in p._actions for o in a.option_strings}
    known |= {o for a in parser._actions for o in a.option_strings}
    missing = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        # dotted config flags anywhere, and the flags of inline code that starts with one
        flags = re.findall(r"(?<![\w-])--[a-z_]+\.[a-z_]+", text)
        flags += [f for span in re.findall(r"`(--[^`]+)`", text) for f in re.findall(r"(?<![\w-])--[a-z][\w.-]*[a-z0-9]", span)]
        missing += [f"{doc.name}: {f}" for f in flags if f not in known]
    assert not missing, missing
