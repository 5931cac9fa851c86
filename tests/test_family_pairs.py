"""Pairs across families, as the 2026 recipes pair them: a Qwen2.5-VL teacher distilled into a Qwen3-VL student across
tokenizers (Qwen3's tokenizer is Qwen2.5's plus four added tokens, common/kit_recipes.py QWEN3_TEXT_TOKENS), end to
end on the two demo kits: make-demo --family qwen2_5_vl (a teacher given a short SFT, so its distributions carry
signal), make-demo --family qwen3_vl, dump-teacher, train-student --cross-tokenizer gold through the CLI."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from alignti.common.cache import CacheReader
from alignti.common.errors import FingerprintMismatch
from alignti.common.kit_recipes import QWEN3_TEXT_TOKENS
from alignti.common.models import load_processor
from alignti.student_train.cross import CrossTokenizer
from alignti.student_train.trainer import TrainConfig, train_student
from tests.helpers import generate_once

STEPS = 8


@pytest.fixture(scope="module")
def qpair(tmp_path_factory):
    """A Qwen2.5-VL demo teacher (30 SFT steps at 3e-3) and its cache of 24 samples; a Qwen3-VL demo student."""
    from alignti.demo.kit import make_demo
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher
    root = tmp_path_factory.mktemp("qwen25_to_qwen3")
    make_demo(root / "t", n_train=12, n_val=4, n_test=2, family="qwen2_5_vl", teacher_steps=30, teacher_lr=3e-3,
              teacher_batch=16, teacher_target=None)
    make_demo(root / "s", n_train=2, n_val=1, n_test=1, family="qwen3_vl", train_teacher=False)
    dump_teacher(DumpConfig(teacher=str(root / "t/teacher"), data=str(root / "t/data/train.json"),
                            images=str(root / "t/data/images"), out=str(root / "cache"), limit=24, irs_samples=8,
                            progress=False))
    return root


def test_the_token_map_covers_the_teachers_vocabulary(qpair):
    """Every one of the Qwen2.5-VL teacher's tokens (text by bytes, specials by content or role) maps to the Qwen3-VL
    student token of the same string in the student tokenizer's own vocabulary; the student's four Qwen3 tokens have
    no teacher token (they are the spare ids TPA may stand in with); text overlap 100%."""
    reader = CacheReader(qpair / "cache")
    t_tok = load_processor(str(qpair / "t/teacher")).tokenizer
    proc = load_processor(str(qpair / "s/student"))
    s_vocab = proc.tokenizer.get_vocab()
    t_vocab = t_tok.get_vocab()
    assert len(s_vocab) == len(t_vocab) + len(QWEN3_TEXT_TOKENS)
    extra = sorted(s_vocab[t] for t in QWEN3_TEXT_TOKENS)
    assert extra == list(range(len(t_vocab), len(s_vocab)))
    cross = CrossTokenizer(reader, proc)
    want = np.full(len(t_vocab), -1)
    for piece, i in t_vocab.items():
        want[i] = s_vocab[piece]
    assert np.array_equal(cross.map, want) and (want >= 0).all()
    assert not np.isin(extra, cross.map).any() and np.isin(extra, cross.spare).all()
    assert cross.overlap == 1.0


def test_qwen2_5_vl_teacher_trains_a_qwen3_vl_student_across_tokenizers(qpair, tmp_path):
    """Without --cross-tokenizer the other tokenizer is refused, naming the way across. With --cross-tokenizer gold
    (train-student, the CLI) every logged term is finite, the gold term falls over the steps (the mean of the last
    three steps below 90% of the first three's), and the saved student reloads with the plain Auto classes
    (processor included: the Qwen3 tokens kept at their ids) and generates through its processor."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from alignti.cli import app
    with pytest.raises(FingerprintMismatch, match="--cross-tokenizer gold"):
        train_student(TrainConfig(student=str(qpair / "s/student"), cache=str(qpair / "cache"),
                                  out=str(tmp_path / "r0"), loss="kd", max_steps=1, progress=False))
    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["train-student", "--student", str(qpair / "s/student"), "--cache",
                                   str(qpair / "cache"), "--out", str(run), "--loss", "alignti", "--cross-tokenizer",
                                   "gold", "--max-steps", str(STEPS), "--batch-size", "6", "--lr", "3e-3"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == STEPS
    for r in rows:
        assert all(np.isfinite(r[k]) for k in ("loss", "sft", "gold", "tpa", "iva")), r
        assert r["tpa_xt_coverage"] > 0
    gold = [r["gold"] for r in rows]
    assert np.mean(gold[-3:]) < 0.9 * np.mean(gold[:3]), gold
    generate_once(run / "final")  # Auto classes, the processor (the library's own where torchvision is here)
    model = AutoModelForImageTextToText.from_pretrained(run / "final")
    tok = AutoTokenizer.from_pretrained(run / "final")
    assert model.config.model_type == "qwen3_vl"
    assert [tok.convert_tokens_to_ids(t) for t in QWEN3_TEXT_TOKENS] == list(range(320, 324))
    assert len(tok) == model.config.text_config.vocab_size == 324
