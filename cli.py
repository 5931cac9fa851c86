"""alignti command line: a thin typer layer over teacher_dump/, student_train/, student_rollout/ and common/."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from alignti.common.errors import AlignTIError
from alignti.common.progress import setup_logging

# rich_markup_mode=None: click's plain help. typer's rich panels squeeze the option column to the terminal and cut
# names ("--gradient-checkpo…"), and size themselves from TERMINAL_WIDTH or the terminal, not from click's
# terminal_width; click's formatter wraps help text at min(terminal, 80) columns and puts a long option name on a
# line of its own, so every name stays whole in an 80-column terminal and when piped (tests/test_help.py)
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Offline knowledge distillation for vision-language models (Align-TI).")
log = logging.getLogger("alignti")


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")):
    setup_logging(verbose)


def _run(fn, *args, **kwargs):
    from alignti.common.distributed import shutdown
    try:
        return fn(*args, **kwargs)
    except AlignTIError as e:
        log.error("%s", e)
        raise typer.Exit(2) from None
    except (ValueError, NotImplementedError) as e:
        log.error("%s", e)
        raise typer.Exit(2) from None
    finally:
        shutdown()  # leave torchrun's process group cleanly (no-op in a single process)


def _check_options(ctx: typer.Context) -> None:
    """The command's numeric options within their ranges (common.config.OPTION_RANGES), before any work."""
    from alignti.common.config import check_ranges
    _run(check_ranges, ctx.info_name, ctx.params)


def _echo_main(text: str) -> None:
    """Print a command's result once (rank 0) when it runs under torchrun."""
    from alignti.common.distributed import dist_env
    if dist_env().is_main:
        typer.echo(text)


CONFIG_HELP = "YAML file of options (keys as the flags, e.g. top_k: 64); flags given here override it."


def _resolve(ctx: typer.Context, config: Optional[Path], required: tuple[str, ...] = (),
             file_only: Optional[dict] = None) -> dict:
    """This command's options: the --config file's values under every flag not given on the command line.
    ``file_only``: settings a file may hold that have no flag (with their defaults)."""
    from alignti.common.config import ConfigError, check_keys, check_ranges, read_config
    values = {k: v for k, v in ctx.params.items() if k != "config"}
    extra = dict(file_only or {})
    from_file: set[str] = set()  # the options whose value came from the file (its errors name the file)
    if config is not None:
        given = read_config(config)
        check_keys(given, [*values, *extra], ctx.info_name, str(config))
        params = {p.name: p for p in ctx.command.params}
        for k, v in given.items():
            if k in extra:
                extra[k] = v
            elif getattr(ctx.get_parameter_source(k), "name", "") not in ("COMMANDLINE", "ENVIRONMENT"):
                if v is not None and params[k].multiple and not isinstance(v, list):
                    v = [v]
                try:
                    values[k] = None if v is None else params[k].process_value(ctx, v)
                except Exception as e:  # the parameter type's own message (e.g. "'abc' is not a valid float")
                    raise ConfigError(f"{config}: option '{k}': {getattr(e, 'message', None) or e}") from None
                from_file.add(k)
    # every numeric value in its range before --nproc relaunches under torchrun, before anything loads or is written
    check_ranges(ctx.info_name, {k: v for k, v in values.items() if k in from_file}, str(config))
    check_ranges(ctx.info_name, {k: v for k, v in values.items() if k not in from_file})
    missing = [k for k in required if values.get(k) is None or values.get(k) in ([], ())]  # a repeatable flag: []
    if missing:
        raise ConfigError(f"{ctx.info_name} needs " + ", ".join("--" + k.replace("_", "-") for k in missing)
                          + " (a flag, or a key in --config)")
    return {**values, **extra}


def _stage_config(ctx: typer.Context, config: Optional[Path], cls):
    """A stage's config object from its flags and --config file; with --nproc N > 1, this command re-runs under
    torchrun first."""
    o = _run(_resolve, ctx, config, required=_REQUIRED[ctx.info_name])
    _relaunch(o.pop("nproc"), o.get("tp_size", 1))
    return cls(**{k: str(v) if isinstance(v, Path) else v for k, v in o.items()})


def _relaunch(nproc: int, tp_size: int = 1) -> None:
    """``--nproc N`` (N > 1): hand this very command to torchrun with N processes, then exit with its code.
    ``tp_size``: the processes per replica, which must divide N (checked before anything starts)."""
    from alignti.common.distributed import check_tp_size, dist_env, run_under_torchrun, strip_nproc
    if not dist_env().distributed:
        _run(check_tp_size, nproc, tp_size)
    if nproc > 1 and not dist_env().distributed:
        raise typer.Exit(run_under_torchrun(nproc, strip_nproc(sys.argv[1:])))


@app.command("make-demo")
def make_demo(ctx: typer.Context,
              out: Path = typer.Argument(..., help="Directory for the demo kit."),
              train_teacher: bool = typer.Option(True, help="Train the tiny teacher on the shapes task."),
              teacher_steps: int = typer.Option(2000, help="Most teacher training steps."),
              teacher_target: float = typer.Option(0.9, help="Stop teacher training at this validation exact match."),
              teacher_batch: int = typer.Option(64, help="Teacher training batch size."),
              teacher_lr: float = typer.Option(3e-4, help="Teacher learning rate (3e-3 stalls at the answer prior)."),
              teacher_grounding: float = typer.Option(1.0, help="Weight of the teacher's auxiliary grounding loss "
                                                      "(its answer-position attention on the named cells); 0: plain SFT."),
              device: str = typer.Option("auto", help="Where the teacher trains: auto, cpu, cuda."),
              n_train: int = typer.Option(300, help="Training images (3 questions each)."),
              n_val: int = typer.Option(40, help="Validation images (3 questions each): the teacher's early stop "
                                        "and the students' validation accuracy."),
              n_test: int = typer.Option(60, help="Test images (3 questions each), scored by evaluate."),
              seed: int = typer.Option(0, help="Seed of the data, the images and the tiny models' weights."),
              family: str = typer.Option("llava", help="Model family of the tiny checkpoints: a model type "
                                         "of the family registry with a demo kit (the families table: README, docs/index.md).")):
    """Write a self-contained demo kit: tiny teacher/student of the family, tokenizer, shapes VQA data."""
    _check_options(ctx)
    from alignti.demo.kit import make_demo as run
    info = _run(run, out, n_train=n_train, n_val=n_val, n_test=n_test, train_teacher=train_teacher,
                teacher_steps=teacher_steps, seed=seed, family=family,
                teacher_lr=teacher_lr, teacher_target=teacher_target, teacher_batch=teacher_batch,
                grounding=teacher_grounding, device=device)
    typer.echo(json.dumps(info, indent=2))


@app.command("dump-teacher")
def dump_teacher(ctx: typer.Context,
                 teacher: Optional[str] = typer.Option(None, help="Teacher checkpoint (local path or hub id). Required."),
                 data: Optional[str] = typer.Option(None, help="LLaVA JSON/JSONL file, parquet file / folder of "
                                                               "shards, or datasets save_to_disk folder; local or "
                                                               "fsspec URL. Required."),
                 images: Optional[str] = typer.Option(None, help="Directory the data's image paths are relative "
                                                                 "to (not needed for embedded images)."),
                 out: Optional[Path] = typer.Option(None, help="Cache directory to write. Required."),
                 top_k: Optional[int] = typer.Option(None, help="Top-k log-probs kept per response token.  "
                                                     "[default: 64, or the teacher's vocabulary if smaller]."),
                 batch_size: int = typer.Option(8, help="Samples per teacher forward."),
                 device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
                 limit: Optional[int] = typer.Option(None, help="Only the first N samples."),
                 skip_bad: bool = typer.Option(False, help="Record bad samples as skipped instead of stopping."),
                 tpa_branches: int = typer.Option(4, help="TPA branch candidates per token (0: no TPA stats)."),
                 tpa_top_k: Optional[int] = typer.Option(None, help="Top-k kept per branch distribution.  "
                                                         "[default: 8, or the teacher's vocabulary if smaller]."),
                 tpa_positions: float = typer.Option(1.0, help="TPA position budget: the fraction of each sample's "
                                                     "response positions that get TPA statistics, chosen where the "
                                                     "teacher's next-token entropy is highest (1: all)."),
                 saliency_layer: str = typer.Option("auto", help="auto (IRS), a layer index, or none."),
                 iva_token_kl: bool = typer.Option(False, help="Also cache IVA's token-KL statistics: at the top "
                                                   "--iva-token-ratio of each turn's salient image tokens, their "
                                                   "saliency and the teacher's output distribution (for "
                                                   "train-student --iva-form token-kl)."),
                 iva_token_ratio: float = typer.Option(0.25, help="Share of each sample's image tokens the token-KL "
                                                       "statistics cover."),
                 temperature: float = typer.Option(1.0, help="Cache the teacher at this temperature "
                                                   "(softmax(logits / T): top-k and rest mass exact there); "
                                                   "train-student --temperature T then distils from it as it is."),
                 irs_samples: int = typer.Option(256, help="Calibration samples for --saliency-layer auto."),
                 unit_size: int = typer.Option(256, help="Samples per work unit (one committed part each)."),
                 max_length: Optional[int] = typer.Option(None, help="Refuse samples longer than this."),
                 dtype: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16."),
                 logprob_encoding: str = typer.Option("packed", "--logprob-dtype", "--logprob-encoding",
                                                      help="Stored top-k: packed (id sets + sqrt-probability codes "
                                                           "within --packed-kl, docs/cache-format.md); float16 "
                                                           "log-probs; uint8 (1/16-nat log-space steps)."),
                 packed_kl: float = typer.Option(4e-5, help="packed: expected KL (nats per token) its rounding "
                                                 "may add; sets the sqrt-probability step at this --top-k."),
                 packed_compressor: str = typer.Option("zstd", help="packed: zstd, or lzma (3-5% smaller, ~20x "
                                                        "slower to write)."),
                 saliency_query: str = typer.Option("instruction", help="Saliency query positions: instruction "
                                                    "(the turn's instruction tokens) or answer (the position "
                                                    "predicting the first answer token)."),
                 length_sorted_batches: bool = typer.Option(True, help="Batch each work unit's samples in length "
                                                            "order (less padding; written in data order)."),
                 encode_workers: Optional[int] = typer.Option(None, help="Processes that encode the next work "
                                                              "units (images, chat template, tokenizer, processor) "
                                                              "while the teacher runs the current one; 0: encode in "
                                                              "the teacher's loop.  [default: 1 for a teacher on a "
                                                              "GPU, 0 on CPU]"),
                 nproc: int = typer.Option(1, help="Teacher processes: re-runs this command under torchrun "
                                                   "(one per GPU); replicas (--tp-size ranks each) split the work "
                                                   "units."),
                 tp_size: int = typer.Option(1, help="Ranks per teacher replica: the teacher is tensor-parallel over "
                                                     "them (transformers' tp_plan; --nproc N gives N / tp-size "
                                                     "replicas that split the work units; docs/large-teachers.md)."),
                 ep_size: int = typer.Option(1, help="MoE teachers: split the experts over the replica's ranks "
                                                     "(transformers' expert-parallel plan; 1 or --tp-size)."),
                 device_map: Optional[str] = typer.Option(None, help="auto: one process places the teacher over its "
                                                          "GPUs, then CPU and disk (accelerate), within "
                                                          "--max-memory."),
                 max_memory: Optional[str] = typer.Option(None, help="A rank's memory for the fit check before "
                                                          "loading (e.g. 70GiB), or with --device-map per device "
                                                          "(0=70GiB,1=70GiB,cpu=200GiB)."),
                 config: Optional[Path] = typer.Option(None, help=CONFIG_HELP)):
    """Run the teacher once over the data and write the cache (resumable)."""
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher as run
    manifest = _run(run, _stage_config(ctx, config, DumpConfig))
    _echo_main(json.dumps(manifest["counts"]))


@app.command("rollout")
def rollout(ctx: typer.Context,
            student: Optional[str] = typer.Option(None, help="Student checkpoint (local path or hub id). Required."),
            data: Optional[str] = typer.Option(None, help="Samples: LLaVA JSON/JSONL, parquet, or a datasets folder; "
                                                          "local or fsspec URL. Required."),
            images: Optional[str] = typer.Option(None, help="Directory the data's image paths are relative to."),
            out: Optional[Path] = typer.Option(None, help="Rollout directory to write (a parquet dataset that "
                                                          "dump-teacher --data reads). Required."),
            temperature: float = typer.Option(1.0, help="Sampling temperature; 0: greedy."),
            top_p: float = typer.Option(1.0, help="Nucleus sampling: keep the most likely tokens up to this mass."),
            max_new_tokens: int = typer.Option(128, help="Most tokens per answer."),
            samples_per_prompt: int = typer.Option(1, help="Answers per assistant turn (each with its own seed)."),
            seed: int = typer.Option(0, help="Seed; each row's own seed comes from (seed, sample, turn, k)."),
            round: int = typer.Option(0, "--round", help="Round number recorded with every row (provenance)."),
            top_b: int = typer.Option(4, help="Student candidates kept per generated token (>= dump-teacher's "
                                              "--tpa-branches)."),
            teacher_forced: bool = typer.Option(False, help="Generate nothing: the student's top-B candidates on "
                                                            "the reference answers (one forward per sample)."),
            batch_size: int = typer.Option(8, help="Prompts per generate call."),
            unit_size: int = typer.Option(64, help="Source samples per work unit (one parquet file each)."),
            device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
            dtype: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16."),
            limit: Optional[int] = typer.Option(None, help="Only the first N samples."),
            skip_bad: bool = typer.Option(False, help="Leave bad samples out (listed in rollout.json) instead of "
                                                      "stopping."),
            max_length: Optional[int] = typer.Option(None, help="Refuse prompts longer than this."),
            nproc: int = typer.Option(1, help="Student processes: re-runs this command under torchrun (one per GPU); "
                                              "replicas (--tp-size ranks each) split the work units."),
            tp_size: int = typer.Option(1, help="Ranks per student replica: the student is tensor-parallel over them "
                                                "(transformers' tp_plan)."),
            max_memory: Optional[str] = typer.Option(None, help="A rank's memory for the fit check before loading "
                                                     "(e.g. 70GiB)."),
            config: Optional[Path] = typer.Option(None, help=CONFIG_HELP)):
    """The student answers every assistant turn of every sample (on-policy rows for dump-teacher; resumable)."""
    from alignti.student_rollout.rollout import RolloutConfig, rollout as run
    manifest = _run(run, _stage_config(ctx, config, RolloutConfig))
    _echo_main(json.dumps(manifest["counts"]))


@app.command("select-layer")
def select_layer(ctx: typer.Context, teacher: str = typer.Option(...), data: str = typer.Option(...),
                 images: Optional[str] = typer.Option(None),
                 samples: int = typer.Option(256), batch_size: int = typer.Option(8), device: str = typer.Option("auto"),
                 out: Optional[Path] = typer.Option(None, help="Write the IRS curve as JSON (and a PNG beside it)."),
                 nproc: int = typer.Option(1, help="Processes (torchrun): with --tp-size, one tensor-parallel "
                                                   "teacher over them."),
                 tp_size: int = typer.Option(1, help="Ranks the teacher is tensor-parallel over (transformers' "
                                                     "tp_plan); --nproc must equal it."),
                 max_memory: Optional[str] = typer.Option(None, help="A rank's memory for the fit check before "
                                                          "loading (e.g. 70GiB).")):
    """Instruction-Relevance Score of every teacher layer; names l*."""
    _check_options(ctx)
    _relaunch(nproc, tp_size)
    from alignti.teacher_dump.select_layer import render_curve, save_plot, select_layer_command

    irs = _run(select_layer_command, teacher, data, images, samples, batch_size, device, tp_size, max_memory)
    if irs is None:  # a rank that is not rank 0 under torchrun
        return
    typer.echo(render_curve(irs))
    if out:
        out.write_text(json.dumps(irs, indent=2))
        if save_plot(irs, str(out.with_suffix(".png"))):
            typer.echo(f"plot: {out.with_suffix('.png')}")


@app.command("train-student")
def train_student(ctx: typer.Context,
                  student: Optional[str] = typer.Option(None, help="Student checkpoint (local path or hub id). "
                                                                   "Required."),
                  cache: Optional[list[str]] = typer.Option(None, help="Cache path or fsspec URL. Required. Repeat "
                                                            "for several caches: each micro-batch is drawn from one "
                                                            "of them by --cache-weights."),
                  out: Optional[Path] = typer.Option(None, help="Run directory. Required."),
                  cache_weights: Optional[list[str]] = typer.Option(None, help="With several --cache: each one's "
                                                                    "share of the micro-batches, comma-separated in "
                                                                    "--cache order (e.g. 0.5,0.5; GKD's on-policy "
                                                                    "share λ is the rollout cache's). Default: by "
                                                                    "sample count."),
                  init: Optional[str] = typer.Option(None, help="Start from an earlier run's weights (RUN/final, "
                                                     "else RUN/checkpoint) with a fresh optimizer and step count."),
                  loss: str = typer.Option("kd", help="sft | kd | rkl | jsd | kd+iva | kd+tpa | alignti"),
                  kd_weight: float = typer.Option(1.0, help="Weight of the KD term."),
                  iva_weight: float = typer.Option(1.0, help="Weight of the IVA term."),
                  tpa_weight: float = typer.Option(1.0, help="Weight of the TPA term."),
                  tpa_weighting: str = typer.Option("teacher", help="TPA's weights over the cached candidates: teacher "
                                                    "(its first-step probabilities) or student (the student's own, "
                                                    "detached, renormalised over the candidates: the paper samples "
                                                    "candidates from the student)."),
                  iva_ratio: float = typer.Option(0.25, help="Fraction of image tokens IVA aligns (the teacher's "
                                                  "most salient; token-kl: fixed by the dump's --iva-token-ratio)."),
                  iva_form: str = typer.Option("attention", help="IVA as attention (the student's instruction-to-"
                                               "image attention matches the teacher's on its salient tokens) or "
                                               "token-kl (KL of the output distributions at those tokens, weighted "
                                               "by the teacher's saliency; dump with --iva-token-kl)."),
                  temperature: float = typer.Option(1.0, help="Distillation temperature; the cache's own "
                                                    "(dump-teacher --temperature, 1 by default) unless "
                                                    "--approximate-temperature."),
                  approximate_temperature: bool = typer.Option(False, help="Allow a --temperature other than the "
                                                               "cache's: its top-k + rest are tempered with the rest "
                                                               "bucket as one lump (an approximation; refused "
                                                               "without this flag, naming the exact range)."),
                  student_layer: Optional[int] = typer.Option(None, help="Default: teacher's l* by relative depth."),
                  max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimizer steps."),
                  epochs: int = typer.Option(1, help="Passes over the cache (when --max-steps is not set)."),
                  lr: float = typer.Option(1e-3, help="Peak learning rate (AdamW, warmup then cosine)."),
                  batch_size: int = typer.Option(8, help="Samples per micro-batch (per process)."),
                  grad_accum: int = typer.Option(1, help="Micro-batches per optimizer step."),
                  warmup_steps: int = typer.Option(10, help="Linear warmup steps."),
                  weight_decay: float = typer.Option(0.0, help="AdamW weight decay (matrices only)."),
                  max_grad_norm: float = typer.Option(1.0, help="Clip the gradient's global norm to this."),
                  save_every: int = typer.Option(100, help="Checkpoint every N steps (for --resume)."),
                  resume: bool = typer.Option(False, help="Continue from the run directory's checkpoint, with the "
                                              "run's own settings (to train longer: a new run with --init RUN)."),
                  seed: int = typer.Option(0, help="Seed of the data order and the model's randomness."),
                  device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
                  images: Optional[str] = typer.Option(None, help="Images dir, if moved since the dump."),
                  data: Optional[str] = typer.Option(None, help="The dump's data source, if moved since the dump "
                                                                "(images embedded in parquet / datasets are read "
                                                                "from it)."),
                  workers: Optional[int] = typer.Option(None, help="DataLoader worker processes (default: 4 on a GPU, 0 on CPU)."),
                  fsdp: bool = typer.Option(False, help="Shard the student with FSDP2 (fully_shard) instead of DDP."),
                  freeze_vision: bool = typer.Option(False, help="Keep the student's vision encoder fixed."),
                  trainable: Optional[str] = typer.Option(None, help="What trains fully: all, projector, lm, vision "
                                                          "(comma-separated for several), or a regex searched in "
                                                          "parameter names; the rest is frozen. LLaVA's stage 1: "
                                                          "projector. Default: all; with --lora-r: none (only the "
                                                          "adapters)."),
                  lora_r: Optional[int] = typer.Option(None, help="LoRA rank (peft) on the LM's linear layers; the "
                                                       "base weights freeze. RUN/final is saved merged."),
                  lora_alpha: Optional[float] = typer.Option(None, help="LoRA's alpha: updates scaled by alpha / r "
                                                             "(default 2 r)."),
                  lora_targets: Optional[str] = typer.Option(None, help="LoRA's modules: names (comma-separated, "
                                                             "matching name ends, e.g. q_proj,v_proj) or a regex "
                                                             "matched against whole module names. Default: every "
                                                             "linear layer of the LM (never the LM head)."),
                  lora_dropout: float = typer.Option(0.0, help="Dropout on LoRA's input."),
                  save_adapter: bool = typer.Option(False, help="With --lora-r: also save peft's adapter folder "
                                                    "RUN/adapter beside the merged RUN/final."),
                  gradient_checkpointing: bool = typer.Option(False, help="Recompute each decoder and vision layer "
                                                              "in backward (0.2x activation memory, 1.3-1.45x time on "
                                                              "an H200)."),
                  checkpoint_every: int = typer.Option(1, help="With --gradient-checkpointing: checkpoint every N-th "
                                                       "layer (2: 0.6x memory, 1.26x time)."),
                  checkpoint_reentrant: bool = typer.Option(False, help="With --gradient-checkpointing: reentrant "
                                                            "checkpoints (forward without autograd graph; not with "
                                                            "--fsdp)."),
                  group_by_length: bool = typer.Option(True, help="Batch samples of similar length together "
                                                       "(inside shuffled mega-batches of 50 batches): less padding."),
                  shuffle_window: int = typer.Option(2048, help="Samples shuffled together each epoch: the cache's "
                                                     "parts in random order, taken a window of whole parts at a "
                                                     "time (each part read once; the window's parts held decoded "
                                                     "per DataLoader worker). A cache this small or smaller is "
                                                     "shuffled whole; 0: within each part only."),
                  report_to: list[str] = typer.Option(["none"], help="Experiment trackers: none, tensorboard "
                                                      "(RUN/tensorboard), wandb (honours WANDB_MODE=offline); repeat "
                                                      "the flag or comma-separate for several."),
                  skip_nonfinite: bool = typer.Option(False, help="Skip (and log) an optimizer step whose loss "
                                                      "or gradient norm is NaN or infinite; by default such a step "
                                                      "stops the run, naming it and the last good checkpoint."),
                  cross_tokenizer: Optional[str] = typer.Option(None, help="gold: a student whose tokenizer or "
                                                                "processor differs from the teacher's encodes each "
                                                                "sample itself; the KD term aligns both by text "
                                                                "(cache schema v7). uld and alm are refused, naming "
                                                                "why (they did not teach on shipped tokenizers)."),
                  nproc: int = typer.Option(1, help="Data-parallel processes: re-runs this command under torchrun "
                                                    "(DDP; gloo on CPU, nccl on GPU)."),
                  config: Optional[Path] = typer.Option(None, help=CONFIG_HELP)):
    """Train a student from the cache alone (under torchrun: DDP, or FSDP2 with --fsdp)."""
    from alignti.student_train.cross import NOT_OFFERED
    from alignti.student_train.trainer import TrainConfig, train_student as run
    cfg = _stage_config(ctx, config, TrainConfig)
    if cfg.cross_tokenizer in NOT_OFFERED:
        log.error("--cross-tokenizer %s is not offered: %s", cfg.cross_tokenizer, NOT_OFFERED[cfg.cross_tokenizer])
        raise typer.Exit(2)
    _echo_main(json.dumps(_run(run, cfg), default=str))


@app.command("inspect-cache")
def inspect_cache(cache: str = typer.Argument(...), as_json: bool = typer.Option(False, "--json")):
    """Samples, tokens, k, bytes/token on disk, compression vs full-vocab fp16, fingerprint."""
    from alignti.common.inspect import cache_summary, render_summary
    info = _run(cache_summary, cache)
    typer.echo(json.dumps(info, indent=2) if as_json else render_summary(info))


@app.command("validate-cache")
def validate_cache(cache: str = typer.Argument(...),
                   repair: bool = typer.Option(False, help="Local caches: drop the damaged parts' commit markers and "
                                                           "the manifest, so re-running the same dump-teacher "
                                                           "command redoes only those parts.")):
    """Re-check every object's sha256, every chunk's crc32c, counts and offsets."""
    from alignti.common.cache import mark_for_redump, validate_cache as run
    damaged: list[str] = []
    problems = _run(run, cache, damaged_parts=damaged)
    for p in problems:
        typer.echo(f"DAMAGED: {p}")
    if problems:
        if repair and damaged and "://" not in cache:
            mark_for_redump(cache, damaged)
            typer.echo(f"marked part(s) {', '.join(damaged)} for re-dump: re-run the dump-teacher command that "
                       "made this cache")
        raise typer.Exit(1)
    typer.echo("ok")


@app.command("push-cache")
def push_cache(cache: Path = typer.Argument(..., help="A finished local cache."),
               url: str = typer.Argument(..., help="Destination fsspec URL (s3://bucket/cache, file://..., ...).")):
    """Upload a cache to object storage (manifest last) and verify every object's sha256 there."""
    from alignti.common.cache import push_cache as run
    typer.echo(json.dumps(_run(run, cache, url)))


@app.command("evaluate")
def evaluate(ctx: typer.Context, model: str = typer.Option(..., help="The model folder to score (a run's final/, "
                                                                  "a teacher, any checkpoint of a supported family)."),
             data: Optional[str] = typer.Option(None, help="Samples to answer: JSON/JSONL, parquet or a datasets "
                                                "folder (or --lmms-eval)."),
             images: Optional[str] = typer.Option(None, help="The folder image paths are relative to."),
             teacher_answers: Optional[Path] = typer.Option(None, help="JSON {sample_id: answer} to compare with."),
             cache: Optional[str] = typer.Option(None, help="Report mean per-token KL to this teacher cache."),
             limit: Optional[int] = typer.Option(None, help="Score only the first N samples."),
             device: str = typer.Option("auto", help="auto (cuda when there is one), cpu or cuda."),
             answers_out: Optional[Path] = typer.Option(None, help="Write this model's answers as JSON."),
             max_new_tokens: int = typer.Option(8, help="Longest answer generated (tokens); the demo's "
                                                "long-form split needs 48."),
             lmms_eval: Optional[str] = typer.Option(None, "--lmms-eval", help="Score with lmms-eval instead: "
                                                     "comma-separated task names (lmms-eval runs in its own env: docs/how-to/lmms-eval.md; "
                                                     "scores go to RUN/eval/, metrics.jsonl, the trackers)."),
             include_path: Optional[Path] = typer.Option(None, help="With --lmms-eval: a folder of local tasks "
                                                         "(alignti export-task)."),
             as_json: bool = typer.Option(False, "--json", help="Print the whole report as JSON (per question "
                                                                 "type accuracy included)."),
             skip_bad: bool = typer.Option(False, "--skip-bad", help="Leave out samples that do not parse or whose "
                                           "image is missing (listed in the report's 'skipped') instead of refusing "
                                           "them, as dump-teacher --skip-bad does.")):
    """Greedy answers: exact-match accuracy, agreement with a teacher, KL to a cache; or lmms-eval's scores."""
    _check_options(ctx)
    if (data is None) == (lmms_eval is None):
        log.error("evaluate needs either --data (alignti's exact match) or --lmms-eval TASKS (lmms-eval's scores), "
                  "one per run")
        raise typer.Exit(2)
    if lmms_eval is not None:
        from alignti.common.models import resolve_device
        from alignti.student_train.lmms_harness import evaluate_lmms
        res = _run(evaluate_lmms, model, lmms_eval, include_path=include_path, limit=limit,
                   device=str(resolve_device(device)))
        typer.echo(json.dumps({k: v for k, v in res.items() if k != "answers"}, indent=2))
        return
    from alignti.student_train.evaluate import evaluate as run
    res = _run(run, model, data, images, teacher_answers=teacher_answers, cache=cache, limit=limit,
               device=device, answers_out=answers_out, max_new_tokens=max_new_tokens, skip_bad=skip_bad)
    typer.echo(json.dumps(res, indent=2) if as_json else
               "\n".join(f"{k}: {v}" for k, v in res.items() if k != "per_type"))


@app.command("export-task")
def export_task(ctx: typer.Context,
                data: str = typer.Option(..., help="The split: LLaVA JSON/JSONL, parquet or a datasets folder."),
                images: Optional[str] = typer.Option(None, help="The folder image paths are relative to."),
                out: Path = typer.Option(..., help="Task folder (NAME.yaml, NAME.parquet, utils.py): pass it to "
                                         "evaluate --include-path or lmms-eval's --include_path."),
                name: Optional[str] = typer.Option(None, help="Task name (default alignti_<split file stem>)."),
                max_new_tokens: int = typer.Option(8, help="The task's longest answer (tokens), as evaluate's."),
                skip_bad: bool = typer.Option(False, "--skip-bad", help="Leave out samples that do not parse or "
                                              "whose image is missing (named in the log) instead of refusing them, "
                                              "as evaluate --skip-bad does.")):
    """A LLaVA-style split as a local lmms-eval task (exact match, the split read from local files)."""
    _check_options(ctx)
    from alignti.student_train.lmms_harness import export_task as run
    typer.echo(json.dumps(_run(run, data, images, out, name=name, max_new_tokens=max_new_tokens,
                               skip_bad=skip_bad), indent=2))


@app.command("quickstart")
def quickstart(ctx: typer.Context,
               workdir: Path = typer.Option(Path("quickstart"), help="Work directory (re-running reuses finished steps)."),
               seeds: int = typer.Option(3, help="Student seeds per method."),
               fast: bool = typer.Option(False, help="The ~3-minute preset."),
               device: str = typer.Option("auto", help="auto, cpu, cuda."),
               workers: Optional[int] = typer.Option(None, help="Student runs side by side (default: 2 on CPU, 1 on GPU)."),
               config: Optional[Path] = typer.Option(None, help=CONFIG_HELP + " It may also hold `methods` (a list) "
                                                                "and `overrides` (preset settings).")):
    """make-demo -> dump-teacher -> train sft/kd/kd+iva/kd+tpa/alignti -> evaluate -> results table."""
    from alignti.demo.quickstart import METHODS, QuickstartConfig, quickstart as run, render_table
    o = _run(_resolve, ctx, config, file_only={"methods": list(METHODS), "overrides": {}})
    res = _run(run, QuickstartConfig(**{**o, "workdir": str(o["workdir"]), "methods": tuple(o["methods"])}))
    typer.echo(render_table(res))
    workdir = Path(o["workdir"])
    typer.echo(f"\nwritten: {workdir / 'results.md'}, {workdir / 'results.json'}, {workdir / 'curves.png'}, "
               f"{workdir / 'config.yaml'} ({res['total_seconds']:.0f} s)")


@app.command("rounds")
def rounds(config: Path = typer.Option(..., help="The rounds YAML (`alignti config rounds` prints a commented "
                                                 "template).")):
    """K on-policy rounds: rollout -> dump-teacher -> train-student, each in its own folder; re-run to resume."""
    from alignti.workflows.rounds import load_config, run_rounds
    cfg = _run(load_config, config)
    res = _run(run_rounds, cfg, str(config))
    typer.echo(json.dumps(res, indent=2))


@app.command("show-saliency")
def show_saliency(ctx: typer.Context, cache: str = typer.Argument(...), sample: str = typer.Option(..., help="Sample id."),
                  out: Path = typer.Option(..., help="PNG to write."),
                  student: Optional[str] = typer.Option(None, help="A student checkpoint: its saliency beside."),
                  turn: int = typer.Option(0, help="Assistant turn (multi-turn samples)."),
                  images: Optional[str] = typer.Option(None, help="Images dir, if moved since the dump."),
                  data: Optional[str] = typer.Option(None, help="The dump's data source, if moved (embedded images).")):
    """The image with the teacher's cached saliency as a heatmap (and a student's beside it)."""
    _check_options(ctx)
    from alignti.student_train.show_saliency import show_saliency as run
    typer.echo(json.dumps(_run(run, cache, sample, out, student=student, turn=turn, images=images, data=data)))


@app.command("make-student")
def make_student(ctx: typer.Context,
                 out: Path = typer.Option(..., help="Folder for the student (save_pretrained: model, processor, "
                                          "chat template, generation config)."),
                 vision: Optional[str] = typer.Option(None, help="Composed: the vision tower (a vision model, CLIP/SigLIP, "
                                                      "or a VLM's tower; Qwen-VL families: a checkpoint of the "
                                                      "family's kind, its visual tower taken, the merger (and "
                                                      "Qwen3-VL's deepstack mergers) made fresh)."),
                 lm: Optional[str] = typer.Option(None, help="Composed: the language model, of the family's "
                                                  "decoder kind (Qwen3-VL: Qwen3; Gemma 3: a Gemma 3 text model) and "
                                                  "the teacher's tokenizer (LLaVA families: or of its own, which "
                                                  "the student keeps and trains with --cross-tokenizer)."),
                 like: Optional[str] = typer.Option(None, help="Composed: the teacher whose family, processor and "
                                                    "caches the student fits."),
                 from_teacher: Optional[str] = typer.Option(None, help="Pruned: the teacher to take layers from."),
                 keep_layers: Optional[str] = typer.Option(None, help="Pruned: decoder layers to keep, e.g. '0-3,8,15' "
                                                           "or 'every 2' (0, 2, 4, ... and the last)."),
                 keep_vision_layers: Optional[str] = typer.Option(None, help="Pruned: vision layers to keep (same "
                                                                  "form); default all."),
                 seed: int = typer.Option(0, help="Composed: seed of the fresh projector's initialisation.")):
    """Build a student: --vision V --lm L --like TEACHER (pretrained parts, fresh projector), or --from-teacher T
    --keep-layers SPEC (the teacher's layers, bit for bit). Prints its parameter count."""
    _check_options(ctx)
    composed, pruned = (vision, lm, like), (from_teacher, keep_layers)
    if any(v is not None for v in composed) == any(v is not None for v in pruned) or (
            any(v is not None for v in composed) and None in composed) or (
            any(v is not None for v in pruned) and None in pruned):
        log.error("make-student needs either --vision, --lm and --like (a student from parts) or --from-teacher and "
                  "--keep-layers (a pruned teacher)")
        raise typer.Exit(2)
    if from_teacher is not None:
        from alignti.student_build.prune import prune_student
        info = _run(prune_student, from_teacher, keep_layers, out, keep_vision_layers=keep_vision_layers)
    else:
        from alignti.student_build.compose import compose_student
        info = _run(compose_student, vision, lm, like, out, seed=seed)
    typer.echo(json.dumps(info, indent=2))


CONFIGURABLE = ("dump-teacher", "rollout", "train-student", "quickstart", "rounds")  # every command with --config


@app.command("config")
def config_template(command: str = typer.Argument(..., help="dump-teacher, rollout, train-student, quickstart or "
                                                  "rounds."),
                    source: Optional[str] = typer.Option(None, "--from",
                                                         help="A cache (dump-teacher), a run directory (train-student, "
                                                              "quickstart) or a rounds workdir: print the "
                                                              "configuration it was made with.")):
    """Print a commented configuration template for COMMAND (or, with --from, the one a cache or run was made with)."""
    from alignti.common.config import render
    if command not in CONFIGURABLE:
        log.error("no configuration file for '%s'; choose one of %s", command, ", ".join(CONFIGURABLE))
        raise typer.Exit(2)
    if source is not None:
        typer.echo(_run(_config_from, command, source), nl=False)
        return
    if command == "rounds":  # nested sections: a hand-written template (workflows/rounds.py, tested to load)
        from alignti.workflows.rounds import template
        typer.echo(template(), nl=False)
        return
    cmd = typer.main.get_command(app).commands[command]
    values, comments = {}, {}
    for p in cmd.params:
        if p.name == "config" or not p.expose_value:
            continue
        values[p.name] = p.default() if callable(p.default) else p.default
        comments[p.name] = (p.help or "").replace(" Required.", "") + (" (required)" if p.name in _REQUIRED.get(command, ())
                                                                        else "")
        if values[p.name] is None and "[default:" in comments[p.name]:  # a default resolved at run time (top_k)
            comments[p.name] += " null: that default."
    if command == "quickstart":
        from alignti.demo.quickstart import METHODS, OVERRIDE_KEYS, PRESETS
        values["methods"] = list(METHODS)
        comments["methods"] = "Methods to train and compare."
        values["overrides"] = {}
        comments["overrides"] = ("Preset settings to change, e.g. {student_steps: 400, n_test: 600}: "
                                 + ", ".join(OVERRIDE_KEYS) + f". Default preset: {PRESETS['default']}")
    typer.echo(render(values, header=f"alignti {command} configuration: `alignti {command} --config THIS_FILE`; flags "
                                     "given on the command line override these values.", comments=comments), nl=False)


_REQUIRED = {"dump-teacher": ("teacher", "data", "out"), "train-student": ("student", "cache", "out"),
             "rollout": ("student", "data", "out")}


def _config_from(command: str, source: str) -> str:
    from alignti.common.config import ConfigError, read_config, render
    if command == "dump-teacher":
        from alignti.common.cache import CacheReader
        made = dict(CacheReader(source).manifest.get("dump_config") or {})
        if not made:
            raise ConfigError(f"the cache at {source} records no dump settings (made before they were recorded)")
        cmd = typer.main.get_command(app).commands[command]
        keys = [p.name for p in cmd.params if p.name not in ("config", "nproc")]
        made = {k: made[k] for k in keys if k in made}
        return render(made, header=f"alignti dump-teacher, as run for the cache at {source}: `alignti dump-teacher "
                                   "--config THIS_FILE` runs it again")
    path = Path(source) / ("rounds.yaml" if command == "rounds" else "config.yaml")
    if not path.is_file():
        raise ConfigError(f"{source} holds no config.yaml (is it a {command} run directory?)")
    read_config(path)  # a file that is not valid YAML is named, not printed
    return path.read_text(encoding="utf-8")


def main():  # console script entry point
    app()


if __name__ == "__main__":
    sys.exit(app())
