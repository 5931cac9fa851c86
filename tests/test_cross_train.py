"""train-student --cross-tokenizer: a tiny LLaVA teacher's v7 cache, students with their own tokenizer and patch
grid (LLaVA, patch 8: another vocabulary, 4x the image tokens) or their own family (Qwen2-VL: byte-level BPE with
other specials, another template, a dynamic grid). The batch contract the losses consume, checked against
independent references; each loss trains; older caches are refused; the same-tokenizer path is unchanged."""

import json
import shutil

import numpy as np
import pytest
import torch

from alignti.common.cache import CacheReader
from alignti.common.conversation import encode, record_from_conversation
from alignti.common.errors import CacheError, DataError, FingerprintMismatch
from alignti.common.models import load_processor
from alignti.common.records import image_refs
from alignti.common.schema import MANIFEST_FILE
from alignti.common.token_align import token_bytes
from alignti.student_train.cross import CrossDataset, CrossTokenizer
from alignti.student_train.data import StudentCollator
from alignti.student_train.trainer import TrainConfig, train_student


@pytest.fixture(scope="module")
def xkit(tmp_path_factory):
    from alignti.common.saving import save_checkpoint
    from alignti.demo import kit
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher
    out = tmp_path_factory.mktemp("xkit")
    kit.make_demo(out, n_train=4, n_val=2, n_test=2, train_teacher=False)
    for fam, patch in (("llava", 8), ("qwen2_vl", None)):
        tok = kit.build_tokenizer(fam, vocab_size=300)
        proc = kit.build_processor(tok, fam, patch) if patch else kit.build_processor(tok, fam)
        model = kit.build_model(fam, tok, kit.STUDENT, 3, patch) if patch else kit.build_model(fam, tok, kit.STUDENT, 3)
        save_checkpoint(model, proc, out / f"student_{fam}")
    dump_teacher(DumpConfig(teacher=str(out / "teacher"), data=str(out / "data/train.json"),
                            images=str(out / "data/images"), out=str(out / "cache"), limit=6, irs_samples=4,
                            progress=False))
    return out


def _batch(xkit, fam, iva=True, tpa=True):
    reader = CacheReader(xkit / "cache")
    proc = load_processor(str(xkit / f"student_{fam}"))
    cross = CrossTokenizer(reader, proc, iva=iva, tpa=tpa)
    ds = CrossDataset(reader, proc, cross)
    from alignti.common.adapters import adapter_class
    from alignti.common.models import load_config
    coll = StudentCollator(proc, adapter_class(load_config(str(xkit / f"student_{fam}")).model_type), cross)
    samples = [ds[i] for i in range(len(ds))]
    return reader, proc, cross, samples, coll(samples)


@pytest.mark.parametrize("fam", ["llava", "qwen2_vl"])
def test_batch_contract(xkit, fam):
    reader, proc, cross, samples, batch = _batch(xkit, fam)
    teacher_tok = load_processor(str(xkit / "teacher")).tokenizer
    n_t = sum(len(reader[i]["topk_ids"]) for i in range(len(reader)))
    # targets: the student's own response ids, from its own encoding of the same conversation
    own = []
    for i in range(len(reader)):
        x = reader[i]
        refs = image_refs(x["image"])
        rec = record_from_conversation(x["index"], x["sample_id"], refs[0], x["conversation"])
        from alignti.common.sources import load_image
        img, _ = load_image(rec, reader.manifest["images"])
        enc = encode(proc, rec, img)
        own.append(enc.input_ids[enc.response_mask == 1])
    own = np.concatenate(own)
    n_s = len(own)
    assert batch["targets"].tolist() == own.tolist()
    assert batch["xt_pair"].shape == (n_s,) and batch["xt_chunk_s"].shape == (n_s,)
    assert batch["topk_ids"].shape[0] == batch["xt_ids"].shape[0] == batch["xt_chunk_t"].shape[0] == n_t
    assert torch.equal(batch["xt_target_logprob"], batch["target_logprob"])
    # xt_ids: the teacher's top-k through identical token bytes (brute force over the student's vocabulary), away
    # from the rows where the token's place refines it (a turn's first row, its end of turn: test_real_tokenizers)
    tb_t, tb_s = token_bytes(teacher_tok), token_bytes(proc.tokenizer)
    t_off = np.cumsum([0] + [len(x["topk_ids"]) for x in samples])
    fixed = {int(t_off[b] + f[0]) for b, x in enumerate(samples) for f in x["xt_fix"]}
    for r in range(0, n_t, 3):
        if r in fixed:
            continue
        for j, tid in enumerate(batch["topk_ids"][r].tolist()):
            sid = int(batch["xt_ids"][r, j])
            if tb_t[tid] is None or torch.isneginf(batch["xt_logprobs"][r, j]):  # specials by role; merged slots
                continue
            want = [i for i, b in enumerate(tb_s) if b is not None and b == tb_t[tid]]
            assert (sid in want) if want else sid == -1
    # pairs: both rows start their chunk at the same character of the same turn; chunks batch-global and shared
    assert batch["xt_n_chunks"] == int(batch["xt_chunk_s"].max()) + 1 == int(batch["xt_chunk_t"].max()) + 1
    paired = torch.nonzero(batch["xt_pair"] >= 0).flatten()
    assert len(paired) == batch["xt_n_chunks"]
    tr = batch["xt_pair"][paired]
    assert torch.equal(batch["xt_chunk_t"][tr], batch["xt_chunk_s"][paired])
    # IVA: the teacher's map on the student's grid, each turn's mass kept
    g_t = [reader[i]["image_grids"][0] for i in range(len(reader))]
    assert batch["teacher_sal"].shape[1] == max(x["n_image_tokens"] for x in samples)
    if fam == "llava":  # patch 8 against the teacher's 16: 4x the image tokens
        assert batch["teacher_sal"].shape[1] == 4 * g_t[0][0] * g_t[0][1]
    t_mass = np.concatenate([reader[i]["saliency"].astype(np.float32).sum(-1) for i in range(len(reader))])
    assert np.allclose(batch["teacher_sal"].sum(-1).numpy(), t_mass, rtol=1e-5, atol=1e-6)
    # TPA: only rows whose position is one token for the same text on both sides, candidates in student ids
    assert len(batch["tpa_rows"]) == len(batch["xt_tpa_trows"]) == batch["xt_tpa_kept"][0]
    for s_row, t_row, cands in zip(batch["tpa_rows"].tolist(), batch["xt_tpa_trows"].tolist(),
                                   batch["tpa_cand_ids"].tolist()):
        c = int(batch["xt_chunk_s"][s_row])
        assert (batch["xt_chunk_s"] == c).sum() == 1 and (batch["xt_chunk_t"] == c).sum() == 1
        assert int(batch["xt_chunk_t"][t_row]) == c and all(cid >= 0 for cid in cands)
    for branch in batch["tpa_ids"].reshape(-1, batch["tpa_ids"].shape[-1]).tolist():  # distinct ids: the fold's need
        assert len(set(branch)) == len(branch)


@pytest.mark.parametrize("loss,fam", [("gold", "llava"), ("uld", "qwen2_vl"), ("alm", "qwen2_vl")])
def test_cross_tokenizer_training_runs(xkit, tmp_path, loss, fam):
    res = train_student(TrainConfig(student=str(xkit / f"student_{fam}"), cache=str(xkit / "cache"),
                                    out=str(tmp_path / "run"), loss="alignti", cross_tokenizer=loss, max_steps=2,
                                    batch_size=3, progress=False))
    rows = [json.loads(ln) for ln in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r[loss]) and r[loss] > 0 for r in rows)
    assert all("tpa_xt_coverage" in r and np.isfinite(r["iva"]) for r in rows)
    assert (tmp_path / "run/final").is_dir() and res["steps"] == 2


def test_cross_student_sft_baseline(xkit, tmp_path):
    """--loss sft with --cross-tokenizer: the student's own encoding, SFT on its own tokens, no KD term."""
    train_student(TrainConfig(student=str(xkit / "student_qwen2_vl"), cache=str(xkit / "cache"),
                              out=str(tmp_path / "run"), loss="sft", cross_tokenizer="gold", max_steps=1,
                              batch_size=3, progress=False))
    row = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[0])
    assert np.isfinite(row["sft"]) and not {"gold", "kd", "tpa", "iva"} & set(row)


def test_refusals(xkit, tmp_path):
    # without --cross-tokenizer another tokenizer is refused, and the message names the way across
    with pytest.raises(FingerprintMismatch, match="--cross-tokenizer"):
        train_student(TrainConfig(student=str(xkit / "student_llava"), cache=str(xkit / "cache"),
                                  out=str(tmp_path / "r0"), loss="kd", max_steps=1, progress=False))
    # a cache older than v7 (no turn texts / spans / token strings) is refused in one line naming the re-dump
    old = _as_v6(xkit / "cache", tmp_path / "old")
    with pytest.raises(CacheError, match=r"schema v6.*re-dump it with this alignti \(schema v7\)"):
        train_student(TrainConfig(student=str(xkit / "student_llava"), cache=str(old), out=str(tmp_path / "r1"),
                                  loss="kd", cross_tokenizer="gold", max_steps=1, progress=False))
    with pytest.raises(ValueError, match="--cross-tokenizer must be one of uld, gold, alm"):
        train_student(TrainConfig(student=str(xkit / "student_llava"), cache=str(xkit / "cache"),
                                  out=str(tmp_path / "r2"), cross_tokenizer="dskd", progress=False))



def _as_v6(cache, out):
    """A copy of ``cache`` whose manifest says schema v6: the v7 alignment fields are there but not declared."""
    shutil.copytree(cache, out)
    m = json.loads((out / MANIFEST_FILE).read_text())
    m["schema_version"] = 6
    del m["fingerprint"]["params"]["align_fields"]
    (out / MANIFEST_FILE).write_text(json.dumps(m))
    return out

def test_same_tokenizer_path_ignores_the_v7_fields(xkit, tmp_path):
    """Same tokenizer, no --cross-tokenizer: training on the v7 cache and on the same cache read as v6 (its
    cross-tokenizer fields invisible) gives the same weights bit for bit (same computation, same data)."""
    old = _as_v6(xkit / "cache", tmp_path / "old")
    finals = []
    for name, c in (("new", xkit / "cache"), ("old", old)):
        train_student(TrainConfig(student=str(xkit / "student"), cache=str(c), out=str(tmp_path / name),
                                  loss="alignti", max_steps=2, batch_size=3, progress=False))
        from safetensors.torch import load_file
        finals.append(load_file(str(tmp_path / name / "final/model.safetensors")))
        assert "xt_pair" not in json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
    assert finals[0].keys() == finals[1].keys()
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


def test_student_template_that_rewrites_answers_is_named_before_training(xkit):
    """A student chat template that changes message text (here: trims and upper-cases it) cannot be aligned: the
    preflight names the samples before any step."""
    reader = CacheReader(xkit / "cache")
    proc = load_processor(str(xkit / "student_qwen2_vl"))
    cross = CrossTokenizer(reader, proc)
    cross.preflight(reader)  # the student's own template inserts text verbatim
    proc.chat_template = proc.chat_template.replace("{{ c['text'] }}", "{{ c['text'] | trim | upper }}")
    assert "upper" in proc.chat_template
    with pytest.raises(DataError, match=rf"sample {reader.samples[0]['sample_id']}: {len(reader)} sample\(s\) "
                                        r"cannot be aligned across tokenizers"):
        cross.preflight(reader)


def test_cross_tpa_weights_come_from_the_teachers_rows(xkit):
    """Across tokenizers TPA's candidate weights are the teacher's first-step probabilities at the *teacher's* row
    (``xt_tpa_trows``, its top-k in student ids): in the chunked head as in the unchunked reference, and equal to
    the weights computed on the teacher's own ids (the map is one-to-one on the candidates)."""
    from alignti.common.adapters import adapter_for
    from alignti.common.batch import lm_head
    from alignti.common.losses import LossWeights, candidate_weights, get_loss, head_loss, means, step_counts, total_loss
    from alignti.common.models import load_vlm
    from alignti.student_train.step import student_step_outputs
    reader, proc, cross, samples, batch = _batch(xkit, "llava", iva=False)
    assert batch["xt_tpa_kept"][0] > 0
    # the weights on the student's ids equal those on the teacher's own ids at the teacher's rows
    t_cands = np.concatenate([np.asarray(reader[i]["tpa_cand_ids"]) for i in range(len(reader))])
    t_pos = np.concatenate([np.asarray(reader[i]["tpa_pos"]) + sum(len(reader[j]["topk_ids"]) for j in range(i))
                            for i in range(len(reader))])
    tr = batch["xt_tpa_trows"]
    own = torch.from_numpy(t_cands[[int(np.nonzero(t_pos == r)[0][0]) for r in tr.tolist()]])
    w_teacher = candidate_weights(own, batch["topk_ids"][tr], batch["topk_logprobs"][tr])
    w_student = candidate_weights(batch["tpa_cand_ids"], batch["xt_ids"][tr], batch["topk_logprobs"][tr])
    assert torch.equal(w_teacher, w_student) and (w_teacher.sum(-1) > 0).all()
    model, _ = load_vlm(str(xkit / "student_llava"), torch.device("cpu"), "float32")
    adapter = adapter_for(model)
    spec, w = get_loss("kd+tpa"), LossWeights(tpa=1.3, cross_tokenizer="gold")
    res = student_step_outputs(adapter, batch, spec, 0)
    res.update({k: batch[k] for k in ("xt_tpa_trows",)})
    head = lm_head(adapter)
    got = means(head_loss(spec, w, head, res)["sums"], step_counts(batch), w)
    with torch.no_grad():
        ref = total_loss(spec, w, dict(res, logits=head(res["resp_hidden"]),
                                       branch_logits=head(res["branch_hidden"])))
    assert got["tpa"] == pytest.approx(ref["tpa"].item(), rel=1e-5) and got["gold"] == pytest.approx(
        ref["gold"].item(), rel=1e-5)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_gold_is_kd_with_the_teachers_own_tokenizer(xkit, tau):
    """``--cross-tokenizer gold`` with the teacher's own tokenizer and template: the map is the identity (special
    tokens, the end of turn included), every row is paired with its own teacher row, and at the same weights the
    gold term equals kd to rounding (fp32 head, rel 1e-5), and so does the step's loss."""
    from alignti.common.adapters import adapter_for
    from alignti.common.batch import lm_head
    from alignti.common.losses import LossWeights, get_loss, head_loss, means, step_counts
    from alignti.common.models import load_vlm
    from alignti.student_train.data import CacheDataset
    from alignti.student_train.step import student_step_outputs
    reader = CacheReader(xkit / "cache")
    proc = load_processor(str(xkit / "teacher"))
    cross = CrossTokenizer(reader, proc)
    assert cross.identity and cross.overlap == 1.0
    model, _ = load_vlm(str(xkit / "teacher"), torch.device("cpu"), "float32")
    adapter = adapter_for(model)
    same = StudentCollator(proc, type(adapter))([CacheDataset(reader, proc)[i] for i in range(len(reader))])
    xds = CrossDataset(reader, proc, cross)
    xb = StudentCollator(proc, type(adapter), cross)([xds[i] for i in range(len(xds))])
    assert torch.equal(xb["xt_pair"], torch.arange(len(xb["targets"]))) and torch.equal(xb["xt_ids"], xb["topk_ids"])
    spec, head = get_loss("kd"), lm_head(adapter)
    w_kd, w_gold = LossWeights(temperature=tau), LossWeights(temperature=tau, cross_tokenizer="gold")
    with torch.no_grad():
        kd = means(head_loss(spec, w_kd, head, student_step_outputs(adapter, same, spec, 0))["sums"],
                   step_counts(same), w_kd)
        gold = means(head_loss(spec, w_gold, head, student_step_outputs(adapter, xb, spec, 0))["sums"],
                     step_counts(xb), w_gold)
    assert gold["gold"] == pytest.approx(kd["kd"], rel=1e-5) and gold["loss"] == pytest.approx(kd["loss"], rel=1e-5)


@pytest.mark.parametrize("mode,why", [("uld", "ULD compares the two distributions' probabilities sorted by rank"),
                                      ("alm", "ALM matches only the likelihood of the realised chunks")])
def test_losses_that_did_not_teach_on_shipped_tokenizers_are_not_offered(xkit, tmp_path, mode, why):
    """train-student --cross-tokenizer uld / alm: refused before anything runs, naming why (measured on shipped
    tokenizers, bench/cross_tokenizer_real.py) and pointing at gold; nothing is written."""
    from typer.testing import CliRunner

    from alignti.cli import app
    res = CliRunner().invoke(app, ["train-student", "--student", str(xkit / "student_llava"), "--cache",
                                   str(xkit / "cache"), "--out", str(tmp_path / "run"), "--cross-tokenizer", mode])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and f"--cross-tokenizer {mode} is not offered: {why}" in text
    assert "Use --cross-tokenizer gold" in text and not (tmp_path / "run").exists()
