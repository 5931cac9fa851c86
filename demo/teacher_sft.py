"""Supervised training of the demo teacher on the shapes task (make-demo --train-teacher).

The teacher must carry real knowledge for the cache to be worth distilling: it is trained with
plain cross-entropy on the train split until its validation exact-match accuracy is high.
"""

from __future__ import annotations

import logging
import random

import torch

from common.adapters import adapter_for
from common.batch import collate, forward, lm_logits
from common.conversation import Record, encode, load_image, load_records
from common.generate import exact_match, greedy_answers
from common.losses import sft_loss

log = logging.getLogger("alignti.demo")


def encode_all(processor, path, images, generation_prompt=False):
    recs = [r for r in load_records(path) if isinstance(r, Record)]
    out = []
    for r in recs:
        img, sha = load_image(r, images)
        out.append((r, encode(processor, r, img, sha, generation_prompt=generation_prompt)))
    return out


def accuracy(model, processor, path, images, limit: int | None = None, items=None) -> float:
    if items is None:
        items = encode_all(processor, path, images, generation_prompt=True)
        items = [(r, e) for r, e in items if len(r.turns) == 2][:limit]
    preds = greedy_answers(model, processor, [e for _, e in items])
    return sum(exact_match(p, r.turns[-1][1]) for p, (r, _) in zip(preds, items)) / max(1, len(items))


def _stream_batches(processor, seed: int, batch_size: int, caption_rate: float):
    from common.conversation import parse_record

    from .shapes import stream
    gen = stream(seed, caption_rate)
    while True:
        batch = []
        for item, img in (next(gen) for _ in range(batch_size)):
            rec = parse_record(0, item)
            rec.image = "stream"
            batch.append(encode(processor, rec, img).__dict__)
        yield batch


# lr: at 3e-3 these tiny random-init models never learn to route attention from the answer to an image
# token (loss stays at the answer prior even for "colour of the only shape"); at 3e-4 that task is learnt
# in ~200 steps.
def train_sft(model, processor, train_path, val_path, images, steps: int = 600, batch_size: int = 16, lr: float = 3e-4,
              seed: int = 0, fresh: bool = True, caption_rate: float = 0.0, target: float | None = None,
              eval_every: int = 250) -> float:
    """Train for at most ``steps`` steps, stopping early once the validation exact match reaches ``target``
    (checked every ``eval_every`` steps). ``fresh``: every step draws new scenes (the task's generator is
    unbounded), so the teacher learns to see instead of memorising the train split."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    adapter = adapter_for(model)
    if fresh:
        batches = _stream_batches(processor, 10_000 + seed, batch_size, caption_rate)
    else:
        data = [e.__dict__ for _, e in encode_all(processor, train_path, images)]
        batches = (rng.sample(data, batch_size) for _ in iter(int, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30) * max(0.05, 1 - s / steps))
    pad = processor.tokenizer.pad_token_id
    val_items = [(r, e) for r, e in encode_all(processor, val_path, images, generation_prompt=True)
                 if len(r.turns) == 2]
    model.train()
    acc = None
    for step in range(steps):
        batch = collate(next(batches), pad, type(adapter))
        out = forward(adapter, batch)
        loss = sft_loss(lm_logits(adapter, out.resp_hidden), batch["targets"])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log.info("teacher sft step %d loss %.4f", step, loss.item())
        if target is not None and (step + 1) % eval_every == 0 and step + 1 < steps:
            model.eval()
            acc = accuracy(model, processor, val_path, images, items=val_items)
            model.train()
            log.info("teacher step %d: validation exact match %.1f%%", step + 1, 100 * acc)
            if acc >= target:
                break
            acc = None
    model.eval()
    if acc is None:
        acc = accuracy(model, processor, val_path, images, items=val_items)
    log.info("teacher validation exact match: %.1f%% after %d steps", 100 * acc, step + 1)
    return acc
