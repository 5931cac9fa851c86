"""Multi-process runs through torchrun: rank discovery, the process group, and the `--nproc N` wrapper.

alignti never starts processes itself beyond handing the command to ``torch.distributed.run``
(torchrun): ``alignti dump-teacher --nproc 4 ...`` re-executes the same command under torchrun,
and every rank then finds its place from the environment torchrun sets (RANK, WORLD_SIZE,
LOCAL_RANK). Multi-node jobs call ``torchrun --nnodes ... -m alignti dump-teacher ...`` directly.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch

log = logging.getLogger("alignti.dist")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_env() -> DistEnv:
    return DistEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


def device_for(device: str, env: DistEnv) -> torch.device:
    """'auto' means this rank's GPU (cuda:LOCAL_RANK) when there is one, else the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", env.local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and env.distributed:
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return dev


def init(env: DistEnv, device: torch.device, timeout_min: float = 60.0) -> None:
    """Join the process group torchrun prepared: nccl for GPU ranks, gloo on CPU."""
    import torch.distributed as dist
    if not env.distributed or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_min),
                            device_id=device if device.type == "cuda" else None)
    log.debug("rank %d/%d joined the %s process group", env.rank, env.world_size, backend)


def barrier(env: DistEnv) -> None:
    import torch.distributed as dist
    if env.distributed and dist.is_initialized():
        dist.barrier()


def broadcast(env: DistEnv, obj, src: int = 0):
    """Rank ``src``'s picklable ``obj`` on every rank."""
    import torch.distributed as dist
    if not (env.distributed and dist.is_initialized()):
        return obj
    box = [obj if env.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather(env: DistEnv, obj) -> list:
    import torch.distributed as dist
    if not (env.distributed and dist.is_initialized()):
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


def run_under_torchrun(nproc: int, argv: list[str]) -> int:
    """Re-run ``alignti <argv>`` as ``torchrun --standalone --nproc-per-node nproc -m alignti <argv>``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "alignti", *argv]
    log.info("launching %d processes: %s", nproc, " ".join(cmd[1:]))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(cmd, env=env)


def strip_nproc(argv: list[str]) -> list[str]:
    """The command line without its --nproc option (so the ranks do not launch again)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def on_main(env: DistEnv, fn):
    """Run ``fn`` on rank 0 and hand its result (or its error) to every rank."""
    res = None
    if env.is_main:
        try:
            res = ("ok", fn())
        except Exception as e:  # every rank raises it, none waits forever
            res = ("error", e)
    res = broadcast(env, res)
    if res[0] == "error":
        raise res[1]
    return res[1]
