"""The bounds the suite holds values to where the two sides come from different arithmetic (see the "Exactness
policy" at the top of conftest.py). Each states what the arithmetic guarantees, and no more."""

import numpy as np
import torch

EPS32 = float(np.finfo(np.float32).eps)


def assert_fp16_within_one_ulp(x: np.ndarray, y: np.ndarray, name: str) -> None:
    """fp16 arrays rounded from fp32 values that may move by a few fp32 ulp (other batching, another kernel): a
    value on a rounding edge flips to its neighbour, so each element may differ by one fp16 ulp (of the larger of
    the two), no more; and only a few may (a real change of the teacher's numbers moves many values by many ulp)."""
    a, b = x.astype(np.float32), y.astype(np.float32)
    ulp = np.spacing(np.maximum(np.abs(x), np.abs(y))).astype(np.float32)
    diff = np.abs(a - b)
    assert np.all(diff <= ulp), (name, float((diff / ulp).max()))
    assert np.count_nonzero(diff) <= max(2, x.size // 100), (name, np.count_nonzero(diff), x.size)


def assert_fp16_ids_equal_up_to_ties(x_ids: np.ndarray, y_ids: np.ndarray, x_lp: np.ndarray, y_lp: np.ndarray,
                                     name: str) -> None:
    """Top-k ids (sorted by their fp16 log-probs along the last axis) of two dumps whose fp32 sources may move by a
    few fp32 ulp: two candidates whose log-probs are that close may trade places, and two such values round to
    the same or to neighbouring fp16 values. So ids may differ only at a slot whose fp16 value is within one ulp of
    a neighbouring slot's in both dumps (a tie), or at the last slot (its rival, rank k + 1, is not stored; its
    value is held to one ulp by assert_fp16_within_one_ulp); and only a few may (a real change moves many)."""
    diff = x_ids != y_ids
    if not diff.any():
        return

    def tied(lp: np.ndarray) -> np.ndarray:
        v = lp.astype(np.float32)
        ulp = np.spacing(np.abs(lp)).astype(np.float32)
        gap = np.abs(np.diff(v, axis=-1))
        near = gap <= np.maximum(ulp[..., 1:], ulp[..., :-1])
        t = np.zeros(lp.shape, bool)
        t[..., 1:] |= near
        t[..., :-1] |= near
        t[..., -1] = True  # the boundary slot
        return t

    bad = diff & ~(tied(x_lp) & tied(y_lp))
    assert not bad.any(), (name, np.argwhere(bad)[:5].tolist())
    rows = diff.reshape(-1, diff.shape[-1]).any(-1)
    assert np.count_nonzero(rows) <= max(2, rows.size // 100), (name, np.count_nonzero(rows), rows.size)


def assert_topk_ids_of(ids, lp: torch.Tensor, k_tol: float, name: str, ordered: bool = True) -> None:
    """``ids`` [N, k] are the k most likely of the fp32 log-probs ``lp`` [N, V] (in order if ``ordered``) up to
    ties within ``k_tol``: what another forward of the same model guarantees (another batching/padding or kernel
    moves each log-prob by up to k_tol, so candidates closer than that may trade places, or ranks k and k + 1 may
    swap). Checked as: distinct ids whose log-probs under ``lp`` are lp's top-k values within k_tol; a wrong id
    (not a near-tie) lies further below."""
    ids = torch.as_tensor(np.asarray(ids)).long()
    assert all(len(set(r)) == len(r) for r in ids.tolist()), name
    want = lp.topk(ids.shape[-1], -1).values
    got = lp.gather(-1, ids)
    if not ordered:
        got = got.sort(-1, descending=True).values
    torch.testing.assert_close(got, want, rtol=0, atol=k_tol, msg=lambda m: f"{name}: {m}")


def assert_packed_within_bound(got: np.ndarray, exact: np.ndarray, head: int, head_step: float, tail_step: float,
                               slack: float, name: str) -> None:
    """Log-probs decoded from the packed encoding (common/codecs.py; [..., k], canonical order: the first ``head``
    entries in rank order, the rest by id) against the exact log-probs of the same ids: the codec's stated bound,
    |decoded - exact| <= head_step / 2 nats on the head and |sqrt(p^) - sqrt(p)| <= tail_step / 2 on the rest, plus
    ``slack`` for the exact side's own arithmetic (1e-5 where it is another forward of the same model: a log-prob
    moved by d moves sqrt(p) by at most d / 2, so 1e-5 covers both). Also checks that the bound is tight enough to
    see a wrong value: the same values one tail step off fail it."""
    g, e = np.asarray(got, np.float64), np.asarray(exact, np.float64)
    head_err = np.abs(g[..., :head] - e[..., :head]).max(initial=0.0)
    assert head_err <= head_step / 2 + slack, (name, "head", head_err)
    root_g, root_e = np.exp(0.5 * g[..., head:]), np.exp(0.5 * e[..., head:])
    root_err = np.abs(root_g - root_e).max(initial=0.0)
    assert root_err <= tail_step / 2 + slack, (name, "tail", root_err)
    if root_g.size:
        assert np.abs(root_g + tail_step - root_e).max() > tail_step / 2 + slack, (name, "bound too loose")
