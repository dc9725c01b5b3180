"""The Python examples of the documentation pages run as written: each page's code blocks,
in order, in one namespace (as a reader pastes them into a notebook)."""

import re
from pathlib import Path

import pytest


DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = ["backbone.md"]


@pytest.mark.parametrize("page", PAGES)
def test_examples_run(page, capsys):
    text = (DOCS / page).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, f"{page} has no Python example"
    namespace: dict = {"__name__": f"docs_{page}"}
    for block in blocks:
        exec(compile(block, f"{page}", "exec"), namespace)
    capsys.readouterr()
