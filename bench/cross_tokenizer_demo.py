"""Cross-tokenizer evidence on the shapes task: a student with its own tokenizer (trained on the same demo text with
vocabulary 300 instead of the teacher's 320, so ids and segmentation differ) against a same-tokenizer student of
the same size, same budget and seeds as the quickstart (800 steps, batch 16, lr 3e-3, frozen teacher vision tower,
lambda_TPA 0.5 unused here). Methods: sft and kd on the same-tokenizer student; sft, uld, gold and alm (each the KD
term of --loss kd across tokenizers) on the cross student. Reports test accuracy (1,500 questions), paired per-seed
differences with 95% intervals and the share of the same-tokenizer KD gain over SFT the best cross loss recovers.

The cross student keeps the teacher's vision tower and patch grid: the image-grid side (IVA resampling) is not part
of this comparison (a tower with another patch grid would start untrained). The trained demo teacher comes from an
existing quickstart workdir (--kit), which this script only reads.
Run: python bench/cross_tokenizer_demo.py --kit QUICKSTART/kit --work /tmp/xt-demo [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from _util import table

from alignti.demo.quickstart import DEMO_TRAIN, PRESETS, interval_text, paired_interval

P = PRESETS["default"]
METHODS = [("sft", "same", None), ("kd", "same", None), ("sft-x", "cross", None), ("uld", "cross", "uld"),
           ("gold", "cross", "gold"), ("alm", "cross", "alm")]


def students(work: Path, seed: int) -> dict[str, str]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from alignti.common.saving import save_checkpoint
    from alignti.demo import kit
    teacher = AutoModelForImageTextToText.from_pretrained(work / "kit/teacher")
    out = {}
    for kind in ("same", "cross"):
        path = work / f"student-{kind}-seed{seed}"
        if not (path / "config.json").exists():
            if kind == "same":
                proc = AutoProcessor.from_pretrained(work / "kit/teacher")
                tok = proc.tokenizer
            else:
                tok = kit.build_tokenizer("llava", vocab_size=300)
                proc = kit.build_processor(tok, "llava")
            save_checkpoint(kit.build_student("llava", tok, teacher, 1000 + seed), proc, path)
        out[kind] = str(path)
    return out


def run(job: dict) -> dict:
    import torch

    from alignti.common.models import load_vlm
    from alignti.student_train.evaluate import AccuracyProbe
    from alignti.student_train.trainer import TrainConfig, train_student
    torch.set_num_threads(1)
    out = Path(job["out"])
    if (out / "result.json").exists():
        return json.loads((out / "result.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    loss = "sft" if job["method"].startswith("sft") else "kd"
    res = train_student(TrainConfig(student=job["student"], cache=job["cache"], out=str(out), loss=loss,
                                    cross_tokenizer=job["xt"], max_steps=job["steps"], batch_size=P["batch_size"],
                                    lr=P["lr"], seed=job["seed"], save_every=job["steps"], progress=False,
                                    workers=0, freeze_vision=True, **DEMO_TRAIN))
    model, proc = load_vlm(res["final"], torch.device("cpu"))
    test = AccuracyProbe(proc, job["test"], job["images"])
    answers = test.answers(model, proc)
    r = {"method": job["method"], "seed": job["seed"], "test_accuracy": test.score(answers),
         "teacher_agreement": test.score(answers, job["teacher_answers"]), "seconds": round(time.perf_counter() - t0)}
    (out / "result.json").write_text(json.dumps(r))
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kit", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=P["student_steps"], help="student steps (quickstart: 800)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    from alignti.common.models import load_vlm
    from alignti.student_train.evaluate import AccuracyProbe
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "kit/teacher/config.json").exists():  # a private copy: the source workdir is only read
        shutil.copytree(Path(args.kit) / "teacher", work / "kit/teacher")
        shutil.copytree(Path(args.kit) / "data", work / "kit/data")
    data, images = work / "kit/data", str(work / "kit/data/images")
    t0 = time.perf_counter()
    dump_teacher(DumpConfig(teacher=str(work / "kit/teacher"), data=str(data / "train.json"), images=images,
                            out=str(work / "cache"), saliency_query="answer", progress=False))
    teacher, proc = load_vlm(str(work / "kit/teacher"), torch.device("cpu"))
    test = AccuracyProbe(proc, str(data / "test.json"), images)
    t_answers = test.answers(teacher, proc)
    teacher_acc = test.score(t_answers)
    del teacher
    jobs = []
    for seed in range(args.seeds):
        st = students(work, seed)
        for name, kind, xt in METHODS:
            jobs.append(dict(method=name, seed=seed, student=st[kind], xt=xt, cache=str(work / "cache"),
                             out=str(work / "runs" / f"{name}-seed{seed}"), test=str(data / "test.json"),
                             images=images, teacher_answers=t_answers, steps=args.steps))
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as ex:
        runs = list(ex.map(run, jobs))
    acc = {m: [r["test_accuracy"] for r in runs if r["method"] == m] for m, _, _ in METHODS}
    rows = [[m, f"{100 * sum(v) / len(v):.1f}", ", ".join(f"{100 * x:.1f}" for x in v),
             f"{100 * sum(r['teacher_agreement'] for r in runs if r['method'] == m) / len(v):.1f}"]
            for m, v in acc.items()]
    print(f"teacher test accuracy {100 * teacher_acc:.1f}; {len(test.recs)} test questions; "
          f"{time.perf_counter() - t0:.0f} s in all")
    print(table(rows, ["method", "test accuracy (mean)", "per seed", "agreement with teacher"]))
    pairs = [("kd", "sft"), ("sft-x", "sft"), ("uld", "sft-x"), ("gold", "sft-x"), ("alm", "sft-x"), ("gold", "kd")]
    prow = [[f"{a} - {b}", f"{100 * paired_interval(acc[a], acc[b])['mean']:+.1f}",
             interval_text(paired_interval(acc[a], acc[b]))] for a, b in pairs]
    print(table(prow, ["comparison", "difference", "95% interval"]))
    gain = 100 * (sum(acc["kd"]) - sum(acc["sft"])) / len(acc["kd"])
    best = max(("uld", "gold", "alm"), key=lambda m: sum(acc[m]))
    xgain = 100 * (sum(acc[best]) - sum(acc["sft-x"])) / len(acc[best])
    print(f"RATIO best cross loss ({best}) gain over its SFT / same-tokenizer KD gain over SFT: "
          f"{xgain:.1f} / {gain:.1f} = {xgain / gain if gain else float('nan'):.2f}")


if __name__ == "__main__":
    main()
