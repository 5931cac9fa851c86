"""The house is one-way: alignti's own imports form no circle, and nothing imports a layer above its own.

Layers, bottom to top (docs/reference/layout.md): ``common/`` (formats, sources, losses, adapters) < the stages
(``teacher_dump/``, ``student_train/``, and the stage folders planned for rollouts and student construction) <
the top (``cli.py``, ``__main__.py``, ``demo/``, ``workflows/``). Stages do not import each other: what two stages
share lives in ``common/``; what chains stages (rounds, the quickstart) lives on top.

Imports are read with ``ast`` (no module is imported), at any depth: an import hidden inside a function still
ties two files together.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = "alignti"
NOT_PACKAGE = {"tests", "bench", "build", "docs"}

BOTTOM, STAGE, TOP = 0, 1, 2
LAYERS = {
    "common": BOTTOM,
    "teacher_dump": STAGE, "student_train": STAGE,
    "student_rollout": STAGE, "student_build": STAGE,  # planned: rollouts (issue 19), make-student (issue 22)
    "cli": TOP, "__main__": TOP, "demo": TOP, "workflows": TOP,  # workflows/: rounds (issue 19)
    "__init__": TOP,  # the package's lazy API (importlib by name: no static import)
}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PKG, *parts])


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    """alignti's modules by dotted name (the repository root is the package)."""
    mods = {}
    for p in sorted(root.rglob("*.py")):
        top = p.relative_to(root).parts[0]
        if top in NOT_PACKAGE or top.startswith("."):
            continue
        mods[_module_name(p, root)] = p
    return mods


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the alignti modules it imports (``from pkg import mod`` counts as importing ``pkg.mod``)."""

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for m, path in mods.items():
        base = m if path.name == "__init__.py" else m.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = base
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    mod = anchor + ("." + node.module if node.module else "")
                else:
                    mod = node.module or ""
                # a name that is itself a module (``from . import parallel``) is that module, else the module itself
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names]
            else:
                continue
            for t in targets:
                r = resolve(t) if t.split(".")[0] == PKG else None
                if r and r != m and not (mods[r].name == "__init__.py" and m.startswith(r + ".")):
                    deps.add(r)
        graph[m] = deps
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_import_circles():
    mods = package_modules()
    found = circles(import_graph(mods))
    assert not found, "import circles (each file imports the next, round to the first): " + "; ".join(
        " <-> ".join(str(mods[m].relative_to(ROOT)) for m in c) for c in found)


def test_every_folder_has_a_layer():
    """A new top-level folder or module gets its place in LAYERS (and docs/reference/layout.md) before it lands."""
    unknown = sorted({_area(m) for m in package_modules()} - set(LAYERS))
    assert not unknown, f"{unknown}: add each to LAYERS in tests/test_layering.py and to docs/reference/layout.md"


def against_the_order(mods: dict[str, Path], root: Path = ROOT) -> list[str]:
    """"FILE imports FILE" for each import of a higher layer, or of another stage."""
    bad = []
    for m, deps in import_graph(mods).items():
        for d in sorted(deps):
            a, b = _area(m), _area(d)
            if a == b or LAYERS[a] == TOP:
                continue
            if LAYERS[b] > LAYERS[a] or (LAYERS[a] == STAGE and LAYERS[b] == STAGE):
                bad.append(f"{mods[m].relative_to(root)} imports {mods[d].relative_to(root)}")
    return bad


def test_nothing_imports_upward_or_across_stages():
    bad = against_the_order(package_modules())
    assert not bad, "imports against the one-way order (common < stages < cli/demo/workflows): " + "; ".join(bad)


def test_the_checks_catch_what_they_claim(tmp_path):
    """The graph reader sees relative, absolute and function-level imports; a planted circle and an upward import
    are found and named."""
    (tmp_path / "common").mkdir()
    (tmp_path / "student_train").mkdir()
    for d in ("common", "student_train"):
        (tmp_path / d / "__init__.py").write_text("")
    (tmp_path / "common" / "a.py").write_text("from .b import x\n")
    (tmp_path / "common" / "b.py").write_text("def f():\n    from alignti.common import a\n")
    (tmp_path / "common" / "c.py").write_text("from alignti.student_train.t import y\n")
    (tmp_path / "student_train" / "t.py").write_text("from alignti.common import c\nfrom . import u\n")
    (tmp_path / "student_train" / "u.py").write_text("")
    mods = package_modules(tmp_path)
    graph = import_graph(mods)
    assert graph["alignti.common.a"] == {"alignti.common.b"}
    assert graph["alignti.common.b"] == {"alignti.common.a"}
    assert graph["alignti.student_train.t"] == {"alignti.common.c", "alignti.student_train.u"}
    assert circles(graph) == [["alignti.common.a", "alignti.common.b"],
                              ["alignti.common.c", "alignti.student_train.t"]]
    assert against_the_order(mods, tmp_path) == ["common/c.py imports student_train/t.py"]
    (tmp_path / "teacher_dump").mkdir()
    (tmp_path / "teacher_dump" / "d.py").write_text("import alignti.student_train.u\n")
    assert "teacher_dump/d.py imports student_train/u.py" in against_the_order(package_modules(tmp_path), tmp_path)
