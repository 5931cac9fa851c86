"""Experiment tracking for train-student: ``--report-to none|tensorboard|wandb`` (several allowed).

Every optimizer step's metrics (each loss term, lr, grad norm, tokens/s, peak memory, TPA coverage, and the
validation accuracy when evaluated) go to metrics.jsonl always, and to each chosen tracker. TensorBoard comes from
its own package (``pip install alignti[tensorboard]``); W&B from ``wandb``, which reads its own settings from the
environment (``WANDB_MODE=offline``, ``WANDB_PROJECT``, ``WANDB_DIR``...): alignti overrides none of them."""

from __future__ import annotations

import logging
import math
from pathlib import Path

log = logging.getLogger("alignti.train")

REPORTERS = ("none", "tensorboard", "wandb")
# metrics.jsonl keys that are not curves
_NOT_SCALARS = {"step", "epoch"}


def parse_report_to(values) -> list[str]:
    """``["tensorboard", "wandb"]``, ``"tensorboard,wandb"`` or ``None`` -> the trackers (none: [])."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    names = [n.strip().lower() for v in values for n in str(v).split(",") if n.strip()]
    bad = [n for n in names if n not in REPORTERS]
    if bad:
        raise ValueError(f"--report-to: unknown tracker(s) {bad}; choose from {', '.join(REPORTERS)}")
    return [n for n in dict.fromkeys(names) if n != "none"]


def tag(key: str) -> str:
    """A metric's tracker name: validation figures under eval/, the rest under train/."""
    return f"eval/{key[4:]}" if key.startswith("val_") else f"train/{key}"


class Tracker:
    """The chosen trackers of one run (rank 0 only; other ranks get an inert one)."""

    def __init__(self, report_to, out: Path, config: dict, start_step: int = 0, enabled: bool = True):
        self.names = parse_report_to(report_to) if enabled else []
        self._tb = self._wandb = None
        if "tensorboard" in self.names:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("--report-to tensorboard needs the tensorboard package: "
                                 "pip install 'alignti[tensorboard]'") from None
            # on resume from step N, the events of steps > N (written before the crash) are dropped
            self._tb = SummaryWriter(log_dir=str(Path(out) / "tensorboard"),
                                     purge_step=start_step + 1 if start_step else None)
            from alignti.common.config import render
            self._tb.add_text("config", "```yaml\n" + render(config) + "```", global_step=start_step)
        if "wandb" in self.names:
            try:
                import wandb
            except ImportError:
                raise ValueError("--report-to wandb needs the wandb package: pip install wandb") from None
            id_file = Path(out) / "wandb_run_id"
            run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id)
            # resume="allow": a resumed run continues the same W&B run (its id is kept in the run directory)
            self._wandb = wandb.init(id=run_id, resume="allow", name=Path(out).name, config=config,
                                     dir=str(out))
        if self.names:
            log.info("reporting to %s", ", ".join(self.names))

    def log(self, metrics: dict, step: int) -> None:
        scalars = {tag(k): float(v) for k, v in metrics.items()
                   if k not in _NOT_SCALARS and isinstance(v, (int, float)) and math.isfinite(float(v))}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, global_step=step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
