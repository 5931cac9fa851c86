"""Samples/s the cache reader delivers (DataLoader with 0, 2, 4 workers, images through the student's
processor, collated) vs the samples/s the student consumes (alignti training steps). Goal >= 10x.
Run: python bench/reader.py [--device cuda]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _util import IMAGE_TOKENS_HELP, device_name, loader_rate, table

import torch  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "alignti-bench"))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--image-tokens", type=int, default=576, help=IMAGE_TOKENS_HELP)
    a = ap.parse_args()
    device = torch.device(a.device)
    import train_step
    teacher, student, batch, reader = train_step.setup(Path(a.workdir), device, a.batch_size, image_tokens=a.image_tokens)
    del teacher
    from alignti.common.adapters import adapter_for
    from alignti.common.cache import CacheReader
    from alignti.student_train.data import CacheDataset, StudentCollator, batches_of, epoch_order
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(Path(a.workdir) / f"kit-{a.image_tokens}" / "student")
    coll = StudentCollator(proc, type(adapter_for(student)))
    rows, rates = [], {}
    for workers in (0, 2, 4):
        fresh = CacheReader(reader.url)
        ds = CacheDataset(fresh, proc)
        order = batches_of(epoch_order(fresh, 0, 0) * 8, a.batch_size)
        rates[workers] = loader_rate(ds, order, coll, workers)
    step = train_step.make_step("cache-alignti", None, student, batch, reader)
    from _util import timeit
    consume = a.batch_size / timeit(step, device, repeat=10, warmup=2)
    for w, r in rates.items():
        rows.append([f"reader, {w} workers", f"{r:.0f}", f"{r / consume:.1f}"])
    rows.append(["student alignti step (consumer)", f"{consume:.0f}", "1.0"])
    print(f"device: {device_name(device)}; batch {a.batch_size}; cache {reader.url}")
    print(table(rows, ["pipeline", "samples/s", "x consumption"]))
    best = max(rates, key=rates.get)
    print(f"RATIO reader/consumer = {rates[best] / consume:.1f}x with {best} workers (goal >= 10); "
          f"0 workers {rates[0] / consume:.1f}x")


if __name__ == "__main__":
    main()
