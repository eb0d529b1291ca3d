"""Every Python code block of the README and of the documentation runs, so that no example
can rot. A page's blocks run in order in one namespace (as a reader would paste them), in a
temporary working directory; they use the packaged models, so this tier is marked slow."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import pytest

ROOT = Path(__file__).parents[2]

#: Pages whose blocks a dedicated test runs (and checks further).
ELSEWHERE = {"docs/contributing.md": "tests/unit/test_contributing.py"}

PAGES = sorted(
    str(p.relative_to(ROOT))
    for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    if "```python" in p.read_text(encoding="utf-8")
)

pytestmark = pytest.mark.slow


def blocks(page: str) -> list[str]:
    text = (ROOT / page).read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_every_page_with_python_is_run_here_or_by_its_own_test():
    assert "README.md" in PAGES and "docs/index.md" in PAGES and "docs/api.md" in PAGES
    for page, test in ELSEWHERE.items():
        assert page in PAGES and (ROOT / test).is_file(), page
        assert Path(page).name in (ROOT / test).read_text(encoding="utf-8"), test


@pytest.mark.parametrize("page", [p for p in PAGES if p not in ELSEWHERE])
def test_the_python_blocks_of_the_page_run(page, tmp_path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)  # an example that saves writes here
    namespace: dict[str, object] = {"__name__": "__example__"}
    found = blocks(page)
    assert found, page
    for number, block in enumerate(found, 1):
        code = compile(block, f"{page} (python block {number})", "exec")
        exec(code, namespace)
