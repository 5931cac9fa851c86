"""Gradients of one optimizer step, for tests/test_step.py: the same 8 samples split into micro-batches
and (under torchrun: DDP) ranks.
``python tests/grad_probe.py STUDENT CACHE OUT.pt LOSS PER_MICRO [gc|gc-reentrant|gc-recast] [amp]``."""

from __future__ import annotations

import contextlib
import sys

import torch

from alignti.common import distributed as dist  # noqa: E402
from alignti.common.adapters import adapter_for  # noqa: E402
from alignti.common.cache import CacheReader  # noqa: E402
from alignti.common.losses import LossWeights, get_loss  # noqa: E402
from alignti.common.models import enable_gradient_checkpointing, load_vlm  # noqa: E402
from alignti.student_train import parallel  # noqa: E402
from alignti.student_train.data import CacheDataset, StudentCollator  # noqa: E402
from alignti.student_train.step import StudentStep  # noqa: E402
from alignti.student_train.trainer import accumulate_step, student_layer_for  # noqa: E402

SAMPLES = 8


def probe_samples(reader: CacheReader) -> list[int]:
    """8 samples whose response lengths differ (so per-micro-batch means would weigh them unequally)."""
    by_len: dict[int, int] = {}
    for i, r in enumerate(reader.samples):
        by_len.setdefault(r["resp_len"], i)
    picked = list(by_len.values())[:SAMPLES]
    picked += [i for i in range(len(reader)) if i not in picked][:SAMPLES - len(picked)]
    return picked


def step_gradients(student: str, cache: str, loss: str, per_micro: int, gc: str = "",
                   weights: LossWeights | None = None, autocast: bool = False, probe=None, trainable: str | None = None,
                   lora=None) -> dict[str, torch.Tensor]:
    """``autocast``: the forward under CPU bf16 autocast (the GPU's precision, on this CPU). ``probe``: a context
    manager factory entered around the step (e.g. counting the operations it runs). ``trainable`` / ``lora``
    (a trainable.LoraSettings): train-student's --trainable and LoRA, applied before checkpointing as there."""
    env = dist.dist_env()
    device = torch.device("cpu")
    dist.init(env, device)
    torch.manual_seed(0)
    reader = CacheReader(cache)
    model, proc = load_vlm(student, device, "float32")
    adapter = adapter_for(model)
    spec = get_loss(loss)
    params = reader.params
    layer = student_layer_for(None, params.get("saliency_layer") or 0, params.get("teacher_layers", 1),
                              adapter.num_layers, adapter.saliency_layers() if spec.iva else None)
    if trainable is not None or lora is not None:
        from alignti.student_train.trainable import apply_trainable
        apply_trainable(model, adapter, trainable, lora=lora)
    if gc:  # "gc": non-reentrant, "gc-reentrant", "gc-every2": every other layer, "gc-recast": no cast reuse
        enable_gradient_checkpointing(model, reentrant="reentrant" in gc, every_n_layers=2 if "every2" in gc else 1,
                                      reuse_casts="recast" not in gc)
    model.train()
    step = parallel.wrap(StudentStep(model, adapter, spec, layer, weights or LossWeights(tpa=0.7, iva=1.3)),
                         env, device, fsdp=False, static_graph="reentrant" in gc)
    data, coll = CacheDataset(reader, proc), StudentCollator(proc, type(adapter))
    idx = probe_samples(reader)
    per_rank = SAMPLES // env.world_size
    mine = idx[env.rank * per_rank:(env.rank + 1) * per_rank]
    micro = [coll([data[i] for i in mine[j:j + per_micro]]) for j in range(0, len(mine), per_micro)]
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with probe() if probe else contextlib.nullcontext():
        accumulate_step(step, micro, env, device, amp)
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


if __name__ == "__main__":
    student, cache, out, loss, per_micro = sys.argv[1:6]
    extra = sys.argv[6:]  # [gc mode] [amp]
    grads = step_gradients(student, cache, loss, int(per_micro), gc=next((a for a in extra if a.startswith("gc")), ""),
                           autocast="amp" in extra)
    if dist.dist_env().is_main:
        torch.save(grads, out)
