"""What the long-form samples cost the quickstart's students per step, by how many of them the cache holds.

    python bench/quickstart_student_cost.py --workdir QUICKSTART_DIR [--long 0,75,150] [--steps 100]
                                            [--methods sft,alignti]

From a finished quickstart work dir (its kit: teacher, students, data), dumps the quickstart's cache (same
DumpConfig settings) on train.json plus the first N train_long samples for each N of ``--long``, then trains the
seed-0 student for ``--steps`` steps with the quickstart's settings for each method of ``--methods`` on each cache,
and prints the training seconds per step (one process, the torch threads it is given: run with OMP_NUM_THREADS=1
as the quickstart's student workers are). Timings are this machine's in one run: note the load beside them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402,F401  (sets HF_HUB_OFFLINE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="a finished quickstart work dir")
    ap.add_argument("--long", default="0,75,150", help="train_long samples in the cache, one cache each")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--methods", default="sft,alignti")
    args = ap.parse_args()

    from alignti.demo.quickstart import DEMO_TRAIN, PRESETS
    from alignti.student_train.trainer import TrainConfig, train_student
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher

    work = Path(args.workdir)
    data, images = work / "kit" / "data", str(work / "kit" / "data" / "images")
    short = json.loads((data / "train.json").read_text())
    long = json.loads((data / "train_long.json").read_text())
    p = PRESETS["default"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="qs-cost-") as tmp:
        tmp = Path(tmp)
        for n in [int(x) for x in args.long.split(",")]:
            train = tmp / f"train-{n}.json"
            train.write_text(json.dumps(short + long[:n]))
            cache = tmp / f"cache-{n}"
            dump_teacher(DumpConfig(teacher=str(work / "kit" / "teacher"), data=str(train), images=images,
                                    out=str(cache), device="cpu", progress=False, saliency_query="answer",
                                    tpa_positions=1.0, tpa_branches=4, iva_token_kl=True))
            for method in args.methods.split(","):
                t = time.perf_counter()
                train_student(TrainConfig(student=str(work / "kit" / "student-seed0"), cache=str(cache),
                                          out=str(tmp / f"run-{n}-{method.replace('+', '_')}"), loss=method,
                                          max_steps=args.steps, batch_size=p["batch_size"], lr=p["lr"], seed=0,
                                          device="cpu", save_every=args.steps, progress=False, workers=0,
                                          freeze_vision=True, **DEMO_TRAIN))
                secs = time.perf_counter() - t
                rows.append((n, method, secs / args.steps))
                print(f"{len(short)} short + {n} long-form samples, {method}: {secs / args.steps:.3f} s/step "
                      f"({args.steps} steps, {secs:.1f} s with set-up)", flush=True)
    print("RESULT " + "; ".join(f"{n} long {m} {s:.3f} s/step" for n, m, s in rows))


if __name__ == "__main__":
    main()
