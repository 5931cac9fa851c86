"""alignti command line: a thin typer layer over teacher_dump/, student_train/ and common/."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from alignti.common.errors import AlignTIError
from alignti.common.progress import setup_logging

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
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


def _echo_main(text: str) -> None:
    """Print a command's result once (rank 0) when it runs under torchrun."""
    from alignti.common.distributed import dist_env
    if dist_env().is_main:
        typer.echo(text)


def _relaunch(nproc: int) -> None:
    """``--nproc N`` (N > 1): hand this very command to torchrun with N processes, then exit with its code."""
    from alignti.common.distributed import dist_env, run_under_torchrun, strip_nproc
    if nproc > 1 and not dist_env().distributed:
        raise typer.Exit(run_under_torchrun(nproc, strip_nproc(sys.argv[1:])))


@app.command("make-demo")
def make_demo(out: Path = typer.Argument(..., help="Directory for the demo kit."),
              train_teacher: bool = typer.Option(True, help="Train the tiny teacher on the shapes task."),
              teacher_steps: int = typer.Option(2000, help="Most teacher training steps."),
              teacher_target: float = typer.Option(0.9, help="Stop teacher training at this validation exact match."),
              teacher_batch: int = typer.Option(64, help="Teacher training batch size."),
              teacher_lr: float = typer.Option(3e-4, help="Teacher learning rate (3e-3 stalls at the answer prior)."),
              teacher_grounding: float = typer.Option(1.0, help="Weight of the teacher's auxiliary grounding loss "
                                                      "(its answer-position attention on the named cells); 0: plain SFT."),
              device: str = typer.Option("auto", help="Where the teacher trains: auto, cpu, cuda."),
              n_train: int = typer.Option(300, help="Training images (3 questions each)."),
              n_val: int = typer.Option(40), n_test: int = typer.Option(60),
              seed: int = typer.Option(0),
              family: str = typer.Option("llava", help="Model family of the tiny checkpoints: llava, qwen2_vl or llava_onevision.")):
    """Write a self-contained demo kit: tiny LLaVA teacher/student, tokenizer, shapes VQA data."""
    from alignti.demo.kit import make_demo as run
    info = _run(run, out, n_train=n_train, n_val=n_val, n_test=n_test, train_teacher=train_teacher,
                teacher_steps=teacher_steps, seed=seed, family=family,
                teacher_lr=teacher_lr, teacher_target=teacher_target, teacher_batch=teacher_batch,
                grounding=teacher_grounding, device=device)
    typer.echo(json.dumps(info, indent=2))


@app.command("dump-teacher")
def dump_teacher(teacher: str = typer.Option(..., help="Teacher checkpoint (local path or hub id)."),
                 data: Path = typer.Option(..., help="LLaVA JSON/JSONL data file."),
                 images: Path = typer.Option(..., help="Directory the data's image paths are relative to."),
                 out: Path = typer.Option(..., help="Cache directory to write."),
                 top_k: int = typer.Option(32, help="Top-k log-probs kept per response token."),
                 batch_size: int = typer.Option(8), device: str = typer.Option("auto"),
                 limit: Optional[int] = typer.Option(None, help="Only the first N samples."),
                 skip_bad: bool = typer.Option(False, help="Record bad samples as skipped instead of stopping."),
                 tpa_branches: int = typer.Option(4, help="TPA branch candidates per token (0: no TPA stats)."),
                 tpa_top_k: int = typer.Option(8, help="Top-k kept per branch distribution."),
                 tpa_positions: float = typer.Option(1.0, help="TPA position budget: the fraction of each sample's "
                                                     "response positions that get TPA statistics, chosen where the "
                                                     "teacher's next-token entropy is highest (1: all)."),
                 saliency_layer: str = typer.Option("auto", help="auto (IRS), a layer index, or none."),
                 irs_samples: int = typer.Option(256, help="Calibration samples for --saliency-layer auto."),
                 unit_size: int = typer.Option(256, help="Samples per work unit (one committed part each)."),
                 max_length: Optional[int] = typer.Option(None, help="Refuse samples longer than this."),
                 dtype: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16."),
                 logprob_dtype: str = typer.Option("float16", help="Stored top-k log-probs: float16, or uint8 "
                                                                   "(1/16-nat log-space steps, ~27% smaller cache)."),
                 saliency_query: str = typer.Option("instruction", help="Saliency query positions: instruction "
                                                    "(the turn's instruction tokens) or answer (the position "
                                                    "predicting the first answer token)."),
                 nproc: int = typer.Option(1, help="Teacher replicas: re-runs this command under torchrun "
                                                   "(one per GPU); ranks split the work units.")):
    """Run the teacher once over the data and write the cache (resumable)."""
    _relaunch(nproc)
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher as run
    cfg = DumpConfig(teacher=teacher, data=str(data), images=str(images), out=str(out), top_k=top_k,
                     batch_size=batch_size, device=device, limit=limit, skip_bad=skip_bad, tpa_branches=tpa_branches,
                     tpa_top_k=tpa_top_k, saliency_layer=saliency_layer, irs_samples=irs_samples, unit_size=unit_size,
                     max_length=max_length, dtype=dtype, logprob_encoding=logprob_dtype,
                     saliency_query=saliency_query, tpa_positions=tpa_positions)
    manifest = _run(run, cfg)
    _echo_main(json.dumps(manifest["counts"]))


@app.command("select-layer")
def select_layer(teacher: str = typer.Option(...), data: Path = typer.Option(...), images: Path = typer.Option(...),
                 samples: int = typer.Option(256), batch_size: int = typer.Option(8), device: str = typer.Option("auto"),
                 out: Optional[Path] = typer.Option(None, help="Write the IRS curve as JSON (and a PNG beside it).")):
    """Instruction-Relevance Score of every teacher layer; names l*."""
    from alignti.common.conversation import Record, load_records
    from alignti.common.models import load_vlm, resolve_device
    from alignti.teacher_dump.select_layer import render_curve, save_plot, select_layer as run

    model, processor = load_vlm(teacher, resolve_device(device))
    records = [r for r in load_records(data) if isinstance(r, Record)]
    irs = _run(run, model, processor, records, str(images), n_samples=samples, batch_size=batch_size)
    typer.echo(render_curve(irs))
    if out:
        out.write_text(json.dumps(irs, indent=2))
        if save_plot(irs, str(out.with_suffix(".png"))):
            typer.echo(f"plot: {out.with_suffix('.png')}")


@app.command("train-student")
def train_student(student: str = typer.Option(..., help="Student checkpoint (local path or hub id)."),
                  cache: str = typer.Option(..., help="Cache path or fsspec URL."),
                  out: Path = typer.Option(..., help="Run directory."),
                  loss: str = typer.Option("kd", help="sft | kd | rkl | jsd | kd+iva | kd+tpa | alignti"),
                  kd_weight: float = typer.Option(1.0), iva_weight: float = typer.Option(1.0),
                  tpa_weight: float = typer.Option(1.0), iva_ratio: float = typer.Option(0.25),
                  temperature: float = typer.Option(1.0),
                  student_layer: Optional[int] = typer.Option(None, help="Default: teacher's l* by relative depth."),
                  max_steps: Optional[int] = typer.Option(None), epochs: int = typer.Option(1),
                  lr: float = typer.Option(1e-3), batch_size: int = typer.Option(8), grad_accum: int = typer.Option(1),
                  warmup_steps: int = typer.Option(10), weight_decay: float = typer.Option(0.0),
                  save_every: int = typer.Option(100), resume: bool = typer.Option(False), seed: int = typer.Option(0),
                  device: str = typer.Option("auto"),
                  images: Optional[str] = typer.Option(None, help="Images dir, if moved since the dump."),
                  workers: Optional[int] = typer.Option(None, help="DataLoader worker processes (default: 4 on a GPU, 0 on CPU)."),
                  nproc: int = typer.Option(1, help="Data-parallel processes: re-runs this command under torchrun "
                                                    "(DDP; gloo on CPU, nccl on GPU)."),
                  fsdp: bool = typer.Option(False, help="Shard the student with FSDP2 (fully_shard) instead of DDP."),
                  freeze_vision: bool = typer.Option(False, help="Keep the student's vision encoder fixed."),
                  gradient_checkpointing: bool = typer.Option(False, help="Recompute each decoder and vision layer "
                                                              "in backward (0.2x activation memory, 1.3-1.45x time on "
                                                              "an H200)."),
                  checkpoint_every: int = typer.Option(1, help="With --gradient-checkpointing: checkpoint every N-th "
                                                       "layer (2: 0.6x memory, 1.26x time)."),
                  checkpoint_reentrant: bool = typer.Option(False, help="With --gradient-checkpointing: reentrant "
                                                            "checkpoints (forward without autograd graph; not with "
                                                            "--fsdp)."),
                  group_by_length: bool = typer.Option(True, help="Batch samples of similar length together "
                                                       "(inside shuffled mega-batches of 50 batches): less padding.")):
    """Train a student from the cache alone (under torchrun: DDP, or FSDP2 with --fsdp)."""
    _relaunch(nproc)
    from alignti.student_train.trainer import TrainConfig, train_student as run
    cfg = TrainConfig(student=student, cache=cache, out=str(out), loss=loss, kd_weight=kd_weight,
                      iva_weight=iva_weight, tpa_weight=tpa_weight, iva_ratio=iva_ratio, temperature=temperature,
                      student_layer=student_layer, max_steps=max_steps, epochs=epochs, lr=lr, batch_size=batch_size,
                      grad_accum=grad_accum, warmup_steps=warmup_steps, weight_decay=weight_decay,
                      save_every=save_every, resume=resume, seed=seed, device=device, images=images, workers=workers,
                      fsdp=fsdp, freeze_vision=freeze_vision, gradient_checkpointing=gradient_checkpointing,
                      checkpoint_every=checkpoint_every, checkpoint_reentrant=checkpoint_reentrant,
                      group_by_length=group_by_length)
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
def evaluate(model: str = typer.Option(...), data: Path = typer.Option(...), images: Path = typer.Option(...),
             teacher_answers: Optional[Path] = typer.Option(None, help="JSON {sample_id: answer} to compare with."),
             cache: Optional[str] = typer.Option(None, help="Report mean per-token KL to this teacher cache."),
             limit: Optional[int] = typer.Option(None), device: str = typer.Option("auto"),
             answers_out: Optional[Path] = typer.Option(None, help="Write this model's answers as JSON."),
             as_json: bool = typer.Option(False, "--json")):
    """Greedy answers: exact-match accuracy, agreement with a teacher, KL to a cache."""
    from alignti.student_train.evaluate import evaluate as run
    res = _run(run, model, str(data), str(images), teacher_answers=teacher_answers, cache=cache, limit=limit,
               device=device, answers_out=answers_out)
    typer.echo(json.dumps(res, indent=2) if as_json else
               "\n".join(f"{k}: {v}" for k, v in res.items() if k != "per_type"))


@app.command("quickstart")
def quickstart(workdir: Path = typer.Option(Path("quickstart"), help="Work directory (re-running reuses finished steps)."),
               seeds: int = typer.Option(3), fast: bool = typer.Option(False, help="The ~3-minute preset."),
               device: str = typer.Option("auto"),
               workers: Optional[int] = typer.Option(None, help="Student runs side by side (default: 2 on CPU, 1 on GPU).")):
    """make-demo -> dump-teacher -> train sft/kd/kd+iva/kd+tpa/alignti -> evaluate -> results table."""
    from alignti.demo.quickstart import QuickstartConfig, quickstart as run, render_table
    res = _run(run, QuickstartConfig(workdir=str(workdir), seeds=seeds, fast=fast, device=device, workers=workers))
    typer.echo(render_table(res))
    typer.echo(f"\nwritten: {workdir / 'results.md'}, {workdir / 'results.json'}, {workdir / 'curves.png'} "
               f"({res['total_seconds']:.0f} s)")


@app.command("show-saliency")
def show_saliency(cache: str = typer.Argument(...), sample: str = typer.Option(..., help="Sample id."),
                  out: Path = typer.Option(..., help="PNG to write."),
                  student: Optional[str] = typer.Option(None, help="A student checkpoint: its saliency beside."),
                  turn: int = typer.Option(0, help="Assistant turn (multi-turn samples)."),
                  images: Optional[str] = typer.Option(None)):
    """The image with the teacher's cached saliency as a heatmap (and a student's beside it)."""
    from alignti.student_train.show_saliency import show_saliency as run
    typer.echo(json.dumps(_run(run, cache, sample, out, student=student, turn=turn, images=images)))


def main():  # console script entry point
    app()


if __name__ == "__main__":
    sys.exit(app())
