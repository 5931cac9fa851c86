"""Loss head at real shape: peak memory and time of one forward+backward of each loss's head (the cross-tokenizer
terms uld, gold and alm too: SFT + the term on a synthetic aligned batch), the
chunked path (common.losses.head_loss) against the unchunked reference (lm_head -> total_loss).

    python bench/loss_head.py [--hidden 896 --vocab 151936 --tokens 1024 --branches 4 --device cpu]
    python bench/loss_head.py --vocab 262144,248320 --losses sft,kd,alignti --paths chunked --quick
        (Gemma's and Qwen3.5's vocabularies: one table per vocabulary)

Each (loss, path) runs in its own subprocess. Memory: on CPU the peak RSS above the process's baseline
after the weights and inputs are loaded; on CUDA the allocator's peak above the same point. Time: median
of 3 steps after a warm-up, printed as a ratio to the unchunked path of the same loss.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LOSSES = ["sft", "kd", "rkl", "jsd", "kd+tpa", "alignti", "uld", "gold", "alm"]
CROSS = ("uld", "gold", "alm")  # cross-tokenizer KD terms (issue 20): SFT + the term, --loss kd --cross-tokenizer X


def cross_batch(t: dict, n: int, v: int, k: int, dev) -> dict:
    """A cross-tokenizer batch beside the same-tokenizer one: the teacher's tokenizer is coarser (chunks of 1-2
    student rows against 1-2 teacher rows, about 0.8 teacher rows per student row), about 70% of the teacher's
    top-k slots have an identical student token."""
    import torch
    g = torch.Generator().manual_seed(1)
    cs, ct, pair, n_t, c = [], [], [], 0, 0
    while len(cs) < n:
        ns = min(int(torch.randint(1, 3, (1,), generator=g)), n - len(cs))
        nt = 1 if ns == 1 else int(torch.randint(1, 3, (1,), generator=g))
        pair += [n_t] + [-1] * (ns - 1)
        cs += [c] * ns
        ct += [c] * nt
        n_t, c = n_t + nt, c + 1
    lp = torch.log_softmax(torch.randn(n_t, k + 1, generator=g), -1)
    xt_ids = torch.randint(0, v, (n_t, k), generator=g)
    xt_ids[torch.rand(n_t, k, generator=g) < 0.3] = -1
    return dict(targets=t["targets"], topk_logprobs=lp[:, :k].sort(-1, descending=True).values.to(dev),
                tail_logmass=lp[:, k].to(dev), xt_ids=xt_ids.to(dev), xt_pair=torch.tensor(pair, device=dev),
                xt_chunk_s=torch.tensor(cs, device=dev), xt_chunk_t=torch.tensor(ct, device=dev), xt_n_chunks=c,
                xt_target_logprob=-torch.rand(n_t, generator=g).to(dev))


def _rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def child(args) -> dict:
    import torch

    from alignti.common.losses import LossWeights, get_loss, head_loss, total_loss
    torch.manual_seed(0)
    dev = torch.device(args.device)
    n, h, v, b, k, k2 = args.tokens, args.hidden, int(args.vocab), args.branches, 32, 8
    spec = get_loss("kd" if args.loss in CROSS else args.loss)
    head = torch.nn.Linear(h, v, bias=False).to(dev)
    t = {"targets": torch.randint(0, v, (n,), device=dev),
         "topk_ids": torch.randint(0, v, (n, k), device=dev),
         "topk_logprobs": torch.log_softmax(torch.randn(n, k + 1, device=dev), -1)[:, :k]}
    t["tail_logmass"] = torch.log1p(-t["topk_logprobs"].exp().sum(-1))
    if spec.tpa:
        t["tpa_cand_ids"] = t["topk_ids"][:, :b]
        t["tpa_ids"] = torch.randint(0, v, (n, b, k2), device=dev)
        lp = torch.log_softmax(torch.randn(n, b, k2 + 1, device=dev), -1)
        t["tpa_logprobs"], t["tpa_tail"] = lp[..., :k2], lp[..., k2]
    w = LossWeights(temperature=args.temperature, cross_tokenizer=args.loss if args.loss in CROSS else None)
    if args.loss in CROSS:
        t = cross_batch(t, n, v, k, dev)
    hid = torch.randn(n, h, device=dev, requires_grad=True)
    bhid = torch.randn(n, b, h, device=dev, requires_grad=True) if spec.tpa else None
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def step():
        head.weight.grad = None
        with autocast:
            if args.path == "chunked":
                out = head_loss(spec, w, head, dict(t, resp_hidden=hid, branch_hidden=bhid),
                                chunk_bytes=int(args.chunk_mib * 2 ** 20) if args.chunk_mib else None)
                loss = out["loss"]
            else:
                out = dict(t, logits=head(hid))
                if spec.tpa:
                    out["branch_logits"] = head(bhid)
                loss = total_loss(spec, w, out)["loss"]
        loss.backward()
        return float(loss)

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _current_rss_mib()
    times, val = [], 0.0
    for i in range(4 if not args.quick else 2):
        t0 = time.perf_counter()
        val = step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if i == 0 and dev.type == "cuda":
            peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    if dev.type != "cuda":
        peak = _rss_peak_mib() - base
    times = sorted(times[1:])
    return {"loss": args.loss, "path": args.path, "peak_mib": round(peak, 1),
            "sec": round(times[len(times) // 2], 4), "value": val}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--vocab", default="151936", help="vocabulary size, or several comma-separated (a table each)")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--branches", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chunk-mib", type=float, default=0, help="fp32 logits per row chunk (0: the default)")
    ap.add_argument("--losses", default=",".join(LOSSES))
    ap.add_argument("--paths", default="unchunked,chunked")
    ap.add_argument("--quick", action="store_true", help="1 timed step instead of 3")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--loss", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.loss:
        print(json.dumps(child(args)))
        return
    rows = []
    for vocab in [int(x) for x in str(args.vocab).split(",")]:
        rows += vocab_rows(args, vocab)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def vocab_rows(args, vocab: int) -> list[dict]:
    """Every (loss, path) of ``args`` at one vocabulary, each in its own subprocess; prints them and their table."""
    rows = []
    for loss in args.losses.split(","):
        for path in args.paths.split(","):
            cmd = [sys.executable, __file__, "--loss", loss, "--path", path, f"--vocab={vocab}"] + [
                f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("hidden", "tokens", "branches", "temperature", "device", "chunk_mib")]
            if args.quick:
                cmd.append("--quick")
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                rows.append({"loss": loss, "path": path, "error": res.stderr.strip().splitlines()[-1]})
            else:
                rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            rows[-1]["vocab"] = vocab
            print(json.dumps(rows[-1]), flush=True)
    by = {(r["loss"], r["path"]): r for r in rows}
    sft = by.get(("sft", "chunked"), {}).get("peak_mib")
    print(f"\nloss head at H={args.hidden} V={vocab} N={args.tokens} B={args.branches} on {args.device}"
          f" (peak above loaded weights, MiB; time ratio chunked / unchunked)")
    print(f"{'loss':8s} {'unchunked MiB':>14s} {'chunked MiB':>12s} {'x chunked sft':>14s} {'time ratio':>11s}")
    for loss in args.losses.split(","):
        u, c = by.get((loss, "unchunked"), {}), by.get((loss, "chunked"), {})
        ratio = c["sec"] / u["sec"] if "sec" in c and "sec" in u else float("nan")
        xs = c["peak_mib"] / sft if sft and "peak_mib" in c else float("nan")
        print(f"{loss:8s} {u.get('peak_mib', float('nan')):14.0f} {c.get('peak_mib', float('nan')):12.0f} "
              f"{xs:14.2f} {ratio:11.2f}")
    return rows


if __name__ == "__main__":
    main()
