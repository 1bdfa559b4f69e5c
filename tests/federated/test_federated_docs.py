"""The ```python examples of docs/federated.md run as written (```py blocks, e.g. Flower apps, are shown only)."""

from __future__ import annotations

import pathlib
import re

import pytest

PAGE = pathlib.Path(__file__).resolve().parents[2] / "docs" / "federated.md"
BLOCKS = re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)


def test_page_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_federated_doc_block_runs(index, capsys):
    exec(compile(BLOCKS[index], f"docs/federated.md block {index}", "exec"), {})
