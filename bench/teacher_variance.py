"""Does the quickstart's verdict hold for another teacher? Intervals over teachers x student seeds.

The quickstart's intervals are paired t over 3 student seeds for one teacher, so they say nothing about the
teacher, which differs from machine to machine (floating point, the step its curriculum stops at). This benchmark
runs the quickstart itself (demo/quickstart.py, ``quickstart()``: same preset, data splits, cache, students,
step budget and scoring) once per teacher seed (the ``teacher_seed`` override: the teacher's initialisation and
batch stream; the data splits are the same), and reports each comparison (a - b) on the short-question test
accuracy and the long-form all-fields F1 with a 95% interval that holds the teacher's variance too.

The interval: the teacher is the cluster (quickstart.clustered_interval). Within a teacher the differences are
paired by student seed (the same student initialisation for every method); each teacher's mean difference over
its student seeds is one observation, and the interval is a t interval over the teacher means (n_teachers - 1
degrees of freedom). Why this one: the student seeds of one teacher share that teacher, so pooling the 9
teacher x seed differences into one paired t would count them as independent and understate the teacher's share;
the teacher means' spread holds both sources (var = sigma_T^2 + sigma_S^2 / n_seeds), which makes the t interval
exact for normal effects with equal seeds per teacher. A two-level bootstrap (teachers, then student seeds) was
the alternative: with 3 teachers it sees at most 10 distinct teacher resamples and its percentile interval is
known to be too narrow for so few clusters, where the t interval with 2 degrees of freedom pays for them honestly
(t = 4.30). Each line also gives the teacher means and the ANOVA estimates of the between-teacher and the
within-teacher (student-seed) standard deviations, so one sees which source dominates.

Resumable: each teacher's work lies in OUT/teacher<seed>/ (kit.json once its teacher is trained, results.json once
its 15 students are scored), each student run in OUT/teacher<seed>/runs/<method>-seed<s>/result.json as it
finishes; re-running the same command skips what is done (the quickstart's own skip: a trained teacher, a
committed cache and a finished run are kept) and goes on; a teacher interrupted mid-training starts over (the demo
teacher keeps no checkpoint: at most its ~4 min on a quiet 2-core box). OUT/settings.json pins the preset and
overrides (another budget into the same OUT is refused); more teachers or student seeds may be added. After each
teacher, and at the end, a line per comparison; OUT/summary.md and OUT/summary.json hold the table from every
finished run.

    OMP_NUM_THREADS=1 nice -n 19 python bench/teacher_variance.py --out /work/variance-run [--teachers 0,1,2] \
        [--seeds 3] [--fast] [--overrides JSON] [--report-only] > /work/variance-run/run.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from _util import table

from alignti.demo.quickstart import (  # noqa: E402
    COMPARISONS, METHODS, PRESETS, QuickstartConfig, clustered_interval, quickstart)

log = logging.getLogger("alignti.bench.teacher_variance")

# metric name -> (what it is, a run's value or None)
METRICS = {
    "short": ("short-question test accuracy", lambda r: r["test_accuracy"]),
    "long_form": ("long-form all-fields F1", lambda r: r["long_form"]["fields"] if r.get("long_form") else None),
}


def check_settings(out: Path, fast: bool, overrides: dict) -> None:
    """Record the preset and overrides in OUT/settings.json on the first call; a later call with others is refused
    (SystemExit naming both and the fix), so one OUT never mixes students of two budgets. More teachers or student
    seeds may be added to an OUT (they only add runs)."""
    f = Path(out) / "settings.json"
    now = {"preset": "fast" if fast else "default", "overrides": overrides}
    if f.is_file():
        was = json.loads(f.read_text())
        if was != now:
            raise SystemExit(f"{out} holds runs made with {json.dumps(was)}, not {json.dumps(now)}: re-run with "
                             "those settings to resume, or give another --out")
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(now, indent=1))


def teacher_dir(out: Path, teacher: int) -> Path:
    return Path(out) / f"teacher{teacher}"


def teacher_done(work: Path, seeds: int, methods=METHODS) -> bool:
    """Whether WORK/results.json exists and holds every (method, student seed) run."""
    f = work / "results.json"
    if not f.is_file():
        return False
    have = {(r["method"], r["seed"]) for r in json.loads(f.read_text())["runs"]}
    return all((m, s) in have for m in methods for s in range(seeds))


def run_teacher(out: Path, teacher: int, seeds: int, fast: bool = False, overrides: dict | None = None,
                workers: int | None = None, device: str = "auto") -> None:
    """One teacher seed's quickstart (teacher, cache, the five students at ``seeds`` seeds) in OUT/teacher<seed>/,
    unless it is done; the quickstart keeps whatever an earlier, interrupted call finished."""
    work = teacher_dir(out, teacher)
    if teacher_done(work, seeds):
        log.info("teacher seed %d: done (%s), skipped", teacher, work / "results.json")
        return
    log.info("teacher seed %d: quickstart in %s", teacher, work)
    quickstart(QuickstartConfig(workdir=str(work), seeds=seeds, fast=fast, progress=False, workers=workers,
                                device=device, overrides={**(overrides or {}), "teacher_seed": teacher}))


def collect(out: Path, teachers: list[int], seeds: int) -> dict:
    """Every finished run under OUT: {teacher: {"runs": {(method, seed): result}, "kit": kit.json or None,
    "results": results.json or None}} for the teachers that have a work directory."""
    found = {}
    for t in teachers:
        work = teacher_dir(out, t)
        if not work.is_dir():
            continue
        runs = {}
        for f in sorted(work.glob("runs/*/result.json")):
            r = json.loads(f.read_text())
            if r["seed"] < seeds:
                runs[(r["method"], r["seed"])] = r
        read = (lambda f: json.loads(f.read_text()) if f.is_file() else None)
        found[t] = {"runs": runs, "kit": read(work / "kit.json"), "results": read(work / "results.json")}
    return found


def compare(found: dict, metric: str, seeds: int) -> list[dict]:
    """For each comparison (a, b) of the quickstart's COMPARISONS: the differences a - b per teacher, paired by
    student seed (only the seeds where both runs finished), and clustered_interval over the teachers that have
    any; comparisons no teacher has yet are left out."""
    value = METRICS[metric][1]
    out = []
    for a, b in COMPARISONS:
        diffs = {}
        for t, f in found.items():
            d = [value(f["runs"][(a, s)]) - value(f["runs"][(b, s)]) for s in range(seeds)
                 if (a, s) in f["runs"] and (b, s) in f["runs"] and value(f["runs"][(a, s)]) is not None
                 and value(f["runs"][(b, s)]) is not None]
            if d:
                diffs[t] = d
        if diffs:
            out.append({"a": a, "b": b, "metric": metric, "diffs": {str(t): d for t, d in diffs.items()},
                        **clustered_interval(diffs)})
    return out


def _pts(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}"


def verdict(c: dict) -> str:
    if c["low"] is None:
        return "one teacher: no interval"
    if c["low"] > 0:
        return f"{c['a']} > {c['b']}"
    if c["high"] < 0:
        return f"{c['a']} < {c['b']}"
    return "not separable"


def report(out: Path, teachers: list[int], seeds: int) -> str:
    """The teachers' table and one line per comparison and metric, from every finished run; also written to
    OUT/summary.md and OUT/summary.json."""
    found = collect(out, teachers, seeds)
    rows = []
    for t, f in found.items():
        k, r = f["kit"] or {}, f["results"] or {}
        lf = (r.get("long_form") or {}).get("teacher") or {}
        rows.append([t, k.get("teacher_steps_run", "-"),
                     f"{100 * r['teacher_test_accuracy']:.1f}" if r else "-",
                     f"{100 * lf['exact']:.1f} / {100 * lf['fields']:.1f}" if lf else "-",
                     f"{len(f['runs'])}/{len(METHODS) * seeds}",
                     f"{r['total_seconds'] / 60:.1f}" if r else "-"])
    lines = [f"teacher x student seeds: {len(found)} teacher(s) of {len(teachers)}, {seeds} student seeds each",
             table(rows, ["teacher seed", "teacher steps", "teacher short test", "teacher long exact / F1",
                          "student runs done", "quickstart min"]), ""]
    summary = {"teachers": teachers, "seeds": seeds, "comparisons": []}
    for metric, (what, _) in METRICS.items():
        cs = compare(found, metric, seeds)
        summary["comparisons"] += cs
        if not cs:
            continue
        lines.append(f"{what}: difference a - b (points), mean over teachers x student seeds, 95% interval with the "
                     "teacher as the cluster (t over teacher means)")
        crow = [[f"{c['a']} - {c['b']}", _pts(c["mean"]), f"[{_pts(c['low'])}, {_pts(c['high'])}]", verdict(c),
                 ", ".join(_pts(m) for m in c["teacher_means"]),
                 f"{_pts(c['between_sd'])[1:] if c['between_sd'] is not None else '-'} / "
                 f"{_pts(c['within_sd'])[1:] if c['within_sd'] is not None else '-'}",
                 f"{c['n']} x {c['runs'] / c['n']:g}"]
                for c in cs]
        lines += [table(crow, ["comparison", "mean", "95% interval", "verdict", "per teacher",
                               "sd teacher / student seed", "teachers x seeds"]), ""]
    text = "\n".join(lines)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "summary.md").write_text(text + "\n")
    (Path(out) / "summary.json").write_text(json.dumps(summary, indent=1))
    return text


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="work folder (outside the repository); re-run to resume")
    ap.add_argument("--teachers", default="0,1,2", help="teacher seeds, comma-separated (0 is the quickstart's)")
    ap.add_argument("--seeds", type=int, default=3, help="student seeds per teacher")
    ap.add_argument("--fast", action="store_true", help="the quickstart's --fast preset (mechanics only)")
    ap.add_argument("--overrides", default="{}", help="quickstart overrides as JSON (e.g. a tiny smoke run)")
    ap.add_argument("--workers", type=int, default=None, help="student runs side by side (quickstart's default)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--report-only", action="store_true", help="print the table from the finished runs, train nothing")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    teachers = [int(t) for t in a.teachers.split(",")]
    if len(teachers) != len(set(teachers)):
        raise SystemExit(f"--teachers {a.teachers}: a teacher seed is given twice")
    overrides = json.loads(a.overrides)
    preset = PRESETS["fast" if a.fast else "default"]
    log.info("%s preset: teacher up to %d steps, students %d steps; teachers %s x %d student seeds",
             "fast" if a.fast else "default", overrides.get("teacher_steps", preset["teacher_steps"]),
             overrides.get("student_steps", preset["student_steps"]), teachers, a.seeds)
    if not a.report_only:
        check_settings(Path(a.out), a.fast, overrides)
        for t in teachers:
            run_teacher(Path(a.out), t, a.seeds, a.fast, overrides, a.workers, a.device)
            print(report(Path(a.out), teachers, a.seeds), flush=True)
    print(report(Path(a.out), teachers, a.seeds), flush=True)


if __name__ == "__main__":
    main()
