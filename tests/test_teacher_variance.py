"""bench/teacher_variance.py: the interval with the teacher as the cluster, and the resume of an interrupted run."""

import importlib
import json
import random
import statistics
import sys
from pathlib import Path

import pytest

from alignti.demo import quickstart as qs

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def tv():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("teacher_variance")
    finally:
        sys.path.remove(str(BENCH))


def test_clustered_interval_matches_the_nested_anova():
    """Against the one-way random-effects ANOVA of the differences (teachers the groups), written out by hand with
    scipy's t quantile: mean, interval, and the between- / within-teacher standard deviations."""
    scipy_t = pytest.importorskip("scipy.stats").t
    rng = random.Random(3)
    for n_t, n_s in ((3, 3), (4, 2), (2, 5)):
        d = {t: [rng.gauss(0.05, 0.04) + (0.03 * t) for _ in range(n_s)] for t in range(n_t)}
        got = qs.clustered_interval(d)
        grand = sum(x for v in d.values() for x in v) / (n_t * n_s)
        means = [sum(v) / n_s for v in d.values()]
        ms_between = n_s * sum((m - grand) ** 2 for m in means) / (n_t - 1)
        ms_within = sum((x - m) ** 2 for v, m in zip(d.values(), means) for x in v) / (n_t * (n_s - 1))
        half = scipy_t.ppf(0.975, n_t - 1) * (ms_between / (n_t * n_s)) ** 0.5
        assert got["mean"] == pytest.approx(grand, abs=1e-12)
        # the t quantile: the table's 3 decimals (quickstart._T975), so 1e-3 relative
        assert got["low"] == pytest.approx(grand - half, rel=1e-3)
        assert got["high"] == pytest.approx(grand + half, rel=1e-3)
        assert got["within_sd"] == pytest.approx(ms_within ** 0.5, rel=1e-12)
        assert got["between_sd"] == pytest.approx(max(0.0, (ms_between - ms_within) / n_s) ** 0.5, rel=1e-12)
        assert (got["n"], got["runs"]) == (n_t, n_t * n_s)
    one = qs.clustered_interval({0: [0.1, 0.2, 0.3]})
    assert one["low"] is None and one["between_sd"] is None and one["mean"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match=r"teacher\(s\) \[1\]"):
        qs.clustered_interval({0: [0.1], 1: []})


def test_clustered_interval_covers_when_the_teacher_varies():
    """Simulated 3 teachers x 3 student seeds whose teacher effect (sd 3) dwarfs the student seed's (sd 1): the
    clustered interval covers the true mean ~95% of the time; the paired t over all 9 differences (the quickstart's
    interval, pooled) does not."""
    rng = random.Random(0)
    sims, cover, cover_pooled = 2000, 0, 0
    for _ in range(sims):
        d = {}
        for t in range(3):
            te = rng.gauss(0, 3)
            d[t] = [te + rng.gauss(0, 1) for _ in range(3)]
        c = qs.clustered_interval(d)
        cover += c["low"] <= 0 <= c["high"]
        flat = [x for v in d.values() for x in v]
        p = qs.paired_interval(flat, [0.0] * len(flat))
        cover_pooled += p["low"] <= 0 <= p["high"]
    assert 0.93 <= cover / sims <= 0.97  # binomial sd at 2,000 draws: 0.5 points
    assert cover_pooled / sims < 0.85


def _fake_train_and_score(calls: list, fail_after: int | None):
    """Stands in for the quickstart's student run: a known score per (teacher, method, seed), RUN/result.json as
    the real one writes it; raises on call ``fail_after`` + 1 (a run killed mid-way)."""
    def run(job):
        if fail_after is not None and len(calls) == fail_after:
            raise KeyboardInterrupt("killed")
        calls.append((job["out"], job["method"], job["seed"]))
        teacher = int(Path(job["out"]).parents[1].name.removeprefix("teacher"))
        acc = 0.1 * qs.METHODS.index(job["method"]) + 0.01 * job["seed"] + 0.05 * teacher
        r = {"method": job["method"], "seed": job["seed"], "test_accuracy": acc, "val_accuracy": acc,
             "teacher_agreement": acc, "train_kl_to_teacher": 0.1, "curve": [{"step": 1, "sft": 1.0}],
             "long_form": {"exact": 0.0, "position": acc, "colour": acc, "shape": acc, "fields": 2 * acc, "n": 3}}
        Path(job["out"]).mkdir(parents=True)
        (Path(job["out"]) / "result.json").write_text(json.dumps(r))
        return r
    return run


def test_an_interrupted_run_resumes_where_it_stopped(tv, tmp_path, monkeypatch):
    """Real tiny teachers and caches, students faked: a run killed after 3 student runs keeps them and its teacher;
    re-run, it trains only the missing runs and no teacher again; once done, a third call trains nothing, and the
    report reads every run (alignti - sft: +40 points on every teacher and seed)."""
    from alignti.demo import kit
    over = dict(n_train=8, n_val=2, n_test=3, teacher_steps=2, batch_size=4, eval_every=3, val_limit=2,
                long_form={"train": 2, "val": 2, "test": 2})
    kits = []
    real_make_demo = kit.make_demo
    monkeypatch.setattr(kit, "make_demo", lambda out, **kw: kits.append((str(out), kw["seed"]))
                        or real_make_demo(out, **kw))
    calls: list = []
    monkeypatch.setattr(qs, "_train_and_score", _fake_train_and_score(calls, fail_after=3))
    with pytest.raises(KeyboardInterrupt):
        tv.run_teacher(tmp_path, 0, 2, overrides=over, workers=1)
    assert len(list(tmp_path.glob("teacher0/runs/*/result.json"))) == 3
    assert kits == [(str(tmp_path / "teacher0/kit"), 0)]
    assert not (tmp_path / "teacher0/results.json").exists()

    monkeypatch.setattr(qs, "_train_and_score", _fake_train_and_score(calls, fail_after=None))
    for t in (0, 1):
        tv.run_teacher(tmp_path, t, 2, overrides=over, workers=1)
    assert [k[1] for k in kits] == [0, 1]  # teacher 0 not trained again; teacher 1 with its own seed
    assert len(calls) == 20 and len(set(calls)) == 20  # 2 teachers x 5 methods x 2 seeds, each once
    assert tv.teacher_done(tmp_path / "teacher0", 2) and not tv.teacher_done(tmp_path / "teacher0", 3)

    monkeypatch.setattr(tv, "quickstart", lambda cfg: pytest.fail("a finished teacher was run again"))
    for t in (0, 1):
        tv.run_teacher(tmp_path, t, 2, overrides=over, workers=1)
    text = tv.report(tmp_path, [0, 1], 2)
    short = {(c["a"], c["b"]): c for c in json.loads((tmp_path / "summary.json").read_text())["comparisons"]
             if c["metric"] == "short"}
    c = short[("alignti", "sft")]
    assert c["mean"] == pytest.approx(0.4) and c["low"] == pytest.approx(0.4) and (c["n"], c["runs"]) == (2, 4)
    assert c["teacher_means"] == pytest.approx([0.4, 0.4])
    long = [c for c in json.loads((tmp_path / "summary.json").read_text())["comparisons"]
            if c["metric"] == "long_form" and (c["a"], c["b"]) == ("alignti", "sft")]
    assert long[0]["mean"] == pytest.approx(0.8)
    assert "alignti - sft" in text and "alignti > sft" in text and "10/10" in text
    assert statistics.mean(json.loads((tmp_path / f"teacher{t}/results.json").read_text())["methods"]["sft"]
                           ["accuracy_mean"] for t in (0, 1)) == pytest.approx(0.005 + 0.025)


def test_the_quickstart_verdict_names_its_interval_source():
    """results.md's verdict says its intervals are over student seeds for one teacher (not over teachers)."""
    pairs = [{"a": "alignti", "b": "sft", "low": 0.01, "high": 0.1, "n": 3},
             {"a": "kd", "b": "sft", "low": -0.1, "high": 0.1, "n": 3}]
    assert qs.verdict(pairs) == ("The 95% intervals over student seeds (one teacher) support alignti > sft. Not "
                                 "separable (the interval holds 0) at 3 student seeds (one teacher): kd vs sft.")


def test_a_run_folder_refuses_other_settings(tv, tmp_path):
    """OUT/settings.json pins the preset and overrides of the first call; another budget into the same OUT is refused
    with the fix, the same settings pass (a resume)."""
    tv.check_settings(tmp_path, False, {})
    tv.check_settings(tmp_path, False, {})
    with pytest.raises(SystemExit, match=r'not \{"preset": "fast".*another --out'):
        tv.check_settings(tmp_path, True, {})
    with pytest.raises(SystemExit, match="re-run with those settings"):
        tv.check_settings(tmp_path, False, {"student_steps": 10})
    assert json.loads((tmp_path / "settings.json").read_text()) == {"preset": "default", "overrides": {}}
