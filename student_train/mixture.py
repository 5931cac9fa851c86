"""Training on several caches: ``train-student --cache C0 --cache C1 [--cache-weights 0.5,0.5]``.

Each **micro-batch comes from one cache** (its *source*), drawn by weight: draw g of the run's stream is source
i with probability w_i (GKD's λ is the weight of the on-policy cache), independently, from a generator seeded by
(seed, g // BLOCK); the n-th draw of source i takes source i's n-th batch, and each source walks through its own
shuffled (windowed, length-grouped) epochs independently, starting the next when one ends. So the stream is a
function of the seed alone: ``--resume`` restarts it at the checkpoint's draw, bit for bit.

Why one source per micro-batch: the caches may differ in k (top-k size), in TPA layout (branches, top-k2,
positions fraction, or none) and in where the TPA candidates came from, so their tensors do not stack; a
single-source micro-batch collates exactly as a single-cache one does. The loss math stays that of one step:
``common.losses.StepNorm`` sums its denominators over every micro-batch (and rank) of the step, whatever the
source, so SFT and KD are means over all the step's response tokens, TPA over the step's positions *that have
TPA statistics* and IVA over the (sample, turn) groups *that have teacher saliency* (``batch_counts``): a term a
source lacks is absent for its samples, and neither its numerator nor its denominator counts them.

Steps and epochs: every optimizer step takes world_size × grad_accum draws (rank r takes draws g with
g % world_size == r, in order), so a step's micro-batches do not depend on how they are split over ranks and
micro-batches. One mixture *epoch* is Σ_i ceil(N_i / batch_size) draws (the batches of every cache once, as a
concatenation would have), rounded up to whole steps: the budget of an epoch does not depend on the weights, the
weights only decide its mix. A cache drawn more often than its share of that budget repeats (a new epoch of its
own order), one drawn less is partly read and continues where it stopped in the next mixture epoch. The rounds
workflow sets ``--max-steps`` per round instead.
"""

from __future__ import annotations

import bisect
import logging
import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from alignti.common.cache import CacheReader
from alignti.common.errors import FingerprintMismatch
from alignti.common.losses import TERM_COUNT, LossWeights, means, step_counts

from .data import SHUFFLE_WINDOW, batches_of, epoch_sample_order

log = logging.getLogger("alignti.train")

BLOCK = 4096  # draws per generator seed: draw g's source comes from the generator of block g // BLOCK
TPA_CANDIDATES = ("teacher", "student")


def cache_list(cache) -> list[str]:
    """``--cache`` as a list: one path / URL (a string) or several (a list or tuple of them). Raises ValueError
    when none is given."""
    caches = [cache] if isinstance(cache, str) else [str(c) for c in (cache or ())]
    if not caches:
        raise ValueError("train-student needs --cache (one, or several with --cache C0 --cache C1)")
    return caches


def parse_cache_weights(value, n: int) -> list[float] | None:
    """``--cache-weights``: None, "0.5,0.5", ["0.5", "0.5"] or [0.5, 0.5] -> the n weights normalised to sum 1
    (None stays None: weights proportional to the caches' sample counts). Raises ValueError when the count
    differs from the number of caches, or a weight is negative, not finite, or all are 0."""
    if value is None or (isinstance(value, (list, tuple)) and not value):
        return None
    items = [value] if isinstance(value, (str, int, float)) else list(value)
    try:
        w = [float(x) for v in items for x in str(v).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--cache-weights must be numbers, comma-separated (got {value!r})") from None
    if len(w) != n:
        raise ValueError(f"--cache-weights gives {len(w)} weights for {n} caches: give one weight per --cache, "
                         "in the same order")
    if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"--cache-weights must be finite, non-negative and not all 0 (got {w})")
    return [x / sum(w) for x in w]


def tpa_candidates(reader: CacheReader) -> str:
    """Where a cache's TPA candidates came from: "teacher" (its own top-B, every cache so far) or "student" (a
    rollout's top-B): the fingerprint's ``params["tpa_candidates"]``, else the manifest's ``tpa_candidates``
    ({"by": ...}, schema v6), else teacher (older caches)."""
    top = reader.manifest.get("tpa_candidates")
    src = reader.params.get("tpa_candidates") or (top.get("by") if isinstance(top, dict) else top) or "teacher"
    if src not in TPA_CANDIDATES:
        raise FingerprintMismatch(f"the cache at {reader.url} names its TPA candidates' source '{src}'; this "
                                  f"alignti knows {', '.join(TPA_CANDIDATES)}: upgrade alignti or re-dump")
    return src


def check_same_tokenizer(readers: list[CacheReader], urls: list[str]) -> None:
    """Every cache must come from the same tokenizer and processor as the first (token ids and image tokens line
    up with one student). Raises FingerprintMismatch naming both caches and both fingerprints."""
    first = readers[0].fingerprint
    for r, url in zip(readers[1:], urls[1:]):
        fp = r.fingerprint
        for key, what in (("tokenizer", "tokenizer (vocab, special tokens or chat template)"),
                          ("processor", "image processor (image-token geometry)")):
            a, b = first[key], fp[key]
            if a["hash"] != b["hash"]:
                size = (f" with {a.get('vocab_size')} tokens", f" with {b.get('vocab_size')} tokens") \
                    if key == "tokenizer" else ("", "")
                raise FingerprintMismatch(
                    f"the caches {urls[0]} and {url} were made with different {what}: {key} fingerprint "
                    f"{a['hash'][:12]}{size[0]} vs {b['hash'][:12]}{size[1]}. One student cannot train on both: "
                    f"re-dump {url} with a teacher and processor that share {urls[0]}'s {key}, or train on them "
                    f"separately")


@dataclass(frozen=True)
class Source:
    """One cache of the mixture and what its batches carry."""
    index: int
    url: str
    reader: CacheReader
    has_tpa: bool
    has_saliency: bool
    has_ivak: bool
    tpa_candidates: str

    @classmethod
    def of(cls, index: int, url: str, reader: CacheReader) -> "Source":
        p = reader.params
        return cls(index, url, reader, bool(p.get("tpa_branches")), p.get("saliency_layer") is not None,
                   bool(p.get("iva_token_kl")), tpa_candidates(reader))

    def terms(self, spec, iva_form: str) -> list[str]:
        """The loss terms (and TPA coverage diagnostics) this source's batches give under ``spec``."""
        out = ["sft"] + ([spec.kd_term] if spec.kd_term else [])
        if spec.tpa and self.has_tpa:
            out += ["tpa", "tpa_mass", "tpa_topb"]
        if spec.iva and (self.has_ivak if iva_form == "token-kl" else self.has_saliency):
            out.append("iva")
        return out


def batch_spec(spec, weights: LossWeights, batch: dict):
    """The loss spec and weights for one micro-batch: a term whose teacher tensors the batch lacks (its cache was
    dumped without TPA, saliency or token-KL statistics) is dropped, and TPA candidates that came from the student
    (``tpa_candidates: student``; the teacher's top-k need not hold them) are weighted by the student's own
    probabilities. A single-cache batch always has what its (checked) spec needs: it gets both back unchanged."""
    tpa = spec.tpa and "tpa_cand_list" in batch
    token_kl = weights.iva_form == "token-kl"
    iva = spec.iva and (("ivak_b" in batch) if token_kl else ("teacher_sal" in batch))
    if (tpa, iva) != (spec.tpa, spec.iva):
        spec = replace(spec, tpa=tpa, iva=iva)
    if tpa and batch.get("tpa_candidates") == "student" and weights.tpa_weighting != "student":
        weights = replace(weights, tpa_weighting="student")
    return spec, weights


def batch_counts(batch: dict, spec, weights: LossWeights) -> dict[str, float]:
    """``common.losses.step_counts`` with the denominators of terms the batch does not carry set to 0 (a batch
    without TPA statistics adds no TPA positions; one without saliency / token-KL rows no IVA groups), so a
    source lacking a term does not dilute it for the sources that have it."""
    c = step_counts(batch)
    spec, _ = batch_spec(spec, weights, batch)
    if not spec.tpa:
        c["tpa_rows"] = 0.0
    if not spec.iva:
        c["groups"] = 0.0
    return c


def source_key(name: str, i: int) -> str:
    """A per-source metric's name: ``kd/cache1`` (i: the cache's place in --cache, from 0)."""
    return f"{name}/cache{i}"


def stat_keys(sources: list[Source], spec, iva_form: str) -> tuple[list[str], list[str]]:
    """(every term-sum key, every count key) a mixed step reports, overall and per source: each rank fills the
    same keys (0 where it drew nothing of a source), so the sums over ranks line up."""
    terms = list(dict.fromkeys(t for s in sources for t in s.terms(spec, iva_form)))
    count_names = ("tokens", "tpa_rows", "groups")
    sums = terms + [source_key(t, s.index) for s in sources for t in s.terms(spec, iva_form)]
    counts = list(count_names) + [source_key(c, s.index) for s in sources for c in count_names]
    return sums, counts


def mixed_means(sums: dict[str, float], counts: dict[str, float], weights: LossWeights,
                sources: list[Source], spec, iva_form: str) -> dict[str, float]:
    """The step's metrics: each term's mean over the whole step (as a single cache logs it) and over each source's
    share of it (``kd/cache1``, ``loss/cache1`` = that source's weighted sum, ``tokens/cache1``). A term with no
    items in the step (no TPA positions drawn, no source of it drawn) is left out rather than logged as 0."""
    def present(d_sums, d_counts):
        return {k: v for k, v in d_sums.items() if d_counts.get(TERM_COUNT[k], 0.0) > 0}
    out = means(present({k: sums[k] for k in sums if "/" not in k}, counts),
                {k: v for k, v in counts.items() if "/" not in k}, weights)
    for s in sources:
        c = {n: counts[source_key(n, s.index)] for n in ("tokens", "tpa_rows", "groups")}
        if c["tokens"] <= 0:
            continue
        own = present({t: sums[source_key(t, s.index)] for t in s.terms(spec, iva_form)}, c)
        for k, v in means(own, c, weights).items():
            out[source_key(k, s.index)] = v
        out[source_key("tokens", s.index)] = int(c["tokens"])
    return out


class MixedDataset(torch.utils.data.Dataset):
    """The samples of several ``CacheDataset``s under one index: global index = the source's offset + its own
    index; each sample carries its source's index (``source``)."""

    def __init__(self, datasets: list):
        self.datasets = datasets
        self.offsets = [0]
        for d in datasets:
            self.offsets.append(self.offsets[-1] + len(d))

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, g: int) -> tuple[int, int]:
        i = bisect.bisect_right(self.offsets, g) - 1
        return i, g - self.offsets[i]

    def __getitem__(self, g: int) -> dict:
        i, j = self.locate(g)
        x = self.datasets[i][j]
        x["source"] = i
        return x


class MixedCollator:
    """``StudentCollator`` for single-source batches, plus ``batch["source"]`` and the source's TPA candidate
    origin (``batch["tpa_candidates"]``). Raises ValueError on a batch mixing sources (the sampler never makes
    one)."""

    def __init__(self, collator, sources: list[Source]):
        self.collator, self.origin = collator, [s.tpa_candidates for s in sources]

    def __call__(self, samples: list[dict]) -> dict:
        src = {x.pop("source") for x in samples}
        if len(src) != 1:
            raise ValueError(f"a micro-batch mixes caches {sorted(src)}; each must come from one cache")
        batch = self.collator(samples)
        batch["source"] = i = src.pop()
        batch["tpa_candidates"] = self.origin[i]
        return batch


class MixtureSchedule:
    """The run's stream of micro-batches over several caches (see the module docstring): ``draw(g)`` is the source
    of draw g and ``batch(g)`` its samples (global indices of ``MixedDataset``). Deterministic in (seed, weights,
    batch size, group_by_length); independent of world size and gradient accumulation."""

    def __init__(self, sources: list[Source], weights: list[float], batch_size: int, seed: int,
                 group_by_length: bool, offsets: list[int], window: int = SHUFFLE_WINDOW):
        self.sources, self.weights = sources, torch.tensor(weights, dtype=torch.float64)
        self.batch_size, self.seed, self.group, self.offsets = batch_size, seed, group_by_length, offsets
        self.window = window
        self.per_source = [math.ceil(len(s.reader) / batch_size) for s in sources]  # batches of a source's epoch
        self._src = np.zeros(0, np.int64)   # source of each draw made so far
        self._nth = np.zeros(0, np.int64)   # its index among that source's draws
        self._orders: dict[tuple[int, int], list[list[int]]] = {}

    @property
    def draws_per_epoch(self) -> int:
        """Σ_i ceil(N_i / batch_size): every cache's batches once."""
        return sum(self.per_source)

    def epoch_draws(self, world_size: int, grad_accum: int) -> int:
        """Draws of one mixture epoch, rounded up to whole optimizer steps of world_size × grad_accum draws."""
        per_step = world_size * grad_accum
        return math.ceil(self.draws_per_epoch / per_step) * per_step

    def _extend(self, n: int) -> None:
        while len(self._src) < n:
            block = len(self._src) // BLOCK
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + 104_729 * (block + 1))
            src = torch.multinomial(self.weights, BLOCK, replacement=True, generator=g).numpy().astype(np.int64)
            seen = np.bincount(self._src, minlength=len(self.sources)) if len(self._src) else \
                np.zeros(len(self.sources), np.int64)
            nth = np.empty(BLOCK, np.int64)
            for i in range(len(self.sources)):
                at = src == i
                nth[at] = seen[i] + np.arange(int(at.sum()))
            self._src, self._nth = np.concatenate([self._src, src]), np.concatenate([self._nth, nth])

    def draw(self, g: int) -> int:
        self._extend(g + 1)
        return int(self._src[g])

    def sources_of(self, start: int, stop: int) -> np.ndarray:
        """The sources of draws start..stop-1."""
        self._extend(stop)
        return self._src[start:stop].copy()

    def _source_batches(self, i: int, epoch: int) -> list[list[int]]:
        """Source i's batches in its own epoch ``epoch``: windowed shuffle, then length grouping (as one cache)."""
        key = (i, epoch)
        if key not in self._orders:
            reader = self.sources[i].reader
            seed = self.seed + 7_907 * i  # source 0 keeps the run's seed
            order = epoch_sample_order(reader, epoch, seed, self.batch_size, self.group, self.window)
            if len(self._orders) > 64:
                self._orders.clear()
            self._orders[key] = batches_of(order, self.batch_size)
        return self._orders[key]

    def batch(self, g: int) -> list[int]:
        self._extend(g + 1)
        i, n = int(self._src[g]), int(self._nth[g])
        local = self._source_batches(i, n // self.per_source[i])[n % self.per_source[i]]
        return [self.offsets[i] + j for j in local]

    def rank_batches(self, epoch: int, env, grad_accum: int) -> list[list[int]]:
        """This rank's micro-batches of mixture epoch ``epoch``: its draws g ≡ rank (mod world size), in order."""
        d = self.epoch_draws(env.world_size, grad_accum)
        return [self.batch(g) for g in range(epoch * d + env.rank, (epoch + 1) * d, env.world_size)]


class StepStats:
    """A mixed step's bookkeeping for ``trainer.accumulate_step``: each micro-batch's denominators (``counts``:
    overall and per source, every key on every rank) and term sums (``add``), and the step's metrics
    (``means``, after the sums over ranks)."""

    def __init__(self, sources: list[Source], spec, weights: LossWeights):
        self.sources, self.spec, self.weights = sources, spec, weights
        self.sum_keys, self.count_keys = stat_keys(sources, spec, weights.iva_form)

    def counts(self, batch: dict) -> dict[str, float]:
        c = batch_counts(batch, self.spec, self.weights)
        out = dict.fromkeys(self.count_keys, 0.0)
        out.update(c)
        out.update({source_key(k, batch["source"]): v for k, v in c.items()})
        return out

    @staticmethod
    def norm_counts(counts: dict[str, float]) -> dict[str, float]:
        """The overall denominators (what ``StepNorm.from_counts`` takes)."""
        return {k: v for k, v in counts.items() if "/" not in k}

    def empty(self) -> dict[str, float]:
        return dict.fromkeys(self.sum_keys, 0.0)

    def add(self, sums: dict[str, float], source: int, batch_sums: dict) -> None:
        for k, v in batch_sums.items():
            sums[k] = sums.get(k, 0.0) + float(v)
            key = source_key(k, source)
            sums[key] = sums.get(key, 0.0) + float(v)

    def means(self, sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
        return mixed_means(sums, counts, self.weights, self.sources, self.spec, self.weights.iva_form)


def check_sources(spec, iva_form: str, sources: list[Source]) -> None:
    """Refuse a loss whose TPA / IVA term no cache (one, or every cache of a mixture) can feed: CacheError naming
    the cache(s) and the re-dump. Logs which caches give which terms."""
    from alignti.common.errors import CacheError

    def refuse(needs: str, dumped: str, fix: str):
        if len(sources) == 1:
            where = f"the cache at {sources[0].url} was dumped with {dumped}; re-dump with {fix}"
        else:
            where = (f"none of the caches ({', '.join(s.url for s in sources)}) has them (all dumped with "
                     f"{dumped}); re-dump one with {fix}")
        raise CacheError(f"{needs}, but {where}")

    if spec.tpa and not any(s.has_tpa for s in sources):
        refuse(f"loss '{spec.name}' needs transition statistics", "--tpa-branches 0", "--tpa-branches 4")
    if spec.iva and iva_form == "token-kl" and not any(s.has_ivak for s in sources):
        refuse("--iva-form token-kl needs the teacher's output distributions at its salient image tokens",
               "no --iva-token-kl", "--iva-token-kl")
    if spec.iva and not any(s.has_saliency for s in sources):
        refuse(f"loss '{spec.name}' needs teacher saliency", "--saliency-layer none", "--saliency-layer auto")
    for s in sources:
        p = s.reader.params
        log.info("cache%d %s: %d samples, k=%s, TPA %s%s, terms %s", s.index, s.url, len(s.reader), p.get("top_k"),
                 f"B={p.get('tpa_branches')} k2={p.get('tpa_top_k')} positions={p.get('tpa_positions', 1.0)} "
                 f"candidates={s.tpa_candidates}" if s.has_tpa else "none",
                 "" if s.has_saliency else ", no saliency", "+".join(s.terms(spec, iva_form)))


def merged_params(sources: list[Source]) -> dict:
    """The params train-student plans with: the first cache's, with TPA / saliency / token-KL taken from the first
    cache that has them (so the loss checks pass when any cache can feed a term, see ``check_sources``)."""
    params = dict(sources[0].reader.params)
    for flag, keys in (("has_tpa", ("tpa_branches", "tpa_top_k")),
                       ("has_saliency", ("saliency_layer", "teacher_layers")),
                       ("has_ivak", ("iva_token_kl", "iva_token_ratio"))):
        first = next((s for s in sources if getattr(s, flag)), None)
        if first is not None:
            params.update({k: first.reader.params.get(k) for k in keys})
    return params


def check_student_layers(sources: list[Source], student_layer: int | None, student_layers: int, layer_for) -> None:
    """Caches with saliency whose layers l* map to different student layers are refused unless --student-layer
    picks one (the student captures one layer per step). ``layer_for``: ``trainer.student_layer_for``."""
    if student_layer is not None:
        return
    seen = {}
    for s in sources:
        if s.has_saliency:
            p = s.reader.params
            seen.setdefault(layer_for(None, p["saliency_layer"], p.get("teacher_layers", 1), student_layers),
                            (s.url, p["saliency_layer"], p.get("teacher_layers", 1)))
    if len(seen) > 1:
        (la, a), (lb, b) = list(seen.items())[:2]
        raise FingerprintMismatch(f"the caches {a[0]} and {b[0]} hold teacher saliency of different layers (l* = "
                                  f"{a[1]} and {b[1]} of {a[2]} / {b[2]}), student layers {la} and {lb}: pass "
                                  f"--student-layer N to align one student layer with both")
