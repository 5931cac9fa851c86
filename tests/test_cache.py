"""Cache round trips bit for bit, is readable without alignti, validates, resumes and refuses mixing."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from alignti.common.cache import CacheReader, PartWriter, committed_parts, validate_cache, write_manifest, write_plan
from alignti.common.errors import CacheError
from alignti.common.schema import SCHEMA_VERSION
from alignti.teacher_dump.dump import DumpConfig, dump_teacher
from tests.exactness import (assert_fp16_ids_equal_up_to_ties, assert_fp16_within_one_ulp, assert_packed_within_bound,
                             assert_topk_ids_of)

PARAMS = {"top_k": 4, "tpa_branches": 2, "tpa_top_k": 3, "saliency_layer": 1}


def random_sample(rng, i, n_tok, n_resp, n_v=6, n_turns=1):
    mask = np.zeros(n_tok, np.uint8)
    mask[-n_resp:] = 1
    arrays = {
        "input_ids": rng.integers(0, 300, n_tok).astype(np.int32), "response_mask": mask,
        "topk_ids": rng.integers(0, 300, (n_resp, 4)).astype(np.int32),
        "topk_logprobs": -rng.random((n_resp, 4)).astype(np.float16),
        "tail_logmass": -rng.random(n_resp).astype(np.float32) * 5,
        "target_logprob": -rng.random(n_resp).astype(np.float32),
        "tpa_cand_ids": rng.integers(0, 300, (n_resp, 2)).astype(np.int32),
        "tpa_ids": rng.integers(0, 300, (n_resp, 2, 3)).astype(np.int32),
        "tpa_logprobs": -rng.random((n_resp, 2, 3)).astype(np.float16),
        "tpa_tail": -rng.random((n_resp, 2)).astype(np.float32),
        "saliency": rng.random(n_v * n_turns).astype(np.float16),
    }
    meta = dict(sample_id=f"s{i}", index=i, image=f"im{i}.png", image_sha256="ab" * 32, image_tok_start=1,
                n_image_tokens=n_v, instr_spans=[2, 4] * n_turns, resp_spans=[n_tok - n_resp, n_tok] * n_turns,
                n_turns=n_turns)
    return meta, arrays


def test_round_trip_bit_for_bit_and_plain_readers(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "c"
    plan = {"fingerprint": {"params": PARAMS, "schema_version": SCHEMA_VERSION}, "units": [[0, 3], [3, 5]]}
    write_plan(root, plan)
    written = []
    for u, (s, e) in enumerate(plan["units"]):
        pw = PartWriter(root, u, PARAMS)
        for i in range(s, e):
            if i == 3:
                pw.add_skipped(i, f"s{i}", "sample s3: broken")
                continue
            meta, arrays = random_sample(rng, i, 20 + i, 3 + i, n_turns=1 + i % 2)
            pw.add(meta, arrays)
            written.append(arrays)
        pw.commit()
    write_manifest(root, plan, committed_parts(root))
    reader = CacheReader(root)
    assert len(reader) == 4 and [r["sample_id"] for r in reader.skipped] == ["s3"]
    for got, want in zip((reader[i] for i in range(len(reader))), written):
        for name, arr in want.items():
            g = got[name].reshape(-1) if name == "saliency" else got[name]
            assert g.dtype == arr.dtype and np.array_equal(g, arr), name
        # no tpa_layout in the params (a v2/v3 cache): one TPA row per response token
        assert np.array_equal(got["tpa_pos"], np.arange(len(want["topk_ids"])))
    # plain zarr + pyarrow, in a process that never imports alignti
    code = f"""
import sys, zarr, pyarrow.parquet as pq, numpy as np
assert not any(m.split('.')[0] in ('common', 'teacher_dump', 'student_train') for m in sys.modules)
g = zarr.open_group('{root}/parts/00000.zarr', mode='r')
t = pq.read_table('{root}/parts/00000.parquet').to_pylist()
r = t[1]
ids = g['topk_ids'][r['resp_start']:r['resp_start'] + r['resp_len']]
np.save('{tmp_path}/plain.npy', ids)
print(len(t), g['topk_logprobs'].dtype, g['input_ids'].shape)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert np.array_equal(np.load(tmp_path / "plain.npy"), written[1]["topk_ids"])


def check_dump_against_teacher(teacher_dir, data, images, cache, sample_index: int) -> None:
    """One sample of ``cache`` against the teacher run on it directly (unbatched), per response token: the
    top-k ids (as a set; in rank order for float16), their log-probs within the encoding's bound (float16: 2^-11
    relative; packed: the codec's stated bound, common/codecs.py), the rest mass and the target's log-prob, and
    the saliency rows. The dump forwards the sample in a padded batch: the fp32 log-probs move by up to 1e-5, so
    near-tied candidates may trade places (any other id is wrong) and every value gets that 1e-5 on top."""
    from alignti.common.adapters import adapter_for
    from alignti.common.batch import collate, forward, lm_logits
    from alignti.common.cache import packed_settings
    from alignti.common.codecs import TopkLogprobsCodec
    from alignti.common.conversation import encode
    from alignti.common.models import load_vlm
    from alignti.common.sources import load_image, load_records

    model, proc = load_vlm(str(teacher_dir), torch.device("cpu"))
    adapter = adapter_for(model)
    reader = CacheReader(cache)
    rec = load_records(data)[sample_index]
    img, sha = load_image(rec, images)
    enc = encode(proc, rec, img, sha)
    x = next(reader[i] for i in range(len(reader)) if reader[i]["sample_id"] == rec.sample_id)
    assert np.array_equal(x["input_ids"], enc.input_ids) and x["image_sha256"] == sha
    with torch.no_grad():
        out = forward(adapter, collate([enc.__dict__], proc.tokenizer.pad_token_id, type(adapter)))
        lp = torch.log_softmax(lm_logits(adapter, out.resp_hidden).float(), -1)
    k = reader.params["top_k"]
    ids = torch.as_tensor(x["topk_ids"]).long()
    assert ids.shape == (lp.shape[0], k)
    at = lp.gather(-1, ids).double().numpy()  # the teacher's own log-probs at the cached ids
    got = x["topk_logprobs"].astype(np.float64)
    if reader.params["logprob_encoding"] == "packed":
        st = packed_settings(reader.params)
        codec = TopkLogprobsCodec(**st)
        assert st["head"] == 1 and x["topk_logprobs"].dtype == np.float32
        assert_topk_ids_of(ids, lp, 1e-5, "topk_ids", ordered=False)  # the top-k as a set
        assert_topk_ids_of(ids[:, :1], lp, 1e-5, "top-1")  # the head: the teacher's top-1 first
        assert np.all(np.diff(x["topk_ids"][:, 1:], axis=-1) > 0)  # the rest as a set, by id ascending
        assert_packed_within_bound(got, at, codec.head, codec.head_step, codec.tail_step, 1e-5, "topk_logprobs")
    else:
        assert_topk_ids_of(ids, lp, 1e-5, "topk_ids")
        np.testing.assert_allclose(got, at, rtol=2 ** -11, atol=1e-5)  # float16: half an ulp of 2^-10 relative
        np.testing.assert_allclose(got, lp.topk(k, -1).values.numpy(), rtol=1e-3, atol=1e-3)  # in rank order
    # the rest mass is stored as the dump computed it (float32, whatever the encoding): everything but the cached ids
    rest = lp.scatter(-1, ids, float("-inf")).logsumexp(-1).numpy()
    np.testing.assert_allclose(x["tail_logmass"], rest, rtol=0, atol=1e-5)
    assert x["tail_logmass"].dtype == np.float32
    tgt = torch.as_tensor(enc.input_ids[enc.response_mask.astype(bool)]).long()
    np.testing.assert_allclose(x["target_logprob"], lp.gather(-1, tgt[:, None])[:, 0].numpy(), atol=1e-5)
    assert x["saliency"].shape == (len(x["instr_spans"]), x["n_image_tokens"])
    np.testing.assert_allclose(x["saliency"].astype(np.float32).sum(-1), 1.0, atol=1e-2)
    assert reader.manifest["irs"]["layer"] == reader.params["saliency_layer"]


@pytest.mark.parametrize("which", ["cache", "cache_fp16"])
def test_dump_matches_teacher_forward(kit, which, request):
    """The default dump (packed, k = 64 of the kit's 320 tokens) and a float16 one, against the teacher itself."""
    cache = request.getfixturevalue(which)
    params = CacheReader(cache).params
    assert params["top_k"] == 64 and params["tpa_top_k"] == 8
    assert params["logprob_encoding"] == ("packed" if which == "cache" else "float16")
    check_dump_against_teacher(kit / "teacher", kit / "data/train.json", kit / "data/images", cache, 5)
    if which == "cache_fp16":  # top-k + rest is a distribution (float16: 2^-11 relative on each log-prob)
        x = CacheReader(cache)[5]
        total = np.logaddexp(np.logaddexp.reduce(x["topk_logprobs"].astype(np.float64), -1), x["tail_logmass"])
        np.testing.assert_allclose(total, 0.0, atol=2e-3)


def _copy(cache, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(cache, dst)
    return dst


def test_validate_reports_each_kind_of_damage(cache, tmp_path):
    assert validate_cache(cache) == []
    c = _copy(cache, tmp_path)
    shard = sorted(p for p in (c / "parts/00001.zarr/topk_logprobs/c").rglob("*") if p.is_file())[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    parquet = c / "parts/00002.parquet"
    parquet.write_bytes(parquet.read_bytes()[:-20])
    (c / "parts/00000.commit.json").unlink()
    problems = "\n".join(validate_cache(c))
    assert "parts/00001.zarr/topk_logprobs" in problems and "sha256" in problems
    assert "parts/00002.parquet" in problems
    assert "parts/00000.commit.json: missing" in problems
    ids = {pid: [r["sample_id"] for r in CacheReader(cache).table.to_pylist() if r["part"] == j]
           for j, pid in enumerate(("00000", "00001", "00002"))}
    for part in ("00000", "00001", "00002"):  # each problem names its part and that part's samples
        line = next(p for p in problems.splitlines() if f"parts/{part}" in p)
        assert f"[part {part}, samples {ids[part][0]}, " in line
    # train-student refuses it before training, naming the parts; the CLI exits non-zero
    from alignti.student_train.trainer import TrainConfig, train_student
    with pytest.raises(CacheError, match="part 00002: samples table"):
        train_student(TrainConfig(student=str(tmp_path / "x"), cache=str(c), out=str(tmp_path / "run")))
    c3 = _copy(cache, tmp_path / "c")
    (c3 / "parts/00000.commit.json").unlink()
    with pytest.raises(CacheError, match=r"does not match its manifest: 1 object\(s\) missing.* in part\(s\) 00000"):
        train_student(TrainConfig(student=str(tmp_path / "x"), cache=str(c3), out=str(tmp_path / "run")))
    res = subprocess.run([sys.executable, "-m", "alignti", "validate-cache", str(c)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 1 and res.stdout.count("DAMAGED") >= 3
    # the reader itself refuses the damaged chunk, naming the part
    c2 = _copy(cache, tmp_path / "b")
    shard2 = c2 / shard.relative_to(c)
    shard2.write_bytes(bytes(data))
    r = CacheReader(c2)
    with pytest.raises(CacheError, match="part 00001"):
        for i in range(len(r)):
            r[i]


def test_repair_redoes_only_the_damaged_parts(kit, cache, tmp_path):
    """validate-cache --repair, then the same dump command: the damaged parts are redone, the others kept."""
    from alignti.common.cache import mark_for_redump
    c = _copy(cache, tmp_path)
    shard = sorted(p for p in (c / "parts/00001.zarr/topk_ids/c").rglob("*") if p.is_file())[0]
    shard.write_bytes(shard.read_bytes()[:-7])
    damaged: list = []
    assert validate_cache(c, damaged_parts=damaged) and damaged == ["00001"]
    untouched = (c / "parts/00000.commit.json").stat().st_mtime_ns
    mark_for_redump(c, damaged)
    dump_teacher(DumpConfig(teacher=str(kit / "teacher"), data=str(kit / "data/train.json"),
                            images=str(kit / "data/images"), out=str(c), limit=60, unit_size=25,
                            irs_samples=32, progress=False))
    assert validate_cache(c) == []
    assert (c / "parts/00000.commit.json").stat().st_mtime_ns == untouched
    a, b = CacheReader(cache), CacheReader(c)
    assert all(np.array_equal(a[i]["topk_ids"], b[i]["topk_ids"]) for i in range(len(a)))


def test_interrupted_dump_resumes_identically(kit, cache, tmp_path, monkeypatch):
    import alignti.teacher_dump.dump as dump_mod
    cfg = DumpConfig(teacher=str(kit / "teacher"), data=str(kit / "data/train.json"), images=str(kit / "data/images"),
                     out=str(tmp_path / "r"), limit=60, unit_size=25, irs_samples=32, progress=False)
    real = dump_mod._write_unit
    calls = []

    def crash_on_second(part, *a):
        calls.append(part.index)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        return real(part, *a)

    monkeypatch.setattr(dump_mod, "_write_unit", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        dump_teacher(cfg)
    assert not (tmp_path / "r/manifest.json").exists()
    done = committed_parts(tmp_path / "r")
    assert 0 in done and 1 not in done  # the crashed unit is not committed; others may be
    with pytest.raises(CacheError, match="unfinished"):
        CacheReader(tmp_path / "r")
    monkeypatch.setattr(dump_mod, "_write_unit", real)
    dump_teacher(cfg)
    a, b = CacheReader(cache), CacheReader(tmp_path / "r")
    assert [s["sample_id"] for s in a.samples] == [s["sample_id"] for s in b.samples]
    for j in range(len(a.part_names)):
        for name, arr in a.part_arrays(j).items():
            assert np.array_equal(arr, b.part_arrays(j)[name]), name


def _part_bytes(root: Path) -> dict:
    """Every file of a cache's parts (zarr arrays, sample tables, commit markers) by path, as bytes."""
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted((root / "parts").rglob("*")) if f.is_file()}


def _kit_dump(kit, out, data=None, **kw) -> DumpConfig:
    return DumpConfig(teacher=str(kit / "teacher"), data=str(data or kit / "data/train.json"),
                      images=str(kit / "data/images"), out=str(out), limit=60, unit_size=25, saliency_layer="1",
                      max_length=300, progress=False, **kw)


def test_encode_workers_default_is_a_worker_beside_a_gpu_teacher_and_the_loop_on_cpu(monkeypatch):
    """--encode-workers unset: 1 for a teacher on a GPU (the encoding is CPU work beside the device's forward), 0 for
    a teacher on CPU whatever torch's thread count (a worker there slowed the teacher's forward by about what it
    took off the loop: bench/README.md); an explicit value is kept; 0 where processes cannot be forked."""
    import alignti.teacher_dump.dump as dump_mod
    for threads in (1, 2):
        monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
        assert dump_mod.encode_workers(None, "cpu") == 0 and dump_mod.encode_workers(None, "cuda") == 1
        assert dump_mod.encode_workers(3, "cpu") == 3 and dump_mod.encode_workers(0, "cuda") == 0
    monkeypatch.setattr(torch.multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    assert dump_mod.encode_workers(None, "cuda") == 0 and dump_mod.encode_workers(2, "cpu") == 0


def test_next_unit_is_encoded_in_a_worker_process_and_the_cache_is_the_same(kit, tmp_path, monkeypatch):
    """--encode-workers 1: a DataLoader worker process encodes unit u + 1 (images, chat template, tokenizer,
    processor) while the teacher runs unit u (unit 0 is encoded in the dump's process while the worker starts), so
    the encoding leaves the forward loop's critical path without a thread in this process; the cache's parts are the
    same bytes as with the encoding in the loop (0 workers)."""
    import time

    import alignti.teacher_dump.dump as dump_mod
    real_encode, real_unit = dump_mod.encode, dump_mod._teacher_unit
    log = tmp_path / "encoded.txt"  # the worker is another process: it reports through a file

    def encode(processor, rec, *a, **kw):
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {rec.index}\n")
        return real_encode(processor, rec, *a, **kw)

    overlapped = []

    def teacher_unit(adapter, encoded, *a, **kw):
        if encoded and encoded[0].index < 25:  # unit 0's teacher: is unit 1 being encoded meanwhile?
            t_end = time.monotonic() + 10
            while time.monotonic() < t_end and not any(int(line.split()[1]) >= 25
                                                        for line in log.read_text().splitlines()):
                time.sleep(0.02)
            overlapped.append(any(int(line.split()[1]) >= 25 for line in log.read_text().splitlines()))
        return real_unit(adapter, encoded, *a, **kw)

    monkeypatch.setattr(dump_mod, "encode", encode)
    monkeypatch.setattr(dump_mod, "_teacher_unit", teacher_unit)
    dump_teacher(_kit_dump(kit, tmp_path / "w1", encode_workers=1))
    pids = {False: set(), True: set()}  # index >= 25: units 1 and 2
    for line in log.read_text().splitlines():
        pid, index = map(int, line.split())
        pids[index >= 25].add(pid)
    # unit 0 encoded here (while the worker starts), units 1 and 2 in a worker process
    assert pids[False] == {os.getpid()} and len(pids[True]) == 1 and os.getpid() not in pids[True]
    assert overlapped[:1] == [True]  # unit 1 encoded while the teacher ran unit 0
    log.write_text("")
    monkeypatch.setattr(dump_mod, "_teacher_unit", real_unit)  # in the loop, unit 1 would wait for the teacher
    dump_teacher(_kit_dump(kit, tmp_path / "w0", encode_workers=0))
    assert {int(line.split()[0]) for line in log.read_text().splitlines()} == {os.getpid()}
    a, b = _part_bytes(tmp_path / "w0"), _part_bytes(tmp_path / "w1")
    assert sorted(a) == sorted(b) and len(a) > 4
    assert [k for k in a if a[k] != b[k]] == []


def test_a_bad_sample_found_by_the_encoding_worker_is_named_as_in_the_loop(kit, tmp_path):
    """A sample the encoding refuses (longer than --max-length) in unit 1: with the encoding in a worker process the
    dump stops with the same message naming it as in the loop, unit 0 committed; the same command after the fix
    finishes the rest, each run resumed with the other setting, and the two caches' parts are the same bytes."""
    from alignti.common.errors import DataError
    items = json.loads((kit / "data/train.json").read_text())
    bad = json.loads(json.dumps(items))
    bad[30]["conversations"][0]["value"] += " and" * 400
    data = tmp_path / "data.json"
    errors = {}
    for w in (0, 1):
        data.write_text(json.dumps(bad))
        with pytest.raises(DataError) as e:
            dump_teacher(_kit_dump(kit, tmp_path / f"c{w}", data, encode_workers=w))
        errors[w] = str(e.value)
        assert set(committed_parts(tmp_path / f"c{w}")) == {0}
    assert errors[0] == errors[1]
    assert f"sample {items[30]['id']}:" in errors[1] and "longer than the limit of 300" in errors[1]
    assert "re-run the same command after fixing to resume" in errors[1]
    data.write_text(json.dumps(items))
    for w in (0, 1):
        dump_teacher(_kit_dump(kit, tmp_path / f"c{w}", data, encode_workers=1 - w))
    a, b = _part_bytes(tmp_path / "c0"), _part_bytes(tmp_path / "c1")
    assert sorted(a) == sorted(b) and [k for k in a if a[k] != b[k]] == []


def test_dump_refuses_other_parameters(kit, cache, tmp_path):
    c = _copy(cache, tmp_path)
    cfg = DumpConfig(teacher=str(kit / "teacher"), data=str(kit / "data/train.json"), images=str(kit / "data/images"),
                     out=str(c), limit=60, unit_size=25, top_k=16, irs_samples=32, progress=False)
    with pytest.raises(CacheError, match="params"):
        dump_teacher(cfg)
    before = json.loads((c / "manifest.json").read_text())
    assert before == json.loads((cache / "manifest.json").read_text())


@pytest.fixture(scope="module")
def s3_server():
    """A real S3-compatible HTTP server (moto's server mode) on 127.0.0.1, started by the test itself.
    s3fs finds it the way a user points alignti at MinIO/Ceph/R2: through AWS_ENDPOINT_URL."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = dict(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
               AWS_DEFAULT_REGION="us-east-1")
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec
    fsspec.filesystem("s3").mkdir("alignti-bucket")
    yield env
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    server.stop()


@pytest.mark.parametrize("scheme", ["file", "memory", "s3"])
def test_push_cache_and_read_from_url(cache, kit, tmp_path, scheme, request):
    from alignti.common.cache import push_cache
    from alignti.student_train.trainer import TrainConfig, train_student
    url = {"file": f"file://{tmp_path}/remote", "memory": f"memory://alignti-test-{tmp_path.name}/cache",
           "s3": f"s3://alignti-bucket/{tmp_path.name}/cache"}[scheme]
    if scheme == "s3":
        request.getfixturevalue("s3_server")
    info = push_cache(cache, url)
    assert info["objects"] > 10
    local, remote = CacheReader(cache), CacheReader(url)
    assert len(local) == len(remote)
    for i in (0, len(local) - 1):
        for name, arr in local[i].items():
            got = remote[i][name]
            assert (np.array_equal(got, arr) if isinstance(arr, np.ndarray) else got == arr), name
    assert validate_cache(url) == []
    res = train_student(TrainConfig(student=str(kit / "student"), cache=url, out=str(tmp_path / "run"), max_steps=2,
                                    images=str(kit / "data/images"), progress=False))
    assert res["steps"] == 2
    with pytest.raises(CacheError, match="not a finished cache"):
        push_cache(tmp_path, url)


def test_uint8_logprob_encoding(kit, cache_fp16, tmp_path):
    """--logprob-dtype uint8: 1/16-nat log-space steps, decoded to the fp16 dump's values within half a step
    (values below -15.94 nats clip), the rest mass untouched, fewer bytes, and a student trains on it."""
    from alignti.common.inspect import cache_summary
    from alignti.student_train.trainer import TrainConfig, train_student
    out = tmp_path / "u8"
    dump_teacher(DumpConfig(teacher=str(kit / "teacher"), data=str(kit / "data/train.json"),
                            images=str(kit / "data/images"), out=str(out), limit=60, unit_size=25,
                            irs_samples=32, progress=False, logprob_encoding="uint8"))
    import zarr
    assert zarr.open_group(str(out / "parts/00000.zarr"), mode="r")["topk_logprobs"].dtype == np.uint8
    a, b = CacheReader(cache_fp16), CacheReader(out)  # against the float16 dump: ids in the same rank order
    assert b.manifest["schema_version"] == SCHEMA_VERSION and b.params["logprob_encoding"] == "uint8"
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert np.array_equal(x["topk_ids"], y["topk_ids"]) and np.array_equal(x["tail_logmass"], y["tail_logmass"])
        for name in ("topk_logprobs", "tpa_logprobs"):
            want = np.maximum(x[name].astype(np.float32), -255 / 16)
            assert y[name].dtype == np.float16
            assert np.abs(y[name].astype(np.float32) - want).max() <= 1 / 32 + 2e-3
    sa, sb = cache_summary(str(cache_fp16)), cache_summary(str(out))
    assert sb["topk_bytes_per_token"] < sa["topk_bytes_per_token"]  # ~27% at scale: bench/cache_size.py
    res = train_student(TrainConfig(student=str(kit / "student"), cache=str(out), out=str(tmp_path / "run"),
                                    loss="alignti", max_steps=2, progress=False))
    assert np.isfinite(res["last"]["loss"])
    with pytest.raises(CacheError, match=r"different params \(.*logprob_encoding .uint8. there, .float16. now"):  # named
        dump_teacher(DumpConfig(teacher=str(kit / "teacher"), data=str(kit / "data/train.json"),
                                images=str(kit / "data/images"), out=str(out), limit=60, unit_size=25,
                                irs_samples=32, progress=False, logprob_encoding="float16"))


FP32_ARRAYS = ("tail_logmass", "target_logprob", "tpa_tail")


def test_length_sorted_batches_leave_the_cache_bit_for_bit(kit, cache_fp16, tmp_path):
    """The dump batches each work unit in token-length order; the cache is the one data-order batches give:
    the same samples in the same order, the same tables, ids and candidates bit for bit. The fp32 rest masses move by
    float32 rounding (a few ulp), and so may the fp32 sources of the fp16 log-probs and saliency: where such a
    value sits on an fp16 rounding edge it flips by one fp16 ulp (seen on an AMD EPYC / AVX2 box:
    tpa_logprobs), so those are held to one ulp at a few elements (assert_fp16_within_one_ulp): a sample's key padding depends on its
    batch, and PyTorch's sdpa does not sum over masked keys bit-invariantly (1.8e-7 on a toy case; the same
    happens today between two --batch-size values). float16 on both sides: this is about the dump's arithmetic, not
    the encoding (the packed codes of a value on a rounding edge would flip a whole step; test_codec.py holds the
    packed encoding to its bound against a float16 dump of the same batches)."""
    cfg = DumpConfig(teacher=str(kit / "teacher"), data=str(kit / "data/train.json"), images=str(kit / "data/images"),
                     out=str(tmp_path / "plain"), limit=60, unit_size=25, irs_samples=32, progress=False,
                     length_sorted_batches=False, logprob_encoding="float16")
    dump_teacher(cfg)
    a, b = CacheReader(cache_fp16), CacheReader(tmp_path / "plain")
    assert len({r["tok_len"] for r in a.samples}) > 3  # the batches really are formed differently
    assert a.table.to_pylist() == b.table.to_pylist()
    assert a.manifest["counts"] == b.manifest["counts"]
    for j in range(len(a.part_names)):
        for name, x in a.part_arrays(j).items():
            y = b.part_arrays(j)[name]
            assert x.dtype == y.dtype and x.shape == y.shape, name
            if name in FP32_ARRAYS:
                np.testing.assert_allclose(x, y, rtol=0, atol=1e-5, err_msg=name)
            elif x.dtype == np.float16:
                assert_fp16_within_one_ulp(x, y, name)
            else:
                assert np.array_equal(x, y), name


def test_the_fp16_tolerance_catches_more_than_one_ulp():
    x = np.array([0.5, -1.25, 3.0, 1e-3] * 50, np.float16)
    assert_fp16_within_one_ulp(x, x.copy(), "same")
    y = x.copy()
    y[1] = np.nextafter(y[1], np.float16(0))  # a rounding edge: one ulp
    assert_fp16_within_one_ulp(x, y, "one ulp")
    for z in (np.nextafter(y, np.float16(0)), x * np.float16(1.01)):  # two ulp at one place; every value moved
        with pytest.raises(AssertionError):
            assert_fp16_within_one_ulp(x, z.astype(np.float16), "broken")


def test_the_tie_tolerances_catch_wrong_ids():
    """Ids may trade places only between near-tied candidates; a swap of distinct values or a wrong id fails."""
    lp = torch.log_softmax(torch.randn(40, 50, generator=torch.Generator().manual_seed(0)) * 3, -1)
    vals, ids = lp.topk(6, -1)
    assert_topk_ids_of(ids, lp, 1e-5, "same")
    tied = lp.clone()
    tied[0, ids[0, 2]] = lp[0, ids[0, 3]] + 5e-6  # ranks 3 and 4 of row 0 within 1e-5: either order is right
    swapped = ids.clone()
    swapped[0, 2:4] = ids[0, [3, 2]]
    assert_topk_ids_of(swapped, tied, 1e-5, "tie")
    for bad in (swapped, torch.cat([ids[:, :5], lp.topk(7, -1).indices[:, 6:]], 1)):  # no tie; rank 7 for rank 6
        with pytest.raises(AssertionError):
            assert_topk_ids_of(bad, lp, 1e-5, "broken")
    # two fp16 dumps: a swap where the stored values tie (within one ulp) or at the last slot passes, else fails
    v16, i16 = vals.numpy().astype(np.float16), ids.numpy()
    v16[0, 3] = v16[0, 2]
    j16 = i16.copy()
    j16[0, 2:4] = i16[0, [3, 2]]
    j16[1, 5] = 49 if i16[1, 5] != 49 else 48
    assert_fp16_ids_equal_up_to_ties(i16, j16, v16, v16, "ties")
    k16 = i16.copy()
    k16[2, 0:2] = i16[2, [1, 0]]  # rows' first two values differ by far more than one ulp
    with pytest.raises(AssertionError):
        assert_fp16_ids_equal_up_to_ties(i16, k16, v16, v16, "broken")


def test_tpa_position_budget(kit, cache_fp16, tmp_path):
    """--tpa-positions 0.5: TPA statistics at ceil(n/2) positions per sample, the teacher's highest-entropy
    ones, equal to the full dump's statistics there; the student's branches follow the cache."""
    import math

    from alignti.common.adapters import adapter_for
    from alignti.common.batch import collate, forward, lm_logits
    from alignti.common.conversation import encode
    from alignti.common.sources import load_image, load_records
    from alignti.common.models import load_vlm
    from alignti.student_train.trainer import TrainConfig, train_student

    out = tmp_path / "half"
    dump_teacher(DumpConfig(teacher=str(kit / "teacher"), data=str(kit / "data/train.json"),
                            images=str(kit / "data/images"), out=str(out), limit=25, unit_size=25, irs_samples=32,
                            progress=False, tpa_positions=0.5, logprob_encoding="float16"))  # the dump's
    # arithmetic (another branch pass), not the encoding: float16 on both sides, held to one ulp
    half, full = CacheReader(out), CacheReader(cache_fp16)
    assert half.params["tpa_positions"] == 0.5 and half.params["tpa_layout"] == "positions"
    model, proc = load_vlm(str(kit / "teacher"), torch.device("cpu"))
    adapter = adapter_for(model)
    recs = {r.sample_id: r for r in load_records(kit / "data/train.json")}
    for i in range(len(half)):
        x = half[i]
        y = next(full[j] for j in range(len(full)) if full[j]["sample_id"] == x["sample_id"])
        n = len(x["topk_ids"])
        assert len(x["tpa_pos"]) == math.ceil(0.5 * n) and np.all(np.diff(x["tpa_pos"]) > 0)
        p = x["tpa_pos"]
        # the main forward is the full dump's (same unit, same batches): its candidates bit for bit
        assert np.array_equal(x["tpa_cand_ids"], y["tpa_cand_ids"][p])
        # the branch pass is not: fewer branch tokens, other masked keys, so its fp32 log-probs move by a few ulp:
        # fp16 values by at most one ulp, ids only between near-ties, the fp32 rest mass to 2e-3
        assert_fp16_within_one_ulp(x["tpa_logprobs"], y["tpa_logprobs"][p], "tpa_logprobs")
        assert_fp16_ids_equal_up_to_ties(x["tpa_ids"], y["tpa_ids"][p], x["tpa_logprobs"], y["tpa_logprobs"][p],
                                         "tpa_ids")
        np.testing.assert_allclose(x["tpa_tail"], y["tpa_tail"][p], atol=2e-3)
        if i < 4:  # the chosen positions are where the teacher's full-vocabulary entropy is highest
            rec = recs[x["sample_id"]]
            img, sha = load_image(rec, kit / "data/images")
            enc = encode(proc, rec, img, sha)
            with torch.no_grad():
                lp = torch.log_softmax(lm_logits(adapter, forward(adapter, collate(
                    [enc.__dict__], proc.tokenizer.pad_token_id, type(adapter))).resp_hidden).float(), -1)
            ent = -(lp.exp() * lp).sum(-1).numpy()
            chosen = set(x["tpa_pos"].tolist())
            assert ent[list(chosen)].min() >= ent[[p for p in range(n) if p not in chosen]].max(initial=-1) - 1e-5
    assert validate_cache(out) == []
    res = train_student(TrainConfig(student=str(kit / "student"), cache=str(out), out=str(tmp_path / "run"),
                                    loss="alignti", max_steps=2, batch_size=4, progress=False))
    assert res["last"]["tpa"] > 0
