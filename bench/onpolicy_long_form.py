"""On-policy distillation on the demo's long-form questions, at one student step budget, paired over seeds:

(a) ``offpolicy``: alignti on the quickstart's cache (teacher-forced on the references, the teacher's own TPA
    candidates): the quickstart's own ``runs/alignti-seedS`` when they exist;
(b) ``student-tpa``: ``rollout --teacher-forced`` (the references, the student's top-B candidates at every token)
    -> dump-teacher -> alignti, TPA after the student's candidates (the paper's TPA, no generation);
(c) ``rounds``: ``alignti rounds``, 2 on-policy rounds of half the steps each (round 2 ``--init`` round 1), the
    reference cache at 1 - lambda; lambda chosen on val_long (all-fields F1, mean over seeds), never on test.

Each arm starts from the same student: by default the quickstart's per-seed student (``kit/student-seedS``, paired
on initialisation); ``--student-from make-student:SPEC`` the teacher pruned to its decoder layers SPEC
(``student_build.prune.prune_student``: the teacher's vision tower, projector, embeddings, head and those layers;
written once to OUT/student-pruned-SPEC), ``--student-from DIR`` a saved student. Those have one initialisation, so
the seeds pair on data order and sampling only (train ``seed``; rollout ``seed`` 1000 * S), and (b)'s teacher-forced
rollout and its cache, the same for every seed, are made once (OUT/student-tpa/shared). Each arm trains with the
quickstart's settings (alignti, lambda_TPA 0.5, frozen vision, lr unless ``--lr``, batch). Scored on val_long and
test_long: exact match and per-field F1 (demo/shapes.py ``field_scores``), greedy with 48 new tokens; TPA coverage
(``tpa_mass``: the student's probability on the cache's TPA candidates) at step 1 and over the run, from
``metrics.jsonl``; for (c), the share of each round's rollout rows whose cache holds the student's generated ids
(``rollout.json``'s ``retokenized_differs``: the rows where it does not).

    alignti quickstart --workdir qs            # the kit, its long-form splits, the reference cache, arm (a)
    python bench/onpolicy_long_form.py --quickstart qs --seeds 3 --lambdas 0.25,0.5 \
        --onpolicy-data qs/kit/data/train_long.json --json onpolicy.json
    python bench/onpolicy_long_form.py --quickstart qs --out /tmp/op-pruned --student-from make-student:0 \
        --seeds 3 --steps 1600 --lr 3e-4 --lambdas 0.25,0.5 --onpolicy-data qs/kit/data/train_long.json \
        --json onpolicy-pruned.json

Figures: bench/README.md, "On-policy on the long-form questions" (14.3 min on a shared 2-core CPU) and "... with a
pruned student" (48 min).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path

from _util import table

from alignti.common.models import load_vlm, resolve_device  # noqa: E402
from alignti.demo.quickstart import PRESETS, interval_text, long_form_scores, paired_interval  # noqa: E402
from alignti.student_build.prune import prune_student  # noqa: E402
from alignti.student_rollout.rollout import RolloutConfig, rollout  # noqa: E402
from alignti.student_train.trainer import TrainConfig, train_student  # noqa: E402
from alignti.teacher_dump.dump import DumpConfig, dump_teacher  # noqa: E402
from alignti.workflows.rounds import resolve, run_rounds  # noqa: E402

log = logging.getLogger("bench.onpolicy")
DUMP = dict(saliency_query="answer", tpa_branches=4, top_k=32)


def train_settings(p: dict, seed: int, steps: int) -> dict:
    return dict(loss="alignti", max_steps=steps, batch_size=p["batch_size"], lr=p["lr"], seed=seed,
                save_every=steps, workers=0, **p["train"])


def scores(final: str, data: Path, images: str, device) -> dict:
    model, proc = load_vlm(final, device)
    return {split: long_form_scores(model, proc, data / f"{split}_long.json", images) for split in ("val", "test")}


def coverage(run: Path, key: str = "tpa_mass") -> dict:
    """``key`` at the first step that has it, and its mean over the run. A mixture run logs it per cache
    (``tpa_mass/cache1``: the on-policy cache's own coverage; a step that drew no batch from it has none)."""
    m = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    mass = [x[key] for x in m if x.get(key) is not None]
    return {"tpa_mass_step1": mass[0] if mass else None, "tpa_mass_mean": statistics.mean(mass) if mass else None}


def generated_ids_kept(rollout_dir: Path) -> dict:
    """A rollout's rows, and those whose cache holds the student's generated ids (rows - ``retokenized_differs``)."""
    c = json.loads((rollout_dir / "rollout.json").read_text())["counts"]
    return {"rows": c["rows"], "generated_ids_kept": c["rows"] - c["retokenized_differs"]}


def pct(rs: list[dict], key: str, split: str = "test") -> str:
    return f"{100 * statistics.mean(r[split][key] for r in rs):.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quickstart", required=True, help="a finished quickstart workdir (with its long-form split)")
    ap.add_argument("--out", default=None, help="where the arms' runs go (default: QUICKSTART/onpolicy)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="student steps per arm (default: the quickstart's)")
    ap.add_argument("--lr", type=float, default=None, help="the students' peak learning rate (default: the "
                                                           "quickstart's; choose it on val_long)")
    ap.add_argument("--lambdas", default="0.25,0.5", help="on-policy shares tried for (c), chosen on val_long")
    ap.add_argument("--onpolicy-data", default=None, help="what the student rolls out on (default: train + "
                                                          "train_long, the students' training data)")
    ap.add_argument("--student-from", default="kit",
                    help="kit (kit/student-seedS), make-student:SPEC (the teacher pruned to decoder layers SPEC) or a "
                         "student folder")
    ap.add_argument("--arms", default="offpolicy,student-tpa,rounds", help="arms to run (a probe: offpolicy)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    qs = Path(a.quickstart)
    settings = json.loads((qs / "results.json").read_text())["settings"]
    p = {**PRESETS["default"], **settings}
    if a.lr is not None:
        p["lr"] = a.lr
    steps = a.steps or p["student_steps"]
    kit, data = qs / "kit", qs / "kit" / "data"
    images = str(data / "images")
    ref = str(qs / "cache")
    train_data = str(data / "train_all.json")
    roll_data = a.onpolicy_data or train_data
    out = Path(a.out) if a.out else qs / "onpolicy"
    per_seed = a.student_from == "kit"
    if a.student_from.startswith("make-student:"):
        spec = a.student_from.split(":", 1)[1]
        fixed = out / f"student-pruned-{spec.replace(' ', '')}"
        if not (fixed / "config.json").is_file():
            prune_student(str(kit / "teacher"), spec, fixed)
    elif not per_seed:
        fixed = Path(a.student_from)
        if not (fixed / "config.json").is_file():
            raise SystemExit(f"--student-from {a.student_from}: no config.json there; give kit, make-student:SPEC or "
                             "a student folder")
    arms_run = set(a.arms.split(","))
    device = resolve_device(a.device)
    lambdas = [float(x) for x in a.lambdas.split(",")]
    res: dict = {"steps": steps, "lr": p["lr"], "seeds": a.seeds, "lambdas": lambdas, "student_from": a.student_from,
                 "arms": {}}

    kept: dict = {}  # a rounds arm's rollouts: rows whose cache holds the generated ids

    def arm(name: str, seed: int, fn) -> dict:
        done = out / name / f"seed{seed}.json"
        if done.is_file():
            return json.loads(done.read_text())
        kept.clear()
        final, run, key = fn()
        r = {**scores(final, data, images, device), **coverage(Path(run), key), "rollouts": dict(kept)}
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(r))
        log.info("%s seed %d: val fields F1 %.3f, test fields F1 %.3f, tpa_mass step 1 %s", name, seed,
                 r["val"]["fields"], r["test"]["fields"], r["tpa_mass_step1"])
        return r

    for seed in range(a.seeds):
        student = str(kit / f"student-seed{seed}") if per_seed else str(fixed)

        def offpolicy(seed=seed, student=student):
            run = qs / "runs" / f"alignti-seed{seed}"
            if not per_seed or a.lr is not None or not (run / "final" / "config.json").is_file() \
                    or steps != p["student_steps"]:
                run = out / "offpolicy" / f"run-seed{seed}"
                train_student(TrainConfig(student=student, cache=ref, out=str(run), device=a.device,
                                          **train_settings(p, seed, steps)))
            return str(run / "final"), run, "tpa_mass"

        def student_tpa(seed=seed, student=student):
            base = out / "student-tpa" / f"seed{seed}"
            shared = base if per_seed else out / "student-tpa" / "shared"  # one student: one teacher-forced rollout
            rollout(RolloutConfig(student=student, data=train_data, images=images, out=str(shared / "rollout"),
                                  teacher_forced=True, top_b=4, device=a.device))
            dump_teacher(DumpConfig(teacher=str(kit / "teacher"), data=str(shared / "rollout"), images=images,
                                    out=str(shared / "cache"), device=a.device, **DUMP))
            run = base / "run"
            if not (run / "final" / "config.json").is_file():
                train_student(TrainConfig(student=student, cache=str(shared / "cache"), out=str(run), device=a.device,
                                          resume=(run / "checkpoint" / "state.pt").is_file(),
                                          **train_settings(p, seed, steps)))
            return str(run / "final"), run, "tpa_mass"

        if "offpolicy" in arms_run:
            res["arms"].setdefault("offpolicy", []).append(arm("offpolicy", seed, offpolicy))
        if "student-tpa" in arms_run:
            res["arms"].setdefault("student-tpa", []).append(arm("student-tpa", seed, student_tpa))
        for lam in lambdas if "rounds" in arms_run else []:
            def rounds(seed=seed, student=student, lam=lam):
                cfg = resolve({"workdir": str(out / f"rounds-l{lam}" / f"seed{seed}"), "teacher": str(kit / "teacher"),
                               "student": student, "data": roll_data, "images": images, "reference_cache": ref,
                               "rounds": 2, "lambda": lam, "replay": 1, "device": a.device,
                               "rollout": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 48, "top_b": 4,
                                           "seed": 1000 * seed},
                               "dump": DUMP,
                               "train": train_settings(p, seed, steps // 2)}, "bench")
                r = run_rounds(cfg, "bench")
                kept.update({f"round{x['round']}": generated_ids_kept(Path(x["rollout"])) for x in r["rounds"]})
                # coverage on round 1's on-policy cache (cache1 beside the reference; the only cache at lambda 1)
                return r["final"], Path(r["rounds"][0]["run"]), "tpa_mass/cache1" if lam < 1 else "tpa_mass"
            res["arms"].setdefault(f"rounds-l{lam}", []).append(arm(f"rounds-l{lam}", seed, rounds))

    labels = {"offpolicy": "(a) offpolicy", "student-tpa": "(b) student-tpa"}
    if "rounds" in arms_run:
        val = {lam: statistics.mean(r["val"]["fields"] for r in res["arms"][f"rounds-l{lam}"]) for lam in lambdas}
        best = max(lambdas, key=lambda lam: val[lam])
        res["lambda_chosen_on_val"] = best
        res["val_fields_by_lambda"] = val
        labels.update({f"rounds-l{lam}": f"(c) rounds, lambda {lam}" + ("" if lam == best else " (not chosen)")
                       for lam in lambdas})
    arms = {key: label for key, label in labels.items() if key in res["arms"]}
    rows = []
    for key, label in arms.items():
        rs = res["arms"][key]
        m1 = [r["tpa_mass_step1"] for r in rs if r["tpa_mass_step1"] is not None]
        mm = [r["tpa_mass_mean"] for r in rs if r["tpa_mass_mean"] is not None]
        ro = [r.get("rollouts", {}) for r in rs]
        kept_txt = " / ".join(f"{sum(x[rd]['generated_ids_kept'] for x in ro)}/{sum(x[rd]['rows'] for x in ro)}"
                              for rd in ("round1", "round2") if all(rd in x for x in ro)) or "-"
        rows.append([label, pct(rs, "exact", "val"), pct(rs, "fields", "val"), pct(rs, "exact"), pct(rs, "position"),
                     pct(rs, "colour"), pct(rs, "shape"),
                     pct(rs, "fields") + " (" + ", ".join(f"{100 * r['test']['fields']:.1f}" for r in rs) + ")",
                     f"{100 * statistics.mean(m1):.1f}%" if m1 else "-",
                     f"{100 * statistics.mean(mm):.1f}%" if mm else "-", kept_txt])
    print(table(rows, ["arm", "val exact", "val fields F1", "test exact", "position F1", "colour F1", "shape F1",
                       "all fields F1 (per seed)", "tpa_mass step 1", "tpa_mass mean", "generated ids kept r1 / r2"]))
    res["paired"] = {}
    if "offpolicy" in res["arms"]:
        chosen = [k for k in arms if k != "offpolicy" and "not chosen" not in arms[k]]
        for key in chosen:
            for metric in ("fields", "exact"):
                pi = paired_interval([r["test"][metric] for r in res["arms"][key]],
                                     [r["test"][metric] for r in res["arms"]["offpolicy"]])
                res["paired"][f"{key} {metric}"] = pi
                print(f"{arms[key]} - (a), test {metric}: {100 * pi['mean']:+.1f} {interval_text(pi)} per seed "
                      + ", ".join(f"{100 * d:+.1f}" for d in pi["diffs"]))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
