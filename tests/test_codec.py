"""The packed top-k encoding (common/codecs.py, cache schema v6): ids exact, log-probs within the stated bound, the
rest mass exact, through numcodecs, through zarr (also in a process that only imports the codecs) and through a
whole dump; a student trains to the same loss as on the float16 cache; float16 caches still read."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

from alignti.common.cache import CacheReader, write_array
from pathlib import Path

from alignti.common.cache import packed_settings
from alignti.common.codecs import (DEFAULT_TAIL_KL, LP_FLOOR, TopkIdsCodec, TopkLogprobsCodec, ZarrTopkIds,
                                   ZarrTopkLogprobs, canonical_order, tail_step_for)
from alignti.common.losses import distill_loss, fold_teacher, kl
from alignti.common.schema import PACKED_SCHEMA_VERSION, SCHEMA_VERSION

QWEN2_VOCAB = 151_936


def topk_rows(rng, n, vocab, k, peaked: bool):
    """n rows of a real top-k: ids by probability descending, their log-probs and the exact log rest mass,
    from full-vocabulary softmaxes (float64)."""
    out = []
    for at in range(0, n, 128):  # 128 rows at a time: [rows, 151,936] float64 is 156 MB per 128 rows
        m = min(128, n - at)
        z = rng.standard_normal((m, vocab)) * (8.0 if peaked else 1.0)
        if peaked:
            z[np.arange(m), rng.integers(0, vocab, m)] += 25.0  # one token near probability 1
        lp = torch.from_numpy(z).log_softmax(-1)
        vals, ids = lp.topk(k, -1)
        tail = lp.scatter_(-1, ids, float("-inf")).logsumexp(-1)
        out.append((ids.int().numpy(), vals.numpy(), tail.numpy()))
    return tuple(np.concatenate(x) for x in zip(*out))


def check_bound(codec: TopkLogprobsCodec, exact: np.ndarray, got: np.ndarray) -> None:
    h = min(codec.head, exact.shape[-1])
    e = np.maximum(exact.astype(np.float64), -LP_FLOOR)
    head_err = np.abs(got[..., :h] - e[..., :h]).max(initial=0.0)
    assert head_err <= codec.head_step / 2 + 1e-6, head_err            # float32 decode: 1e-6 slack
    root_err = np.abs(np.exp(0.5 * got[..., h:].astype(np.float64)) - np.exp(0.5 * e[..., h:])).max(initial=0.0)
    assert root_err <= codec.tail_step / 2 + 1e-7, root_err


@pytest.mark.parametrize("vocab,k,head,peaked", [(QWEN2_VOCAB, 32, 1, False), (QWEN2_VOCAB, 128, 1, True),
                                                 (QWEN2_VOCAB, 8, 4, True), (49_152, 128, 16, False),
                                                 (320, 32, 0, False), (320, 1, 1, True)])
def test_codecs_round_trip_within_the_bound(vocab, k, head, peaked):
    rng = np.random.default_rng(k + head + vocab)
    ids, lps, _ = topk_rows(rng, 300, vocab, k, peaked)
    ids2, lps2 = canonical_order(ids, lps, head)
    # canonical order: the head as ranked, every row the same set of (id, log-prob) pairs
    assert np.array_equal(ids2[:, :head], ids[:, :head]) and np.array_equal(lps2[:, :head], lps[:, :head])
    assert (np.diff(ids2[:, head:], axis=1) > 0).all()
    for r in range(0, 300, 37):
        assert dict(zip(ids[r], lps[r])) == dict(zip(ids2[r], lps2[r]))
    ci, cl = TopkIdsCodec(head), TopkLogprobsCodec(head, 1 / 256, 1 / 1024)
    got_ids = ci.decode(ci.encode(ids2))
    assert got_ids.dtype == np.int32 and np.array_equal(got_ids, ids2)             # exact
    got = cl.decode(cl.encode(lps2.astype(np.float32)))
    assert got.dtype == np.float32 and got.shape == lps2.shape
    check_bound(cl, lps2, got)
    # what the loss sees: the renormalised (k+1)-way fold with the exact rest mass; KL(exact fold || decoded fold)
    # is at most about 2 * sum of squared sqrt-probability errors, each <= (step / 2)^2
    _, _, tail = topk_rows(np.random.default_rng(k + head + vocab), 300, vocab, k, peaked)
    f_exact = fold_teacher(torch.from_numpy(lps2), torch.from_numpy(tail))
    f_got = fold_teacher(torch.from_numpy(got).double(), torch.from_numpy(tail))
    assert float(kl(f_exact, f_got).max()) <= 2 * k * (1 / 2048) ** 2 + 2 * (1 / 512) ** 2


@pytest.mark.parametrize("vocab,k,peaked,bound", [(QWEN2_VOCAB, 32, False, DEFAULT_TAIL_KL),
                                                (QWEN2_VOCAB, 128, True, DEFAULT_TAIL_KL),
                                                (QWEN2_VOCAB, 128, False, 3.2e-4), (49_152, 8, True, 1e-5)])
def test_the_tail_step_from_a_kl_bound_keeps_the_bound(vocab, k, peaked, bound):
    """tail_step_for(k, 1, bound): a step 1/N (not a power of two; format 2 stores it as float64) whose rounding adds
    about `bound` nats per row to KL(exact fold || decoded fold): each sqrt-probability error is at most step / 2 (so a
    row adds at most (k - 1) step^2 / 2 = 3 bound, up to the fold's second-order terms), and uniform rounding makes the
    mean (k - 1) step^2 / 6 = bound."""
    step = tail_step_for(k, 1, bound)
    assert 1 / step == round(1 / step) and (k - 1) * step ** 2 / 6 <= bound < (k - 1) * (1 / (1 / step - 1)) ** 2 / 6
    rng = np.random.default_rng(k + vocab)
    ids, lps, tail = topk_rows(rng, 128, vocab, k, peaked)  # one softmax batch: ~5 s at V = 151,936
    ids, lps = canonical_order(ids, lps, 1)
    codec = TopkLogprobsCodec(1, 1 / 256, step)
    frame = codec.encode(lps.astype(np.float32))
    assert np.frombuffer(frame, "<u4", count=1)[0] == 2
    assert tuple(np.frombuffer(frame, "<f8", count=2, offset=16)) == (1 / 256, step)  # the steps, exactly
    got = codec.decode(frame)
    check_bound(codec, lps, got)
    f_exact = fold_teacher(torch.from_numpy(lps), torch.from_numpy(tail))
    f_got = fold_teacher(torch.from_numpy(got).double(), torch.from_numpy(tail))
    per_row = kl(f_exact, f_got)
    head = 2 * (1 / 512) ** 2  # the head's half step of log-prob, on a probability <= 1
    assert float(per_row.max()) <= 3 * bound * 1.05 + head, float(per_row.max())
    # the mean is an estimate, not a bound: it assumes step << sqrt(p); flat rows at a coarse step (k = 128 of
    # V = 151,936 at 1/257: sqrt(p) ~ 2-3 steps) measure 1.29x it
    assert 0.5 * bound <= float(per_row.mean()) <= 1.5 * bound + head, float(per_row.mean())
    with pytest.raises(ValueError, match="must be > 0"):
        tail_step_for(k, 1, 0.0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        TopkLogprobsCodec(1, 1 / 256, 0.0)


def test_a_packed_cache_of_format_1_still_reads():
    """tests/data/packed-v1: a zarr group written by the first packed codecs (commit 8f00781: steps stored as
    power-of-two exponents; V = 151,936, k = 16, chunks of 32 rows, the last one partial), and the exact arrays it
    was written from. Read now: ids exact, log-probs within that format's bound (head 1/256 nat, tail 1/1024)."""
    d = Path(__file__).parent / "data" / "packed-v1"
    g = zarr.open_group(str(d / "part.zarr"), mode="r")
    exact = np.load(d / "exact.npz")
    assert np.array_equal(g["topk_ids"][...], exact["ids"]) and exact["ids"].max() > 100_000
    check_bound(TopkLogprobsCodec(1, 1 / 256, 1 / 1024), exact["logprobs"], g["topk_logprobs"][...])
    from numcodecs import Blosc
    for name in ("topk_ids", "topk_logprobs"):  # the chunks are format 1 (blosc, then crc32c's 4 bytes at the end)
        frame = Blosc().decode((d / "part.zarr" / name / "c" / "0" / "0").read_bytes()[:-4])
        assert np.frombuffer(frame, "<u4", count=1)[0] == 1


def test_the_lzma_compressor_writes_arrays_plain_zarr_reads(tmp_path):
    """dump-teacher --packed-compressor lzma: the packed codecs, then numcodecs' LZMA (not blosc-zstd), then crc32c;
    fewer bytes than zstd on these rows, read back exactly by plain zarr; an unknown name is refused by the dump
    before anything loads."""
    from alignti.common.cache import PACKED_COMPRESSORS, packed_compressors
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher
    rng = np.random.default_rng(5)
    ids, lps, _ = topk_rows(rng, 256, 49_152, 32, True)
    ids, lps = canonical_order(ids, lps, 1)
    lzma = packed_compressors({"packed": {"compressor": "lzma"}})
    assert packed_compressors({"packed": {}}) == PACKED_COMPRESSORS and "lzma" in type(lzma[0]).__name__.lower()
    sizes = {}
    for name, comp in (("zstd", None), ("lzma", lzma)):
        g = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="w", zarr_format=3)
        write_array(g, "topk_ids", ids, ZarrTopkIds(head=1), comp)
        write_array(g, "topk_logprobs", lps.astype(np.float32), ZarrTopkLogprobs(head=1), comp)
        sizes[name] = sum(p.stat().st_size for p in (tmp_path / f"{name}.zarr").rglob("c/*/*"))
        assert np.array_equal(zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="r")["topk_ids"][...], ids)
    assert sizes["lzma"] < sizes["zstd"], sizes
    np.save(tmp_path / "ids.npy", ids)
    code = f"""
import zarr, numpy as np
import alignti.common.codecs
g = zarr.open_group('{tmp_path}/lzma.zarr', mode='r')
assert np.array_equal(g['topk_ids'][...], np.load('{tmp_path}/ids.npy'))
print(g['topk_logprobs'][...].shape)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and "(256, 32)" in out.stdout, out.stderr
    with pytest.raises(ValueError, match="--packed-compressor must be one of zstd, lzma"):
        dump_teacher(DumpConfig(teacher=str(tmp_path / "none"), data=str(tmp_path / "none.json"),
                                images=str(tmp_path), out=str(tmp_path / "c"), logprob_encoding="packed",
                                packed_compressor="gzip"))
    assert not (tmp_path / "c").exists()


def test_a_part_written_packed_with_lzma_reads_back(tmp_path):
    """PartWriter with params.packed as the dump records them (tail step from the KL budget, compressor lzma): the
    part's top-k arrays carry the packed codecs then LZMA; CacheReader gives the ids exactly (canonical order), the
    log-probs within the bound, the rest mass bit for bit."""
    from alignti.common.cache import CacheReader, PartWriter, committed_parts, write_manifest, write_plan
    from tests.test_cache import random_sample
    params = {"top_k": 4, "tpa_branches": 2, "tpa_top_k": 3, "saliency_layer": 1, "logprob_encoding": "packed",
              "packed": dict(packed_settings({"top_k": 4}), tail_kl=DEFAULT_TAIL_KL, compressor="lzma")}
    rng = np.random.default_rng(7)
    root = tmp_path / "c"
    plan = {"fingerprint": {"params": params, "schema_version": PACKED_SCHEMA_VERSION}, "units": [[0, 3]]}
    write_plan(root, plan)
    pw, written = PartWriter(root, 0, params), []
    for i in range(3):
        meta, arrays = random_sample(rng, i, 30, 12)
        for ids, lps, shape in (("topk_ids", "topk_logprobs", (12, 4)), ("tpa_ids", "tpa_logprobs", (12, 2, 3))):
            z = rng.standard_normal((*shape[:-1], 50)) * 2
            lp = torch.from_numpy(z).log_softmax(-1)
            v, ix = lp.topk(shape[-1], -1)  # distinct ids by probability, log-probs descending
            arrays[ids], arrays[lps] = ix.int().numpy(), v.float().numpy()
        pw.add(meta, arrays)
        written.append(arrays)
    pw.commit()
    write_manifest(root, plan, committed_parts(root))
    meta = __import__("json").loads((root / "parts/00000.zarr/topk_ids/zarr.json").read_text())
    inner = meta["codecs"][0]["configuration"]["codecs"]  # inside the shard
    assert [c["name"] for c in inner] == ["numcodecs.alignti.topk_ids", "numcodecs.lzma", "crc32c"], inner
    reader = CacheReader(root)
    codec = TopkLogprobsCodec(**packed_settings(params))
    assert codec.tail_step == tail_step_for(4)
    for i, want in enumerate(written):
        got = reader[i]
        assert np.array_equal(got["tail_logmass"], want["tail_logmass"]) and np.array_equal(got["tpa_tail"],
                                                                                            want["tpa_tail"])
        for ids, lps in (("topk_ids", "topk_logprobs"), ("tpa_ids", "tpa_logprobs")):
            wi, wl = canonical_order(want[ids], want[lps], 1)
            assert np.array_equal(got[ids], wi), ids
            check_bound(codec, wl, got[lps])


def test_codecs_refuse_rows_out_of_order_and_handle_edge_rows():
    ci, cl = TopkIdsCodec(1), TopkLogprobsCodec(1)
    with pytest.raises(ValueError, match="canonical order"):
        ci.encode(np.array([[5, 9, 3]], np.int32))
    with pytest.raises(ValueError, match="not descending"):
        TopkLogprobsCodec(2).encode(np.array([[-2.0, -1.0, -3.0]], np.float32))
    empty = np.zeros((0, 4), np.int32)
    assert ci.decode(ci.encode(empty)).shape == (0, 4)
    assert cl.decode(cl.encode(empty.astype(np.float32))).shape == (0, 4)
    # -inf (a masked token) and -5000 clip to -LP_FLOOR on the head, to the smallest code on the tail
    got = cl.decode(cl.encode(np.array([[-np.inf, -np.inf], [-0.0, -5000.0]], np.float32)))
    assert got[0, 0] == -LP_FLOOR and got[1, 0] == 0.0
    assert np.exp(got[1, 1]) <= (1 / 1024 / 2) ** 2 and np.exp(got[0, 1]) <= (1 / 1024 / 2) ** 2


def test_the_loss_does_not_depend_on_the_order_of_the_top_k():
    rng = np.random.default_rng(3)
    ids, lps, tail = topk_rows(rng, 64, 320, 16, False)
    ids2, lps2 = canonical_order(ids, lps, 1)
    logits = torch.from_numpy(rng.standard_normal((64, 320)))
    a = distill_loss(logits, torch.from_numpy(ids), torch.from_numpy(lps), torch.from_numpy(tail))
    b = distill_loss(logits, torch.from_numpy(ids2), torch.from_numpy(lps2), torch.from_numpy(tail))
    assert abs(float(a) - float(b)) < 1e-12  # fp64: only the summation order differs


def test_zarr_arrays_decode_in_a_process_that_only_imports_the_codecs(tmp_path):
    rng = np.random.default_rng(1)
    ids, lps, _ = topk_rows(rng, 5000, 4096, 8, False)               # two chunks of rows
    ids, lps = canonical_order(ids, lps, 1)
    tpa_ids = ids[:, :6].reshape(-1, 2, 3).copy()
    tpa_ids.sort(-1)                                                  # [M, B, k2] with head 0: sorted rows
    g = zarr.open_group(str(tmp_path / "p.zarr"), mode="w", zarr_format=3)
    write_array(g, "topk_ids", ids, ZarrTopkIds(head=1))
    write_array(g, "topk_logprobs", lps.astype(np.float32), ZarrTopkLogprobs(head=1))
    write_array(g, "tpa_ids", tpa_ids, ZarrTopkIds(head=0))
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "tpa.npy", tpa_ids)
    code = f"""
import zarr, numpy as np
import alignti.common.codecs  # the codecs, nothing else of alignti: registers them with numcodecs and zarr
g = zarr.open_group('{tmp_path}/p.zarr', mode='r')
assert np.array_equal(g['topk_ids'][...], np.load('{tmp_path}/ids.npy'))
assert np.array_equal(g['tpa_ids'][...], np.load('{tmp_path}/tpa.npy'))
print(g['topk_logprobs'].dtype, g['topk_logprobs'][...].shape)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "float32 (5000, 8)" in out.stdout
    check_bound(TopkLogprobsCodec(1), lps, g["topk_logprobs"][...])


def test_packed_dump_matches_the_float16_dump_and_trains_to_the_same_loss(kit, cache, cache_fp16, tmp_path):
    """The default dump (packed, k = 64) against a float16 dump of the same samples and batches: the same ids, the
    log-probs within the codec's bound, the fp32 arrays bit for bit; a student trains to the same loss on both."""
    from alignti.common.inspect import cache_summary, render_summary
    from alignti.student_train.trainer import TrainConfig, train_student
    out = cache  # the default encoding
    a, b = CacheReader(cache_fp16), CacheReader(out)
    assert a.params["top_k"] == b.params["top_k"] == 64
    assert a.manifest["schema_version"] == SCHEMA_VERSION and a.params["logprob_encoding"] == "float16"
    assert b.manifest["schema_version"] == PACKED_SCHEMA_VERSION and b.params["packed"]["head"] == 1
    assert b.fingerprint["schema_version"] == PACKED_SCHEMA_VERSION
    codec = TopkLogprobsCodec(**packed_settings(b.params))
    assert b.params["packed"]["tail_kl"] == DEFAULT_TAIL_KL and codec.tail_step == tail_step_for(b.params["top_k"])
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert np.array_equal(x["tail_logmass"], y["tail_logmass"]) and np.array_equal(x["tpa_tail"], y["tpa_tail"])
        assert np.array_equal(x["tpa_cand_ids"], y["tpa_cand_ids"]) and np.array_equal(x["tpa_pos"], y["tpa_pos"])
        for ids, lps in (("topk_ids", "topk_logprobs"), ("tpa_ids", "tpa_logprobs")):
            xi, xl = canonical_order(x[ids], x[lps].astype(np.float32), 1)  # the float16 dump, put in packed order
            assert np.array_equal(xi, y[ids]), ids
            # against the float16 values: the codec's bound plus float16's own rounding (2^-11 relative)
            assert y[lps].dtype == np.float32
            e = np.abs(y[lps][..., :1] - xl[..., :1]).max()
            assert e <= codec.head_step / 2 + np.abs(xl[..., :1]).max() * 2 ** -10 + 1e-6, (lps, e)
            r = np.abs(np.exp(0.5 * y[lps][..., 1:].astype(np.float64)) - np.exp(0.5 * xl[..., 1:])).max()
            assert r <= codec.tail_step / 2 + 2 ** -10, (lps, r)
    info = cache_summary(str(out))
    assert abs(sum(info["bytes_per_token_by_array"].values()) - info["bytes_per_token"]) < 1e-6
    assert "topk_ids" in render_summary(info) and info["topk_bytes_per_token"] < cache_summary(str(cache_fp16))[
        "topk_bytes_per_token"]
    runs = {}
    for name, c in (("fp16", cache_fp16), ("packed", out)):
        train_student(TrainConfig(student=str(kit / "student"), cache=str(c), out=str(tmp_path / name),
                                  loss="kd", max_steps=3, batch_size=4, progress=False, seed=0))
        runs[name] = [__import__("json").loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text()
                      .splitlines() if '"step"' in line]
    for s, t in zip(runs["fp16"], runs["packed"]):
        # the two caches hold the same distributions up to the encodings' errors (float16: 2^-11 relative on
        # each log-prob; packed: the bound above), so the KD terms agree to ~1e-3 of their value
        assert abs(s["kd"] - t["kd"]) <= 2e-3 * max(1.0, abs(s["kd"])), (s, t)
        assert abs(s["sft"] - t["sft"]) <= 1e-4, (s, t)
