"""`alignti dump-teacher`: teacher-forced forward over every sample, written as a cache.

Work is split into fixed work units (recorded in plan.json before anything else is written); each
unit becomes one committed part. Re-running the same command after an interruption skips the
committed units and finishes the rest; a different teacher, tokenizer, k or data is refused. The
teacher's forward, top-k and saliency run on the device; moving results to the host and writing
the zarr/parquet part happen on a writer thread, off the forward loop; loading and encoding the
next unit's samples (images, chat template, tokenizer, processor) happen in a worker process
(``--encode-workers``, ``encoded_units``), off the loop and its GIL.
"""

from __future__ import annotations

import errno
import json
import logging
import pickle
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from alignti.common import distributed as dist
from alignti.common.adapters import adapter_class, adapter_for, check_images_per_sample
from alignti.common.batch import collate, lm_head, to_device
from alignti.common.cache import (PACKED_COMPRESSOR_NAMES, PartWriter, atomic_write_json, committed_parts,
                                  packed_settings, read_plan, write_manifest, write_plan)
from alignti.common.codecs import DEFAULT_TAIL_KL
from alignti.common.config import check_ranges
from alignti.common.conversation import (ENCODING_VERSION, check_literal_specials, check_saliency_query, encode,
                                         end_of_turn_ids, with_saliency_query)
from alignti.common.records import Record, Skipped, image_column
from alignti.common.errors import BadSamples, CacheError, DataError, DataSourceError, ResourceError, human_bytes
from alignti.common.fingerprint import make_fingerprint
from alignti.common.models import (check_loaded_weights, input_device, load_config, load_model, load_processor,
                                   text_vocab_size)
from alignti.common.placement import check_placement, placement_options
from alignti.common.onpolicy import RolloutColumns, restrict_to_loss_turns
from alignti.common.progress import progress_bar
from alignti.common.schema import LOGPROB_ENCODINGS, MANIFEST_FILE, PARTS_DIR, SPECIALS_FILE, TOKENS_FILE, TPA_LAYOUT
from alignti.common.token_align import encode_token_bytes, special_roles, token_bytes
from alignti.common.sources import DECODE_VERSION, image_sizes, load_image, open_source, preflight

from .compute import BLIND_TOLERANCE, image_dependence, split_per_sample, teacher_batch
from .onpolicy import check_rollout, onpolicy_manifest, student_candidates
from .select_layer import select_layer

log = logging.getLogger("alignti.dump")

# The defaults a real teacher gets, chosen from bench/README.md ("Real LM", "Choice"; SmolLM2-135M, V = 49,153): at
# k = 64 the packed encoding stores 116-124 B/token, 1.2x float16 at k = 32, with 30-35% less truncation KL (the
# packed tail adds 4e-5 nats per token, --packed-kl). A teacher whose vocabulary is smaller gets its whole vocabulary.
DEFAULT_TOP_K = 64
DEFAULT_LOGPROB_ENCODING = "packed"
DEFAULT_TPA_TOP_K = 8  # per TPA branch distribution


@dataclass
class DumpConfig:
    """The settings of one dump (``alignti dump-teacher``'s options; ``dump_teacher(DumpConfig(...))``).

    Defaults for a real teacher (bench/README.md, "Real LM", "Choice"): ``top_k`` None keeps the top 64 log-probs
    per response token (the teacher's whole vocabulary if it has fewer tokens), ``tpa_top_k`` None 8 per TPA branch
    (same cap), stored in the ``packed`` encoding (common/codecs.py: ids exact as a set, the top-1 log-prob within
    1/512 nat, the others within half a step of sqrt-probability set by ``packed_kl``, 4e-5 nats per token; the
    rest mass exact). ``logprob_encoding="float16"`` stores the log-probs in rank order at float16's 2^-11
    relative. The k's used are recorded in the manifest's ``params`` (and ``dump_config``)."""
    teacher: str
    data: str         # JSON/JSONL, parquet file(s) or folder, datasets save_to_disk folder; local or fsspec URL
    images: str | None  # the folder image paths are relative to (None: the data embeds its images)
    out: str
    top_k: int | None = None  # None: DEFAULT_TOP_K, or the teacher's vocabulary if smaller (resolve_top_k)
    batch_size: int = 8
    device: str = "auto"
    limit: int | None = None
    skip_bad: bool = False
    tpa_branches: int = 4
    tpa_top_k: int | None = None  # None: DEFAULT_TPA_TOP_K, or the teacher's vocabulary if smaller
    saliency_layer: str = "auto"   # "auto" (IRS), a layer index, or "none"
    irs_samples: int = 256
    unit_size: int = 256
    max_length: int | None = None
    dtype: str = "auto"
    logprob_encoding: str = DEFAULT_LOGPROB_ENCODING  # "packed" (common/codecs.py), "float16", or "uint8" (1/16-nat
    # log-space steps)
    packed_kl: float = DEFAULT_TAIL_KL  # packed: expected KL (nats per row) its tail code may add; sets its step
    packed_compressor: str = "zstd"  # packed: the compressor after the codecs, zstd or lzma (common.cache)
    saliency_query: str = "instruction"  # or "answer" (common/conversation.py: with_saliency_query)
    tpa_positions: float = 1.0  # fraction of each sample's response positions that get TPA statistics
    iva_token_kl: bool = False  # also cache IVA's token-KL statistics (train-student --iva-form token-kl)
    iva_token_ratio: float = 0.25  # the share of each sample's image tokens those statistics cover
    temperature: float = 1.0  # cache the teacher at this temperature: softmax(z / T), top-k and rest mass exact there
    length_sorted_batches: bool = True  # batch each work unit's samples in token-length order (less padding)
    tp_size: int = 1  # ranks per teacher replica (tensor parallelism inside it; replicas split the work units)
    ep_size: int = 1  # MoE teachers: ranks the experts are split over (transformers' expert-parallel plan)
    device_map: str | None = None  # "auto": accelerate's placement over this process's GPUs, CPU, disk
    max_memory: str | None = None  # a rank's memory for the plan check / device map ("70GiB", "0=70GiB,cpu=200GiB")
    encode_workers: int | None = None  # processes encoding the next work units beside the teacher (encode_workers)
    progress: bool = True


SKIP_FIX = "fix them, or pass --skip-bad to record them as skipped in the cache's sample tables (parts/NNNNN.parquet)"


def _check_family(records: list, adapter_cls, config, processor, images: str | None, skip_bad: bool) -> list:
    """What the family's processor alone can find, before the teacher is loaded: several images for a family that
    takes one, the family's image/video special tokens or the tokenizer's special tokens ("</s>", "<|im_end|>")
    typed as text, an image size its image processor refuses
    (from each image's header). Refused by name (or, with --skip-bad, skipped), all of them at once."""
    out, bad = [], []
    for r in records:
        if isinstance(r, Record):
            try:
                check_images_per_sample(adapter_cls, r.sample_id, len(r.images))
                adapter_cls.check_text(config, processor.tokenizer, r.sample_id, r.turns)
                check_literal_specials(processor, r)
                for ref, (w, h) in image_sizes(r, images):
                    adapter_cls.check_image_size(processor.image_processor, r.sample_id, f"'{ref}'", w, h)
            except DataError as e:
                r = Skipped(r.index, r.sample_id, str(e))
                bad.append(r)
        out.append(r)
    if bad and not skip_bad:
        raise BadSamples([(b.sample_id, b.error) for b in bad], "dumping", SKIP_FIX)
    return out


def _resource_error(e: BaseException, out: Path, device, batch_size: int, units_left: int) -> ResourceError | None:
    """One line for a failure that is not about a sample (disk full, no permission, out of memory), or None."""
    resume = "finished work units are kept: re-run the same command to resume"
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        parts = out / PARTS_DIR
        markers = list(parts.glob("*.commit.json")) if parts.exists() else []
        used = sum(f.stat().st_size for f in parts.rglob("*") if f.is_file()) if parts.exists() else 0
        per_unit = used / len(markers) if markers else None
        free = shutil.disk_usage(out if out.exists() else out.parent).free
        need = (f"about {human_bytes(per_unit * units_left)} more free space ({units_left} work unit(s) left, "
                f"{human_bytes(per_unit)} each so far; {human_bytes(free)} free now)" if per_unit else
                f"more free space than the {human_bytes(free)} free now (no work unit has been committed yet)")
        return ResourceError(f"no space left on the device holding the cache {out} ({e.strerror}): it needs {need}; "
                             f"{resume}")
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ResourceError(f"cannot write the cache {out}: {e.strerror} ({e.filename}); make it writable or choose "
                             f"another --out; {resume}")
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return ResourceError(f"out of memory on {device} running the teacher on batches of {batch_size} samples "
                             f"({type(e).__name__}): lower --batch-size (or --max-length); {resume}")
    return None


class UnitEncoder(torch.utils.data.Dataset):
    """Work unit ``i`` (of ``spans``, [start, end) indices into ``records``) encoded for the teacher: item ``i`` is
    (encoded samples, skipped samples, error). Each record's image(s) loaded (``sources.load_image``) and encoded
    (``conversation.encode``: the family's chat template, tokenizer and processor; on-policy rows restricted to their
    loss turns with the student's tokens swapped in; the saliency query applied), in dataset order. Skipped: (index,
    sample id, error text, image column) of preflight's and the family check's skips and, with ``skip_bad``, of the
    samples whose encoding raises DataError; without it, error is the first such DataError and the samples after it
    are not encoded (the dump raises it, naming the sample). A torch Dataset, so a DataLoader worker process can
    encode the next unit while the teacher runs the current one (``encoded_units``)."""

    def __init__(self, spans: list, records: list, processor, images: str | None, max_length: int | None,
                 saliency_query: str, skip_bad: bool, image_token_id: int | None, onp: RolloutColumns | None = None):
        self.spans, self.records, self.processor, self.images = spans, records, processor, images
        self.max_length, self.saliency_query, self.skip_bad = max_length, saliency_query, skip_bad
        self.image_token_id, self.onp = image_token_id, onp

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, i: int) -> tuple[list, list, DataError | None]:
        s, e = self.spans[i]
        encoded, skipped = [], []
        for r in self.records[s:e]:
            if isinstance(r, Skipped):
                skipped.append((r.index, r.sample_id, r.error, ""))
                continue
            try:
                img, sha = load_image(r, self.images) if r.image else (None, "")
                enc = encode(self.processor, r, img, sha, max_length=self.max_length)
                if self.onp is not None:  # only the row's loss turns are response; the others are context
                    enc = restrict_to_loss_turns(enc, self.onp.loss_turns(r.index))
                    # a generated answer: the student's own tokens, where the texts allow it
                    self.onp.with_student_tokens(enc, self.processor.tokenizer, self.image_token_id, self.max_length)
                encoded.append(with_saliency_query(enc, self.saliency_query))
            except DataError as err:
                if not self.skip_bad:
                    return encoded, skipped, err
                skipped.append((r.index, r.sample_id, str(err), image_column(r.image)))
        return encoded, skipped, None


def encode_workers(requested: int | None, device) -> int:
    """--encode-workers: the worker processes that encode the next work units while the teacher runs; None (the
    default) picks 1 for a teacher on a GPU (the encoding is CPU work beside the device's forward) and 0 on the CPU:
    the encoding stays in the forward loop, where a worker competes with the teacher's forward for the same CPU. On
    a 2-core CPU the worker did not pay: with both cores shared by other jobs it was no faster, and with one torch
    thread and the other core free it took the encoding off the loop while the teacher's forward slowed by nearly as
    much (nine families, paired medians -0.060x to +0.014x the loop's, mean -0.013x, within the runs' noise:
    bench/README.md, the dump against its own forward). train-student's DataLoader workers default to 0 on CPU
    likewise. 0 also where processes cannot be forked (the worker inherits the processor and the data instead of
    pickling them)."""
    if "fork" not in torch.multiprocessing.get_all_start_methods():
        if requested:
            log.warning("--encode-workers %d: this platform cannot fork worker processes; encoding in the loop",
                        requested)
        return 0
    if requested is not None:
        return requested
    return 0 if torch.device(device).type == "cpu" else 1


def _pickled(item) -> torch.Tensor:
    """A worker's unit as one uint8 tensor of its pickled bytes (its tensors copied in): the DataLoader passes it to
    the dump's process in shared memory, one file descriptor a unit. (Passed as bytes, a unit's images go through a
    pipe 64 KiB at a time, each step waiting for the worker to be scheduled: 0.1-0.2 s a unit of four SmolVLM
    samples on a loaded CPU; passed as they are, each of a unit's hundreds of tensors holds a file descriptor.)"""
    return torch.frombuffer(bytearray(pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)


def encoded_units(encoder: UnitEncoder, workers: int):
    """``encoder``'s units in order (a generator: close it to stop its workers). ``workers`` 0: each encoded when
    asked for, in this process. N > 0: the first unit here, the others by N DataLoader worker processes (forked
    first, so they start on unit 2 while this process encodes unit 1: the workers' start-up stays off the loop's
    path; forked, they inherit the processor and the records), each one unit ahead of the loop (``prefetch_factor``
    1), so the encoding of the next unit runs beside the teacher's forward over the current one without holding this
    process's GIL. The same items either way (the encoding is deterministic; tensors are passed pickled, bit for
    bit: ``_pickled``). A single unit is encoded here whatever ``workers``."""
    if workers == 0 or len(encoder) < 2:
        for i in range(len(encoder)):
            yield encoder[i]
        return
    rest = torch.utils.data.Subset(encoder, range(1, len(encoder)))
    loader = torch.utils.data.DataLoader(rest, batch_size=None, shuffle=False, num_workers=workers,
                                         prefetch_factor=1, collate_fn=_pickled, multiprocessing_context="fork")
    it = iter(loader)  # the workers fork here and start on the second unit
    try:
        yield encoder[0]
        for item in it:
            yield pickle.loads(memoryview(item.numpy()))
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:  # stopped early (an error in the loop): its workers end now, not at collection
            shutdown()


def _teacher_unit(adapter, encoded: list, batch_size: int, length_sorted: bool, pad_id: int, device, params,
                  advance=lambda n: None, student_cands=None) -> list:
    """The teacher over one work unit's encoded samples: [(chunk, batch, result)] per batch, batches of similar
    token length (the writer puts every sample back in dataset order). ``student_cands(chunk)``: on-policy rows'
    TPA candidates for a batch (teacher_dump.onpolicy.student_candidates), None for the teacher's own."""
    jobs = []
    batched = sorted(encoded, key=lambda x: -len(x.input_ids)) if length_sorted else encoded
    for i in range(0, len(batched), batch_size):
        chunk = batched[i:i + batch_size]
        batch = collate([c.__dict__ for c in chunk], pad_id, type(adapter))
        if student_cands is not None:
            batch["student_cands"] = student_cands(chunk)
        jobs.append((chunk, batch, teacher_batch(adapter, to_device(batch, device), params)))
        advance(len(chunk))
    return jobs


def _failing_samples(adapter, encoded: list, pad_id: int, device, params, student_cands=None) -> list[tuple]:
    """After a batch failed: each sample run alone, [(sample, exception)] for those that fail on their own."""
    bad = []
    for enc in encoded:
        try:
            _teacher_unit(adapter, [enc], 1, False, pad_id, device, params, student_cands=student_cands)
        except (torch.OutOfMemoryError, MemoryError):
            raise
        except Exception as e:  # noqa: BLE001 - this sample's own failure
            bad.append((enc, e))
    return bad


def _check_plan(out: Path, plan: dict) -> None:
    old = read_plan(out)
    if old is None:
        if out.exists() and any(out.iterdir()):
            raise CacheError(f"{out} exists and is not an alignti cache; choose an empty or new --out")
        return
    diffs = []
    for key in ("teacher_config_hash", "tokenizer", "processor", "params"):
        was, now = old["fingerprint"].get(key), plan["fingerprint"].get(key)
        if was != now and key == "params" and isinstance(was, dict) and isinstance(now, dict):
            diffs.append("params (" + ", ".join(f"{k} {was.get(k)!r} there, {now.get(k)!r} now"
                                                for k in sorted(set(was) | set(now), key=str)
                                                if was.get(k) != now.get(k)) + ")")
        elif was != now:
            diffs.append(key)
    if old["units"] != plan["units"] or old["unit_ids"] != plan["unit_ids"]:
        diffs.append("data (samples or work units)")
    if diffs:
        raise CacheError(f"{out} holds a dump made with different {', '.join(diffs)}; refusing to mix them. "
                         f"Use a new --out, or delete {out} to start over.")


def resolve_top_k(cfg: DumpConfig, vocab: int) -> DumpConfig:
    """``cfg`` with its k's fixed for a teacher of ``vocab`` text tokens: ``top_k`` None (the default) becomes
    DEFAULT_TOP_K, or ``vocab`` if smaller, and ``tpa_top_k`` None becomes DEFAULT_TPA_TOP_K, or ``vocab`` if smaller
    (logged when the vocabulary caps them; the manifest's params and dump_config record the k's used). A k given
    explicitly is kept as it is. Raises ValueError naming the option when a given k is larger than ``vocab``, or when
    --top-k (given or defaulted) is not larger than --tpa-branches (the TPA candidates are the top-k's first B)."""
    top_k, tpa_top_k = cfg.top_k, cfg.tpa_top_k
    for name, k in (("--top-k", top_k), ("--tpa-top-k", tpa_top_k if cfg.tpa_branches else None)):
        if k is not None and k > vocab:
            raise ValueError(f"{name} {k} is larger than the teacher's vocabulary of {vocab} tokens "
                             f"({cfg.teacher}); choose {name} {vocab} or less")
    if top_k is None:
        top_k = min(DEFAULT_TOP_K, vocab)
        if top_k < DEFAULT_TOP_K:
            log.info("--top-k: the teacher's vocabulary has %d tokens, fewer than the default %d: keeping all %d",
                     vocab, DEFAULT_TOP_K, top_k)
        if cfg.tpa_branches and top_k <= cfg.tpa_branches:
            raise ValueError(f"the teacher's vocabulary of {vocab} tokens ({cfg.teacher}) leaves --top-k at {top_k}, "
                             f"not larger than --tpa-branches ({cfg.tpa_branches}): choose --tpa-branches "
                             f"{top_k - 1} or less (0: no TPA statistics)")
    if tpa_top_k is None:
        tpa_top_k = min(DEFAULT_TPA_TOP_K, vocab)
    log.info("keeping the top %d log-probs per response token%s", top_k,
             f" (TPA: {cfg.tpa_branches} branches x top-{tpa_top_k})" if cfg.tpa_branches else "")
    return replace(cfg, top_k=top_k, tpa_top_k=tpa_top_k)


def token_id_range(adapter, processor, teacher: str) -> dict:
    """The ids the cache may hold: {"lm_head_rows": the teacher's LM head rows, "tokenizer_ids": len(tokenizer),
    "cached_ids_below": the smaller}. A head padded past its tokenizer (Qwen2.5-VL-7B: 152,064 rows for 151,665
    ids; the 3B: 151,936) has rows no text maps to: the dump takes its top-k among the tokenizer's ids and leaves the
    padded rows' mass in the rest bucket (``topk_fold_hidden``'s ``ids_below``), so a student whose head covers the
    tokenizer reads every cached id. Recorded in the manifest (``vocabulary``; train-student checks it)."""
    rows = int(lm_head(adapter).weight.shape[0])
    n_ids = len(processor.tokenizer)
    if n_ids < rows:
        log.info("the teacher's LM head has %d rows, its tokenizer %d ids (%s): the %d padded rows are never cached "
                 "as top-k ids, their mass stays in the rest bucket", rows, n_ids, teacher, rows - n_ids)
    return {"lm_head_rows": rows, "tokenizer_ids": n_ids, "cached_ids_below": min(rows, n_ids)}


def warn_if_blind(adapter, processor, records: list, images: str | None, device, max_length, teacher: str) -> bool:
    """Warn when the teacher's outputs do not depend on the image (``compute.image_dependence``: the sample's image
    vs a blank one, on two samples): a cache from it would teach the student to ignore images. Returns True when it
    warned."""
    seen = image_dependence(adapter, processor, records, images, device, max_length)
    if not seen or max(d for _, d in seen) > BLIND_TOLERANCE:
        return False
    log.warning("the teacher %s gives the same outputs with each sample's image as with a blank image (samples %s: "
                "log-probs within %.1g nats): it does not see the images. Check that its vision tower and projector "
                "loaded (the load report above), and that it is the vision-language checkpoint you meant. An untrained "
                "teacher (make-demo --no-train-teacher's: random weights, which barely read the image) gives this "
                "too: expected there",
                teacher, ", ".join(s for s, _ in seen), max(d for _, d in seen))
    return True


def check_dump_config(cfg: DumpConfig):
    """The settings' own checks, before any data, weights or output are touched (``dump_teacher`` runs them first;
    ``alignti rounds`` when it reads its YAML): the saliency query, the log-prob encoding and compressor names,
    --top-k against --tpa-branches, and the k's against the teacher's vocabulary from its config alone
    (``resolve_top_k``). Returns (``cfg`` with its k's resolved, the teacher's config or None when it cannot be read
    here: loading the processor later names that problem). Raises ValueError naming the option and its choices."""
    check_saliency_query(cfg.saliency_query)
    if cfg.logprob_encoding not in LOGPROB_ENCODINGS:
        raise ValueError(f"--logprob-dtype must be one of {', '.join(LOGPROB_ENCODINGS)}, not '{cfg.logprob_encoding}'")
    if cfg.packed_compressor not in PACKED_COMPRESSOR_NAMES:
        raise ValueError(f"--packed-compressor must be one of {', '.join(PACKED_COMPRESSOR_NAMES)}, "
                         f"not '{cfg.packed_compressor}'")
    if cfg.tpa_branches and cfg.top_k is not None and cfg.top_k <= cfg.tpa_branches:
        raise ValueError(f"--top-k ({cfg.top_k}) must be larger than --tpa-branches ({cfg.tpa_branches})")
    if cfg.logprob_encoding != "packed" and (cfg.packed_kl != DEFAULT_TAIL_KL or cfg.packed_compressor != "zstd"):
        log.warning("--packed-kl / --packed-compressor apply to --logprob-dtype packed only: ignored with "
                    "--logprob-dtype %s", cfg.logprob_encoding)
    try:  # the config alone: no weights loaded, nothing written yet
        config = load_config(cfg.teacher)
    except (OSError, ValueError, KeyError):
        config = None
    if config is not None:
        cfg = resolve_top_k(cfg, text_vocab_size(config))
    return cfg, config


def dump_teacher(cfg: DumpConfig) -> dict:
    """Under torchrun every rank runs this: rank 0 fixes the plan (and the IRS layer), each rank
    dumps the uncommitted units ``u % world_size == rank``, and rank 0 writes the manifest last."""
    check_ranges("dump-teacher", cfg)  # every numeric setting in its range, before anything loads
    out = Path(cfg.out)
    env = dist.dist_env(cfg.tp_size)
    device = dist.device_for(cfg.device, env)
    dist.init(env, device)
    cfg, config = check_dump_config(cfg)  # before any teacher time is spent
    if config is not None:  # the teacher's size against a rank's memory, before any weight loads
        check_placement(config, cfg.teacher, device, cfg.dtype, env, cfg.tp_size, cfg.ep_size, cfg.device_map,
                        cfg.max_memory)
    source = open_source(cfg.data, cfg.images)
    records = source.records()
    onp = RolloutColumns.of(source)  # on-policy rows (alignti rollout): loss turns, the student's TPA candidates
    student_tpa = bool(cfg.tpa_branches) and onp is not None and onp.has_candidates  # TPA after student's
    if cfg.limit is not None:
        records = records[:cfg.limit]
    if not records:
        raise DataSourceError(cfg.data, "no samples in the data", "check --data")
    records = preflight(records, cfg.images, cfg.skip_bad, "dumping", SKIP_FIX)
    processor = load_processor(cfg.teacher)
    if config is None:
        config = load_config(cfg.teacher)
        cfg = resolve_top_k(cfg, text_vocab_size(config))
        check_placement(config, cfg.teacher, device, cfg.dtype, env, cfg.tp_size, cfg.ep_size, cfg.device_map,
                        cfg.max_memory)
    records = _check_family(records, adapter_class(config.model_type), config, processor, cfg.images, cfg.skip_bad)

    t_load = time.perf_counter()
    model = load_model(cfg.teacher, device, cfg.dtype, **placement_options(cfg.tp_size, cfg.ep_size, cfg.device_map,
                                                                         cfg.max_memory))
    check_loaded_weights(model, cfg.teacher, "teacher")  # no cache from a teacher with randomly initialised parts
    model.eval()
    device = input_device(model, device)
    t_loaded = time.perf_counter()
    adapter = adapter_for(model)
    max_length = cfg.max_length or getattr(adapter.text_config, "max_position_embeddings", None)

    old_plan = read_plan(out)
    irs = None
    if cfg.saliency_layer == "none":
        layer = None
    elif cfg.saliency_layer == "auto":
        if old_plan and old_plan.get("irs"):
            irs = old_plan["irs"]
        else:
            irs = dist.on_first_replica(env, lambda: select_layer(
                model, processor, [r for r in records if isinstance(r, Record)], cfg.images,
                n_samples=cfg.irs_samples, batch_size=cfg.batch_size, progress=cfg.progress and env.is_main,
                query=cfg.saliency_query))
        layer = irs["layer"]
        log.info("saliency layer %d (auto: the highest Instruction-Relevance Score of the teacher's %d layers; "
                 "select-layer prints them all)", layer, adapter.num_layers)
    else:
        layer = int(cfg.saliency_layer)
        if not 0 <= layer < adapter.num_layers:
            raise ValueError(f"--saliency-layer {layer} is outside the teacher's {adapter.num_layers} layers (0-"
                             f"{adapter.num_layers - 1}): name one of its full-attention layers "
                             f"{adapter.saliency_layers()}, or auto")
        if layer not in adapter.saliency_layers():
            kind = adapter.layer_types()[layer]
            why = ("a sliding-window layer of the {f} teacher, where the instruction may not see the image"
                   if kind == "sliding_attention" else
                   "a {k} layer of the {f} teacher, which has no attention probabilities to read saliency from")
            raise ValueError(f"--saliency-layer {layer} is {why.format(f=adapter.family, k=kind)}: name one of its "
                             f"full-attention layers {adapter.saliency_layers()}, or auto")

    params = {"top_k": cfg.top_k, "tpa_branches": cfg.tpa_branches, "tpa_top_k": cfg.tpa_top_k,
              "saliency_layer": layer, "teacher_layers": adapter.num_layers, "max_length": max_length,
              "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
              "logprob_encoding": cfg.logprob_encoding, "saliency_query": cfg.saliency_query,
              "encoding_version": ENCODING_VERSION, "image_decode": DECODE_VERSION, "align_fields": True}
    if adapter.thumb_grid_tiles:  # 7-value image_tiles entries: written as schema v8, refused by older readers
        params["thumb_grid_tiles"] = True
    if cfg.logprob_encoding == "packed":
        # the tail step from the KL bound at this k (codecs.tail_step_for); TPA and IVA's top-k share it
        params["packed"] = dict(packed_settings({"top_k": cfg.top_k, "packed": {"tail_kl": cfg.packed_kl}}),
                                tail_kl=cfg.packed_kl, compressor=cfg.packed_compressor)
    if cfg.tpa_branches:
        params.update(tpa_layout=TPA_LAYOUT, tpa_positions=cfg.tpa_positions, tpa_select="entropy",
                      tpa_candidates="student" if student_tpa else "teacher")
        if student_tpa:
            params["tpa_students"] = onp.summary()["students"]
    if cfg.temperature != 1.0:  # recorded only when not 1, so the caches (and plans) of earlier dumps stay as they are
        params["temperature"] = float(cfg.temperature)
        log.info("caching the teacher at temperature %g (train-student --temperature %g uses it as it is)",
                 cfg.temperature, cfg.temperature)
    vocabulary = token_id_range(adapter, processor, cfg.teacher)
    if vocabulary["cached_ids_below"] < vocabulary["lm_head_rows"]:
        params["ids_below"] = vocabulary["cached_ids_below"]
    if cfg.iva_token_kl:
        if layer is None:
            raise ValueError("--iva-token-kl needs the teacher's saliency: drop --saliency-layer none")
        params.update(iva_token_kl=True, iva_token_ratio=cfg.iva_token_ratio)
    fingerprint = make_fingerprint(model.config, processor, params)
    if student_tpa:
        check_rollout(onp, fingerprint["tokenizer"]["hash"], cfg.tpa_branches, cfg.data)
    units = [[s, min(s + cfg.unit_size, len(records))] for s in range(0, len(records), cfg.unit_size)]
    plan = {"fingerprint": fingerprint, "units": units, "irs": irs,
            "data": str(cfg.data) if "://" in str(cfg.data) else str(Path(cfg.data).resolve()),
            "images": str(Path(cfg.images).resolve()) if cfg.images else "",
            "unit_ids": [[r.sample_id for r in records[s:e]] for s, e in units]}

    if not (out / MANIFEST_FILE).exists():
        # every rank of a tensor-parallel replica takes part in each forward: on rank 0 alone the others would wait
        dist.on_first_replica(env, lambda: warn_if_blind(adapter, processor, records, cfg.images, device, max_length,
                                                         cfg.teacher))

    def prepare() -> bool:
        _check_plan(out, plan)
        if (out / MANIFEST_FILE).exists():
            return True
        write_plan(out, plan)
        atomic_write_json(out / TOKENS_FILE, encode_token_bytes(token_bytes(processor.tokenizer)))
        atomic_write_json(out / SPECIALS_FILE, special_roles(processor.tokenizer, end_of_turn_ids(processor),
                                                             getattr(processor, "image_token", None)))
        stale = list((out / PARTS_DIR).glob("*.tmp*")) if (out / PARTS_DIR).exists() else []
        for p in stale + list(out.glob("*.json.tmp*")):  # a part or a json file interrupted mid-write
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        return False

    try:
        return _dump_units(cfg, env, out, plan, params, units, records, prepare, adapter, processor, device,
                           max_length, irs, layer, t_load, t_loaded, onp, vocabulary)
    except (OSError, torch.OutOfMemoryError, MemoryError) as e:
        problem = _resource_error(e, out, device, cfg.batch_size,
                                  len(units) - len(committed_parts(out)) if out.exists() else len(units))
        if problem is None:
            raise
        raise problem from None


def _dump_units(cfg: DumpConfig, env, out: Path, plan: dict, params: dict, units: list, records: list, prepare,
                adapter, processor, device, max_length, irs, layer, t_load: float, t_loaded: float,
                onp: RolloutColumns | None = None, vocabulary: dict | None = None) -> dict:
    """The plan written, this rank's uncommitted units dumped and committed, rank 0's manifest last. ``onp``: the
    data's on-policy columns (loss turns, the student's TPA candidates), None for ordinary data."""
    if dist.on_main(env, prepare):
        log.info("%s is already complete; nothing to do", out)
        return json.loads((out / MANIFEST_FILE).read_text())

    done = committed_parts(out)
    todo = dist.claim_units(env, len(units), done)  # a replica's ranks: the same units; its first rank writes
    if done:
        log.info("resuming: %d of %d work units already committed", len(done), len(units))
    if env.distributed:
        log.info("rank %d/%d (replica %d of %d, tensor-parallel rank %d of %d): %d work units to dump", env.rank,
                 env.world_size, env.replica, env.replicas, env.tp_rank, env.tp_size, len(todo))
    pad_id = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else 0
    t_loop = time.perf_counter()
    n_todo = sum(units[u][1] - units[u][0] for u in todo)
    resume = "; units already committed are kept: re-run the same command after fixing to resume"
    cands = ((lambda chunk: student_candidates(onp, chunk, cfg.tpa_branches))
             if params.get("tpa_candidates") == "student" else None)  # TPA after the student's candidates

    unit_encoder = UnitEncoder([units[u] for u in todo], records, processor, cfg.images, max_length,
                               cfg.saliency_query, cfg.skip_bad, adapter.image_token_id, onp)
    workers = encode_workers(cfg.encode_workers, device)
    # its worker processes fork at the first unit, before the writer thread exists; closed in the finally below
    units_in = encoded_units(unit_encoder, workers)
    # where the loop's time goes (manifest["timing"], not written): waiting for the encoding, in the teacher, waiting
    # for the writer (backpressure; after the last unit)
    waited = {"encode": 0.0, "teacher": 0.0, "write": 0.0, "last_write": 0.0}
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alignti-writer")
    pending: list[Future] = []
    lock = threading.Lock()
    try:
        with progress_bar("dump-teacher", total=n_todo, unit="samples", enabled=cfg.progress and env.is_main) as bar:
            for u in todo:
                s, e = units[u]
                part = PartWriter(out, u, params)
                t0 = time.perf_counter()
                encoded, skipped, err = next(units_in)
                waited["encode"] += time.perf_counter() - t0
                if err is not None:  # the unit's first bad sample (without --skip-bad), named as it always was
                    raise DataError(err.sample, err.problem, err.fix + resume) from None
                run = (lambda samples, advance=lambda n: None: _teacher_unit(
                    adapter, samples, cfg.batch_size, cfg.length_sorted_batches, pad_id, device, params, advance,
                    cands))
                try:
                    t0 = time.perf_counter()
                    jobs = run(encoded, bar.advance)
                    waited["teacher"] += time.perf_counter() - t0
                except (torch.OutOfMemoryError, MemoryError):
                    raise
                except Exception:  # noqa: BLE001 - a sample the model fails on is named; anything else re-raised
                    bad = _failing_samples(adapter, encoded, pad_id, device, params, cands)
                    if not bad or len(bad) == len(encoded):
                        raise
                    for enc, err in bad:
                        named = DataError(enc.sample_id, f"the teacher model fails on it ({type(err).__name__}: "
                                          f"{err})", "fix or drop the sample, or pass --skip-bad")
                        if not cfg.skip_bad:
                            raise DataError(named.sample, named.problem, named.fix + resume) from None
                        log.warning("%s", named)
                        skipped.append((enc.index, enc.sample_id, str(named), enc.image))
                    failed = {id(enc) for enc, _ in bad}
                    encoded = [x for x in encoded if id(x) not in failed]  # batched as if skipped before
                    jobs = run(encoded)
                bar.advance((e - s) - len(encoded))
                if not env.is_writer:
                    continue  # the replica's first rank holds the same results and writes them
                pending.append(writer.submit(_write_unit, part, jobs, skipped, lock, onp))
                t0 = time.perf_counter()
                while len(pending) > 2:  # backpressure: at most two units wait for the writer
                    pending.pop(0).result()
                waited["write"] += time.perf_counter() - t0
                for f in [f for f in pending if f.done()]:
                    f.result()  # surface writer errors early
        t0 = time.perf_counter()
        for f in pending:
            f.result()
        waited["last_write"] = time.perf_counter() - t0
    finally:
        units_in.close()
        writer.shutdown(wait=True)
    t_ranks = time.perf_counter()
    dist.barrier(env)  # every rank's units are committed

    def finish() -> dict:
        markers = committed_parts(out)
        missing = [u for u in range(len(units)) if u not in markers]
        if missing:
            raise CacheError(f"work units {missing[:5]} of {out} were not committed; re-run the same command")
        return write_manifest(out, plan, markers,
                              extra={"irs": irs, "saliency_layer": layer, "images": plan["images"],
                                     "vocabulary": vocabulary,
                                     "data": plan["data"], "dump_config": {k: v for k, v in asdict(cfg).items()
                                                                           if k != "progress"},
                                     **onpolicy_manifest(onp, params)})

    manifest = dist.on_main(env, finish)
    manifest["timing"] = {"load_s": t_loaded - t_load, "irs_s": t_loop - t_loaded if irs else 0.0,
                          "loop_s": t_ranks - t_loop, "wait_s": time.perf_counter() - t_ranks,
                          "encode_workers": workers, **{f"loop_{k}_s": v for k, v in waited.items()}}  # not written
    c = manifest["counts"]
    log.info("cache written to %s: %d samples (%d skipped), %d response tokens", out, c["samples"], c["skipped"],
             c["response_tokens"])
    return manifest


def _write_unit(part: PartWriter, jobs, skipped: list[tuple], lock, onp=None) -> None:
    """Writer thread: results to host, samples (and skips) into the part in dataset order, commit."""
    rows = {}
    for chunk, batch, res in jobs:
        for enc, arrays in zip(chunk, split_per_sample(res, batch)):
            rows[enc.index] = (enc, arrays)
    skips = {s[0]: s for s in skipped}
    for idx in sorted(set(rows) | set(skips)):
        if idx in skips:
            part.add_skipped(*skips[idx])
            continue
        enc, arrays = rows[idx]
        arrays["input_ids"] = enc.input_ids
        arrays["response_mask"] = enc.response_mask
        arrays["resp_char_start"] = enc.char_start[enc.response_mask.astype(bool)]
        meta = dict(sample_id=enc.sample_id, index=enc.index, image=enc.image, image_sha256=enc.image_sha256,
                    image_tok_start=enc.image_tok_start, n_image_tokens=enc.n_image_tokens,
                    instr_spans=[v for sp in enc.instr_spans for v in sp],
                    image_spans=[v for sp in enc.image_spans for v in sp],
                    resp_spans=[v for sp in enc.resp_spans for v in sp], n_turns=len(enc.resp_spans),
                    conversation=enc.conversation, resp_turns=list(enc.resp_turns),
                    image_grids=[v for g in enc.image_grids for v in g], image_tiles=list(enc.image_tiles))
        if onp is not None:
            meta.update(onp.provenance(enc.index), tpa_student_rows=int(arrays.get("tpa_student", np.zeros(0)).sum()))
        part.add(meta, arrays)
    with lock:
        part.commit()
