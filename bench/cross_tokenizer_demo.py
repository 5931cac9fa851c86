"""Cross-tokenizer evidence on the shapes task: a student with its own tokenizer (trained on the same demo text with
vocabulary 300 instead of the teacher's 320, so ids and segmentation differ) AND its own image-token grid (the
teacher's frozen CLIP tower run at 64 px instead of 48: 4x4 = 16 image tokens instead of 3x3 = 9, its position
embeddings resampled by transformers' ViT recipe, demo/kit.build_student(image_size=...)), against a same-tokenizer
student of the same size. Same budget and seeds as the quickstart (PRESETS["default"]: 800 steps, batch 16, lr 3e-3,
frozen vision tower). Methods: sft and kd on the same-tokenizer student; sft, uld, gold and alm (each the KD term
of --loss kd across tokenizers) and gold+iva (--loss kd+iva --cross-tokenizer gold: the teacher's saliency resampled
from its 3x3 grid to the student's 4x4) on the cross student. Every run is scored on the whole validation split
(600 questions; the best cross loss is picked there) and the whole test split (1,500 questions). Reports test
accuracy, paired per-seed differences with 95% intervals and the share of the same-tokenizer KD gain over SFT the
best cross loss (chosen on validation) recovers.

The trained demo teacher and its cache come from an existing quickstart-recipe workdir (--kit; --cache reuses a
schema-v7 cache of that teacher, else one is dumped here), which this script only reads.
Run: python bench/cross_tokenizer_demo.py --kit QUICKSTART/kit --work /tmp/xt-demo [--cache C] [--seeds 3]
     [--student-image-size 48]  (48: the tokenizer-only comparison on the teacher's grid)
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from _util import table

from alignti.demo.quickstart import DEMO_TRAIN, PRESETS, interval_text, paired_interval

P = PRESETS["default"]
METHODS = [("sft", "same", None), ("kd", "same", None), ("sft-x", "cross", "gold"), ("uld", "cross", "uld"),
           ("gold", "cross", "gold"), ("alm", "cross", "alm"), ("gold+iva", "cross", "gold")]
# sft-x: --loss sft with --cross-tokenizer gold (the student encodes each sample itself; no KD term is computed)
CROSS_KD = ("uld", "gold", "alm", "gold+iva")
STUDENT_IMAGE_SIZE = 64  # the cross student's input size: (64 // 16)^2 = 16 image tokens (the teacher: 9)


def check_grids(work: Path, student: str) -> str:
    """Asserts the cross student's image-token grid differs from the teacher's, and that the teacher's cached
    saliency of a real sample resamples onto it (the path --loss kd+iva takes across tokenizers)."""
    import numpy as np
    from transformers import AutoProcessor

    from alignti.common.cache import CacheReader
    from alignti.student_train.cross import CrossDataset, CrossTokenizer
    reader = CacheReader(str(work / "cache"))
    proc = AutoProcessor.from_pretrained(student)
    cross = CrossTokenizer(reader, proc, str(work / "cache"), iva=True)
    x = CrossDataset(reader, proc, cross, str(work / "kit/data/images"))[0]
    t_grid = tuple(int(g) for g in reader[0]["image_grids"][0])
    t_sal, s_sal = np.asarray(reader[0]["saliency"]), np.asarray(x["saliency"])
    assert t_sal.shape[1] != s_sal.shape[1] == x["n_image_tokens"], (t_sal.shape, s_sal.shape, x["n_image_tokens"])
    assert np.allclose(s_sal.sum(1), t_sal.clip(0).sum(1), atol=1e-3), "resampled saliency lost mass"
    return (f"teacher grid {t_grid}: {t_sal.shape[1]} image tokens; student: {s_sal.shape[1]} "
            f"image tokens; saliency resampled on sample {reader[0]['sample_id']}")


def students(work: Path, seed: int, image_size: int = STUDENT_IMAGE_SIZE) -> dict[str, str]:
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
                proc = kit.build_processor(tok, "llava", image_size=image_size)
            size = None if kind == "same" else image_size
            save_checkpoint(kit.build_student("llava", tok, teacher, 1000 + seed, image_size=size), proc, path)
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
    loss = "sft" if job["method"].startswith("sft") else "kd+iva" if job["method"].endswith("+iva") else "kd"
    res = train_student(TrainConfig(student=job["student"], cache=job["cache"], out=str(out), loss=loss,
                                    cross_tokenizer=job["xt"], max_steps=job["steps"], batch_size=P["batch_size"],
                                    lr=P["lr"], seed=job["seed"], save_every=job["steps"], progress=False,
                                    workers=0, freeze_vision=True, **DEMO_TRAIN))
    model, proc = load_vlm(res["final"], torch.device("cpu"))
    val = AccuracyProbe(proc, job["val"], job["images"])
    test = AccuracyProbe(proc, job["test"], job["images"])
    answers = test.answers(model, proc)
    r = {"method": job["method"], "seed": job["seed"], "val_accuracy": val(model, proc),
         "test_accuracy": test.score(answers),
         "teacher_agreement": test.score(answers, job["teacher_answers"]), "seconds": round(time.perf_counter() - t0)}
    (out / "result.json").write_text(json.dumps(r))
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kit", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--student-image-size", type=int, default=STUDENT_IMAGE_SIZE,
                    help="the cross student's input size in px (48: the teacher's 3x3 grid, only the tokenizer "
                         "differs)")
    ap.add_argument("--cache", help="a finished schema-v7 cache of the --kit teacher (else dumped into --work)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=P["student_steps"], help="student steps (quickstart: 800)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    from alignti.common.models import load_vlm
    from alignti.demo import kit
    from alignti.student_train.evaluate import AccuracyProbe
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "kit/teacher/config.json").exists():  # a private copy: the source workdir is only read
        shutil.copytree(Path(args.kit) / "teacher", work / "kit/teacher")
        shutil.copytree(Path(args.kit) / "data", work / "kit/data")
    data, images = work / "kit/data", str(work / "kit/data/images")
    if args.cache and not (work / "cache/manifest.json").exists():
        shutil.copytree(args.cache, work / "cache")
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
        st = students(work, seed, args.student_image_size)
        if seed == 0 and args.student_image_size != kit.shapes.IMAGE_SIZE:
            print(check_grids(work, st["cross"]))
        for name, kind, xt in METHODS:
            jobs.append(dict(method=name, seed=seed, student=st[kind], xt=xt, cache=str(work / "cache"),
                             out=str(work / "runs" / f"{name}-seed{seed}"), test=str(data / "test.json"),
                             val=str(data / "val.json"),
                             images=images, teacher_answers=t_answers, steps=args.steps))
    jobs.sort(key=lambda j: (j["method"] == "gold+iva", j["seed"]))  # the core methods' seeds first
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as ex:
        runs = list(ex.map(run, jobs))
    acc = {m: [r["test_accuracy"] for r in runs if r["method"] == m] for m, _, _ in METHODS}
    val = {m: [r["val_accuracy"] for r in runs if r["method"] == m] for m, _, _ in METHODS}
    mean = statistics.mean
    rows = [[m, f"{100 * mean(val[m]):.1f}", f"{100 * mean(v):.1f}", ", ".join(f"{100 * x:.1f}" for x in v),
             f"{100 * mean(r['teacher_agreement'] for r in runs if r['method'] == m):.1f}"]
            for m, v in acc.items()]
    print(f"teacher test accuracy {100 * teacher_acc:.1f}; {len(test.recs)} test questions; "
          f"{time.perf_counter() - t0:.0f} s in all")
    print(table(rows, ["method", "val accuracy (mean)", "test accuracy (mean)", "test per seed",
                       "agreement with teacher"]))
    best = max(CROSS_KD, key=lambda m: mean(val[m]))  # chosen on validation only
    pairs = [("kd", "sft"), ("sft-x", "sft"), *((m, "sft-x") for m in CROSS_KD), ("gold+iva", "gold"),
             (best, "kd"), (best, "sft")]
    prow = [[f"{a} - {b}", f"{100 * paired_interval(acc[a], acc[b])['mean']:+.1f}",
             interval_text(paired_interval(acc[a], acc[b])),
             ", ".join(f"{100 * (x - y):+.1f}" for x, y in zip(acc[a], acc[b]))] for a, b in pairs]
    print(table(prow, ["comparison (test)", "difference", "95% interval", "per seed"]))
    gain = 100 * (mean(acc["kd"]) - mean(acc["sft"]))
    xgain = 100 * (mean(acc[best]) - mean(acc["sft-x"]))
    print(f"RATIO best cross loss on validation ({best}): its test gain over the cross student's SFT / the "
          f"same-tokenizer KD gain over SFT = {xgain:.1f} / {gain:.1f} = {xgain / gain if gain else float('nan'):.2f}"
          f" ({len(acc['kd'])} seeds)")
    kd_only = max(("uld", "gold", "alm"), key=lambda m: mean(val[m]))  # the KD term alone, no IVA
    kgain = 100 * (mean(acc[kd_only]) - mean(acc["sft-x"]))
    print(f"RATIO best KD term alone on validation ({kd_only}): {kgain:.1f} / {gain:.1f} = "
          f"{kgain / gain if gain else float('nan'):.2f}")
    (work / "results.json").write_text(json.dumps({"teacher_test_accuracy": teacher_acc, "runs": runs,
                                                   "best_cross_on_val": best, "recovered_share":
                                                   xgain / gain if gain else None}, indent=1))

if __name__ == "__main__":
    main()
