"""Supervised training of the demo teacher on the shapes task (make-demo --train-teacher).

The teacher must carry real knowledge for the cache to be worth distilling: it is trained with
plain cross-entropy on the train split until its validation exact-match accuracy is high.
"""

from __future__ import annotations

import logging
import random

import torch

from alignti.common.adapters import ModelAdapter, adapter_for
from alignti.common.batch import collate, forward, lm_logits, to_device
from alignti.common.conversation import answer_query_spans, encode
from alignti.common.records import Record, parse_record
from alignti.common.sources import load_image, load_records
from alignti.common.generate import exact_match, greedy_answers
from alignti.common.losses import sft_loss

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


class StreamEncoder:
    """Encodes the stream's (record, image) pairs. The task has a few hundred distinct conversations and
    every image has the same size, so the text side (chat template, tokenizer, spans) is encoded once per
    conversation and only the image goes through the image processor: 5x faster than ``encode`` per
    sample, with identical output (tests/test_demo.py checks)."""

    def __init__(self, processor):
        self.processor = processor
        self.memo: dict = {}

    def __call__(self, item: dict, img) -> dict:
        key = (tuple(m["value"] for m in item["conversations"]), img.size)
        enc = self.memo.get(key)
        if enc is None:
            rec = parse_record(0, dict(item, image="stream"))  # the image is in memory (img)
            enc = self.memo[key] = encode(self.processor, rec, img).__dict__
            out = dict(enc)
        else:
            out = dict(enc)
            out["image_inputs"] = ModelAdapter.image_inputs(self.processor.image_processor(images=[img], return_tensors="pt"))
        out["sample_id"] = str(item["id"])
        out["region"] = item.get("meta", {}).get("region", [])
        return out


def _stream_batches(processor, seed: int, batch_size: int, caption_rate: float, long_form_rate: float = 0.0):
    """Batches of fresh scenes; ``caption_rate`` of the batches are all captions and ``long_form_rate`` all
    long-form answers (a caption is twice as long as a question, a long-form answer ten times: mixing them
    would pad every question batch to their length)."""
    from .shapes import stream
    questions, captions = stream(seed, 0.0), stream(seed + 1, 1.0)
    long_form = stream(seed + 2, long_form_rate=1.0) if long_form_rate else None
    rng = random.Random(seed)
    enc = StreamEncoder(processor)
    while True:
        gen = captions if rng.random() < caption_rate else questions
        if long_form is not None and rng.random() < long_form_rate:
            gen = long_form
        yield [enc(item, img) for item, img in (next(gen) for _ in range(batch_size))]


def grounding_loss(saliency: torch.Tensor, items: list[dict]) -> torch.Tensor:
    """Cross-entropy between the attention of the answer position over the image tokens ([B, V], rows sum
    to 1) and the cells the question is about (uniform over them; samples that name no cell are left out)."""
    from .saliency_check import token_cell

    n_tok = saliency.shape[-1]
    cell = torch.tensor([token_cell(t, n_tok) for t in range(n_tok)], device=saliency.device)
    target = torch.zeros_like(saliency)
    for b, it in enumerate(items):
        if it.get("region"):
            target[b] = torch.isin(cell, torch.tensor(it["region"], device=cell.device)).float()
    keep = target.sum(-1) > 0
    if not keep.any():
        return saliency.sum() * 0
    target = target[keep] / target[keep].sum(-1, keepdim=True)
    return -(target * saliency[keep].clamp_min(1e-8).log()).sum(-1).mean()


# lr: at 3e-3 these tiny random-init models never learn to route attention from the answer to an image
# token (loss stays at the answer prior even for "colour of the only shape"); at 3e-4 that task is learnt
# in ~200 steps.
def train_sft(model, processor, train_path, val_path, images, steps: int = 600, batch_size: int = 16, lr: float = 3e-4,
              seed: int = 0, fresh: bool = True, caption_rate: float = 0.0, target: float | None = None,
              eval_every: int = 250, grounding: float = 0.0, grounding_layer: int = 1,
              long_form_rate: float = 0.0) -> float:
    """Train for at most ``steps`` steps, stopping early once the validation exact match reaches ``target``
    (checked every ``eval_every`` steps). ``fresh``: every step draws new scenes (the task's generator is
    unbounded), so the teacher learns to see instead of memorising the train split.

    ``grounding`` > 0 adds ``grounding * grounding_loss`` on the attention of the answer position over the
    image tokens at decoder layer ``grounding_layer``: the synthetic stand-in for the grounding data real VLMs
    are trained on (referring expressions, boxes). It halves the steps the teacher needs to 90% (docs/demo.md).
    ``long_form_rate``: the share of batches that ask the long-form question (shapes.long_form_answer)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    adapter = adapter_for(model)
    if fresh:
        batches = _stream_batches(processor, 10_000 + seed, batch_size, caption_rate, long_form_rate)
    else:
        data = [e.__dict__ for _, e in encode_all(processor, train_path, images)]
        batches = (rng.sample(data, batch_size) for _ in iter(int, 1))
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30) * max(0.05, 1 - s / steps))
    pad = processor.tokenizer.pad_token_id
    val_items = [(r, e) for r, e in encode_all(processor, val_path, images, generation_prompt=True)
                 if len(r.turns) == 2]
    model.train()
    acc = None
    for step in range(steps):
        items = next(batches)
        if grounding:
            for it in items:  # single-turn stream samples: one group per sample
                it["instr_spans"] = answer_query_spans(it["resp_spans"])
        batch = to_device(collate(items, pad, type(adapter)), device)
        out = forward(adapter, batch, capture_layers=[grounding_layer] if grounding else ())
        loss = sft_loss(lm_logits(adapter, out.resp_hidden), batch["targets"])
        if grounding:
            loss = loss + grounding * grounding_loss(out.saliency[grounding_layer], items)
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
