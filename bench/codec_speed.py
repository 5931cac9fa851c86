"""What the dump's writer thread spends per response token on the top-k fields, packed against float16.

Rows: top-k of softmaxes of random logits over a real vocabulary (default 49,152, SmolLM2's; logits N(0, 3^2) so
the rows are neither flat nor one-hot), ids in rank order and their log-probs, as the teacher computes them. Each
encoding writes them the way PartWriter does (packed: ``canonical_order``, then ``write_array`` with the packed
serializers and blosc-zstd; float16: ``write_array`` with blosc-zstd + shuffle) into a fresh zarr group, in chunks of
4,096 rows; the time is the best of ``--repeats`` runs, and the read back (decode) is timed the same way.
Run: python bench/codec_speed.py [--k 64] [--rows 16384] [--vocab 49152]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from _util import table

import torch  # noqa: E402
import zarr  # noqa: E402

from alignti.common.cache import packed_settings, serializer_for, write_array  # noqa: E402
from alignti.common.codecs import canonical_order  # noqa: E402


def rows(n: int, vocab: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    ids, lps = [], []
    for at in range(0, n, 256):
        m = min(256, n - at)
        lp = torch.log_softmax(torch.randn(m, vocab, generator=g) * 3.0, -1)
        v, j = lp.topk(k, -1)
        ids.append(j.int().numpy())
        lps.append(v.numpy())
    return np.concatenate(ids), np.concatenate(lps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    ids, lps = rows(a.rows, a.vocab, a.k)
    work = Path(tempfile.mkdtemp(prefix="alignti-codec-speed-"))
    out = []
    for enc in ("packed", "float16"):
        params = {"top_k": a.k, "logprob_encoding": enc}
        if enc == "packed":
            params["packed"] = dict(packed_settings({"top_k": a.k, "packed": {"tail_kl": 4e-5}}), tail_kl=4e-5)
        best_w, best_r, size = float("inf"), float("inf"), 0
        for r in range(a.repeats):
            where = work / f"{enc}-{r}"
            t = time.perf_counter()
            if enc == "packed":
                i2, l2 = canonical_order(ids, lps, params["packed"]["head"])
            else:
                i2, l2 = ids, lps.astype(np.float16)
            g = zarr.open_group(str(where), mode="w", zarr_format=3)
            for name, arr in (("topk_ids", i2), ("topk_logprobs", l2)):
                write_array(g, name, arr, serializer_for(name, params))
            best_w = min(best_w, time.perf_counter() - t)
            t = time.perf_counter()
            g = zarr.open_group(str(where), mode="r")
            _ = g["topk_ids"][...], g["topk_logprobs"][...]
            best_r = min(best_r, time.perf_counter() - t)
            size = sum(p.stat().st_size for p in where.rglob("*") if p.is_file() and p.name != "zarr.json")
        out.append([enc, f"{best_w:.3f}", f"{1e6 * best_w / a.rows:.1f}", f"{best_r:.3f}",
                    f"{1e6 * best_r / a.rows:.1f}", f"{size / a.rows:.1f}"])
    shutil.rmtree(work, ignore_errors=True)
    print(f"k = {a.k}, {a.rows} rows over a vocabulary of {a.vocab}, chunks of 4,096 rows; best of {a.repeats}; "
          f"{torch.get_num_threads()} torch thread(s)")
    print(table(out, ["encoding", "write s", "write us/token", "read s", "read us/token", "ids+log-probs B/token"]))


if __name__ == "__main__":
    main()
