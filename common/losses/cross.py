"""Loss terms across tokenizers (ULD, GOLD, ALM) and the resampling of saliency across image-token grids."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .divergences import _up, fold_teacher, kl, NEG_INF
from .weights import LossWeights

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


