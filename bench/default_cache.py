"""The demo cache at the dump defaults before and after issue 24's flip: float16 k = 32 (old) against packed k = 64
(new), plus the two crossings (float16 k = 64, packed k = 32), on the quickstart's kit and dump settings.

The kit is the quickstart's (demo/quickstart.py PRESETS: 300 training images, 900 questions, the teacher trained to
90% validation exact match; ``--fast``: the fast preset's briefly trained teacher), built once under --workdir. Each
cache is dumped from the same teacher over the training split with the quickstart's dump settings (TPA B = 4 at every
position, --saliency-query answer, --iva-token-kl) and sized by `alignti inspect-cache`'s own function
(common/inspect.cache_summary): bytes per response token on disk in all, the top-k fields (ids, log-probs, rest mass,
target log-prob), the TPA fields and the IVA token-KL fields; with the dump's wall time (first batch to last commit).
Run: python bench/default_cache.py [--fast] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from _util import table

from alignti.common.inspect import cache_summary  # noqa: E402
from alignti.teacher_dump.dump import DumpConfig, dump_teacher  # noqa: E402

TPA = ("tpa_pos", "tpa_cand_ids", "tpa_ids", "tpa_logprobs", "tpa_tail")
IVAK = ("ivak_pos", "ivak_weight", "ivak_ids", "ivak_logprobs", "ivak_tail")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "alignti-bench-default-cache"))
    ap.add_argument("--fast", action="store_true", help="The quickstart's fast preset (briefly trained teacher).")
    a = ap.parse_args()
    from alignti.demo import kit as demo_kit
    from alignti.demo.quickstart import PRESETS
    p = PRESETS["fast" if a.fast else "default"]
    work = Path(a.workdir)
    kit = work / ("kit-fast" if a.fast else "kit")
    if not (kit / "teacher" / "config.json").exists():
        t = time.perf_counter()
        info = demo_kit.make_demo(kit, n_train=p["n_train"], n_val=p["n_val"], n_test=p["n_test"],
                                  teacher_steps=p["teacher_steps"], teacher_target=p["teacher_target"], device="cpu")
        print(f"kit: {kit} in {time.perf_counter() - t:.0f} s, teacher validation {info.get('teacher_val_accuracy')}")
    runs = [("float16", 32, "old default"), ("packed", 64, "new default"), ("float16", 64, ""), ("packed", 32, "")]
    rows, got = [], {}
    for enc, k, what in runs:
        out = work / f"cache-{enc}-{k}"
        shutil.rmtree(out, ignore_errors=True)
        m = dump_teacher(DumpConfig(teacher=str(kit / "teacher"), data=str(kit / "data/train.json"),
                                    images=str(kit / "data/images"), out=str(out), device="cpu", progress=False,
                                    saliency_query="answer", tpa_branches=4, iva_token_kl=True,
                                    top_k=k, logprob_encoding=enc))
        s = cache_summary(str(out))
        per = s["bytes_per_token_by_array"]
        got[(enc, k)] = s
        rows.append([f"{enc} k={k}" + (f" ({what})" if what else ""), s["counts"]["response_tokens"],
                     f"{s['bytes_per_token']:.1f}", f"{s['topk_bytes_per_token']:.1f}",
                     f"{sum(per.get(x, 0) for x in TPA):.1f}", f"{sum(per.get(x, 0) for x in IVAK):.1f}",
                     f"{s['bytes_on_disk'] / 2 ** 20:.2f}", f"{m['timing']['loop_s']:.1f}"])
    print(f"kit {'fast' if a.fast else 'default'} preset; vocabulary {got[('packed', 64)]['vocab_size']}; "
          f"{got[('packed', 64)]['counts']['samples']} samples")
    print(table(rows, ["cache", "response tokens", "B/token (all)", "top-k fields", "TPA fields", "IVA token-KL",
                       "MiB on disk", "dump s"]))
    old, new = got[("float16", 32)], got[("packed", 64)]
    print(f"RATIO new/old default: all {new['bytes_per_token'] / old['bytes_per_token']:.3f}, top-k fields "
          f"{new['topk_bytes_per_token'] / old['topk_bytes_per_token']:.3f}")
    print(json.dumps({f"{e} k={k}": {"bytes_per_token": s["bytes_per_token"],
                                      "topk_bytes_per_token": s["topk_bytes_per_token"],
                                      "by_array": {n: round(v, 2) for n, v in s["bytes_per_token_by_array"].items()}}
                      for (e, k), s in got.items()}, indent=1))


if __name__ == "__main__":
    main()
