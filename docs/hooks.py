"""mkdocs hooks (mkdocs.yml, ``hooks:``): pages that show a file kept elsewhere in the repository, as it is.

``<!-- include: PATH -->`` on a line of its own in a page is replaced at build time by the text of PATH (relative to
the repository root), with its links rewritten for the page's place in the site: ``../docs/X.md`` -> ``X.md`` and
``../README.md`` -> ``index.md`` (relative to ``docs/``). The benchmarks page includes ``bench/README.md`` this way, so
sections added to that file appear on the site without an edit to the page.

It also lets mkdocstrings read the package's docstrings for the Python API page (below).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The repository root is the package `alignti` (pyproject's package-dir): mkdocstrings finds it by that name under
# build/api (mkdocs.yml, `paths:`), through a link made when mkdocs loads this file.
API = ROOT / "build" / "api"
API.mkdir(parents=True, exist_ok=True)
if not (API / "alignti").exists():
    (API / "alignti").symlink_to(ROOT, target_is_directory=True)
INCLUDE = re.compile(r"^<!-- include: (\S+) -->$", re.M)


def _rewrite(text: str, page_depth: int) -> str:
    up = "../" * page_depth
    text = text.replace("](../docs/", f"]({up}")
    return text.replace("](../README.md", f"]({up}index.md")


def on_page_markdown(markdown: str, page, config, files) -> str:
    depth = page.file.src_uri.count("/")

    def include(m: re.Match) -> str:
        return _rewrite((ROOT / m.group(1)).read_text(encoding="utf-8"), depth)

    return INCLUDE.sub(include, markdown)
