"""Temperature and a top-k + rest cache: how far the one-lump re-tempering of a T = 1 cache is from the teacher's
true tempered distribution, the exact range the cache allows (common.losses.temperature_bounds), and a dump at the
temperature (dump-teacher --temperature), against the teacher's full distribution.

Two teachers: a Zipf-shaped 152,064-token vocabulary (Qwen2.5-VL's head; logits -s log(rank), s = 0.9, 1.0, 1.1)
and the demo kit's teacher (its own forward over its whole head, the first samples of its training data).

    python bench/temperature_cache.py [--temperature 2] [--kit DIR] [--samples 8]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _util import table

import torch  # noqa: E402

from alignti.common.losses import fold_teacher, temperature_bounds  # noqa: E402
from alignti.teacher_dump.compute import topk_fold_hidden  # noqa: E402


def zipf(tau: float, vocab: int = 152_064, k: int = 64) -> list[list]:
    rank = torch.arange(1, vocab + 1, dtype=torch.float64)
    s = torch.tensor([[0.9], [1.0], [1.1]], dtype=torch.float64)
    head = torch.nn.Linear(1, vocab, bias=False).double()
    with torch.no_grad():
        head.weight.copy_(-rank.log()[:, None])
        ids, lp, tail, _, _ = topk_fold_hidden(s, head, k)
        true = 1 - torch.softmax(head(s) / tau, -1).gather(-1, ids).sum(-1)
        lo, hi, lump = temperature_bounds(lp, tail, vocab - k, tau)
        cached = topk_fold_hidden(s, head, k, temperature=tau)[2].double().exp()
    return [[f"Zipf s={float(e):.1f}", f"{float(tail[i].exp()):.3f}", f"{float(true[i]):.3f}",
             f"{float(lump[i]):.3f}", f"[{float(lo[i]):.3f}, {float(hi[i]):.3f}]", f"{float(cached[i]):.3f}"]
            for i, e in enumerate(s[:, 0])]


def demo(kit: Path, tau: float, samples: int) -> list[list]:
    from alignti.common.adapters import adapter_for
    from alignti.common.batch import collate, forward, lm_head
    from alignti.common.cache import CacheReader
    from alignti.common.conversation import encode
    from alignti.common.models import load_vlm
    from alignti.common.records import Record
    from alignti.common.sources import load_image, load_records
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher
    work = Path(tempfile.mkdtemp())
    readers = {}
    for t in (1.0, tau):
        dump_teacher(DumpConfig(teacher=str(kit / "teacher"), data=str(kit / "data/train.json"),
                                images=str(kit / "data/images"), out=str(work / f"t{t:g}"), limit=samples,
                                tpa_branches=0, saliency_layer="none", logprob_encoding="float16", temperature=t,
                                progress=False))
        readers[t] = CacheReader(work / f"t{t:g}")
    model, proc = load_vlm(str(kit / "teacher"), torch.device("cpu"), "float32")
    adapter = adapter_for(model.eval())
    recs = {r.sample_id: r for r in load_records(kit / "data/train.json") if isinstance(r, Record)}
    true, old, new, lo_all, hi_all, rest1 = [], [], [], [], [], []
    k = readers[1.0].params["top_k"]
    for i in range(len(readers[1.0])):
        x1, x2 = readers[1.0][i], readers[tau][i]
        r = recs[x1["sample_id"]]
        img, sha = load_image(r, kit / "data/images")
        batch = collate([encode(proc, r, img, sha).__dict__], proc.tokenizer.pad_token_id or 0, type(adapter))
        with torch.no_grad():
            z = lm_head(adapter)(forward(adapter, batch).resp_hidden).double()
        ids = torch.from_numpy(x1["topk_ids"]).long()
        true.append(1 - torch.softmax(z / tau, -1).gather(-1, ids).sum(-1))
        t1, l1 = torch.from_numpy(x1["topk_logprobs"]), torch.from_numpy(x1["tail_logmass"])
        old.append(fold_teacher(t1, l1, tau).exp()[:, -1].double())
        new.append(fold_teacher(torch.from_numpy(x2["topk_logprobs"]), torch.from_numpy(x2["tail_logmass"]), tau,
                                tau).exp()[:, -1].double())
        lo, hi, _ = temperature_bounds(t1.double(), l1.double(), z.shape[-1] - k, tau)
        lo_all.append(lo)
        hi_all.append(hi)
        rest1.append(l1.double().exp())
    cat = torch.cat
    t, o, n, lo, hi = cat(true), cat(old), cat(new), cat(lo_all), cat(hi_all)
    inside = float(((lo - 1e-3 <= t) & (t <= hi + 1e-3)).double().mean())
    return [[f"demo teacher (k={k}, V={z.shape[-1]}, {len(t)} tokens): mean", f"{float(cat(rest1).mean()):.3f}",
             f"{float(t.mean()):.3f}", f"{float(o.mean()):.3f}", f"[{float(lo.mean()):.3f}, {float(hi.mean()):.3f}]",
             f"{float(n.mean()):.3f}"],
            ["demo teacher: largest |x - true|", "", "", f"{float((o - t).abs().max()):.3f}",
             f"true inside: {inside:.0%}", f"{float((n - t).abs().max()):.1e}"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--kit", type=Path, default=None, help="a demo kit (alignti make-demo DIR); none: Zipf only")
    ap.add_argument("--samples", type=int, default=8)
    args = ap.parse_args()
    rows = zipf(args.temperature)
    if args.kit is not None:
        rows += demo(args.kit, args.temperature, args.samples)
    print(table(rows, ["teacher", "rest @T=1", f"true rest @T={args.temperature:g}", "one lump (before)",
                       "range the T=1 cache allows", f"dump at T={args.temperature:g}"]))


if __name__ == "__main__":
    main()
