"""What cross-tokenizer training adds to a cache (schema v7), in bytes per response token on disk, beside the
top-k fields and the whole cache, on two kinds of answers: the demo's short VQA answers (1-3 tokens: the turn
texts are mostly question) and its long-form answers (every shape, 20-60 tokens). Also the per-batch cost of the
student's side: a batch of 8 as the DataLoader makes it (cache read, image decoding, the image processor, collation)
with the student re-encoding and aligning each sample against today's same-tokenizer batch.

The tiny demo teacher (untrained: the cross-tokenizer fields do not depend on its distributions), k = 32, float16,
TPA 4 x 8, saliency; the student is the demo student with its own tokenizer (vocabulary 300 vs 320) and patch 8.
Run: python bench/cross_tokenizer_cache.py [--images 100]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _util import table

from alignti.common.adapters import LlavaAdapter
from alignti.common.cache import CacheReader
from alignti.common.inspect import cache_summary
from alignti.common.models import load_processor
from alignti.common.saving import save_checkpoint
from alignti.demo import kit
from alignti.student_train.cross import CrossDataset, CrossTokenizer
from alignti.student_train.data import CacheDataset, StudentCollator
from alignti.teacher_dump.dump import DumpConfig, dump_teacher

TOPK = ("topk_ids", "topk_logprobs", "tail_logmass", "target_logprob")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=100)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="xt-bench-"))
    kit.make_demo(work, n_train=args.images, n_val=2, n_test=2, train_teacher=False,
                  long_form={"train": args.images})
    tok = kit.build_tokenizer("llava", vocab_size=300)
    save_checkpoint(kit.build_model("llava", tok, kit.STUDENT, 3, 8), kit.build_processor(tok, "llava", 8),
                    work / "student_x")
    rows, ratio = [], {}
    for name, data in (("short VQA", "train.json"), ("long-form", "train_long.json")):
        out = work / f"cache_{name[:4]}"
        dump_teacher(DumpConfig(teacher=str(work / "teacher"), data=str(work / "data" / data),
                                images=str(work / "data/images"), out=str(out), irs_samples=16, progress=False))
        info = cache_summary(str(out))
        xt = info["cross_tokenizer_bytes_per_token"]
        per = info["bytes_per_token_by_array"]
        c = info["counts"]
        fixed = xt.pop("teacher_tokens.json")
        added = sum(xt.values())
        topk = sum(per.get(a, 0.0) for a in TOPK)
        rows.append([name, c["ok"], f"{c['response_tokens'] / max(c['ok'], 1):.1f}", f"{xt['resp_char_start']:.2f}",
                     f"{xt['turn_texts_and_grids']:.2f}", f"{added:.2f}", f"{topk:.1f}",
                     f"{info['bytes_per_token']:.1f}", f"{fixed * c['response_tokens']:,.0f}"])
        ratio[name] = added / topk
        # the student's side: re-encode + align per sample vs the cache read alone
        reader = CacheReader(out)
        proc = load_processor(str(work / "student_x"))
        xt = CrossTokenizer(reader, proc)
        plain, cross = CacheDataset(reader, proc), CrossDataset(reader, proc, xt)
        coll_p, coll_x = StudentCollator(proc, LlavaAdapter), StudentCollator(proc, LlavaAdapter, xt)
        n = min(200, len(reader))
        for ds, coll in ((plain, coll_p), (cross, coll_x)):
            coll([ds[0]])
        t0 = time.perf_counter()
        for i in range(0, n, 8):  # a batch of 8 samples, as the DataLoader's worker makes it
            coll_p([plain[j] for j in range(i, min(i + 8, n))])
        t1 = time.perf_counter()
        for i in range(0, n, 8):
            coll_x([cross[j] for j in range(i, min(i + 8, n))])
        t2 = time.perf_counter()
        rows[-1] += [f"{(t1 - t0) / n * 1e3:.2f}", f"{(t2 - t1) / n * 1e3:.2f}"]
    print(table(rows, ["answers", "samples", "resp tok/sample", "char spans B/tok", "texts+grids B/tok",
                 "added B/tok", "top-k B/tok", "whole cache B/tok", "teacher_tokens.json B (once)",
                 "same-tok batch ms/sample", "cross batch ms/sample"]))
    print("RATIO added/top-k bytes: " + ", ".join(f"{k} {v:.3f}" for k, v in ratio.items()))


if __name__ == "__main__":
    main()
