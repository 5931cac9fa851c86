"""Progress bars (rich) with rate and ETA, and logging set-up shared by the CLI."""

from __future__ import annotations

import contextlib
import logging

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

console = Console(stderr=True)


class RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} {self.unit}/s" if speed else f"- {self.unit}/s", style="cyan")


class _Bar:
    def __init__(self, progress: Progress | None, task):
        self.progress, self.task = progress, task

    def advance(self, n: float = 1) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, n)

    def update(self, **fields) -> None:
        if self.progress is not None:
            desc = fields.pop("description", None)
            extra = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            self.progress.update(self.task, info=extra, **({"description": desc} if desc else {}))


@contextlib.contextmanager
def progress_bar(description: str, total: int, unit: str = "it", enabled: bool = True):
    if not enabled:
        yield _Bar(None, None)
        return
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TaskProgressColumn(), RateColumn(unit), TimeElapsedColumn(), TextColumn("eta"),
                        TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console, transient=False)
    with progress:
        yield _Bar(progress, progress.add_task(description, total=total, info=""))


def setup_logging(verbose: bool = False) -> None:
    """INFO (DEBUG with -v) on rank 0; other torchrun ranks log their rank-tagged warnings and errors only."""
    import os
    rank = int(os.environ.get("RANK", 0))
    level = logging.DEBUG if verbose else logging.INFO
    fmt = "%(message)s" if rank == 0 else f"[rank {rank}] %(message)s"
    logging.basicConfig(level=level if rank == 0 else max(level, logging.WARNING), format=fmt, datefmt="[%X]",
                        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)], force=True)
    for noisy in ("transformers", "httpx", "urllib3", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
