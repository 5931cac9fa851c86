"""Rollout throughput: `alignti rollout`'s generation (per-row seeded sampling + the student's top-B candidates
captured from the raw logits) against plain ``model.generate`` with the same prompts, batches and settings.

Both sides generate exactly ``--new-tokens`` tokens per prompt (no end-of-sequence stop: ``min_new_tokens``), so
tokens/s compares like with like. The ratio (rollout / plain, goal >= 0.9) is printed in one run, each side timed
as the median of ``--repeat`` runs after a warm-up, alternating.

    python bench/rollout.py [--family qwen2_vl] [--prompts 32] [--batch 16] [--new-tokens 64] [--device auto]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import device_name, sync  # noqa: E402

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="qwen2_vl")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--top-b", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dims", default="student", help="student or teacher: the demo kit's model size")
    args = ap.parse_args()

    from alignti.common.adapters import adapter_for
    from alignti.common.conversation import encode
    from alignti.common.generate import left_padded
    from alignti.common.models import resolve_device
    from alignti.common.records import parse_record
    from alignti.common.sources import load_image
    from alignti.demo import kit, shapes
    from alignti.student_rollout import generate as rg

    device = resolve_device(args.device)
    tok = kit.build_tokenizer(args.family)
    proc = kit.build_processor(tok, args.family)
    dims = kit.TEACHER if args.dims == "teacher" else kit.STUDENT
    model = kit.build_model(args.family, tok, dims, 0).eval().to(device)
    adapter = adapter_for(model)
    tmp = Path(tempfile.mkdtemp())
    items = shapes.generate_split(tmp, "train", max(1, args.prompts // 2), questions_per_image=2, multi_turn_every=0)
    prompts = []
    for i, item in enumerate(items[:args.prompts]):
        r = parse_record(i, item)
        img, sha = load_image(r, tmp / "images")
        prompts.append(encode(proc, r, img, sha, generation_prompt=True))
    pad = tok.pad_token_id
    batches = [prompts[i:i + args.batch] for i in range(0, len(prompts), args.batch)]

    def padded(chunk):
        ids, att, image_inputs = left_padded(chunk, pad, adapter.image_token_id, type(adapter))  # as generate_rows batches them
        return ids.to(device), att.to(device), {k: v.to(device) for k, v in image_inputs.items()}

    n = args.new_tokens
    common = dict(max_new_tokens=n, min_new_tokens=n, num_beams=1, repetition_penalty=1.0, pad_token_id=pad)

    @torch.no_grad()
    def plain() -> int:
        toks = 0
        for chunk in batches:
            ids, att, img = padded(chunk)
            out = model.generate(input_ids=ids, attention_mask=att, do_sample=args.temperature > 0,
                                 temperature=args.temperature or None, top_p=args.top_p, top_k=0, **common, **img)
            out = out.cpu()
            toks += (out.shape[1] - ids.shape[1]) * len(chunk)
        return toks

    def ours() -> int:
        """student_rollout.generate.generate_rows, as the rollout calls it (hook + seeded sampler + host copies)."""
        toks = 0
        for bi, chunk in enumerate(batches):
            gens = rg.generate_rows(model, chunk, [bi * 1000 + j for j in range(len(chunk))],
                                    temperature=args.temperature, top_p=args.top_p, max_new_tokens=n, top_b=args.top_b,
                                    pad_id=pad, image_token_id=adapter.image_token_id, min_new_tokens=n)
            toks += sum(len(g.token_ids) for g in gens)
        return toks

    def timed(fn):
        sync(device)
        t = time.perf_counter()
        toks = fn()
        sync(device)
        return toks / (time.perf_counter() - t)

    timed(plain), timed(ours)  # warm-up
    a, b = [], []
    for _ in range(args.repeat):
        a.append(timed(plain))
        b.append(timed(ours))
    pa, pb = statistics.median(a), statistics.median(b)
    print(f"device: {device_name(device)}; family {args.family} ({args.dims} dims, vocab {adapter.vocab_size}); "
          f"{len(prompts)} prompts in batches of {args.batch}, {n} new tokens each, temperature {args.temperature}, "
          f"top-p {args.top_p}, top-B {args.top_b}")
    print(f"plain model.generate: {pa:,.0f} tok/s")
    print(f"alignti rollout:      {pb:,.0f} tok/s (seeded per-row sampling + top-{args.top_b} candidates)")
    print(f"ratio rollout/plain: {pb / pa:.3f}x (runs: plain {', '.join(f'{x:,.0f}' for x in a)}; "
          f"rollout {', '.join(f'{x:,.0f}' for x in b)})")


if __name__ == "__main__":
    main()
