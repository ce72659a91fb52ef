"""The documents a newcomer reads stay true to the tree: the README is short and its links
resolve, and the layout page names every module of the package."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "omniquant"


def _links(page: Path) -> list[str]:
    """The relative link targets of a Markdown page (no anchors, no URLs)."""
    targets = re.findall(r"\]\(([^)\s]+)\)", page.read_text())
    return [t.split("#")[0] for t in targets if "://" not in t and not t.startswith("#")]


def test_the_readme_is_for_users_and_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300
    headings = [line for line in lines if line.startswith("## ")]
    assert headings[:4] == [
        "## Install",
        "## Quantize",
        "## Run the result",
        "## Supported model families",
    ]


def test_every_relative_link_of_the_readme_and_docs_resolves():
    pages = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *(ROOT / "docs").glob("*.md")]
    broken = [
        f"{page.relative_to(ROOT)} -> {target}"
        for page in pages
        for target in _links(page)
        if target and not (page.parent / target).exists()
    ]
    assert not broken


def test_the_layout_page_names_every_module():
    layout = (ROOT / "docs" / "layout.md").read_text()
    modules = sorted(
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if p.name != "__init__.py" or p.parent == PACKAGE or p.parent.name == "formats"
    )
    missing = [m for m in modules if f"`{m}`" not in layout]
    assert not missing
