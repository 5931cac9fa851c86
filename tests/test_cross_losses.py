"""Cross-tokenizer losses (issue 20): ULD, the GOLD hybrid and ALM as pure functions (against brute-force references
written here with loops and numpy), the memory-flat head against the pure functions (values and gradients), the
same-tokenizer limits (gold = kd, uld = ULD's formula), and the saliency resampling between image-token grids.

Bounds: the head runs in fp32 and is compared with the pure functions run in fp64 (the exact reference): 1e-5
relative on the loss and 1e-5 of each gradient tensor's largest element (conftest's policy for fp32 sums over
V logits in another order). The numpy references are fp64 as the pure functions under test: 1e-10."""

import copy

import numpy as np
import pytest
import torch

from alignti.common.losses import (
    LossWeights, _xt_bounds, alm_distance, alm_loss, distill_loss, get_loss, gold_loss, gold_parts, head_loss, means,
    resample_saliency, resample_saliency_batch, step_counts, total_loss, uld_loss,
)

V, H, K = 4096, 16, 8


def _batch(seed: int, n_chunks: int = 14, peaked: bool = False):
    """A synthetic cross-tokenizer batch: chunks of 1-3 student rows and 1-3 teacher rows in text order, the first
    rows of each chunk paired, a few student rows in no chunk, about a third of the teacher's top-k slots without
    an identical student token."""
    g = torch.Generator().manual_seed(seed)
    cs, ct, pair = [], [], []
    n_t = 0
    for c in range(n_chunks):
        if c % 5 == 4:  # an unaligned student row (no chunk, no pair)
            cs.append(-1)
            pair.append(-1)
        ns, nt = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
        pair += [n_t] + [-1] * (ns - 1)
        cs += [c] * ns
        ct += [c] * nt
        n_t += nt
    n_s = len(cs)
    head = torch.nn.Linear(H, V, bias=False)
    torch.nn.init.normal_(head.weight, std=0.3, generator=g)
    hid = torch.randn(n_s, H, generator=g)
    lp = torch.log_softmax(torch.randn(n_t, K + 1, generator=g) * 2, -1)
    top = lp[:, :K].sort(-1, descending=True).values
    xt_ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(n_t)])
    xt_ids[torch.rand(n_t, K, generator=g) < 0.35] = -1
    xt_ids[0] = -1  # a row with no matched slot
    t = {"targets": torch.randint(0, V, (n_s,), generator=g), "topk_logprobs": top, "tail_logmass": lp[:, K],
         "topk_ids": torch.randint(0, 50_000, (n_t, K), generator=g), "xt_ids": xt_ids,
         "xt_pair": torch.tensor(pair), "xt_chunk_s": torch.tensor(cs), "xt_chunk_t": torch.tensor(ct),
         "xt_n_chunks": n_chunks, "xt_target_logprob": -torch.rand(n_t, generator=g) * 3}
    if peaked:  # the student's mass mostly on the matched ids: GOLD's exact "else"-bin path
        with torch.no_grad():
            for i, j in enumerate(pair):
                ids = xt_ids[j][xt_ids[j] >= 0][:2] if j >= 0 else xt_ids[0][:0]
                head.weight[ids] += 12.0 * hid[i] / hid[i].norm() ** 2
    return head, hid, t


def _reference(spec, w, head, hid, t):
    hd = copy.deepcopy(head).double()
    x = hid.detach().double().requires_grad_()
    tt = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in t.items()}
    r = total_loss(spec, w, dict(tt, logits=hd(x)))
    return r, torch.autograd.grad(r["loss"], [x, hd.weight])


@pytest.mark.parametrize("mode,tau,peaked", [("uld", 1.0, False), ("uld", 2.0, False), ("gold", 1.0, False),
                                             ("gold", 2.0, False), ("gold", 1.0, True), ("alm", 1.0, False)])
def test_head_matches_pure(mode, tau, peaked):
    """The memory-flat head (several row chunks, one ragged; ALM's cut at chunk boundaries) gives the pure
    functions' loss, term means and gradients w.r.t. the hidden states and the LM head."""
    head, hid, t = _batch(3, peaked=peaked)
    w = LossWeights(kd=0.7, temperature=tau, cross_tokenizer=mode, gold_matched=0.8 if mode == "gold" else None,
                    gold_unmatched=0.6 if mode == "gold" else None)
    spec = get_loss("kd")
    ref, ref_grads = _reference(spec, w, head, hid, t)
    hid = hid.clone().requires_grad_()
    got = head_loss(spec, w, head, dict(t, resp_hidden=hid), chunk_bytes=4 * V * 5)
    got_grads = torch.autograd.grad(got["loss"], [hid, head.weight])
    assert got["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-5)
    for name, a, b in zip(["hidden", "lm_head.weight"], ref_grads, got_grads):
        err = (a - b.double()).abs().max() / a.abs().max()
        assert err < 1e-5, f"{name}: rel error {err:.2e}"
    m = means(got["sums"], step_counts(t), w)
    for k in ("sft", mode, "loss"):
        assert m[k] == pytest.approx(ref[k].item(), rel=1e-5), k
    assert ref[mode].item() > 0.01  # the term is really there (not an empty selection)


@pytest.mark.parametrize("mode", ["gold", "alm"])
def test_step_normalisation_across_micro_batches(mode):
    """The batch cut in two micro-batches at a chunk boundary, each normalised by the step's counts (StepNorm over
    both: paired rows, aligned chunks) gives the one-batch gradient up to fp32 reordering (1e-5 of the largest
    element, see test_loss_head); each micro-batch by its own counts (the regression) does not."""
    from alignti.common.losses import StepNorm
    head, hid, t = _batch(9)
    w, spec = LossWeights(cross_tokenizer=mode), get_loss("kd")
    whole = head_loss(spec, w, head, dict(t, resp_hidden=hid))
    want = torch.autograd.grad(whole["loss"], head.weight)[0]
    i_s = int(torch.nonzero(t["xt_chunk_s"] == 7)[0])
    i_t = int(torch.nonzero(t["xt_chunk_t"] == 7)[0])
    parts = []
    for ss, ts in ((slice(0, i_s), slice(0, i_t)), (slice(i_s, None), slice(i_t, None))):
        p = {k: (v[ts] if k in ("topk_logprobs", "tail_logmass", "topk_ids", "xt_ids", "xt_chunk_t",
                                "xt_target_logprob") else v[ss]) if torch.is_tensor(v) else v for k, v in t.items()}
        p["xt_pair"] = torch.where(p["xt_pair"] >= 0, p["xt_pair"] - ts.start, -1)
        parts.append((p, hid[ss]))
    counts = {}
    for p, _ in parts:
        for k, v in step_counts(p).items():
            counts[k] = counts.get(k, 0.0) + v
    for norm in (StepNorm.from_counts(counts), None):
        got = sum(torch.autograd.grad(head_loss(spec, w, head, dict(p, resp_hidden=h), norm=norm)["loss"],
                                      head.weight)[0] for p, h in parts)
        close = torch.allclose(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
        assert close == (norm is not None)


def test_head_gradient_fails_without_the_kd_term():
    """The regression the gradient check guards: dropping the cross-tokenizer term's gradient (SFT's alone) moves
    the gradients far outside the bound used above."""
    head, hid, t = _batch(4)
    w = LossWeights(cross_tokenizer="gold")
    _, (g_ref, _) = _reference(get_loss("kd"), w, head, hid, t)
    _, (g_sft, _) = _reference(get_loss("sft"), w, head, hid, t)
    assert ((g_ref - g_sft).abs().max() / g_ref.abs().max()) > 1e-2


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_uld_brute_force():
    """uld_loss against loops: teacher's renormalised top-k sorted, the student's probabilities sorted, L1 rank by
    rank over k, plus |student mass beyond rank k - teacher rest mass|."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 50, generator=g, dtype=torch.float64) * 2
    lp = torch.log_softmax(torch.randn(6, K + 1, generator=g, dtype=torch.float64), -1)
    for tau in (1.0, 1.5):
        got = uld_loss(z, lp[:, :K], lp[:, K], tau).numpy()
        for i in range(6):
            q = sorted(_np_softmax(z[i].numpy() / tau), reverse=True)
            pt = _np_softmax(lp[i].numpy() / tau)
            p = sorted(pt[:K], reverse=True)
            want = sum(abs(q[r] - p[r]) for r in range(K)) + abs(sum(q[K:]) - pt[K])
            assert got[i] == pytest.approx(want, abs=1e-12)


def test_uld_is_ulds_formula_with_the_whole_vocabulary():
    """With the teacher's whole distribution cached (k = its vocabulary, rest 0) uld_loss is ULD's formula: the
    sorted probabilities' L1 distance with the smaller vocabulary zero-padded (student 40, teacher 55 tokens and
    the other way round); with a top-k cut it is a lower bound on it (triangle inequality)."""
    g = torch.Generator().manual_seed(1)
    for vs, vt in ((40, 55), (55, 40)):
        zs = torch.randn(5, vs, generator=g, dtype=torch.float64) * 2
        pt = torch.softmax(torch.randn(5, vt, generator=g, dtype=torch.float64) * 2, -1)
        full = []
        for i in range(5):
            a = np.sort(_np_softmax(zs[i].numpy()))[::-1]
            b = np.sort(pt[i].numpy())[::-1]
            n = max(vs, vt)
            a, b = np.pad(a, (0, n - vs)), np.pad(b, (0, n - vt))
            full.append(np.abs(a - b).sum())
        srt = pt.sort(-1, descending=True).values
        got = uld_loss(zs, srt.log(), torch.full((5,), float("-inf"), dtype=torch.float64))
        np.testing.assert_allclose(got.numpy(), full, rtol=1e-12, atol=1e-12)
        for k in (4, 16):
            cut = uld_loss(zs, srt[:, :k].log(), srt[:, k:].sum(-1).log())
            assert (cut.numpy() <= np.array(full) + 1e-12).all()
            assert (cut.numpy() > 0).all()


def test_gold_brute_force():
    """gold_parts against loops: matched = KL over {each matched token, everything else}; unmatched = the
    teacher's unmatched top-k probabilities sorted against the student's largest probabilities off this row's
    matched ids, over as many ranks as there are unmatched slots."""
    g = torch.Generator().manual_seed(2)
    vs, n = 30, 7
    z = torch.randn(n, vs, generator=g, dtype=torch.float64) * 2
    lp = torch.log_softmax(torch.randn(n, K + 1, generator=g, dtype=torch.float64) * 2, -1)
    ids = torch.stack([torch.randperm(vs, generator=g)[:K] for _ in range(n)])
    ids[torch.rand(n, K, generator=g) < 0.4] = -1
    ids[0] = -1
    ids[1] = torch.randperm(vs, generator=g)[:K]  # every slot matched
    for tau in (1.0, 2.0):
        m, u = gold_parts(z, ids, lp[:, :K], lp[:, K], tau)
        total = gold_loss(z, ids, lp[:, :K], lp[:, K], tau, 0.3, 0.7)
        for i in range(n):
            q = _np_softmax(z[i].numpy() / tau)
            p = _np_softmax(lp[i].numpy() / tau)
            match = [s for s in range(K) if ids[i, s] >= 0]
            unmatch = [s for s in range(K) if ids[i, s] < 0]
            sid = [int(ids[i, s]) for s in match]
            pm, qm = [p[s] for s in match], [q[j] for j in sid]
            pe, qe = 1 - sum(pm), 1 - sum(qm)
            want_m = sum(a * np.log(a / b) for a, b in zip(pm + [pe], qm + [qe]) if a > 0) * tau ** 2
            pu = sorted((p[s] for s in unmatch), reverse=True)
            qu = sorted((q[j] for j in range(vs) if j not in sid), reverse=True)
            want_u = sum(abs(qu[r] - pu[r]) for r in range(len(pu)))
            assert m[i].item() == pytest.approx(want_m, abs=1e-10)
            assert u[i].item() == pytest.approx(want_u, abs=1e-12)
            assert total[i].item() == pytest.approx(0.3 * want_m + 0.7 * want_u, abs=1e-10)
        assert u[1].item() == 0.0 and m[0].item() == pytest.approx(0.0, abs=1e-15)


def _same_tokenizer(seed, n=12):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(H, V, bias=False)
    torch.nn.init.normal_(head.weight, std=0.3, generator=g)
    hid = torch.randn(n, H, generator=g)
    lp = torch.log_softmax(torch.randn(n, K + 1, generator=g) * 2, -1)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(n)])
    ar = torch.arange(n)
    t = {"targets": torch.randint(0, V, (n,), generator=g), "topk_ids": ids, "topk_logprobs": lp[:, :K],
         "tail_logmass": lp[:, K], "xt_ids": ids, "xt_pair": ar, "xt_chunk_s": ar, "xt_chunk_t": ar,
         "xt_n_chunks": n, "xt_target_logprob": -torch.rand(n, generator=g), "xt_overlap": 1.0}
    return head, hid, t


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_gold_is_kd_with_one_tokenizer(tau):
    """Identical tokenizers (xt_ids = topk_ids, every row paired one to one, chunks of one token, TRL's adaptive
    weights at overlap 1): gold equals today's kd term, in the pure functions and in the head (rel 1e-6)."""
    head, hid, t = _same_tokenizer(5)
    logits = head(hid).double()
    kd = distill_loss(logits, t["topk_ids"], t["topk_logprobs"].double(), t["tail_logmass"].double(), "fkl", tau)
    gold = gold_loss(logits, t["xt_ids"], t["topk_logprobs"].double(), t["tail_logmass"].double(), tau).mean()
    assert gold.item() == pytest.approx(kd.item(), rel=1e-12)
    w_kd, w_gold = LossWeights(temperature=tau), LossWeights(temperature=tau, cross_tokenizer="gold")
    a = head_loss(get_loss("kd"), w_kd, head, dict(t, resp_hidden=hid))
    b = head_loss(get_loss("kd"), w_gold, head, dict(t, resp_hidden=hid))
    assert b["sums"]["gold"].item() == pytest.approx(a["sums"]["kd"].item(), rel=1e-6)
    assert b["loss"].item() == pytest.approx(a["loss"].item(), rel=1e-6)
    ga = torch.autograd.grad(a["loss"], head.weight)[0]
    gb = torch.autograd.grad(b["loss"], head.weight)[0]
    torch.testing.assert_close(gb, ga, rtol=0, atol=1e-5 * float(ga.abs().max()))


def test_alm_formula():
    """alm_loss against tokenkit's formula written out per chunk: t_c and s_c the sums of the realised tokens'
    log-probs over each side's rows, binary cross-entropy of exp(s_c / T) under exp(t_c / T) with the logs moved
    1e-6 below 0 (T = 100), or |t_c - s_c|; chunks without rows on one side are left out."""
    g = torch.Generator().manual_seed(6)
    cs = torch.tensor([0, 0, 1, -1, 2, 2, 2, 4])
    ct = torch.tensor([0, 1, 1, 2, 3, 4, 4])
    ls = -torch.rand(len(cs), generator=g, dtype=torch.float64) * 4
    lt = -torch.rand(len(ct), generator=g, dtype=torch.float64) * 4
    for dist, temp in (("binary_ce", 100.0), ("binary_ce", 1.0), ("abs", 100.0)):
        got = alm_loss(ls, cs, lt, ct, 5, dist, temp).numpy()
        want = []
        for c in (0, 1, 2, 4):  # chunk 3 has no student row
            s = sum(float(ls[i]) for i in range(len(cs)) if cs[i] == c)
            t = sum(float(lt[i]) for i in range(len(ct)) if ct[i] == c)
            if dist == "abs":
                want.append(abs(t - s))
                continue
            pt, ps = np.exp(t / temp - 1e-6), np.exp(s / temp - 1e-6)
            want.append(-(pt * np.log(ps) + (1 - pt) * np.log(1 - ps)))
        np.testing.assert_allclose(got, want, rtol=1e-9)


def test_alm_distance_prefers_the_teachers_likelihood():
    """binary_ce is minimised at s = t (its derivative in s vanishes there): the student is pulled to the
    teacher's chunk likelihood from both sides."""
    t = torch.tensor([-2.0, -0.3], dtype=torch.float64)
    s = t.clone().requires_grad_()
    (g,) = torch.autograd.grad(alm_distance(t, s).sum(), s)
    assert g.abs().max() < 1e-9
    lo, hi = alm_distance(t, t - 0.5), alm_distance(t, t + 0.2)
    assert (lo > alm_distance(t, t)).all() and (hi > alm_distance(t, t)).all()


def test_alm_row_chunks_never_split_a_chunk():
    cs = torch.tensor([0, 0, 0, 1, -1, 2, 2, 3, 3, 3, 3, 3, 3, 4])
    b = _xt_bounds(cs, 4)
    assert b[0][0] == 0 and b[-1][1] == len(cs) and all(x[1] == y[0] for x, y in zip(b, b[1:]))
    for lo, hi in b:
        assert lo == 0 or cs[lo - 1] != cs[lo] or cs[lo] < 0
    assert (7, 13) in b  # chunk 3 (6 rows) longer than 4 rows gets a row chunk of its own length
    with pytest.raises(ValueError, match="chunk 1's student rows are not contiguous"):
        _xt_bounds(torch.tensor([0, 1, 1, 2, 1]), 4)


def test_cross_tokenizer_refuses_other_divergences():
    head, hid, t = _same_tokenizer(7, n=4)
    with pytest.raises(ValueError, match="cannot be combined with --loss rkl"):
        head_loss(get_loss("rkl"), LossWeights(cross_tokenizer="uld"), head, dict(t, resp_hidden=hid))
    with pytest.raises(ValueError, match="unknown --cross-tokenizer 'dskd'"):
        head_loss(get_loss("kd"), LossWeights(cross_tokenizer="dskd"), head, dict(t, resp_hidden=hid))


# --- saliency between image-token grids -------------------------------------------------------------------------
def test_resample_identity_and_sum():
    g = torch.Generator().manual_seed(8)
    s = torch.rand(6 * 9, generator=g, dtype=torch.float64)
    s = s / s.sum()
    torch.testing.assert_close(resample_saliency(s, (6, 9), (6, 9)), s, rtol=1e-15, atol=0)
    for dst in ((3, 4), (12, 18), (7, 5), (1, 1), (24, 24)):
        out = resample_saliency(s, (6, 9), dst)
        assert out.shape == (dst[0] * dst[1],) and (out >= 0).all()
        assert out.sum().item() == pytest.approx(1.0, abs=1e-12)


def test_resample_known_bilinear_case():
    """2x2 -> 4x4 with align_corners=False (cell centres): output pixel centre (i + 0.5) / 2 - 0.5 in input units,
    clamped at the border: row/column weights (1, 0), (0.75, 0.25), (0.25, 0.75), (0, 1) - written out by hand."""
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    wts = [(1.0, 0.0), (0.75, 0.25), (0.25, 0.75), (0.0, 1.0)]
    want = np.array([[sum(wr[a] * wc[b] * float(x[a, b]) for a in range(2) for b in range(2)) for wc in wts]
                     for wr in wts])
    assert want[0].tolist() == [1.0, 1.25, 1.75, 2.0]
    got = resample_saliency(x, (2, 2), (4, 4)).reshape(4, 4).numpy()
    np.testing.assert_allclose(got, want / want.sum(), rtol=1e-12)


def test_resample_dynamic_grids_keep_where_the_mass_is():
    """Qwen2-VL-style dynamic grids (each image its own merged (h, w)), non-square both ways: a map with all its
    mass in the image's top-left quarter keeps it there on any student grid (up- and down-sampling)."""
    sals, src, dst = [], [(14, 20), (22, 8), (9, 9)], [(10, 7), (16, 16), (23, 5)]
    for r, c in src:
        m = torch.zeros(r, c, dtype=torch.float64)
        m[: r // 2, : c // 2] = 1.0
        sals.append((m / m.sum()).reshape(-1))
    outs = resample_saliency_batch(sals, src, dst)
    for out, (r, c) in zip(outs, dst):
        m = out.reshape(r, c)
        assert m.sum().item() == pytest.approx(1.0, abs=1e-12)
        assert m[: (r + 1) // 2 + 1, : (c + 1) // 2 + 1].sum() > 0.9
    with pytest.raises(ValueError, match="teacher's grid 14x20 has 280 tokens"):
        resample_saliency(sals[1], (14, 20), (10, 7))
