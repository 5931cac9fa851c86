"""TPA coverage on the demo: how much of the student's own next-token distribution the teacher's cached candidates
cover, against --tpa-branches (B = 4, 8, 16), with TPA's weights from the teacher and from the student.

The paper samples TPA's candidates from the student; an offline cache holds the teacher's top-B, chosen at dump
time. Coverage says how far apart the two are: ``tpa_mass`` is the student's probability mass on the cached
candidates, ``tpa_topb`` the share of the student's own top-B tokens among them (train-student logs both every
step). The quickstart's kit (teacher trained to 90% validation), one dump per B, alignti training per weighting;
coverage at the start (mean of steps 1-10) and the end (last 20 steps) of training.

    python bench/tpa_coverage.py [--workdir DIR] [--branches 4,8,16] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from _util import table

from alignti.demo.kit import make_demo  # noqa: E402
from alignti.demo.quickstart import PRESETS  # noqa: E402
from alignti.student_train.trainer import TrainConfig, train_student  # noqa: E402
from alignti.teacher_dump.dump import DumpConfig, dump_teacher  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "alignti-tpa-coverage"))
    ap.add_argument("--kit", default=None, help="an existing demo kit (e.g. a quickstart's WORKDIR/kit)")
    ap.add_argument("--branches", default="4,8,16")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    work = Path(a.workdir)
    p = PRESETS["default"]
    kit = Path(a.kit) if a.kit else work / "kit"
    if not (kit / "teacher" / "config.json").exists():
        make_demo(kit, n_train=p["n_train"], n_val=p["n_val"], n_test=p["n_test"], teacher_steps=p["teacher_steps"],
                  teacher_target=p["teacher_target"])
    rows, figures = [], []
    for b in [int(x) for x in a.branches.split(",")]:
        cache = work / f"cache-B{b}"
        if not (cache / "manifest.json").exists():
            dump_teacher(DumpConfig(teacher=str(kit / "teacher"), data=str(kit / "data/train.json"),
                                    images=str(kit / "data/images"), out=str(cache), tpa_branches=b, top_k=32,
                                    saliency_query="answer", progress=False))
        for weighting in ("teacher", "student"):
            run = work / f"run-B{b}-{weighting}"
            if not (run / "final").exists():
                train_student(TrainConfig(student=str(kit / "student"), cache=str(cache), out=str(run), loss="alignti",
                                          max_steps=a.steps, batch_size=p["batch_size"], lr=p["lr"],
                                          tpa_weighting=weighting, save_every=a.steps, workers=0, progress=False,
                                          **p["train"]))
            m = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            start = {k: statistics.mean(r[k] for r in m[:10]) for k in ("tpa_mass", "tpa_topb", "tpa", "iva")}
            end = {k: statistics.mean(r[k] for r in m[-20:]) for k in ("tpa_mass", "tpa_topb", "tpa", "iva")}
            figures.append({"branches": b, "weighting": weighting, "start": start, "end": end})
            rows.append([b, weighting, f"{start['tpa_mass']:.3f}", f"{end['tpa_mass']:.3f}",
                         f"{start['tpa_topb']:.3f}", f"{end['tpa_topb']:.3f}", f"{end['tpa']:.3f}", f"{end['iva']:.3f}"])
            print(json.dumps(figures[-1]), flush=True)
    print(table(rows, ["B", "weighting", "mass start", "mass end", "top-B share start", "top-B share end",
                       "TPA term end", "IVA term end"]))
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
