"""The documentation cannot rot: its runnable shell blocks run, its command reference is the CLI's, its pages speak
of the product.

* Every shell block a page marks runnable (``<!-- runnable -->`` on the line before the fence; docs/contributing.md)
  runs here, the page's blocks in order in one temporary folder, on the session's tiny demo kit: a guide whose
  command or option drifts from the CLI fails with the page, the block's line and the command's own error.
  ``alignti`` commands run in this process (typer's CliRunner: no interpreter start per command), every other
  command under bash in the same folder. ``alignti make-demo DIR`` (the default family, the reader's first step) is
  served by a copy of the session kit (tests/conftest.py, ``kit``), so no teacher trains here.
* docs/reference/cli.md equals what docs/gen_cli.py writes from the typer app now.
* No page outside the benchmarks speaks of the project's issue numbers; README.md stays under 12 KB.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MARKER = "<!-- runnable -->"
BENCHMARK_PAGES = {"benchmarks.md", "demo-runs.md"}  # the Benchmarks section: measurement notes, dated
# the pages whose runnable blocks cover the demo pipeline, rollout, rounds, make-student, across tokenizers and
# share / validate: each must keep at least one (a marker dropped by an edit fails here, not silently)
RUNNABLE_PAGES = ["getting-started.md", "concepts/on-policy.md", "how-to/make-student.md",
                  "concepts/cross-tokenizer.md", "how-to/share-cache.md"]


def runnable_blocks(text: str) -> list[tuple[int, str]]:
    """(1-based line of the fence, the block's text) of every fenced block preceded by the runnable marker."""
    lines = text.split("\n")
    out, fence = [], None
    for i, line in enumerate(lines):
        if fence is not None:  # inside a fenced block (an example of the marker, say): nothing counts
            if line.strip() == fence:
                fence = None
            continue
        opening = re.match(r"^(`{3,})", line.strip())
        if opening:
            fence = opening.group(1)
            continue
        if line.strip() != MARKER:
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        assert j < len(lines) and re.match(r"^```(bash|sh|shell)\s*$", lines[j].strip()), \
            f"line {i + 1}: {MARKER} must stand right before a ```bash fence"
        k = j + 1
        while lines[k].strip() != "```":
            k += 1
        out.append((j + 1, "\n".join(lines[j + 1:k])))
    return out


def shell_commands(block: str) -> list[tuple[str, object]]:
    """The block as steps: ("file", (path, text)) for a ``cat > F <<'EOF'`` here-document, ("alignti", argv[,
    redirect]) for an alignti command, ("bash", text) for anything else; lines joined at a trailing backslash,
    comments dropped, ``&&`` chains split."""
    lines = block.split("\n")
    steps, i = [], 0
    while i < len(lines):
        line = lines[i]
        heredoc = re.match(r"^cat > (\S+) <<'?(\w+)'?\s*$", line.strip())
        if heredoc:
            end = lines.index(heredoc.group(2), i + 1)
            steps.append(("file", (heredoc.group(1), "\n".join(lines[i + 1:end]) + "\n")))
            i = end + 1
            continue
        while line.rstrip().endswith("\\"):
            i += 1
            line = line.rstrip()[:-1] + " " + lines[i].strip()
        i += 1
        tokens = shlex.split(line, comments=True)
        if not tokens:
            continue
        if "alignti" not in tokens or set(tokens) & {"|", ";", "<", ">>", "||"}:
            steps.append(("bash", line.strip()))  # as the reader's shell runs it (alignti from the env's PATH)
            continue
        while tokens:
            cut = tokens.index("&&") if "&&" in tokens else len(tokens)
            part, tokens = tokens[:cut], tokens[cut + 1:]
            if part and part[0] == "alignti":
                redirect = None
                if ">" in part:
                    redirect, part = part[part.index(">") + 1], part[:part.index(">")]
                steps.append(("alignti", (part[1:], redirect)))
            elif part:
                steps.append(("bash", shlex.join(part)))
    return steps


def _run_step(kind: str, what, cwd: Path, kit: Path, where: str) -> None:
    if kind == "file":
        path, text = what
        (cwd / path).write_text(text)
        return
    if kind == "bash":
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        r = subprocess.run(["bash", "-c", what], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{where}: `{what}` exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return
    argv, redirect = what
    if argv[:1] == ["make-demo"] and len(argv) == 2:
        shutil.copytree(kit, cwd / argv[1])  # the session's kit stands in for a reader's demo kit
        return
    from alignti.cli import app
    r = CliRunner().invoke(app, argv, prog_name="alignti")
    if r.exit_code != 0:
        import traceback
        tb = "".join(traceback.format_exception(*r.exc_info)) if r.exc_info and r.exc_info[1] is not None \
            and not isinstance(r.exc_info[1], SystemExit) else ""
        raise AssertionError(f"{where}: `alignti {shlex.join(argv)}` exited {r.exit_code}\n{r.output[-4000:]}\n{tb}")
    if redirect:
        (cwd / redirect).write_text(r.stdout)


def test_runnable_pages_keep_their_blocks():
    for page in RUNNABLE_PAGES:
        assert runnable_blocks((DOCS / page).read_text()), f"docs/{page} lost its runnable block(s)"
    marked = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md") if runnable_blocks(p.read_text())}
    assert marked <= set(RUNNABLE_PAGES), f"{marked - set(RUNNABLE_PAGES)}: add the page to RUNNABLE_PAGES"


def test_the_block_parser():
    block = ("alignti make-demo demo-out && \\\n  alignti dump-teacher --teacher demo-out/teacher --out c  # k 64\n"
             "cat > r.yaml <<'YAML'\na: 1   # kept\nYAML\nalignti config rounds > r2.yaml\nls c | head -1\n")
    assert shell_commands(block) == [
        ("alignti", (["make-demo", "demo-out"], None)),
        ("alignti", (["dump-teacher", "--teacher", "demo-out/teacher", "--out", "c"], None)),
        ("file", ("r.yaml", "a: 1   # kept\n")),
        ("alignti", (["config", "rounds"], "r2.yaml")),
        ("bash", "ls c | head -1")]


@pytest.mark.parametrize("page", RUNNABLE_PAGES)
def test_runnable_blocks_run(page, kit, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for line, block in runnable_blocks((DOCS / page).read_text()):
        for kind, what in shell_commands(block):
            _run_step(kind, what, tmp_path, kit, f"docs/{page}, the block at line {line}")


def _gen_cli():
    spec = importlib.util.spec_from_file_location("gen_cli", DOCS / "gen_cli.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_command_reference_is_the_cli():
    gen = _gen_cli()
    assert gen.PAGE.read_text() == gen.render(), \
        "docs/reference/cli.md differs from the CLI: run `python docs/gen_cli.py` and commit the page"
    assert "## `alignti train-student`" in gen.PAGE.read_text() and "`--cross-tokenizer`" in gen.PAGE.read_text()


def test_pages_speak_of_the_product():
    """No page but the benchmarks names the project's issues; the README is read in five minutes."""
    offenders = [f"{p.relative_to(ROOT)}:{n}" for p in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
                 if p.name not in BENCHMARK_PAGES
                 for n, line in enumerate(p.read_text().split("\n"), 1) if re.search(r"issue [0-9]", line, re.I)]
    assert not offenders, f"issue numbers on user-facing pages: {offenders}"
    assert (ROOT / "README.md").stat().st_size <= 12 * 1024, "README.md is over 12 KB: move the detail into docs/"
