"""The Python examples in the user docs run as written."""

from __future__ import annotations

import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
PAGES = ["clipping.md", "controllers.md", "migrating-from-opacus.md"]  # federated.md and secure_mode.md: tests/federated, test_noise
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
