"""The package's shape: imports only point down the layers, and each concept has one home."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

PKG = ROOT / "src" / "qwenvl_tune"

# Lower layers never import higher ones; training and inference (same layer) never import each other.
LAYERS = {"errors": 0, "config": 1, "rundir": 2, "data": 3, "modeling": 4, "evaluation": 5, "training": 6,
          "inference": 6, "api": 7, "demo": 8, "commands": 8, "cli": 9, "__init__": 10}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, at module level or inside functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                if not node.module:  # from . import x
                    out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
                    continue
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
    return out


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "qwenvl_tune" or len(parts) < 2:
        return None
    return parts[1]


def test_imports_point_down_the_layers():
    files = sorted(PKG.rglob("*.py"))
    assert len(files) > 20
    wrong = []
    for f in files:
        own = _layer(_module_name(f)) or "__init__"
        assert own in LAYERS, f"{f}: no layer for '{own}' in LAYERS"
        for line, mod in _imports(f):
            other = _layer(mod)
            if other is None or other == own:
                continue
            assert other in LAYERS, f"{f}:{line}: imports unknown part '{other}'"
            if LAYERS[other] > LAYERS[own] or (LAYERS[other] == LAYERS[own] and other != own):
                wrong.append(f"{f.relative_to(PKG)}:{line} ({own}) imports {mod} ({other})")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_the_walker_sees_function_local_and_relative_imports(tmp_path):
    # the test above is only as good as its parser: a local upward import must be found
    f = PKG / "data" / "records.py"
    found = dict((m, ln) for ln, m in _imports(f))
    assert "qwenvl_tune.errors" in found
    src = tmp_path / "x.py"
    src.write_text("def f():\n    from ..training.run import train\n")
    tree = ast.parse(src.read_text())
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))
    assert node.level == 2 and node.module == "training.run"


def test_config_validation_and_argument_parsing_import_nothing_heavy():
    code = ("import sys\n"
            "from qwenvl_tune.config import build_config\n"
            "build_config(None, {'train.monitor': 'val/ted_accuracy', 'model.method': 'qlora'})\n"
            "from qwenvl_tune import commands\n"
            "commands.parser().parse_args(['evaluate', '--run', 'r', '--metrics.list_matching', 'unordered'])\n"
            "heavy = [m for m in ('torch', 'transformers', 'rapidfuzz', 'edist', 'pytorch_lightning', 'peft') "
            "if m in sys.modules]\n"
            "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


RUN_FOLDER_NAMES = ("config.yaml", "overrides.yaml", "answer_schema.json", "data_summary.json", "data_problems.jsonl",
                    "trainer_state.ckpt", "COMPLETE", "qwenvl_tune_export.json")


def _string_literals(tree: ast.AST) -> list[tuple[int, str]]:
    docstrings = {id(n.value) for n in ast.walk(tree)
                  if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_only_rundir_spells_run_folder_file_names():
    found = []
    for f in sorted(PKG.rglob("*.py")):
        if f.name == "rundir.py":
            continue
        for line, s in _string_literals(ast.parse(f.read_text(encoding="utf-8"))):
            found += [f"{f.relative_to(PKG)}:{line}: {name!r}" for name in RUN_FOLDER_NAMES if name in s]
    assert not found, "run-folder file names outside rundir.py:\n" + "\n".join(found)


@pytest.mark.parametrize("folder", ["training"])
def test_no_file_over_300_lines(folder):
    long = [(f.name, n) for f in (PKG / folder).glob("*.py")
            if (n := len(f.read_text(encoding="utf-8").splitlines())) > 300]
    assert not long, long
