"""`alignti quickstart`: the whole story on the shapes task, in minutes on a laptop CPU.

make-demo (trains the teacher) -> dump-teacher (IRS layer, saliency, TPA) -> train-student with
sft, kd, kd+iva, kd+tpa and alignti for the same step budget and seeds -> evaluate each on the
test split -> results.md / results.json / curves.png in the work directory.

The long-form split (preset ``long_form``: {split: images}; on in both presets since issue 19): "Describe every
shape in the picture." answered with every shape in reading order (demo/shapes.py ``long_form_answer``, 15-41
tokens). The teacher learns the short questions first, then both (``long_form_after``, ``long_form_rate``, stop on
``teacher_target`` and ``long_form_target``: PRESETS). The cache is dumped on train + train_long, so every student
trains on both; each is also tested on test_long, greedy with ``LONG_FORM_MAX_NEW_TOKENS`` tokens: exact match and
``shapes.field_scores`` per-field F1 (position, colour, shape, and all fields together). ``SHORT_ONLY`` in the
overrides gives the short questions alone. results.json's "stage_seconds" says where the time went.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignti.common.models import load_vlm, resolve_device
from alignti.student_train.evaluate import AccuracyProbe, cache_kl
from alignti.student_train.trainer import TrainConfig, train_student
from alignti.teacher_dump.dump import DumpConfig, dump_teacher

from . import kit, shapes

log = logging.getLogger("alignti.quickstart")

METHODS = ("sft", "kd", "kd+iva", "kd+tpa", "alignti")
# On the shapes task a sample's length says its question type (a 1-token colour answer vs a description), so
# length-grouped batches hold one question type each. Measured (3 seeds, kd): 44.1 +- 5.0 test accuracy in
# shuffled batches, 41.0 +- 3.2 grouped (bench/README.md); the demo keeps shuffled batches.
# lambda_TPA = 0.5, chosen on the validation split (bench/method_sweep.py, docs/method.md "TPA on top of IVA"):
# alignti 52.4 +- 1.6 there against 48.6 +- 2.3 at 1.0; student weighting, token-KL IVA, lambda_IVA 2, clipping
# at 5 and lambda_TPA 0.25 scored lower. Only the TPA-using methods read it.
DEMO_TRAIN = dict(group_by_length=False, tpa_weight=0.5)
PRESETS = {
    # the teacher trains until 90% validation exact match (at most teacher_steps steps)
    # 200 validation images (600 questions: where settings are chosen) and 500 test images (1,500 questions: where
    # methods are compared), so that paired differences of a few points are separable over 3 seeds
    # long_form: images of the long-form splits (one question each; {}: none). The default teacher learns the short
    # questions first and the long form after (long_form_after: no long-form batch until short-question validation
    # reaches teacher_target; then long_form_rate of its batches are long-form), and stops once short validation is
    # at teacher_target and the long-form validation's all-fields F1 at long_form_target (checked every
    # teacher_eval_every steps); the grounding loss puts each listed shape's tokens on its own cell
    # (long_form_grounding "items"). Measured one lever at a time (bench/teacher_long_form.py, docs/demo.md): mixed
    # from the start at 0.2 the teacher needed 2,000 steps for 89.6% short validation, at 0.1 its long form lagged
    "default": dict(n_train=300, n_val=200, n_test=500, teacher_steps=2000, teacher_target=0.9, student_steps=800,
                    batch_size=16, lr=3e-3, eval_every=200, val_limit=60, train=dict(freeze_vision=True, **DEMO_TRAIN),
                    long_form=dict(train=150, val=50, test=150), long_form_rate=0.5, long_form_after=True,
                    long_form_target=0.9, long_form_grounding="items", teacher_eval_every=125,
                    teacher_lr_schedule="linear"),
    # mechanics only: a briefly trained teacher (no accuracy target, so long-form batches from the start), short
    # student runs
    "fast": dict(n_train=120, n_val=20, n_test=40, teacher_steps=150, teacher_target=None, student_steps=80,
                 batch_size=16, lr=3e-3, eval_every=40, val_limit=30, train=dict(freeze_vision=True, **DEMO_TRAIN),
                 long_form=dict(train=30, val=10, test=20), long_form_rate=0.2, long_form_after=False,
                 long_form_target=None, long_form_grounding="items", teacher_eval_every=125,
                 teacher_lr_schedule="linear"),
}
# the short questions alone, as before issue 19 (quickstart --config F with these as `overrides`)
SHORT_ONLY = dict(long_form={}, teacher_steps=1500, teacher_eval_every=250)
LONG_FORM_MAX_NEW_TOKENS = shapes.LONG_FORM_MAX_NEW_TOKENS


@dataclass
class QuickstartConfig:
    workdir: str = "quickstart"
    seeds: int = 3
    fast: bool = False
    methods: tuple[str, ...] = METHODS
    overrides: dict = field(default_factory=dict)
    device: str = "auto"
    progress: bool = True
    workers: int | None = None  # student runs side by side (default: 2 on CPU, 1 on GPU)


def _student_for_seed(kit_dir: Path, seed: int) -> Path:
    """A freshly initialised student per seed (same config, different init; the teacher's vision tower)."""
    path = kit_dir / f"student-seed{seed}"
    if not (path / "config.json").exists():
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from alignti.common.saving import save_checkpoint
        proc = AutoProcessor.from_pretrained(kit_dir / "student")
        teacher = AutoModelForImageTextToText.from_pretrained(kit_dir / "teacher")
        model = kit.build_student("llava", proc.tokenizer, teacher, 1000 + seed)
        save_checkpoint(model, proc, path)
    return path


# teacher_seed (default 0): the teacher's initialisation and batch stream (kit.make_demo's seed); the data splits
# stay the same. bench/teacher_variance.py trains several teachers with it
OVERRIDE_KEYS = (*PRESETS["default"], "tpa_positions", "tpa_branches", "teacher_seed")
CONFIG_KEYS = ("workdir", "seeds", "fast", "device", "workers", "methods", "overrides")


def quickstart(cfg: QuickstartConfig) -> dict:
    from alignti.common.config import ConfigError, check_keys, check_ranges, config_values, write_config
    from alignti.common.losses import REGISTRY
    check_ranges("quickstart", cfg)
    check_keys(cfg.overrides, OVERRIDE_KEYS, "quickstart", "overrides")
    bad = [m for m in cfg.methods if m not in REGISTRY]
    if bad:
        raise ConfigError(f"quickstart: unknown method(s) {bad}; choose from {', '.join(REGISTRY)}")
    base = PRESETS["fast" if cfg.fast else "default"]
    p = dict(base, **cfg.overrides)
    p["train"] = {**base["train"], **cfg.overrides.get("train", {})}  # train-student settings add to the preset's
    work = Path(cfg.workdir)
    work.mkdir(parents=True, exist_ok=True)
    write_config(work / "config.yaml", config_values(cfg, CONFIG_KEYS),
                 header="alignti quickstart, as run: `alignti quickstart --config THIS_FILE` runs it again")
    t_start = time.perf_counter()
    kit_dir = work / "kit"
    ensure_kit(work, p, cfg.device)
    t_kit = time.perf_counter()
    info = json.loads((work / "kit.json").read_text())
    data, images = kit_dir / "data", str(kit_dir / "data" / "images")
    train_data, long_form = student_train_data(kit_dir, p)
    dump_teacher(DumpConfig(teacher=str(kit_dir / "teacher"), data=str(train_data), images=images,
                            out=str(work / "cache"), device=cfg.device, progress=cfg.progress,
                            saliency_query="answer",  # where the demo teacher looks (docs/method.md)
                            tpa_positions=p.get("tpa_positions", 1.0), tpa_branches=p.get("tpa_branches", 4),
                            iva_token_kl=True))  # both IVA forms can train from the one cache
    t_dump = time.perf_counter()
    from .saliency_check import region_hits
    saliency = region_hits(work / "cache", data / "train.json")

    device = resolve_device(cfg.device)
    teacher, proc = load_vlm(str(kit_dir / "teacher"), device)
    test = AccuracyProbe(proc, str(data / "test.json"), images)
    teacher_answers = test.answers(teacher, proc)
    teacher_acc = test.score(teacher_answers)
    teacher_long = long_form_scores(teacher, proc, data / "test_long.json", images) if long_form else None
    del teacher
    t_teacher_eval = time.perf_counter()

    jobs, runs = [], {}
    for method in cfg.methods:
        for seed in range(cfg.seeds):
            out = work / "runs" / f"{method.replace('+', '_')}-seed{seed}"
            if (out / "result.json").exists():
                runs[(method, seed)] = json.loads((out / "result.json").read_text())
                continue
            if out.exists():
                import shutil
                shutil.rmtree(out)
            jobs.append(dict(method=method, seed=seed, out=str(out), student=str(_student_for_seed(kit_dir, seed)),
                             cache=str(work / "cache"), data=str(data), images=images, p=p, device=cfg.device,
                             teacher_answers=teacher_answers, long_form=long_form))
    workers = cfg.workers or (min(2, os.cpu_count() or 1) if device.type == "cpu" else 1)
    if workers > 1 and len(jobs) > 1:
        # CPU: two 1-thread runs side by side do twice the work of one 2-thread run on these tiny models
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                 initargs=(logging.getLogger().level,)) as ex:
            for job, run in zip(jobs, ex.map(_train_and_score, jobs)):
                runs[(job["method"], job["seed"])] = run
    else:
        for job in jobs:
            runs[(job["method"], job["seed"])] = _train_and_score(dict(job, progress=cfg.progress))
    runs = [runs[(m, s)] for m in cfg.methods for s in range(cfg.seeds)]
    t_students = time.perf_counter()

    table = summarise(runs, cfg.methods)
    pairs = paired_table(runs, cfg.methods)
    long_pairs = paired_table(runs, cfg.methods, key="long_form_fields") if long_form else []
    results = {"paired": pairs, "verdict": verdict(pairs), "test_questions": len(test.recs),
               "long_form": ({"teacher": teacher_long, "methods": summarise_long(runs, cfg.methods),
                              "paired_fields_f1": long_pairs, "verdict": verdict(long_pairs),
                              "test_questions": teacher_long["n"], "max_new_tokens": LONG_FORM_MAX_NEW_TOKENS}
                             if long_form else None),
               "preset": "fast" if cfg.fast else "default", "settings": p, "seeds": cfg.seeds,
               "teacher_test_accuracy": teacher_acc, "teacher_val_accuracy": info.get("teacher_val_accuracy"),
               "teacher_params": info["teacher_params"], "student_params": info["student_params"],
               "teacher_saliency_region": saliency, "methods": table, "dump_seconds": round(t_dump - t_start, 1),
               "teacher_steps_run": info.get("teacher_steps_run"), "teacher_history": info.get("teacher_history"),
               # wall seconds of each stage of this invocation (a stage reused from an earlier run: ~0; the teacher's
               # training and validation as recorded when the kit was made); the students' sums are over runs (two
               # run side by side on CPU), split into training and evaluation
               "stage_seconds": {"make_demo": round(t_kit - t_start, 1),
                                 "teacher_training": info.get("teacher_seconds"),
                                 "teacher_validation": info.get("teacher_eval_seconds"),
                                 "dump": round(t_dump - t_kit, 1), "teacher_test": round(t_teacher_eval - t_dump, 1),
                                 "students_wall": round(t_students - t_teacher_eval, 1),
                                 "students_train_sum": round(sum(r.get("train_seconds", 0) for r in runs), 1),
                                 "students_eval_sum": round(sum(r.get("eval_seconds", 0) for r in runs), 1),
                                 "students_long_form_eval_sum": round(sum(r.get("long_form_seconds", 0) for r in runs),
                                                                      1)},
               "total_seconds": round(time.perf_counter() - t_start, 1),
               "runs": [{k: v for k, v in r.items() if k != "curve"} for r in runs]}
    (work / "results.json").write_text(json.dumps(results, indent=2))
    md = render_table(results)
    (work / "results.md").write_text(md + "\n")
    plot_curves(runs, cfg.methods, work / "curves.png")
    return results


def ensure_kit(work: Path, p: dict, device: str = "auto") -> dict:
    """WORK/kit (make-demo with preset settings ``p``: data, tokenizer, trained teacher, student) and WORK/kit.json,
    made once: a kit already there is reused as it is. Returns kit.json's record (the teacher's steps, seconds,
    validation history, parameter counts)."""
    kit_dir = work / "kit"
    if not (kit_dir / "teacher" / "config.json").exists():
        info = kit.make_demo(kit_dir, n_train=p["n_train"], n_val=p["n_val"], n_test=p["n_test"],
                             seed=p.get("teacher_seed", 0),
                             teacher_steps=p["teacher_steps"], teacher_target=p["teacher_target"], device=device,
                             long_form=p.get("long_form") or None,  # no split, no long-form batches either
                             long_form_rate=(p.get("long_form_rate") or 0.0) if p.get("long_form") else 0.0,
                             long_form_target=p.get("long_form_target"),
                             long_form_grounding=p.get("long_form_grounding", "items"),
                             long_form_after=p.get("long_form_after", False),
                             teacher_eval_every=p.get("teacher_eval_every", 250),
                             teacher_lr_schedule=p.get("teacher_lr_schedule", "linear"))
        (work / "kit.json").write_text(json.dumps(info, indent=2))
    return json.loads((work / "kit.json").read_text())


def student_train_data(kit_dir: Path, p: dict) -> tuple[Path, bool]:
    """The students' training records and whether the kit has the long-form splits: with them, data/train_all.json
    (train + train_long, written once), else data/train.json."""
    data = kit_dir / "data"
    long_form = bool(p.get("long_form")) and (data / "test_long.json").is_file()
    train_data = data / "train.json"
    if long_form and (data / "train_long.json").is_file():  # the students train on train + train_long
        train_data = data / "train_all.json"
        if not train_data.is_file():
            train_data.write_text(json.dumps(json.loads((data / "train.json").read_text())
                                             + json.loads((data / "train_long.json").read_text()), indent=1))
    return train_data, long_form


def _worker_init(level: int) -> None:
    torch.set_num_threads(1)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _train_and_score(job: dict) -> dict:
    """One student run: train from the cache, then test accuracy, agreement with the teacher's test answers,
    and KL to the cache. Writes RUN/result.json (a finished run is not redone when quickstart is re-run)."""
    p, out = job["p"], Path(job["out"])
    t0 = time.perf_counter()
    device = resolve_device(job["device"])
    from transformers import AutoProcessor
    student_proc = AutoProcessor.from_pretrained(job["student"])
    val = AccuracyProbe(student_proc, str(Path(job["data"]) / "val.json"), job["images"], limit=p["val_limit"])
    res = train_student(TrainConfig(student=job["student"], cache=job["cache"], out=str(out), loss=job["method"],
                                    max_steps=p["student_steps"], batch_size=p["batch_size"], lr=p["lr"],
                                    seed=job["seed"], device=job["device"], eval_every=p["eval_every"],
                                    save_every=p["student_steps"], progress=job.get("progress", False),
                                    workers=0,  # 96-px demo images: in-process loading, no per-epoch worker start
                                    **p.get("train", {})), evaluator=val)
    t_train = time.perf_counter()
    model, sproc = load_vlm(res["final"], device)
    test = AccuracyProbe(sproc, str(Path(job["data"]) / "test.json"), job["images"])
    answers = test.answers(model, sproc)
    acc = test.score(answers)
    # the whole validation split, where settings are chosen (bench/method_sweep.py); the test split decides nothing
    val_acc = AccuracyProbe(sproc, str(Path(job["data"]) / "val.json"), job["images"])(model, sproc)
    agree = test.score(answers, job["teacher_answers"])
    kl = cache_kl(model, sproc, job["cache"], None)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    t_long = time.perf_counter()
    long = (long_form_scores(model, sproc, Path(job["data"]) / "test_long.json", job["images"])
            if job.get("long_form") else None)
    t_end = time.perf_counter()
    run = {"method": job["method"], "seed": job["seed"], "test_accuracy": acc, "val_accuracy": val_acc,
           "teacher_agreement": agree, "long_form": long, "train_kl_to_teacher": kl,
           "seconds": round(t_end - t0, 1), "train_seconds": round(t_train - t0, 1),
           "eval_seconds": round(t_end - t_train, 1), "long_form_seconds": round(t_end - t_long, 1), "curve": metrics}
    (out / "result.json").write_text(json.dumps(run))
    log.info("%s seed %d: test accuracy %.3f (teacher agreement %.3f)", job["method"], job["seed"], acc, agree)
    return run


def long_form_scores(model, processor, data: str | Path, images: str, limit: int | None = None) -> dict:
    """Greedy answers (``LONG_FORM_MAX_NEW_TOKENS`` tokens) to a long-form split: {"exact": exact-match rate,
    "position" / "colour" / "shape" / "fields": mean per-field F1 (``shapes.field_scores``) over the questions,
    "n": questions}. Raises KeyError if a record's meta holds no "scene" (not a long-form split)."""
    probe = AccuracyProbe(processor, str(data), images, limit=limit, max_new_tokens=LONG_FORM_MAX_NEW_TOKENS)
    scenes = shapes.long_form_scenes(data)
    answers = probe.answers(model, processor)
    return {"exact": probe.score(answers), "n": len(answers),
            **shapes.mean_field_scores(answers, [scenes[r.sample_id] for r in probe.recs])}


def summarise_long(runs: list[dict], methods) -> dict:
    """Per method, the long-form scores' means over seeds (and the fields F1's spread)."""
    out = {}
    for m in methods:
        rs = [r["long_form"] for r in runs if r["method"] == m and r.get("long_form")]
        if rs:
            out[m] = {k: statistics.mean(x[k] for x in rs) for k in ("exact", *shapes.FIELDS, "fields")}
            out[m]["fields_std"] = statistics.pstdev(x["fields"] for x in rs)
            out[m]["n"] = len(rs)
    return out


# two-sided 95% quantiles of Student's t, by degrees of freedom (1-30); beyond, the normal's 1.96
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def paired_interval(a: list[float], b: list[float]) -> dict:
    """Mean of the per-seed differences a - b and its 95% confidence interval over seeds (paired t)."""
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = statistics.mean(d)
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n, "diffs": d}
    half = (_T975[n - 2] if n - 1 <= len(_T975) else 1.96) * statistics.stdev(d) / n ** 0.5
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n, "diffs": d}


def clustered_interval(diffs: dict) -> dict:
    """A comparison's mean difference over teachers x student seeds and its 95% interval with the teacher as the
    cluster, so that it holds the teacher's variance as well as the student seeds'.

    ``diffs`` maps each teacher (e.g. its seed) to its paired differences a - b, one per student seed (fractions,
    as paired_interval's). Each teacher's mean difference is one observation and the interval is paired_interval's
    paired t over those means (n_teachers - 1 degrees of freedom). Under the random-effects model of a nested design,
    d_ts = mu + T_t + S_ts (teacher effect T ~ N(0, sigma_T^2), student-seed effect S ~ N(0, sigma_S^2)), a teacher's
    mean over n_s seeds has variance sigma_T^2 + sigma_S^2 / n_s, so the spread of the teacher means carries both
    sources and with equal n_s the interval is exact (the one-way random-effects ANOVA's interval for mu, e.g.
    Montgomery, Design and Analysis of Experiments, nested designs). Pooling all teacher x seed differences into one
    paired t instead would count them as independent and understate the teacher's share.

    Returns {"mean", "low", "high" (None under 2 teachers), "n" (teachers), "runs" (differences in all),
    "teacher_means", "within_sd" (pooled sd of the differences about their teacher's mean; None without
    replicate seeds), "between_sd" (the ANOVA estimate of sigma_T, clipped at 0; None under 2 teachers)}.
    Raises ValueError for a teacher with no differences."""
    empty = [t for t, d in diffs.items() if not d]
    if empty:
        raise ValueError(f"clustered_interval: teacher(s) {empty} have no paired differences")
    means = [statistics.mean(d) for d in diffs.values()]
    p = paired_interval(means, [0.0] * len(means))
    df_w = sum(len(d) - 1 for d in diffs.values())
    within = (sum((x - m) ** 2 for d, m in zip(diffs.values(), means) for x in d) / df_w) if df_w else None
    between = None
    if len(means) > 1:
        n_h = statistics.harmonic_mean([len(d) for d in diffs.values()])
        between = max(0.0, statistics.variance(means) - (within or 0.0) / n_h) ** 0.5
    return {"mean": p["mean"], "low": p["low"], "high": p["high"], "n": len(means),
            "runs": sum(len(d) for d in diffs.values()), "teacher_means": means,
            "within_sd": within ** 0.5 if within is not None else None, "between_sd": between}


def interval_text(p: dict) -> str:
    """A paired_interval's 95% interval in points, e.g. "[-0.0, +20.8]" ("-" with one seed)."""
    return f"[{100 * p['low']:+.1f}, {100 * p['high']:+.1f}]" if p["low"] is not None else "-"


COMPARISONS = [("kd", "sft"), ("kd+iva", "sft"), ("kd+tpa", "sft"), ("alignti", "sft"), ("kd+iva", "kd"),
               ("kd+tpa", "kd"), ("alignti", "kd"), ("alignti", "kd+iva"), ("alignti", "kd+tpa")]


def paired_table(runs: list[dict], methods, key: str = "test_accuracy") -> list[dict]:
    """Every comparison of COMPARISONS whose methods ran: per-seed differences of ``key`` (test accuracy; or
    "long_form_fields": the long-form all-fields F1), paired by seed."""
    def value(r):
        return r["long_form"]["fields"] if key == "long_form_fields" else r[key]
    acc = {(r["method"], r["seed"]): value(r) for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    out = []
    for a, b in COMPARISONS:
        if a in methods and b in methods:
            out.append({"a": a, "b": b, **paired_interval([acc[(a, s)] for s in seeds], [acc[(b, s)] for s in seeds])})
    return out


def verdict(pairs: list[dict], source: str = "student seeds (one teacher)") -> str:
    """One sentence per comparison that the intervals decide; the rest named as not separable. ``source`` names
    what the intervals vary over: the quickstart's are paired t over student seeds for its one teacher, so they say
    nothing about a teacher trained on another machine (bench/teacher_variance.py varies the teacher too)."""
    above = [f"{p['a']} > {p['b']}" for p in pairs if p["low"] is not None and p["low"] > 0]
    below = [f"{p['a']} < {p['b']}" for p in pairs if p["high"] is not None and p["high"] < 0]
    open_ = [f"{p['a']} vs {p['b']}" for p in pairs if p["low"] is None or p["low"] <= 0 <= p["high"]]
    n = pairs[0]["n"] if pairs else 0
    parts = []
    if above or below:
        parts.append(f"The 95% intervals over {source} support " + ", ".join(above + below) + ".")
    if open_:
        parts.append(f"Not separable (the interval holds 0) at {n} {source}: " + ", ".join(open_) + ".")
    return " ".join(parts)


def summarise(runs: list[dict], methods) -> dict:
    out = {}
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        accs = [r["test_accuracy"] for r in rs]
        agr = [r["teacher_agreement"] for r in rs]
        kls = [r["train_kl_to_teacher"] for r in rs if r["train_kl_to_teacher"] is not None]
        out[m] = {"accuracy_mean": statistics.mean(accs), "accuracy_std": statistics.pstdev(accs),
                  "agreement_mean": statistics.mean(agr), "kl_mean": statistics.mean(kls) if kls else None,
                  "n": len(rs)}
    return out


def render_table(results: dict) -> str:
    lines = [f"Shapes VQA, test split ({results.get('test_questions', '?')} questions; {results['preset']} preset, "
             f"{results['seeds']} seeds, "
             f"{results['settings']['student_steps']} student steps; teacher {results['teacher_params'] / 1e6:.2f}M "
             f"params, student {results['student_params'] / 1e6:.2f}M)", "",
             "| method | test accuracy | agreement with teacher | KL to teacher (train) |", "|---|---|---|---|",
             f"| teacher | {100 * results['teacher_test_accuracy']:.1f} | - | - |"]
    for m, r in results["methods"].items():
        kl = f"{r['kl_mean']:.3f}" if r["kl_mean"] is not None else "-"
        lines.append(f"| {m} | {100 * r['accuracy_mean']:.1f} ± {100 * r['accuracy_std']:.1f} | "
                     f"{100 * r['agreement_mean']:.1f} | {kl} |")
    if results.get("paired"):
        lines += ["", f"Paired by seed (the same student initialisation): test accuracy difference, mean over "
                  f"{results['seeds']} student seeds and its 95% interval (paired t over student seeds, one teacher: "
                  "a teacher trained on another machine or seed varies too, bench/teacher_variance.py)", "",
                  "| comparison | difference | 95% interval | per seed |", "|---|---|---|---|"]
        for p in results["paired"]:
            lines.append(f"| {p['a']} − {p['b']} | {100 * p['mean']:+.1f} | {interval_text(p)} | "
                         + ", ".join(f"{100 * d:+.1f}" for d in p["diffs"]) + " |")
        lines += ["", results["verdict"]]
    lf = results.get("long_form")
    if lf:
        t = lf["teacher"]
        lines += ["", f"Long-form questions (test_long, {lf['test_questions']} questions \"Describe every shape in the "
                  f"picture.\", greedy, {lf['max_new_tokens']} new tokens): exact match and per-field F1", "",
                  "| method | exact match | position F1 | colour F1 | shape F1 | all fields F1 |", "|---|---|---|---|---|---|",
                  f"| teacher | {100 * t['exact']:.1f} | {100 * t['position']:.1f} | {100 * t['colour']:.1f} | "
                  f"{100 * t['shape']:.1f} | {100 * t['fields']:.1f} |"]
        for m, r in lf["methods"].items():
            lines.append(f"| {m} | {100 * r['exact']:.1f} | {100 * r['position']:.1f} | {100 * r['colour']:.1f} | "
                         f"{100 * r['shape']:.1f} | {100 * r['fields']:.1f} ± {100 * r['fields_std']:.1f} |")
        if lf.get("paired_fields_f1"):
            lines += ["", "Paired by seed: long-form all-fields F1 difference and its 95% interval (over student "
                      "seeds, one teacher)", "",
                      "| comparison | difference | 95% interval | per seed |", "|---|---|---|---|"]
            for p in lf["paired_fields_f1"]:
                lines.append(f"| {p['a']} − {p['b']} | {100 * p['mean']:+.1f} | {interval_text(p)} | "
                             + ", ".join(f"{100 * d:+.1f}" for d in p["diffs"]) + " |")
            lines += ["", lf["verdict"]]
    st = results.get("stage_seconds")
    if st:
        teacher = (f" (teacher {results['teacher_steps_run']} steps: training {st['teacher_training']:.0f} s, "
                   f"validation {st['teacher_validation']:.0f} s)" if results.get("teacher_steps_run") else "")
        lines += ["", f"Time (s): make-demo {st['make_demo']:.0f}{teacher}, dump {st['dump']:.0f}, teacher test "
                  f"{st['teacher_test']:.0f}, students {st['students_wall']:.0f} wall (summed over runs: training "
                  f"{st['students_train_sum']:.0f}, evaluation {st['students_eval_sum']:.0f} of which long-form "
                  f"{st['students_long_form_eval_sum']:.0f}); total {results['total_seconds']:.0f}"]
    sal = results.get("teacher_saliency_region")
    if sal:
        lines += ["", "Teacher saliency (cached, layer l*): share of samples whose top image token lies in the region "
                  "the question names: " + ", ".join(f"{t} {100 * r['hit_rate']:.0f}% (chance {100 * r['chance']:.0f}%)"
                                                     for t, r in sal.items())]
    return "\n".join(lines)


def plot_curves(runs: list[dict], methods, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for m in methods:
        curves = [r["curve"] for r in runs if r["method"] == m]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        steps = [curves[0][i]["step"] for i in range(n)]
        sft = [statistics.mean(c[i]["sft"] for c in curves) for i in range(n)]
        a1.plot(steps, sft, label=m)
        pts = sorted({x["step"] for c in curves for x in c if "val_accuracy" in x})
        acc = [statistics.mean(x["val_accuracy"] for c in curves for x in c if x["step"] == s and "val_accuracy" in x)
               for s in pts]
        a2.plot(pts, acc, marker="o", label=m)
    a1.set_xlabel("step")
    a1.set_ylabel("SFT loss (train)")
    a1.set_yscale("log")
    a2.set_xlabel("step")
    a2.set_ylabel("validation exact match")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
