"""alignti beside TRL's online distillation (``trl.experimental.gold.GOLDTrainer``, TRL 1.16.0) on the same pair.

Both tools train the same student initialisation (the quickstart's ``kit/student-seedS``: a fresh small LM and
projector on the teacher's frozen vision tower) from the same teacher, on the same records (the quickstart's
``train_all.json``: 900 short questions + 150 long-form descriptions), with the same steps, batch, learning rate and
schedule (AdamW, 10 warm-up steps, cosine to 0.1 x lr, gradient norm clipped at 1), temperature 1 and seeds, and are
scored the quickstart's way (1,500 short test questions, exact match; 150 long-form ones, exact match and all-fields
F1; greedy; paired 95% intervals over seeds, ``demo.quickstart.paired_interval``).

1. **off-policy, same objective**: ``alignti train-student --loss kd`` from the cache (SFT + forward KL on the
   cached top-k + rest) against GOLDTrainer with ``lmbda=0`` (the reference answers only) and ``beta=0``. In TRL
   1.16's generalized JSD ``beta=0`` is forward KL(teacher || student) (``F.kl_div(student_log_probs,
   teacher_log_probs, log_target=True)``; ``beta=1`` is reverse KL). GOLD's JSD path has no cross-entropy term, so
   the TRL arm adds alignti's SFT term (cross-entropy on the same labels, same token mean) in a 10-line subclass
   (``--trl-sft 0``: TRL as shipped, KD alone). GOLD divides the logits by ``temperature`` and does not multiply by
   tau^2; at the temperature 1 used here both are plain KL.
2. **on-policy**: ``alignti rounds`` (2 rounds of rollout -> dump-teacher -> train-student, lambda 0.5, loss kd,
   half the steps each) against GOLDTrainer with ``lmbda=0.5`` (each step is the student's own sampled answers with
   probability 0.5), at the same student step budget; plus the teacher forwards each made (sequences through the
   teacher: the dumps' rows against TRL's per-step batches).
3. **many students**: one teacher serving N = 1, 3, 5 students: alignti's one dump + N trainings against N TRL runs,
   totals from the measured jobs of section 1 (the first N seeds; an N beyond them at the jobs' mean, marked), and
   the crossover N printed.
4. ``--scale`` (meant for a GPU; time and memory only): bench/scale.py's pair at real shapes (Qwen2-0.5B-shaped
   student, Qwen2-7B-shaped teacher, vocabulary 151,936, CLIP-L 576 image tokens, random weights) on one batch of
   scale.py's realistic mix, each arm in its own process: the dump's teacher pass, train-student's kd step from
   cache tensors, and GOLD's step with the teacher resident (its ``generalized_jsd_loss`` at beta 0 on full logits +
   SFT); seconds per batch, peak memory, and the crossover N when each student trains one epoch.
   ``--layers 1 --vision-layers 1 --narrow 8 --scale-batch 1 --device cpu`` checks the mechanics on a CPU.

GOLD 1.16 samples on-policy answers from the whole vocabulary, image placeholder included, and a sampled placeholder
fails the next forward; the TRL arm suppresses it (as TRL's DistillationTrainer and alignti's rollout do).

Every training job runs in its own process (its wall time with imports and model loading, and its peak RSS from
``getrusage``), one torch thread each and ``--workers`` jobs side by side; alignti jobs in this env, TRL jobs in the
TRL env. Each job writes ``WORK/jobs/NAME/result.json`` and is not redone when the command is run again, so an
interrupted run resumes by re-running the same command; ``WORK/results.json`` holds every figure.

The TRL env (git-ignored ``.venv-trl/``; torch first so pip takes the local CPU wheel, the main env's transformers
and accelerate pinned so TRL cannot move them; alignti editable for the kit's processor and the same scoring)::

    python -m venv .venv-trl && .venv-trl/bin/pip install torch==2.13.0 && \\
      .venv-trl/bin/pip install -e . trl==1.16.0 transformers==5.25.0 accelerate==1.16.0

Runs (the default: the quickstart's kit, 800 steps, batch 16, lr 3e-3, 3 off-policy seeds, 2 on-policy seeds)::

    nice -n 19 python bench/peer_trl.py --workdir /work/trl-run/default > /work/trl-run/default.log 2>&1 &
    python bench/peer_trl.py --workdir /tmp/peer-smoke --preset smoke      # mechanics only, minutes
    python bench/peer_trl.py --workdir /tmp/peer-scale --scale --device cuda   # GPU, real shapes, time and memory

``--quickstart DIR`` reuses a finished quickstart's kit (its teacher is not retrained). Figures: bench/README.md,
"Beside TRL's online distillation".
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _util import ROOT, table  # noqa: E402  (sets HF_HUB_OFFLINE)

log = logging.getLogger("bench.peer_trl")

# the bench's sizes: ``kit`` is the quickstart preset whose kit (teacher, students, data) both tools train on
PRESETS = {
    # 3 + 2 seeds: the whole default run fits 30 minutes on a quiet 2-core CPU (bench/README.md)
    "default": dict(kit="default", steps=800, seeds=3, onpolicy_seeds=2, test_limit=None, long_limit=None),
    # mechanics only: the quickstart's fast kit (a 150-step teacher), 16 steps, 2 + 1 seeds, 60 / 10 test questions
    "smoke": dict(kit="fast", steps=16, seeds=2, onpolicy_seeds=1, test_limit=60, long_limit=10),
}
LMBDA = 0.5            # the on-policy share, both tools (GKD's lambda; alignti rounds' lambda)
ROUNDS = 2
MAX_NEW_TOKENS = 48    # on-policy generations, both tools (demo.shapes.LONG_FORM_MAX_NEW_TOKENS: the longest answer 41)
# the cache the kd loss needs: top-k + rest (the dump's default k, 64 of the demo's 320 tokens); no TPA, no saliency
DUMP = dict(tpa_branches=0, saliency_layer="none")
TRL_PYTHON = ROOT / ".venv-trl" / "bin" / "python"
POLL_S = 10.0          # how often a job started by an earlier invocation is checked for its result


# ---------------------------------------------------------------------------------------------------------------
# bookkeeping (unit-tested in tests/test_peer_trl.py; no TRL needed)

def peak_rss_mib() -> float:
    """This process's peak resident set size in MiB: Linux's ``VmHWM`` (/proc/self/status, the high-water mark of
    this program's own address space, new at exec), else ``getrusage`` (Linux KiB, macOS bytes). Not ``getrusage``
    on Linux: its ``ru_maxrss`` carries the parent's resident size at fork across the exec, so a job started by a
    parent that has trained the kit's teacher (1.3 GiB) reported that figure for every job."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def totals(dump_s: float, alignti_s: list[float], trl_s: list[float], ns=(1, 3, 5)) -> list[dict]:
    """Total seconds for N students of one teacher: alignti = one dump + the first N training jobs, TRL = the first
    N training jobs (the teacher's forward is inside each). An N beyond the measured jobs is extrapolated with the
    jobs' mean (``measured`` False). Returns [{"n", "alignti", "trl", "ratio" (trl / alignti), "measured"}]."""
    out = []
    for n in ns:
        def first(xs, n=n):
            return sum(xs[:n]) + max(0, n - len(xs)) * statistics.mean(xs)
        a, t = dump_s + first(alignti_s), first(trl_s)
        out.append({"n": n, "alignti": a, "trl": t, "ratio": t / a, "measured": n <= min(len(alignti_s), len(trl_s))})
    return out


def crossover(dump_s: float, alignti_job_s: float, trl_job_s: float) -> int | None:
    """The smallest number of students N for which one dump + N alignti jobs take less time than N TRL jobs:
    dump + N a < N t, i.e. N > dump / (t - a). None when a TRL job is not slower than an alignti job (never)."""
    if trl_job_s <= alignti_job_s:
        return None
    return math.floor(dump_s / (trl_job_s - alignti_job_s)) + 1


def paired(a: list[float], b: list[float]) -> dict:
    """The quickstart's paired 95% interval of a - b over seeds (demo.quickstart.paired_interval)."""
    from alignti.demo.quickstart import paired_interval
    return paired_interval(a, b)


def interval(p: dict, scale: float = 100.0) -> str:
    """'+1.2 [-0.3, +2.7]' (points by default)."""
    lo = "-" if p["low"] is None else f"[{scale * p['low']:+.1f}, {scale * p['high']:+.1f}]"
    return f"{scale * p['mean']:+.1f} {lo}"


# ---------------------------------------------------------------------------------------------------------------
# jobs: each runs in its own process (``--job DIR``), writes DIR/result.json

def _records_for_trl(data: Path, images: str) -> list[dict]:
    """The records as TRL's VLM prompt-completion rows: the user turn's image block and text, the answer as the
    assistant's completion (the template renders '<image>\\n' + text, as alignti's encoding of '<image>\\nQ')."""
    from PIL import Image
    rows = []
    for r in json.loads(Path(data).read_text()):
        user, answer = r["conversations"][0]["value"], r["conversations"][1]["value"]
        text = user.replace("<image>\n", "", 1).replace("<image>", "", 1)
        img = Image.open(Path(images) / r["image"]).convert("RGB")
        rows.append({"images": [img],
                     "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
                     "completion": [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]})
    return rows


def job_trl(spec: dict) -> dict:
    """GOLDTrainer (lmbda, beta 0, temperature 1) on the kit: the student with its vision tower frozen as alignti's
    --freeze-vision does, the teacher resident; RUN/final saved the way train-student saves."""
    import torch
    import torch.nn.functional as F
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl.experimental.gold import GOLDConfig, GOLDTrainer

    from alignti.common.adapters import adapter_for
    from alignti.common.saving import save_checkpoint
    from alignti.student_train.trainable import apply_trainable

    counts = {"teacher_rows": 0, "teacher_calls": 0, "generated_rows": 0, "on_policy_slices": 0}
    sft = spec["trl_sft"]

    class Trainer(GOLDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, out = super().compute_loss(model, inputs, True, num_items_in_batch)
            if sft:  # alignti's kd = SFT + forward KL: the same cross-entropy on the same labels and token mean
                labels = inputs["labels"][:, 1:]
                ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                     reduction="sum")
                n = num_items_in_batch if num_items_in_batch is not None else (labels != -100).sum().clamp_min(1)
                loss = loss + ce / n
            return (loss, out) if return_outputs else loss

        def generate_on_policy_outputs(self, model, inputs, generation_config):
            # GOLD samples from the whole vocabulary, image placeholder included: a sampled placeholder makes the
            # next forward fail ("Image features and image tokens do not match"). TRL's DistillationTrainer
            # suppresses it, GOLD 1.16 does not; alignti's rollout never samples it. Suppressed here the same way.
            generation_config.suppress_tokens = [image_token_id]
            res = super().generate_on_policy_outputs(model, inputs, generation_config)
            counts["generated_rows"] += res[0].shape[0]
            counts["on_policy_slices"] += 1
            return res

    torch.manual_seed(spec["seed"])
    proc = AutoProcessor.from_pretrained(spec["student"])
    image_token_id = proc.tokenizer.convert_tokens_to_ids(proc.image_token)
    student = AutoModelForImageTextToText.from_pretrained(spec["student"], dtype=torch.float32)
    teacher = AutoModelForImageTextToText.from_pretrained(spec["teacher"], dtype=torch.float32)

    def count(_m, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        counts["teacher_rows"] += int(ids.shape[0])
        counts["teacher_calls"] += 1
    teacher.register_forward_pre_hook(count, with_kwargs=True)
    apply_trainable(student, adapter_for(student), None, freeze_vision=True)
    rows = _records_for_trl(spec["data"], spec["images"])
    cuda = spec["device"].startswith("cuda")
    args = GOLDConfig(
        output_dir=str(Path(spec["out"]) / "trl"), max_steps=spec["steps"], per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1, learning_rate=spec["lr"], lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=10, weight_decay=0.0, max_grad_norm=1.0,
        seed=spec["seed"], data_seed=spec["seed"], lmbda=spec["lmbda"], beta=0.0, temperature=1.0, top_p=1.0,
        top_k=0, max_completion_length=MAX_NEW_TOKENS, seq_kd=False, disable_dropout=True,
        gradient_checkpointing=False, bf16=cuda, fp16=False, use_cpu=not cuda, logging_steps=50,
        save_strategy="no", report_to="none", disable_tqdm=True, dataloader_drop_last=True,
        remove_unused_columns=False)
    trainer = Trainer(model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=proc)
    t = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t
    student.generation_config.do_sample = False
    save_checkpoint(student, proc, Path(spec["out"]) / "final")
    losses = [x["loss"] for x in trainer.state.log_history if "loss" in x]
    return {"train_seconds": train_s, "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None, "teacher_forward_rows": counts["teacher_rows"],
            "teacher_forward_calls": counts["teacher_calls"], "generated_rows": counts["generated_rows"],
            "on_policy_steps": counts["on_policy_slices"], "steps": trainer.state.global_step}


def _train_settings(spec: dict, steps: int) -> dict:
    from alignti.demo.quickstart import DEMO_TRAIN
    return dict(loss="kd", max_steps=steps, batch_size=spec["batch"], lr=spec["lr"], seed=spec["seed"],
                save_every=steps, workers=0, freeze_vision=True, temperature=1.0, **DEMO_TRAIN)


def job_dump(spec: dict) -> dict:
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher
    t = time.perf_counter()
    dump_teacher(DumpConfig(teacher=spec["teacher"], data=spec["data"], images=spec["images"], out=spec["out"],
                            device=spec["device"], progress=False, top_k=spec.get("top_k"), **DUMP))
    return {"dump_seconds": time.perf_counter() - t,
            "teacher_forward_rows": len(json.loads(Path(spec["data"]).read_text()))}


def job_alignti_kd(spec: dict) -> dict:
    from alignti.student_train.trainer import TrainConfig, train_student
    t = time.perf_counter()
    train_student(TrainConfig(student=spec["student"], cache=spec["cache"], out=spec["out"], device=spec["device"],
                              progress=False, **_train_settings(spec, spec["steps"])))
    return {"train_seconds": time.perf_counter() - t, "teacher_forward_rows": 0}


def job_alignti_rounds(spec: dict) -> dict:
    """alignti rounds: 2 rounds, lambda 0.5 beside the shared reference cache, half the steps each, loss kd."""
    from alignti.workflows.rounds import resolve, run_rounds
    t = time.perf_counter()
    cfg = resolve({"workdir": str(Path(spec["out"]) / "rounds"), "teacher": spec["teacher"],
                   "student": spec["student"], "data": spec["data"], "images": spec["images"],
                   "reference_cache": spec["cache"], "rounds": ROUNDS, "lambda": LMBDA, "replay": 1,
                   "device": spec["device"],
                   "rollout": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": MAX_NEW_TOKENS, "top_b": 4,
                               "seed": 1000 * spec["seed"]},
                   "dump": dict(DUMP), "train": _train_settings(spec, spec["steps"] // ROUNDS)}, "bench")
    r = run_rounds(cfg, "bench", progress=False)
    rows = [json.loads((Path(x["rollout"]) / "rollout.json").read_text())["counts"]["rows"] for x in r["rounds"]]
    stages = json.loads((Path(spec["out"]) / "rounds" / "rounds.json").read_text())["stages"]
    final = Path(spec["out"]) / "final"
    if not final.exists():
        final.symlink_to(Path(r["final"]).resolve())
    return {"train_seconds": time.perf_counter() - t, "teacher_forward_rows": sum(rows), "rollout_rows": rows,
            "stage_seconds": {k: v.get("seconds") for k, v in stages.items()}}


def job_score(spec: dict) -> dict:
    """The quickstart's test figures of one trained student: short test exact match, long-form exact and F1."""
    from alignti.common.models import load_vlm, resolve_device
    from alignti.demo.quickstart import long_form_scores
    from alignti.student_train.evaluate import AccuracyProbe
    model, proc = load_vlm(spec["model"], resolve_device(spec["device"]))
    data = Path(spec["data_dir"])
    test = AccuracyProbe(proc, str(data / "test.json"), spec["images"], limit=spec.get("test_limit"))
    long = long_form_scores(model, proc, data / "test_long.json", spec["images"], limit=spec.get("long_limit"))
    return {"test_accuracy": test(model, proc), "long_form": long}


def job_fidelity(spec: dict) -> dict:
    """How close a trained student is to the teacher, teacher-forced on ``limit`` evenly spaced cached training
    samples, per response token: the full-vocabulary KL(teacher || student) (what TRL's beta=0 minimises), the folded
    (k+1)-way KL on the cache's top-k + rest (what alignti's kd minimises: a lower bound of the full one, short by
    P_T(rest) KL(P_T(.|rest) || P_S(.|rest)), common/losses.py), the teacher's mean rest mass, and the student's
    cross-entropy on the reference tokens. Means over tokens; both models see the same batches."""
    import torch
    from alignti.common.adapters import adapter_for
    from alignti.common.batch import forward, lm_logits
    from alignti.common.cache import CacheReader
    from alignti.common.losses import fold_student, fold_teacher, kl
    from alignti.common.models import load_vlm, resolve_device
    from alignti.student_train.data import CacheDataset, StudentCollator, batch_to_device

    device = resolve_device(spec["device"])
    student, proc = load_vlm(spec["model"], device)
    teacher, _ = load_vlm(spec["teacher"], device)
    sa, ta = adapter_for(student), adapter_for(teacher)
    reader = CacheReader(spec["cache"])
    ds = CacheDataset(reader, proc)
    coll = StudentCollator(proc, type(sa))
    total = len(reader.samples)
    idx = list(range(0, total, max(1, total // (spec.get("limit") or total))))[:spec.get("limit") or total]
    sums = {"full_kl": 0.0, "folded_kl": 0.0, "rest_mass": 0.0, "ce": 0.0}
    n = 0
    with torch.no_grad():
        for i in range(0, len(idx), 16):
            batch = batch_to_device(coll([ds[j] for j in idx[i:i + 16]]), device)
            zs = lm_logits(sa, forward(sa, batch).resp_hidden).float()
            zt = lm_logits(ta, forward(ta, batch).resp_hidden).float()
            ls, lt = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
            sums["full_kl"] += float((lt.exp() * (lt - ls)).sum())
            sums["folded_kl"] += float(kl(fold_teacher(batch["topk_logprobs"], batch["tail_logmass"]),
                                          fold_student(zs, batch["topk_ids"])).sum())
            sums["rest_mass"] += float(batch["tail_logmass"].float().exp().sum())
            sums["ce"] += float(-ls.gather(-1, batch["targets"][:, None]).sum())
            n += len(zs)
    return {**{k: v / n for k, v in sums.items()}, "tokens": n}


JOBS = {"trl": job_trl, "dump": job_dump, "alignti_kd": job_alignti_kd, "alignti_rounds": job_alignti_rounds,
        "score": job_score, "fidelity": job_fidelity}
FIDELITY_SAMPLES = 256  # cached training samples the fidelity job reads (evenly spaced: short and long-form)


def job_main(job_dir: Path) -> None:
    """Run the job described by JOB_DIR/spec.json in this process; JOB_DIR/result.json gets its figures, its wall
    seconds in this process and its peak RSS."""
    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    spec = json.loads((job_dir / "spec.json").read_text())
    t = time.perf_counter()
    res = JOBS[spec["kind"]](spec)
    res.update(kind=spec["kind"], job_seconds=time.perf_counter() - t, peak_rss_mib=peak_rss_mib())
    (job_dir / "result.json").write_text(json.dumps(res, indent=1))


def _alive(pid_file: Path) -> bool:
    """Whether the job process whose id ``pid_file`` holds still runs (a job an earlier invocation started)."""
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    try:  # a recycled id: only a peer_trl job process counts
        return "peer_trl.py\0--job" in Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return True


def run_job(work: Path, name: str, spec: dict, python: str | Path, threads: int = 1) -> dict:
    """Run one job in its own process (``python bench/peer_trl.py --job``) unless WORK/jobs/NAME/result.json exists
    (a job still running from an earlier invocation, WORK/jobs/NAME/pid, is waited for, not started twice);
    adds ``process_seconds`` (the process's wall time, imports and loading included). Raises RuntimeError naming
    the job and its log when the process fails."""
    d = work / "jobs" / name
    running = _alive(d / "pid")
    while running and not (d / "result.json").is_file():  # started by an earlier invocation and still running
        time.sleep(POLL_S)
        running = _alive(d / "pid")
    if (d / "result.json").is_file():
        res = json.loads((d / "result.json").read_text())
        if "process_seconds" not in res and (d / "pid").is_file():  # finished after the invocation that started it
            res["process_seconds"] = (d / "result.json").stat().st_mtime - (d / "pid").stat().st_mtime
            (d / "result.json").write_text(json.dumps(res, indent=1))
        return res
    d.mkdir(parents=True, exist_ok=True)
    spec = dict(spec, out=spec.get("out", str(d)))
    (d / "spec.json").write_text(json.dumps(spec, indent=1))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    t = time.perf_counter()
    with open(d / "log.txt", "w") as fh:
        proc = subprocess.Popen([str(python), str(Path(__file__).resolve()), "--job", str(d)], stdout=fh,
                                stderr=subprocess.STDOUT, env=env)
        (d / "pid").write_text(str(proc.pid))
        code = proc.wait()
    if code != 0 or not (d / "result.json").is_file():
        raise RuntimeError(f"job {name} failed (exit {code}); its log: {d / 'log.txt'}")
    res = json.loads((d / "result.json").read_text())
    res["process_seconds"] = time.perf_counter() - t
    (d / "result.json").write_text(json.dumps(res, indent=1))
    log.info("%s: %.0f s, peak RSS %.0f MiB", name, res["process_seconds"], res["peak_rss_mib"])
    return res


# ---------------------------------------------------------------------------------------------------------------
# section 4: real shapes (bench/scale.py's pair, random weights), time and memory only; meant for a GPU

def scale_child(a) -> dict:
    """One process, one arm (``a.scale_arm``) on one realistic batch: "dump": the dump's teacher pass
    (``teacher_batch``: top-k + rest at scale.py's k, no TPA, no saliency); "alignti": train-student's kd step
    (``StudentStep``) from cache tensors of that shape; "trl": GOLD's off-policy step (student forward + backward,
    the resident teacher's forward, ``GOLDTrainer.generalized_jsd_loss`` at beta 0 on full logits, plus the SFT
    term), each with AdamW. Seconds per batch (median after one warm-up) and the process's peak: the allocator's
    (CUDA) or RSS (CPU), MiB, weights and optimizer state included."""
    import torch
    import torch.nn.functional as F
    import scale as sc
    from alignti.common.adapters import LlavaAdapter, adapter_for
    from alignti.common.batch import collate, to_device
    from alignti.common.losses import LossWeights, StepNorm, get_loss
    from alignti.student_train.step import StudentStep
    from alignti.teacher_dump.compute import teacher_batch

    device = torch.device(a.device)
    torch.manual_seed(0)
    samples = sc.synthetic_samples(sc.realistic_lengths(a.scale_batch, seed=3), seed=3)
    batch = to_device(collate(samples, 0, LlavaAdapter), device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    res = {"arm": a.scale_arm, "batch": a.scale_batch, "response_tokens": int(len(batch["targets"])),
           "sequence": int(batch["input_ids"].shape[1])}

    def timed(fn, repeat):
        fn()
        sc.sync(device)
        out = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            sc.sync(device)
            out.append(time.perf_counter() - t)
        return statistics.median(out)

    if a.scale_arm == "dump":
        teacher = sc.build("teacher", a.layers, a.vision_layers, device, a.narrow).eval()
        adapter = adapter_for(teacher)
        params = {"top_k": sc.K, "tpa_branches": 0, "tpa_top_k": sc.K2, "saliency_layer": None, "tpa_positions": 1.0}
        dtype = next(teacher.parameters()).dtype
        tb = dict(batch, image_inputs={k: v.to(dtype) for k, v in batch["image_inputs"].items()})

        def step():
            with torch.no_grad():
                teacher_batch(adapter, tb, params)["topk_ids"].sum().item()
    elif a.scale_arm == "alignti":
        student = sc.build("student", a.layers, a.vision_layers, device, a.narrow).float().train()
        sb = sc.student_batch(samples, 1.0, device)  # the cache's top-k tensors (random values, the dump's shapes)
        step_mod = StudentStep(student, adapter_for(student), get_loss("kd"), 0, LossWeights())
        norm = StepNorm(tokens=float(len(sb["targets"])))
        opt = torch.optim.AdamW(student.parameters(), lr=1e-5)

        def step():
            with autocast:
                out = step_mod(sb, norm)
            out["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
    else:
        from trl.experimental.gold import GOLDTrainer
        teacher = sc.build("teacher", a.layers, a.vision_layers, device, a.narrow).eval()
        pix = {k: v.to(next(teacher.parameters()).dtype) for k, v in batch["image_inputs"].items()}
        student = sc.build("student", a.layers, a.vision_layers, device, a.narrow).float().train()
        opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
        labels = torch.full_like(batch["input_ids"], -100)
        for b, pos in enumerate(batch["resp_pos"]):
            labels[b, pos] = batch["input_ids"][b, pos]  # resp_pos: the response tokens' own positions
        mask = batch["valid"].long()

        def step():
            with autocast:
                s_logits = student(input_ids=batch["input_ids"], attention_mask=mask, **batch["image_inputs"]).logits
                with torch.no_grad():
                    t_logits = teacher(input_ids=batch["input_ids"], attention_mask=mask, **pix).logits
                lab = labels[:, 1:]
                loss = GOLDTrainer.generalized_jsd_loss(s_logits[:, :-1], t_logits[:, :-1], labels=lab, beta=0.0,
                                                        temperature=1.0)
                loss = loss + F.cross_entropy(s_logits[:, :-1].flatten(0, 1).float(), lab.flatten(), ignore_index=-100)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
    res["step_s"] = timed(step, a.repeat)
    res["peak_mib"] = _peak_mib(device)
    return res


def _peak_mib(device) -> float:
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return peak_rss_mib()


def scale_main(a) -> None:
    """Section 4: both arms, each in its own process of the TRL env, and their ratios."""
    out = {}
    for arm in ("dump", "alignti", "trl"):
        cmd = [a.trl_python, str(Path(__file__).resolve()), "--scale-arm", arm, "--device", a.device,
               "--scale-batch", str(a.scale_batch), "--repeat", str(a.repeat), "--narrow", str(a.narrow)]
        cmd += ["--layers", str(a.layers)] if a.layers else []
        cmd += ["--vision-layers", str(a.vision_layers)] if a.vision_layers else []
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"scale arm {arm} failed:\n{r.stderr[-3000:]}")
        out[arm] = json.loads(r.stdout.strip().splitlines()[-1])
    du, al, tr = out["dump"], out["alignti"], out["trl"]
    print(f"\nreal shapes ({a.device}, batch {a.scale_batch}, {al['response_tokens']} response tokens, sequence "
          f"{al['sequence']}; layers {a.layers or 'full'}, vision layers {a.vision_layers or 'full'})")
    print(table([["alignti dump (teacher pass, top-k)", f"{du['step_s']:.3f}", f"{du['peak_mib']:,.0f}"],
                 ["alignti train step (kd, cache)", f"{al['step_s']:.3f}", f"{al['peak_mib']:,.0f}"],
                 ["TRL GOLD step (lmbda 0, teacher resident)", f"{tr['step_s']:.3f}", f"{tr['peak_mib']:,.0f}"]],
                ["job", "s per batch", "peak MiB"]))
    n = crossover(du["step_s"], al["step_s"], tr["step_s"])
    print(f"RATIO scale: TRL / alignti step time {tr['step_s'] / al['step_s']:.2f}, peak memory "
          f"{tr['peak_mib'] / al['peak_mib']:.2f}; one epoch per student: crossover N = {n if n else 'never'}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


# ---------------------------------------------------------------------------------------------------------------
# the comparison

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default="/work/trl-run/default")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--quickstart", help="a finished quickstart's work dir: its kit (teacher, students, data)")
    ap.add_argument("--seeds", type=int, help="off-policy seeds (default: the preset's)")
    ap.add_argument("--onpolicy-seeds", type=int, help="on-policy seeds (default: the preset's; 0 skips section 2)")
    ap.add_argument("--steps", type=int, help="student steps (default: the preset's)")
    ap.add_argument("--top-k", type=int, help="the cache's k (default: the dump's, 64; the demo vocabulary, 320, "
                    "is the whole distribution)")
    ap.add_argument("--trl-sft", type=int, default=1, help="1: the TRL arm adds alignti's SFT term (same objective); "
                    "0: TRL's GOLD loss as shipped (KD alone)")
    ap.add_argument("--trl-python", default=str(TRL_PYTHON), help="the TRL env's python")
    ap.add_argument("--no-score", action="store_true", help="time and memory only (e.g. a kit whose teacher was "
                    "not trained: --quickstart DIR of `make_demo(..., train_teacher=False)`)")
    ap.add_argument("--workers", type=int, default=2, help="jobs side by side, one torch thread each")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scale", action="store_true", help="section 4: real shapes, time and memory (a GPU run)")
    ap.add_argument("--scale-arm", choices=("dump", "alignti", "trl"), help=argparse.SUPPRESS)
    ap.add_argument("--scale-batch", type=int, default=8)
    ap.add_argument("--layers", type=int, help="--scale: decoder layers of both models (default: full depth)")
    ap.add_argument("--vision-layers", type=int, help="--scale: vision layers (default: full depth)")
    ap.add_argument("--narrow", type=int, default=1, help="--scale: hidden and MLP widths divided by this (a CPU "
                    "check of the mechanics; 1 on a GPU)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="--scale: write the figures here")
    a = ap.parse_args()
    if a.job:
        return job_main(Path(a.job))
    if a.scale_arm:
        print(json.dumps(scale_child(a)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not Path(a.trl_python).is_file():
        raise SystemExit(f"no TRL env at {a.trl_python}: create it with the command in this script's docstring")
    if a.scale:
        return scale_main(a)
    compare(a)


def compare(a) -> None:
    from alignti.demo import quickstart as qs
    p = dict(PRESETS[a.preset])
    p.update({k: v for k, v in (("seeds", a.seeds), ("onpolicy_seeds", a.onpolicy_seeds), ("steps", a.steps))
              if v is not None})
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    kp = qs.PRESETS[p["kit"]]
    t0 = time.perf_counter()
    base = Path(a.quickstart) if a.quickstart else work
    info = qs.ensure_kit(base, kp, a.device)
    kit = base / "kit"
    train_data, _ = qs.student_train_data(kit, kp)
    images = str(kit / "data" / "images")
    seeds = max(p["seeds"], p["onpolicy_seeds"])
    students = {s: str(qs._student_for_seed(kit, s)) for s in range(seeds)}
    stage = {"kit_seconds_this_run": time.perf_counter() - t0, "teacher_training_seconds": info.get("teacher_seconds")}
    common = dict(teacher=str(kit / "teacher"), data=str(train_data), images=images, device=a.device,
                  batch=kp["batch_size"], lr=kp["lr"], steps=p["steps"])
    score_spec = dict(data_dir=str(kit / "data"), images=images, device=a.device, test_limit=p["test_limit"],
                      long_limit=p["long_limit"])
    main_py = sys.executable
    cache = str(work / "jobs" / "dump" / "cache")

    def scored(name: str, kind: str, seed: int, python, **extra) -> dict:
        spec = dict(common, kind=kind, seed=seed, student=students[seed], **extra)
        res = run_job(work, name, spec, python)
        dump_f.result()  # the fidelity job reads the cache
        res["fidelity"] = run_job(work, f"{name}-fidelity", dict(
            kind="fidelity", model=str(work / "jobs" / name / "final"), teacher=common["teacher"], cache=cache,
            device=a.device, limit=FIDELITY_SAMPLES), main_py)
        if a.no_score:
            return res
        res["score"] = run_job(work, f"{name}-score", dict(score_spec, kind="score",
                                                          model=str(work / "jobs" / name / "final")), main_py)
        return res

    with ThreadPoolExecutor(a.workers) as ex:
        dump_f = ex.submit(run_job, work, "dump", dict(common, kind="dump", out=cache, top_k=a.top_k), main_py)

        def after_dump(fn, *args, **kw):
            dump_f.result()
            return fn(*args, **kw)
        futs = {}
        for s in range(p["seeds"]):
            futs[("trl-l0", s)] = ex.submit(scored, f"trl-l0-seed{s}", "trl", s, a.trl_python, lmbda=0.0,
                                            trl_sft=a.trl_sft)
            futs[("alignti-kd", s)] = ex.submit(after_dump, scored, f"alignti-kd-seed{s}", "alignti_kd", s, main_py,
                                                cache=cache)
        for s in range(p["onpolicy_seeds"]):
            futs[(f"trl-l{LMBDA}", s)] = ex.submit(scored, f"trl-l{LMBDA}-seed{s}", "trl", s, a.trl_python,
                                                   lmbda=LMBDA, trl_sft=a.trl_sft)
            futs[("alignti-rounds", s)] = ex.submit(after_dump, scored, f"alignti-rounds-seed{s}", "alignti_rounds",
                                                    s, main_py, cache=cache)
        dump = dump_f.result()
        runs: dict[str, list[dict]] = {}
        for (arm, s), f in futs.items():
            runs.setdefault(arm, []).append(f.result())
    results = {"preset": a.preset, "settings": p, "kit": str(kit), "trl_sft": a.trl_sft, "top_k": a.top_k,
               "stage": stage, "dump": dump, "runs": runs, "comparisons": {}}
    report(results, runs, dump, p)
    (work / "results.json").write_text(json.dumps(results, indent=1))


def _arm_row(label: str, rs: list[dict], extra_forwards: int = 0) -> list:
    if all("score" in r for r in rs):
        acc = [r["score"]["test_accuracy"] for r in rs]
        lf = [r["score"]["long_form"] for r in rs]
        scores = [f"{100 * statistics.mean(acc):.1f} ± {100 * statistics.pstdev(acc):.1f}",
                  f"{100 * statistics.mean(x['exact'] for x in lf):.1f}",
                  f"{100 * statistics.mean(x['fields'] for x in lf):.1f}"]
    else:
        scores = ["-", "-", "-"]
    fid = [f"{statistics.mean(r['fidelity'][k] for r in rs):.3f}" if all("fidelity" in r for r in rs) else "-"
           for k in ("full_kl", "folded_kl")]
    return [label, len(rs), *scores, *fid,
            f"{statistics.mean(r['process_seconds'] for r in rs):.0f}",
            f"{statistics.mean(r['job_seconds'] for r in rs):.0f}",
            f"{max(r['peak_rss_mib'] for r in rs):.0f}",
            f"{statistics.mean(r['teacher_forward_rows'] for r in rs) + extra_forwards:,.0f}"]


HEADER = ["arm", "seeds", "test acc.", "long exact", "long F1", "full KL", "folded KL", "process s", "job s",
          "peak RSS MiB",
          "teacher rows / student"]


def _compare(results: dict, key: str, a_rs: list[dict], b_rs: list[dict]) -> dict:
    """Paired (by seed) alignti - TRL differences and the TRL / alignti ratios of one comparison."""
    n = min(len(a_rs), len(b_rs))
    a_rs, b_rs = a_rs[:n], b_rs[:n]
    c = {"seeds": n,
         "time_ratio": statistics.mean(r["process_seconds"] for r in b_rs) /
                       statistics.mean(r["process_seconds"] for r in a_rs),
         "rss_ratio": max(r["peak_rss_mib"] for r in b_rs) / max(r["peak_rss_mib"] for r in a_rs)}
    if all("score" in r for r in a_rs + b_rs):
        for key, get in (("test_accuracy", lambda r: r["score"]["test_accuracy"]),
                         ("long_exact", lambda r: r["score"]["long_form"]["exact"]),
                         ("long_fields", lambda r: r["score"]["long_form"]["fields"])):
            c[key] = paired([get(r) for r in a_rs], [get(r) for r in b_rs])
    results["comparisons"][key] = c
    return c


def _seeds(n: int) -> str:
    return f"{n} seed" + ("" if n == 1 else "s")


def _score_text(c: dict) -> str:
    if "test_accuracy" not in c:
        return f" ({_seeds(c['seeds'])}, not scored)"
    return (f"; alignti - TRL test accuracy {interval(c['test_accuracy'])}, long-form exact "
            f"{interval(c['long_exact'])}, long-form F1 {interval(c['long_fields'])} ({_seeds(c['seeds'])})")


def report(results: dict, runs: dict, dump: dict, p: dict) -> None:
    print(f"\nalignti vs TRL {results.get('trl_version', '1.16.0')} GOLDTrainer, {p['steps']} steps "
          f"(dump: {dump['process_seconds']:.0f} s, {dump['teacher_forward_rows']:,} teacher rows, peak RSS "
          f"{dump['peak_rss_mib']:.0f} MiB)")
    rows = []
    if "alignti-kd" in runs:
        rows.append(_arm_row("alignti kd (cache)", runs["alignti-kd"]))
        rows.append(_arm_row("TRL GOLD lmbda 0", runs["trl-l0"]))
    on = f"trl-l{LMBDA}"
    if "alignti-rounds" in runs:
        rows.append(_arm_row(f"alignti rounds x{ROUNDS}, lambda {LMBDA}", runs["alignti-rounds"],
                             dump["teacher_forward_rows"]))
        rows.append(_arm_row(f"TRL GOLD lmbda {LMBDA}", runs[on]))
    print(table(rows, HEADER))
    print("(process s: each training process's wall time, imports included; job s: from the job's start in that "
          "process (loading, data, training, saving); peak RSS of that process; alignti rounds' teacher rows add the "
          "shared reference dump's; full / folded KL: KL(teacher || student) per response token on the whole "
          "vocabulary / on the cache's top-k + rest, teacher-forced on 256 training samples)")
    if "alignti-kd" in runs:
        c = _compare(results, "offpolicy", runs["alignti-kd"], runs["trl-l0"])
        print(f"RATIO offpolicy: TRL / alignti job time {c['time_ratio']:.2f}, peak RSS {c['rss_ratio']:.2f}"
              + _score_text(c))
    if "alignti-rounds" in runs:
        c = _compare(results, "onpolicy", runs["alignti-rounds"], runs[on])
        fw_a = statistics.mean(r["teacher_forward_rows"] for r in runs["alignti-rounds"])
        fw_t = statistics.mean(r["teacher_forward_rows"] for r in runs[on])
        c["teacher_rows"] = {"alignti_per_student": fw_a, "alignti_shared_reference": dump["teacher_forward_rows"],
                             "trl_per_student": fw_t}
        print(f"RATIO onpolicy: TRL / alignti job time {c['time_ratio']:.2f}, peak RSS {c['rss_ratio']:.2f}, "
              f"teacher rows {fw_t / (fw_a + dump['teacher_forward_rows']):.2f} ({fw_t:,.0f} vs {fw_a:,.0f} + "
              f"{dump['teacher_forward_rows']:,} shared)" + _score_text(c))
    if "alignti-kd" in runs:
        a_s = [r["process_seconds"] for r in runs["alignti-kd"]]
        t_s = [r["process_seconds"] for r in runs["trl-l0"]]
        tot = totals(dump["process_seconds"], a_s, t_s)
        n_star = crossover(dump["process_seconds"], statistics.mean(a_s), statistics.mean(t_s))
        results["many_students"] = {"totals": tot, "crossover_n": n_star}
        print(table([[t["n"], f"{t['alignti']:.0f}", f"{t['trl']:.0f}", f"{t['ratio']:.2f}",
                      "yes" if t["measured"] else "mean"] for t in tot],
                    ["students", "alignti dump + N jobs s", "N TRL jobs s", "TRL / alignti", "measured"]))
        print("RATIO students: TRL / alignti total time " + ", ".join(f"N={t['n']} {t['ratio']:.2f}" for t in tot)
              + f"; crossover N = {n_star if n_star is not None else 'never'}")


if __name__ == "__main__":
    main()
