"""lmms-eval vs `alignti evaluate` on the same questions: accuracy of each, answers that agree, seconds of each.

Run in the eval env (docs/how-to/lmms-eval.md), on a trained student and a split, e.g. the quickstart's:

    .venv-eval/bin/python bench/lmms_eval_agreement.py --model quickstart/runs/alignti-seed0/final \
        --data quickstart/kit/data/test.json --images quickstart/kit/data/images [--limit 200]

Exports the split (the first --limit samples) as a local lmms-eval task, scores the student with alignti evaluate
(batched greedy generate) and with lmms-eval's own model class for the family (one question at a time), and prints
one JSON line: both accuracies (lmms-eval's with its VQA normaliser and with alignti's), how many answers are equal,
the questions where they differ, seconds."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from alignti.student_train.evaluate import evaluate
from alignti.student_train.lmms_harness import evaluate_lmms, export_task


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        items = json.loads(Path(args.data).read_text())[:args.limit]
        split = Path(tmp) / "split.json"
        split.write_text(json.dumps(items))
        export_task(str(split), args.images, Path(tmp) / "task", name="bench_split")
        t0 = time.perf_counter()
        ours = evaluate(args.model, str(split), args.images, device=args.device, answers_out=Path(tmp) / "a.json")
        t_ours = time.perf_counter() - t0
        answers = json.loads((Path(tmp) / "a.json").read_text())
        t0 = time.perf_counter()
        theirs = evaluate_lmms(args.model, "bench_split", include_path=Path(tmp) / "task", device=args.device)
        t_lmms = time.perf_counter() - t0
    got = theirs["answers"]["bench_split"]
    differ = {s: (answers[s], got.get(s)) for s in answers if got.get(s) != answers[s].strip()}
    scores = theirs["results"]["bench_split"]
    print(json.dumps({"questions": ours["samples"], "alignti_accuracy": ours["accuracy"],
                      "lmms_eval_alignti_exact_match": scores["alignti_exact_match"],
                      "lmms_eval_exact_match_vqa_norm": scores["exact_match"],
                      "answers_equal": len(answers) - len(differ), "answers_differ": dict(list(differ.items())[:10]),
                      "seconds_alignti": round(t_ours, 1), "seconds_lmms_eval": round(t_lmms, 1),
                      "lmms_eval_model": theirs["lmms_eval_model"], "lmms_eval_version": theirs["lmms_eval_version"]}))


if __name__ == "__main__":
    main()
