"""``train-student --init RUN``: start from an earlier run's weights (a fresh optimizer and step counter)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from alignti.common.errors import AlignTIError

log = logging.getLogger("alignti.train")


def init_state(run: str) -> tuple[dict, str]:
    """The student weights of an earlier train-student run directory: ``RUN/final`` (loaded with
    ``from_pretrained``, as evaluate loads it), else the model state of ``RUN/checkpoint/state.pt`` (a DDP /
    FSDP run's full state with its ``model.`` wrapper prefix removed). Returns (state dict, where it came from). Raises AlignTIError when RUN
    holds neither."""
    root = Path(run)
    final = root / "final"
    if (final / "config.json").is_file():
        from alignti.common.models import load_vlm  # from_pretrained maps the saved key names to the model's
        model, _ = load_vlm(str(final), torch.device("cpu"), "float32")
        return model.state_dict(), str(final)
    ckpt = root / "checkpoint" / "state.pt"
    if ckpt.is_file():
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)
        state = saved["model"]
        from .trainable import has_lora
        if has_lora(state):  # an unfinished LoRA run: its weights are the base plus unmerged adapters
            raise AlignTIError(f"--init {run}: its checkpoint {ckpt} holds unmerged LoRA adapters (the run has no "
                               f"{final} yet); finish that run (train-student --resume) so it writes the merged "
                               f"{final}, and --init from it")
        if saved.get("run", {}).get("world_size", 1) > 1:  # the StudentStep wrapper's keys
            from .parallel import plain_model_state
            state = plain_model_state(state)
        return state, f"{ckpt} (step {saved.get('step')})"
    raise AlignTIError(f"--init {run}: no student weights there (neither {final} with config.json nor "
                       f"{ckpt}); pass the run directory of an earlier train-student")


def load_init(model: torch.nn.Module, run: str) -> str:
    """Load ``init_state(run)`` into ``model`` strictly (every parameter and buffer, same shapes), in place.
    Returns where the weights came from. Raises AlignTIError naming the keys or shapes that differ."""
    state, where = init_state(run)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise AlignTIError(f"--init {run}: its weights ({where}) do not fit the student ({' '.join(str(e).split())[:400]}); "
                           "pass the --student the run was trained from") from None
    log.info("initialised the student from %s", where)
    return where
