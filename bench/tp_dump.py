"""dump-teacher tokens/s with the teacher unsplit (TP 1) and tensor-parallel over 2 ranks (TP 2), on the CPU.

The mechanics of ``dump-teacher --tp-size``: transformers' tp_plan shards the teacher's attention heads and MLP
columns over gloo ranks, the saliency head average is all-reduced over the replica, one rank writes. Each run is
a fresh torchrun (``--nproc-per-node`` = the TP size) over the same data; its dump loop (first batch to last
committed part, model load excluded) is timed by dump_teacher itself (manifest timing ``loop_s``). TP 1 runs with
1 and with 2 intra-op threads (the same cores TP 2's two processes use), TP 2 with one thread per rank.

    python bench/tp_dump.py [--samples 48] [--hidden 512] [--layers 8] [--image-tokens 144]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _util import IMAGE_TOKENS_HELP, demo_kit, patch_for, table


def worker(a) -> None:
    """One torchrun rank: the dump, rank 0 prints its timing and counts as one JSON line."""
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher
    m = dump_teacher(DumpConfig(teacher=a.teacher, data=a.data, images=a.images, out=a.out, limit=a.samples,
                                batch_size=a.batch_size, device="cpu", progress=False, saliency_layer="1",
                                tp_size=int(os.environ.get("WORLD_SIZE", 1))))
    if int(os.environ.get("RANK", 0)) == 0:
        print("RESULT " + json.dumps({"loop_s": m["timing"]["loop_s"], "load_s": m["timing"]["load_s"],
                                      **m["counts"]}), flush=True)


def run(tp: int, threads: int, args: list[str], out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp}", __file__,
           "--worker", "--out", str(out), *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
    if res.returncode or not line:
        raise SystemExit(res.stdout[-3000:] + res.stderr[-3000:])
    return json.loads(line[-1][len("RESULT "):])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--teacher"), ap.add_argument("--data"), ap.add_argument("--images"), ap.add_argument("--out")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "alignti-bench"))
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--image-tokens", type=int, default=144, help=IMAGE_TOKENS_HELP)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    from dump_overhead import big_teacher
    work = Path(a.workdir)
    kit = demo_kit(work / f"kit-{a.image_tokens}", train_teacher=False, image_tokens=a.image_tokens)
    teacher = big_teacher(kit, work / f"teacher-{a.hidden}x{a.layers}-{a.image_tokens}", a.hidden, a.layers,
                          patch_for(a.image_tokens))
    args = ["--teacher", str(teacher), "--data", str(kit / "data" / "train.json"), "--images",
            str(kit / "data" / "images"), "--samples", str(a.samples), "--batch-size", str(a.batch_size)]
    rows, rates = [], {}
    for tp, threads in ((1, 1), (1, 2), (2, 1)):
        r = run(tp, threads, args, work / "tp-bench-cache")
        rates[(tp, threads)] = r["tokens"] / r["loop_s"]
        rows.append([f"TP {tp}", f"{tp} x {threads}", f"{r['load_s']:.1f}", f"{r['loop_s']:.2f}", str(r["tokens"]),
                     f"{rates[(tp, threads)]:,.0f}", f"{r['response_tokens'] / r['loop_s']:,.0f}"])
    print(f"teacher: llava, LM {a.layers} x {a.hidden} (8 heads), {a.image_tokens} image tokens; {a.samples} samples, "
          f"batch {a.batch_size}; CPU, fp32, gloo; {os.cpu_count()} cores, load average at the end "
          f"{os.getloadavg()[0]:.1f} (other jobs on the machine)")
    print(table(rows, ["run", "ranks x threads", "load s", "dump loop s", "tokens", "tokens/s", "response tokens/s"]))
    print(f"RATIO tokens/s TP 2 / TP 1: {rates[(2, 1)] / rates[(1, 1)]:.3f} (1 thread), "
          f"{rates[(2, 1)] / rates[(1, 2)]:.3f} (TP 1 on 2 threads)")


if __name__ == "__main__":
    main()
