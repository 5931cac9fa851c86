"""Can the demo student learn the long-form answers at all, and at what answer length? (issue 19's evidence needs a
budget where it can.)

    python bench/long_form_budget.py [--items 2,4] [--steps 800] [--train 150] [--val 50]
    python bench/long_form_budget.py --student S --items 4 --steps 400    # a saved student (make-student's)

For each maximum number of shapes per long-form picture (``--items``; the demo's long-form split uses 2 to 4,
``shapes.LONG_FORM_MAX_ITEMS``), the quickstart's student (``demo.kit.STUDENT``: hidden 48, 2 layers, same seed) is
trained with plain SFT (``demo.teacher_sft.train_sft``: cross-entropy on the answers, AdamW, the students' lr 3e-3,
batch 16) on long-form questions only, for ``--steps`` steps, on ``--train`` fixed pictures (the cache's situation)
or on fresh pictures every step (``--train 0``: the capacity with unbounded data). It is then scored greedily
(48 new tokens) on ``--val`` validation pictures of the same kind: exact match and all-fields F1
(``shapes.field_scores``). The students of the quickstart see long-form questions in 1 of 7 of their draws; here
in all of them, so this is an upper bound for what the quickstart's students can learn at that step budget.

``--student S`` trains the checkpoint at S instead (``load_vlm``: its weights, its processor), e.g. the pruned
student of ``alignti make-student --from-teacher KIT/teacher --keep-layers 0 --out S``; S's tokenizer must be the
demo's (the kit's), and ``--dims`` / ``--seed``'s initialisation do not apply (``--seed`` still sets the data order).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402,F401  (sets HF_HUB_OFFLINE)
import logging  # noqa: E402
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", default="2,4", help="maximum shapes per long-form picture, one run each")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--train", type=int, default=150, help="fixed training pictures (0: fresh pictures every step)")
    ap.add_argument("--val", type=int, default=50)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dims", default="student", help="student or teacher (demo.kit dims)")
    ap.add_argument("--student", default=None, help="a saved student folder to train instead of a fresh demo.kit "
                                                    "model (e.g. make-student --from-teacher KIT/teacher)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    from alignti.common.generate import exact_match, greedy_answers
    from alignti.common.models import load_vlm
    from alignti.demo import kit, shapes
    from alignti.demo.teacher_sft import encode_all, train_sft

    out = {}
    for items in [int(x) for x in args.items.split(",")]:
        shapes.LONG_FORM_MAX_ITEMS = items  # read by shapes.stream and generate_long_form_split at call time
        tmp = Path(tempfile.mkdtemp(prefix=f"lf{items}-"))
        train = tmp / "train_long.json"
        train.write_text(json.dumps(shapes.generate_long_form_split(tmp, "train", max(args.train, 1))))
        val = tmp / "val_long.json"
        val_recs = shapes.generate_long_form_split(tmp, "val", args.val)
        val.write_text(json.dumps(val_recs))
        if args.student:
            model, proc = load_vlm(args.student, torch.device("cpu"))
            tok = proc.tokenizer
        else:
            tok = kit.build_tokenizer("llava")
            proc = kit.build_processor(tok, "llava")
            model = kit.build_model("llava", tok, kit.TEACHER if args.dims == "teacher" else kit.STUDENT, args.seed)
        lengths = [len(tok(r["conversations"][-1]["value"], add_special_tokens=False)["input_ids"]) for r in val_recs]
        t = time.perf_counter()
        # the stream's long-form batches (fresh pictures) or the fixed pictures (fresh=False); no accuracy target
        train_sft(model, proc, str(train), str(val), str(tmp / "images"), steps=args.steps, batch_size=16, lr=args.lr,
                  seed=args.seed, fresh=args.train == 0, long_form_rate=1.0 if args.train == 0 else 0.0)
        secs = time.perf_counter() - t
        items_enc = encode_all(proc, str(val), str(tmp / "images"), generation_prompt=True)
        preds = greedy_answers(model, proc, [e for _, e in items_enc], max_new_tokens=48)
        em = [exact_match(p, r.turns[-1][1]) for p, (r, _) in zip(preds, items_enc)]
        f1 = [shapes.field_scores(p, shapes.scene_of(rec["scene"]))["fields"] for p, rec in zip(preds, val_recs)]
        out[items] = {"exact": 100 * statistics.mean(em), "fields_f1": 100 * statistics.mean(f1),
                      "answer_tokens": [min(lengths), max(lengths), statistics.mean(lengths)], "train_s": secs,
                      "example": preds[0], "reference": val_recs[0]["conversations"][-1]["value"]}
        print(f"max {items} shapes (answers {min(lengths)}-{max(lengths)} tokens, mean {statistics.mean(lengths):.1f}): "
              f"exact {out[items]['exact']:.1f}%, all-fields F1 {out[items]['fields_f1']:.1f} after {args.steps} "
              f"steps ({secs:.0f} s); e.g. {preds[0]!r} for {out[items]['reference']!r}", flush=True)
    who = f"student {args.student}" if args.student else f"{args.dims} dims"
    pics = "fresh pictures" if args.train == 0 else f"{args.train} fixed pictures"
    print(f"RESULT {who}, {args.steps} steps, {pics}: "
          + "; ".join(f"max {k} shapes: exact {v['exact']:.1f}%, F1 {v['fields_f1']:.1f}" for k, v in out.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
