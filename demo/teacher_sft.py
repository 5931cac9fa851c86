"""Supervised training of the demo teacher on the shapes task (make-demo --train-teacher).

The teacher must carry real knowledge for the cache to be worth distilling: it is trained with
plain cross-entropy on the train split until its validation exact-match accuracy is high.
"""

from __future__ import annotations

import logging
import random
import re
import time

import torch

from alignti.common.adapters import ModelAdapter, adapter_for
from alignti.common.batch import collate, forward, lm_logits, to_device
from alignti.common.conversation import answer_query_spans, encode
from alignti.common.records import Record, parse_record
from alignti.common.sources import load_image, load_records
from alignti.common.generate import exact_match, greedy_answers
from alignti.common.losses import sft_loss

from . import shapes

log = logging.getLogger("alignti.demo")

LONG_FORM_GROUNDING = ("items", "scene", "off")


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

    def __init__(self, processor, long_form_grounding: str = "items"):
        if long_form_grounding not in LONG_FORM_GROUNDING:
            raise ValueError(f"long_form_grounding '{long_form_grounding}': choose {', '.join(LONG_FORM_GROUNDING)}")
        self.processor = processor
        self.long_form_grounding = long_form_grounding
        self.memo: dict = {}

    def __call__(self, item: dict, img) -> dict:
        key = (tuple(m["value"] for m in item["conversations"]), img.size)
        enc = self.memo.get(key)
        if enc is None:
            rec = parse_record(0, dict(item, image="stream"))  # the image is in memory (img)
            enc = encode(self.processor, rec, img).__dict__
            enc["ground"] = self._ground(item, enc)
            self.memo[key] = enc
            out = dict(enc)
        else:
            out = dict(enc)
            out["image_inputs"] = ModelAdapter.image_inputs(self.processor.image_processor(images=[img], return_tensors="pt"))
        out["sample_id"] = str(item["id"])
        out["region"] = item.get("meta", {}).get("region", [])
        return out

    def _ground(self, item: dict, enc: dict) -> list[tuple[int, int, list[int]]]:
        """The grounding groups of a single-turn sample, (first, last + 1) answer-token offsets and the cells their
        attention is pulled to: one group over the answer's first token and the question's region; a long-form
        answer with ``long_form_grounding`` "items": one group per listed shape, its tokens ("red circle in the
        top-left") on its own cell, "scene": the first token on every shape's cell, "off": none."""
        meta = item.get("meta", {})
        region = list(meta.get("region", []))
        if meta.get("type") != shapes.LONG_FORM:
            return [(0, 1, region)]
        if self.long_form_grounding == "off":
            return []
        if self.long_form_grounding == "scene":
            return [(0, 1, region)]
        answer = item["conversations"][-1]["value"]
        tok = self.processor.tokenizer
        t = tok(answer, add_special_tokens=False, return_offsets_mapping=True)
        (s, e), = enc["resp_spans"]
        if list(enc["input_ids"][s:s + len(t["input_ids"])]) != list(t["input_ids"]):
            raise ValueError(f"sample {item['id']}: the answer's tokens in context differ from the answer alone")
        starts = [0] + [m.end() for m in re.finditer(", ", answer)]  # each item's first character
        ends = [m.start() for m in re.finditer(", ", answer)] + [len(answer)]
        if len(starts) != len(region):
            raise ValueError(f"sample {item['id']}: {len(starts)} items in the answer, {len(region)} region cells")
        groups = []
        for a, b, cell in zip(starts, ends, region):  # region: the shapes' cells in reading order, as the answer
            toks = [j for j, (c0, c1) in enumerate(t["offset_mapping"]) if c0 < b and c1 > a]
            groups.append((toks[0], toks[-1] + 1, [cell]))
        return groups


def _stream_batches(processor, seed: int, batch_size: int, caption_rate: float, long_form_rate: float = 0.0,
                    long_form_grounding: str = "items", phase: dict | None = None):
    """Batches of fresh scenes; ``caption_rate`` of the batches are all captions and ``long_form_rate`` all
    long-form answers (a caption is twice as long as a question, a long-form answer ten times: mixing them
    would pad every question batch to their length). ``phase`` (a dict the caller may change between batches):
    while ``phase["long_form"]`` is False no long-form batch is drawn."""
    from .shapes import stream
    questions, captions = stream(seed, 0.0), stream(seed + 1, 1.0)
    long_form = stream(seed + 2, long_form_rate=1.0) if long_form_rate else None
    rng = random.Random(seed)
    enc = StreamEncoder(processor, long_form_grounding)
    phase = {"long_form": True} if phase is None else phase
    while True:
        gen = captions if rng.random() < caption_rate else questions
        if long_form is not None and rng.random() < long_form_rate and phase["long_form"]:
            gen = long_form
        yield [enc(item, img) for item, img in (next(gen) for _ in range(batch_size))]


def grounding_groups(items: list[dict]) -> list[dict]:
    """Sets each stream sample's ``instr_spans`` to its grounding groups' query positions (StreamEncoder's
    "ground": answer-token offsets [a, b) -> the positions s - 1 + a .. s - 1 + b that predict those tokens, s the
    answer's first position) and returns one {"region": cells} per group, in the order ``forward`` captures them."""
    groups = []
    for it in items:
        (s, _), = it["resp_spans"]  # single-turn stream samples
        it["instr_spans"] = [(s - 1 + a, s - 1 + b) for a, b, _ in it["ground"]]
        groups += [{"region": cells} for _, _, cells in it["ground"]]
    return groups


def grounding_loss(saliency: torch.Tensor, items: list[dict]) -> torch.Tensor:
    """Cross-entropy between the attention of each grounding group over the image tokens ([G, V], rows sum
    to 1; a group: the answer position of a question, or the tokens of one shape of a long-form answer) and
    the cells it is about (``items[g]["region"]``, uniform over them; groups that name no cell are left out)."""
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
def long_form_val(model, processor, items: list, scenes: list) -> dict:
    """Greedy answers (``shapes.LONG_FORM_MAX_NEW_TOKENS`` tokens) to encoded long-form prompts: {"exact": exact-match
    rate, "fields": mean all-fields F1 (``shapes.field_scores``)} against the records' scenes."""
    preds = greedy_answers(model, processor, [e for _, e in items], max_new_tokens=shapes.LONG_FORM_MAX_NEW_TOKENS)
    return {"exact": sum(exact_match(p, r.turns[-1][1]) for p, (r, _) in zip(preds, items)) / max(1, len(items)),
            "fields": shapes.mean_field_scores(preds, scenes)["fields"]}


def train_sft(model, processor, train_path, val_path, images, steps: int = 600, batch_size: int = 16, lr: float = 3e-4,
              seed: int = 0, fresh: bool = True, caption_rate: float = 0.0, target: float | None = None,
              eval_every: int = 250, grounding: float = 0.0, grounding_layer: int = 1,
              long_form_rate: float = 0.0, long_form_val_path=None, long_form_target: float | None = None,
              long_form_grounding: str = "items", long_form_after: bool = False, lr_schedule: str = "linear",
              stats: dict | None = None) -> float:
    """Train for at most ``steps`` steps, stopping early once the validation exact match reaches ``target``
    (checked every ``eval_every`` steps). ``fresh``: every step draws new scenes (the task's generator is
    unbounded), so the teacher learns to see instead of memorising the train split.

    ``grounding`` > 0 adds ``grounding * grounding_loss`` on the attention of the answer position over the
    image tokens at decoder layer ``grounding_layer``: the synthetic stand-in for the grounding data real VLMs
    are trained on (referring expressions, boxes). It halves the steps the teacher needs to 90% (docs/demo.md).
    ``long_form_rate``: the share of batches that ask the long-form question (shapes.long_form_answer);
    ``long_form_grounding`` how the grounding loss reads their answers (``StreamEncoder._ground``: "items", each
    shape's tokens on its own cell). With ``long_form_val_path`` (a long-form split, e.g. val_long.json) every
    evaluation also scores it greedily (``long_form_val``) and the early stop needs its all-fields F1 to reach
    ``long_form_target`` as well. ``long_form_after``: no long-form batch until short-question validation has
    reached ``target`` (a curriculum: the short questions first, then both). ``lr_schedule``: after a 30-step
    warm-up, "linear" decay to 5% at ``steps``, or "constant" (the early stop ends the run). ``stats`` (a dict)
    receives "steps", "seconds" (training only, without the evaluations), "eval_seconds", "long_form_from" (the
    first step with long-form batches) and "history" (per evaluation: step, val, and long_exact / long_fields).
    Raises ValueError for an unknown ``lr_schedule`` or ``long_form_grounding``."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    adapter = adapter_for(model)
    long_form_after = long_form_after and bool(long_form_rate)
    phase = {"long_form": not long_form_after}
    if fresh:
        batches = _stream_batches(processor, 10_000 + seed, batch_size, caption_rate, long_form_rate,
                                  long_form_grounding, phase)
    else:
        data = [e.__dict__ for _, e in encode_all(processor, train_path, images)]
        batches = (rng.sample(data, batch_size) for _ in iter(int, 1))
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    if lr_schedule not in ("linear", "constant"):
        raise ValueError(f"lr_schedule '{lr_schedule}': choose linear or constant")
    decay = (lambda s: max(0.05, 1 - s / steps)) if lr_schedule == "linear" else (lambda s: 1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30) * decay(s))
    pad = processor.tokenizer.pad_token_id
    val_items = [(r, e) for r, e in encode_all(processor, val_path, images, generation_prompt=True)
                 if len(r.turns) == 2]
    long_items = long_scenes = None
    if long_form_val_path is not None:
        long_items = encode_all(processor, long_form_val_path, images, generation_prompt=True)
        by_id = shapes.long_form_scenes(long_form_val_path)
        long_scenes = [by_id[r.sample_id] for r, _ in long_items]
    stats = {} if stats is None else stats
    stats.update(history=[], eval_seconds=0.0, long_form_from=None if long_form_after else 0)
    model.train()
    acc = None
    t0 = time.perf_counter()
    for step in range(steps):
        items = next(batches)
        groups = None
        if grounding:
            if fresh:
                groups = grounding_groups(items)
            else:
                groups = items
                for it in items:
                    it["instr_spans"] = answer_query_spans(it["resp_spans"])
        batch = to_device(collate(items, pad, type(adapter)), device)
        out = forward(adapter, batch, capture_layers=[grounding_layer] if grounding and groups else ())
        loss = sft_loss(lm_logits(adapter, out.resp_hidden), batch["targets"])
        if groups:
            loss = loss + grounding * grounding_loss(out.saliency[grounding_layer], groups)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log.info("teacher sft step %d loss %.4f", step, loss.item())
        if target is not None and (step + 1) % eval_every == 0 and step + 1 < steps:
            te = time.perf_counter()
            model.eval()
            acc = accuracy(model, processor, val_path, images, items=val_items)
            rec = {"step": step + 1, "val": acc}
            if long_items is not None:
                lf = long_form_val(model, processor, long_items, long_scenes)
                rec.update(long_exact=lf["exact"], long_fields=lf["fields"])
            model.train()
            stats["history"].append(rec)
            stats["eval_seconds"] += time.perf_counter() - te
            log.info("teacher step %d: validation exact match %.1f%%%s", step + 1, 100 * acc,
                     f", long-form exact {100 * rec['long_exact']:.1f}% all-fields F1 {100 * rec['long_fields']:.1f}"
                     if long_items is not None else "")
            if acc >= target and not phase["long_form"]:  # the curriculum's second part: long-form batches too
                phase["long_form"] = True
                stats["long_form_from"] = step + 1
                log.info("teacher step %d: short questions at target, long-form batches from here", step + 1)
            elif acc >= target and (long_items is None or long_form_target is None
                                    or rec["long_fields"] >= long_form_target):
                break
            acc = None
    model.eval()
    stats.update(steps=step + 1, seconds=time.perf_counter() - t0 - stats["eval_seconds"])
    if acc is None:
        acc = accuracy(model, processor, val_path, images, items=val_items)
    log.info("teacher validation exact match: %.1f%% after %d steps (%.3f s per step)", 100 * acc, step + 1,
             stats["seconds"] / (step + 1))
    return acc
