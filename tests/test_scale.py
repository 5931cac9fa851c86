"""Scale-out and reliability: torchrun dumps and training with 2 CPU processes, kill -9 at random points
and at named fail points (shard flush, part move, commit marker, manifest), resume with another
process count. Every process here runs with one intra-op thread, so results compare bit for bit."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr

from alignti.student_train.trainer import MEASURED

ROOT = Path(__file__).resolve().parents[1]


def alignti(*args, crash: str | None = None, check: bool = True, timeout: int = 240, **popen):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("ALIGNTI_CRASH_AT", None)
    if crash:
        env["ALIGNTI_CRASH_AT"] = crash
    cmd = [sys.executable, "-m", "alignti", *map(str, args)]
    if popen.pop("background", False):
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def dump_args(kit, out, *extra):
    return ["dump-teacher", "--teacher", kit / "teacher", "--data", kit / "data/train.json", "--images",
            kit / "data/images", "--out", out, "--limit", 30, "--unit-size", 6, "--batch-size", 4,
            "--saliency-layer", 1, *extra]


def assert_same_cache(a: Path, b: Path) -> None:
    """Bit-for-bit: every part's every array and its sample table (so also the sample order)."""
    ma, mb = json.loads((a / "manifest.json").read_text()), json.loads((b / "manifest.json").read_text())
    assert ma["units"] == mb["units"] and ma["counts"] == mb["counts"]
    assert ma["files"] == mb["files"]  # the sha256 of every object
    for part in ma["parts"]:
        za, zb = zarr.open_group(str(a / "parts" / f"{part['name']}.zarr"), mode="r"), \
            zarr.open_group(str(b / "parts" / f"{part['name']}.zarr"), mode="r")
        assert sorted(za.array_keys()) == sorted(zb.array_keys())
        for k in za.array_keys():
            assert np.array_equal(za[k][...], zb[k][...]), (part["name"], k)
        ta, tb = (pq.read_table(c / "parts" / f"{part['name']}.parquet") for c in (a, b))
        assert ta.equals(tb)
    assert not list(b.rglob("*.tmp*")), "temporary files left behind"


@pytest.fixture(scope="module")
def reference(kit, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "cache"
    alignti(*dump_args(kit, out))
    return out


def test_torchrun_dump_two_processes_matches_one(kit, reference, tmp_path):
    out = tmp_path / "c"
    res = alignti(*dump_args(kit, out, "--nproc", 2))
    assert json.loads(res.stdout.strip().splitlines()[-1])["samples"] == 30  # printed once, by rank 0
    assert_same_cache(reference, out)
    # a re-run of a finished dump does nothing; a dump with other parameters is refused
    assert "already complete" in alignti(*dump_args(kit, out, "--nproc", 2)).stderr
    bad = alignti(*dump_args(kit, out, "--top-k", 16), check=False)
    assert bad.returncode != 0 and "different" in bad.stderr


def test_kill9_at_fail_points_then_resume_with_other_process_counts(kit, reference, tmp_path):
    """A chain: killed while flushing a shard, resumed (1 proc) and killed between moving a part's
    zarr and its parquet, resumed and killed with a marker half-written, resumed and killed while
    writing the manifest, resumed with 2 processes: identical to the uninterrupted dump."""
    out = tmp_path / "c"
    for point in ("shard-flush:3", "part-move:2", "marker:2", "manifest"):
        res = alignti(*dump_args(kit, out), crash=point, check=False)
        assert res.returncode == -signal.SIGKILL, (point, res.stderr[-2000:])
        assert not (out / "manifest.json").exists()
    res = alignti(*dump_args(kit, out, "--nproc", 2))
    assert_same_cache(reference, out)


@pytest.mark.parametrize("seed", [0, 1])
def test_kill9_at_random_moments_then_resume(kit, reference, tmp_path, seed):
    rng = random.Random(seed)
    out = tmp_path / "c"
    proc = alignti(*dump_args(kit, out), background=True)
    deadline = time.time() + 120
    while not (out / "plan.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 1.5))  # somewhere in the dump loop (the whole loop takes ~2 s here)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    alignti(*dump_args(kit, out, "--nproc", 1 + seed))
    assert_same_cache(reference, out)


def train_args(kit, cache, out, *extra):
    return ["train-student", "--student", kit / "student", "--cache", cache, "--out", out, "--loss", "alignti",
            "--max-steps", 4, "--batch-size", 4, "--save-every", 2, "--lr", 3e-3, *extra]


def final_weights(run: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(run / "final" / "model.safetensors")


def test_torchrun_training_ddp_resume_and_fsdp(kit, reference, tmp_path):
    ddp = tmp_path / "ddp"
    alignti(*train_args(kit, reference, ddp, "--nproc", 2))
    lines = [json.loads(x) for x in (ddp / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert json.loads((ddp / "run.json").read_text())["world_size"] == 2
    # the student reloads in plain transformers
    from transformers import AutoModelForImageTextToText
    AutoModelForImageTextToText.from_pretrained(ddp / "final")

    # killed after step 3 (checkpoint at 2), resumed at the same world size: same weights, same metrics
    crashed = tmp_path / "crashed"
    res = alignti(*train_args(kit, reference, crashed, "--nproc", 2), crash="train-step:3", check=False)
    assert res.returncode != 0
    alignti(*train_args(kit, reference, crashed, "--nproc", 2, "--resume"))
    a, b = final_weights(ddp), final_weights(crashed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda run: [{k: v for k, v in json.loads(x).items() if k not in MEASURED}  # noqa: E731
                         for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert strip(crashed) == strip(ddp)
    # resuming at another world size is refused
    bad = alignti(*train_args(kit, reference, crashed, "--resume"), check=False)
    assert bad.returncode != 0 and "world_size" in bad.stderr

    # FSDP2 (fully_shard per decoder layer), here with gradient checkpointing, gives the same training up to
    # float reduction order
    fsdp = tmp_path / "fsdp"
    alignti(*train_args(kit, reference, fsdp, "--nproc", 2, "--fsdp", "--gradient-checkpointing"))
    c = final_weights(fsdp)
    assert max(float((a[k] - c[k]).abs().max()) for k in a) < 1e-5
    fl = [json.loads(x) for x in (fsdp / "metrics.jsonl").read_text().splitlines()]
    assert [round(x["loss"], 4) for x in fl] == [round(x["loss"], 4) for x in lines]


def test_rank_batches_are_disjoint_and_cover_the_epoch():
    from alignti.common.distributed import DistEnv
    from alignti.student_train.parallel import batches_per_rank, rank_batches
    order = list(range(23))
    for n in (1, 7, 23, 24):  # the step count the trainer plans with is the number of batches each rank gets
        for w in (1, 3):
            assert all(len(rank_batches(list(range(n)), 4, DistEnv(r, w, r))) == batches_per_rank(n, 4, DistEnv(r, w, r))
                       for r in range(w))
    per_rank = [sum(rank_batches(order, 4, DistEnv(r, 3, r)), []) for r in range(3)]
    assert [len(p) for p in per_rank] == [8, 8, 8]  # same number of steps on every rank
    flat = sum(per_rank, [])
    assert sorted(set(flat)) == order and len(flat) - len(set(flat)) == 1  # one wrapped-around pad
    assert per_rank[0] == order[:8]  # contiguous slices of the block-shuffled order: rank-local parts
