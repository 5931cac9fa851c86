"""Data-parallel student training under torchrun: DDP or FSDP2, rank-disjoint cache reads, checkpoints.

``wrap`` takes the student's whole step as one module (``student_train.step.StudentStep``), so DDP / FSDP2 see a
single forward and hook it as they expect.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from alignti.common.distributed import DistEnv

from .data import batches_of


def wrap(step: nn.Module, env: DistEnv, device: torch.device, fsdp: bool, static_graph: bool = False) -> nn.Module:
    """DDP, or FSDP2 on the decoder layers of ``step`` (a ``StudentStep``: its ``adapter`` names them).
    ``static_graph``: for reentrant gradient checkpointing, whose nested
    backward passes DDP's search for unused parameters cannot follow (the used set is fixed by the loss)."""
    if not env.distributed:
        return step
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        for layer in step.adapter.decoder_layers():
            fully_shard(layer)
        fully_shard(step)
        return step
    from torch.nn.parallel import DistributedDataParallel as DDP
    # the vision tower's unused tail (e.g. CLIP's post-layernorm) gets no gradient: let DDP look for it, or learn
    # it in the first step (static graph)
    return DDP(step, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=not static_graph, static_graph=static_graph)


def batches_per_rank(n: int, batch_size: int, env: DistEnv) -> int:
    """How many micro-batches ``rank_batches`` gives each rank for an epoch of ``n`` samples."""
    return math.ceil(math.ceil(n / env.world_size) / batch_size)


def rank_batches(order: list[int], batch_size: int, env: DistEnv) -> list[list[int]]:
    """This rank's micro-batches of one epoch: a contiguous slice of the (windowed-shuffle) epoch order, so
    each rank reads its own parts. The order is padded by wrapping around (like DistributedSampler) so
    every rank runs the same number of steps."""
    if not env.distributed:
        return batches_of(order, batch_size)
    per = math.ceil(len(order) / env.world_size)
    padded = (order * math.ceil(per * env.world_size / max(1, len(order))))[:per * env.world_size]
    return batches_of(padded[env.rank * per:(env.rank + 1) * per], batch_size)


def sum_over_ranks_dict(env: DistEnv, values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum each value over ranks (every rank has the same keys)."""
    if not env.distributed or not values:
        return values
    import torch.distributed as dist
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def sum_counts_over_ranks(env: DistEnv, counts: list[dict[str, float]], device: torch.device) -> dict[str, float]:
    """The step's denominators (common.losses.StepNorm): this rank's micro-batch counts summed, then over ranks."""
    total: dict[str, float] = {}
    for c in counts:
        for k, v in c.items():
            total[k] = total.get(k, 0.0) + v
    return sum_over_ranks_dict(env, total, device)


def full_state(module: nn.Module, opt) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state on CPU on rank 0 (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    return get_state_dict(module, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(module: nn.Module, opt, model_sd: dict, optim_sd: dict) -> None:
    """Every rank loads the full state saved by ``full_state``; the model strictly. Parameters that never get a
    gradient (e.g. CLIP's post-layernorm, unused by LLaVA) have no AdamW state, as in the uninterrupted run."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    set_model_state_dict(module, model_sd, options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(module, opt, optim_sd, options=StateDictOptions(full_state_dict=True, strict=False))


def plain_model_state(full_model_sd: dict) -> dict:
    """StudentStep's state keys ("model.x") as the bare model's ("x")."""
    return {k[len("model."):]: v for k, v in full_model_sd.items() if k.startswith("model.")}
