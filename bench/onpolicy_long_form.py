"""On-policy distillation on the demo's long-form questions, at one student step budget, paired over seeds:

(a) ``offpolicy``: alignti on the quickstart's cache (teacher-forced on the references, the teacher's own TPA
    candidates): the quickstart's own ``runs/alignti-seedS`` when they exist;
(b) ``student-tpa``: ``rollout --teacher-forced`` (the references, the student's top-B candidates at every token)
    -> dump-teacher -> alignti, TPA after the student's candidates (the paper's TPA, no generation);
(c) ``rounds``: ``alignti rounds``, 2 on-policy rounds of half the steps each (round 2 ``--init`` round 1), the
    reference cache at 1 - lambda; lambda chosen on val_long (all-fields F1, mean over seeds), never on test.

Each arm starts from the quickstart's per-seed student (``kit/student-seedS``) and trains with the quickstart's
settings (alignti, lambda_TPA 0.5, frozen vision, lr, batch). Scored on val_long and test_long: exact match and
per-field F1 (demo/shapes.py ``field_scores``), greedy with 48 new tokens; TPA coverage (``tpa_mass``: the
student's probability on the cache's TPA candidates) at step 1 and over the run, from ``metrics.jsonl``.

    alignti quickstart --workdir qs            # the kit, its long-form splits, the reference cache, arm (a)
    python bench/onpolicy_long_form.py --quickstart qs --seeds 3 --lambdas 0.25,0.5 \
        --onpolicy-data qs/kit/data/train_long.json --json onpolicy.json

Figures (14.3 min on a shared 2-core CPU): bench/README.md, "On-policy on the long-form questions".
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quickstart", required=True, help="a finished quickstart workdir (with its long-form split)")
    ap.add_argument("--out", default=None, help="where the arms' runs go (default: QUICKSTART/onpolicy)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="student steps per arm (default: the quickstart's)")
    ap.add_argument("--lambdas", default="0.25,0.5", help="on-policy shares tried for (c), chosen on val_long")
    ap.add_argument("--onpolicy-data", default=None, help="what the student rolls out on (default: train + "
                                                          "train_long, the students' training data)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    qs = Path(a.quickstart)
    settings = json.loads((qs / "results.json").read_text())["settings"]
    p = {**PRESETS["default"], **settings}
    steps = a.steps or p["student_steps"]
    kit, data = qs / "kit", qs / "kit" / "data"
    images = str(data / "images")
    ref = str(qs / "cache")
    train_data = str(data / "train_all.json")
    roll_data = a.onpolicy_data or train_data
    out = Path(a.out) if a.out else qs / "onpolicy"
    device = resolve_device(a.device)
    lambdas = [float(x) for x in a.lambdas.split(",")]
    res: dict = {"steps": steps, "seeds": a.seeds, "lambdas": lambdas, "arms": {}}

    def arm(name: str, seed: int, fn) -> dict:
        done = out / name / f"seed{seed}.json"
        if done.is_file():
            return json.loads(done.read_text())
        final, run, key = fn()
        r = {**scores(final, data, images, device), **coverage(Path(run), key)}
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(r))
        log.info("%s seed %d: val fields F1 %.3f, test fields F1 %.3f, tpa_mass step 1 %s", name, seed,
                 r["val"]["fields"], r["test"]["fields"], r["tpa_mass_step1"])
        return r

    for seed in range(a.seeds):
        student = str(kit / f"student-seed{seed}")

        def offpolicy(seed=seed, student=student):
            run = qs / "runs" / f"alignti-seed{seed}"
            if not (run / "final" / "config.json").is_file() or steps != p["student_steps"]:
                run = out / "offpolicy" / f"run-seed{seed}"
                train_student(TrainConfig(student=student, cache=ref, out=str(run), device=a.device,
                                          **train_settings(p, seed, steps)))
            return str(run / "final"), run, "tpa_mass"

        def student_tpa(seed=seed, student=student):
            base = out / "student-tpa" / f"seed{seed}"
            rollout(RolloutConfig(student=student, data=train_data, images=images, out=str(base / "rollout"),
                                  teacher_forced=True, top_b=4, device=a.device))
            dump_teacher(DumpConfig(teacher=str(kit / "teacher"), data=str(base / "rollout"), images=images,
                                    out=str(base / "cache"), device=a.device, **DUMP))
            run = base / "run"
            if not (run / "final" / "config.json").is_file():
                train_student(TrainConfig(student=student, cache=str(base / "cache"), out=str(run), device=a.device,
                                          resume=(run / "checkpoint" / "state.pt").is_file(),
                                          **train_settings(p, seed, steps)))
            return str(run / "final"), run, "tpa_mass"

        res["arms"].setdefault("offpolicy", []).append(arm("offpolicy", seed, offpolicy))
        res["arms"].setdefault("student-tpa", []).append(arm("student-tpa", seed, student_tpa))
        for lam in lambdas:
            def rounds(seed=seed, student=student, lam=lam):
                cfg = resolve({"workdir": str(out / f"rounds-l{lam}" / f"seed{seed}"), "teacher": str(kit / "teacher"),
                               "student": student, "data": roll_data, "images": images, "reference_cache": ref,
                               "rounds": 2, "lambda": lam, "replay": 1, "device": a.device,
                               "rollout": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 48, "top_b": 4,
                                           "seed": 1000 * seed},
                               "dump": DUMP,
                               "train": train_settings(p, seed, steps // 2)}, "bench")
                r = run_rounds(cfg, "bench")
                # coverage on round 1's on-policy cache (cache1 beside the reference; the only cache at lambda 1)
                return r["final"], Path(r["rounds"][0]["run"]), "tpa_mass/cache1" if lam < 1 else "tpa_mass"
            res["arms"].setdefault(f"rounds-l{lam}", []).append(arm(f"rounds-l{lam}", seed, rounds))

    val = {lam: statistics.mean(r["val"]["fields"] for r in res["arms"][f"rounds-l{lam}"]) for lam in lambdas}
    best = max(lambdas, key=lambda lam: val[lam])
    res["lambda_chosen_on_val"] = best
    res["val_fields_by_lambda"] = val
    arms = {"(a) offpolicy": "offpolicy", "(b) student-tpa": "student-tpa", f"(c) rounds, lambda {best}": f"rounds-l{best}"}
    rows = []
    for label, key in arms.items():
        rs = res["arms"][key]
        m1 = [r["tpa_mass_step1"] for r in rs if r["tpa_mass_step1"] is not None]
        mm = [r["tpa_mass_mean"] for r in rs if r["tpa_mass_mean"] is not None]
        rows.append([label, f"{100 * statistics.mean(r['val']['fields'] for r in rs):.1f}",
                     f"{100 * statistics.mean(r['test']['exact'] for r in rs):.1f}",
                     f"{100 * statistics.mean(r['test']['fields'] for r in rs):.1f}",
                     f"{100 * statistics.mean(m1):.1f}%" if m1 else "-", f"{100 * statistics.mean(mm):.1f}%" if mm else "-"])
    print(table(rows, ["arm", "val fields F1", "test exact", "test fields F1", "tpa_mass step 1", "tpa_mass mean"]))
    base = [r["test"]["fields"] for r in res["arms"]["offpolicy"]]
    res["paired"] = {}
    for label, key in list(arms.items())[1:]:
        pi = paired_interval([r["test"]["fields"] for r in res["arms"][key]], base)
        res["paired"][key] = pi
        print(f"{label} - (a): {100 * pi['mean']:+.1f} {interval_text(pi)} per seed "
              + ", ".join(f"{100 * d:+.1f}" for d in pi["diffs"]))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
