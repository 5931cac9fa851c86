"""mkdocs hooks (mkdocs.yml, ``hooks:``): pages that show text kept elsewhere in the repository, as it is.

``<!-- include: PATH -->`` on a line of its own in a page is replaced at build time by the text of PATH (relative to
the repository root); ``<!-- include: PATH#NAME -->`` by the part of it between the lines ``<!-- NAME...`` and
``<!-- /NAME -->``. Links in the included text are rewritten for the page's place in the site: a link to a page under
``docs/`` goes to that page, ``bench/README.md`` to the benchmarks page, ``README.md`` to the home page. The
benchmarks page includes ``bench/README.md`` this way, and the home and getting-started pages the README's families
table and quickstart, so what is added to those files appears on the site without an edit to the pages.

It also lets mkdocstrings read the package's docstrings for the Python API page (below).
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The repository root is the package `alignti` (pyproject's package-dir): mkdocstrings finds it by that name under
# build/api (mkdocs.yml, `paths:`), through a link made when mkdocs loads this file.
API = ROOT / "build" / "api"
API.mkdir(parents=True, exist_ok=True)
if not (API / "alignti").exists():
    (API / "alignti").symlink_to(ROOT, target_is_directory=True)

INCLUDE = re.compile(r"^<!-- include: ([^\s#]+)(?:#([\w-]+))? -->$", re.M)
LINK = re.compile(r"\]\(([^)\s#]+)(#[^)\s]*)?\)")
SITE_PAGES = {"bench/README.md": "benchmarks.md", "README.md": "index.md"}


def _rewrite(text: str, source: str, page: str) -> str:
    """Links of ``text`` (from the repository file ``source``) as seen from the docs page ``page``."""

    def link(m: re.Match) -> str:
        target, anchor = m.group(1), m.group(2) or ""
        if "://" in target or target.startswith("mailto:"):
            return m.group(0)
        path = posixpath.normpath(posixpath.join(posixpath.dirname(source), target))
        site = path[len("docs/"):] if path.startswith("docs/") else SITE_PAGES.get(path)
        if site is None:
            return m.group(0)
        return f"]({posixpath.relpath(site, posixpath.dirname(page) or '.')}{anchor})"

    return LINK.sub(link, text)


def _part(text: str, name: str, source: str) -> str:
    start = re.search(rf"^<!-- {re.escape(name)}\b.*$", text, re.M)
    end = text.find(f"<!-- /{name} -->")
    if start is None or end < 0:
        raise ValueError(f"{source} has no part <!-- {name} ... --> ... <!-- /{name} --> (docs/hooks.py)")
    return text[start.end():end].strip("\n")


def on_page_markdown(markdown: str, page, config, files) -> str:
    def include(m: re.Match) -> str:
        source, name = m.group(1), m.group(2)
        text = (ROOT / source).read_text(encoding="utf-8")
        if name:
            text = _part(text, name, source)
        return _rewrite(text, source, page.file.src_uri)

    return INCLUDE.sub(include, markdown)
