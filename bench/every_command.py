"""Every command on one family's demo kit, as a user runs them (subprocesses of ``python -m alignti``): make-demo
--family F --no-train-teacher, select-layer, dump-teacher, rollout, train-student with every loss, ``--trainable
projector`` and LoRA, evaluate, rounds (two rounds), make-student --from-teacher. Prints one line per command with
its exit code and seconds; exits 1 if any failed.

``python bench/every_command.py FAMILY [FAMILY ...] [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
LOSSES = ("sft", "kd", "rkl", "jsd", "kd+iva", "kd+tpa", "alignti")


def run(name: str, *args) -> bool:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "alignti", *map(str, args)], env=env, cwd=ROOT,
                       capture_output=True, text=True)
    ok = p.returncode == 0
    print(f"{name:<40} rc={p.returncode} {time.perf_counter() - t:6.1f}s", flush=True)
    if not ok:
        print((p.stdout + p.stderr)[-3000:], flush=True)
    return ok


def family(fam: str, root: Path) -> bool:
    kit, ok = root / "kit", []
    small = ("--n-train", 6, "--n-val", 2, "--n-test", 2)
    ok.append(run("make-demo", "make-demo", kit, "--family", fam, "--no-train-teacher", *small))
    data, images = kit / "data/train.json", kit / "data/images"
    ok.append(run("select-layer", "select-layer", "--teacher", kit / "teacher", "--data", data, "--images", images,
                  "--samples", 4, "--device", "cpu"))
    ok.append(run("dump-teacher", "dump-teacher", "--teacher", kit / "teacher", "--data", data, "--images", images,
                  "--out", root / "cache", "--irs-samples", 4, "--batch-size", 4, "--device", "cpu"))
    ok.append(run("rollout", "rollout", "--student", kit / "student", "--data", data, "--images", images,
                  "--out", root / "rollout", "--max-new-tokens", 4, "--device", "cpu"))
    train = ("--student", kit / "student", "--cache", root / "cache", "--max-steps", 2, "--batch-size", 4,
             "--device", "cpu")
    for loss in LOSSES:
        ok.append(run(f"train-student --loss {loss}", "train-student", *train, "--loss", loss,
                      "--out", root / f"run-{loss.replace('+', '_')}"))
    ok.append(run("train-student --trainable projector", "train-student", *train, "--loss", "alignti",
                  "--trainable", "projector", "--out", root / "run-projector"))
    ok.append(run("train-student --lora-r 4", "train-student", *train, "--loss", "alignti", "--lora-r", 4,
                  "--out", root / "run-lora"))
    ok.append(run("evaluate", "evaluate", "--model", root / "run-alignti/final", "--data", kit / "data/test.json",
                  "--images", images, "--cache", root / "cache", "--json", "--device", "cpu"))
    ok.append(run("make-student --from-teacher", "make-student", "--from-teacher", kit / "teacher",
                  "--keep-layers", "0", "--out", root / "pruned"))
    from alignti.workflows.rounds import template
    cfg = yaml.safe_load(template())
    items = [it for it in json.loads(data.read_text()) if len(it["conversations"]) == 2][:4]
    (root / "d.json").write_text(json.dumps(items))
    cfg.update(workdir=str(root / "work"), teacher=str(kit / "teacher"), student=str(kit / "student"),
               data=str(root / "d.json"), images=str(images), device="cpu", replay=1)
    cfg["rollout"] = {**cfg["rollout"], "max_new_tokens": 4, "batch_size": 4, "top_b": 2, "temperature": [1.0, 0.7]}
    cfg["dump"] = {**cfg["dump"], "top_k": 8, "tpa_branches": 2, "tpa_top_k": 4, "irs_samples": 2, "batch_size": 4}
    cfg["train"] = {**cfg["train"], "max_steps": 2, "batch_size": 2, "save_every": 1, "warmup_steps": 1}
    (root / "rounds.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    ok.append(run("rounds", "rounds", "--config", root / "rounds.yaml"))
    return all(ok)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("families", nargs="+")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    good = True
    for fam in args.families:
        print(f"== {fam}", flush=True)
        root = Path(args.out or tempfile.mkdtemp(prefix="every_command_")) / fam
        root.mkdir(parents=True, exist_ok=True)
        good &= family(fam, root)
    sys.exit(0 if good else 1)


if __name__ == "__main__":
    main()
