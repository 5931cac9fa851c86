"""`alignti evaluate`: greedy answers, exact match, agreement with a teacher, KL to a cache."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

import torch

from alignti.common.adapters import adapter_for
from alignti.common.batch import forward, lm_logits
from alignti.common.cache import CacheReader
from alignti.common.conversation import encode
from alignti.common.records import Record, Skipped
from alignti.common.sources import load_image, load_records, preflight
from alignti.common.generate import exact_match, greedy_answers
from alignti.common.losses import fold_student, fold_teacher, kl
from alignti.common.models import load_vlm, resolve_device

from .data import CacheDataset, StudentCollator, batch_to_device

log = logging.getLogger("alignti.evaluate")


def _meta(data: str) -> dict[str, dict]:
    """Per-sample 'meta' of a JSON/JSONL file (the demo's question types); tables carry none."""
    from alignti.common.sources import JsonSource, open_source
    if not isinstance(open_source(data), JsonSource):
        return {}
    text = Path(data).read_text()
    items = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
    return {str(it.get("id")): it.get("meta") or {} for it in items if isinstance(it, dict)}


@torch.no_grad()
def cache_kl(model, processor, cache: str, ids: set[str] | None = None, batch_size: int = 16,
             stats: dict | None = None) -> float | None:
    """Mean per-token KL(teacher || model) on the cache's top-k+rest, teacher-forced; for a cache of the teacher at
    temperature T (dump-teacher --temperature), the model's logits are divided by T too.

    This is the *folded* (k+1)-way KL: both distributions collapsed onto the teacher's top-k ids plus one rest
    bucket. By the chain rule it is a lower bound on the full-vocabulary KL, short by P_T(rest) * KL(P_T(.|rest) ||
    P_S(.|rest)) per token (common/losses/divergences.py), so it says little where the teacher's rest mass is large. With
    ``stats`` (a dict), also fills ``stats["rest_mass"]``: the mean over the same tokens of the teacher's rest
    mass exp(tail_logmass), the share of the distribution the bound cannot see."""
    reader = CacheReader(cache)
    adapter = adapter_for(model)
    ds = CacheDataset(reader, processor)
    idx = [i for i, s in enumerate(reader.samples) if ids is None or s["sample_id"] in ids]
    coll = StudentCollator(processor, type(adapter))
    device = next(model.parameters()).device
    total, n, rest = 0.0, 0, 0.0
    tau = float(reader.params.get("temperature", 1.0))  # a cache of the tempered teacher: the model at the same tau
    for i in range(0, len(idx), batch_size):
        batch = batch_to_device(coll([ds[j] for j in idx[i:i + batch_size]]), device)
        out = forward(adapter, batch)
        lt = fold_teacher(batch["topk_logprobs"], batch["tail_logmass"], tau, tau)  # as cached
        ls = fold_student(lm_logits(adapter, out.resp_hidden), batch["topk_ids"], tau)
        d = kl(lt, ls)
        total += float(d.sum())
        rest += float(batch["tail_logmass"].float().exp().sum())
        n += len(d)
    if stats is not None:
        stats["rest_mass"] = rest / n if n else None
    return total / n if n else None  # None: no sample of the data is in the cache


class AccuracyProbe:
    """Exact-match accuracy on a fixed set of prompts, encoded once (for evaluation during training)."""

    def __init__(self, processor, data: str, images: str, limit: int | None = None, max_new_tokens: int = 8,
                 skip_bad: bool = False):
        """The first ``limit`` samples of ``data``, checked as dump-teacher checks its data (``preflight``): a
        sample that does not parse (an empty answer, an ``<image>`` in an answer, ...) or whose image is missing is
        refused by name (BadSamples), or with ``skip_bad`` left out and listed in ``self.skipped`` ([{"id",
        "reason"}])."""
        self.max_new_tokens = max_new_tokens
        checked = preflight(load_records(data)[:limit], images, skip_bad, "evaluating",
                            "fix them, or pass --skip-bad to leave them out (listed in the report's 'skipped')")
        self.recs = [r for r in checked if isinstance(r, Record)]
        self.skipped = [{"id": r.sample_id, "reason": r.error} for r in checked if isinstance(r, Skipped)]
        self.refs = [r.turns[-1][1] for r in self.recs]
        self.prompts = []
        for r in self.recs:
            img, sha = load_image(r, images) if r.image else (None, "")
            self.prompts.append(encode(processor, r, img, sha, generation_prompt=True))

    def answers(self, model, processor) -> list[str]:
        return greedy_answers(model, processor, self.prompts, max_new_tokens=self.max_new_tokens)

    def score(self, answers: list[str], refs: list[str] | None = None) -> float:
        """Exact-match rate of ``answers`` against the references (or against ``refs``, e.g. a teacher's)."""
        refs = self.refs if refs is None else refs
        return sum(exact_match(a, t) for a, t in zip(answers, refs)) / max(1, len(refs))

    def __call__(self, model, processor) -> float:
        return self.score(self.answers(model, processor))


def evaluate(model_path: str, data: str, images: str, teacher_answers: str | Path | None = None,
             cache: str | None = None, limit: int | None = None, device: str = "auto",
             answers_out: str | Path | None = None, model=None, processor=None, max_new_tokens: int = 8,
             skip_bad: bool = False) -> dict:
    """Greedy answers of ``model_path`` (at most ``max_new_tokens`` each: raise it for long answers) to every
    sample's last question: {"accuracy": exact-match rate, "samples": how many were scored, "per_type": by the
    demo's question types, and with ``teacher_answers`` / ``cache`` the agreement with a teacher and the mean
    per-token KL to its cache}. Bad samples are refused by name as dump-teacher refuses them (BadSamples), or with
    ``skip_bad`` left out, listed in "skipped" ([{"id", "reason"}])."""
    if model is None:
        model, processor = load_vlm(model_path, resolve_device(device))
    model.eval()
    probe = AccuracyProbe(processor, data, images, limit, max_new_tokens, skip_bad)
    recs = probe.recs
    meta = _meta(data)
    preds = probe.answers(model, processor)
    correct = [exact_match(p, t) for p, t in zip(preds, probe.refs)]
    per_type = defaultdict(list)
    for r, c in zip(recs, correct):
        per_type[(meta.get(r.sample_id) or {}).get("turn2", {}).get("type") if len(r.turns) > 2
                 else (meta.get(r.sample_id) or {}).get("type", "all")].append(c)
    res = {"model": str(model_path), "samples": len(recs), "accuracy": sum(correct) / max(1, len(correct)),
           "per_type": {k: sum(v) / len(v) for k, v in sorted(per_type.items(), key=lambda kv: str(kv[0]))}}
    if probe.skipped:
        res["skipped"] = probe.skipped
        log.warning("evaluate: %d sample(s) left out (--skip-bad), listed in the report's 'skipped': %s",
                    len(probe.skipped), "; ".join(s["reason"] for s in probe.skipped[:3]))
    answers = {r.sample_id: p for r, p in zip(recs, preds)}
    if teacher_answers:
        ta = json.loads(Path(teacher_answers).read_text())
        common = [sid for sid in answers if sid in ta]
        res["teacher_agreement"] = sum(exact_match(answers[s], ta[s]) for s in common) / max(1, len(common))
    if cache:
        stats = {}
        res["kl_to_teacher"] = cache_kl(model, processor, cache, {r.sample_id for r in recs}, stats=stats)
        res["kl_to_teacher_is"] = ("the folded (k+1)-way KL on the cache's top-k + rest: a lower bound on the "
                                   "full-vocabulary KL, blind inside the rest bucket")
        res["teacher_rest_mass"] = stats.get("rest_mass")
        if res["kl_to_teacher"] is None:  # said, not a bare None: --cache scores the data's samples the cache holds
            res["kl_to_teacher_is"] = (f"not measured: none of the {len(recs)} evaluated samples is in the cache "
                                       f"({cache}); pass the cache dumped from this --data")
            log.warning("evaluate --cache: %s", res["kl_to_teacher_is"])
    if answers_out:
        Path(answers_out).write_text(json.dumps(answers, indent=1))
    return res
