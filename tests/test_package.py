"""Packaging: one import namespace. The repository root installs as the package ``alignti``; nothing else lands at
the top level of site-packages, ``python -m alignti`` runs the CLI, and the small public API resolves."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _clean_env() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


def test_wheel_installs_one_top_level_package(tmp_path):
    """A built wheel holds ``alignti/`` (with common, teacher_dump, student_train, demo, cli) and its dist-info."""
    had_build = (ROOT / "build").exists()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
                    str(ROOT)], check=True, capture_output=True, cwd=tmp_path)
    if not had_build:  # setuptools leaves its build folder in the source tree
        import shutil
        shutil.rmtree(ROOT / "build", ignore_errors=True)
    (whl,) = tmp_path.glob("alignti-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    import alignti
    assert {n.split("/")[0] for n in names} == {"alignti", f"alignti-{alignti.__version__}.dist-info"}
    for module in ["alignti/__init__.py", "alignti/__main__.py", "alignti/cli.py", "alignti/common/losses/__init__.py", "alignti/common/losses/head.py",
                   "alignti/teacher_dump/dump.py", "alignti/student_train/trainer.py", "alignti/demo/quickstart.py",
                   "alignti/student_build/compose.py", "alignti/common/saving.py"]:
        assert module in names, module
    assert not any(n.startswith(("alignti/tests/", "alignti/bench/")) for n in names)


def test_no_generic_top_level_names_and_python_m_runs_the_cli(tmp_path):
    """From any folder: ``import common`` is not alignti's, ``import alignti.common`` is, and ``python -m alignti``
    prints the CLI's help."""
    code = ("import importlib.util as u, alignti.common.losses as l; "
            "print(u.find_spec('common') is None, u.find_spec('cli') is None, u.find_spec('demo') is None, "
            "l.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=_clean_env(),
                         check=True).stdout.split()
    assert out == ["True", "True", "True", "alignti.common.losses"]
    res = subprocess.run([sys.executable, "-m", "alignti", "--help"], capture_output=True, text=True, cwd=tmp_path,
                         env=_clean_env())
    assert res.returncode == 0, res.stderr
    for command in ["dump-teacher", "train-student", "quickstart"]:
        assert command in res.stdout


def test_public_api():
    """``alignti.dump_teacher`` / ``alignti.train_student`` and their config classes are the stage functions."""
    import alignti
    from alignti.student_train import trainer
    from alignti.teacher_dump import dump
    assert alignti.dump_teacher is dump.dump_teacher and alignti.DumpConfig is dump.DumpConfig
    assert alignti.train_student is trainer.train_student and alignti.TrainConfig is trainer.TrainConfig
    assert set(alignti.__all__) <= set(dir(alignti))
    try:
        alignti.no_such_thing
    except AttributeError as e:
        assert "no_such_thing" in str(e)
    else:
        raise AssertionError("expected AttributeError")
