"""Align-TI's terms on the folded distributions: SFT, vanilla KD (fkl / rkl / jsd), IVA (instruction-aware vision
alignment) and TPA (transition probability alignment); docs/method.md gives each formula and its source."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .divergences import _up, DIVERGENCES, fold_student, fold_teacher, kl, NEG_INF, safe_log

# --- terms -----------------------------------------------------------------------------------
def sft_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the reference tokens; logits [N, V], targets [N]."""
    return F.cross_entropy(_up(logits), targets.long())


def distill_loss(logits, topk_ids, topk_logprobs, tail_logmass, divergence="fkl", temperature=1.0, cached_at=1.0):
    """Mean over response tokens of D(teacher || student) on the folded distributions, x tau^2 (``cached_at``: the
    temperature the cache holds the teacher at, ``fold_teacher``)."""
    lt = fold_teacher(topk_logprobs, tail_logmass, temperature, cached_at)
    ls = fold_student(logits, topk_ids, temperature)
    return DIVERGENCES[divergence](lt, ls).mean() * temperature ** 2


def salient_set(teacher_sal: torch.Tensor, valid: torch.Tensor, ratio: float) -> torch.Tensor:
    """[G, V] bool: the top ceil(ratio * n_v) image tokens of the teacher's saliency."""
    n_v = valid.sum(-1)
    n_keep = torch.clamp(torch.ceil(ratio * n_v.float()).long(), min=1)
    masked = _up(teacher_sal).masked_fill(~valid, NEG_INF)
    order = masked.argsort(-1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return (rank < n_keep[:, None]) & valid


def fold_saliency(sal: torch.Tensor, salient: torch.Tensor) -> torch.Tensor:
    """[G, V] saliency -> [G, V+1] log-probs: salient tokens kept, every other token in one bin
    (entries of non-salient tokens are -inf; the last column is the non-salient bin)."""
    sal = _up(sal).clamp_min(0)
    sal = sal / sal.sum(-1, keepdim=True).clamp_min(1e-30)
    kept = torch.where(salient, sal, torch.zeros_like(sal))
    rest = (sal * (~salient)).sum(-1, keepdim=True)
    # every image token salient (--iva-ratio 1.0): the rest bin is empty, log 0 = -inf with a zero gradient
    return safe_log(torch.cat([kept, rest], -1).clamp_min(0))


def iva_loss(teacher_sal: torch.Tensor, student_sal: torch.Tensor, valid: torch.Tensor, ratio: float,
             reduction: str = "mean") -> torch.Tensor:
    """Mean (or sum) over (sample, turn) groups of KL(fold_S(s_T) || fold_S(s_S)) (METHOD.md section 3)."""
    salient = salient_set(teacher_sal, valid, ratio)
    lt = fold_saliency(teacher_sal, salient)
    ls = fold_saliency(student_sal, salient)
    per_group = kl(lt, ls)
    return per_group.sum() if reduction == "sum" else per_group.mean()


def candidate_weights(cand_ids, topk_ids, topk_logprobs) -> torch.Tensor:
    """p~_T(c_b): the teacher's first-step probabilities of the B candidates (looked up in its top-k),
    renormalised over the candidates. [N, B]. A row none of whose candidates is in the teacher's top-k (an empty
    row: nothing to weigh) gets weights 0, not softmax(-inf, ..., -inf) = NaN: it adds nothing to TPA."""
    match = topk_ids[:, None, :].long() == cand_ids[:, :, None].long()              # [N, B, k]
    lp = _up(topk_logprobs)[:, None, :].expand(match.shape).masked_fill(~match, NEG_INF)
    best = lp.max(-1).values                                                         # [N, B]
    found = torch.isfinite(best).any(-1, keepdim=True)                               # [N, 1]
    return torch.softmax(best.masked_fill(~found, 0.0), dim=-1) * found


TPA_WEIGHTINGS = ("teacher", "student")
IVA_FORMS = ("attention", "token-kl")


def iva_token_kl_loss(img_logits, ivak_ids, ivak_logprobs, ivak_tail, ivak_weight, n_groups: int,
                      temperature: float = 1.0, cached_at: float = 1.0):
    """IVA's token-KL reading (the survey's "teacher attention aggregated into visual-token KL weights"): at each
    (sample, turn) group's top-r salient image tokens, KL(fold(teacher's output) || fold(student's output)) on the
    teacher's top-k + rest, weighted by the teacher's saliency renormalised over the r; mean over groups, x tau^2.
    img_logits [R, V]: the student's LM head at those image tokens."""
    lt = fold_teacher(ivak_logprobs, ivak_tail, temperature, cached_at)
    ls = fold_student(img_logits, ivak_ids, temperature)
    return (_up(ivak_weight) * kl(lt, ls)).sum() / max(n_groups, 1) * temperature ** 2


def student_candidate_weights(cand_logp: torch.Tensor) -> torch.Tensor:
    """p~_S(c_b): the student's own next-token probabilities of the cached candidates (log-probs [N, B] at the
    position they replace), renormalised over the candidates and detached: the paper samples the branch
    candidates from the student, and an offline cache can only hold the teacher's, so the student's own
    distribution weighs them (its sampling, restricted to the cached support). [N, B]"""
    return torch.softmax(_up(cand_logp.detach()), dim=-1)


def tpa_loss(branch_logits, cand_ids, tpa_ids, tpa_logprobs, tpa_tail, topk_ids, topk_logprobs, temperature=1.0,
             weighting: str = "teacher", student_logits=None, cached_at: float = 1.0):
    """METHOD.md section 4. branch_logits [N, B, V]: the student's output at each branch token (the
    teacher's candidate c_b put in place of y_t); tpa_* the teacher's cached next-step top-k2 per
    branch. Mean over response tokens of sum_b w(c_b) * KL(fold(q_T,b) || fold(q_S,b)), x tau^2, with w the
    teacher's renormalised first-step probabilities of the candidates, or (weighting="student") the student's
    (``student_logits`` [N, V] at the positions the candidates replace)."""
    if weighting == "student":
        lp = torch.log_softmax(_up(student_logits).detach(), -1).gather(-1, cand_ids.long())
        weights = student_candidate_weights(lp).to(_up(branch_logits).dtype)
    else:
        weights = candidate_weights(cand_ids, topk_ids, topk_logprobs)
    lt = fold_teacher(tpa_logprobs, tpa_tail, temperature, cached_at)
    ls = fold_student(branch_logits, tpa_ids, temperature)
    per_row = (weights * kl(lt, ls)).sum(-1)
    return per_row.sum() / max(per_row.numel(), 1) * temperature ** 2  # no TPA row: 0, not the NaN of an empty mean


