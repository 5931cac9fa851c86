"""The quickstart teacher's recipe with the long-form split on: steps to target and time per step, one lever at a time.

    python bench/teacher_long_form.py [--rate 0.2] [--grounding items|scene|off] [--cap 1500] [--long-target 0.9]
                                      [--eval-every 250] [--lr-schedule linear|constant] [--after] [--fast] [--json OUT]

Trains only the teacher, exactly as ``alignti quickstart`` does (``demo.kit.make_demo`` with the preset's sizes:
default 300/200/500 images, long-form 150/50/150; ``--fast``: the fast preset's), on fresh scenes, with
``--rate`` of its batches long-form and the grounding loss on long-form answers read as ``--grounding``
(``demo.teacher_sft.StreamEncoder._ground``); ``--after``: no long-form batch until short-question validation
reaches 90% (a curriculum). It stops at the first evaluation (every ``--eval-every`` steps) where
short-question validation exact match reaches 90% and, with ``--long-target``, the long-form validation all-fields
F1 reaches it too; else at ``--cap`` steps. Prints every evaluation and "RESULT": steps run, training seconds per
step (evaluations excluded), evaluation seconds, final short validation. Timings are this machine's, in one run:
note the load (``uptime``) beside them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402,F401  (sets HF_HUB_OFFLINE)

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=0.2, help="long-form share of the teacher's batches")
    ap.add_argument("--grounding", default="items", choices=("items", "scene", "off"))
    ap.add_argument("--cap", type=int, default=1500, help="teacher step cap")
    ap.add_argument("--long-target", type=float, default=None, help="long-form val all-fields F1 the stop needs")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--lr-schedule", default="linear", choices=("linear", "constant"))
    ap.add_argument("--after", action="store_true", help="long-form batches only once short val reaches 90%%")
    ap.add_argument("--fast", action="store_true", help="the fast preset's sizes")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from alignti.demo import kit
    from alignti.demo.quickstart import PRESETS

    p = PRESETS["fast" if args.fast else "default"]
    long_form = p.get("long_form") or ({"train": 30, "val": 10, "test": 20} if args.fast
                                       else {"train": 150, "val": 50, "test": 150})
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="teacher-lf-") as tmp:
        info = kit.make_demo(tmp, n_train=p["n_train"], n_val=p["n_val"], n_test=p["n_test"], teacher_steps=args.cap,
                             teacher_target=0.9, long_form=long_form, long_form_rate=args.rate,
                             long_form_target=args.long_target, long_form_grounding=args.grounding,
                             long_form_after=args.after, teacher_eval_every=args.eval_every,
                             teacher_lr_schedule=args.lr_schedule, device="cpu")
    wall = time.perf_counter() - t
    for h in info["teacher_history"]:
        print(f"step {h['step']}: short val {100 * h['val']:.1f}%"
              + (f", long-form val exact {100 * h['long_exact']:.1f}% F1 {100 * h['long_fields']:.1f}"
                 if "long_exact" in h else ""))
    steps = info["teacher_steps_run"]
    print(f"RESULT rate {args.rate} grounding {args.grounding} cap {args.cap} long-target {args.long_target} "
          f"lr {args.lr_schedule}"
          f"{' after short target (from step %s)' % info['teacher_long_form_from'] if args.after else ''}: "
          f"{steps} steps, {info['teacher_seconds'] / steps:.3f} s/step training, evaluations "
          f"{info['teacher_eval_seconds']:.0f} s, final short val {100 * info['teacher_val_accuracy']:.1f}%, "
          f"make_demo {wall:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(vars(args), **info, wall_seconds=wall), indent=1))


if __name__ == "__main__":
    main()
