"""Every loss against a brute-force reference (full softmax, explicit loops)."""

import math

import pytest
import torch

from alignti.common.losses import (LossWeights, distill_loss, fold_student, fold_teacher, get_loss, iva_loss, kl,
                           salient_set, sft_loss, total_loss, tpa_loss)

torch.manual_seed(0)
V = 50


def teacher_cache(t_logits, k):
    lp = torch.log_softmax(t_logits, -1)
    vals, ids = lp.topk(k, -1)
    tail = lp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return ids, vals, tail


def full_div(name, t_logits, s_logits, tau=1.0):
    p = torch.softmax(t_logits / tau, -1).double()
    q = torch.softmax(s_logits / tau, -1).double()
    out = []
    for pi, qi in zip(p, q):
        if name == "fkl":
            out.append(sum(float(a) * math.log(float(a) / float(b)) for a, b in zip(pi, qi) if a > 0))
        elif name == "rkl":
            out.append(sum(float(b) * math.log(float(b) / float(a)) for a, b in zip(pi, qi) if b > 0))
        else:
            m = [(float(a) + float(b)) / 2 for a, b in zip(pi, qi)]
            out.append(0.5 * sum(float(a) * math.log(float(a) / mm) for a, mm in zip(pi, m) if a > 0)
                       + 0.5 * sum(float(b) * math.log(float(b) / mm) for b, mm in zip(qi, m) if b > 0))
    return sum(out) / len(out) * tau ** 2


@pytest.mark.parametrize("div", ["fkl", "rkl", "jsd"])
def test_folded_equals_full_vocab_when_k_is_vocab(div):
    t, s = torch.randn(6, V) * 2, torch.randn(6, V) * 2
    ids, vals, tail = teacher_cache(t, V)
    got = distill_loss(s, ids, vals, tail, div)
    assert got.item() == pytest.approx(full_div(div, t, s), rel=1e-5, abs=1e-6)


def test_temperature_matches_full_vocab_when_k_is_vocab():
    t, s = torch.randn(4, V) * 3, torch.randn(4, V)
    ids, vals, tail = teacher_cache(t, V)
    got = distill_loss(s, ids, vals, tail, "fkl", temperature=2.0)
    assert got.item() == pytest.approx(full_div("fkl", t, s, 2.0), rel=1e-5)


@pytest.mark.parametrize("k", [1, 4, 16])
def test_forward_kl_small_k_bound_is_the_chain_rule_gap(k):
    """KL_full = KL_folded + P_T(rest) * KL(P_T(.|rest) || P_S(.|rest)): the documented bound, exactly."""
    t, s = torch.randn(8, V) * 2, torch.randn(8, V) * 2
    ids, vals, tail = teacher_cache(t, k)
    folded = kl(fold_teacher(vals, tail), fold_student(s, ids)).double()
    pt, ps = torch.softmax(t, -1).double(), torch.softmax(s, -1).double()
    rest = torch.ones_like(pt, dtype=torch.bool).scatter(-1, ids, False)
    gap = []
    for i in range(8):
        a, b = pt[i][rest[i]], ps[i][rest[i]]
        gap.append(float(a.sum() * (a / a.sum() * ((a / a.sum()) / (b / b.sum())).log()).sum()))
    full = (pt * (pt.log() - ps.log())).sum(-1)
    assert torch.allclose(folded + torch.tensor(gap, dtype=torch.double), full, atol=1e-5)
    assert (folded <= full + 1e-6).all()


@pytest.mark.parametrize("div", ["rkl", "jsd"])
def test_other_divergences_folded_never_exceed_full(div):
    t, s = torch.randn(8, V) * 2, torch.randn(8, V) * 2
    ids, vals, tail = teacher_cache(t, 8)
    assert distill_loss(s, ids, vals, tail, div).item() <= full_div(div, t, s) + 1e-6


def test_sft_is_mean_negative_log_likelihood():
    logits, tgt = torch.randn(5, V), torch.randint(0, V, (5,))
    ref = -sum(math.log(float(torch.softmax(logits[i], -1)[tgt[i]])) for i in range(5)) / 5
    assert sft_loss(logits, tgt).item() == pytest.approx(ref, rel=1e-6)


def test_iva_against_loops():
    g, n_v, ratio = 3, 10, 0.3
    t = torch.softmax(torch.randn(g, n_v) * 2, -1)
    s = torch.softmax(torch.randn(g, n_v), -1)
    valid = torch.ones(g, n_v, dtype=torch.bool)
    valid[2, 7:] = False
    t = t * valid
    t = t / t.sum(-1, keepdim=True)
    got = iva_loss(t, s * valid, valid, ratio).item()
    ref = 0.0
    for i in range(g):
        nv = int(valid[i].sum())
        keep = math.ceil(ratio * nv)
        order = sorted(range(nv), key=lambda j: -float(t[i, j]))[:keep]
        ts, ss = t[i, :nv] / t[i, :nv].sum(), s[i, :nv] / s[i, :nv].sum()
        bins_t = [float(ts[j]) for j in order] + [sum(float(ts[j]) for j in range(nv) if j not in order)]
        bins_s = [float(ss[j]) for j in order] + [sum(float(ss[j]) for j in range(nv) if j not in order)]
        ref += sum(a * math.log(a / b) for a, b in zip(bins_t, bins_s) if a > 0)
    assert got == pytest.approx(ref / g, rel=1e-5)
    assert salient_set(t, valid, ratio).sum(-1).tolist() == [3, 3, 3]


def test_tpa_against_loops():
    n, nb, k, k2 = 4, 3, 6, 5
    t_first = torch.randn(n, V) * 2
    ids, vals, tail = teacher_cache(t_first, k)
    cand = ids[:, [0, 2, 1]]  # candidates need not be the first B entries in order
    t_next = torch.randn(n, nb, V) * 2
    s_next = torch.randn(n, nb, V)
    lp = torch.log_softmax(t_next, -1)
    v2, i2 = lp.topk(k2, -1)
    tail2 = lp.scatter(-1, i2, float("-inf")).logsumexp(-1)
    got = tpa_loss(s_next, cand, i2, v2, tail2, ids, vals).item()
    ref = 0.0
    pt = torch.softmax(t_first, -1)
    for i in range(n):
        w = [float(pt[i, c]) for c in cand[i]]
        w = [x / sum(w) for x in w]
        for b in range(nb):
            p = torch.softmax(t_next[i, b], -1)
            q = torch.softmax(s_next[i, b], -1)
            top = i2[i, b].tolist()
            pb = [float(p[j]) for j in top] + [1 - sum(float(p[j]) for j in top)]
            qb = [float(q[j]) for j in top] + [1 - sum(float(q[j]) for j in top)]
            ref += w[b] * sum(a * math.log(a / c) for a, c in zip(pb, qb) if a > 0)
    assert got == pytest.approx(ref / n, rel=1e-4)


def test_registry_combines_the_right_terms():
    n = 5
    logits = torch.randn(n, V)
    ids, vals, tail = teacher_cache(torch.randn(n, V), 8)
    out = {"logits": logits, "targets": torch.randint(0, V, (n,)), "topk_ids": ids, "topk_logprobs": vals,
           "tail_logmass": tail}
    w = LossWeights(kd=0.5)
    terms = total_loss(get_loss("kd"), w, out)
    assert terms["loss"].item() == pytest.approx(terms["sft"].item() + 0.5 * terms["kd"].item(), rel=1e-6)
    assert set(total_loss(get_loss("sft"), w, out)) == {"sft", "loss"}
    assert "rkl" in total_loss(get_loss("rkl"), w, out)
    with pytest.raises(ValueError):
        get_loss("nope")
