"""`alignti train-student`: train a student from a teacher cache. The teacher is never loaded.

AdamW with linear warm-up and cosine decay, gradient accumulation, bf16 autocast on GPU,
checkpoints every N steps (model, optimizer, scheduler, every RNG, data position) written
atomically; ``--resume`` continues bit-for-bit, or refuses naming what differs from the checkpoint's run
(run_identity). A step whose loss term or gradient norm is not finite stops the run before its update (NonFiniteStep,
naming the step, the term and the last good checkpoint) or, with ``--skip-nonfinite``, is skipped and logged.
Output: RUN/final/ (save_pretrained + processor, finite weights only) and RUN/metrics.jsonl (one line per
optimizer step, every loss term separately, each step once).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from alignti.common import distributed as dist
from alignti.common.adapters import adapter_for, check_images_per_sample
from alignti.common.cache import CacheReader, check_manifest
from alignti.common.errors import AlignTIError, CacheError
from alignti.common.faults import crash_point
from alignti.common.config import check_ranges, config_values, write_config
from alignti.common.records import image_refs
from alignti.common.fingerprint import (cache_identity, check_encoding, check_student, check_token_ids,
                                        model_identity)
from alignti.common.losses import (CROSS_TOKENIZER, IVA_FORMS, TPA_WEIGHTINGS, LossWeights, StepNorm,
                                   check_cross_tokenizer, get_loss, means, step_counts, temperature_bounds)
from alignti.common.models import check_loaded_weights, enable_gradient_checkpointing, fresh_parts, load_vlm
from alignti.common.saving import save_checkpoint
from alignti.common.progress import progress_bar

from . import parallel
from .step import StudentStep
from .trainable import apply_trainable, lora_settings, merge, save_adapter
from .tracking import Tracker, parse_report_to
from .cross import CrossDataset, CrossTokenizer, check_cross_cache
from .init_from import UnsafeCheckpoint, final_folder, load_init, read_training_state
from .data import (SHUFFLE_WINDOW, CacheDataset, StudentCollator, batch_to_device, epoch_sample_order, window_parts,
                   worker_init)
from . import mixture

log = logging.getLogger("alignti.train")

# settings --resume may change: where things are read from or written to, how fast and how visibly the run goes,
# and the gradient-checkpointing mode (the same gradients bit for bit, tests/test_step.py). Every other setting
# shapes the run and must match the checkpoint's, as must the cache's and the student's contents (not their
# paths: a moved cache or student resumes), the world size and the device kind (bf16 autocast on a GPU).
# --skip-nonfinite may be added to get a resumed run past a step that stopped it.
RESUME_MAY_CHANGE = ("student", "cache", "out", "resume", "device", "images", "data", "workers", "eval_every",
                     "progress", "report_to", "save_every", "gradient_checkpointing", "checkpoint_every",
                     "checkpoint_reentrant", "skip_nonfinite", "save_adapter")


@dataclass
class TrainConfig:
    """train-student's settings; every field but ``eval_every`` and ``progress`` is a flag and a config-file key."""
    student: str
    cache: str | list[str]  # one cache, or several: each micro-batch drawn from one of them by weight (mixture.py)
    out: str
    cache_weights: list[float] | None = None  # with several caches: their shares of the draws (None: by size)
    init: str | None = None  # start from an earlier run's weights (RUN/final, else RUN/checkpoint); fresh optimizer
    loss: str = "kd"
    kd_weight: float = 1.0
    iva_weight: float = 1.0
    tpa_weight: float = 1.0
    tpa_weighting: str = "teacher"  # TPA candidates weighed by the teacher's probabilities or the student's own
    iva_ratio: float = 0.25
    iva_form: str = "attention"  # IVA as attention alignment, or token-kl (KL of outputs at salient image tokens)
    temperature: float = 1.0
    # --temperature other than the cache's: temper the cached top-k + rest as it is, the rest bucket as one lump (an
    # approximation; refused without this, naming the range the cache allows: check_cache_temperature)
    approximate_temperature: bool = False
    student_layer: int | None = None
    max_steps: int | None = None
    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    save_every: int = 100
    resume: bool = False
    seed: int = 0
    device: str = "auto"
    images: str | None = None  # the dump's image folder, if moved since
    data: str | None = None  # the dump's data source, if moved since (embedded images are read from it)
    workers: int | None = None  # DataLoader workers; None: 4 on a GPU, 0 on CPU (bench/scale.py reader figures)
    eval_every: int = 0  # with an evaluator (python API): run it every N steps, logged as val_accuracy
    fsdp: bool = False   # under torchrun: FSDP2 (fully_shard per decoder layer) instead of DDP
    freeze_vision: bool = False  # keep the vision encoder fixed (LLaVA recipes' usual choice); projector and LM train
    trainable: str | None = None  # all | projector | lm | vision (comma-separated) | none | a regex (trainable.py);
    # None: all, with LoRA none (the adapters alone)
    lora_r: int | None = None  # LoRA rank through peft (None: no LoRA); the LM's linear layers unless lora_targets
    lora_alpha: float | None = None  # LoRA's scale numerator (update scaled by alpha / r); None: 2 r
    lora_targets: str | None = None  # module names (comma-separated, suffix match) or a regex (full match)
    lora_dropout: float = 0.0
    save_adapter: bool = False  # with LoRA: also RUN/adapter (peft's save_pretrained) beside the merged RUN/final
    gradient_checkpointing: bool = False  # recompute decoder / vision layers in backward (common.models)
    checkpoint_every: int = 1  # checkpoint every N-th layer of each stack (2: about half the memory saving, less time)
    checkpoint_reentrant: bool = False  # reentrant checkpoints (no autograd graph in the forward; not with FSDP)
    group_by_length: bool = True  # batches of similar length inside shuffled mega-batches (data.length_grouped)
    shuffle_window: int = SHUFFLE_WINDOW  # samples shuffled together, whole parts at a time (data.epoch_order)
    report_to: list[str] = field(default_factory=lambda: ["none"])  # none, tensorboard, wandb (student_train.tracking)
    skip_nonfinite: bool = False  # a step with a non-finite loss term or gradient norm is skipped (logged), not fatal
    # uld | gold | alm: a student whose tokenizer or processor differs from the teacher's encodes every sample itself
    # and the KD term aligns the two by text (student_train/cross.py, common/token_align.py); None: same tokenizer
    cross_tokenizer: str | None = None
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.cache, (list, tuple)):  # --cache given once (or a one-item YAML list) is one cache
            self.cache = self.cache[0] if len(self.cache) == 1 else list(self.cache)
        if isinstance(self.cache_weights, (list, tuple)):  # an unrepeated flag's [] is no weights
            self.cache_weights = list(self.cache_weights) or None


class NonFiniteStep(AlignTIError):
    """A loss term or the gradient norm of an optimizer step is NaN or infinite: the run stops before applying it."""


class CheckpointError(AlignTIError):
    """The run directory's checkpoint is missing, damaged, or was made by a run with other settings."""


# metrics.jsonl fields that measure the machine, not the training (they differ between identical runs)
MEASURED = ("sec", "tokens_per_s", "peak_mem_gib", "peak_rss_gib")
CONFIG_KEYS = tuple(f.name for f in fields(TrainConfig) if f.name not in ("eval_every", "progress"))


def student_layer_for(cfg_layer: int | None, teacher_layer: int | None, teacher_layers: int, student_layers: int,
                      allowed: list[int] | None = None) -> int:
    """The student layer whose saliency IVA aligns: ``--student-layer``, else the teacher's layer at the same relative
    depth, moved to the nearest of ``allowed`` (the student adapter's ``saliency_layers()``: Gemma 3's global
    layers; None: any). ValueError for a layer outside the student or not allowed, or no allowed layer at all."""
    if allowed is not None and not allowed:
        raise ValueError("the student has no full-attention layer for IVA's saliency (every kept layer is a "
                         "sliding-window, linear-attention or convolution one): keep one (make-student --keep-layers), or train without IVA (--loss kd "
                         "or kd+tpa)")
    if cfg_layer is not None:
        if not 0 <= cfg_layer < student_layers:
            raise ValueError(f"--student-layer {cfg_layer} is outside the student's {student_layers} layers (0-"
                             f"{student_layers - 1})" + (f": name one of its full-attention layers {allowed}"
                                                         if allowed is not None else ""))
        if allowed is not None and cfg_layer not in allowed:
            raise ValueError(f"--student-layer {cfg_layer} is not a full-attention layer of the student (a sliding-window, "
                             "linear-attention or convolution one): name one of its "
                             f"full-attention layers {allowed}")
        return cfg_layer
    layer = min(student_layers - 1, max(0, round(teacher_layer / teacher_layers * student_layers)))
    return layer if allowed is None else min(allowed, key=lambda a: (abs(a - layer), a))


TEMPERATURE_PROBE_TOKENS = 4096  # response tokens the refusal's range is measured on (the cache's first samples)


def check_cache_temperature(readers: list, urls: list[str], temperature: float, approximate: bool) -> float:
    """The temperature the caches hold the teacher at (dump-teacher --temperature; 1 for a cache that records
    none), which train-student's ``--temperature`` must equal: a top-k + rest cache cannot be re-tempered exactly
    (the rest bucket's members are not cached). Otherwise raises ValueError naming the range the teacher's rest mass
    can take at ``temperature`` on the cache's first tokens (common.losses.temperature_bounds), what the one-lump
    approximation gives there, and the ways out; with ``approximate`` (--approximate-temperature) it warns and
    training tempers the cached distribution as one lump. Caches at different temperatures are refused."""
    temps = [float(r.params.get("temperature", 1.0)) for r in readers]
    if len(set(temps)) > 1:
        raise ValueError("the caches hold the teacher at different temperatures ("
                         + ", ".join(f"{u}: {t:g}" for u, t in zip(urls, temps))
                         + "): train from caches dumped at one --temperature")
    cached = temps[0]
    if math.isclose(temperature, cached, rel_tol=1e-9):
        return cached
    reader, url = readers[0], urls[0]
    vocab = (reader.manifest.get("vocabulary") or {}).get("lm_head_rows") or reader.fingerprint["tokenizer"]["vocab_size"]
    widest, seen = None, 0
    for i in range(len(reader)):
        x = reader[i]
        lp = torch.from_numpy(np.asarray(x["topk_logprobs"], np.float64))
        if not len(lp):
            continue
        lo, hi, lump = temperature_bounds(lp, torch.from_numpy(np.asarray(x["tail_logmass"], np.float64)),
                                          vocab - lp.shape[-1], temperature, cached)
        j = int((hi - lo).argmax())
        if widest is None or float(hi[j] - lo[j]) > widest[1] - widest[0]:
            widest = (float(lo[j]), float(hi[j]), float(lump[j]), x["sample_id"], j)
        seen += len(lp)
        if seen >= TEMPERATURE_PROBE_TOKENS:
            break
    where = ("" if widest is None else
             f" At response token {widest[4]} of sample {widest[3]} the teacher's rest mass at temperature "
             f"{temperature:g} can be anywhere from {widest[0]:.3f} to {widest[1]:.3f} (the most the cache's "
             f"top-{reader.params.get('top_k')} and rest mass allow over a vocabulary of {vocab}); tempering the "
             f"rest bucket as one lump gives {widest[2]:.3f}.")
    default = " (dump-teacher's default)" if cached == 1.0 else ""
    text = (f"--temperature {temperature:g}, but the cache at {url} holds the teacher at temperature {cached:g}"
            f"{default} (its top-k log-probs and one rest bucket): the tempered teacher is not in it.{where}")
    if not approximate:
        at_cached = (f"train at --temperature {cached:g}" if cached != 1.0 else
                     "train at --temperature 1 (train-student's default: leave --temperature out)")
        raise ValueError(f"{text} Re-dump the cache at that temperature (dump-teacher --temperature {temperature:g}), "
                         f"{at_cached}, or pass --approximate-temperature to temper the cached "
                         f"distribution with its rest bucket as one lump")
    log.warning("%s --approximate-temperature: the cached distribution is tempered by %g with its rest bucket as one "
                "lump", text, temperature / cached)
    return cached


def accumulate_step(step_module, micro: list[dict], env, device, autocast, mix=None) -> tuple[dict, dict]:
    """Forward + backward of one optimizer step's micro-batches (gradients accumulate in .grad). One
    normalisation over the whole step: every micro-batch's terms are sums divided by the step's counts over
    all its micro-batches and ranks (transformers' num_items_in_batch), so the gradient does not depend on
    how samples fall into micro-batches and ranks. Returns (the step's counts, this rank's term sums).
    ``mix`` (several caches, a ``mixture.StepStats``): counts and sums also per source (``kd/cache1``)."""
    counts = parallel.sum_counts_over_ranks(env, [mix.counts(b) if mix else step_counts(b) for b in micro], device)
    norm = StepNorm.from_counts(mix.norm_counts(counts) if mix else counts, env.world_size)
    sums: dict[str, float] = mix.empty() if mix else {}
    for batch in micro:
        batch = batch_to_device(batch, device)
        with autocast:
            res = step_module(batch, norm)
        res["loss"].backward()
        if mix:
            mix.add(sums, batch["source"], res["sums"])
            continue
        for k, v in res["sums"].items():
            sums[k] = sums.get(k, 0.0) + float(v)
    return counts, sums


def tpa_coverage(micro: list[dict]) -> float | None:
    """Across tokenizers: of this rank's step's cached TPA rows, the share whose position is one token for the same
    text on both sides with candidates that all map (student_train/cross.py); None on the same-tokenizer path."""
    kept = [b["xt_tpa_kept"] for b in micro if "xt_tpa_kept" in b]
    return round(sum(a for a, _ in kept) / max(sum(n for _, n in kept), 1), 4) if kept else None


GPU_WORKERS = 4  # H200 box: 4 workers feed 145 samples/s at 640x480 -> 336 px, 7.7x an 0.5B student's alignti step


def default_workers(workers: int | None, device: torch.device) -> int:
    """--workers unset: 4 DataLoader workers when training on a GPU (image decoding and preprocessing then keep
    well ahead of the step), 0 on CPU (where workers compete with the step for the same cores)."""
    if workers is not None:
        return workers
    return GPU_WORKERS if device.type == "cuda" else 0


def _rng_state() -> dict:
    """Every RNG's state in types a checkpoint loads with ``torch.load(weights_only=True)``: tensors, ints, floats,
    strings, tuples (numpy's MT19937 key array as an int64 tensor; init_from.read_training_state)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train_student(cfg: TrainConfig, stop_after: int | None = None, evaluator=None) -> dict:
    """Train; ``stop_after`` (tests) simulates a crash after that many optimizer steps;
    ``evaluator(model, processor) -> float`` is called every ``cfg.eval_every`` steps."""
    check_ranges("train-student", cfg)  # every numeric setting in its range, before anything loads
    out = Path(cfg.out)
    if cfg.gradient_checkpointing and cfg.checkpoint_reentrant and cfg.fsdp:
        raise ValueError("--checkpoint-reentrant does not go with --fsdp (FSDP2 re-gathers parameters in hooks that "
                         "a reentrant recompute bypasses): drop --checkpoint-reentrant, the default checkpoints work "
                         "with FSDP")
    parse_report_to(cfg.report_to)
    if cfg.iva_form not in IVA_FORMS:
        raise ValueError(f"--iva-form must be one of {', '.join(IVA_FORMS)}, not '{cfg.iva_form}'")
    if cfg.cross_tokenizer is not None and cfg.cross_tokenizer not in CROSS_TOKENIZER:
        raise ValueError(f"--cross-tokenizer must be one of {', '.join(CROSS_TOKENIZER)}, not '{cfg.cross_tokenizer}'")
    if cfg.tpa_weighting not in TPA_WEIGHTINGS:
        raise ValueError(f"--tpa-weighting must be one of {', '.join(TPA_WEIGHTINGS)}, not '{cfg.tpa_weighting}'")
    lora = lora_settings(cfg.lora_r, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout)
    if cfg.save_adapter and lora is None:
        raise ValueError("--save-adapter saves LoRA adapters, but LoRA is off: add --lora-r R or drop --save-adapter")
    env = dist.dist_env()
    device = dist.device_for(cfg.device, env)
    dist.init(env, device)
    if env.distributed and evaluator is not None:
        raise ValueError("the in-training evaluator runs in single-process training only")
    spec = get_loss(cfg.loss)
    caches = mixture.cache_list(cfg.cache)
    cfg = replace(cfg, cache_weights=mixture.parse_cache_weights(cfg.cache_weights, len(caches)))
    readers = [CacheReader(c) for c in caches]
    for reader, url in zip(readers, caches):
        check_manifest(reader)
        if len(reader) == 0:
            raise CacheError(f"the cache at {url} has no usable samples")
    for r in readers:  # a shuffle window's parts stay decoded: each part is read once per epoch
        r.keep_parts(window_parts(r, cfg.shuffle_window))
    reader = readers[0]
    params = reader.params
    sources = [mixture.Source.of(i, url, r) for i, (url, r) in enumerate(zip(caches, readers))] if len(caches) > 1 else []
    if sources:  # several caches: one tokenizer and processor; each loss term fed by at least one of them
        mixture.check_same_tokenizer(readers, caches)
        params = mixture.merged_params(sources)
    mixture.check_sources(spec, cfg.iva_form, sources or [mixture.Source.of(0, caches[0], reader)])
    cache_temperature = check_cache_temperature(readers, caches, cfg.temperature, cfg.approximate_temperature)
    if cfg.cross_tokenizer:
        check_cross_tokenizer(spec, LossWeights(cross_tokenizer=cfg.cross_tokenizer))  # rkl / jsd: refused here
        if sources:
            raise ValueError("--cross-tokenizer takes one --cache (a mixture of caches across tokenizers is not "
                             "supported): pass one cache")
        if spec.iva and cfg.iva_form == "token-kl":
            raise ValueError("--iva-form token-kl reads the teacher's outputs at its own image tokens, which a "
                             "student with another processor does not have: use --iva-form attention with "
                             "--cross-tokenizer")
        teacher_tokens = check_cross_cache(reader, caches[0])  # refused before the student loads; read once

    # fp32 master weights on every device; on GPU the forward runs under bf16 autocast (a bf16-loaded
    # student would take its AdamW updates in bf16: found by tests/test_gpu.py on an H100)
    model, processor = load_vlm(cfg.student, device, "float32")
    fresh = [] if cfg.init else fresh_parts(cfg.student)  # --init replaces every weight (strictly, below)
    if not cfg.init:
        check_loaded_weights(model, cfg.student, "student", fresh)
    cross = None
    if cfg.cross_tokenizer:  # the student encodes every sample itself: its own tokenizer and processor may differ
        cross = CrossTokenizer(reader, processor, caches[0], iva=spec.iva, tpa=spec.tpa,
                               teacher_tokens=teacher_tokens)
        cross.preflight(reader)  # a sample whose text the student's template rewrites is named before any step
    else:
        check_student(reader.fingerprint, processor, cfg.student)
        for r, url in zip(readers, caches):
            check_encoding(r.params, processor, url, r.manifest.get("schema_version"))
            check_token_ids(r, int(model.get_output_embeddings().weight.shape[0]), cfg.student)
    check_savable(model, cfg.student)  # before any step: a run that cannot save its result must not train
    adapter = adapter_for(model)
    multi = next(((n, x["sample_id"]) for r in readers for x in r.samples if (n := len(image_refs(x["image"]))) > 1),
                 None)
    if multi is not None:  # a multi-image cache for a student family that takes one image per sample
        check_images_per_sample(adapter, multi[1], multi[0])
    if sources:
        mixture.check_student_layers(sources, cfg.student_layer, adapter.num_layers, student_layer_for)
    layer = student_layer_for(cfg.student_layer, params.get("saliency_layer") or 0, params.get("teacher_layers", 1),
                              adapter.num_layers, adapter.saliency_layers() if spec.iva else None)
    if cfg.init:
        load_init(model, cfg.init)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cross is not None:
        datasets = [CrossDataset(reader, processor, cross, cfg.images, data=cfg.data)]
    else:
        datasets = [CacheDataset(r, processor, cfg.images, data=cfg.data) for r in readers]
    dataset = datasets[0]
    collator = StudentCollator(processor, type(adapter), cross)
    micro_per_epoch = parallel.batches_per_rank(len(dataset), cfg.batch_size, env)
    weights = LossWeights(cfg.kd_weight, cfg.iva_weight, cfg.tpa_weight, cfg.temperature,
                          cache_temperature=cache_temperature, iva_ratio=cfg.iva_ratio, tpa_weighting=cfg.tpa_weighting,
                          iva_form=cfg.iva_form, cross_tokenizer=cfg.cross_tokenizer,
                          router_aux=adapter.router_aux_coef)  # a MoE student's load-balancing loss, logged
    if not sources and spec.tpa and mixture.tpa_candidates(reader) == "student" and cfg.tpa_weighting != "student":
        # the paper's TPA: the student's sampled alternatives, weighed by the student (the teacher's top-k need not
        # hold them); several caches do the same per batch (mixture.batch_spec)
        log.info("the cache's TPA candidates are a student's (alignti rollout): TPA weighs them by the student's own "
                 "probabilities")
        weights = replace(weights, tpa_weighting="student")
    schedule = mix = None
    if sources:  # each micro-batch from one cache, drawn by weight (mixture.py: the stream, epochs, normalisation)
        dataset = mixture.MixedDataset(datasets)
        collator = mixture.MixedCollator(collator, sources)
        shares = cfg.cache_weights or [len(r) / len(dataset) for r in readers]
        schedule = mixture.MixtureSchedule(sources, shares, cfg.batch_size, cfg.seed, cfg.group_by_length,
                                           dataset.offsets, cfg.shuffle_window)
        micro_per_epoch = schedule.epoch_draws(env.world_size, cfg.grad_accum) // env.world_size
        mix = mixture.StepStats(sources, spec, weights)
        log.info("%d caches, drawn per micro-batch with shares %s", len(sources), ", ".join(f"{w:.3f}" for w in shares))
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch

    # --trainable / --freeze-vision / LoRA: requires_grad set (and the adapters added) before DDP / FSDP2 wrap, which
    # take the trainable set as it is then; the optimizer below holds the trainable parameters only
    peft_model = apply_trainable(model, adapter, cfg.trainable, cfg.freeze_vision, lora)
    check_fresh_parts_train(model, fresh, cfg.student)
    # FSDP2 swaps the parameters for sharded DTensors: wrap first, then build the optimizer over them
    if cfg.gradient_checkpointing:
        # each recompute runs under the capture / attention settings of its forward and reuses its bf16 weight
        # casts, except under FSDP2 (it frees each layer's unsharded weights after the forward: no copies kept)
        enable_gradient_checkpointing(model, reentrant=cfg.checkpoint_reentrant, every_n_layers=cfg.checkpoint_every,
                                      reuse_casts=not cfg.fsdp)
    step_module = parallel.wrap(StudentStep(model, adapter, spec, layer, weights), env, device, cfg.fsdp,
                                static_graph=cfg.gradient_checkpointing and cfg.checkpoint_reentrant)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and p.requires_grad]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 and p.requires_grad]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)

    def lr_lambda(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    run_info = run_identity(cfg, env.world_size, device, [r.manifest for r in readers],
                            model_identity(model.config, processor))
    step, epoch, position = 0, 0, 0
    ckpt = out / "checkpoint" / "state.pt"
    metrics_path = out / "metrics.jsonl"
    last_good = None  # the step of the newest checkpoint on disk (what a stopped run names)
    if cfg.resume:
        state = _load_checkpoint(ckpt, out, metrics_path, cfg.save_every)
        _check_resume(state.get("run") or {}, run_info, out)
        try:
            if env.distributed:
                parallel.load_full_state(step_module, opt, state["model"], state["optimizer"])
                _set_rng_state(state["rng"][env.rank])
            else:
                model.load_state_dict(state["model"])
                opt.load_state_dict(state["optimizer"])
                _set_rng_state(state["rng"])
            sched.load_state_dict(state["scheduler"])
            step, epoch, position = state["step"], state["epoch"], state["position"]
        except (KeyError, IndexError, ValueError, RuntimeError) as e:
            raise CheckpointError(_damaged(ckpt, out, f"{type(e).__name__}: {e}")) from None
        last_good = step
        if env.is_main:
            _truncate_metrics(metrics_path, step)
        log.info("resumed from step %d (epoch %d, batch %d)", step, epoch, position)
    elif out.exists() and ckpt.exists():
        raise AlignTIError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    elif metrics_path.exists():
        # a run that stopped before its first checkpoint: nothing to continue, its metric lines are dropped
        # so that the new run's steps are not appended after them (no step twice)
        if (out / "final").exists():
            raise AlignTIError(f"{out} already holds a finished run (final/); choose another --out")
        if env.is_main:
            n = _truncate_metrics(metrics_path, 0)
            shutil.rmtree(out / "tensorboard", ignore_errors=True)  # the trackers start over with it
            (out / "wandb_run_id").unlink(missing_ok=True)
            log.warning("%s held %d metric line(s) of a run stopped before its first checkpoint: starting over", out, n)
    dist.barrier(env)  # every rank has checked the run directory before rank 0 writes into it
    resolved = config_values(cfg, CONFIG_KEYS)  # what config.yaml and the trackers record
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").write_text(json.dumps({**asdict(cfg), "student_layer_used": layer, "total_steps": total_steps,
                                                  "world_size": env.world_size,
                                                  "backend": torch.distributed.get_backend() if env.distributed else None},
                                                 indent=2))
        write_config(out / "config.yaml", resolved,
                     header=f"alignti train-student, as run (world size {env.world_size}): `alignti train-student "
                            "--config THIS_FILE` runs it again (add --out NEW for a fresh run directory)")

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    workers = default_workers(cfg.workers, device)
    model.train()
    log.info("training %s with loss '%s' for %d steps (%d samples, batch %d x accum %d x %d processes%s), "
             "student layer %d", cfg.student, cfg.loss, total_steps, len(dataset), cfg.batch_size, cfg.grad_accum,
             env.world_size, ", FSDP2" if cfg.fsdp and env.distributed else "", layer)
    last: dict = {}
    with progress_bar("train-student", total=total_steps, unit="steps", enabled=cfg.progress and env.is_main) as bar, \
            open(metrics_path if env.is_main else os.devnull, "a") as metrics, \
            Tracker(cfg.report_to, out, resolved, start_step=step, enabled=env.is_main) as tracker:
        bar.advance(step)
        while step < total_steps:
            order = (schedule.rank_batches(epoch, env, cfg.grad_accum) if schedule else
                     parallel.rank_batches(epoch_sample_order(reader, epoch, cfg.seed, cfg.batch_size,
                                                               cfg.group_by_length, cfg.shuffle_window),
                                           cfg.batch_size, env))
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=order[position:], collate_fn=collator,
                                                 num_workers=workers,
                                                 multiprocessing_context="spawn" if workers else None,
                                                 worker_init_fn=worker_init if workers else None,
                                                 # its own generator: a loader takes its base seed from the global
                                                 # RNG when it starts iterating, which a resumed run does mid-epoch,
                                                 # shifting every later draw of the model's dropout
                                                 generator=torch.Generator().manual_seed(cfg.seed + epoch))
            micro: list[dict] = []
            t0 = time.perf_counter()
            for batch in loader:
                micro.append(batch)
                position += 1
                end_of_epoch = position >= len(order)
                if len(micro) < cfg.grad_accum and not end_of_epoch:
                    continue
                counts, sums = accumulate_step(step_module, micro, env, device, autocast, mix)
                tpa_cov = tpa_coverage(micro)  # cross-tokenizer TPA: the share of the cache's TPA rows that carry over
                n_tok = int(counts["tokens"])
                micro = []
                grad_norm = torch.nn.utils.clip_grad_norm_(step_module.parameters(), cfg.max_grad_norm)
                if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
                    grad_norm = grad_norm.full_tensor()
                # the terms summed over ranks and the (all-reduced) gradient norm: every rank sees the same values,
                # so every rank takes the same decision below
                sums = parallel.sum_over_ranks_dict(env, sums, device)
                terms = mix.means(sums, counts) if mix else means(sums, counts, weights)
                bad = nonfinite(terms, float(grad_norm))
                if bad and not cfg.skip_nonfinite:
                    opt.zero_grad(set_to_none=True)
                    raise NonFiniteStep(_nonfinite_message(step + 1, bad, ckpt, last_good, cfg.save_every, out))
                if bad:  # --skip-nonfinite: the update is dropped, the step (and its data) counted, the skip logged
                    log.warning("step %d: skipped, non-finite %s (--skip-nonfinite)", step + 1, _what(bad))
                else:
                    opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                crash_point("train-step")
                sec = time.perf_counter() - t0
                if bad:
                    last = {"step": step, "epoch": epoch, "skipped": f"non-finite {_what(bad)}",
                            "lr": sched.get_last_lr()[0], "tokens": n_tok, "sec": round(sec, 4)}
                else:
                    last = {"step": step, "epoch": epoch, **{k: round(v, 6) for k, v in terms.items()},
                            "grad_norm": round(float(grad_norm), 6), "lr": sched.get_last_lr()[0],
                            "tokens": n_tok, "sec": round(sec, 4), "tokens_per_s": round(n_tok / max(sec, 1e-9), 1)}
                if tpa_cov is not None:
                    last["tpa_xt_coverage"] = tpa_cov
                if device.type == "cuda":
                    last["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3)
                else:  # the process's peak resident memory
                    last["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3)
                if evaluator is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == total_steps):
                    model.eval()
                    last["val_accuracy"] = float(evaluator(model, processor))
                    model.train()
                metrics.write(json.dumps(last) + "\n")
                metrics.flush()
                tracker.log(last, step)
                bar.advance(1)
                bar.update(**{k: v for k, v in terms.items() if "/" not in k})
                t0 = time.perf_counter()
                if end_of_epoch:
                    epoch, position = epoch + 1, 0
                if step % cfg.save_every == 0 or step == total_steps:
                    _save_checkpoint(ckpt, env, step_module, model, opt, sched, run_info, step, epoch, position)
                    last_good = step
                if step >= total_steps or (stop_after is not None and step >= stop_after):
                    break
            else:
                if position >= len(order):
                    epoch, position = epoch + 1, 0
                continue
            break
    if stop_after is not None and step < total_steps:
        return {"stopped_at": step}
    if not last and step >= total_steps:  # --resume of a run that had already finished: report its last step
        last = _last_metrics(metrics_path)
        log.info("%s: the run had already finished (step %d of %d); its last metrics are reported, nothing trained",
                 out, step, total_steps)
    final = out / "final"
    broken = [n for names in dist.all_gather(env, nonfinite_parameters(step_module)) for n in names]
    if broken:  # the guard keeps non-finite updates out; a finite update can still overflow a weight
        raise NonFiniteStep(f"after step {step}: {len(broken)} weight tensor(s) of the student are not finite "
                            f"({', '.join(sorted(set(broken))[:3])}); nothing was saved as {final}. "
                            + _last_good_text(ckpt, last_good, cfg.save_every) + ".")
    if env.distributed:
        full, _ = parallel.full_state(step_module, opt)
        if env.is_main:
            plain, _ = load_vlm(cfg.student, torch.device("cpu"))
            plain_peft = apply_trainable(plain, adapter_for(plain), cfg.trainable, cfg.freeze_vision, lora)
            plain.load_state_dict(parallel.plain_model_state(full))
            _save_final(plain, plain_peft, processor, out, cfg.save_adapter, _adapter_base(cfg))
        dist.barrier(env)
    else:
        _save_final(model, peft_model, processor, out, cfg.save_adapter, _adapter_base(cfg))
    log.info("student saved to %s", final)
    return {"steps": step, "final": str(final), "last": last, "student_layer": layer}


def _adapter_base(cfg) -> str:
    """The weights a LoRA run's adapters apply to: --init's final/ when it has one, else the --student."""
    final = final_folder(cfg.init) if cfg.init else None
    return str(final) if final is not None else str(cfg.student)


def _save_final(model, peft_model, processor, out: Path, adapter: bool, base: str = "") -> None:
    """RUN/final: save_pretrained with the complete processor (plain AutoProcessor loads it); with LoRA the merged
    model (plain transformers loads it without peft) and, with ``adapter``, peft's adapter folder RUN/adapter first
    (the merge changes the model in place)."""
    if peft_model is not None:
        if adapter:
            save_adapter(peft_model, out / "adapter", base)
            log.info("LoRA adapter saved to %s", out / "adapter")
        model = merge(peft_model)
    save_checkpoint(model, processor, out / "final")


def check_fresh_parts_train(model, fresh: list[str], student: str) -> None:
    """The parts a student folder names as fresh (make-student's projector: common.models.fresh_parts) start from
    their initialisation: they must train. Logs them; raises AlignTIError when --trainable, --freeze-vision or LoRA
    leave one of them frozen (it would stay random and be saved so)."""
    for part in fresh:
        params = [(n, p) for n, p in model.named_parameters() if n.startswith(part + ".") or f".{part}." in n]
        if params and not any(p.requires_grad for _, p in params):
            raise AlignTIError(f"the student {student} was composed by make-student with a fresh (untrained) {part}, "
                               f"but the --trainable / --freeze-vision / LoRA settings freeze it, so it would stay "
                               f"at its random initialisation: let it train (e.g. --trainable projector, or "
                               f"projector,lm)")
        if params:
            log.info("the student's %s is fresh from make-student (%s): it trains from its initialisation", part,
                     student)


def check_savable(model, student: str) -> None:
    """Refuse, before the first step, a student that ``save_pretrained`` would refuse after the last one.

    transformers refuses to save a model whose quantizer is not serializable (``hf_quantizer.is_serializable``):
    e.g. a student loaded from a folder whose config.json still carries ``quantization_config`` with
    ``quant_method: gguf`` (a model dequantised from a GGUF file, saved, then pruned). The config must also turn
    into JSON. Raises AlignTIError naming the reason and the fix."""
    quantizer = getattr(model, "hf_quantizer", None)
    serializable = quantizer is None or getattr(model, "_hf_peft_config_loaded", False)
    if not serializable:  # the condition of transformers' save_pretrained (modeling_utils, transformers 5.x)
        test = getattr(quantizer, "is_serializable", None)
        serializable = bool(test()) if callable(test) else bool(test)
    if not serializable:
        method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", "?")
        method = getattr(method, "value", method)
        raise AlignTIError(
            f"the student {student} would not save after training, so it is refused before the first step: it is "
            f"quantised with '{method}', which transformers cannot save (save_pretrained refuses it). Its weights "
            "are already plain floats if it came from a GGUF file: drop the entry and save it once, e.g. `m = "
            "AutoModel...from_pretrained(S); m.hf_quantizer = None; del m.config.quantization_config; "
            "m.save_pretrained(S2)`, and train --student S2")
    try:
        model.config.to_json_string()
    except (TypeError, ValueError) as e:
        raise AlignTIError(f"the student {student} would not save after training (refused before the first step): "
                           f"its config does not turn into JSON ({e}); fix config.json and run again") from None


def _last_metrics(path: Path) -> dict:
    """The last step's line of metrics.jsonl, marked ``already_finished`` (empty when there is none)."""
    lines = [x for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    return {**json.loads(lines[-1]), "already_finished": True} if lines else {"already_finished": True}


def _save_checkpoint(path: Path, env, step_module, model, opt, sched, run_info, step, epoch, position) -> None:
    """Single process: the model's own state. Under torchrun: the full (unsharded) state gathered on rank 0
    and every rank's RNG state, written by rank 0; resume needs the same world size."""
    if env.distributed:
        model_sd, optim_sd = parallel.full_state(step_module, opt)
        rng = dist.all_gather(env, _rng_state())
        if not env.is_main:
            dist.barrier(env)
            return
    else:
        model_sd, optim_sd, rng = model.state_dict(), opt.state_dict(), _rng_state()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model_sd, "optimizer": optim_sd, "scheduler": sched.state_dict(), "rng": rng,
                "run": run_info, "step": step, "epoch": epoch, "position": position}, tmp)
    os.replace(tmp, path)
    dist.barrier(env)


def _truncate_metrics(path: Path, step: int) -> int:
    """Drop metric lines past the checkpoint (and a line cut short by a kill) so a resumed run neither repeats nor
    loses a step; returns how many lines were dropped. Written atomically."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for ln in path.read_text().splitlines():
        if not ln.strip():
            continue
        try:
            line_step = json.loads(ln)["step"]
        except (ValueError, KeyError, TypeError):
            line_step = None  # half a line, written as the process was killed
        if line_step is not None and line_step <= step:
            kept.append(ln)
        else:
            dropped += 1
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in kept))
    os.replace(tmp, path)
    return dropped


def run_identity(cfg: TrainConfig, world_size: int, device: torch.device, manifests: list[dict],
                 student_id: str) -> dict:
    """What a checkpoint records of the run that wrote it, for --resume to compare: every setting but those in
    RESUME_MAY_CHANGE (``--cache-weights`` and ``--init`` included), the world size, the device kind, and the
    contents of the cache(s) (one id, or a list in ``--cache`` order) and of the student (their ids, see
    common.fingerprint)."""
    run = {k: v for k, v in asdict(cfg).items() if k not in RESUME_MAY_CHANGE}
    caches = [cache_identity(m) for m in manifests]
    run.update(world_size=world_size, device_type=device.type, cache_content=caches[0] if len(caches) == 1 else caches,
               student_content=student_id)
    return json.loads(json.dumps(run, default=str))  # as a checkpoint holds it (tuples as lists)


# a setting added with a default that changes what an older run did: a checkpoint without it ran as this value
BEHAVIOUR_BEFORE = {"shuffle_window": 0}
BEHAVIOUR_BEFORE_WHY = {"shuffle_window": "the checkpoint was written before train-student shuffled samples across "
                                          "parts"}

_DESCRIBE = {"cache_content": "another cache (different data, teacher or dump settings) than the checkpoint's",
             "student_content": "another student (architecture, tokenizer or processor) than the checkpoint's",
             "device_type": "another kind of device"}


def _check_resume(saved: dict, now: dict, out: Path) -> None:
    """Refuse a resume whose settings or inputs differ from the checkpoint's, naming each difference. A setting
    added to alignti since the checkpoint was written counts as its default then, or, where that default changed what
    older runs did, as ``BEHAVIOUR_BEFORE`` says (the message then names the flag that resumes it); an identity the
    checkpoint did not record yet (older alignti) is not compared."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    diff = []
    for k, v in now.items():
        if k in saved:
            old = saved[k]
        elif k in BEHAVIOUR_BEFORE:
            old = BEHAVIOUR_BEFORE[k]
        elif k in defaults:
            old = defaults[k]
        else:
            continue
        if old == v:
            continue
        if k in _DESCRIBE:
            diff.append(f"{k}: {_DESCRIBE[k]} ({old} then, {v} now)")
            continue
        d = f"{k}: {old!r} then, {v!r} now"
        if k in BEHAVIOUR_BEFORE and k not in saved:
            d += f" ({BEHAVIOUR_BEFORE_WHY[k]}: resume with --{k.replace('_', '-')} {old})"
        diff.append(d)
    if diff:
        longer = ""
        if any(d.split(":")[0] in ("max_steps", "epochs") for d in diff):
            longer = (f". To train beyond the run's own --max-steps / --epochs (its learning-rate schedule ends there), "
                      f"start a new run from its weights: --init {out} --out NEW (a fresh optimizer and schedule)")
        raise CheckpointError(f"--resume: the checkpoint in {out} was made with different settings ("
                              + ", ".join(d.split(":")[0] for d in diff) + "): " + "; ".join(diff)
                              + f". Resume with the run's own settings ({out / 'config.yaml'}: `alignti train-student "
                              "--config` it with --resume), or start a new run with another --out" + longer)


def _damaged(ckpt: Path, out: Path, why: str) -> str:
    return (f"--resume: the checkpoint {ckpt} is damaged and cannot be read ({why}). alignti keeps one checkpoint per "
            f"run, so there is no earlier one to fall back on: start over (delete {out} or choose another --out); "
            f"a copy of the run directory made earlier holds an earlier checkpoint")


def _load_checkpoint(ckpt: Path, out: Path, metrics_path: Path, save_every: int) -> dict:
    """The checkpoint --resume continues from; a missing or damaged one is named with what to do (CheckpointError)."""
    if not ckpt.exists():
        done = 0
        if metrics_path.exists():
            done = sum(1 for ln in metrics_path.read_text().splitlines() if ln.strip())
        when = (f"it stopped after {done} step(s), before its first checkpoint at step {save_every}" if done
                else "nothing was trained there yet")
        raise CheckpointError(f"--resume: no checkpoint in {out} ({when}); drop --resume to start over")
    try:
        return read_training_state(ckpt)
    except UnsafeCheckpoint as e:
        raise CheckpointError(f"--resume: {e}") from None
    except ValueError as e:
        raise CheckpointError(_damaged(ckpt, out, str(e))) from None


def nonfinite(terms: dict[str, float], grad_norm: float) -> list[tuple[str, float]]:
    """The step's non-finite values as (name, value): its loss terms (the named terms before their weighted sum
    'loss', which is non-finite only through them), then the gradient norm. Empty when the step is sound."""
    bad = [(k, v) for k, v in terms.items() if k != "loss" and not math.isfinite(v)]
    if not bad and not math.isfinite(terms.get("loss", 0.0)):
        bad.append(("loss", terms["loss"]))
    if not math.isfinite(grad_norm):
        bad.append(("grad_norm", grad_norm))
    return bad


def _what(bad: list[tuple[str, float]]) -> str:
    return ", ".join(f"{'gradient norm' if k == 'grad_norm' else k + ' term'} = {v}" for k, v in bad)


def _last_good_text(ckpt: Path, last_good: int | None, save_every: int) -> str:
    if last_good is None:
        return f"No checkpoint was written yet (the first is due at step {save_every})"
    return f"The last good checkpoint is {ckpt} (step {last_good})"


def _nonfinite_message(step: int, bad: list[tuple[str, float]], ckpt: Path, last_good: int | None, save_every: int,
                       out: Path) -> str:
    resume = "" if last_good is None else "continue it with --resume --skip-nonfinite (skips such steps), or "
    return (f"step {step}: non-finite {_what(bad)}; the run is stopped before this update and nothing is saved as "
            f"{out / 'final'}. {_last_good_text(ckpt, last_good, save_every)}: {resume}start a new run (another "
            "--out) with a lower --lr or --max-grad-norm, or with --skip-nonfinite")


def nonfinite_parameters(module: torch.nn.Module) -> list[str]:
    """Names of this process's parameters (its shards under FSDP2) holding a NaN or an infinity."""
    out = []
    for name, p in module.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if not bool(torch.isfinite(local.detach()).all()):
            out.append(name)
    return out
