"""The user docs stay true: their Python examples run, their CLI outputs match, the API reference is current."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [  # federated.md and secure_mode.md: tests/federated, test_noise
    "getting-started.md",
    "clipping.md",
    "controllers.md",
    "accounting.md",
    "migrating-from-opacus.md",
]
BLOCKS = [
    (page, i, block)
    for page in PAGES
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S))
]


@pytest.mark.parametrize("page, index, block", BLOCKS, ids=[f"{p}-{i}" for p, i, _ in BLOCKS])
def test_doc_python_block_runs(page, index, block):
    exec(compile(block, f"docs/{page} block {index}", "exec"), {})


def test_every_page_has_examples():
    assert {p for p, _, _ in BLOCKS} == set(PAGES)


# -- `dpclip budget` sessions in docs/accounting.md --------------------------------------------
def _console_commands(page: str) -> list[tuple[str, str]]:
    """``[(command, expected output), ...]`` from the page's ```console blocks, in order."""
    out: list[tuple[str, str]] = []
    for block in re.findall(r"```console\n(.*?)```", (DOCS / page).read_text(), flags=re.S):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            if not lines[i].startswith("$ "):
                raise AssertionError(f"docs/{page}: output without a command: {lines[i]!r}")
            command = lines[i][2:]
            while command.endswith("\\"):
                i += 1
                command = command[:-1] + lines[i].strip()
            i += 1
            output = []
            while i < len(lines) and not lines[i].startswith("$ "):
                output.append(lines[i])
                i += 1
            out.append((command, "\n".join(output)))
    return out


def _same_json(got: object, want: object) -> bool:
    if isinstance(want, float) or isinstance(got, float):
        return isinstance(got, (int, float)) and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(_same_json(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(_same_json, got, want))
    return got == want


def test_accounting_budget_cli_outputs_are_real(tmp_path, monkeypatch, capsys):
    """Every `$ dpclip budget ...` on the page prints what the page shows (`$ cat F` writes F)."""
    from dpclip.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    commands = _console_commands("accounting.md")
    ran = 0
    for command, expected in commands:
        argv = shlex.split(command)
        if argv[:1] == ["cat"]:
            (tmp_path / argv[1]).write_text(expected + "\n", encoding="utf-8")
            continue
        assert argv[:2] == ["dpclip", "budget"], f"docs/accounting.md: unexpected command {command!r}"
        capsys.readouterr()
        assert main(argv[1:]) == 0, command
        got = capsys.readouterr().out.rstrip("\n")
        if "--json" in argv:
            assert _same_json(json.loads(got), json.loads(expected)), f"{command}\n{got}"
        else:
            assert got == expected, f"{command}: the page shows\n{expected}\nthe command prints\n{got}"
        ran += 1
    assert ran >= 5


# -- docs/api.md is generated from the code -----------------------------------------------------
def _gen_api():
    spec = importlib.util.spec_from_file_location("gen_api", DOCS / "gen_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_reference_is_current():
    """docs/api.md is what docs/gen_api.py renders now: rerun it after changing a public name or docstring."""
    rendered = _gen_api().render()
    committed = (DOCS / "api.md").read_text(encoding="utf-8")
    assert committed == rendered, "docs/api.md is stale: run .venv/bin/python docs/gen_api.py"


def test_api_reference_covers_every_public_name():
    import importlib

    text = (DOCS / "api.md").read_text(encoding="utf-8")
    for module_name, _ in _gen_api().MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            assert f"### `{module_name}.{name}`" in text, f"{module_name}.{name} is missing from docs/api.md"
