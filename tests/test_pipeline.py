"""End to end on the demo kit: dump -> train -> reload; fingerprint refusal; bit-for-bit resume."""

import json

import pytest
import torch
from typer.testing import CliRunner

from alignti.common.errors import FingerprintMismatch
from alignti.student_train.trainer import MEASURED, TrainConfig, train_student


def metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def mean(xs):
    return sum(xs) / len(xs)


def test_kd_end_to_end_and_reload(kit, cache, tmp_path):
    run = tmp_path / "run"
    res = train_student(TrainConfig(student=str(kit / "student"), cache=str(cache), out=str(run), loss="kd",
                                    max_steps=30, batch_size=8, lr=3e-3, progress=False))
    m = metrics(run)
    assert [x["step"] for x in m] == list(range(1, 31))
    assert mean([x["kd"] for x in m[-5:]]) < 0.7 * mean([x["kd"] for x in m[:5]])
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(res["final"])
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert (run / "final/processor_config.json").exists() or (run / "final/preprocessor_config.json").exists()


def test_alignti_every_term_falls(kit, cache, tmp_path):
    run = tmp_path / "run"
    train_student(TrainConfig(student=str(kit / "student"), cache=str(cache), out=str(run), loss="alignti",
                              max_steps=50, batch_size=8, lr=3e-3, iva_weight=5.0, progress=False))
    m = metrics(run)
    for term in ("sft", "kd", "iva", "tpa"):
        first, last = mean([x[term] for x in m[:8]]), mean([x[term] for x in m[-8:]])
        assert last < first, (term, first, last)


def test_iva_step_moves_student_attention_toward_teacher(kit, cache):
    from alignti.common.adapters import adapter_for
    from alignti.common.batch import forward
    from alignti.common.cache import CacheReader
    from alignti.common.losses import iva_loss
    from alignti.common.models import load_vlm
    from alignti.student_train.data import CacheDataset, StudentCollator

    model, proc = load_vlm(str(kit / "student"), torch.device("cpu"))
    adapter = adapter_for(model)
    reader = CacheReader(cache)
    batch = StudentCollator(proc, type(adapter))([CacheDataset(reader, proc)[i] for i in range(8)])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    def loss():
        out = forward(adapter, batch, capture_layers=[1])
        return iva_loss(batch["teacher_sal"], out.saliency[1], batch["sal_valid"], 0.25)

    before = loss()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss()
    assert after < before


def test_student_with_other_tokenizer_is_refused(kit, cache, tmp_path):
    from alignti.demo.kit import STUDENT, build_model, build_processor, build_tokenizer
    tok = build_tokenizer(vocab_size=300)
    other = tmp_path / "other"
    build_model("llava", tok, STUDENT, 0).save_pretrained(other)
    build_processor(tok).save_pretrained(other)
    with pytest.raises(FingerprintMismatch, match="another tokenizer"):
        train_student(TrainConfig(student=str(other), cache=str(cache), out=str(tmp_path / "run"), max_steps=2,
                                  progress=False))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("gc", ["", "gc", "gc-reentrant-every2"])
def test_resume_is_bit_for_bit(kit, cache, tmp_path, gc):
    common = dict(student=str(kit / "student"), cache=str(cache), loss="alignti", max_steps=8, batch_size=8,
                  save_every=3, grad_accum=2, progress=False, gradient_checkpointing=bool(gc),
                  checkpoint_reentrant="reentrant" in gc, checkpoint_every=2 if "every2" in gc else 1)
    train_student(TrainConfig(out=str(tmp_path / "a"), **common))
    stopped = train_student(TrainConfig(out=str(tmp_path / "b"), **common), stop_after=5)  # crash after step 5
    assert stopped == {"stopped_at": 5}
    train_student(TrainConfig(out=str(tmp_path / "b"), resume=True, **common))  # resumes from the step-3 checkpoint
    from safetensors.torch import load_file
    a = load_file(tmp_path / "a/final/model.safetensors")
    b = load_file(tmp_path / "b/final/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda ms: [{k: v for k, v in x.items() if k not in MEASURED} for x in ms]  # noqa: E731
    assert strip(metrics(tmp_path / "a")) == strip(metrics(tmp_path / "b"))


def test_cli_inspect_validate_and_thin_layer(cache):
    from alignti.cli import app
    r = CliRunner().invoke(app, ["inspect-cache", str(cache), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["counts"]["ok"] == 60 and info["top_k"] == 64 and info["logprob_encoding"] == "packed"  # defaults
    assert info["compression_vs_full_fp16"] > 1 and info["topk_bytes_per_token"] > 0
    assert CliRunner().invoke(app, ["validate-cache", str(cache)]).exit_code == 0
    from alignti.common.inspect import render_summary
    for ratio, says in ((info["compression_vs_full_fp16"], f"{info['compression_vs_full_fp16']:.1f}x smaller"),
                        (0.5, "2.0x larger"), (1.0, "1.0x smaller")):  # a cache larger than full fp16 says larger
        text = render_summary(dict(info, compression_vs_full_fp16=ratio))
        assert f"vs full fp16     {info['full_vocab_fp16_bytes_per_token']} B/token" in text and says in text
    r = CliRunner().invoke(app, ["train-student", "--student", "x", "--cache", "/nonexistent", "--out", "/tmp/x"])
    assert r.exit_code == 2


def test_qwen2_vl_end_to_end_every_term_falls(tmp_path):
    """dump-teacher --saliency-layer auto then train-student --loss alignti on the Qwen2-VL demo kit."""
    from alignti.demo.kit import make_demo
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher
    kit = tmp_path / "kit"
    make_demo(kit, n_train=30, n_val=4, n_test=4, teacher_steps=80, family="qwen2_vl", teacher_lr=3e-3,
              teacher_batch=16, teacher_target=None, caption_rate=0.0)
    m = dump_teacher(DumpConfig(teacher=str(kit / "teacher"), data=str(kit / "data/train.json"),
                                images=str(kit / "data/images"), out=str(tmp_path / "cache"), irs_samples=32,
                                progress=False))
    from alignti.demo.kit import TEACHER
    assert m["irs"]["layer"] == m["saliency_layer"] and len(m["irs"]["curve"]) == TEACHER["num_hidden_layers"]
    # the default dump (packed, k = 64) against the Qwen2-VL teacher itself: ids as a set, the codec's bound, the
    # rest mass (tests/test_cache.py)
    from alignti.common.cache import CacheReader
    from tests.test_cache import check_dump_against_teacher
    assert CacheReader(tmp_path / "cache").params["logprob_encoding"] == "packed"
    assert CacheReader(tmp_path / "cache").params["top_k"] == 64
    check_dump_against_teacher(kit / "teacher", kit / "data/train.json", kit / "data/images", tmp_path / "cache", 3)
    run = tmp_path / "run"
    train_student(TrainConfig(student=str(kit / "student"), cache=str(tmp_path / "cache"), out=str(run),
                              loss="alignti", max_steps=40, batch_size=8, lr=3e-3, iva_weight=5.0, progress=False))
    ms = metrics(run)
    for term in ("sft", "kd", "iva", "tpa"):
        first, last = mean([x[term] for x in ms[:8]]), mean([x[term] for x in ms[-8:]])
        assert last < first, (term, first, last)
    from transformers import AutoModelForImageTextToText
    assert type(AutoModelForImageTextToText.from_pretrained(run / "final")).__name__ == "Qwen2VLForConditionalGeneration"


def test_dataloader_workers_give_the_same_batches(kit, cache, tmp_path):
    common = dict(student=str(kit / "student"), cache=str(cache), loss="alignti", max_steps=3, batch_size=8,
                  progress=False)
    train_student(TrainConfig(out=str(tmp_path / "w0"), **common))
    train_student(TrainConfig(out=str(tmp_path / "w2"), workers=2, **common))
    strip = lambda ms: [{k: v for k, v in x.items() if k not in MEASURED} for x in ms]  # noqa: E731
    assert strip(metrics(tmp_path / "w0")) == strip(metrics(tmp_path / "w2"))


def test_freeze_vision_keeps_the_encoder_and_trains_the_rest(kit, cache, tmp_path):
    from safetensors.torch import load_file
    train_student(TrainConfig(student=str(kit / "student"), cache=str(cache), out=str(tmp_path / "r"), loss="alignti",
                              max_steps=2, freeze_vision=True, progress=False))
    before, after = load_file(kit / "student/model.safetensors"), load_file(tmp_path / "r/final/model.safetensors")
    vision = [k for k in before if "vision_tower" in k]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    assert any(not torch.equal(before[k], after[k]) for k in before if "multi_modal_projector" in k)
    assert any(not torch.equal(before[k], after[k]) for k in before if "language_model" in k)


def test_answer_saliency_query_is_cached_and_used_by_the_student(kit, tmp_path):
    """--saliency-query answer: the saliency query is the position predicting each turn's first answer token;
    the cache stores those spans, so the student's IVA map comes from the same position."""
    import numpy as np
    from alignti.common.cache import CacheReader
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher
    out = tmp_path / "c"
    dump_teacher(DumpConfig(teacher=str(kit / "teacher"), data=str(kit / "data/train.json"),
                            images=str(kit / "data/images"), out=str(out), limit=20, saliency_layer="auto",
                            irs_samples=16, tpa_branches=0, saliency_query="answer", progress=False))
    r = CacheReader(out)
    assert r.params["saliency_query"] == "answer"
    for i in range(len(r)):
        x = r[i]
        assert x["instr_spans"] == [(s - 1, s) for s, _ in x["resp_spans"]]
        assert np.allclose(x["saliency"].astype(np.float32).sum(-1), 1, atol=1e-2)
    res = train_student(TrainConfig(student=str(kit / "student"), cache=str(out), out=str(tmp_path / "r"),
                                    loss="kd+iva", max_steps=2, progress=False))
    assert res["last"]["iva"] > 0
    with pytest.raises(ValueError, match="saliency-query"):
        dump_teacher(DumpConfig(teacher=str(kit / "teacher"), data="x", images="y", out=str(tmp_path / "d"),
                                saliency_query="everything"))


def test_checkpointing_options_are_checked(cache, tmp_path):
    """Reentrant checkpoints with FSDP2 and a checkpoint stride below 1 are refused before anything is written."""
    base = dict(student="unused", cache=str(cache), out=str(tmp_path / "run"), gradient_checkpointing=True,
                progress=False)
    with pytest.raises(ValueError, match="--checkpoint-reentrant does not go with --fsdp"):
        train_student(TrainConfig(fsdp=True, checkpoint_reentrant=True, **base))
    with pytest.raises(ValueError, match="--checkpoint-every must be 1 or more"):
        train_student(TrainConfig(checkpoint_every=0, **base))
    assert not (tmp_path / "run").exists()
