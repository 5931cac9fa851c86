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
    """This rank's place in the torchrun world. With ``tp_size`` T > 1 the world is cut into replicas of T
    consecutive ranks (ranks r*T .. r*T+T-1 form replica r, so a replica stays on one node when T divides the
    GPUs per node): the model is tensor-parallel inside a replica, and the replicas split the work units as
    single ranks do without tensor parallelism. ``tp_rank`` 0 of each replica writes its results."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    tp_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def replicas(self) -> int:
        return self.world_size // self.tp_size

    @property
    def replica(self) -> int:
        return self.rank // self.tp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def is_writer(self) -> bool:
        """Whether this rank writes its replica's results (the replica's first rank)."""
        return self.tp_rank == 0


def dist_env(tp_size: int = 1) -> DistEnv:
    """This rank's DistEnv from torchrun's variables; ``tp_size`` must divide WORLD_SIZE (ValueError naming
    both otherwise)."""
    env = DistEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                  int(os.environ.get("LOCAL_RANK", 0)), int(tp_size))
    check_tp_size(env.world_size, env.tp_size)
    return env


def claim_units(env: DistEnv, n_units: int, done=()) -> list[int]:
    """The work units this rank runs: replica r of R takes the uncommitted units u with u % R == r (every rank of a
    replica the same units, for its share of each forward; ``env.is_writer`` writes them). Without tensor
    parallelism each rank is its own replica."""
    done = set(done)
    return [u for u in range(n_units) if u % env.replicas == env.replica and u not in done]


def check_tp_size(world_size: int, tp_size: int) -> None:
    """``--tp-size`` against the number of processes: at least 1 and a divisor of it (ValueError naming both)."""
    if tp_size < 1 or world_size % tp_size:
        raise ValueError(f"--tp-size {tp_size} must divide the number of processes ({world_size}, --nproc or "
                         f"torchrun's world): each replica of the teacher takes --tp-size processes; choose --nproc "
                         f"{max(1, tp_size) * max(1, world_size // max(1, tp_size))} or a --tp-size dividing "
                         f"{world_size}")


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


def _run_where(env: DistEnv, runs: bool, fn):
    """Run ``fn`` where ``runs`` is true and hand rank 0's result (or its error) to every rank."""
    res = None
    if runs:
        try:
            res = ("ok", fn())
        except Exception as e:  # every rank raises it, none waits forever
            res = ("error", e)
    res = broadcast(env, res)
    if res[0] == "error":
        raise res[1]
    return res[1]


def on_first_replica(env: DistEnv, fn):
    """Run ``fn`` on every rank of replica 0 (a tensor-parallel model needs all of its ranks in each forward) and
    hand rank 0's result (or its error) to every rank; without tensor parallelism this is ``on_main``."""
    return _run_where(env, env.replica == 0, fn)


def on_main(env: DistEnv, fn):
    """Run ``fn`` on rank 0 and hand its result (or its error) to every rank."""
    return _run_where(env, env.is_main, fn)
