"""``train-student --init RUN``: start from an earlier run's weights (a fresh optimizer and step counter)."""

from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path

import torch

from alignti.common.errors import AlignTIError

log = logging.getLogger("alignti.train")


TRAINING_STATE_KEYS = {"model", "optimizer", "scheduler", "rng", "step"}


class UnsafeCheckpoint(ValueError):
    """A checkpoint file holding Python objects beyond tensors and plain data: unpickling it could run code, so it is
    not loaded (its message names the file, the object and what to do)."""


def read_training_state(ckpt: Path) -> dict:
    """A train-student checkpoint file (``RUN/checkpoint/state.pt``) as saved, read with ``torch.load(...,
    weights_only=True)``: torch's restricted unpickler, which builds tensors, dicts, lists, tuples, numbers and
    strings only and never calls what a pickle names, so a checkpoint from a shared run folder runs no code when
    loaded (the trainer writes nothing else: ``trainer._rng_state``). Raises UnsafeCheckpoint naming the object when
    the file holds anything more (a crafted pickle, or a checkpoint of an alignti before this one, which held numpy's
    RNG state as an array: ``convert_trusted_checkpoint``), ValueError(why) when it cannot be read (truncated, not a
    pickle) or is not an alignti training checkpoint; the caller names what to do."""
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        found = re.search(r"GLOBAL (\S+) was not an allowed global|whose module (\S+) is blocked", text)
        if found is None:  # a damaged pickle, not a refused object
            raise ValueError(f"{type(e).__name__}: {text.splitlines()[0][:200]}") from None
        what = f"it names {found.group(1) or found.group(2)}"
        raise UnsafeCheckpoint(
            f"the checkpoint {ckpt} holds Python objects beyond tensors and plain data ({what}), which loading "
            f"it would run as code, so it is not loaded. A checkpoint written by this alignti holds none; one written "
            f"by an alignti before it held numpy's RNG state that way. If you wrote it yourself and trust every step "
            f"of its path, convert it once: python -c \"from alignti.student_train.init_from import "
            f"convert_trusted_checkpoint as c; c('{ckpt}')\"; otherwise do not use it (start over)") from None
    except Exception as e:  # a truncated zip, an unreadable file: all say the same to the user
        raise ValueError(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(state, dict) or not TRAINING_STATE_KEYS <= set(state):
        raise ValueError("not an alignti training checkpoint")
    return state


def convert_trusted_checkpoint(ckpt: str | Path) -> Path:
    """Rewrite a checkpoint of an earlier alignti (numpy's RNG state pickled as an array) in the safe form
    ``read_training_state`` loads, in place (the original kept as ``state.pt.unsafe``). It unpickles the file
    with ``weights_only=False``, which runs any code the file holds: call it only on a checkpoint you wrote yourself
    and trust. Returns the path written."""
    import numpy as np
    ckpt = Path(ckpt)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)  # trusted by the caller, see above

    def safe(rng: dict) -> dict:
        kind, keys, pos, has_gauss, gauss = rng["numpy"]
        return {**rng, "numpy": (str(kind), torch.from_numpy(np.asarray(keys).astype(np.int64)), int(pos),
                                 int(has_gauss), float(gauss))}

    state["rng"] = [safe(r) for r in state["rng"]] if isinstance(state["rng"], list) else safe(state["rng"])
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    torch.save(state, tmp)
    torch.load(tmp, map_location="cpu", weights_only=True)  # what --resume will read
    os.replace(ckpt, ckpt.with_name(ckpt.name + ".unsafe"))
    os.replace(tmp, ckpt)
    log.info("converted %s to the checkpoint form that loads without running code", ckpt)
    return ckpt


def final_folder(run: str) -> Path | None:
    """An earlier run's ``RUN/final`` when it holds a saved model (config.json), else None."""
    final = Path(run) / "final"
    return final if (final / "config.json").is_file() else None


def init_state(run: str) -> tuple[dict, str]:
    """The student weights of an earlier train-student run directory: ``RUN/final`` (loaded with
    ``from_pretrained``, as evaluate loads it), else the model state of ``RUN/checkpoint/state.pt`` (a DDP /
    FSDP run's full state with its ``model.`` wrapper prefix removed). Returns (state dict, where it came from). Raises AlignTIError when RUN
    holds neither."""
    root = Path(run)
    final = root / "final"
    if final_folder(run) is not None:
        from alignti.common.models import load_vlm  # from_pretrained maps the saved key names to the model's
        try:
            model, _ = load_vlm(str(final), torch.device("cpu"), "float32")
        except AlignTIError:
            raise
        except Exception as e:  # a truncated safetensors file, a bad config: named, not a traceback
            raise AlignTIError(f"--init {run}: {final} cannot be loaded ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200]}); pass another run, or restore {final}") from None
        return model.state_dict(), str(final)
    ckpt = root / "checkpoint" / "state.pt"
    if ckpt.is_file():
        try:
            saved = read_training_state(ckpt)
        except UnsafeCheckpoint as e:
            raise AlignTIError(f"--init {run}: {e}") from None
        except ValueError as e:
            raise AlignTIError(f"--init {run}: its checkpoint {ckpt} is damaged and cannot be read ({e}); pass "
                               f"another run, or finish this one so that it writes {final}") from None
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
