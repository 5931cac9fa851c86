"""alignti: offline knowledge distillation for vision-language models (Align-TI).

The two stages as a Python API (for notebooks and scripts; the ``alignti`` command wraps the same calls)::

    import alignti
    manifest = alignti.dump_teacher(alignti.DumpConfig(teacher="T", data="D.json", images="I", out="cache"))
    result = alignti.train_student(alignti.TrainConfig(student="S", cache="cache", out="run"))

The repository keeps the design card's layout (``common/``, ``teacher_dump/``, ``student_train/``, ``cli.py`` at
its root); the install maps that root onto this one ``alignti`` package.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["DumpConfig", "TrainConfig", "QuickstartConfig", "dump_teacher", "train_student", "quickstart",
           "__version__"]

_LAZY = {
    "DumpConfig": "alignti.teacher_dump.dump", "dump_teacher": "alignti.teacher_dump.dump",
    "TrainConfig": "alignti.student_train.trainer", "train_student": "alignti.student_train.trainer",
    "QuickstartConfig": "alignti.demo.quickstart", "quickstart": "alignti.demo.quickstart",
}


def __getattr__(name: str):
    """Import torch and transformers only when the API is used (``import alignti`` stays cheap)."""
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'alignti' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
