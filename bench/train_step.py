"""Student step from the cache (all Align-TI losses on) vs plain SFT step vs online KD (teacher forward
in the same step), at a ~10:1 teacher:student parameter ratio; also peak memory of each.

Goals: cache step <= 1.10x SFT step, >= 3x faster than online KD.
Run: python bench/train_step.py [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _util import IMAGE_TOKENS_HELP, demo_kit, device_name, patch_for, table, timeit

import torch  # noqa: E402

FREEZE_VISION = "--freeze-vision" in sys.argv
VARIANTS = ("sft", "cache-kd", "cache-kd+iva", "cache-kd+tpa", "cache-alignti", "online-kd")


def setup(work: Path, device: torch.device, batch_size: int, need_teacher: bool = True, image_tokens: int = 576):
    from transformers import AutoProcessor
    from alignti.demo.kit import STUDENT, build_model
    from alignti.common.adapters import adapter_for
    from alignti.common.cache import CacheReader
    from alignti.common.models import load_vlm
    from alignti.student_train.data import CacheDataset, StudentCollator, batch_to_device
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher

    kit = demo_kit(work / f"kit-{image_tokens}", train_teacher=False, image_tokens=image_tokens)
    proc = AutoProcessor.from_pretrained(kit / "student")
    teacher_dir = work / f"teacher-10x-{image_tokens}"
    if not (teacher_dir / "config.json").exists():
        t = build_model("llava", proc.tokenizer, dict(hidden_size=176, intermediate_size=528, num_hidden_layers=6,
                                                      num_attention_heads=4, num_key_value_heads=2), 0,
                        patch_for(image_tokens))
        t.save_pretrained(teacher_dir)
        proc.save_pretrained(teacher_dir)
    cache = work / f"cache-10x-{image_tokens}"
    if not (cache / "manifest.json").exists():
        shutil.rmtree(cache, ignore_errors=True)
        dump_teacher(DumpConfig(teacher=str(teacher_dir), data=str(kit / "data/train.json"),
                                images=str(kit / "data/images"), out=str(cache), limit=64, saliency_layer="3",
                                progress=False))
    teacher = load_vlm(str(teacher_dir), device)[0] if need_teacher else None
    student, sproc = load_vlm(str(kit / "student"), device)
    reader = CacheReader(cache)
    ds = CacheDataset(reader, sproc)
    batch = batch_to_device(StudentCollator(sproc, type(adapter_for(student)))(
        [ds[i] for i in range(batch_size)]), device)
    return (teacher.eval() if teacher is not None else None), student.train(), batch, reader


def make_step(variant, teacher, student, batch, reader):
    from alignti.common.adapters import adapter_for
    from alignti.common.batch import forward, lm_head, lm_logits
    from alignti.common.losses import LossWeights, get_loss, head_loss
    from alignti.student_train.step import student_step_outputs
    from alignti.student_train.trainer import student_layer_for

    sa, ta = adapter_for(student), (adapter_for(teacher) if teacher is not None else None)
    if FREEZE_VISION:  # train-student --freeze-vision, the same in every variant
        sa.vision_tower.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    layer = student_layer_for(None, reader.params["saliency_layer"], reader.params["teacher_layers"], sa.num_layers)
    spec = get_loss("kd" if variant == "online-kd" else variant.removeprefix("cache-"))
    w = LossWeights()

    def step():
        if variant == "online-kd":
            with torch.no_grad():
                t_logits = lm_logits(ta, forward(ta, batch).resp_hidden).float()
            s_logits = lm_logits(sa, forward(sa, batch).resp_hidden).float()
            lt, ls = torch.log_softmax(t_logits, -1), torch.log_softmax(s_logits, -1)
            loss = torch.nn.functional.cross_entropy(s_logits, batch["targets"]) + (lt.exp() * (lt - ls)).sum(-1).mean()
        else:
            loss = head_loss(spec, w, lm_head(sa), student_step_outputs(sa, batch, spec, layer))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def peak_memory(variant: str, args) -> float:
    """Peak memory of one variant, in its own process (MiB): GPU allocator peak, or process max RSS."""
    out = subprocess.run([sys.executable, __file__, "--only", variant, "--device", args.device, "--workdir",
                          args.workdir, "--batch-size", str(args.batch_size), "--image-tokens", str(args.image_tokens)]
                         + (["--freeze-vision"] if args.freeze_vision else []),
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "alignti-bench"))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--image-tokens", type=int, default=576, help=IMAGE_TOKENS_HELP)
    ap.add_argument("--freeze-vision", action="store_true", help="student vision encoder fixed in every variant")
    a = ap.parse_args()
    device = torch.device(a.device)
    torch.manual_seed(0)
    teacher, student, batch, reader = setup(Path(a.workdir), device, a.batch_size,
                                            need_teacher=a.only in (None, "online-kd"), image_tokens=a.image_tokens)
    if a.only:
        step = make_step(a.only, teacher, student, batch, reader)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            for _ in range(3):
                step()
            peak = torch.cuda.max_memory_allocated(device)
        else:  # process peak RSS above what the loaded models and batch already hold
            import os
            base = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for _ in range(3):
                step()
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        print(json.dumps({"peak_mib": peak / 2 ** 20}))
        return
    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    times = {v: timeit(make_step(v, teacher, student, batch, reader), device, a.repeat, warmup=2) for v in VARIANTS}
    mem = {v: peak_memory(v, a) for v in VARIANTS}
    print(f"device: {device_name(device)}; teacher {n_t / 1e6:.2f}M params, student {n_s / 1e6:.2f}M "
          f"(ratio {n_t / n_s:.1f}:1); batch {a.batch_size}, {len(batch['targets'])} response tokens")
    rows = [[v, f"{times[v] * 1e3:.1f}", f"{times[v] / times['sft']:.3f}", f"{mem[v]:.0f}"] for v in VARIANTS]
    print(table(rows, ["step", "ms", "x SFT step", "peak MiB" + (" (GPU allocated)" if device.type == "cuda"
                                                            else " (RSS above loaded models)")]))
    print(f"RATIO cache-alignti/sft = {times['cache-alignti'] / times['sft']:.3f} (goal <= 1.10); "
          f"online-kd/cache-alignti = {times['online-kd'] / times['cache-alignti']:.2f}x (goal >= 3); "
          f"cache-kd/sft = {times['cache-kd'] / times['sft']:.3f}, cache-kd+iva/sft = "
          f"{times['cache-kd+iva'] / times['sft']:.3f}, cache-kd+tpa/sft = {times['cache-kd+tpa'] / times['sft']:.3f}")


if __name__ == "__main__":
    main()
