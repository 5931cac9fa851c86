"""train-student refuses, before its first step, a student it could not save at the end; --resume of a finished run
reports that run's last metrics; evaluate --cache says its KL is the folded lower bound and gives the rest mass."""

import json

import numpy as np
import pytest

from alignti.common.cache import CacheReader
from alignti.common.errors import AlignTIError


class _GgufLikeQuantizer:
    """What transformers attaches to a model dequantised from GGUF: a quantizer that cannot be serialised."""

    class quantization_config:  # noqa: N801 - mirrors the attribute transformers reads
        quant_method = "gguf"

    def is_serializable(self, safe_serialization=None):
        return False


def test_a_student_that_cannot_be_saved_is_refused_before_the_first_step(kit, cache, tmp_path, monkeypatch):
    import alignti.student_train.trainer as trainer
    real = trainer.load_vlm

    def load_quantised(*a, **kw):
        model, proc = real(*a, **kw)
        model.hf_quantizer = _GgufLikeQuantizer()
        return model, proc
    monkeypatch.setattr(trainer, "load_vlm", load_quantised)
    with pytest.raises(AlignTIError, match="refused before the first step.*'gguf'.*quantization_config"):
        trainer.train_student(trainer.TrainConfig(student=str(kit / "student"), cache=str(cache),
                                                  out=str(tmp_path / "run"), loss="kd", max_steps=2, progress=False))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no step was taken


def test_resume_of_a_finished_run_reports_its_last_metrics(kit, cache, tmp_path):
    from alignti.student_train.trainer import TrainConfig, train_student
    cfg = dict(student=str(kit / "student"), cache=str(cache), out=str(tmp_path / "run"), loss="kd", max_steps=2,
               progress=False)
    first = train_student(TrainConfig(**cfg))
    again = train_student(TrainConfig(**cfg, resume=True))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert len(lines) == 2 and again["steps"] == 2
    assert again["last"]["already_finished"] is True and again["last"]["step"] == 2
    assert again["last"]["kd"] == lines[-1]["kd"] == pytest.approx(first["last"]["kd"], rel=1e-6)


def test_evaluate_reports_the_folded_bound_and_the_rest_mass(kit, cache):
    from alignti.student_train.evaluate import evaluate
    res = evaluate(str(kit / "student"), str(kit / "data/train.json"), str(kit / "data/images"), cache=str(cache),
                   limit=6)
    assert "lower bound" in res["kl_to_teacher_is"] and res["kl_to_teacher"] > 0
    # independent reference: the mean of exp(tail_logmass) over those samples' response tokens, read from the cache
    reader = CacheReader(cache)
    ids = {f"{r['sample_id']}" for r in reader.samples}
    from alignti.common.records import Record
    from alignti.common.sources import load_records
    want_ids = [r.sample_id for r in load_records(kit / "data/train.json") if isinstance(r, Record)][:6]
    rest = np.concatenate([np.exp(reader[i]["tail_logmass"].astype(np.float64)) for i in range(len(reader))
                           if reader.samples[i]["sample_id"] in set(want_ids) & ids])
    assert res["teacher_rest_mass"] == pytest.approx(rest.mean(), rel=1e-5)


def test_evaluate_on_data_the_cache_does_not_hold_says_so(kit, cache):
    """--cache scores the evaluated samples the cache holds; none held: the KL is None and the reason is stated."""
    from alignti.student_train.evaluate import evaluate
    res = evaluate(str(kit / "student"), str(kit / "data/test.json"), str(kit / "data/images"), cache=str(cache),
                   limit=2)
    assert res["kl_to_teacher"] is None and res["teacher_rest_mass"] is None
    assert res["kl_to_teacher_is"].startswith("not measured: none of the 2 evaluated samples is in the cache")
