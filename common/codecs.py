"""The "packed" top-k encoding (cache schema v6, ``params["logprob_encoding"] = "packed"``): two numcodecs
codecs, also registered with zarr v3, so a plain zarr reader that has imported this module (or installed
alignti, whose entry points name them) decodes the arrays itself.

A row of a top-k distribution is k (id, log-prob) pairs. The packed encoding stores it in canonical order:

* the **head**: the first ``head`` entries in probability order (descending log-prob, as the teacher ranked
  them; the top-1 stays first), then
* the **tail**: the other k - head entries as a *set*, sorted by token id ascending (their log-probs permuted
  with them).

The loss math never depends on the order of the top-k (``common.losses``: the fold gathers the student at the
cached ids; ``candidate_weights`` looks the TPA candidates up by id; the candidates themselves are stored in
their own array ``tpa_cand_ids``, chosen at dump time from the teacher's ranking), so the same (k+1)-way
distributions reach the loss; ``canonical_order`` puts a row in this order.

``alignti.topk_ids`` (ids, int32 [rows, k]): within a chunk, every id is replaced by its rank in a chunk
dictionary (the chunk's distinct ids, most frequent first), so the tokens a teacher keeps proposing get small
numbers; a head id is stored as its rank, a tail set as the gaps between its sorted ranks. A sorted set of k ids
out of V costs about k * (log2(V / k) + 1.44) bits (log2 of the binomial coefficient) with no model of which
ids are likely; ranking by frequency goes below that, and ids in rank order cost log2 V bits each (DistillKit
bit-packs them at ceil(log2 V) bits: arcee-ai/DistillKit, ``distillkit/compression``). **Exact.**

``alignti.topk_logprobs`` (log-probs, float32 [rows, k] decoded): the head quantised in absolute steps of
``head_step`` nats, q_i = round(-lp_i / head_step); q is non-decreasing along the descending head, so the first
code is stored and then the non-negative differences. The tail quantised in steps of ``tail_step`` of the
square root of the probability, c_j = round(sqrt(p_j) / tail_step), decoded sqrt(p) = c_j * tail_step (c_j = 0:
tail_step / 4). Why the square root: an error e in sqrt(p) costs about 2 e^2 of KL whatever p is (KL(p || p^)
~ sum (p - p^)^2 / (2p) and dp = 2 sqrt(p) e), so one step serves every entry, and the many small tail entries
get small codes. **Error bounds**: |decoded - exact| <= head_step / 2 nats on the head; |sqrt(p^) - sqrt(p)| <=
tail_step / 2 on the tail, so the squared Hellinger distance between the exact and the decoded top-k entries is
at most k * tail_step^2 / 8, and the expected KL added is about (k - head) * tail_step^2 / 6 (uniform rounding
error, variance step^2 / 12; it assumes step << sqrt(p), and flat rows at coarse steps measure up to 1.3x it).
``tail_step_for(k, head, kl)`` inverts that: the dump sets the tail step from a KL budget per row (``--packed-kl``,
default ``DEFAULT_TAIL_KL``), so one budget adds about the same KL at every k (bench/README.md, "Real LM",
measures it). Log-probs below -LP_FLOOR nats are clipped there first. The rest mass
(``tail_logmass``) is stored apart, float32, exactly; the loss renormalises the (k+1)-way fold as before.

Both codecs write a small header (format version, rows, k, head, steps, byte widths), then each integer stream
(head values, tail values) split into byte planes (all low bytes, then all second bytes, ...; only as many
planes as the stream's largest value needs), so the downstream compressor (blosc-zstd without shuffle) sees
long runs of small bytes. Log-prob format 2 (written now) stores the two steps as float64, so any step in (0, 1]
(``tail_step_for`` gives 1/N); format 1 (the first packed caches) stored them as power-of-two exponents and still
decodes. Errors: ``ValueError`` naming the row when the tail of an id row is not strictly
ascending or a head is not descending (the writer calls ``canonical_order`` first).
"""

from __future__ import annotations

import math

import numpy as np
from numcodecs.abc import Codec
from numcodecs.registry import register_codec

LP_FLOOR = 1000.0     # nats: log-probs below -LP_FLOOR are stored as -LP_FLOOR (probability 0 in float32)
FORMAT_VERSION = 1           # alignti.topk_ids chunks
LOGPROBS_FORMAT_VERSION = 2  # alignti.topk_logprobs chunks written now: steps stored as float64 (any step)
LOGPROBS_READABLE = (1, 2)   # 1: steps stored as power-of-two exponents (caches written before the step-from-KL rule)
IDS_CODEC_ID = "alignti.topk_ids"
LOGPROBS_CODEC_ID = "alignti.topk_logprobs"
DEFAULT_HEAD = 1            # entries kept in rank order (the top-1 stays first)
DEFAULT_HEAD_STEP = 1 / 256  # nats of log-prob
DEFAULT_TAIL_STEP = 1 / 1024  # of sqrt(probability): what params without a recorded step (none written) would mean
DEFAULT_TAIL_KL = 4e-5       # nats per row: the expected fold KL the tail code may add (tail_step_for)


def tail_step_for(k: int, head: int = DEFAULT_HEAD, kl: float = DEFAULT_TAIL_KL) -> float:
    """The tail step of sqrt(probability) whose expected added KL per row is at most ``kl`` nats.

    Each of the k - head tail entries is rounded to a multiple of the step s in sqrt(p); the error e is uniform
    in [-s/2, s/2] (variance s^2 / 12) and costs about 2 e^2 of KL(exact fold || decoded fold) (module
    docstring), so a row adds about (k - head) * s^2 / 6 nats. Returns s = 1 / ceil(sqrt((k - head) / (6 kl)))
    (the reciprocal of an integer, so the step reads as 1/N), at most 1. Raises ``ValueError`` for kl <= 0.
    bench/README.md ("Real LM") measures the KL against this estimate."""
    if not kl > 0:
        raise ValueError(f"the packed tail's KL bound must be > 0 nats, not {kl}")
    n = max(1, int(k) - int(head))
    return 1.0 / max(1, math.ceil(math.sqrt(n / (6.0 * kl)) - 1e-9))


def canonical_order(ids: np.ndarray, logprobs: np.ndarray, head: int) -> tuple[np.ndarray, np.ndarray]:
    """Put rows of a top-k ([..., k] ids in probability order, their log-probs descending) in the packed
    encoding's order: the first ``head`` entries as they are, the rest sorted by id ascending, log-probs
    permuted with their ids. Returns new arrays of the same shapes and dtypes."""
    k = ids.shape[-1]
    if head >= k:
        return ids, logprobs
    tail = ids[..., head:]
    order = np.argsort(tail, axis=-1, kind="stable")
    ids2 = ids.copy()
    lps2 = logprobs.copy()
    ids2[..., head:] = np.take_along_axis(tail, order, -1)
    lps2[..., head:] = np.take_along_axis(logprobs[..., head:], order, -1)
    return ids2, lps2


def _frame(header: list[int], streams) -> bytes:
    """A chunk's bytes: the header words, each stream's plane count appended, as little-endian uint32, then the
    streams' planes (``_planes``) in order."""
    body = []
    for stream in streams:
        nb, data = _planes(stream)
        header.append(nb)
        body.append(data)
    return np.array(header, "<u4").tobytes() + b"".join(body)


def _planes(values: np.ndarray) -> tuple[int, bytes]:
    """Non-negative integers -> (bytes per value, their byte planes low byte first)."""
    v = np.ascontiguousarray(values, dtype="<u4").reshape(-1)
    top = int(v.max()) if v.size else 0
    nb = max(1, (top.bit_length() + 7) // 8)
    planes = v.view(np.uint8).reshape(-1, 4)[:, :nb].T
    return nb, np.ascontiguousarray(planes).tobytes()


def _unplanes(buf: memoryview, at: int, n: int, nb: int) -> tuple[np.ndarray, int]:
    raw = np.frombuffer(buf, dtype=np.uint8, count=n * nb, offset=at).reshape(nb, n)
    out = np.zeros((n, 4), np.uint8)
    out[:, :nb] = raw.T
    return out.view("<u4").reshape(n).astype(np.int64), at + n * nb


def _rows_k(a: np.ndarray, k: int | None) -> np.ndarray:
    a = np.asarray(a)
    k = a.shape[-1] if k is None else k
    return a.reshape(-1, k) if a.size else a.reshape(0, k)


class TopkIdsCodec(Codec):
    """Exact codec for top-k id rows in canonical order (module docstring). ``head``: entries kept in rank
    order; decoded dtype int32, shape [rows, k] (zarr restores the chunk's shape).

    Within a chunk, ids are first mapped to their rank in a chunk dictionary (the chunk's distinct ids by how
    often they occur, most frequent first, ties by id), so frequent tokens get small numbers: a tail set is
    coded as the gaps (>= 0) between its sorted ranks, a head id as its rank; zarr fills rows past the end of a
    partial chunk with 0, so a tail may repeat an id. The dictionary is stored by count
    group (the group's count and size, then its ids ascending as gaps). Decoding maps ranks back to ids and
    sorts each tail by id, the order the log-probs were stored in."""

    codec_id = IDS_CODEC_ID

    def __init__(self, head: int = DEFAULT_HEAD):
        self.head = int(head)

    def encode(self, buf):
        a = np.asarray(buf)
        if a.ndim == 0:
            raise ValueError("alignti.topk_ids encodes arrays whose last axis is the top-k")
        rows = _rows_k(a, None).astype(np.int64)
        n, k = rows.shape
        h = min(self.head, k)
        if n and (rows.min() < 0 or rows.max() >= 2 ** 32):
            raise ValueError("alignti.topk_ids: token ids must lie in [0, 2**32)")
        # non-decreasing, not strictly: zarr fills the rows past the end of a partial chunk with 0 (all equal)
        if k - h > 1 and (np.diff(rows[:, h:], axis=1) < 0).any():
            bad = int(np.nonzero((np.diff(rows[:, h:], axis=1) < 0).any(1))[0][0])
            raise ValueError(f"alignti.topk_ids: row {bad} has a tail (entries {h}..{k - 1}) that is not ascending; "
                             "put rows in canonical order first (alignti.common.codecs.canonical_order)")
        used, inv, cnt = np.unique(rows, return_inverse=True, return_counts=True)
        order = np.lexsort((used, -cnt))                      # dictionary: count descending, then id ascending
        rank_of = np.empty(len(used), np.int64)
        rank_of[order] = np.arange(len(used))
        ranks = rank_of[inv.reshape(n, k)]
        tail = np.sort(ranks[:, h:], axis=1)
        gaps = np.diff(tail, axis=1) if k - h > 1 else np.zeros((n, 0), np.int64)
        counts = cnt[order]
        bounds = np.flatnonzero(np.diff(counts)) + 1 if len(counts) else np.zeros(0, np.int64)
        starts = np.concatenate([[0], bounds]).astype(np.int64) if len(counts) else np.zeros(0, np.int64)
        sizes = np.diff(np.concatenate([starts, [len(counts)]])).astype(np.int64)
        dict_ids = used[order]
        dict_gaps = np.concatenate([np.diff(np.concatenate([[0], dict_ids[s:s + m]])) for s, m in zip(starts, sizes)]) \
            if len(counts) else np.zeros(0, np.int64)
        streams = [np.stack([counts[starts], sizes], 1) if len(counts) else np.zeros((0, 2), np.int64),
                   dict_gaps, ranks[:, :h], tail[:, :1], gaps]
        return _frame([FORMAT_VERSION, n, k, h, len(sizes)], streams)

    def decode(self, buf, out=None):
        mv = memoryview(buf).cast("B") if not isinstance(buf, np.ndarray) else memoryview(buf.view(np.uint8).reshape(-1))
        version, n, k, h, g, *nbs = (int(x) for x in np.frombuffer(mv, "<u4", count=10))
        if version != FORMAT_VERSION:
            raise ValueError(f"alignti.topk_ids: format version {version} is not readable by this alignti "
                             f"(reads {FORMAT_VERSION}); upgrade alignti")
        at = 40
        groups, at = _unplanes(mv, at, 2 * g, nbs[0])
        groups = groups.reshape(g, 2)
        n_dict = int(groups[:, 1].sum())
        dict_gaps, at = _unplanes(mv, at, n_dict, nbs[1])
        dict_ids = np.empty(n_dict, np.int64)
        s = 0
        for m in groups[:, 1]:
            dict_ids[s:s + m] = np.cumsum(dict_gaps[s:s + m])
            s += m
        headv, at = _unplanes(mv, at, n * h, nbs[2])
        first, at = _unplanes(mv, at, n * min(1, k - h), nbs[3])
        gaps, at = _unplanes(mv, at, n * max(0, k - h - 1), nbs[4])
        res = np.empty((n, k), np.int64)
        if n_dict:
            res[:, :h] = dict_ids[headv.reshape(n, h)]
            if k > h:
                tr = np.empty((n, k - h), np.int64)
                tr[:, 0] = first
                tr[:, 1:] = gaps.reshape(n, k - h - 1)
                res[:, h:] = np.sort(dict_ids[np.cumsum(tr, axis=1)], axis=1)
        res = res.astype(np.int32)
        if out is not None:
            np.copyto(np.asarray(out).reshape(res.shape), res)
            return out
        return res

    def get_config(self):
        return {"id": self.codec_id, "head": self.head}


class TopkLogprobsCodec(Codec):
    """Log-prob rows in canonical order (module docstring): the head in ``head_step``-nat steps of log-prob,
    coded by its non-negative differences; the tail in ``tail_step`` steps of the square root of the
    probability. Decoded dtype float32. Steps lie in (0, 1]; ``tail_step_for`` sets the tail step from a KL bound."""

    codec_id = LOGPROBS_CODEC_ID

    def __init__(self, head: int = DEFAULT_HEAD, head_step: float = DEFAULT_HEAD_STEP,
                 tail_step: float = DEFAULT_TAIL_STEP):
        self.head = int(head)
        self.head_step = float(head_step)
        self.tail_step = float(tail_step)
        for name, s in (("head_step", self.head_step), ("tail_step", self.tail_step)):
            if not 0 < s <= 1:
                raise ValueError(f"alignti.topk_logprobs: {name} must lie in (0, 1] (e.g. 1/256), not {s}")

    def quantise(self, rows: np.ndarray):
        """[rows, k] float log-probs -> (head codes [rows, h], tail codes [rows, k - h]) as int64."""
        n, k = rows.shape
        h = min(self.head, k)
        x = rows.astype(np.float64)
        if np.isnan(x).any() or (x > 1e-3).any():
            raise ValueError("alignti.topk_logprobs: log-probs must be <= 0 and not NaN")
        x = np.clip(x, -LP_FLOOR, 0.0)
        qh = np.rint(-x[:, :h] / self.head_step).astype(np.int64)
        if h > 1 and (np.diff(qh, axis=1) < 0).any():
            bad = int(np.nonzero((np.diff(qh, axis=1) < 0).any(1))[0][0])
            raise ValueError(f"alignti.topk_logprobs: row {bad} has a head (entries 0..{h - 1}) that is not "
                             "descending; the top-k must come sorted by probability (canonical_order keeps it)")
        qt = np.rint(np.exp(0.5 * x[:, h:]) / self.tail_step).astype(np.int64)
        return qh, qt

    def dequantise(self, qh: np.ndarray, qt: np.ndarray) -> np.ndarray:
        n, h = qh.shape
        out = np.empty((n, h + qt.shape[1]), np.float64)
        out[:, :h] = -qh * self.head_step
        root = np.where(qt > 0, qt * self.tail_step, self.tail_step / 4)  # code 0: sqrt(p) in [0, step/2]
        out[:, h:] = 2.0 * np.log(root)
        return out.astype(np.float32)

    def encode(self, buf):
        rows = _rows_k(np.asarray(buf), None)
        n, k = rows.shape
        qh, qt = self.quantise(rows)
        h = qh.shape[1]
        dh = np.diff(qh, axis=1) if h > 1 else np.zeros((n, 0), np.int64)
        steps = np.array([self.head_step, self.tail_step], "<f8").view("<u4").tolist()  # 4 words
        return _frame([LOGPROBS_FORMAT_VERSION, n, k, h, *steps], (qh[:, :1], dh, qt))

    def decode(self, buf, out=None):
        mv = memoryview(buf).cast("B") if not isinstance(buf, np.ndarray) else memoryview(buf.view(np.uint8).reshape(-1))
        version = int(np.frombuffer(mv, "<u4", count=1)[0])
        if version == 1:  # steps as exponents: 2 ** -e
            _, n, k, h, eh, et, nb0, nb1, nb2 = (int(x) for x in np.frombuffer(mv, "<u4", count=9))
            head_step, tail_step, at = 2.0 ** -eh, 2.0 ** -et, 36
        elif version == 2:
            _, n, k, h = (int(x) for x in np.frombuffer(mv, "<u4", count=4))
            head_step, tail_step = (float(x) for x in np.frombuffer(mv, "<f8", count=2, offset=16))
            nb0, nb1, nb2 = (int(x) for x in np.frombuffer(mv, "<u4", count=3, offset=32))
            at = 44
        else:
            raise ValueError(f"alignti.topk_logprobs: format version {version} is not readable by this alignti "
                             f"(reads {', '.join(map(str, LOGPROBS_READABLE))}); upgrade alignti")
        q0, at = _unplanes(mv, at, n * min(1, h), nb0)
        dh, at = _unplanes(mv, at, n * max(0, h - 1), nb1)
        qt, at = _unplanes(mv, at, n * (k - h), nb2)
        qh = np.cumsum(np.concatenate([q0.reshape(n, min(1, h)), dh.reshape(n, max(0, h - 1))], axis=1), axis=1)
        res = TopkLogprobsCodec(h, head_step, tail_step).dequantise(qh, qt.reshape(n, k - h))
        if out is not None:
            np.copyto(np.asarray(out).reshape(res.shape), res)
            return out
        return res

    def get_config(self):
        return {"id": self.codec_id, "head": self.head, "head_step": self.head_step, "tail_step": self.tail_step}


register_codec(TopkIdsCodec)
register_codec(TopkLogprobsCodec)


def _zarr_codecs():
    """zarr v3 wrappers (array -> bytes codecs named "numcodecs.alignti.topk_ids" / "...topk_logprobs"), built on
    zarr's own numcodecs bridge and registered with zarr's codec registry."""
    import warnings

    from zarr.codecs.numcodecs._codecs import _NumcodecsArrayBytesCodec
    from zarr.registry import register_codec as zarr_register

    class _Quiet(_NumcodecsArrayBytesCodec):
        def __init__(self, **config):
            with warnings.catch_warnings():  # "numcodecs codecs are not in the zarr v3 spec": known, documented
                warnings.simplefilter("ignore")
                super().__init__(**config)

    class ZarrTopkIds(_Quiet, codec_name=IDS_CODEC_ID):
        pass

    class ZarrTopkLogprobs(_Quiet, codec_name=LOGPROBS_CODEC_ID):
        pass

    for cls in (ZarrTopkIds, ZarrTopkLogprobs):
        zarr_register(cls.codec_name, cls)
    return ZarrTopkIds, ZarrTopkLogprobs


ZarrTopkIds, ZarrTopkLogprobs = _zarr_codecs()
