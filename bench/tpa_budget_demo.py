"""Does a TPA position budget cost accuracy? The quickstart's default preset (same teacher, data, seeds and
student budget), Align-TI with TPA at every response position against --tpa-positions F, and KD (no TPA)
for the seed noise. Test accuracy per seed; run on CPU in ~10 minutes (the teacher trains once).

    python bench/tpa_budget_demo.py [--workdir DIR] [--fractions 0.25] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

from _util import table

from alignti.demo.quickstart import QuickstartConfig, quickstart  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "alignti-tpa-budget"))
    ap.add_argument("--fractions", default="0.25")
    ap.add_argument("--seeds", type=int, default=3)
    a = ap.parse_args()
    work = Path(a.workdir)
    full = quickstart(QuickstartConfig(workdir=str(work / "full"), seeds=a.seeds, methods=("kd", "alignti"),
                                       progress=False))
    rows = {"kd": full, "alignti, TPA at every position": full}
    per_seed = {"kd": [r["test_accuracy"] for r in full["runs"] if r["method"] == "kd"],
                "alignti, TPA at every position": [r["test_accuracy"] for r in full["runs"]
                                                   if r["method"] == "alignti"]}
    for f in a.fractions.split(","):
        d = work / f"tpa-{f}"
        if not (d / "kit").exists():  # the same kit (teacher, data, students): only the dump differs
            d.mkdir(parents=True, exist_ok=True)
            shutil.copytree(work / "full" / "kit", d / "kit")
            shutil.copy(work / "full" / "kit.json", d / "kit.json")
        res = quickstart(QuickstartConfig(workdir=str(d), seeds=a.seeds, methods=("alignti",), progress=False,
                                          overrides={"tpa_positions": float(f)}))
        name = f"alignti, --tpa-positions {f}"
        rows[name] = res
        per_seed[name] = [r["test_accuracy"] for r in res["runs"]]
    out = [[k, f"{100 * statistics.mean(v):.1f} ± {100 * statistics.pstdev(v):.1f}",
            ", ".join(f"{100 * x:.1f}" for x in v)] for k, v in per_seed.items()]
    print(f"teacher test accuracy {100 * full['teacher_test_accuracy']:.1f}")
    print(table(out, ["method", "test accuracy (mean ± sd)", "per seed"]))
    (work / "summary.json").write_text(json.dumps(per_seed, indent=1))


if __name__ == "__main__":
    main()
