"""Loss math shared by both stages, and the loss registry.

Distributions are compared on the teacher's (k+1)-way partition of the vocabulary: the teacher's
top-k ids plus one "rest" bucket. Folding both distributions this way is exact bookkeeping (the
chain rule of KL): ``KL_full = KL_folded + P_T(rest) * KL(P_T(.|rest) || P_S(.|rest))`` for forward
KL, so the folded KL equals the full-vocabulary KL when k = V and is a lower bound that misses only
the divergence inside the teacher's rest bucket otherwise (tests check both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


# --- folding ---------------------------------------------------------------------------------
def fold_student(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log-probs [..., k+1] of the student on the teacher's ids plus the rest bucket."""
    ls = F.log_softmax(logits.float() / temperature, dim=-1)
    top = ls.gather(-1, ids.long())
    rest = ls.scatter(-1, ids.long(), NEG_INF).logsumexp(-1, keepdim=True)
    return torch.cat([top, rest], dim=-1)


def fold_teacher(topk_logprobs: torch.Tensor, tail_logmass: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log-probs [..., k+1] of the teacher's cached top-k + rest, renormalised, at temperature tau.

    At tau = 1 this is the cached distribution (renormalising absorbs fp16 rounding of the top-k).
    At tau != 1 the rest bucket is tempered as one atom (its members' logits are not cached), an
    approximation that only touches the rest mass."""
    lt = torch.cat([topk_logprobs.float(), tail_logmass.float().unsqueeze(-1)], dim=-1)
    return F.log_softmax(lt / temperature, dim=-1)


def kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last axis from log-probs; 0 * log 0 = 0."""
    p = lp.exp()
    return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)


def jsd(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    lm = torch.logaddexp(lp, lq) - math.log(2.0)
    return 0.5 * kl(lp, lm) + 0.5 * kl(lq, lm)


DIVERGENCES = {
    "fkl": lambda lt, ls: kl(lt, ls),
    "rkl": lambda lt, ls: kl(ls, lt),
    "jsd": jsd,
}


# --- terms -----------------------------------------------------------------------------------
def sft_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the reference tokens; logits [N, V], targets [N]."""
    return F.cross_entropy(logits.float(), targets.long())


def distill_loss(logits, topk_ids, topk_logprobs, tail_logmass, divergence="fkl", temperature=1.0):
    """Mean over response tokens of D(teacher || student) on the folded distributions, x tau^2."""
    lt = fold_teacher(topk_logprobs, tail_logmass, temperature)
    ls = fold_student(logits, topk_ids, temperature)
    return DIVERGENCES[divergence](lt, ls).mean() * temperature ** 2


def salient_set(teacher_sal: torch.Tensor, valid: torch.Tensor, ratio: float) -> torch.Tensor:
    """[G, V] bool: the top ceil(ratio * n_v) image tokens of the teacher's saliency."""
    n_v = valid.sum(-1)
    n_keep = torch.clamp(torch.ceil(ratio * n_v.float()).long(), min=1)
    masked = teacher_sal.float().masked_fill(~valid, NEG_INF)
    order = masked.argsort(-1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return (rank < n_keep[:, None]) & valid


def fold_saliency(sal: torch.Tensor, salient: torch.Tensor) -> torch.Tensor:
    """[G, V] saliency -> [G, V+1] log-probs: salient tokens kept, every other token in one bin
    (entries of non-salient tokens are -inf; the last column is the non-salient bin)."""
    sal = sal.float().clamp_min(0)
    sal = sal / sal.sum(-1, keepdim=True).clamp_min(1e-30)
    kept = torch.where(salient, sal, torch.zeros_like(sal))
    rest = (sal * (~salient)).sum(-1, keepdim=True)
    return torch.cat([kept, rest], -1).clamp_min(0).log()


def iva_loss(teacher_sal: torch.Tensor, student_sal: torch.Tensor, valid: torch.Tensor, ratio: float) -> torch.Tensor:
    """Mean over (sample, turn) groups of KL(fold_S(s_T) || fold_S(s_S)) (METHOD.md section 3)."""
    salient = salient_set(teacher_sal, valid, ratio)
    lt = fold_saliency(teacher_sal, salient)
    ls = fold_saliency(student_sal, salient)
    return kl(lt, ls).mean()


def candidate_weights(cand_ids, topk_ids, topk_logprobs) -> torch.Tensor:
    """p~_T(c_b): the teacher's first-step probabilities of the B candidates (looked up in its top-k),
    renormalised over the candidates. [N, B]"""
    match = topk_ids[:, None, :].long() == cand_ids[:, :, None].long()              # [N, B, k]
    lp = torch.where(match, topk_logprobs[:, None, :].float(), torch.full_like(match, NEG_INF, dtype=torch.float))
    return torch.softmax(lp.max(-1).values, dim=-1)


def tpa_loss(branch_logits, cand_ids, tpa_ids, tpa_logprobs, tpa_tail, topk_ids, topk_logprobs, temperature=1.0):
    """METHOD.md section 4. branch_logits [N, B, V]: the student's output at each branch token (the
    teacher's candidate c_b put in place of y_t); tpa_* the teacher's cached next-step top-k2 per
    branch. Mean over response tokens of sum_b p~_T(c_b) * KL(fold(q_T,b) || fold(q_S,b)), x tau^2."""
    weights = candidate_weights(cand_ids, topk_ids, topk_logprobs)
    lt = fold_teacher(tpa_logprobs, tpa_tail, temperature)
    ls = fold_student(branch_logits, tpa_ids, temperature)
    return (weights * kl(lt, ls)).sum(-1).mean() * temperature ** 2


# --- registry --------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossSpec:
    name: str
    divergence: str | None  # None: no distillation term
    iva: bool = False
    tpa: bool = False
    description: str = ""


REGISTRY: dict[str, LossSpec] = {s.name: s for s in [
    LossSpec("sft", None, description="cross-entropy on the reference answer only"),
    LossSpec("kd", "fkl", description="SFT + forward KL(teacher || student) on top-k+rest"),
    LossSpec("rkl", "rkl", description="SFT + reverse KL(student || teacher) on top-k+rest"),
    LossSpec("jsd", "jsd", description="SFT + Jensen-Shannon divergence on top-k+rest"),
    LossSpec("kd+iva", "fkl", iva=True, description="KD + instruction-aware vision alignment"),
    LossSpec("kd+tpa", "fkl", tpa=True, description="KD + transition probability alignment"),
    LossSpec("alignti", "fkl", iva=True, tpa=True, description="SFT + KD + IVA + TPA (Align-TI)"),
]}


@dataclass
class LossWeights:
    kd: float = 1.0
    iva: float = 1.0
    tpa: float = 1.0
    temperature: float = 1.0
    iva_ratio: float = 0.25


def get_loss(name: str) -> LossSpec:
    if name not in REGISTRY:
        raise ValueError(f"unknown loss '{name}'; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def total_loss(spec: LossSpec, w: LossWeights, out: dict) -> dict[str, torch.Tensor]:
    """Combine the terms a loss spec asks for. ``out`` holds the student's outputs and the batch's
    teacher tensors (see student_train.trainer). Returns every term and 'loss'."""
    terms = {"sft": sft_loss(out["logits"], out["targets"])}
    total = terms["sft"]
    if spec.divergence:
        terms[spec.divergence if spec.divergence != "fkl" else "kd"] = d = distill_loss(
            out["logits"], out["topk_ids"], out["topk_logprobs"], out["tail_logmass"], spec.divergence, w.temperature)
        total = total + w.kd * d
    if spec.iva and out.get("student_sal") is not None:
        terms["iva"] = iva_loss(out["teacher_sal"], out["student_sal"], out["sal_valid"], w.iva_ratio)
        total = total + w.iva * terms["iva"]
    if spec.tpa:
        terms["tpa"] = tpa_loss(out["branch_logits"], out["tpa_cand_ids"], out["tpa_ids"], out["tpa_logprobs"],
                                out["tpa_tail"], out["topk_ids"], out["topk_logprobs"], w.temperature)
        total = total + w.tpa * terms["tpa"]
    terms["loss"] = total
    return terms
