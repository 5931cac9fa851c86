"""A teacher and a student of different families across tokenizers, as the 2026 recipes pair them (TRL's GOLD VLM
example): a Qwen3-VL teacher (byte-level BPE with Qwen's specials and template, 3 x 3 image tokens per scene) and a
SmolVLM student (its own vocabulary, SmolVLM's "User:" / "Assistant:" template, each scene split into 2 x 2
sub-images plus the global image with markup tokens between them), trained with ``--cross-tokenizer gold``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from alignti.common.errors import DataError
from alignti.student_train.trainer import TrainConfig, train_student


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory):
    """The Qwen3-VL teacher's kit (its LM head made confident) and its cache."""
    from alignti.demo import kit
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher
    out = tmp_path_factory.mktemp("qwen3vl_teacher")
    kit.make_demo(out / "kit", n_train=4, n_val=1, n_test=1, train_teacher=False, family="qwen3_vl")
    # an untrained teacher's next-token distribution is near uniform, as is the student's: a KL of ~0.01 nats, nothing
    # to learn. Its LM head scaled by 20 makes it confident (its argmax unchanged), so GOLD has a distribution to teach
    from transformers import AutoModelForImageTextToText
    teacher = AutoModelForImageTextToText.from_pretrained(out / "kit/teacher")
    teacher.lm_head.weight.data.mul_(20.0)
    teacher.save_pretrained(out / "kit/teacher")
    dump_teacher(DumpConfig(teacher=str(out / "kit/teacher"), data=str(out / "kit/data/train.json"),
                            images=str(out / "kit/data/images"), out=str(out / "cache"), limit=6, irs_samples=4,
                            progress=False))
    return out


@pytest.fixture(scope="module")
def pair(teacher_cache):
    from alignti.common.saving import save_checkpoint
    from alignti.demo import kit
    tok = kit.build_tokenizer("smolvlm", vocab_size=300)  # another vocabulary than the teacher's 320
    save_checkpoint(kit.build_model("smolvlm", tok, kit.STUDENT, 3), kit.build_processor(tok, "smolvlm"),
                    teacher_cache / "student")
    return teacher_cache


def test_qwen3_vl_teacher_smolvlm_student_gold(pair, tmp_path):
    """The GOLD term falls over a few steps on the same samples (the student learns the teacher's distribution
    through the token alignment), and the run folder reloads with the plain Auto classes and generates."""
    from tests.helpers import generate_once
    res = train_student(TrainConfig(student=str(pair / "student"), cache=str(pair / "cache"), out=str(tmp_path / "run"),
                                    loss="kd+tpa", cross_tokenizer="gold", max_steps=8, batch_size=6, lr=3e-3,
                                    warmup_steps=0, kd_weight=5.0, progress=False))
    rows = [json.loads(ln) for ln in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    gold = [r["gold"] for r in rows]
    assert len(rows) == 8 and res["steps"] == 8 and all(np.isfinite(gold))
    assert gold[-1] < 0.85 * gold[0], gold  # one batch, every step: the term falls (3.91 to 3.00 nats measured)
    assert all("tpa_xt_coverage" in r for r in rows)
    generate_once(tmp_path / "run/final")


def test_iva_across_a_split_image_is_refused_by_name(pair, tmp_path):
    """IVA across tokenizers resamples the teacher's saliency from its image grid to the student's; a SmolVLM image is
    sub-images plus a global image (no one grid), so --loss kd+iva is refused naming the sample and the grids, before
    any step, and no run folder is left with a final model."""
    with pytest.raises(DataError, match=r"IVA across image-token grids.*student \[\(0, 0\)\]"):
        train_student(TrainConfig(student=str(pair / "student"), cache=str(pair / "cache"), out=str(tmp_path / "run"),
                                  loss="kd+iva", cross_tokenizer="gold", max_steps=1, progress=False))
    assert not (tmp_path / "run/final").exists()


def test_qwen3_vl_teacher_tiled_lfm2_vl_student_with_iva(teacher_cache, tmp_path):
    """TRL's Qwen3-VL to LFM2.5-VL pairing: a tiled LFM2-VL student (the kit's processor splits each 48-px scene into
    2 x 2 tiles plus a thumbnail) trains with ``--cross-tokenizer gold --loss alignti``: the teacher's 3 x 3 saliency
    is resampled onto the student's tiles and thumbnail (common/tiles.py ``resample_layout``), every term finite, and
    the run folder reloads and generates."""
    pytest.importorskip("torchvision")
    from alignti.common.saving import save_checkpoint
    from alignti.demo import kit
    from tests.helpers import generate_once
    tok = kit.build_tokenizer("lfm2_vl", vocab_size=300)
    save_checkpoint(kit.build_model("lfm2_vl", tok, kit.STUDENT, 3), kit.build_processor(tok, "lfm2_vl"),
                    tmp_path / "student")
    res = train_student(TrainConfig(student=str(tmp_path / "student"), cache=str(teacher_cache / "cache"),
                                    out=str(tmp_path / "run"), loss="alignti", cross_tokenizer="gold", max_steps=2,
                                    batch_size=4, progress=False))
    rows = [json.loads(ln) for ln in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert res["steps"] == 2 and all(np.isfinite(r[k]) and r[k] > 0 for r in rows for k in ("gold", "iva"))
    generate_once(tmp_path / "run/final")
