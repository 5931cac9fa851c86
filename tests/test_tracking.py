"""Experiment tracking: `--report-to tensorboard|wandb` gets every metric of metrics.jsonl (loss terms, lr, grad
norm, tokens/s, peak memory, TPA coverage, validation accuracy), read back from the written event file; a resumed
run logs each step once."""

import json
import sys
import types

import pytest

from alignti.student_train.tracking import parse_report_to, tag
from alignti.student_train.trainer import TrainConfig, train_student

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def _events(run) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for t in acc.Tags()["scalars"]:
        steps = [e.step for e in acc.Scalars(t)]
        assert len(steps) == len(set(steps)), f"{t}: a step logged twice {steps}"
        out[t] = {e.step: e.value for e in acc.Scalars(t)}
    return out


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _common(kit, cache, **kw):
    return dict(student=str(kit / "student"), cache=str(cache), loss="alignti", batch_size=4, lr=3e-3,
                progress=False, **kw)


def test_tensorboard_gets_every_metric(kit, cache, tmp_path):
    run = tmp_path / "run"
    train_student(TrainConfig(out=str(run), max_steps=3, eval_every=2, report_to=["tensorboard"],
                              **_common(kit, cache)), evaluator=lambda model, processor: 0.625)
    rows = _metrics(run)
    ev = _events(run)
    keys = {k for r in rows for k in r} - {"step", "epoch"}
    assert {"sft", "kd", "iva", "tpa", "loss", "lr", "grad_norm", "tokens_per_s", "peak_rss_gib", "tpa_mass",
            "tpa_topb", "val_accuracy"} <= keys
    assert {tag(k) for k in keys} == set(ev), set(ev) ^ {tag(k) for k in keys}
    for r in rows:
        for k in keys & set(r):
            assert ev[tag(k)][r["step"]] == pytest.approx(r[k], rel=1e-6), (k, r["step"])
    assert ev["eval/accuracy"] == {2: 0.625, 3: 0.625}
    assert 0 < ev["train/tpa_mass"][3] <= 1 and 0 <= ev["train/tpa_topb"][3] <= 1
    assert "config/text_summary" in EventAccumulator(str(run / "tensorboard")).Reload().Tags()["tensors"]


def test_resumed_run_logs_each_step_once(kit, cache, tmp_path):
    run = tmp_path / "run"
    cfg = dict(out=str(run), max_steps=5, save_every=2, report_to=["tensorboard"], **_common(kit, cache))
    assert train_student(TrainConfig(**cfg), stop_after=3) == {"stopped_at": 3}  # crash after step 3
    train_student(TrainConfig(resume=True, **cfg))                              # resumes from step 2
    ev, rows = _events(run), _metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert sorted(ev["train/loss"]) == [1, 2, 3, 4, 5]
    for r in rows:  # step 3 as re-run after the resume, not as first logged
        assert ev["train/loss"][r["step"]] == pytest.approx(r["loss"], rel=1e-6)


def test_wandb_gets_the_same_metrics_and_resumes_its_run(kit, cache, tmp_path, monkeypatch):
    """W&B through its own API (a stand-in module records the calls): alignti sets no mode, so WANDB_MODE=offline
    and the user's other W&B settings stay in force; a resumed run continues the same W&B run id."""
    calls = {"init": [], "log": [], "finish": 0}

    class Run:
        def log(self, data, step):
            calls["log"].append((step, dict(data)))

        def finish(self):
            calls["finish"] += 1

    def init(**kw):
        calls["init"].append(kw)
        return Run()

    fake = types.ModuleType("wandb")
    fake.init = init
    fake.util = types.SimpleNamespace(generate_id=lambda: "abc123")
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    cfg = dict(out=str(run), max_steps=3, save_every=2, report_to=["tensorboard,wandb"], **_common(kit, cache))
    train_student(TrainConfig(**cfg), stop_after=2)
    train_student(TrainConfig(resume=True, **cfg))
    assert [c["id"] for c in calls["init"]] == ["abc123", "abc123"] and calls["finish"] == 2
    assert all("mode" not in c and c["resume"] == "allow" for c in calls["init"])
    assert calls["init"][0]["config"]["loss"] == "alignti" and calls["init"][0]["config"]["report_to"] == ["tensorboard,wandb"]
    rows = {r["step"]: r for r in _metrics(run)}
    assert [s for s, _ in calls["log"]] == [1, 2, 3]
    for step, data in calls["log"]:
        assert data["train/tpa_mass"] == pytest.approx(rows[step]["tpa_mass"], rel=1e-6)
    assert set(_events(run)) == set(calls["log"][-1][1])  # both trackers got the same curves


def test_report_to_is_checked():
    assert parse_report_to(["none"]) == [] and parse_report_to("tensorboard, wandb") == ["tensorboard", "wandb"]
    with pytest.raises(ValueError, match=r"unknown tracker\(s\) \['tensorbord'\]"):
        parse_report_to(["tensorbord"])
