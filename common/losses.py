"""Loss math shared by both stages, and the loss registry.

Distributions are compared on the teacher's (k+1)-way partition of the vocabulary: the teacher's
top-k ids plus one "rest" bucket. Folding both distributions this way is exact bookkeeping (the
chain rule of KL): ``KL_full = KL_folded + P_T(rest) * KL(P_T(.|rest) || P_S(.|rest))`` for forward
KL, so the folded KL equals the full-vocabulary KL when k = V and is a lower bound that misses only
the divergence inside the teacher's rest bucket otherwise (tests check both).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


def _up(x: torch.Tensor) -> torch.Tensor:
    """Low-precision floats to fp32; fp64 stays fp64 (the tests' exact references)."""
    return x if x.dtype == torch.float64 else x.float()


# --- folding ---------------------------------------------------------------------------------
def fold_student(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log-probs [..., k+1] of the student on the teacher's ids plus the rest bucket."""
    ls = F.log_softmax(_up(logits) / temperature, dim=-1)
    top = ls.gather(-1, ids.long())
    masked = ls.scatter(-1, ids.long(), NEG_INF)
    empty = torch.isneginf(masked).all(-1, keepdim=True)  # k = V: an empty rest bucket, -inf with a zero gradient
    rest = torch.where(empty, NEG_INF, masked.masked_fill(empty, 0.0).logsumexp(-1, keepdim=True))
    return torch.cat([top, rest], dim=-1)


def fold_teacher(topk_logprobs: torch.Tensor, tail_logmass: torch.Tensor, temperature: float = 1.0,
                 cached_at: float = 1.0) -> torch.Tensor:
    """log-probs [..., k+1] of the teacher's cached top-k [..., k] + rest log-mass [...], renormalised, at
    temperature tau = ``temperature`` for a cache holding the teacher at ``cached_at`` (dump-teacher
    --temperature, the manifest's ``params.temperature``, 1 when absent).

    At tau = cached_at this is the cached distribution, exact (renormalising absorbs the encoding's rounding of
    the top-k). At any other tau the cached (k+1)-way distribution is tempered by tau / cached_at, its rest bucket
    as one atom (its members' logits are not cached): an approximation of the rest mass, and of every top-k
    probability through the normalisation, far off on a large vocabulary (docs/method.md "Temperature";
    train-student refuses it unless --approximate-temperature, ``temperature_bounds`` gives the exact range)."""
    lt = torch.cat([_up(topk_logprobs), _up(tail_logmass).unsqueeze(-1)], dim=-1)
    rel = temperature / cached_at
    return F.log_softmax(lt if rel == 1.0 else lt / rel, dim=-1)


def temperature_bounds(topk_logprobs: torch.Tensor, tail_logmass: torch.Tensor, n_rest: int, temperature: float,
                       cached_at: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a top-k + rest cache says about the teacher's rest mass at another temperature: per row, the least and
    the most it can be, and what tempering the rest bucket as one lump (``fold_teacher``) gives. Shapes: top-k
    log-probs [..., k] and rest log-mass [...] at ``cached_at``; returns three [...] float64 tensors (rest masses).

    With a = cached_at / temperature, the tempered teacher is p_i^a / Z. The rest bucket holds ``n_rest`` tokens
    (the vocabulary less k) whose cached probabilities sum to r, each at most the k-th top-k probability p_k (they
    are not in the top-k). Their tempered sum S = sum_j p_j^a is concave in the p_j for a < 1 (temperature above
    the cache's): largest when the mass is spread evenly, n (r / n)^a, least when it is packed into as few tokens
    as the bound p_k allows, m p_k^a + (r - m p_k)^a with m = floor(r / p_k) (approached as the other members go to
    0); for a > 1 the two swap. The rest mass is then S / (sum_i p_i^a + S), monotone in S. The lump gives r^a,
    below both bounds for a < 1 (x -> x^a is subadditive), so it is never the teacher's rest mass there."""
    a = float(cached_at) / float(temperature)
    lp = topk_logprobs.double()
    r = tail_logmass.double().exp()
    top = (lp * a).exp().sum(-1)
    pk = lp.min(-1).values.exp().clamp_min(1e-300)
    n = float(max(n_rest, 1))
    even = n * (r / n) ** a
    m = torch.minimum(torch.floor(r / pk), torch.full_like(r, n))
    packed = m * pk ** a + (r - m * pk).clamp_min(0) ** a
    lo, hi = (packed, even) if a < 1 else (even, packed)
    lump = r ** a
    mass = lambda s: s / (top + s)  # noqa: E731
    return mass(lo), mass(hi), mass(lump)


def kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last axis from log-probs; 0 * log 0 = 0, in the value and in the gradient: the
    difference lp - lq is masked before the product, so a bin both sides give zero (log 0 - log 0 = NaN) sends
    no NaN back through either side."""
    p = lp.exp()
    return (p * torch.where(p > 0, lp - lq, torch.zeros_like(p))).sum(-1)


def safe_log(x: torch.Tensor) -> torch.Tensor:
    """log x for x >= 0 with log 0 = -inf and a zero (not NaN) gradient at 0: the log is taken of 1 where x is 0,
    so torch.where's masked branch never holds d log(x)/dx = inf (inf * 0 = NaN in backward)."""
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, torch.ones_like(x)).log(), torch.full_like(x, NEG_INF))


def jsd(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence from log-probs. A bin empty on both sides (the rest bucket when the cache holds
    the whole vocabulary) has log m = -inf with a zero gradient (logaddexp(-inf, -inf) alone backpropagates NaN)."""
    both = torch.isneginf(lp) & torch.isneginf(lq)
    zero = torch.zeros_like(lp)
    lm = torch.where(both, torch.full_like(lp, NEG_INF),
                     torch.logaddexp(torch.where(both, zero, lp), torch.where(both, zero, lq)) - math.log(2.0))
    return 0.5 * kl(lp, lm) + 0.5 * kl(lq, lm)


DIVERGENCES = {
    "fkl": lambda lt, ls: kl(lt, ls),
    "rkl": lambda lt, ls: kl(ls, lt),
    "jsd": jsd,
}


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


# --- cross-tokenizer terms (issue 20) ----------------------------------------------------------
# Teacher and student do not share a vocabulary: the student's response rows and the teacher's cached rows are
# aligned into chunks of identical text (common/token_align.py). Batch contract, flattened over response rows
# (N_s student rows, N_t teacher rows): ``xt_pair`` [N_s] the teacher row starting the same chunk as a student
# row (-1: none), ``xt_ids`` [N_t, k] the teacher's top-k ids mapped to the student's vocabulary through identical
# token strings (-1: none), ``xt_chunk_s`` [N_s] / ``xt_chunk_t`` [N_t] the batch-global chunk of each row (-1:
# none), ``xt_n_chunks``, ``xt_target_logprob`` [N_t] the teacher's log-prob of its realised token.
# Where every reference needs the teacher's whole distribution, alignti has its cached top-k plus the exact rest
# mass (the (k+1)-way fold above); each function says how the rest enters.
CROSS_TOKENIZER = ("uld", "gold", "alm")
ALM_DISTANCES = ("binary_ce", "abs")
ALM_EPS = 1e-6  # tokenkit's epsilon: chunk log-probs are moved this far below 0 before log(1 - p)


def _sorted_desc(x: torch.Tensor, width: int) -> torch.Tensor:
    """x [P, n] sorted in decreasing order along the last axis, cut or zero-padded to ``width`` columns."""
    s = x.sort(-1, descending=True).values[:, :width]
    return F.pad(s, (0, width - s.shape[-1])) if s.shape[-1] < width else s


def uld_loss(student_logits: torch.Tensor, topk_logprobs: torch.Tensor, tail_logmass: torch.Tensor,
             temperature: float = 1.0, cached_at: float = 1.0) -> torch.Tensor:
    """Universal Logit Distillation (Boizard et al., 2024, arXiv 2402.12030; TRL's ``ULDLoss``): the L1 (1-D
    Wasserstein) distance between the two next-token distributions' probabilities sorted in decreasing order,
    the shorter vocabulary zero-padded, which needs no id mapping. Per paired row [P]; student_logits [P, V_s],
    the teacher's cached top-k log-probs [P, k] and log rest mass [P], both sides at temperature tau (no tau^2:
    ULD scales neither).

    alignti's deviation: the teacher is its top-k plus the rest mass P_rest, not its whole distribution. Ranks
    1..k compare exactly; ranks beyond k are compared as one sum, |Q_rest - P_rest| with Q_rest the student's
    mass beyond its own top k. By the triangle inequality this is a lower bound on the full-vocabulary ULD that
    misses only how the two rest masses are spread (equal to it when k covers the teacher's vocabulary). A
    student vocabulary smaller than k is zero-padded as ULD pads, so V_s enters only there."""
    k = topk_logprobs.shape[-1]
    p = fold_teacher(topk_logprobs, tail_logmass, temperature, cached_at).exp()
    q = F.softmax(_up(student_logits) / temperature, dim=-1)
    top_t = _sorted_desc(p[:, :k], k)
    qs = q.sort(-1, descending=True).values
    top_s = F.pad(qs[:, :k], (0, max(0, k - qs.shape[-1])))  # sorted already: cut or zero-pad to k
    rest_s = qs[:, k:].sum(-1)
    return (top_s - top_t).abs().sum(-1) + (rest_s - p[:, k]).abs()


def _student_mask(ids: torch.Tensor, valid: torch.Tensor, vocab: int) -> torch.Tensor:
    """[P, V] bool: the student ids that a valid slot of ``ids`` [P, k] names (invalid slots name nothing)."""
    hits = torch.zeros(ids.shape[0], vocab, dtype=torch.int32, device=ids.device)
    return hits.scatter_add_(-1, ids.long().clamp_min(0), valid.int()) > 0


def gold_parts(student_logits: torch.Tensor, xt_ids: torch.Tensor, topk_logprobs: torch.Tensor,
               tail_logmass: torch.Tensor, temperature: float = 1.0,
               cached_at: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The two parts of GOLD's hybrid loss (TRL ``ULDLoss._compute_hybrid_uld_loss``), per paired row [P] each:

    - matched: the teacher's top-k slots whose token string is also a student token (``xt_ids`` [P, k] >= 0,
      the student's id) compared token by token: forward KL(teacher || student) on the partition {each matched
      token, everything else} (the fold of ``distill_loss`` restricted to the matched ids), x tau^2. TRL uses its
      generalized JSD (beta) here; alignti uses the forward KL of its ``kd`` term, so that with one tokenizer
      (every slot matched) this part is exactly today's ``kd`` per row.
    - unmatched: ULD on the rest: the teacher's unmatched top-k probabilities sorted in decreasing order against
      the student's largest probabilities outside this row's matched ids, rank by rank over as many ranks as the
      teacher has unmatched slots (no tau^2). The teacher's rest mass is already the "everything else" bin of the
      matched part, so it does not enter twice. TRL sorts each side's unmatched vocabulary; with the teacher's
      top-k cached, the ranks past the teacher's unmatched slots are not known and are left out, and "matched"
      is per row (the ids this row's top-k maps to), not per vocabulary."""
    k = topk_logprobs.shape[-1]
    valid = xt_ids >= 0
    lt = fold_teacher(topk_logprobs, tail_logmass, temperature, cached_at)
    lt_top = lt[:, :k].masked_fill(~valid, NEG_INF)
    lt_else = torch.cat([lt[:, :k].masked_fill(valid, NEG_INF), lt[:, k:]], -1).logsumexp(-1, keepdim=True)
    ls_all = F.log_softmax(_up(student_logits) / temperature, dim=-1)
    mask = _student_mask(xt_ids, valid, ls_all.shape[-1])
    ls_top = ls_all.gather(-1, xt_ids.long().clamp_min(0)).masked_fill(~valid, NEG_INF)
    off = ls_all.masked_fill(mask, NEG_INF)
    empty = mask.all(-1, keepdim=True)  # every student token matched: an empty "else" bin, -inf with zero gradient
    ls_else = torch.where(empty, NEG_INF, off.masked_fill(empty, 0.0).logsumexp(-1, keepdim=True))
    matched = kl(torch.cat([lt_top, lt_else], -1), torch.cat([ls_top, ls_else], -1)) * temperature ** 2
    n_u = (~valid).sum(-1, keepdim=True)
    pu = _sorted_desc(lt[:, :k].exp().masked_fill(valid, 0.0), k)
    qu = _sorted_desc(ls_all.exp().masked_fill(mask, 0.0), k)
    rank = torch.arange(k, device=pu.device)
    unmatched = torch.where(rank < n_u, (qu - pu).abs(), torch.zeros_like(pu)).sum(-1)
    return matched, unmatched


def gold_loss(student_logits, xt_ids, topk_logprobs, tail_logmass, temperature: float = 1.0,
              matched_weight: float = 1.0, unmatched_weight: float = 1.0, cached_at: float = 1.0) -> torch.Tensor:
    """GOLD's hybrid (TRL ``uld_use_hybrid_loss``): matched_weight * matched + unmatched_weight * unmatched per
    paired row [P] (``gold_parts``). TRL's adaptive weights are matched_weight = the fraction of the teacher's
    vocabulary with an identical student token and unmatched_weight = 1 - that (``gold_weights``)."""
    m, u = gold_parts(student_logits, xt_ids, topk_logprobs, tail_logmass, temperature, cached_at)
    return matched_weight * m + unmatched_weight * u


def gold_weights(w: "LossWeights", overlap: float | None) -> tuple[float, float]:
    """(matched, unmatched) weights of the GOLD hybrid: ``w.gold_matched`` / ``w.gold_unmatched`` when set, else
    TRL's adaptive weights from ``overlap`` (the fraction of the teacher's vocabulary with an identical student
    token: ``xt_overlap`` in the batch); neither given: 1 and 1."""
    if w.gold_matched is not None or w.gold_unmatched is not None:
        return (1.0 if w.gold_matched is None else float(w.gold_matched),
                1.0 if w.gold_unmatched is None else float(w.gold_unmatched))
    if overlap is None:
        return 1.0, 1.0
    return float(overlap), 1.0 - float(overlap)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of log 1/2 (Maechler, 2012; tokenkit's log1mexp)."""
    return torch.where(x < -math.log(2.0), torch.log1p(-x.exp()), torch.log(-torch.expm1(x)))


def alm_distance(t: torch.Tensor, s: torch.Tensor, distance: str = "binary_ce", temperature: float = 100.0):
    """tokenkit's chunk distance between the teacher's (t) and the student's (s) chunk log-likelihoods (both
    <= 0). ``binary_ce`` (tokenkit's default ``alm_diff_fn``, the binarised form): each chunk is a Bernoulli event
    with probability exp(logp / T) - the chunk occurs or not - and the loss is the cross-entropy of the
    student's Bernoulli under the teacher's, -(p_t log p_s + (1 - p_t) log(1 - p_s)), T the binarisation
    temperature (tokenkit: 100) and log-probs moved ALM_EPS below 0; ``abs``: |t - s| (tokenkit's ``abs``)."""
    if distance == "abs":
        return (t - s).abs()
    if distance != "binary_ce":
        raise ValueError(f"unknown ALM distance '{distance}'; choose one of {', '.join(ALM_DISTANCES)}")
    lt = t / temperature - ALM_EPS
    ls = s / temperature - ALM_EPS
    return -(lt.exp() * ls + (-torch.expm1(lt)) * log1mexp(ls))


def chunk_logprobs(logp: torch.Tensor, chunk: torch.Tensor, n_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of ``logp`` [N] over each chunk's rows [n_chunks], how many rows each chunk has); rows of chunk -1
    count nowhere."""
    ok = chunk >= 0
    idx = chunk.long().clamp_min(0)
    sums = torch.zeros(n_chunks, dtype=logp.dtype, device=logp.device).index_add_(0, idx, logp * ok)
    counts = torch.zeros(n_chunks, dtype=torch.long, device=logp.device).index_add_(0, idx, ok.long())
    return sums, counts


def alm_loss(student_logprobs: torch.Tensor, chunk_s: torch.Tensor, teacher_logprobs: torch.Tensor,
             chunk_t: torch.Tensor, n_chunks: int, distance: str = "binary_ce",
             temperature: float = 100.0) -> torch.Tensor:
    """Approximate Likelihood Matching (Minixhofer et al., NeurIPS 2025; tokenkit ``compute_alm_loss``): per
    chunk of identical text, the teacher's chunk log-likelihood t_c (the sum of its realised tokens' log-probs,
    ``teacher_logprobs`` [N_t] = the cache's ``xt_target_logprob``, over the chunk's teacher rows) against the
    student's s_c (its own tokens' log-probs ``student_logprobs`` [N_s], summed over the chunk's student rows),
    through ``alm_distance``. Returns [C]: one value per chunk with rows on both sides (chunk order), tokenkit's
    "chunk_count" weighting (each chunk counts once). alignti needs no deviation here: ALM uses only the realised
    tokens' log-probs, which the cache holds exactly (fp32 target log-prob)."""
    s, ns = chunk_logprobs(_up(student_logprobs), chunk_s, n_chunks)
    t, nt = chunk_logprobs(_up(teacher_logprobs).to(s.dtype), chunk_t, n_chunks)
    both = (ns > 0) & (nt > 0)
    return alm_distance(t[both], s[both], distance, temperature)


def xt_terms(w: "LossWeights", out: dict) -> torch.Tensor:
    """The cross-tokenizer KD term ``w.cross_tokenizer`` of a batch from full student logits (the unchunked
    reference of the loss head): the sum over paired rows (uld, gold) or aligned chunks (alm)."""
    logits = out["logits"]
    if w.cross_tokenizer == "alm":
        lp = F.log_softmax(_up(logits), -1).gather(-1, out["targets"].long()[:, None]).squeeze(-1)
        return alm_loss(lp, out["xt_chunk_s"], out["xt_target_logprob"], out["xt_chunk_t"], int(out["xt_n_chunks"]),
                        w.alm_distance, w.alm_temperature).sum()
    rows = torch.nonzero(out["xt_pair"] >= 0).flatten()
    tr = out["xt_pair"].long().index_select(0, rows)
    z = logits.index_select(0, rows)
    lp, tail = out["topk_logprobs"].index_select(0, tr), out["tail_logmass"].index_select(0, tr)
    if w.cross_tokenizer == "uld":
        return uld_loss(z, lp, tail, w.temperature, w.cache_temperature).sum()
    mw, uw = gold_weights(w, out.get("xt_overlap"))
    if out.get("xt_logprobs") is not None:  # slots that name one student id merged (token_align.merge_duplicates)
        lp = out["xt_logprobs"].index_select(0, tr)
    return gold_loss(z, out["xt_ids"].index_select(0, tr), lp, tail, w.temperature, mw, uw, w.cache_temperature).sum()


def resample_saliency(sal: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]) -> torch.Tensor:
    """One image's saliency over its image tokens, ``sal`` [rows * cols] (row-major) or [rows, cols] on the
    teacher's token grid ``src_grid`` = (rows, cols), resampled to the student's grid ``dst_grid`` and renormalised
    to sum 1: [dst_rows * dst_cols]. Both grids cover the same image, so each token stands for the centre of its
    cell: ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` (align_corners=True would pin
    the corner tokens' centres to the image's corners instead), with ``antialias=True`` so a downsampled grid
    averages every teacher token it covers rather than sampling two of each axis. Any pair of grids, including
    Qwen2-VL's dynamic ones (the grid of merged tokens: image_grid_thw's (h, w) // spatial_merge_size). A map
    with no mass (all zeros) stays uniform. Raises ValueError when ``sal`` does not hold src_grid's tokens."""
    (r0, c0), (r1, c1) = (int(src_grid[0]), int(src_grid[1])), (int(dst_grid[0]), int(dst_grid[1]))
    if min(r0, c0, r1, c1) < 1:
        raise ValueError(f"saliency grids must be at least 1x1, got {src_grid} -> {dst_grid}")
    if sal.numel() != r0 * c0:
        raise ValueError(f"saliency has {sal.numel()} values but the teacher's grid {r0}x{c0} has {r0 * c0} tokens; "
                         "pass the image's own (rows, cols) grid")
    x = _up(sal).reshape(1, 1, r0, c0).clamp_min(0)
    y = x if (r0, c0) == (r1, c1) else F.interpolate(x, size=(r1, c1), mode="bilinear", align_corners=False,
                                                     antialias=True).clamp_min(0)
    y = y.reshape(-1)
    total = y.sum()
    return y / total if total > 0 else torch.full_like(y, 1.0 / y.numel())


def resample_saliency_batch(sals: list[torch.Tensor], src_grids, dst_grids) -> list[torch.Tensor]:
    """``resample_saliency`` for several images (one per (sal, src, dst) triple), e.g. a multi-image turn or a
    batch of Qwen2-VL images each on its own dynamic grid. Returns the maps in order, each summing to 1."""
    if not len(sals) == len(src_grids) == len(dst_grids):
        raise ValueError(f"{len(sals)} saliency maps but {len(src_grids)} teacher and {len(dst_grids)} student grids")
    return [resample_saliency(s, a, b) for s, a, b in zip(sals, src_grids, dst_grids)]


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


@dataclass
class LossWeights:
    kd: float = 1.0
    iva: float = 1.0
    tpa: float = 1.0
    temperature: float = 1.0
    iva_ratio: float = 0.25
    tpa_weighting: str = "teacher"  # weights over the cached TPA candidates: the teacher's, or the student's own
    iva_form: str = "attention"  # IVA as attention alignment, or "token-kl" (outputs at the salient image tokens)
    cross_tokenizer: str | None = None  # "uld" | "gold" | "alm": the KD term across tokenizers (None: same tokenizer)
    gold_matched: float | None = None    # GOLD hybrid weights (None: TRL's adaptive ones, see gold_weights)
    gold_unmatched: float | None = None
    alm_distance: str = "binary_ce"      # tokenkit's chunk distance (alm_distance)
    alm_temperature: float = 100.0       # tokenkit's binarisation temperature
    cache_temperature: float = 1.0       # the temperature the cache holds the teacher at (its params.temperature)
    router_aux: float | None = None      # MoE student: its load-balancing loss's weight (None: the model config's
    #                                      router_aux_loss_coef, ModelAdapter.router_aux_coef; 0: off)


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


# --- the memory-flat loss head ---------------------------------------------------------------
# The student's LM head and every per-token term in one pass over row chunks: [rows, V] logits exist for
# one chunk at a time, and each chunk's gradients (w.r.t. its hidden states and the head's weight) are
# taken in the forward, right after its loss, so nothing of size V is kept for backward (the Liger Kernel
# fused-linear recipe; torchtune's chunked KD losses chunk the same way but keep every chunk's graph).
# Values and gradients equal the unchunked path above (tests/test_loss_head.py).

def check_cross_tokenizer(spec: "LossSpec", w: LossWeights) -> None:
    """The cross-tokenizer term replaces the forward-KL ``kd`` term; any other choice is a user error."""
    if w.cross_tokenizer not in CROSS_TOKENIZER:
        raise ValueError(f"unknown --cross-tokenizer '{w.cross_tokenizer}'; choose one of {', '.join(CROSS_TOKENIZER)}")
    if spec.divergence not in (None, "fkl"):
        raise ValueError(f"--cross-tokenizer {w.cross_tokenizer} replaces the KD term and cannot be combined with "
                         f"--loss {spec.name}; use --loss kd, kd+iva, kd+tpa or alignti")
    if w.cross_tokenizer == "alm" and w.alm_distance not in ALM_DISTANCES:
        raise ValueError(f"unknown ALM distance '{w.alm_distance}'; choose one of {', '.join(ALM_DISTANCES)}")


def xt_counts(batch: dict) -> dict[str, float]:
    """The cross-tokenizer denominators of a batch: ``xt_pairs`` (student rows paired with a teacher row: ULD and
    GOLD average over them) and ``xt_chunks`` (chunks with rows on both sides: ALM averages over them); {} for a
    same-tokenizer batch."""
    out = {}
    if "xt_pair" in batch:
        out["xt_pairs"] = float((batch["xt_pair"] >= 0).sum())
    if "xt_chunk_s" in batch:
        n = int(batch["xt_n_chunks"])
        _, ns = chunk_logprobs(torch.zeros(len(batch["xt_chunk_s"])), batch["xt_chunk_s"].cpu(), n)
        _, nt = chunk_logprobs(torch.zeros(len(batch["xt_chunk_t"])), batch["xt_chunk_t"].cpu(), n)
        out["xt_chunks"] = float(((ns > 0) & (nt > 0)).sum())
    return out


@dataclass
class StepNorm:
    """Denominators of one optimizer step, summed over its micro-batches and ranks (transformers'
    ``num_items_in_batch``): the per-token terms (SFT, KD) are sums over the step's response tokens divided
    by ``tokens``, TPA by ``tpa_rows`` (the step's response positions with TPA statistics) and IVA by
    ``groups`` (its (sample, turn) groups). ``scale`` undoes the data-parallel mean over ranks (world size)."""
    tokens: float
    tpa_rows: float = 1.0
    groups: float = 1.0
    scale: float = 1.0
    xt_pairs: float = 1.0   # cross-tokenizer: paired student rows (uld, gold) and aligned chunks (alm), see xt_counts
    xt_chunks: float = 1.0

    @classmethod
    def from_counts(cls, counts: dict[str, float], world_size: int = 1) -> "StepNorm":
        return cls(**{k: max(float(v), 1.0) for k, v in counts.items()}, scale=float(world_size))

    @classmethod
    def of(cls, batch: dict, world_size: int = 1) -> "StepNorm":
        return cls.from_counts(step_counts(batch), world_size)


def step_counts(batch: dict) -> dict[str, float]:
    """This micro-batch's share of the step's denominators (see StepNorm)."""
    tokens = float(len(batch["targets"]))
    tpa = float(len(batch["tpa_rows"])) if "tpa_rows" in batch else tokens
    groups = float(batch["sal_valid"].shape[0]) if batch.get("sal_valid") is not None else 0.0
    return {"tokens": tokens, "tpa_rows": tpa, "groups": groups, **xt_counts(batch)}


DEFAULT_CHUNK_BYTES = 128 * 2 ** 20  # fp32 logits of one row chunk on CPU (bench/loss_head.py: 0.34x unchunked SFT
#                                      memory, no slower)
CUDA_CHUNK_BYTES = 1024 * 2 ** 20    # on a GPU: fewer, larger matmuls; still flat in the number of tokens


def chunk_rows(vocab: int, chunk_bytes: int | None = None, device: torch.device | None = None) -> int:
    if chunk_bytes is None:
        chunk_bytes = CUDA_CHUNK_BYTES if device is not None and device.type == "cuda" else DEFAULT_CHUNK_BYTES
    return max(8, int(chunk_bytes // (4 * vocab)))


def fold_rows(z: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``fold_student`` from fp32 logits z [C, V] (already divided by tau) and their log-sum-exp [C]: the
    rest bucket is log(1 - sum of the top-k probabilities), exact in fp32 while that sum is <= 1/2; rows
    above it (the student already agrees with the teacher's top-k) take the exact masked log-sum-exp."""
    top = z.gather(-1, ids.long()) - lse[:, None]
    s = top.exp().sum(-1)
    rest = torch.log1p(-s.clamp(max=0.5))
    bad = torch.nonzero(s > 0.5).flatten()
    if len(bad):
        zb = z.index_select(0, bad).scatter(-1, ids.index_select(0, bad).long(), NEG_INF)
        empty = torch.isneginf(zb).all(-1)  # the top-k is the whole vocabulary: the rest bucket is empty
        lse_rest = torch.where(empty, NEG_INF, zb.masked_fill(empty[:, None], 0.0).logsumexp(-1))
        rest = rest.index_copy(0, bad, lse_rest - lse.index_select(0, bad))
    return torch.cat([top, rest[:, None]], -1)


def _fkl_grad_(soft: torch.Tensor, ids: torch.Tensor, lt: torch.Tensor, ls: torch.Tensor, coef, extra: float = 0.0):
    """coef * d KL(lt || fold(z)) / dz + extra * softmax(z), written into ``soft`` = softmax(z) [C, V]:
    softmax * (1 - P_rest / Q_rest) off the teacher's top-k, Q_top - P_top on it (ls = fold(z) gives Q);
    coef [C] or a scalar. ``extra`` folds SFT's softmax term into the same pass (tau = 1)."""
    coef = torch.as_tensor(coef, dtype=soft.dtype, device=soft.device).reshape(-1, 1)
    ratio = (lt[:, -1] - ls[:, -1]).exp()                                 # P_rest / Q_rest
    soft.mul_(coef * (1 - ratio)[:, None] + extra)
    q_top = ls[:, :-1].exp()
    return soft.scatter_(-1, ids.long(), coef * (q_top - lt[:, :-1].exp()) + extra * q_top)


def _main_fn(t: dict, spec: "LossSpec", w: LossWeights, norm: StepNorm, shared: dict):
    """SFT's cross-entropy plus the KD term. Gradients in closed form and in place for forward KL (softmax
    minus one-hot for SFT, see _fkl_grad_ for KD); reverse KL and JSD take autograd on the chunk."""
    tau = w.temperature
    c_sft = norm.scale / norm.tokens
    c_kd = norm.scale * w.kd * tau ** 2 / norm.tokens
    div, name = spec.divergence, spec.kd_term
    coverage = tpa_coverage_fn(t, shared) if spec.tpa and t.get("tpa_cand_ids") is not None else None

    def fn(z, lo, hi, need):
        tgt = t["targets"][lo:hi, None].long()
        g = None
        z.sub_(z.amax(-1, keepdim=True))  # every term is shift-invariant; log-probs keep fp32 precision
        lse = z.logsumexp(-1)
        ce = lse - z.gather(-1, tgt).squeeze(-1)
        stats = {"sft": ce.sum()}
        if coverage is not None:
            stats.update(coverage(z, lse, lo, hi))
        loss = c_sft * stats["sft"]
        if name:
            ids = t["topk_ids"][lo:hi]
            lt = fold_teacher(t["topk_logprobs"][lo:hi], t["tail_logmass"][lo:hi], tau, w.cache_temperature)
            with torch.enable_grad():
                zz = z.detach().requires_grad_(need and div != "fkl")
                zt = zz if tau == 1.0 else zz / tau
                ls = fold_rows(zt, ids, lse if tau == 1.0 and div == "fkl" else zt.logsumexp(-1))
                d = DIVERGENCES[div](lt, ls).sum()
                if need and div != "fkl":
                    (g,) = torch.autograd.grad(c_kd * d, zz)
            stats[name] = d.detach() * tau ** 2
            loss = loss + c_kd * d.detach()
            if need and div == "fkl":
                ls = ls.detach()
                if tau == 1.0:  # one softmax serves SFT and KD: z becomes the whole gradient, in place
                    g = _fkl_grad_(z.sub_(lse[:, None]).exp_(), ids, lt, ls, c_kd, extra=c_sft)
                else:
                    zt = zt.detach()
                    g = _fkl_grad_(zt.sub_(zt.logsumexp(-1, keepdim=True)).exp_(), ids, lt, ls, c_kd / tau)
                    g.add_(z.sub_(lse[:, None]).exp_(), alpha=c_sft)
        if need:
            if g is None:  # SFT alone: z becomes its own gradient
                g = z.sub_(lse[:, None]).exp_().mul_(c_sft)
            elif div != "fkl":
                g.add_(z.sub_(lse[:, None]).exp_(), alpha=c_sft)
            g.scatter_add_(-1, tgt, torch.full(tgt.shape, -c_sft, dtype=g.dtype, device=g.device))
        return loss, stats, g
    return fn


def _uld_grad_(u: torch.Tensor, lt: torch.Tensor, coef: float):
    """ULD (``uld_loss``) of rows whose tempered softmax is ``u`` [P, V] against the teacher's fold ``lt`` [P, k+1]:
    returns the per-row values [P] and turns ``u`` into coef * d ULD / d(tempered logits), in place: with
    g = sign(Q_rest - P_rest) everywhere and sign(q_(r) - p_(r)) at the student's rank-r id, the softmax Jacobian
    gives u * (g - <u, g>)."""
    k = lt.shape[-1] - 1
    kk = min(k, u.shape[-1])
    p = lt.exp()
    val, idx = u.topk(kk, -1)
    top_s = F.pad(val, (0, k - kk))
    rest_s = (1 - val.sum(-1)).clamp_min(0) if kk < u.shape[-1] else torch.zeros_like(val[:, 0])
    d_top = top_s - _sorted_desc(p[:, :k], k)
    d_rest = rest_s - p[:, k]
    rows = d_top.abs().sum(-1) + d_rest.abs()
    s_top, s_rest = d_top[:, :kk].sign(), d_rest.sign()
    dot = s_rest * rest_s + (val * s_top).sum(-1)
    u.mul_((coef * (s_rest - dot))[:, None])
    u.scatter_add_(-1, idx, coef * val * (s_top - s_rest[:, None]))
    return rows


def _gold_rows_(zt: torch.Tensor, ids: torch.Tensor, lt: torch.Tensor, c_matched: float, c_unmatched: float,
                need: bool):
    """GOLD's hybrid (``gold_parts``) of rows of tempered logits ``zt`` [P, V] (shifted so their max is 0), the
    teacher's top-k mapped to student ids ``ids`` [P, k] (-1: no identical string) and its fold ``lt`` [P, k+1].
    Returns (matched [P], unmatched [P], gradient or None): with ``need`` ``zt`` becomes c_matched * d matched +
    c_unmatched * d unmatched w.r.t. the tempered logits, in place; nothing else of size [P, V] is allocated."""
    k = ids.shape[-1]
    valid = ids >= 0
    has = valid.any(-1, keepdim=True)
    first = ids.gather(-1, valid.float().argmax(-1, keepdim=True))
    ids_fix = torch.where(valid, ids, first).long().clamp_min(0)  # invalid slots repeat a valid id of their row
    lse = zt.logsumexp(-1)
    top = (zt.gather(-1, ids_fix) - lse[:, None]).masked_fill(~valid, NEG_INF)
    s = top.exp().sum(-1)
    rest = torch.log1p(-s.clamp(max=0.5))
    bad = torch.nonzero(s > 0.5).flatten()
    if len(bad):  # the student's mass is mostly on the matched ids: the exact masked log-sum-exp
        zb = zt.index_select(0, bad).scatter(-1, ids_fix.index_select(0, bad), NEG_INF)
        empty = torch.isneginf(zb).all(-1)
        lse_rest = torch.where(empty, NEG_INF, zb.masked_fill(empty[:, None], 0.0).logsumexp(-1))
        rest = rest.index_copy(0, bad, lse_rest - lse.index_select(0, bad))
    lt_top = lt[:, :k].masked_fill(~valid, NEG_INF)
    lt_else = torch.cat([lt[:, :k].masked_fill(valid, NEG_INF), lt[:, k:]], -1).logsumexp(-1)
    matched = kl(torch.cat([lt_top, lt_else[:, None]], -1), torch.cat([top, rest[:, None]], -1))
    u = zt.sub_(lse[:, None]).exp_()
    saved = u.gather(-1, ids_fix)
    u.scatter_(-1, ids_fix, torch.where(has, torch.zeros_like(saved), saved))  # matched ids out of the ranking
    kk = min(k, u.shape[-1])
    val, idx = u.topk(kk, -1)
    u.scatter_(-1, ids_fix, saved)
    n_u = (~valid).sum(-1, keepdim=True)
    in_rank = torch.arange(kk, device=u.device) < n_u
    p = lt[:, :k].exp()
    pu = _sorted_desc(p.masked_fill(valid, 0.0), k)
    d_u = torch.where(in_rank, val - pu[:, :kk], torch.zeros_like(val))
    unmatched = d_u.abs().sum(-1) + torch.where(torch.arange(kk, k, device=u.device) < n_u, pu[:, kk:], 0.0).sum(-1)
    if not need:
        return matched, unmatched, None
    ratio = torch.where(torch.isneginf(lt_else), 0.0, (lt_else - rest).exp())      # P_else / Q_else
    s_u = d_u.sign()
    dot = (val * s_u).sum(-1)
    u.mul_((c_matched * (1 - ratio) - c_unmatched * dot)[:, None])
    q_top = top.exp()
    u.scatter_add_(-1, ids_fix, torch.where(valid, c_matched * (ratio[:, None] * q_top - p), 0.0))
    u.scatter_add_(-1, idx, c_unmatched * val * s_u)
    return matched, unmatched, u


def _xt_main_fn(t: dict, spec: "LossSpec", w: LossWeights, norm: StepNorm, shared: dict):
    """Cross-tokenizer main rows (``w.cross_tokenizer``): SFT's cross-entropy on the student's own targets plus the
    KD term across tokenizers, gradients in closed form and in place (nothing of size V outlives its row chunk).
    ``uld`` / ``gold``: on the student rows paired with a teacher row (``xt_pair``), per row, divided by the step's
    paired rows. ``alm``: per chunk of identical text, divided by the step's aligned chunks; a chunk's likelihood
    sums log-probs over several student rows, so the head's row chunks are cut at chunk boundaries (``_xt_bounds``:
    every chunk lies in one row chunk) and the chunk's distance and its derivative are taken right there - one
    pass, no second matmul and no per-row state carried across row chunks."""
    check_cross_tokenizer(spec, w)
    tau, mode = w.temperature, w.cross_tokenizer
    c_sft = norm.scale / norm.tokens
    coverage = tpa_coverage_fn(t, shared) if spec.tpa and t.get("tpa_cand_ids") is not None else None
    if mode == "alm":
        n = int(t["xt_n_chunks"])
        t_sum, nt = chunk_logprobs(_up(t["xt_target_logprob"]), t["xt_chunk_t"], n)
        _, ns = chunk_logprobs(torch.zeros(len(t["xt_chunk_s"]), device=t_sum.device), t["xt_chunk_s"], n)
        both = (ns > 0) & (nt > 0)
        c_kd = norm.scale * w.kd / norm.xt_chunks
    else:
        pair = t["xt_pair"].long()
        c_kd = norm.scale * w.kd / norm.xt_pairs
        mw, uw = gold_weights(w, t.get("xt_overlap")) if mode == "gold" else (1.0, 1.0)

    def fn(z, lo, hi, need):
        tgt = t["targets"][lo:hi, None].long()
        z.sub_(z.amax(-1, keepdim=True))
        lse = z.logsumexp(-1)
        ce = lse - z.gather(-1, tgt).squeeze(-1)
        stats = {"sft": ce.sum()}
        if coverage is not None:
            stats.update(coverage(z, lse, lo, hi))
        beta = torch.full_like(ce, c_sft)  # per-row coefficient of softmax - one-hot in the gradient
        g_rows = None
        if mode == "alm":
            cs = t["xt_chunk_s"][lo:hi].long()
            ok = cs >= 0
            ok &= both[cs.clamp_min(0)]
            cid = torch.unique(cs[ok])
            s_all = torch.zeros(n, dtype=ce.dtype, device=ce.device).index_add_(0, cs[ok], -ce[ok])
            with torch.enable_grad():
                s_c = s_all[cid].detach().requires_grad_(need)
                d = alm_distance(t_sum[cid].to(s_c.dtype), s_c, w.alm_distance, w.alm_temperature).sum()
                if need:
                    (a_c,) = torch.autograd.grad(d, s_c)
            stats["alm"] = d.detach()
            if need:  # d s_c / dz_i = one-hot - softmax for each of the chunk's rows i
                a_all = torch.zeros(n, dtype=ce.dtype, device=ce.device).index_copy_(0, cid, a_c)
                beta = beta - c_kd * torch.where(ok, a_all[cs.clamp_min(0)], 0.0)
            loss = c_sft * stats["sft"] + c_kd * stats["alm"]
        else:
            rows = torch.nonzero(pair[lo:hi] >= 0).flatten()
            tr = pair[lo:hi].index_select(0, rows)
            lp_key = "xt_logprobs" if mode == "gold" and t.get("xt_logprobs") is not None else "topk_logprobs"
            lt = fold_teacher(t[lp_key].index_select(0, tr), t["tail_logmass"].index_select(0, tr), tau,
                              w.cache_temperature)
            zt = z.index_select(0, rows)
            zt = zt if tau == 1.0 else zt.div_(tau)
            if mode == "uld":
                zt.sub_(zt.logsumexp(-1, keepdim=True)).exp_()
                vals = _uld_grad_(zt, lt, c_kd / tau)
                stats["uld"] = vals.sum()
                g_rows = zt if need else None
            else:
                m, u, g_rows = _gold_rows_(zt, t["xt_ids"].index_select(0, tr), lt, c_kd * mw * tau,
                                           c_kd * uw / tau, need)
                stats.update(gold=(mw * m * tau ** 2 + uw * u).sum(), gold_matched=(m * tau ** 2).sum(),
                             gold_unmatched=u.sum())
            loss = c_sft * stats["sft"] + c_kd * stats[mode]
        g = None
        if need:
            g = z.sub_(lse[:, None]).exp_().mul_(beta[:, None])
            g.scatter_add_(-1, tgt, -beta[:, None])
            if g_rows is not None and len(rows):
                g.index_add_(0, rows, g_rows)
        return loss, stats, g
    return fn


def _xt_bounds(chunk_s: torch.Tensor, rows: int) -> list[tuple[int, int]]:
    """Row chunks of about ``rows`` rows cut only between two chunks of text, so that each chunk's student rows
    (``chunk_s`` [N], -1: in no chunk) lie in one row chunk; a chunk longer than ``rows`` gets a row chunk of its
    own length. Raises ValueError when a chunk's rows are not contiguous (the batch is not in text order)."""
    c = chunk_s.detach().cpu().long()
    n = len(c)
    if n == 0:
        return []
    starts = torch.ones(n, dtype=torch.bool)
    starts[1:] = (c[1:] != c[:-1]) | (c[1:] < 0)
    runs = c[starts]
    runs = runs[runs >= 0]
    if len(runs) != len(torch.unique(runs)):
        seen: set[int] = set()
        dup = next(r for r in runs.tolist() if r in seen or seen.add(r))
        raise ValueError(f"chunk {dup}'s student rows are not contiguous: the cross-tokenizer batch must keep each "
                         "chunk's rows together, in text order (xt_chunk_s)")
    cuts = torch.nonzero(starts).flatten().tolist()[1:] + [n]
    out, lo = [], 0
    while lo < n:
        want = lo + rows
        if want >= n:
            out.append((lo, n))
            break
        i = bisect.bisect_right(cuts, want) - 1
        hi = cuts[i] if i >= 0 and cuts[i] > lo else cuts[bisect.bisect_right(cuts, lo)]
        out.append((lo, hi))
        lo = hi
    return out


def tpa_coverage_fn(t: dict, shared: dict):
    """TPA coverage (a diagnostic, no gradient): at each TPA position, the student's next-token probability mass on
    the teacher's cached candidates (``tpa_mass``), and the fraction of the student's own top-B tokens that are among
    them (``tpa_topb``). Sums over the chunk's TPA positions; ``means`` divides by the step's TPA positions."""
    cand = t["tpa_cand_ids"].long()                                                     # [M, B]
    rows = t.get("tpa_rows")
    rows = torch.arange(cand.shape[0], device=cand.device) if rows is None else rows.long()
    # the student's log-probs of the candidates, kept for --tpa-weighting student (the branch rows come after)
    shared["student_cand_logp"] = cand_logp = torch.zeros(cand.shape, dtype=torch.float32, device=cand.device)

    def fn(z, lse, lo, hi):
        inside = (rows >= lo) & (rows < hi)
        local, c = rows[inside] - lo, cand[inside]
        if not len(local):
            zero = z.new_zeros(())
            return {"tpa_mass": zero, "tpa_topb": zero}
        with torch.no_grad():
            zr = z.index_select(0, local)
            lp = zr.gather(-1, c) - lse.index_select(0, local)[:, None]
            cand_logp[inside] = lp.float()
            mass = lp.exp().sum(-1)
            top = zr.topk(c.shape[-1], dim=-1).indices
            hits = (top[:, :, None] == c[:, None, :]).any(-1).float().mean(-1)
        return {"tpa_mass": mass.sum(), "tpa_topb": hits.sum()}
    return fn


def _weighted_fkl_rows(ids, lt_all, weights_of, c: float, tau: float, name: str):
    """Rows of weighted forward KL(fold(teacher) || fold(student)) on the teacher's cached top-k + rest: the loss
    head's fn for TPA's branch rows and IVA's token-KL rows. ``weights_of()`` gives the per-row weights (read at
    the first chunk: TPA's student weighting is recorded by the main rows' pass). Gradient in closed form."""
    weights = None

    def fn(z, lo, hi, need):
        nonlocal weights
        if weights is None:
            weights = weights_of().to(z.dtype)
        zt = z.sub_(z.amax(-1, keepdim=True))
        zt = zt if tau == 1.0 else zt.div_(tau)
        lse = zt.logsumexp(-1)
        ls = fold_rows(zt, ids[lo:hi], lse)
        d = (kl(lt_all[lo:hi], ls) * weights[lo:hi]).sum()
        g = None
        if need:
            g = _fkl_grad_(zt.sub_(lse[:, None]).exp_(), ids[lo:hi], lt_all[lo:hi], ls, weights[lo:hi] * (c / tau))
        return c * d, {name: d * tau ** 2}, g
    return fn


def _ivak_fn(t: dict, w: LossWeights, norm: StepNorm):
    """IVA's token-KL rows (the student's outputs at the teacher's salient image tokens), saliency-weighted,
    divided by the step's (sample, turn) groups."""
    tau = w.temperature
    lt_all = fold_teacher(t["ivak_logprobs"], t["ivak_tail"], tau, w.cache_temperature)
    return _weighted_fkl_rows(t["ivak_ids"], lt_all, lambda: t["ivak_weight"].float(),
                              norm.scale * w.iva * tau ** 2 / norm.groups, tau, "iva")


def _branch_fn(t: dict, w: LossWeights, norm: StepNorm, shared: dict):
    """Branch rows flattened [M * B]: row r is branch r % B of TPA position r // B, weighted by the candidates'
    teacher (or, --tpa-weighting student, student) probabilities, divided by the step's TPA positions."""
    tau = w.temperature
    ids = t["tpa_ids"].reshape(-1, t["tpa_ids"].shape[-1])
    lt_all = fold_teacher(t["tpa_logprobs"].reshape(-1, ids.shape[-1]), t["tpa_tail"].reshape(-1), tau,
                          w.cache_temperature)
    if w.tpa_weighting == "student":
        weights_of = lambda: student_candidate_weights(shared["student_cand_logp"]).reshape(-1)  # noqa: E731
    else:
        rows = t.get("tpa_rows")
        top = t["topk_ids"]
        if t.get("xt_tpa_trows") is not None:  # across tokenizers: the teacher's rows, its top-k in student ids
            rows, top = t["xt_tpa_trows"], t["xt_ids"]
        top_ids = top if rows is None else top.index_select(0, rows)
        top_lps = t["topk_logprobs"] if rows is None else t["topk_logprobs"].index_select(0, rows)
        teacher_w = candidate_weights(t["tpa_cand_ids"], top_ids, top_lps).reshape(-1)
        weights_of = lambda: teacher_w  # noqa: E731
    return _weighted_fkl_rows(ids, lt_all, weights_of, norm.scale * w.tpa * tau ** 2 / norm.tpa_rows, tau, "tpa")


_FUSED_ACC: dict[str, bool] = {}  # device type -> whether addmm with out_dtype works there


def _acc_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b, in place: a plain addmm_ where the dtypes match (CPU fp32); for bf16 / fp16 inputs
    (GPU autocast) addmm with out_dtype=fp32 accumulates into acc without a [V, H] temporary, where the
    backend has it; else a product of the inputs' dtype is added (rounded as the unchunked autocast path
    rounds its weight gradient)."""
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    kind = acc.device.type
    if _FUSED_ACC.get(kind, True):
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            _FUSED_ACC[kind] = True
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _FUSED_ACC[kind] = False
    acc.add_(a @ b)


class _ChunkedHead(torch.autograd.Function):
    """loss = sum over row segments and their chunks of fn(head(h_chunk)); gradients taken chunk by chunk in
    the forward (nothing of size V outlives its chunk), scaled by the incoming gradient in the backward.
    ``plan["fns"][i]`` is the loss function of ``hiddens[i]``: fn(z [C, V] fp32, lo, hi, need_grad) ->
    (weighted loss sum, {term: sum}, gradient w.r.t. z or None), all detached; fn may overwrite z.
    ``plan["bounds"][i]`` (optional): that segment's own (lo, hi) row chunks instead of ``chunk_rows`` each."""

    @staticmethod
    def forward(ctx, weight, bias, plan, *hiddens):
        want_w, want_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_h = ctx.needs_input_grad[3:]
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
        total = torch.zeros((), dtype=torch.float32, device=weight.device)
        stats: dict[str, torch.Tensor] = {}
        grads_h = []
        rows = plan["chunk_rows"]
        bounds = plan.get("bounds") or [None] * len(hiddens)
        for fn, h, wh, bd in zip(plan["fns"], hiddens, want_h, bounds):
            gh = torch.empty_like(h) if wh else None
            need = wh or want_w or want_b
            for lo, hi in bd or [(lo, min(lo + rows, h.shape[0])) for lo in range(0, h.shape[0], rows)]:
                hc = h[lo:hi]
                z_raw = torch.nn.functional.linear(hc, weight, bias)
                mm_dtype = z_raw.dtype
                loss, st, g = fn(z_raw.float(), lo, hi, need)
                del z_raw
                if need:
                    g = g.to(mm_dtype)
                    if wh:
                        gh[lo:hi] = (g @ weight.to(mm_dtype)).to(h.dtype)
                    if want_w:
                        _acc_mm(grad_w, g.t(), hc.to(mm_dtype))
                    if want_b:
                        grad_b.add_(g.float().sum(0))
                    del g
                total += loss
                for k, v in st.items():
                    stats[k] = stats.get(k, 0.0) + v
            grads_h.append(gh)
        plan["stats"] = stats
        ctx.grads = (grad_w, grad_b, grads_h)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, g_out):
        grad_w, grad_b, grads_h = ctx.grads
        ctx.grads = None
        scale_one = bool(g_out == 1)
        if grad_w is not None:
            grad_w = (grad_w if scale_one else grad_w.mul_(g_out)).to(ctx.dtypes[0])
        if grad_b is not None:
            grad_b = (grad_b if scale_one else grad_b.mul_(g_out)).to(ctx.dtypes[1])
        gh = [None if g is None else (g if scale_one else g * g_out.to(g.dtype)) for g in grads_h]
        return (grad_w, grad_b, None, *gh)


def head_loss(spec: LossSpec, w: LossWeights, head: torch.nn.Module, out: dict, norm: StepNorm | None = None,
              chunk_bytes: int | None = None) -> dict:
    """Every term of ``spec`` from the student's hidden states, through the LM head ``head`` (an nn.Linear),
    chunked. ``out`` holds ``resp_hidden`` [N, H] (and ``branch_hidden`` [M, B, H] for TPA) plus the batch's
    teacher tensors (see student_train.trainer). With ``w.cross_tokenizer`` ("uld", "gold", "alm") the KD term
    is that cross-tokenizer term on the batch's ``xt_*`` tensors (``_xt_main_fn``; the contract above
    CROSS_TOKENIZER); ValueError for a divergence other than forward KL or an unknown name. Returns {"loss": the
    step-normalised, weighted sum of the terms (differentiable, see StepNorm), "sums": {term: detached sum over
    this batch's items}}; ``means`` turns sums into per-item means."""
    norm = norm or StepNorm.of(out)
    shared: dict = {}  # what the main rows' pass hands the branch rows' pass (the student's candidate log-probs)
    xt = bool(w.cross_tokenizer) and bool(spec.divergence)
    fns = [(_xt_main_fn if xt else _main_fn)(out, spec, w, norm, shared)]
    hiddens = [out["resp_hidden"]]
    rows = chunk_rows(head.weight.shape[0], chunk_bytes, head.weight.device)
    bounds = [_xt_bounds(out["xt_chunk_s"], rows) if xt and w.cross_tokenizer == "alm" else None]
    if spec.tpa and out.get("branch_hidden") is not None and out["branch_hidden"].numel():
        fns.append(_branch_fn(out, w, norm, shared))
        hiddens.append(out["branch_hidden"].reshape(-1, out["branch_hidden"].shape[-1]))
    if spec.iva and w.iva_form == "token-kl" and out.get("ivak_hidden") is not None and out["ivak_hidden"].numel():
        fns.append(_ivak_fn(out, w, norm))
        hiddens.append(out["ivak_hidden"])
    plan = {"fns": fns, "chunk_rows": rows, "bounds": bounds + [None] * (len(fns) - 1)}
    loss = _ChunkedHead.apply(head.weight, head.bias, plan, *hiddens)
    sums = dict(plan["stats"])
    if spec.iva and w.iva_form != "token-kl" and out.get("student_sal") is not None:
        iva_sum = iva_loss(out["teacher_sal"], out["student_sal"], out["sal_valid"], w.iva_ratio, reduction="sum")
        loss = loss + norm.scale * w.iva * iva_sum / norm.groups
        sums["iva"] = iva_sum.detach()
    return {"loss": loss, "sums": sums}


TERM_COUNT = {"sft": "tokens", "kd": "tokens", "rkl": "tokens", "jsd": "tokens", "tpa": "tpa_rows", "iva": "groups",
              "tpa_mass": "tpa_rows", "tpa_topb": "tpa_rows", "uld": "xt_pairs", "gold": "xt_pairs",
              "gold_matched": "xt_pairs", "gold_unmatched": "xt_pairs", "alm": "xt_chunks", "router_aux": "tokens"}


def means(sums: dict[str, float], counts: dict[str, float], w: LossWeights) -> dict[str, float]:
    """Per-item means of the term sums over ``counts`` (see step_counts), and 'loss', their weighted sum."""
    out = {k: float(v) / max(counts[TERM_COUNT[k]], 1.0) for k, v in sums.items()}
    weight = {"sft": 1.0, "kd": w.kd, "rkl": w.kd, "jsd": w.kd, "tpa": w.tpa, "iva": w.iva,
              "uld": w.kd, "gold": w.kd, "alm": w.kd, "router_aux": w.router_aux or 0.0}
    out["loss"] = sum(weight[k] * v for k, v in out.items() if k in weight)  # coverage is a diagnostic
    return out
