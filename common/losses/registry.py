"""The loss registry: each named loss (sft, kd, rkl, jsd, kd+iva, kd+tpa, alignti) as the terms it sums, their
weights, and the unchunked reference total."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .terms import distill_loss, iva_loss, iva_token_kl_loss, sft_loss, tpa_loss
from .weights import LossWeights
from .cross import ALM_DISTANCES, CROSS_TOKENIZER, xt_counts, xt_terms

# --- registry --------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossSpec:
    name: str
    divergence: str | None  # None: no distillation term
    iva: bool = False
    tpa: bool = False
    description: str = ""

    @property
    def kd_term(self) -> str | None:
        """The distillation term's name in metrics: "kd" for forward KL, else the divergence's own name."""
        return None if not self.divergence else ("kd" if self.divergence == "fkl" else self.divergence)


REGISTRY: dict[str, LossSpec] = {s.name: s for s in [
    LossSpec("sft", None, description="cross-entropy on the reference answer only"),
    LossSpec("kd", "fkl", description="SFT + forward KL(teacher || student) on top-k+rest"),
    LossSpec("rkl", "rkl", description="SFT + reverse KL(student || teacher) on top-k+rest"),
    LossSpec("jsd", "jsd", description="SFT + Jensen-Shannon divergence on top-k+rest"),
    LossSpec("kd+iva", "fkl", iva=True, description="KD + instruction-aware vision alignment"),
    LossSpec("kd+tpa", "fkl", tpa=True, description="KD + transition probability alignment"),
    LossSpec("alignti", "fkl", iva=True, tpa=True, description="SFT + KD + IVA + TPA (Align-TI)"),
]}


def get_loss(name: str) -> LossSpec:
    if name not in REGISTRY:
        raise ValueError(f"unknown loss '{name}'; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def total_loss(spec: LossSpec, w: LossWeights, out: dict) -> dict[str, torch.Tensor]:
    """Combine the terms a loss spec asks for. ``out`` holds the student's outputs and the batch's
    teacher tensors (see student_train.trainer). Returns every term and 'loss'."""
    terms = {"sft": sft_loss(out["logits"], out["targets"])}
    total = terms["sft"]
    if w.cross_tokenizer and spec.divergence:
        check_cross_tokenizer(spec, w)
        norm = xt_counts(out)["xt_chunks" if w.cross_tokenizer == "alm" else "xt_pairs"]
        terms[w.cross_tokenizer] = d = xt_terms(w, out) / max(norm, 1.0)
        total = total + w.kd * d
    elif spec.divergence:
        terms[spec.kd_term] = d = distill_loss(
            out["logits"], out["topk_ids"], out["topk_logprobs"], out["tail_logmass"], spec.divergence, w.temperature,
            w.cache_temperature)
        total = total + w.kd * d
    if spec.iva and w.iva_form == "token-kl" and out.get("ivak_logits") is not None:
        terms["iva"] = iva_token_kl_loss(out["ivak_logits"], out["ivak_ids"], out["ivak_logprobs"], out["ivak_tail"],
                                         out["ivak_weight"], int(out["n_groups"]), w.temperature,
                                         w.cache_temperature)
        total = total + w.iva * terms["iva"]
    elif spec.iva and out.get("student_sal") is not None:
        terms["iva"] = iva_loss(out["teacher_sal"], out["student_sal"], out["sal_valid"], w.iva_ratio)
        total = total + w.iva * terms["iva"]
    if spec.tpa:
        rows = out.get("tpa_rows")
        pick = (lambda a: a) if rows is None else (lambda a: a.index_select(0, rows))
        t_rows, top = out.get("xt_tpa_trows"), out["topk_ids"]  # across tokenizers: the teacher's rows, student ids
        pick_t = pick if t_rows is None else (lambda a: a.index_select(0, t_rows))
        top = top if t_rows is None else out["xt_ids"]
        terms["tpa"] = tpa_loss(out["branch_logits"], out["tpa_cand_ids"], out["tpa_ids"], out["tpa_logprobs"],
                                out["tpa_tail"], pick_t(top), pick_t(out["topk_logprobs"]), w.temperature,
                                w.tpa_weighting, pick(out["logits"]), w.cache_temperature)
        total = total + w.tpa * terms["tpa"]
    terms["loss"] = total
    return terms


def check_cross_tokenizer(spec: "LossSpec", w: LossWeights) -> None:
    """The cross-tokenizer term replaces the forward-KL ``kd`` term; any other choice is a user error."""
    if w.cross_tokenizer not in CROSS_TOKENIZER:
        raise ValueError(f"unknown --cross-tokenizer '{w.cross_tokenizer}'; choose one of {', '.join(CROSS_TOKENIZER)}")
    if spec.divergence not in (None, "fkl"):
        raise ValueError(f"--cross-tokenizer {w.cross_tokenizer} replaces the KD term and cannot be combined with "
                         f"--loss {spec.name}; use --loss kd, kd+iva, kd+tpa or alignti")
    if w.cross_tokenizer == "alm" and w.alm_distance not in ALM_DISTANCES:
        raise ValueError(f"unknown ALM distance '{w.alm_distance}'; choose one of {', '.join(ALM_DISTANCES)}")
