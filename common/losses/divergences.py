"""Folding a distribution onto the teacher's (k+1)-way partition and the divergences compared on it (forward and
reverse KL, JSD).

Distributions are compared on the teacher's (k+1)-way partition of the vocabulary: the teacher's
top-k ids plus one "rest" bucket. Folding both distributions this way is exact bookkeeping (the
chain rule of KL): ``KL_full = KL_folded + P_T(rest) * KL(P_T(.|rest) || P_S(.|rest))`` for forward
KL, so the folded KL equals the full-vocabulary KL when k = V and is a lower bound that misses only
the divergence inside the teacher's rest bucket otherwise (tests check both).
"""

from __future__ import annotations

import math

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


