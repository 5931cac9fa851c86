"""Shared helpers for the benchmarks: timing in one process, a demo kit, a table printer."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device, repeat: int = 5, warmup: int = 1) -> float:
    """Median seconds of fn() over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


IMAGE_TOKENS_HELP = ("image tokens per sample: 576 = LLaVA-1.5's count (a realistic prompt/answer make-up, "
                     "the default), 9 = the demo task's one token per grid cell")


def patch_for(image_tokens: int) -> int:
    from alignti.demo.shapes import IMAGE_SIZE
    side = round(image_tokens ** 0.5)
    if side * side != image_tokens or IMAGE_SIZE % side:
        raise SystemExit(f"--image-tokens must be a square whose side divides {IMAGE_SIZE} (9, 36, 144, 576)")
    return IMAGE_SIZE // side


def demo_kit(path: str | Path, train_teacher: bool = True, teacher_steps: int = 300, n_train: int = 100,
             image_tokens: int = 9) -> Path:
    """A demo kit (built once, reused across benchmark runs) with ``image_tokens`` LLaVA image tokens."""
    path = Path(path)
    if not (path / "teacher" / "config.json").exists():
        from alignti.demo.kit import make_demo
        make_demo(path, n_train=n_train, n_val=20, n_test=20, train_teacher=train_teacher, teacher_steps=teacher_steps,
                  patch=patch_for(image_tokens))
    return path


def loader_rate(dataset, batches: list[list[int]], collate_fn, workers: int) -> float:
    """Samples/s a DataLoader delivers over ``batches`` after a warm pass (worker start-up, part reads)."""
    import time
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate_fn, num_workers=workers,
                                         multiprocessing_context="spawn" if workers else None,
                                         persistent_workers=bool(workers), prefetch_factor=4 if workers else None)
    for _ in loader:
        pass
    t, n = time.perf_counter(), 0
    for b in loader:
        n += len(b["sample_ids"])
    return n / (time.perf_counter() - t)


def table(rows: list[list], header: list[str]) -> str:
    cols = list(zip(*([header] + [[str(c) for c in r] for r in rows])))
    widths = [max(len(c) for c in col) for col in cols]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    out += [fmt.format(*[str(c) for c in r]) for r in rows]
    return "\n".join(out)
