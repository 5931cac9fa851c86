"""alignti rollout: on-policy rows for dump-teacher, and TPA after the student's own candidates.

* rows are deterministic for a seed whatever the batching and work units, and a kill -9 anywhere then the same
  command gives the same rows;
* the stored candidates are the student's top-B at each generated position, checked against a separate
  teacher-forced forward of the student on prompt + generation (plain transformers, raw logits);
* the cache of a rollout holds, per TPA row, the student's candidates and the teacher's next-step distribution
  after each, checked against the teacher run directly on prefix + candidate (ids exact, log-probs to fp16);
* the loss sits on the row's loss turn only, and the provenance reaches the cache's sample table.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from alignti.common.cache import CacheReader
from alignti.common.conversation import encode
from alignti.common.errors import DataError
from alignti.common.models import load_vlm
from alignti.common.onpolicy import (candidate_count, response_char_starts, restrict_to_loss_turns,
                                     student_response_ids, with_student_response, without_end_markup)
from alignti.common.sources import load_image, open_source
from alignti.student_rollout.generate import sample_tokens
from alignti.student_rollout.rollout import RolloutConfig, rollout
from alignti.teacher_dump.dump import DumpConfig, dump_teacher

ROOT = Path(__file__).resolve().parents[1]


def rows_of(out: Path) -> list[dict]:
    rows = []
    for f in sorted((out / "data").glob("*.parquet")):
        rows += pq.read_table(f).to_pylist()
    return rows


def multi_turn_data(kit: Path, path: Path, n: int = 4) -> Path:
    """n demo samples, every other one with a second question-answer turn."""
    items = json.loads((kit / "data/train.json").read_text())[:n]
    for j, it in enumerate(items):
        if j % 2 == 1 and len(it["conversations"]) == 2:
            it["conversations"] += [{"from": "human", "value": "Is that certain?"}, {"from": "gpt", "value": "yes"}]
    path.write_text(json.dumps(items))
    return path


@pytest.fixture(scope="module")
def qwen_kit(tmp_path_factory):
    from alignti.demo.kit import make_demo
    out = tmp_path_factory.mktemp("qwen_kit")
    make_demo(out, n_train=4, n_val=2, n_test=2, train_teacher=False, family="qwen2_vl")
    return out


def test_sampler_matches_a_reference():
    """Nucleus + inverse-CDF sampling against a plain numpy implementation of the same definition."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 50, generator=g) * 3
    u = torch.rand(6, generator=g)
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.9), (2.0, 0.3)):
        got = sample_tokens(scores, u, temperature, top_p).tolist()
        for r in range(6):
            p = np.exp(scores[r].double().numpy() / temperature)
            p /= p.sum()
            order = np.argsort(-p, kind="stable")
            ps = p[order]
            keep = (np.cumsum(ps) - ps) < top_p
            ps = ps * keep
            cum = np.cumsum(ps) / ps.sum()
            assert got[r] == order[np.searchsorted(cum, float(u[r]), side="right")]


def test_candidate_count():
    # the candidates hold up to and including the first differing position, and only where they exist
    assert candidate_count([5, 6, 7, 9], [5, 6, 7, 2], 4) == 4
    assert candidate_count([5, 6, 8, 9], [5, 6, 7, 2], 4) == 3
    assert candidate_count([5, 6, 7, 2, 11], [5, 6, 7, 2], 4) == 4   # markup after the student's end token
    assert candidate_count([4], [5, 6], 2) == 1


def _rollout(kit, data, out, **kw):
    cfg = dict(student=str(kit / "student"), data=str(data), images=str(kit / "data/images"), out=str(out),
               max_new_tokens=6, progress=False)
    cfg.update(kw)
    return rollout(RolloutConfig(**cfg))


def test_rows_do_not_depend_on_batching(kit, tmp_path):
    data = multi_turn_data(kit, tmp_path / "d.json", n=4)
    a = _rollout(kit, data, tmp_path / "a", temperature=1.0, top_p=0.9, samples_per_prompt=2, batch_size=5,
                 unit_size=3, seed=7)
    b = _rollout(kit, data, tmp_path / "b", temperature=1.0, top_p=0.9, samples_per_prompt=2, batch_size=1,
                 unit_size=1, seed=7)
    ra, rb = rows_of(tmp_path / "a"), rows_of(tmp_path / "b")
    n_turns = sum(sum(1 for c in it["conversations"] if c["from"] == "gpt") for it in json.loads(data.read_text()))
    assert a["counts"]["rows"] + a["counts"]["dropped"] == 2 * n_turns == len(ra) + a["counts"]["dropped"]
    assert [r["id"] for r in ra] == [r["id"] for r in rb]
    for x, y in zip(ra, rb):
        for k in ("conversations", "student_token_ids", "student_cand_ids", "seed", "loss_turns", "turn"):
            assert x[k] == y[k], (x["id"], k)
        np.testing.assert_allclose(x["student_cand_probs"], y["student_cand_probs"], rtol=1e-5)
    # the two samples of a prompt differ (own seeds); another seed gives other rows
    assert ra[0]["student_token_ids"] != ra[1]["student_token_ids"]
    c = _rollout(kit, data, tmp_path / "c", temperature=1.0, top_p=0.9, samples_per_prompt=2, seed=8)
    assert [r["student_token_ids"] for r in rows_of(tmp_path / "c")] != [r["student_token_ids"] for r in ra]
    # provenance: source sample, turn, round, student fingerprint, settings; the row ends with the student's answer
    r = ra[-1]
    src = {it["id"]: it for it in json.loads(data.read_text())}[r["source_id"]]
    ref_turns = [i for i, m in enumerate(src["conversations"]) if m["from"] == "gpt"]
    assert r["conversations"][:-1] == src["conversations"][:ref_turns[r["turn"]]]
    assert r["loss_turns"] == [r["turn"]] and r["round"] == 0 and len(r["student_weights_sha256"]) == 64
    assert json.loads(r["sampling"])["top_p"] == 0.9


def _cli(*args, crash=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("ALIGNTI_CRASH_AT", None)
    if crash:
        env["ALIGNTI_CRASH_AT"] = crash
    return subprocess.run([sys.executable, "-m", "alignti", *map(str, args)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("crash", ["rollout-part:2", "rollout-manifest"])
def test_kill9_then_same_command_gives_the_same_rows(kit, tmp_path, crash):
    data = multi_turn_data(kit, tmp_path / "d.json", n=5)
    args = ["rollout", "--student", kit / "student", "--data", data, "--images", kit / "data/images",
            "--max-new-tokens", 5, "--unit-size", 2, "--samples-per-prompt", 2, "--top-p", 0.8, "--round", 3]
    ref = _cli(*args, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    dead = _cli(*args, "--out", tmp_path / "r", crash=crash)
    assert dead.returncode == -9
    assert not (tmp_path / "r/rollout.json").exists()
    with pytest.raises(DataError, match="unfinished rollout"):  # an unfinished rollout is not data yet
        dump_teacher(DumpConfig(teacher=str(kit / "teacher"), data=str(tmp_path / "r"),
                                images=str(kit / "data/images"), out=str(tmp_path / "c"), progress=False))
    again = _cli(*args, "--out", tmp_path / "r")
    assert again.returncode == 0, again.stderr[-3000:]
    a, b = rows_of(tmp_path / "ref"), rows_of(tmp_path / "r")
    assert len(a) == len(b) > 0 and a == b
    assert sorted(p.name for p in (tmp_path / "r/data").iterdir()) == sorted(p.name for p in (tmp_path / "ref/data").iterdir())
    assert {r["round"] for r in b} == {3}


def _hf_logits(model, ids: torch.Tensor, image_inputs: dict) -> torch.Tensor:
    """Plain transformers forward of one sequence [1, S], with the image-token type ids the family's processor returns
    beside the ids where its forward reads them (M-RoPE families and Gemma 4's bidirectional image attention:
    ``mm_token_type_ids``; Gemma 3's: ``token_type_ids``)."""
    import inspect
    extra = {}
    takes = inspect.signature(model.forward).parameters
    is_image = ids == int(model.config.image_token_id)
    if "image_grid_thw" in image_inputs or "mm_token_type_ids" in takes:  # Gemma 4: its bidirectional image blocks
        extra["mm_token_type_ids"] = is_image.int()
    if "token_type_ids" in takes:
        extra["token_type_ids"] = is_image.long()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), **image_inputs, **extra).logits[0]


def _reference_candidates(model, enc, gen_ids, top_b, image_token_id):
    """The student's top-B at each generated position from one teacher-forced forward of prompt + generation
    (plain transformers forward, softmax of the raw logits, image token skipped)."""
    ids = torch.as_tensor(np.concatenate([enc.input_ids, np.asarray(gen_ids, np.int32)]), dtype=torch.long)[None]
    logits = _hf_logits(model, ids, enc.image_inputs).double()
    s = len(enc.input_ids)
    probs = torch.softmax(logits[s - 1:s - 1 + len(gen_ids)], -1)
    probs[:, image_token_id] = -1.0
    p, j = probs.sort(-1, descending=True)
    return j[:, :top_b].numpy(), p[:, :top_b].numpy()


def _check_candidates(kit_dir, out, images):
    model, proc = load_vlm(str(kit_dir / "student"), torch.device("cpu"))
    image_token_id = int(model.config.image_token_id)
    source = open_source(str(out), images)
    checked = 0
    for rec, row in zip(source.records(), rows_of(out)):
        assert rec.sample_id == row["id"]
        img, sha = load_image(rec, images)
        enc = encode(proc, rec, img, sha, generation_prompt=True)  # the row's student answer dropped: its prompt
        ids, probs = _reference_candidates(model, enc, row["student_token_ids"], len(row["student_cand_ids"][0]),
                                           image_token_id)
        assert np.array_equal(np.asarray(row["student_cand_ids"]), ids), row["id"]
        np.testing.assert_allclose(np.asarray(row["student_cand_probs"]), probs, rtol=1e-4, atol=1e-7)
        checked += len(ids)
    return checked


def test_candidates_are_the_students_top_b(kit, qwen_kit, tmp_path):
    """Raw logits at temperature 1, not the warped sampling distribution (temperature 1.7, top-p 0.5 here)."""
    for k, (kd, n) in enumerate(((kit, 3), (qwen_kit, 2))):
        data = multi_turn_data(kd, tmp_path / f"d{k}.json", n=n)
        out = tmp_path / f"r{k}"
        _rollout(kd, data, out, temperature=1.7, top_p=0.5, top_b=5, max_new_tokens=5)
        assert _check_candidates(kd, out, str(kd / "data/images")) >= 10


def _direct_next_step(model, enc_ids, image_inputs, pos, cand, k2):
    """The teacher run directly on the prefix (tokens before sequence position ``pos``) + the candidate."""
    ids = torch.as_tensor(np.concatenate([enc_ids[:pos], [cand]]), dtype=torch.long)[None]
    logits = _hf_logits(model, ids, image_inputs)[-1]
    lp = torch.log_softmax(logits.double(), -1)
    v, j = lp.topk(k2)
    return j.numpy(), v.numpy()


def _check_tpa(kit_dir, rollout_dir, cache_dir, images):
    teacher, proc = load_vlm(str(kit_dir / "teacher"), torch.device("cpu"))
    rows = {r["id"]: r for r in rows_of(rollout_dir)}
    reader = CacheReader(str(cache_dir))
    assert reader.manifest["tpa_candidates"]["by"] == "student"
    assert reader.params["tpa_candidates"] == "student"
    source = open_source(str(rollout_dir), images)
    recs = {r.sample_id: r for r in source.records()}
    table = reader.table.to_pylist()
    n_student = 0
    for i in range(len(reader)):
        x = reader[i]
        row, meta = rows[x["sample_id"]], table[i]
        assert meta["source_id"] == row["source_id"] and meta["loss_turns"] == row["loss_turns"]
        assert meta["student_sha256"] == row["student_weights_sha256"] and meta["round"] == row["round"]
        rec = recs[x["sample_id"]]
        img, sha = load_image(rec, images)
        enc = restrict_to_loss_turns(encode(proc, rec, img, sha), row["loss_turns"])
        if row["turn"] >= 0 and row["student_cand_valid"] > 0:  # the student's own tokens where the texts allow
            # (test_dump_scores_the_students_own_tokens checks that rule on its own)
            s, e = enc.resp_spans[-1]
            own = student_response_ids(enc.input_ids[s:e], row["student_token_ids"], row["finish"], proc.tokenizer,
                                       int(teacher.config.image_token_id))
            if own is not None:  # with the character starts the cache keeps for the student's tokens (schema v7)
                body = len(row["student_token_ids"]) - (1 if row["finish"] == "eos" else 0)
                starts = response_char_starts(proc.tokenizer, own[:body], len(own) - body,
                                              enc.turn_texts[enc.resp_turns[-1]])
                assert with_student_response(enc, own, char_starts=starts)
                assert np.array_equal(x["resp_char_start"], enc.char_start[enc.response_mask.astype(bool)])
        else:
            own = None
        if row["turn"] >= 0 and own is None and row["finish"] == "length":  # cut, re-encoded: no end of turn
            assert without_end_markup(enc)
        assert np.array_equal(x["input_ids"], enc.input_ids) and np.array_equal(x["response_mask"], enc.response_mask)
        resp_pos = np.nonzero(enc.response_mask)[0]
        n_valid = min(row["student_cand_valid"], candidate_count(x["input_ids"][resp_pos], row["student_token_ids"],
                                                                 len(row["student_cand_ids"])))
        assert meta["tpa_student_rows"] == sum(1 for t in x["tpa_pos"] if t < n_valid)
        B = x["tpa_cand_ids"].shape[1]
        for m, t in enumerate(x["tpa_pos"]):
            if t >= n_valid:
                continue  # the teacher's own candidates stand in here
            n_student += 1
            assert x["tpa_cand_ids"][m].tolist() == row["student_cand_ids"][t][:B]
            for b, c in enumerate(x["tpa_cand_ids"][m]):
                ids, lps = _direct_next_step(teacher, x["input_ids"], enc.image_inputs, resp_pos[t], int(c),
                                             x["tpa_ids"].shape[-1])
                assert np.array_equal(x["tpa_ids"][m, b], ids), (x["sample_id"], t, b)
                np.testing.assert_allclose(x["tpa_logprobs"][m, b].astype(np.float64), lps, rtol=1e-3, atol=4e-3)
    return n_student


@pytest.mark.parametrize("mode", ["generated", "teacher-forced"])
def test_tpa_after_the_students_candidates(kit, qwen_kit, tmp_path, mode):
    for k, (kd, n) in enumerate(((kit, 3), (qwen_kit, 2))):
        data = multi_turn_data(kd, tmp_path / f"d{k}.json", n=n)
        ro, c = tmp_path / f"r{k}", tmp_path / f"c{k}"
        _rollout(kd, data, ro, temperature=0.0, teacher_forced=mode == "teacher-forced", top_b=4)
        # float16, k = 32: this checks the dump's TPA arithmetic against the teacher run directly in rank order (the
        # packed encoding's bound is checked in test_cache.py / test_codec.py); k does not matter to it
        dump_teacher(DumpConfig(teacher=str(kd / "teacher"), data=str(ro), images=str(kd / "data/images"), out=str(c),
                                tpa_branches=3, tpa_top_k=5, saliency_layer="1", unit_size=2, progress=False,
                                top_k=32, logprob_encoding="float16"))
        n_student = _check_tpa(kd, ro, c, str(kd / "data/images"))
        assert n_student >= (8 if mode == "teacher-forced" else 3)


def test_loss_on_the_students_turn_only(kit, tmp_path):
    data = multi_turn_data(kit, tmp_path / "d.json", n=2)
    ro = tmp_path / "r"
    _rollout(kit, data, ro, temperature=0.0)
    dump_teacher(DumpConfig(teacher=str(kit / "teacher"), data=str(ro), images=str(kit / "data/images"),
                            out=str(tmp_path / "c"), saliency_layer="1", progress=False))
    reader = CacheReader(str(tmp_path / "c"))
    second = [i for i in range(len(reader)) if reader.table.column("source_turn")[i].as_py() == 1]
    assert second, "a row answering the second assistant turn"
    for i in second:
        x = reader[i]
        assert len(x["resp_spans"]) == 1  # one loss turn: KD, TPA, saliency / IVA for it alone
        (s, e), = x["resp_spans"]
        assert x["response_mask"].sum() == e - s and x["response_mask"][s:e].all()
        assert x["saliency"].size == x["n_image_tokens"]  # one turn's saliency
    # an ordinary dataset keeps every assistant turn, and its provenance columns are empty
    dump_teacher(DumpConfig(teacher=str(kit / "teacher"), data=str(data), images=str(kit / "data/images"),
                            out=str(tmp_path / "c0"), saliency_layer="1", progress=False))
    r0 = CacheReader(str(tmp_path / "c0"))
    assert r0.manifest["tpa_candidates"] == {"by": "teacher"} and r0.params["tpa_candidates"] == "teacher"
    assert max(len(r0[i]["resp_spans"]) for i in range(len(r0))) == 2
    assert set(r0.table.column("source_id").to_pylist()) == {None}


def test_greedy_rollout_retokenizes(kit, tmp_path):
    """A trained model's greedy answers re-encode to the tokens it generated (candidates hold everywhere)."""
    data = multi_turn_data(kit, tmp_path / "d.json", n=4)
    out = tmp_path / "r"
    m = rollout(RolloutConfig(student=str(kit / "teacher"), data=str(data), images=str(kit / "data/images"),
                              out=str(out), temperature=0.0, max_new_tokens=8, progress=False))
    rows = rows_of(out)
    assert rows and all(r["retokenized_equal"] for r in rows if r["finish"] == "eos"), m["counts"]
    assert all(r["student_cand_valid"] == len(r["student_token_ids"]) for r in rows if r["retokenized_equal"])


def _text_safe_student(kit_dir: Path, out: Path) -> Path:
    """The kit's student with the LM-head rows of every token zeroed but the end-of-sequence token and the
    one-letter tokens of "red", "circle" and "square", those scaled by 30: its greedy answers are letters (texts
    that spell its tokens exactly); sampled, the zeroed tokens keep some probability."""
    import shutil
    shutil.copytree(kit_dir / "student", out)
    model, proc = load_vlm(str(out), torch.device("cpu"))
    tok = proc.tokenizer
    keep = {model.generation_config.eos_token_id} | {t for t in range(len(tok)) if tok.decode([t]) in set("redcilsqua")}
    assert len(keep) == 11
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        for t in range(head.shape[0]):
            head[t] = head[t] * 30.0 if t in keep else 0.0
    model.save_pretrained(out)
    return out


def _cache_responses(ro: Path, c: Path, kd: Path) -> list[tuple[dict, list[int], int]]:
    """Dump the rollout ``ro`` into ``c``; per cache sample (its rollout row, the cache's response ids, its TPA rows
    on the student's candidates)."""
    dump_teacher(DumpConfig(teacher=str(kd / "teacher"), data=str(ro), images=str(kd / "data/images"), out=str(c),
                            top_k=8, tpa_branches=2, tpa_top_k=4, saliency_layer="1", progress=False))
    rows = {r["id"]: r for r in rows_of(ro)}
    reader = CacheReader(str(c))
    assert len(reader) == len(rows)
    out = []
    for i in range(len(reader)):
        x = reader[i]
        (s, e), = x["resp_spans"]
        assert x["response_mask"].sum() == e - s and x["response_mask"][s:e].all()
        out.append((rows[x["sample_id"]], x["input_ids"][s:e].tolist(), reader.table.column("tpa_student_rows")[i].as_py()))
    return out


def test_dump_scores_the_students_own_tokens(kit, qwen_kit, tmp_path):
    """The cache's response ids are the student's generated ids (then, unless cut at --max-new-tokens, the end-of-turn
    markup) on every row whose answer text holds all its tokens, although re-encoding that text gives other ids on many
    rows (the student spells text in byte pieces and splits the tokenizer would not make); on a row whose text dropped
    a special token the re-encoded answer stays. Greedy: a student that writes only letters (every row kept);
    sampled: that student's nucleus also reaches byte pieces and special tokens."""
    kept = 0
    for k, kd in enumerate((kit, qwen_kit)):
        student = _text_safe_student(kd, tmp_path / f"s{k}")
        tok = load_vlm(str(student), torch.device("cpu"))[1].tokenizer
        data = multi_turn_data(kd, tmp_path / f"d{k}.json", n=4)
        for temperature, top_p in ((0.0, 1.0), (1.0, 1.0)):
            ro = tmp_path / f"r{k}-{temperature}"
            m = rollout(RolloutConfig(student=str(student), data=str(data), images=str(kd / "data/images"),
                                      out=str(ro), temperature=temperature, top_p=top_p, max_new_tokens=10, top_b=2,
                                      seed=3, progress=False))
            assert m["counts"]["rows"] >= 4
            for row, resp, tpa_student in _cache_responses(ro, tmp_path / f"c{k}-{temperature}", kd):
                gen = row["student_token_ids"]
                body = gen[:-1] if row["finish"] == "eos" else gen
                whole = tok.decode(body, skip_special_tokens=True) == tok.decode(body, skip_special_tokens=False)
                assert whole or temperature > 0  # the letters-only student at greedy
                if whole:
                    assert resp[:len(gen)] == gen, (row["id"], resp, gen)
                    if row["finish"] == "length":  # cut at --max-new-tokens: scored as generated, no end of turn
                        assert resp == gen
                    else:
                        assert 1 <= len(resp) - len(gen) <= 2  # the end-of-turn markup the teacher also scores
                    assert tpa_student == len(gen) and row["retokenized_equal"]  # TPA after the student's candidates
                    text = tok(row["conversations"][-1]["value"], add_special_tokens=False)["input_ids"]
                    kept += text[:len(body)] != body  # the text alone would have lost the student's tokens
                else:
                    assert resp[:len(gen)] != gen and not row["retokenized_equal"]
    assert kept >= 1
