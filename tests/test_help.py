"""Every command's --help is legible where users read it: an 80-column terminal, a narrower one, and a pipe.

typer's rich help sizes its panels from ``TERMINAL_WIDTH`` or the terminal (not from click's ``terminal_width``) and
cuts option names that do not fit ("--gradient-checkpo…"); the CLI uses click's plain help (cli.py), which wraps the
descriptions and keeps names whole. Each case below renders every command's help and finds every option name
(``--flag`` and its ``--no-flag``) as a whole word, and no line wider than the terminal."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from alignti.cli import app

COMMAND = typer.main.get_command(app)


def _names(cmd) -> list[str]:
    return [o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")]


def _whole(name: str, text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text) is not None


def _check(name: str, text: str, names: list[str], width: int) -> None:
    cut = [n for n in names if not _whole(n, text)]
    assert not cut, f"`alignti {name} --help` at {width} columns lacks the whole option name(s) {cut}:\n{text}"
    wide = [ln for ln in text.splitlines() if len(ln) > width]
    assert not wide, f"`alignti {name} --help` has lines wider than {width} columns: {wide[:3]}"
    assert "…" not in text, f"`alignti {name} --help` cuts something short: {text}"


@pytest.mark.parametrize("width", [80, 60])
@pytest.mark.parametrize("forced", [False, True])
def test_every_option_name_is_whole_in_every_help(width, forced, monkeypatch):
    """CliRunner at ``width`` columns (``COLUMNS`` and click's ``terminal_width``); ``forced``: rich's width set too
    (``TERMINAL_WIDTH``, ``FORCE_COLOR``), as a user's environment may."""
    monkeypatch.setenv("COLUMNS", str(width))
    if forced:
        monkeypatch.setenv("TERMINAL_WIDTH", str(width))
        monkeypatch.setenv("FORCE_COLOR", "1")
    runner = CliRunner()
    names = [None, *sorted(COMMAND.commands)]
    for name in names:
        cmd = COMMAND if name is None else COMMAND.commands[name]
        args = ["--help"] if name is None else [name, "--help"]
        res = runner.invoke(app, args, terminal_width=width, color=False)
        assert res.exit_code == 0, res.output
        _check(name or "", res.output, _names(cmd), width)
        if name is None:
            missing = [c for c in COMMAND.commands if not _whole(c, res.output)]
            assert not missing, f"`alignti --help` lacks the command(s) {missing}:\n{res.output}"


def test_piped_help_greps_every_option():
    """``python -m alignti train-student --help | grep -- --config`` finds it: a pipe (no terminal, no COLUMNS)."""
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("COLUMNS", "TERMINAL_WIDTH", "LINES")}
    out = subprocess.run([sys.executable, "-m", "alignti", "train-student", "--help"], capture_output=True, text=True,
                         env=env, check=True).stdout
    _check("train-student", out, _names(COMMAND.commands["train-student"]), 80)
    assert any(_whole("--config", ln) for ln in out.splitlines())
    assert any(_whole("--gradient-checkpointing", ln) and _whole("--no-gradient-checkpointing", ln)
               for ln in out.splitlines())
