"""Benchmarks at real model shapes, with models built from configs and random weights (no downloads).

    python bench/scale.py [--device cpu|cuda] [--layers N] [--vision-layers N] [--sections ...]

* student: a LLaVA student with Qwen2-0.5B's language model (hidden 896, 14 heads / 2 KV heads, MLP 4864,
  vocabulary 151,936, tied embeddings; 24 layers, or ``--layers``) on a CLIP-L/14 336-px tower (576 image
  tokens; 24 layers, or ``--vision-layers``). One optimizer step (AdamW) per loss: sft, kd, kd+iva, kd+tpa,
  alignti (TPA at every response position) and alignti with a TPA position budget, each also with gradient
  checkpointing. Step time as a ratio to SFT, step memory above weights + gradients + optimizer state
  (activations and transients: the GPU allocator's peak on CUDA, peak RSS in a subprocess per variant on
  CPU), response tokens/s. Then train-student's --trainable / LoRA settings beside full training
  (``--trainable-variants``, one loss): parameters trainable, gradient + AdamW bytes at full depth (a meta-device
  build: exact) and the step's memory and time at the run's depth.
* dump: a teacher with Qwen2-7B's language model shape (hidden 3584, 28 heads / 4 KV heads, MLP 18,944;
  28 layers, or ``--layers``) on the same tower. tokens/s of the dump's compute (alignti.teacher_dump
  .compute.teacher_batch: top-k, saliency, TPA) against the stock transformers forward (``model(**inputs)``,
  its own sdpa path, full logits) on the same batches: without TPA, with TPA at every position, and with the
  budget.
* reader: 640x480 JPEGs through the student's processor (CLIP 336-px, and Qwen2-VL's dynamic resolution)
  from a cache at real shape (k=32, B=4, k2=8, 576 image tokens), with 0, 2 and 4 DataLoader workers,
  against the samples/s the student section measured.
* ops: the operations a student step launches per gradient-checkpointing mode (full depth, narrow widths, CPU
  bf16 autocast), for the GPU step that host launch work bounds.
* padding: padded positions before/after length grouping (train-student --group-by-length; the dump's
  length-sorted batches) on the realistic mix.

The realistic mix (LLaVA-665k-like): 576 image tokens, prompts of 20-200 text tokens, responses of 20-400
(60% short VQA answers of 20-60 tokens, 40% descriptions of 150-400).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _util import device_name, loader_rate, sync, table, timeit

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

VOCAB = 151_936
IMAGE_TOKEN = VOCAB - 1   # any id < vocab; real checkpoints put <image> in the added-token range
IMAGE_TOKENS = 576
STUDENT_TEXT = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                    num_key_value_heads=2, tie_word_embeddings=True)
TEACHER_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                    num_key_value_heads=4, tie_word_embeddings=False)
CLIP_L = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
              image_size=336, patch_size=14, projection_dim=768)
K, B, K2 = 32, 4, 8
VARIANTS = [("sft", 1.0, ""), ("kd", 1.0, ""), ("kd+iva", 1.0, ""), ("kd+tpa", 1.0, ""),
            ("alignti", 1.0, ""), ("alignti", 0.25, ""), ("alignti", 0.1, ""), ("sft", 1.0, "gc"),
            ("alignti", 1.0, "gc"), ("alignti", 0.25, "gc")]


# --- models and data ------------------------------------------------------------------------------------
def build(kind: str, layers: int | None, vision_layers: int | None, device: torch.device, narrow: int = 1):
    """A LLaVA model at real shape with random weights, built straight on ``device`` (bf16 on CUDA). ``narrow``:
    hidden and MLP widths divided by it (same layers, heads, vocabulary and sequences: the same operations)."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

    text = dict(STUDENT_TEXT if kind == "student" else TEACHER_TEXT)
    if layers:
        text["num_hidden_layers"] = layers
    vision = dict(CLIP_L, num_hidden_layers=vision_layers or CLIP_L["num_hidden_layers"])
    for d in (text, vision):
        d["hidden_size"] //= narrow
        d["intermediate_size"] //= narrow
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**vision),
                      text_config=Qwen2Config(vocab_size=VOCAB, max_position_embeddings=32768, rope_theta=1e6, **text),
                      image_token_id=IMAGE_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu", tie_word_embeddings=text["tie_word_embeddings"])
    cfg._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(old)
    return model


def realistic_lengths(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """(prompt text tokens, response tokens) of the realistic mix."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = rng.randint(20, 200)
        resp = rng.randint(20, 60) if rng.random() < 0.6 else rng.randint(150, 400)
        out.append((prompt, resp))
    return out


def synthetic_samples(lengths, seed: int = 0) -> list[dict]:
    """Encoded samples as the cache reader gives them: [bos, 5 markup, 576 image tokens, prompt, 4 markup,
    response], random text ids, one turn."""
    import numpy as np
    g = np.random.default_rng(seed)
    out = []
    for prompt, resp in lengths:
        head = 6
        ids = np.concatenate([g.integers(0, 150_000, head), np.full(IMAGE_TOKENS, IMAGE_TOKEN),
                              g.integers(0, 150_000, prompt + 4 + resp)]).astype(np.int32)
        mask = np.zeros(len(ids), np.uint8)
        mask[-resp:] = 1
        instr = (head + IMAGE_TOKENS, head + IMAGE_TOKENS + prompt)
        out.append({"input_ids": ids, "response_mask": mask, "instr_spans": [instr],
                    "resp_spans": [(len(ids) - resp, len(ids))], "n_image_tokens": IMAGE_TOKENS,
                    "image_tok_start": head, "image_inputs": {"pixel_values": torch.randn(1, 3, 336, 336)}})
    return out


def student_batch(samples: list[dict], tpa_positions: float, device: torch.device) -> dict:
    """A collated student batch with teacher tensors of the cache's shapes (random values)."""
    from alignti.common.adapters import LlavaAdapter
    from alignti.common.batch import collate, tpa_layout
    from alignti.student_train.data import batch_to_device
    batch = collate(samples, 0, LlavaAdapter)
    n = len(batch["targets"])
    g = torch.Generator().manual_seed(1)
    batch["topk_ids"] = torch.randint(0, 150_000, (n, K), generator=g)
    lp = torch.log_softmax(torch.randn(n, K + 1, generator=g) * 2, -1)
    batch["topk_logprobs"], batch["tail_logmass"] = lp[:, :K].half(), lp[:, K]
    sel = [torch.sort(torch.randperm(len(p), generator=g)[:max(1, math.ceil(tpa_positions * len(p)))]).values
           for p in batch["resp_pos"]]
    batch["tpa_rows"], batch["tpa_pos"] = tpa_layout(batch["resp_pos"], sel)
    m = len(batch["tpa_rows"])
    batch["tpa_cand_ids"] = batch["topk_ids"][batch["tpa_rows"], :B].clone()
    batch["tpa_cand_list"] = list(torch.split(batch["tpa_cand_ids"], [len(s) for s in sel]))
    batch["tpa_ids"] = torch.randint(0, 150_000, (m, B, K2), generator=g)
    lp2 = torch.log_softmax(torch.randn(m, B, K2 + 1, generator=g) * 2, -1)
    batch["tpa_logprobs"], batch["tpa_tail"] = lp2[..., :K2].half(), lp2[..., K2]
    groups = len(samples)
    batch["teacher_sal"] = torch.rand(groups, IMAGE_TOKENS, generator=g)
    batch["sal_valid"] = torch.ones(groups, IMAGE_TOKENS, dtype=torch.bool)
    return batch_to_device(batch, device)


# --- memory probes ----------------------------------------------------------------------------------------
def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


class PeakRSS:
    """Peak RSS (MiB) while the block runs, sampled every 2 ms (ru_maxrss only ever grows)."""

    def __enter__(self):
        self.peak, self._stop = _rss_mib(), False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, _rss_mib())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, _rss_mib())


# --- student ----------------------------------------------------------------------------------------------
def trainable_setting(name: str) -> tuple[str | None, int | None]:
    """A --trainable-variants entry as train-student's (--trainable, --lora-r): all, projector, lora16 (LoRA r 16 on
    the LM's linear layers), lora16+projector (LLaVA-LoRA: the projector trained fully besides)."""
    m = re.fullmatch(r"lora(\d+)(?:\+(.+))?", name)
    return (m.group(2), int(m.group(1))) if m else (name, None)


def apply_setting(model, adapter, trainable: str) -> None:
    """train-student's --trainable / --lora-r on ``model`` (student_train.trainable), as the trainer applies them."""
    from alignti.student_train.trainable import apply_trainable, lora_settings
    spec, r = trainable_setting(trainable)
    apply_trainable(model, adapter, spec, lora=lora_settings(r, None, None, 0.0))


def resident_student(args, device: torch.device, trainable: str = "all"):
    """The student in training mode with its weights, gradients and AdamW state resident (a zero-lr step), the
    realistic batch's samples, and the autocast train-student uses: (model, adapter, layer, samples, opt,
    autocast). ``trainable``: a --trainable-variants entry (gradients and AdamW state for the trainable only)."""
    from alignti.common.adapters import adapter_for

    torch.manual_seed(0)
    model = build("student", args.layers, args.vision_layers, device)
    if device.type == "cuda":  # train-student keeps fp32 master weights and runs under bf16 autocast
        model.float()
    adapter = adapter_for(model)
    if trainable != "all":
        apply_setting(model, adapter, trainable)
    model.train()
    samples = synthetic_samples(realistic_lengths(args.batch_size, seed=3), seed=3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    return model, adapter, adapter.num_layers // 2, samples, opt, autocast


def step_memory_mib(step, device: torch.device) -> float:
    """One run of ``step``: its memory above what was resident before (the allocator's peak on CUDA, peak RSS on
    CPU), MiB."""
    sync(device)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        sync(device)
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    base = _rss_mib()
    with PeakRSS() as probe:
        step()
    return probe.peak - base


def student_variant(args, loss: str, tpa_positions: float, gc: bool, trainable: str = "all") -> dict:
    """One variant in this process: weights, gradients and AdamW state made resident first (a zero-lr
    step), then the step's own memory (activations and transients) and its time."""
    from alignti.common.losses import LossWeights, StepNorm, get_loss
    from alignti.student_train.step import StudentStep

    device = torch.device(args.device)
    t_rss = _rss_mib()
    model, adapter, layer, samples, opt, autocast = resident_student(args, device, trainable)
    resident = tensor_bytes(model, opt)
    set_checkpointing(model, gc)
    step_mod = StudentStep(model, adapter, get_loss(loss), layer, LossWeights())
    batch = student_batch(samples, tpa_positions, device)
    norm = StepNorm.of(batch)

    split = {"fwd": [], "bwd": []}

    def step():
        t0 = time.perf_counter()
        with autocast:
            out = step_mod(batch, norm)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        out["loss"].backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        split["fwd"].append(t1 - t0)
        split["bwd"].append(time.perf_counter() - t1)
        opt.step()
        opt.zero_grad(set_to_none=False)

    peak = step_memory_mib(step, device)
    sec = timeit(step, device, repeat=args.repeat, warmup=0)
    if os.environ.get("ALIGNTI_BENCH_PROFILE"):
        profile_step(step, device, Path(os.environ["ALIGNTI_BENCH_PROFILE"]) / f"profile-{loss}-{gc or 'nogc'}.txt")
    n_tok = len(batch["targets"])
    return {"loss": loss, "tpa_positions": tpa_positions, "gc": gc, "sec": sec, "step_mib": peak,
            "fwd_sec": statistics.median(split["fwd"][1:]), "bwd_sec": statistics.median(split["bwd"][1:]),
            "tokens_per_s": n_tok / sec, "samples_per_s": args.batch_size / sec, "response_tokens": n_tok,
            "sequence": int(batch["input_ids"].shape[1]), "tpa_rows": len(batch["tpa_rows"]),
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "trainable": trainable,
            "trainable_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
            **{f"{k}_mib": v / 2 ** 20 for k, v in resident.items()}, "rss_before_model_mib": t_rss}


def tensor_bytes(model, opt) -> dict:
    """Bytes of the weights, the gradients and the optimizer's state tensors (AdamW: exp_avg, exp_avg_sq, step)."""
    params = list(model.parameters())
    return {"weights": sum(p.numel() * p.element_size() for p in params),
            "grads": sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None),
            "optimizer": sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                             if isinstance(v, torch.Tensor))}


def full_depth_counts(trainable: str) -> dict:
    """Parameters trainable and the fp32 gradient + AdamW state they need at full depth (24 + 24 layers), from the
    model built on the meta device (shapes only, nothing allocated): exact arithmetic, 4 bytes per gradient
    element, 8 per AdamW element (exp_avg, exp_avg_sq)."""
    from alignti.common.adapters import adapter_for
    model = build("student", None, None, torch.device("meta"))
    if trainable != "all":
        apply_setting(model, adapter_for(model), trainable)
    params = list(model.parameters())
    n = sum(p.numel() for p in params if p.requires_grad)
    return {"params_m": sum(p.numel() for p in params) / 1e6, "trainable_m": n / 1e6,
            "grads_mib": 4 * n / 2 ** 20, "adamw_mib": 8 * n / 2 ** 20}


def paired_variants(args, variants: list) -> dict:
    """Several losses on one model in one process, timed in interleaved rounds (sft, kd, ..., sft, kd, ...):
    each ratio to SFT is the median of per-round ratios, so clock and host jitter between processes cancel."""
    from alignti.common.losses import LossWeights, StepNorm, get_loss
    from alignti.student_train.step import StudentStep

    device = torch.device(args.device)
    model, adapter, layer, samples, opt, autocast = resident_student(args, device)
    steps = []
    for loss, f, gc in variants:
        step_mod = StudentStep(model, adapter, get_loss(loss), layer, LossWeights())
        batch = student_batch(samples, f, device)
        norm = StepNorm.of(batch)

        def step(step_mod=step_mod, batch=batch, norm=norm, gc=gc):
            set_checkpointing(model, gc)  # the same model, checkpointed or not per variant
            with autocast:
                out = step_mod(batch, norm)
            out["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
        steps.append(step)
    peaks = [step_memory_mib(step, device) for step in steps]  # warm-up, and each variant's step memory
    times = [[] for _ in steps]
    for _ in range(args.rounds):
        for i, step in enumerate(steps):
            sync(device)
            t = time.perf_counter()
            step()
            sync(device)
            times[i].append(time.perf_counter() - t)
    rows = []
    for (loss, f, gc), ts, peak in zip(variants, times, peaks):
        rows.append({"loss": loss, "tpa_positions": f, "gc": gc, "sec": statistics.median(ts), "step_mib": peak,
                     "x_sft": statistics.median(t / t0 for t, t0 in zip(ts, times[0])),
                     "x_sft_mem": peak / peaks[0]})
    return {"rows": rows, "rounds": args.rounds, "first": variants[0][0]}


def set_checkpointing(model, gc: str) -> None:
    """Checkpointing mode of a variant: "" off, "gc" non-reentrant, "gcr" reentrant; "x" after them: the recompute
    casts the weights again (no reuse of the forward's casts); trailing N: every N-th layer (e.g. "gcx2")."""
    from alignti.common.models import enable_gradient_checkpointing
    if gc:
        m = re.fullmatch(r"gc(r?)(x?)(\d*)", gc)
        if m is None:
            raise SystemExit(f"unknown checkpointing mode {gc!r}: gc, gcr, gcx, with an optional every-N suffix")
        enable_gradient_checkpointing(model, reentrant=bool(m[1]), reuse_casts=not m[2], every_n_layers=int(m[3] or 1))
    elif getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()


def parse_variants(text: str) -> list[tuple[str, float, str]]:
    """"loss:F[:MODE],..." -> (loss, TPA position fraction, checkpointing mode; "" for none / nogc)."""
    parts = [v.split(":") for v in text.split(",")]
    return [(p[0], float(p[1]), "" if len(p) < 3 or p[2] == "nogc" else p[2]) for p in parts]


def section_paired(args) -> dict:
    variants = parse_variants(args.paired)
    res = run_child(args, "paired", variants=variants)
    if "error" in res:
        print("paired: error:", res["error"])
        return res
    print(f"\nstudent step, losses interleaved in one process ({res['rounds']} rounds; x SFT = median of per-round "
          f"ratios to {res['first']}), batch {args.batch_size}; device {args.device_name}")
    print(table([[r["loss"], r["tpa_positions"], r["gc"] or "no", f"{r['sec']:.3f}", f"{r['x_sft']:.3f}",
                  f"{r['step_mib']:.0f}", f"{r['x_sft_mem']:.3f}"] for r in res["rows"]],
                ["loss", "TPA positions", "grad ckpt", "sec", "x SFT", "step MiB", "x SFT mem"]))
    return res


class OpCount(TorchDispatchMode):
    """Counts the aten operations that launch work (views and allocations left out), and the bf16 casts of fp32
    weights among them, per phase (``phase``: forward / backward)."""

    FREE = {"view", "_unsafe_view", "t", "transpose", "expand", "slice", "select", "unsqueeze", "squeeze",
            "as_strided", "detach", "alias", "permute", "reshape", "split", "split_with_sizes", "unbind",
            "_reshape_alias", "lift_fresh", "empty", "empty_strided", "empty_like", "view_as", "unflatten",
            "sym_size", "sym_stride", "is_same_size", "_has_compatible_shallow_copy_type"}

    def __init__(self, weights):
        super().__init__()
        self.ptrs = {w.data_ptr() for w in weights}
        self.ops, self.casts, self.phase = {"forward": 0, "backward": 0}, {"forward": 0, "backward": 0}, "forward"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in self.FREE:
            self.ops[self.phase] += 1
            if name == "_to_copy" and args[0].dtype == torch.float32 and args[0].data_ptr() in self.ptrs:
                self.casts[self.phase] += 1
        return func(*args, **(kwargs or {}))


def section_ops(args) -> dict:
    """Operations one student step's forward and backward launch per checkpointing mode: the full-depth student
    with widths / 8 (the same layers, heads, vocabulary and sequences, so the same operations), CPU under bf16
    autocast (the GPU path's precision). A step the GPU runs launch-bound (bench/README.md) pays for each in host
    time."""
    from alignti.common.adapters import adapter_for
    from alignti.common.losses import LossWeights, StepNorm, get_loss
    from alignti.student_train.step import StudentStep

    device = torch.device("cpu")
    torch.manual_seed(0)
    model = build("student", args.layers, args.vision_layers, device, narrow=8).train()
    adapter = adapter_for(model)
    step_mod = StudentStep(model, adapter, get_loss("sft"), adapter.num_layers // 2, LossWeights())
    batch = student_batch(synthetic_samples(realistic_lengths(args.batch_size, seed=3), seed=3), 1.0, device)
    norm = StepNorm.of(batch)
    modes = args.ops_modes.split(",")
    rows = []
    for mode in modes:
        set_checkpointing(model, mode)
        counter = OpCount(list(model.parameters()))
        for counted in (False, True):  # a warm-up step, then the counted one
            model.zero_grad(set_to_none=True)
            with counter if counted else contextlib.nullcontext():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = step_mod(batch, norm)
                counter.phase = "backward"
                out["loss"].backward()
                counter.phase = "forward"
        saved = [0]  # tensors the step saves for backward outside checkpoints (theirs go through their own hooks)
        with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.__setitem__(0, saved[0] + 1) or x, lambda x: x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                step_mod(batch, norm)
        rows.append({"mode": mode, "forward": counter.ops["forward"], "backward": counter.ops["backward"],
                     "ops": sum(counter.ops.values()), "weight_casts_backward": counter.casts["backward"],
                     "saved_outside": saved[0]})
    base = rows[0]["ops"]
    for r in rows:
        r["x_first"] = r["ops"] / base
        r["saved_in_checkpoints"] = rows[0]["saved_outside"] - r["saved_outside"]
    print(f"\noperations per student step (batch {args.batch_size}; full depth at widths / 8; CPU bf16 autocast)")
    print(table([[r["mode"] or "none", r["forward"], r["backward"], r["ops"], f"{r['x_first']:.3f}",
                  r["weight_casts_backward"], r["saved_in_checkpoints"]] for r in rows],
                ["grad ckpt", "forward ops", "backward ops", "ops", f"x {modes[0] or 'none'}",
                 "weight casts in backward", "saved tensors in checkpoints"]))
    cost = checkpoint_host_cost()
    print(f"checkpoint machinery, host time beyond the recompute itself (CPU, {cost['ops']}-op chains): "
          f"non-reentrant {cost['per_saved_tensor_us']:.1f} us per saved tensor, reentrant "
          f"{cost['per_reentrant_checkpoint_us']:.0f} us per checkpoint")
    return {"rows": rows, "host_cost": cost}


def checkpoint_host_cost(ops: int = 30, repeat: int = 300) -> dict:
    """Host time torch.utils.checkpoint adds beyond recomputing, on a chain of ``ops`` tiny sin ops (one saved tensor
    each): non-reentrant per saved tensor (its pack, recompute-pack and unpack hooks), reentrant per checkpoint (its
    autograd Function and inner backward). Medians of interleaved runs."""
    from torch.utils.checkpoint import checkpoint
    x = torch.randn(4, 8, requires_grad=True)

    def chain(t):
        for _ in range(ops):
            t = torch.sin(t)
        return t

    def plain_twice(t):  # the forward twice: a step plus its recompute, without checkpoint machinery
        chain(t.detach().requires_grad_())
        return chain(t)

    runs = {"plain": lambda: chain(x), "twice": lambda: plain_twice(x),
            "gc": lambda: checkpoint(chain, x, use_reentrant=False, determinism_check="none", preserve_rng_state=False),
            "gcr": lambda: checkpoint(chain, x, use_reentrant=True, preserve_rng_state=False)}
    times = {k: [] for k in runs}
    for _ in range(repeat):
        for k, fn in runs.items():
            t = time.perf_counter()
            fn().sum().backward()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v[repeat // 10:]) * 1e6 for k, v in times.items()}
    return {"ops": ops, "per_saved_tensor_us": (med["gc"] - med["twice"]) / ops,
            "per_reentrant_checkpoint_us": med["gcr"] - med["twice"], "median_us": med}


def profile_step(step, device, path: Path) -> None:
    """One step under torch.profiler: host time against device kernel time (is the step launch-bound?) and the
    ops that take the most host time."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    ka = prof.key_averages()
    dev = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in ka) / 1e6
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"wall {wall:.3f} s (profiled), device kernels {dev:.3f} s, kernels launched "
                    f"{sum(e.count for e in ka if getattr(e, 'self_device_time_total', 0) > 0)}\n"
                    + ka.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))


def run_child(args, section: str, **kw) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps({"section": section, **kw}), "--device", args.device,
           "--batch-size", str(args.batch_size), "--repeat", str(args.repeat), "--rounds", str(args.rounds)]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    if args.vision_layers:
        cmd += ["--vision-layers", str(args.vision_layers)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["?"])[-1], **kw}
    return json.loads(res.stdout.strip().splitlines()[-1])


def section_student(args) -> dict:
    variants = parse_variants(args.variants) if args.variants else VARIANTS
    rows = []
    for l, f, gc in variants:  # each row as it lands (a timeout keeps what finished)
        rows.append(run_child(args, "student", loss=l, tpa_positions=f, gc=gc))
        print(json.dumps(rows[-1]), flush=True)
    sft = next(r for r in rows if r.get("loss") == "sft" and not r.get("gc"))
    sft_gc = {r["gc"]: r for r in rows if r.get("loss") == "sft" and r.get("gc") and "error" not in r}
    out = []
    for r in rows:
        if "error" in r:
            out.append([r["loss"], r.get("tpa_positions"), r.get("gc"), "error: " + r["error"][:60], "", "", "", ""])
            continue
        ref = sft_gc.get(r["gc"], sft) if r["gc"] else sft
        out.append([r["loss"], r["tpa_positions"], r["gc"] or "no", f"{r['sec']:.3f}",
                    f"{r['sec'] / ref['sec']:.3f}", f"{r['step_mib']:.0f}", f"{r['step_mib'] / ref['step_mib']:.3f}",
                    f"{r['tokens_per_s']:.0f}"])
    print(f"\nstudent step: LLaVA + Qwen2-0.5B shape ({sft['params_m']:.0f}M params built), batch {args.batch_size}, "
          f"{sft['response_tokens']} response tokens, padded sequence {sft['sequence']}; device {args.device_name}")
    print(table(out, ["loss", "TPA positions", "grad ckpt", "sec", "x SFT", "step MiB", "x SFT mem", "resp tok/s"]))
    for mode, g in sft_gc.items():
        print(f"RATIO gradient checkpointing ({mode}): sft step memory {g['step_mib'] / sft['step_mib']:.2f}x, time "
              f"{g['sec'] / sft['sec']:.2f}x (forward {sft['fwd_sec']:.3f} -> {g['fwd_sec']:.3f} s, "
              f"backward {sft['bwd_sec']:.3f} -> {g['bwd_sec']:.3f} s)")
    return {"rows": rows, "trainable": section_trainable(args) if args.trainable_variants else []}


def section_trainable(args) -> list[dict]:
    """train-student --trainable / LoRA beside full training, one loss (--trainable-loss): parameters trainable,
    gradient and AdamW bytes at full depth (meta build, exact) and, at the run's depth, the measured resident
    gradient + optimizer bytes, the step's peak above weights + gradients + optimizer state, and its time."""
    rows = []
    for name in args.trainable_variants.split(","):
        r = run_child(args, "student", loss=args.trainable_loss, tpa_positions=1.0, gc="", trainable=name)
        r["full_depth"] = full_depth_counts(name)
        rows.append(r)
        print(json.dumps(r), flush=True)
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return rows
    ref = next((r for r in ok if r["trainable"] == "all"), ok[0])
    out = [[r["trainable"], f"{r['full_depth']['trainable_m']:.2f}",
            f"{r['full_depth']['trainable_m'] / r['full_depth']['params_m']:.2%}",
            f"{r['full_depth']['grads_mib'] + r['full_depth']['adamw_mib']:,.0f}",
            f"{r['trainable_m']:.2f}", f"{r['grads_mib'] + r['optimizer_mib']:,.0f}", f"{r['step_mib']:,.0f}",
            f"{r['step_mib'] / ref['step_mib']:.2f}", f"{r['sec']:.2f}", f"{r['sec'] / ref['sec']:.2f}"]
           for r in ok]
    print(f"\n--trainable / LoRA, loss {args.trainable_loss}: full depth ({ok[0]['full_depth']['params_m']:.0f}M "
          f"params; counted on the meta device) and measured at layers {args.layers or 'full'} / vision "
          f"{args.vision_layers or 'full'} on {args.device_name}")
    print(table(out, ["trainable", "full: M trainable", "share", "full: grad+AdamW MiB", "run: M trainable",
                      "run: grad+AdamW MiB", "step MiB", "x all", "sec", "x all"]))
    for r in ok:
        if r is not ref:
            print(f"RATIO {r['trainable']}: gradient + AdamW state {(r['full_depth']['grads_mib'] + r['full_depth']['adamw_mib']) / (ref['full_depth']['grads_mib'] + ref['full_depth']['adamw_mib']):.4f}x "
                  f"at full depth; step memory {r['step_mib'] / ref['step_mib']:.2f}x, time {r['sec'] / ref['sec']:.2f}x "
                  "at the run's depth")
    return rows


# --- dump -------------------------------------------------------------------------------------------------
def dump_variant(args) -> dict:
    from alignti.common.adapters import adapter_for
    from alignti.common.batch import collate, to_device
    from alignti.teacher_dump.compute import teacher_batch
    from alignti.common.adapters import LlavaAdapter

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build("teacher", args.layers, args.vision_layers, device).eval()
    adapter = adapter_for(model)
    dtype = next(model.parameters()).dtype
    batches = []
    lengths = realistic_lengths(args.batch_size * 3, seed=11)
    samples = synthetic_samples(lengths, seed=11)
    samples.sort(key=lambda x: -len(x["input_ids"]))  # the dump's length-sorted batches
    for i in range(0, len(samples), args.batch_size):
        b = to_device(collate(samples[i:i + args.batch_size], 0, LlavaAdapter), device)
        b["image_inputs"] = {k: v.to(dtype) for k, v in b["image_inputs"].items()}
        batches.append(b)
    n_tok = sum(int(b["valid"].sum()) for b in batches)
    layer = adapter.num_layers // 2

    def stock():
        with torch.no_grad():
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["valid"].long(), **b["image_inputs"]).logits.sum().item()

    def dump(tpa: int, fraction: float):
        params = {"top_k": K, "tpa_branches": tpa, "tpa_top_k": K2, "saliency_layer": layer, "tpa_positions": fraction,
                  "tpa_layout": "positions"}

        def run():
            for b in batches:
                res = teacher_batch(adapter, b, params)
                res["topk_ids"].sum().item()
        return run

    variants = {"stock forward": stock, "dump, no TPA": dump(0, 1.0), "dump, TPA all positions": dump(B, 1.0),
                "dump, TPA budget 0.25": dump(B, 0.25)}
    out = {name: timeit(fn, device, repeat=args.repeat, warmup=1) for name, fn in variants.items()}
    return {"sec": out, "tokens": n_tok, "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def section_dump(args) -> dict:
    r = run_child(args, "dump")
    if "error" in r:
        print("dump:", r["error"])
        return r
    base = r["sec"]["stock forward"]
    rows = [[k, f"{v:.3f}", f"{r['tokens'] / v:.0f}", f"{v / base:.3f}"] for k, v in r["sec"].items()]
    print(f"\ndump: LLaVA + Qwen2-7B shape ({r['params_m']:.0f}M params built), {r['tokens']} tokens in 3 batches "
          f"of {args.batch_size}; device {args.device_name}")
    print(table(rows, ["pass", "sec", "tokens/s", "x stock forward"]))
    return r


# --- reader -----------------------------------------------------------------------------------------------
def build_reader_cache(root: Path, n: int) -> Path:
    """A cache at real shape (random arrays) over n 640x480 JPEG images."""
    import numpy as np
    from PIL import Image

    from alignti.common.cache import PartWriter, committed_parts, write_manifest, write_plan
    cache = root / "cache"
    if (cache / "manifest.json").exists():
        return cache
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    params = {"top_k": K, "tpa_branches": B, "tpa_top_k": K2, "saliency_layer": 12, "tpa_layout": "positions",
              "tpa_positions": 1.0}
    plan = {"fingerprint": {"params": params}, "units": [[0, n]]}
    write_plan(cache, plan)
    pw = PartWriter(cache, 0, params)
    import hashlib
    for i, (prompt, resp) in enumerate(realistic_lengths(n, seed=5)):
        arr = (g.random((480, 640, 3)) * 64 + np.linspace(0, 190, 640)[None, :, None]).astype(np.uint8)
        path = images / f"{i:05d}.jpg"
        Image.fromarray(arr).save(path, quality=90)
        x = synthetic_samples([(prompt, resp)], seed=i)[0]
        arrays = {"input_ids": x["input_ids"], "response_mask": x["response_mask"],
                  "topk_ids": g.integers(0, VOCAB, (resp, K)).astype(np.int32),
                  "topk_logprobs": -g.random((resp, K)).astype(np.float16) * 5,
                  "tail_logmass": -g.random(resp).astype(np.float32), "target_logprob": -g.random(resp).astype(np.float32),
                  "tpa_pos": np.arange(resp, dtype=np.int32),
                  "tpa_cand_ids": g.integers(0, VOCAB, (resp, B)).astype(np.int32),
                  "tpa_ids": g.integers(0, VOCAB, (resp, B, K2)).astype(np.int32),
                  "tpa_logprobs": -g.random((resp, B, K2)).astype(np.float16) * 5,
                  "tpa_tail": -g.random((resp, B)).astype(np.float32),
                  "saliency": g.random(IMAGE_TOKENS).astype(np.float16)}
        meta = dict(sample_id=f"s{i}", index=i, image=path.name, image_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                    image_tok_start=6, n_image_tokens=IMAGE_TOKENS, instr_spans=list(x["instr_spans"][0]),
                    resp_spans=list(x["resp_spans"][0]), n_turns=1)
        pw.add(meta, arrays)
    pw.commit()
    m = write_manifest(cache, plan, committed_parts(cache), extra={"images": str(images)})
    del m
    return cache


class ImageOnly:
    """What StudentCollator needs of a processor: its image processor and the tokenizer's pad id."""

    def __init__(self, image_processor, tokenizer):
        self.image_processor, self.tokenizer = image_processor, tokenizer


def reader_processors():
    from transformers import LlavaProcessor, Qwen2VLImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from alignti.demo.kit import build_tokenizer
    tok = build_tokenizer("llava")
    clip = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 336},
                                                                crop_size={"height": 336, "width": 336}),
                          tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, image_token="<image>")

    return {"CLIP 336": clip, "Qwen2-VL dynamic": ImageOnly(Qwen2VLImageProcessor(), tok)}


def section_reader(args, consume: float | None) -> dict:
    from alignti.common.adapters import LlavaAdapter
    from alignti.common.cache import CacheReader
    from alignti.student_train.data import CacheDataset, StudentCollator, batches_of, epoch_order

    root = Path(args.workdir) / "reader"
    cache = build_reader_cache(root, args.reader_samples)
    rows, out = [], {}
    for pname, proc in reader_processors().items():
        for workers in (0, 2, 4):
            reader = CacheReader(cache)
            ds = CacheDataset(reader, proc)
            order = batches_of(epoch_order(reader, 0, 0), args.batch_size)
            rate = loader_rate(ds, order, StudentCollator(proc, LlavaAdapter), workers)
            out[f"{pname}/{workers}"] = rate
            rows.append([pname, workers, f"{rate:.1f}", f"{rate / consume:.1f}" if consume else "-"])
    print(f"\nreader: {args.reader_samples} samples, 640x480 JPEG, batch {args.batch_size}; student consumes "
          f"{consume:.2f} samples/s (alignti step above)" if consume else "")
    print(table(rows, ["processor", "workers", "samples/s", "x student consumption"]))
    return out


# --- padding ----------------------------------------------------------------------------------------------
def section_padding(args) -> dict:
    from alignti.student_train.data import batches_of, length_grouped, padding_fraction
    n = 20_000
    lengths = [6 + IMAGE_TOKENS + p + 4 + r for p, r in realistic_lengths(n, seed=7)]
    order = list(range(n))
    random.Random(0).shuffle(order)
    out = {}
    for bs in (4, 8, 16):
        before = padding_fraction(batches_of(order, bs), lengths)
        after = padding_fraction(batches_of(length_grouped(order, lengths, bs, torch.Generator().manual_seed(0)), bs),
                                 lengths)
        dump = padding_fraction([b for u in range(0, n, 256) for b in batches_of(
            sorted(range(u, min(u + 256, n)), key=lambda i: -lengths[i]), bs)], lengths)
        dump_before = padding_fraction([b for u in range(0, n, 256) for b in batches_of(
            list(range(u, min(u + 256, n))), bs)], lengths)
        out[bs] = {"train_before": before, "train_after": after, "dump_before": dump_before, "dump_after": dump}
    rows = [[bs, f"{v['train_before']:.1%}", f"{v['train_after']:.1%}", f"{v['dump_before']:.1%}",
             f"{v['dump_after']:.1%}"] for bs, v in out.items()]
    print(f"\npadding on the realistic mix ({n} samples, mean length {sum(lengths) / n:.0f} tokens)")
    print(table(rows, ["batch", "train: shuffled", "train: --group-by-length", "dump: data order",
                       "dump: length-sorted (unit 256)"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=None, help="trim the language models to N layers (CPU)")
    ap.add_argument("--vision-layers", type=int, default=None, help="trim the vision towers to N layers (CPU)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sections", default="padding,student,dump,reader")
    ap.add_argument("--variants", default=None, help="student variants as loss:F:MODE,... with MODE nogc, gc "
                    "(non-reentrant checkpointing), gcr (reentrant), gcx (the recompute casts the weights again), and "
                    "a trailing N for every N-th layer (gcr2) (default: all)")
    ap.add_argument("--reader-samples", type=int, default=64)
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "alignti-scale"))
    ap.add_argument("--json", default=None, help="write every figure here")
    ap.add_argument("--paired", default="sft:1,kd:1,kd+iva:1,alignti:0.1,alignti:0.25,alignti:0.5,alignti:1",
                    help="the paired section's variants, loss:F[:MODE],... (the first is the reference; MODE as in "
                    "--variants, checkpointing toggled on the same model)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds of the paired section")
    ap.add_argument("--ops-modes", default=",gc,gcx,gcr,gcrx,gc2", help="checkpointing modes of the ops section "
                    "(an empty entry: none)")
    ap.add_argument("--trainable-variants", default="all,projector,lora16,lora16+projector",
                    help="student section: train-student --trainable / LoRA settings beside full training (all; a "
                    "--trainable value; loraR[+TRAINABLE]); empty: none")
    ap.add_argument("--trainable-loss", default="kd", help="the loss of the --trainable rows")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        section = spec.pop("section")
        res = (student_variant(args, **spec) if section == "student" else
               paired_variants(args, **spec) if section == "paired" else dump_variant(args))
        print(json.dumps(res))
        return
    args.device_name = device_name(torch.device(args.device))
    print(f"device: {args.device_name}; layers {args.layers or 'full'}, vision layers {args.vision_layers or 'full'}")
    figures = {"device": args.device_name, "layers": args.layers, "vision_layers": args.vision_layers}
    sections = args.sections.split(",")
    if "padding" in sections:
        figures["padding"] = section_padding(args)
    consume = None
    if "paired" in sections:
        figures["paired"] = section_paired(args)
    if "ops" in sections:
        figures["ops"] = section_ops(args)
    if "student" in sections:
        figures["student"] = section_student(args)
        al = [r for r in figures["student"]["rows"] if r.get("loss") == "alignti" and not r.get("gc")
              and r.get("tpa_positions") == 1.0 and "samples_per_s" in r]
        consume = al[0]["samples_per_s"] if al else None
    if "dump" in sections:
        figures["dump"] = section_dump(args)
    if "reader" in sections:
        figures["reader"] = section_reader(args, consume)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=str))


if __name__ == "__main__":
    main()
