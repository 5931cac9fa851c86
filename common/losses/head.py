"""The memory-flat loss head: the student's LM head and every per-token term in one pass over row chunks."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .divergences import _up, DIVERGENCES, fold_teacher, kl, NEG_INF
from .terms import candidate_weights, iva_loss, student_candidate_weights
from .cross import _sorted_desc, alm_distance, chunk_logprobs, gold_weights, xt_counts
from .registry import check_cross_tokenizer, LossSpec
from .weights import LossWeights

class SoftcappedHead(torch.nn.Module):
    """An LM head with final logit soft-capping, ``cap * tanh(W h / cap)`` (Gemma 2 and Gemma 4's
    ``final_logit_softcapping``, as their ``ForConditionalGeneration.forward`` applies it after ``lm_head``). Holds the
    model's own ``nn.Linear`` (``weight`` / ``bias`` are its own tensors); the memory-flat loss head reads ``softcap``
    and applies the cap chunk by chunk (``_ChunkedHead``), every other caller calls it: [..., H] -> [..., V]."""

    def __init__(self, linear: torch.nn.Linear, softcap: float):
        super().__init__()
        self.linear = linear
        self.softcap = float(softcap)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(hidden) / self.softcap) * self.softcap


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


# rows at a time for the per-row reductions inside a chunk (log-sum-exp, the TPA coverage diagnostic): their
# temporaries are [ROW_BLOCK, V] instead of a second [C, V] beside the chunk's logits (at V = 262,144 and 128-row
# chunks: 16 MiB instead of 128 MiB; bench/README.md, loss head at Gemma's vocabulary)
ROW_BLOCK = 16


def row_logsumexp(z: torch.Tensor) -> torch.Tensor:
    """``z.logsumexp(-1)`` of z [C, V], ROW_BLOCK rows at a time (the same values: each row's reduction is the
    library's own, on the same row)."""
    if z.shape[0] <= ROW_BLOCK:
        return z.logsumexp(-1)
    return torch.cat([z[i:i + ROW_BLOCK].logsumexp(-1) for i in range(0, z.shape[0], ROW_BLOCK)])


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
        lse = row_logsumexp(z)
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
                ls = fold_rows(zt, ids, lse if tau == 1.0 and div == "fkl" else row_logsumexp(zt))
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
    lse = row_logsumexp(zt)
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
        lse = row_logsumexp(z)
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
            lp = z.index_select(0, local).gather(-1, c) if len(local) <= ROW_BLOCK else torch.cat(
                [z.index_select(0, local[i:i + ROW_BLOCK]).gather(-1, c[i:i + ROW_BLOCK])
                 for i in range(0, len(local), ROW_BLOCK)])
            lp = lp - lse.index_select(0, local)[:, None]
            cand_logp[inside] = lp.float()
            mass = lp.exp().sum(-1)
            # the student's own top-B per row, ROW_BLOCK rows at a time (no copy of the chunk's TPA rows)
            top = torch.cat([z.index_select(0, local[i:i + ROW_BLOCK]).topk(c.shape[-1], dim=-1).indices
                             for i in range(0, len(local), ROW_BLOCK)])
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
        lse = row_logsumexp(zt)
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
        cap = plan.get("softcap")
        bounds = plan.get("bounds") or [None] * len(hiddens)
        for fn, h, wh, bd in zip(plan["fns"], hiddens, want_h, bounds):
            gh = torch.empty_like(h) if wh else None
            need = wh or want_w or want_b
            for lo, hi in bd or [(lo, min(lo + rows, h.shape[0])) for lo in range(0, h.shape[0], rows)]:
                hc = h[lo:hi]
                z_raw = torch.nn.functional.linear(hc, weight, bias)
                mm_dtype = z_raw.dtype
                if cap:  # z = cap tanh(z_raw / cap); dz/dz_raw = 1 - tanh^2 (one more [C, V] fp32 buffer: tanh)
                    t = z_raw.float().div_(cap).tanh_()  # in place on an fp32 z_raw, no longer needed
                    del z_raw
                    loss, st, g = fn(t * cap, lo, hi, need)
                    if need:
                        g.mul_(t.mul_(t).neg_().add_(1.0))
                    del t
                else:
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
    """Every term of ``spec`` from the student's hidden states, through the LM head ``head`` (an nn.Linear, or a
    SoftcappedHead: its cap applied per chunk), chunked. ``out`` holds ``resp_hidden`` [N, H] (and ``branch_hidden`` [M, B, H] for TPA) plus the batch's
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
    plan = {"fns": fns, "chunk_rows": rows, "bounds": bounds + [None] * (len(fns) - 1),
            "softcap": getattr(head, "softcap", None)}
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
