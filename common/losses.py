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


def fold_teacher(topk_logprobs: torch.Tensor, tail_logmass: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log-probs [..., k+1] of the teacher's cached top-k + rest, renormalised, at temperature tau.

    At tau = 1 this is the cached distribution (renormalising absorbs fp16 rounding of the top-k).
    At tau != 1 the rest bucket is tempered as one atom (its members' logits are not cached), an
    approximation that only touches the rest mass."""
    lt = torch.cat([_up(topk_logprobs), _up(tail_logmass).unsqueeze(-1)], dim=-1)
    return F.log_softmax(lt / temperature, dim=-1)


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


def distill_loss(logits, topk_ids, topk_logprobs, tail_logmass, divergence="fkl", temperature=1.0):
    """Mean over response tokens of D(teacher || student) on the folded distributions, x tau^2."""
    lt = fold_teacher(topk_logprobs, tail_logmass, temperature)
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
                      temperature: float = 1.0):
    """IVA's token-KL reading (the survey's "teacher attention aggregated into visual-token KL weights"): at each
    (sample, turn) group's top-r salient image tokens, KL(fold(teacher's output) || fold(student's output)) on the
    teacher's top-k + rest, weighted by the teacher's saliency renormalised over the r; mean over groups, x tau^2.
    img_logits [R, V]: the student's LM head at those image tokens."""
    lt = fold_teacher(ivak_logprobs, ivak_tail, temperature)
    ls = fold_student(img_logits, ivak_ids, temperature)
    return (_up(ivak_weight) * kl(lt, ls)).sum() / max(n_groups, 1) * temperature ** 2


def student_candidate_weights(cand_logp: torch.Tensor) -> torch.Tensor:
    """p~_S(c_b): the student's own next-token probabilities of the cached candidates (log-probs [N, B] at the
    position they replace), renormalised over the candidates and detached: the paper samples the branch
    candidates from the student, and an offline cache can only hold the teacher's, so the student's own
    distribution weighs them (its sampling, restricted to the cached support). [N, B]"""
    return torch.softmax(_up(cand_logp.detach()), dim=-1)


def tpa_loss(branch_logits, cand_ids, tpa_ids, tpa_logprobs, tpa_tail, topk_ids, topk_logprobs, temperature=1.0,
             weighting: str = "teacher", student_logits=None):
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
    lt = fold_teacher(tpa_logprobs, tpa_tail, temperature)
    ls = fold_student(branch_logits, tpa_ids, temperature)
    per_row = (weights * kl(lt, ls)).sum(-1)
    return per_row.sum() / max(per_row.numel(), 1) * temperature ** 2  # no TPA row: 0, not the NaN of an empty mean


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
        terms[spec.kd_term] = d = distill_loss(
            out["logits"], out["topk_ids"], out["topk_logprobs"], out["tail_logmass"], spec.divergence, w.temperature)
        total = total + w.kd * d
    if spec.iva and w.iva_form == "token-kl" and out.get("ivak_logits") is not None:
        terms["iva"] = iva_token_kl_loss(out["ivak_logits"], out["ivak_ids"], out["ivak_logprobs"], out["ivak_tail"],
                                         out["ivak_weight"], int(out["n_groups"]), w.temperature)
        total = total + w.iva * terms["iva"]
    elif spec.iva and out.get("student_sal") is not None:
        terms["iva"] = iva_loss(out["teacher_sal"], out["student_sal"], out["sal_valid"], w.iva_ratio)
        total = total + w.iva * terms["iva"]
    if spec.tpa:
        rows = out.get("tpa_rows")
        pick = (lambda a: a) if rows is None else (lambda a: a.index_select(0, rows))
        terms["tpa"] = tpa_loss(out["branch_logits"], out["tpa_cand_ids"], out["tpa_ids"], out["tpa_logprobs"],
                                out["tpa_tail"], pick(out["topk_ids"]), pick(out["topk_logprobs"]), w.temperature,
                                w.tpa_weighting, pick(out["logits"]))
        total = total + w.tpa * terms["tpa"]
    terms["loss"] = total
    return terms


# --- the memory-flat loss head ---------------------------------------------------------------
# The student's LM head and every per-token term in one pass over row chunks: [rows, V] logits exist for
# one chunk at a time, and each chunk's gradients (w.r.t. its hidden states and the head's weight) are
# taken in the forward, right after its loss, so nothing of size V is kept for backward (the Liger Kernel
# fused-linear recipe; torchtune's chunked KD losses chunk the same way but keep every chunk's graph).
# Values and gradients equal the unchunked path above (tests/test_loss_head.py).

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
    return {"tokens": tokens, "tpa_rows": tpa, "groups": groups}


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
            lt = fold_teacher(t["topk_logprobs"][lo:hi], t["tail_logmass"][lo:hi], tau)
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
    lt_all = fold_teacher(t["ivak_logprobs"], t["ivak_tail"], tau)
    return _weighted_fkl_rows(t["ivak_ids"], lt_all, lambda: t["ivak_weight"].float(),
                              norm.scale * w.iva * tau ** 2 / norm.groups, tau, "iva")


def _branch_fn(t: dict, w: LossWeights, norm: StepNorm, shared: dict):
    """Branch rows flattened [M * B]: row r is branch r % B of TPA position r // B, weighted by the candidates'
    teacher (or, --tpa-weighting student, student) probabilities, divided by the step's TPA positions."""
    tau = w.temperature
    ids = t["tpa_ids"].reshape(-1, t["tpa_ids"].shape[-1])
    lt_all = fold_teacher(t["tpa_logprobs"].reshape(-1, ids.shape[-1]), t["tpa_tail"].reshape(-1), tau)
    if w.tpa_weighting == "student":
        weights_of = lambda: student_candidate_weights(shared["student_cand_logp"]).reshape(-1)  # noqa: E731
    else:
        rows = t.get("tpa_rows")
        top_ids = t["topk_ids"] if rows is None else t["topk_ids"].index_select(0, rows)
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
    (weighted loss sum, {term: sum}, gradient w.r.t. z or None), all detached; fn may overwrite z."""

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
        for fn, h, wh in zip(plan["fns"], hiddens, want_h):
            gh = torch.empty_like(h) if wh else None
            need = wh or want_w or want_b
            for lo in range(0, h.shape[0], rows):
                hi = min(lo + rows, h.shape[0])
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
    teacher tensors (see student_train.trainer). Returns {"loss": the step-normalised, weighted sum of the
    terms (differentiable, see StepNorm), "sums": {term: detached sum over this batch's items}}; ``means``
    turns sums into per-item means."""
    norm = norm or StepNorm.of(out)
    shared: dict = {}  # what the main rows' pass hands the branch rows' pass (the student's candidate log-probs)
    fns, hiddens = [_main_fn(out, spec, w, norm, shared)], [out["resp_hidden"]]
    if spec.tpa and out.get("branch_hidden") is not None and out["branch_hidden"].numel():
        fns.append(_branch_fn(out, w, norm, shared))
        hiddens.append(out["branch_hidden"].reshape(-1, out["branch_hidden"].shape[-1]))
    if spec.iva and w.iva_form == "token-kl" and out.get("ivak_hidden") is not None and out["ivak_hidden"].numel():
        fns.append(_ivak_fn(out, w, norm))
        hiddens.append(out["ivak_hidden"])
    plan = {"fns": fns, "chunk_rows": chunk_rows(head.weight.shape[0], chunk_bytes, head.weight.device)}
    loss = _ChunkedHead.apply(head.weight, head.bias, plan, *hiddens)
    sums = dict(plan["stats"])
    if spec.iva and w.iva_form != "token-kl" and out.get("student_sal") is not None:
        iva_sum = iva_loss(out["teacher_sal"], out["student_sal"], out["sal_valid"], w.iva_ratio, reduction="sum")
        loss = loss + norm.scale * w.iva * iva_sum / norm.groups
        sums["iva"] = iva_sum.detach()
    return {"loss": loss, "sums": sums}


TERM_COUNT = {"sft": "tokens", "kd": "tokens", "rkl": "tokens", "jsd": "tokens", "tpa": "tpa_rows", "iva": "groups",
              "tpa_mass": "tpa_rows", "tpa_topb": "tpa_rows"}


def means(sums: dict[str, float], counts: dict[str, float], w: LossWeights) -> dict[str, float]:
    """Per-item means of the term sums over ``counts`` (see step_counts), and 'loss', their weighted sum."""
    out = {k: float(v) / max(counts[TERM_COUNT[k]], 1.0) for k, v in sums.items()}
    weight = {"sft": 1.0, "kd": w.kd, "rkl": w.kd, "jsd": w.kd, "tpa": w.tpa, "iva": w.iva}
    out["loss"] = sum(weight[k] * v for k, v in out.items() if k in weight)  # coverage is a diagnostic
    return out
