"""Choose Align-TI's defaults on the demo's validation split (never on test), and look at why TPA can hurt IVA.

Every setting trains the quickstart's students (same kit, cache, seeds and step budget) and is scored on the whole
validation split (600 questions); each row gives mean +- sd over seeds and the paired difference to the first
setting with its 95% interval. With ``--diagnose``, the first setting's trained alignti students also get, on 16
training batches, the loss terms' sizes and the cosine between the IVA and TPA gradients on the parameters they
share (and each term's gradient norm, against the clipping norm).

    python bench/method_sweep.py [--workdir DIR] [--seeds 3] [--settings NAME,...] [--diagnose]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import torch
from _util import table

from alignti.demo.quickstart import PRESETS, QuickstartConfig, interval_text, paired_interval, quickstart  # noqa: E402

# name -> (method, train-student settings)
SETTINGS = {
    "alignti": ("alignti", {}),
    "kd+iva": ("kd+iva", {}),
    "kd+tpa": ("kd+tpa", {}),
    "alignti tpa=0.5": ("alignti", {"tpa_weight": 0.5}),
    "alignti tpa=0.25": ("alignti", {"tpa_weight": 0.25}),
    "alignti student-weighted": ("alignti", {"tpa_weighting": "student"}),
    "alignti student-weighted tpa=0.5": ("alignti", {"tpa_weighting": "student", "tpa_weight": 0.5}),
    "alignti clip=5": ("alignti", {"max_grad_norm": 5.0}),
    "alignti iva=2": ("alignti", {"iva_weight": 2.0}),
    "alignti token-kl": ("alignti", {"iva_form": "token-kl"}),
    "alignti tpa=0.5 token-kl": ("alignti", {"tpa_weight": 0.5, "iva_form": "token-kl"}),
    "alignti tpa=0.5 iva=2": ("alignti", {"tpa_weight": 0.5, "iva_weight": 2.0}),
    "kd+iva token-kl": ("kd+iva", {"iva_form": "token-kl"}),
}


def link(src: Path, dst: Path, subs) -> None:
    """dst shares src's kit (and cache): symlinks, and the kit's info file."""
    if not (dst / "kit").exists():
        dst.mkdir(parents=True, exist_ok=True)
        for sub in subs:
            (dst / sub).symlink_to((src / sub).resolve(), target_is_directory=True)
        shutil.copy(src / "kit.json", dst / "kit.json")


def run_setting(work: Path, name: str, seeds: int, fast: bool = False) -> dict:
    method, train = SETTINGS[name]
    d = work / name.replace(" ", "_").replace("=", "").replace("+", "_")
    link(work / "base", d, ("kit", "cache"))  # the same kit and cache: only training differs
    return quickstart(QuickstartConfig(workdir=str(d), seeds=seeds, methods=(method,), progress=False, fast=fast,
                                       overrides={"train": train}))


def diagnose(work: Path, res: dict, batches: int = 16) -> list[dict]:
    """Loss-term sizes and the IVA/TPA gradient cosine on shared parameters, per trained alignti student."""
    from alignti.common.adapters import adapter_for
    from alignti.common.cache import CacheReader
    from alignti.common.losses import LossWeights, StepNorm, get_loss
    from alignti.common.models import load_vlm
    from alignti.student_train.data import CacheDataset, StudentCollator
    from alignti.student_train.step import StudentStep
    from alignti.student_train.trainer import student_layer_for

    reader = CacheReader(str(work / "base" / "cache"))
    out = []
    for r in res["runs"]:
        if r["method"] != "alignti":
            continue
        run_dir = Path(res.get("workdir", work / "base")) / "runs" / f"alignti-seed{r['seed']}" / "final"
        model, proc = load_vlm(str(run_dir), torch.device("cpu"), "float32")
        adapter = adapter_for(model)
        layer = student_layer_for(None, reader.params["saliency_layer"], reader.params["teacher_layers"],
                                  adapter.num_layers)
        data, coll = CacheDataset(reader, proc), StudentCollator(proc, type(adapter))
        params = [p for p in model.parameters() if p.requires_grad]
        cos, norms = [], {"iva": [], "tpa": [], "kd": []}
        g = torch.Generator().manual_seed(r["seed"])
        order = torch.randperm(len(reader), generator=g).tolist()
        for b in range(batches):
            batch = coll([data[i] for i in order[b * 16:(b + 1) * 16]])
            grads = {}
            for term, w in [("base", LossWeights(kd=0, iva=0, tpa=0)), ("iva", LossWeights(kd=0, iva=1, tpa=0)),
                            ("tpa", LossWeights(kd=0, iva=0, tpa=1)), ("kd", LossWeights(kd=1, iva=0, tpa=0))]:
                model.zero_grad(set_to_none=True)
                step = StudentStep(model, adapter, get_loss("alignti"), layer, w)
                step(batch, StepNorm.of(batch))["loss"].backward()
                grads[term] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                                         for p in params])
            gi, gt, gk = grads["iva"] - grads["base"], grads["tpa"] - grads["base"], grads["kd"] - grads["base"]
            shared = (gi != 0) & (gt != 0)
            cos.append(torch.nn.functional.cosine_similarity(gi[shared], gt[shared], dim=0).item())
            for k, v in (("iva", gi), ("tpa", gt), ("kd", gk)):
                norms[k].append(v.norm().item())
        last = [json.loads(x) for x in (run_dir.parent / "metrics.jsonl").read_text().splitlines()][-50:]
        out.append({"seed": r["seed"], "cos_iva_tpa": statistics.mean(cos),
                    **{f"grad_norm_{k}": statistics.mean(v) for k, v in norms.items()},
                    **{f"term_{k}": statistics.mean(x[k] for x in last) for k in ("sft", "kd", "iva", "tpa")}})
        print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "alignti-method-sweep"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--diagnose", action="store_true")
    ap.add_argument("--fast", action="store_true", help="the fast preset (a smoke run of the script)")
    ap.add_argument("--kit-from", default=None, help="a workdir whose kit to reuse (the cache is dumped anew)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    work = Path(a.workdir)
    names = a.settings.split(",")
    # the base quickstart makes the kit and the cache (and the first setting's runs)
    if a.kit_from:
        link(Path(a.kit_from), work / "base", ("kit",))
    base = quickstart(QuickstartConfig(workdir=str(work / "base"), seeds=a.seeds, methods=(SETTINGS[names[0]][0],),
                                       progress=False, fast=a.fast, overrides={"train": SETTINGS[names[0]][1]}))
    results = {names[0]: base}
    for name in names[1:]:
        results[name] = run_setting(work, name, a.seeds, a.fast)
    ref = [r["val_accuracy"] for r in sorted(base["runs"], key=lambda r: r["seed"])]
    rows, figures = [], {}
    for name, res in results.items():
        val = [r["val_accuracy"] for r in sorted(res["runs"], key=lambda r: r["seed"])]
        test = [r["test_accuracy"] for r in res["runs"]]
        p = paired_interval(val, ref)
        rows.append([name, f"{100 * statistics.mean(val):.1f} ± {100 * statistics.pstdev(val):.1f}",
                     ", ".join(f"{100 * v:.1f}" for v in val), f"{100 * p['mean']:+.1f} {interval_text(p)}"])
        figures[name] = {"val": val, "test_not_used_for_choice": test, "paired_vs_first": p}
    preset = PRESETS["fast" if a.fast else "default"]
    print(f"\nvalidation split ({preset['n_val'] * 3} questions), {a.seeds} seeds, {preset['student_steps']} steps")
    print(table(rows, ["setting", "val accuracy", "per seed", f"paired vs {names[0]} [95%]"]))
    if a.diagnose:
        figures["diagnose"] = diagnose(work, dict(base, workdir=str(work / "base")))
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
