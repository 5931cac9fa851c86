"""dump-teacher wall time vs the same teacher's plain forward over the same batches.

Plain forward = the HF model's own forward (sdpa, full logits) over pre-encoded batches: no top-k,
no saliency, no writing. dump-teacher is timed from its first batch to its last committed part
(model load and IRS excluded, encoding of the data included). Goal: <= 1.10x.

Each dump runs once per ``--logprob-dtype`` (default: packed, then float16) at ``--top-k`` (default: the dump's
default, 64): the ratio packed / float16 of the dump's wall time says what the packed encoding costs, and the
writer thread's busy seconds (results to host, the codecs, compression, commit; it runs beside the teacher's
forward loop) say whether it stays off the critical path (writer busy < dump wall time: it does).
``--repeats N`` (default 1): N rounds, each running every arm (the plain forward, then each dump) once in turn; each
arm's fastest round is reported. On a shared, loaded machine one pass's timings move by tens of percent (and single
arms by several times) between arms run minutes apart; interleaved rounds put the arms under the same conditions.
Run: python bench/dump_overhead.py [--device cuda] [--logprob-dtype packed,float16] [--top-k 64] [--family F]
     [--repeats 3]

``--family`` (default llava): the demo kit's family (a registry model type with a kit); the big teacher is that
family's recipe with the larger LM. The plain forward gets the image-token type ids the family's processor returns
(``ModelAdapter.generation_inputs``: Qwen-VL's ``mm_token_type_ids``, Gemma 3's ``token_type_ids``).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from _util import IMAGE_TOKENS_HELP, demo_kit, device_name, patch_for, sync, table

import torch  # noqa: E402

from alignti.common.adapters import adapter_class  # noqa: E402
from alignti.common.conversation import encode  # noqa: E402
from alignti.common.records import Record  # noqa: E402
from alignti.common.sources import load_image, load_records  # noqa: E402
import alignti.teacher_dump.dump as dump_module  # noqa: E402
from alignti.teacher_dump.dump import DumpConfig, dump_teacher  # noqa: E402


def big_teacher(kit: Path, out: Path, hidden: int, layers: int, patch: int, family: str = "llava") -> Path:
    """The demo teacher's family and processor with a larger language model (realistic forward cost)."""
    if (out / "config.json").exists():
        return out
    from alignti.common.models import load_processor
    from alignti.common.saving import save_processor
    from alignti.demo.kit import build_model
    proc = load_processor(str(kit / "teacher"))  # image-only: the video half of some needs torchvision
    model = build_model(family, proc.tokenizer, dict(hidden_size=hidden, intermediate_size=4 * hidden,
                                                       num_hidden_layers=layers, num_attention_heads=8,
                                                       num_key_value_heads=8), 0,
                        patch if family == "llava" else None)
    model.save_pretrained(out)
    save_processor(proc, out)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "alignti-bench"))
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--image-tokens", type=int, default=576, help=IMAGE_TOKENS_HELP)
    ap.add_argument("--logprob-dtype", default="packed,float16",
                    help="Comma-separated encodings, each dump run once per encoding (packed, float16, uint8).")
    ap.add_argument("--top-k", type=int, default=None, help="Top-k per response token (default: the dump's, 64).")
    ap.add_argument("--family", default="llava", help="The demo kit's family (a registry model type with a kit).")
    ap.add_argument("--repeats", type=int, default=1, help="Rounds of every arm in turn; each arm's fastest is reported.")
    a = ap.parse_args()
    encodings = [e.strip() for e in a.logprob_dtype.split(",") if e.strip()]
    device = torch.device(a.device)
    work = Path(a.workdir)
    if a.family == "llava":
        kit = demo_kit(work / f"kit-{a.image_tokens}", train_teacher=False, image_tokens=a.image_tokens)
    else:  # the family's own image geometry (9 image tokens per 48-px scene)
        kit = work / f"kit-{a.family}"
        if not (kit / "teacher" / "config.json").exists():
            from alignti.demo.kit import make_demo
            make_demo(kit, n_train=100, n_val=20, n_test=20, train_teacher=False, family=a.family)
    teacher = big_teacher(kit, work / f"teacher-{a.family}-{a.hidden}x{a.layers}-{a.image_tokens}", a.hidden,
                          a.layers, patch_for(a.image_tokens), a.family)
    data, images = kit / "data" / "train.json", kit / "data" / "images"

    from alignti.common.models import load_vlm
    model, proc = load_vlm(str(teacher), device)
    recs = [r for r in load_records(data) if isinstance(r, Record)][:a.samples]
    t0 = time.perf_counter()
    enc = [encode(proc, r, *load_image(r, images)) for r in recs]
    t_encode = time.perf_counter() - t0
    pad = proc.tokenizer.pad_token_id
    batches = []
    for i in range(0, len(enc), a.batch_size):
        chunk = enc[i:i + a.batch_size]
        s = max(len(e.input_ids) for e in chunk)
        ids = torch.full((len(chunk), s), pad, dtype=torch.long)
        att = torch.zeros(len(chunk), s, dtype=torch.long)
        for b, e in enumerate(chunk):
            ids[b, :len(e.input_ids)] = torch.as_tensor(e.input_ids)
            att[b, :len(e.input_ids)] = 1
        adapter = adapter_class(model.config.model_type)
        img = adapter.generation_inputs(ids, adapter.collate_image_inputs([e.image_inputs for e in chunk]),
                                        int(model.config.image_token_id))
        batches.append((ids.to(device), att.to(device), {k: v.to(device) for k, v in img.items()}))

    @torch.no_grad()
    def plain():
        for ids, att, img in batches:
            model(input_ids=ids, attention_mask=att, **img)

    def timed_plain() -> float:
        sync(device)
        t0 = time.perf_counter()
        plain()
        sync(device)
        return time.perf_counter() - t0

    plain()  # warm-up
    allowed = adapter_class(model.config.model_type)(model).saliency_layers() or [a.layers // 2]
    sal_layer = str(min(allowed, key=lambda x: (abs(x - a.layers // 2), x)))  # a global layer (Gemma 3)

    writer_s = [0.0]
    real_write = dump_module._write_unit

    def timed_write(*args, **kwargs):  # the writer thread's busy time (it runs beside the forward loop)
        t = time.perf_counter()
        try:
            return real_write(*args, **kwargs)
        finally:
            writer_s[0] += time.perf_counter() - t

    dump_module._write_unit = timed_write
    rows, ratios, walls = [], {}, {}
    configs = [("top-k only", dict(tpa_branches=0, saliency_layer="none")),
               ("top-k + saliency", dict(tpa_branches=0, saliency_layer=sal_layer)),
               ("top-k + saliency + TPA (B=4, k2=8)", dict(tpa_branches=4, saliency_layer=sal_layer))]
    k_used = None
    t_plain, best, busy = float("inf"), {}, {}
    for _ in range(max(1, a.repeats)):  # rounds: every arm once, in turn
        if _:  # the model was freed for the dumps: load it again for this round's plain forward
            model, _proc = load_vlm(str(teacher), device)
            plain()
        t_plain = min(t_plain, timed_plain())
        del model
        for name, kw in configs:
            for enc in encodings:
                out = work / "bench-cache"
                shutil.rmtree(out, ignore_errors=True)
                writer_s[0] = 0.0
                m = dump_teacher(DumpConfig(teacher=str(teacher), data=str(data), images=str(images), out=str(out),
                                            limit=a.samples, batch_size=a.batch_size, device=a.device,
                                            progress=False, top_k=a.top_k, logprob_encoding=enc, **kw))
                k_used = m["fingerprint"]["params"]["top_k"]
                t = m["timing"]["loop_s"]
                if t < best.get((name, enc), float("inf")):
                    best[(name, enc)], busy[(name, enc)] = t, writer_s[0]
    for name, _kw in configs:
        for enc in encodings:
            t = best[(name, enc)]
            ratios[(name, enc)] = t / t_plain
            walls[(name, enc)] = t
            rows.append([name, enc, f"{t:.2f}", f"{t / t_plain:.3f}", f"{t / (t_plain + t_encode):.3f}",
                         f"{busy[(name, enc)]:.2f}"])
    dump_module._write_unit = real_write
    print(f"device: {device_name(device)}; {a.family} teacher LM {a.layers} x {a.hidden}; {a.samples} samples, "
          f"batch {a.batch_size}; k = {k_used}; fastest of {max(1, a.repeats)} interleaved round(s)")
    print(table([["plain forward (HF, full logits)", "-", f"{t_plain:.2f}", "1.000", "-", "-"],
                 ["encode data (tokenize + image processor)", "-", f"{t_encode:.2f}", "-", "-", "-"]] + rows,
                ["run", "encoding", "seconds", "x plain forward", "x (encode + plain forward)", "writer busy s"]))
    for enc in encodings:
        print(f"RATIO dump/plain forward ({enc}): top-k {ratios[(configs[0][0], enc)]:.3f}, "
              f"+saliency {ratios[(configs[1][0], enc)]:.3f}, +TPA {ratios[(configs[2][0], enc)]:.3f} (goal <= 1.10)")
    if "packed" in encodings and "float16" in encodings:
        print("RATIO packed/float16 dump wall time: " + ", ".join(
            f"{name} {walls[(name, 'packed')] / walls[(name, 'float16')]:.3f}" for name, _ in configs))


if __name__ == "__main__":
    main()
