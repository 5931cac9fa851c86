"""``train-student --init RUN``: start from an earlier run's weights (a fresh optimizer and step counter)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from alignti.common.errors import AlignTIError

log = logging.getLogger("alignti.train")


def init_state(run: str) -> tuple[dict, str]:
    """The student weights of an earlier train-student run directory: ``RUN/final`` (its ``save_pretrained``
    safetensors), else the model state of ``RUN/checkpoint/state.pt`` (a DDP / FSDP run's full state with its
    ``model.`` wrapper prefix removed). Returns (state dict, where it came from). Raises AlignTIError when RUN
    holds neither."""
    root = Path(run)
    final = root / "final"
    files = sorted(final.glob("*.safetensors")) if final.is_dir() else []
    if files:
        from safetensors.torch import load_file
        state: dict = {}
        for f in files:
            state.update(load_file(str(f)))
        return state, str(final)
    ckpt = root / "checkpoint" / "state.pt"
    if ckpt.is_file():
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)
        state = saved["model"]
        if saved.get("run", {}).get("world_size", 1) > 1:  # the StudentStep wrapper's keys
            from .parallel import plain_model_state
            state = plain_model_state(state)
        return state, f"{ckpt} (step {saved.get('step')})"
    raise AlignTIError(f"--init {run}: no student weights there (neither {final} with model.safetensors nor "
                       f"{ckpt}); pass the run directory of an earlier train-student")


def load_init(model: torch.nn.Module, run: str) -> str:
    """Load ``init_state(run)`` into ``model`` strictly (every parameter and buffer, same shapes). Tied weights
    that save_pretrained wrote once are filled from their tie. Raises AlignTIError naming the keys that differ."""
    state, where = init_state(run)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    tied = {k for k in missing if _tied(model, k, state)}
    unexpected = [k for k in state if k not in own]
    if [k for k in missing if k not in tied] or unexpected:
        raise AlignTIError(f"--init {run}: its weights ({where}) do not fit the student: missing "
                           f"{[k for k in missing if k not in tied][:5]}, unexpected {unexpected[:5]}; pass the "
                           f"--student the run was trained from")
    shapes = [k for k in state if tuple(state[k].shape) != tuple(own[k].shape)]
    if shapes:
        raise AlignTIError(f"--init {run}: {shapes[0]} has shape {tuple(state[shapes[0]].shape)} there, "
                           f"{tuple(own[shapes[0]].shape)} in the student; pass the --student the run was trained from")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))
    log.info("initialised the student from %s", where)
    return where


def _tied(model, key: str, state: dict) -> bool:
    """Whether ``key`` is missing from a save because it is tied to a saved parameter (save_pretrained drops it)."""
    own = model.state_dict(keep_vars=True)
    p = own[key]
    return any(own[k] is p or (own[k].data_ptr() == p.data_ptr() and k in state) for k in own if k != key)
