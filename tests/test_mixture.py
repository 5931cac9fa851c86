"""Training on several caches (student_train/mixture.py): the weighted per-micro-batch draw, caches that differ in k
and TPA layout training together with unbiased step normalisation, resume bit for bit after kill -9, DDP with 2
ranks, refusal of caches from different tokenizers, YAML / CLI, and --init."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from alignti.common.cache import CacheReader
from alignti.common.distributed import DistEnv
from alignti.common.errors import FingerprintMismatch
from alignti.student_train import mixture
from alignti.student_train.trainer import MEASURED, TrainConfig, train_student


def metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def strip(ms):
    return [{k: v for k, v in x.items() if k not in MEASURED} for x in ms]


class _Reader:
    """What MixtureSchedule reads of a cache: its samples (token lengths) and parts."""

    def __init__(self, n, part=7):
        self.samples = [{"tok_len": 10 + (i * 37) % 50} for i in range(n)]
        self.part = part

    def __len__(self):
        return len(self.samples)

    def part_of(self, i):
        return i // self.part


def _schedule(sizes, weights, seed=0, batch=4):
    srcs = [mixture.Source(i, f"c{i}", _Reader(n), True, True, False, "teacher") for i, n in enumerate(sizes)]
    offsets = list(np.cumsum([0, *sizes]))
    return mixture.MixtureSchedule(srcs, weights, batch, seed, True, offsets), offsets


def test_draw_shares_are_within_the_binomial_bound_and_deterministic():
    n = 20_000  # draws (several generator blocks)
    for weights in ([0.5, 0.5], [0.2, 0.8], [0.1, 0.3, 0.6]):
        s, _ = _schedule([30, 50, 70][:len(weights)], weights)
        got = np.bincount(s.sources_of(0, n), minlength=len(weights))
        for c, w in zip(got, weights):  # 4.5 binomial standard deviations (two-sided p < 1e-5 per count)
            assert abs(c - n * w) <= 4.5 * math.sqrt(n * w * (1 - w)), (weights, got)
    a, _ = _schedule([30, 50], [0.3, 0.7], seed=1)
    b, _ = _schedule([30, 50], [0.3, 0.7], seed=1)
    c, _ = _schedule([30, 50], [0.3, 0.7], seed=2)
    assert [a.batch(g) for g in range(300)] == [b.batch(g) for g in range(300)]
    assert [a.batch(g) for g in range(300)] != [c.batch(g) for g in range(300)]
    # a fresh schedule asked for a late draw first (a resume) gives the same batch
    late, _ = _schedule([30, 50], [0.3, 0.7], seed=1)
    assert late.batch(5000) == a.batch(5000)


def test_each_cache_walks_its_own_epochs_and_a_step_does_not_depend_on_ranks():
    s, off = _schedule([30, 50], [0.5, 0.5], batch=4)
    assert s.draws_per_epoch == 8 + 13 and s.epoch_draws(2, 3) == 24
    # source 0's first 8 draws are its first epoch: every sample exactly once, in batches of one source
    draws = [g for g in range(400) if s.draw(g) == 0][:8]
    flat = sorted(i for g in draws for i in s.batch(g))
    assert flat == list(range(30))
    assert all(all(off[1] <= i < off[2] for i in s.batch(g)) for g in range(400) if s.draw(g) == 1)
    # world size 2 x accumulation 1 and world size 1 x accumulation 2: the same micro-batches in every step
    one = s.rank_batches(0, DistEnv(0, 1, 0), 2)
    r0, r1 = (s.rank_batches(0, DistEnv(r, 2, r), 1) for r in (0, 1))
    assert len(one) == 22 and len(r0) == len(r1) == 11
    assert [sorted(map(tuple, one[2 * k:2 * k + 2])) for k in range(11)] == \
        [sorted([tuple(r0[k]), tuple(r1[k])]) for k in range(11)]


def test_cache_weights_are_parsed_and_checked():
    assert mixture.parse_cache_weights(None, 2) is None
    assert mixture.parse_cache_weights("1,3", 2) == [0.25, 0.75]
    assert mixture.parse_cache_weights(["0.5", "0.5"], 2) == [0.5, 0.5]
    assert mixture.parse_cache_weights([2, 2, 4], 3) == [0.25, 0.25, 0.5]
    with pytest.raises(ValueError, match="gives 3 weights for 2 caches"):
        mixture.parse_cache_weights("1,1,1", 2)
    with pytest.raises(ValueError, match="non-negative"):
        mixture.parse_cache_weights("1,-1", 2)
    with pytest.raises(ValueError, match="must be numbers"):
        mixture.parse_cache_weights("a,b", 2)
    assert TrainConfig(student="s", cache=("c",), out="o").cache == "c"  # one cache stays one cache
    assert TrainConfig(student="s", cache=["c", "d"], out="o", cache_weights=[]).cache_weights is None


# --- caches that differ in k and TPA layout --------------------------------------------------------------------
@pytest.fixture(scope="module")
def other_caches(kit, cache, tmp_path_factory):
    """b: k=16, 2 TPA branches of top-4 at half the positions, the same saliency layer; c: k=8, no TPA, no saliency."""
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher
    root = tmp_path_factory.mktemp("mix")
    layer = CacheReader(cache).params["saliency_layer"]
    common = dict(teacher=str(kit / "teacher"), data=str(kit / "data/train.json"), images=str(kit / "data/images"),
                  limit=24, unit_size=12, progress=False)
    dump_teacher(DumpConfig(out=str(root / "b"), top_k=16, tpa_branches=2, tpa_top_k=4, tpa_positions=0.5,
                            saliency_layer=str(layer), **common))
    dump_teacher(DumpConfig(out=str(root / "c"), top_k=8, tpa_branches=0, saliency_layer="none", **common))
    return root / "b", root / "c"


def _mixed(kit, caches, **kw):
    base = dict(student=str(kit / "student"), cache=[str(c) for c in caches], loss="alignti", batch_size=4, lr=3e-3,
                progress=False, warmup_steps=2)
    return {**base, **kw}


def test_caches_differing_in_k_and_tpa_layout_train_together(kit, cache, other_caches, tmp_path):
    b, c = other_caches
    run = tmp_path / "run"
    res = train_student(TrainConfig(out=str(run), max_steps=6, grad_accum=2, cache_weights=[0.4, 0.3, 0.3],
                                    **_mixed(kit, [cache, b, c])))
    ms = metrics(run)
    assert [m["step"] for m in ms] == list(range(1, 7)) and res["steps"] == 6
    for m in ms:
        drawn = [i for i in range(3) if f"tokens/cache{i}" in m]
        assert drawn and sum(m[f"tokens/cache{i}"] for i in drawn) == m["tokens"]
        # SFT and KD are means over all the step's response tokens: the token-weighted mean of the sources'
        assert m["kd"] == pytest.approx(sum(m[f"kd/cache{i}"] * m[f"tokens/cache{i}"] for i in drawn) / m["tokens"],
                                        rel=1e-4)
        assert "tpa/cache2" not in m and "iva/cache2" not in m  # cache c has neither
        if 2 in drawn:
            assert m["sft/cache2"] > 0 and m["kd/cache2"] > 0
        if drawn == [2]:  # only the cache without TPA / saliency drawn: the terms are absent, not 0
            assert "tpa" not in m and "iva" not in m
    assert {f"tpa/cache{i}" for i in (0, 1)} <= {k for m in ms for k in m}
    assert all(math.isfinite(v) for m in ms for v in m.values() if isinstance(v, float))


def test_a_source_without_tpa_or_saliency_does_not_dilute_those_terms(kit, cache, other_caches):
    """One step of a batch of cache a (TPA + saliency) and one of cache c (neither): the step's TPA and IVA means
    equal those of a's batch alone (c adds no TPA positions and no saliency groups), SFT / KD are the means over
    both batches' tokens, and the gradient is the sum of the per-batch gradients each normalised by the step."""
    from alignti.common.adapters import adapter_for
    from alignti.common.losses import LossWeights, get_loss, means
    from alignti.common.models import load_vlm
    from alignti.student_train.data import CacheDataset, StudentCollator
    from alignti.student_train.step import StudentStep
    from alignti.student_train.trainer import accumulate_step, student_layer_for
    _, c = other_caches
    readers = [CacheReader(cache), CacheReader(c)]
    sources = [mixture.Source.of(i, str(u), r) for i, (u, r) in enumerate(zip([cache, c], readers))]
    model, proc = load_vlm(str(kit / "student"), torch.device("cpu"), "float32")
    adapter = adapter_for(model)
    spec, w = get_loss("alignti"), LossWeights(tpa=0.5)
    layer = student_layer_for(None, readers[0].params["saliency_layer"], readers[0].params["teacher_layers"],
                              adapter.num_layers)
    step = StudentStep(model, adapter, spec, layer, w)
    coll = mixture.MixedCollator(StudentCollator(proc, type(adapter)), sources)
    ds = mixture.MixedDataset([CacheDataset(r, proc) for r in readers])
    a_batch, c_batch = coll([ds[i] for i in range(4)]), coll([ds[ds.offsets[1] + i] for i in range(4)])
    assert "tpa_cand_list" in a_batch and "tpa_cand_list" not in c_batch and "teacher_sal" not in c_batch
    env, dev, amp = DistEnv(0, 1, 0), torch.device("cpu"), torch.autocast("cpu", enabled=False)
    mix = mixture.StepStats(sources, spec, w)

    def grads():
        g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return g

    counts, sums = accumulate_step(step, [a_batch, c_batch], env, dev, amp, mix)
    both = mix.means(sums, counts)
    g_both = grads()
    ca, sa = accumulate_step(step, [a_batch], env, dev, amp)
    alone = means(sa, ca, w)
    g_a = grads()
    cc, sc = accumulate_step(step, [c_batch], env, dev, amp, mixture.StepStats(sources, spec, w))
    g_c = grads()
    assert counts["tpa_rows"] == ca["tpa_rows"] and counts["groups"] == ca["groups"]
    assert counts["tokens"] == ca["tokens"] + cc["tokens"]
    for term in ("tpa", "iva", "tpa_mass"):
        assert both[term] == pytest.approx(alone[term], rel=1e-6), term
    n_a, n_c = ca["tokens"], cc["tokens"]
    assert both["kd"] == pytest.approx((alone["kd"] * n_a + sc["kd"]) / (n_a + n_c), rel=1e-6)
    assert both["kd/cache1"] == pytest.approx(sc["kd"] / n_c, rel=1e-6) and "tpa/cache1" not in both
    # gradients: SFT + KD of a batch alone are normalised by its own tokens; in the step, by both batches' tokens.
    # TPA and IVA only by a's positions / groups either way. So g_both = g_a's TPA+IVA part + (n_a g_a's SFT+KD part
    # + n_c g_c) / (n_a + n_c); check it against separately computed parts.
    step_tk = StudentStep(model, adapter, get_loss("kd"), layer, w)  # SFT + KD alone (same weights)
    accumulate_step(step_tk, [a_batch], env, dev, amp)
    g_a_tok = grads()
    want = {n: g_a[n] - g_a_tok[n] + (n_a * g_a_tok[n] + n_c * g_c.get(n, 0)) / (n_a + n_c) for n in g_a}
    scale = max(float(v.abs().max()) for v in want.values())
    assert max(float((g_both[n] - want[n]).abs().max()) for n in want) < 1e-5 * scale


def test_student_candidates_are_weighted_by_the_student():
    from alignti.common.losses import LossWeights, get_loss
    spec, w = get_loss("alignti"), LossWeights()
    batch = {"tpa_cand_list": [], "teacher_sal": 1, "tpa_candidates": "student"}
    s2, w2 = mixture.batch_spec(spec, w, batch)
    assert s2 == spec and w2.tpa_weighting == "student"
    s3, w3 = mixture.batch_spec(spec, w, {"tpa_candidates": "teacher"})
    assert not s3.tpa and not s3.iva and w3 is w
    assert mixture.batch_spec(spec, w, {**batch, "tpa_candidates": "teacher"}) == (spec, w)


def test_mixed_resume_is_bit_for_bit(kit, cache, other_caches, tmp_path):
    b, _ = other_caches
    common = _mixed(kit, [cache, b], max_steps=5, save_every=2, grad_accum=2, cache_weights=[0.5, 0.5])
    train_student(TrainConfig(out=str(tmp_path / "a"), **common))
    assert train_student(TrainConfig(out=str(tmp_path / "b"), **common), stop_after=3) == {"stopped_at": 3}
    train_student(TrainConfig(out=str(tmp_path / "b"), resume=True, **common))  # from the step-2 checkpoint
    from safetensors.torch import load_file
    wa, wb = load_file(tmp_path / "a/final/model.safetensors"), load_file(tmp_path / "b/final/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert strip(metrics(tmp_path / "a")) == strip(metrics(tmp_path / "b"))
    # other shares are another run: refused on resume
    with pytest.raises(Exception, match="cache_weights"):
        train_student(TrainConfig(out=str(tmp_path / "b"), resume=True, **{**common, "cache_weights": [0.2, 0.8]}))


def test_caches_from_different_tokenizers_are_refused(kit, cache, tmp_path):
    from alignti.demo.kit import STUDENT, build_model, build_processor, build_tokenizer
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher
    tok = build_tokenizer(vocab_size=300)
    other = tmp_path / "t"
    build_model("llava", tok, STUDENT, 0).save_pretrained(other)
    build_processor(tok).save_pretrained(other)
    dump_teacher(DumpConfig(teacher=str(other), data=str(kit / "data/train.json"), images=str(kit / "data/images"),
                            out=str(tmp_path / "c"), limit=4, saliency_layer="1", progress=False))
    a, b = (CacheReader(x).fingerprint["tokenizer"]["hash"][:12] for x in (cache, tmp_path / "c"))
    assert a != b
    with pytest.raises(FingerprintMismatch, match=f"tokenizer fingerprint {a} with 320 tokens vs {b} with 300 tokens"):
        train_student(TrainConfig(student=str(kit / "student"), cache=[str(cache), str(tmp_path / "c")],
                                  out=str(tmp_path / "run"), max_steps=1, progress=False))
    assert not (tmp_path / "run").exists()


def test_yaml_cache_list_and_init_from_an_earlier_run(kit, cache, other_caches, tmp_path):
    """cache: a list and cache_weights in a config file; config.yaml reproduces the run; --init RUN loads its final
    weights exactly (lr 0: nothing moves) with a fresh optimizer and step count; a run without final/ gives its
    checkpoint's weights."""
    from safetensors.torch import load_file
    from alignti.cli import app
    from alignti.student_train.init_from import init_state
    b, _ = other_caches
    f = tmp_path / "t.yaml"
    f.write_text(yaml.safe_dump({"student": str(kit / "student"), "cache": [str(cache), str(b)],
                                 "cache_weights": "1,3", "loss": "kd+tpa", "max_steps": 3, "batch_size": 4,
                                 "out": str(tmp_path / "a"), "save_every": 100}))
    res = CliRunner().invoke(app, ["train-student", "--config", str(f)])
    assert res.exit_code == 0, res.output[-2000:]
    written = yaml.safe_load((tmp_path / "a/config.yaml").read_text())
    assert written["cache"] == [str(cache), str(b)] and written["cache_weights"] == [0.25, 0.75]
    res = CliRunner().invoke(app, ["train-student", "--config", str(tmp_path / "a/config.yaml"),
                                   "--out", str(tmp_path / "a2")])
    assert res.exit_code == 0, res.output[-2000:]
    wa = load_file(tmp_path / "a/final/model.safetensors")
    assert all(torch.equal(wa[k], v) for k, v in load_file(tmp_path / "a2/final/model.safetensors").items())

    # --init a, lr 0: the final weights are a's, bit for bit; a fresh optimizer (its step count is this run's)
    res = CliRunner().invoke(app, ["train-student", "--student", str(kit / "student"), "--cache", str(cache),
                                   "--init", str(tmp_path / "a"), "--out", str(tmp_path / "i"), "--max-steps", "2",
                                   "--lr", "0", "--batch-size", "4", "--loss", "kd"])
    assert res.exit_code == 0, res.output[-2000:]
    wi = load_file(tmp_path / "i/final/model.safetensors")
    assert wi.keys() == wa.keys() and all(torch.equal(wa[k], wi[k]) for k in wa)
    state = torch.load(tmp_path / "i/checkpoint/state.pt", weights_only=False)
    assert state["step"] == 2 and {int(s["step"]) for s in state["optimizer"]["state"].values()} == {2}
    assert [m["step"] for m in metrics(tmp_path / "i")] == [1, 2]
    # a fresh schedule: warm-up starts again (lr 3e-3, 10 warm-up steps: step 1 runs at 3e-4)
    train_student(TrainConfig(student=str(kit / "student"), cache=str(cache), init=str(tmp_path / "a"),
                              out=str(tmp_path / "j"), max_steps=1, batch_size=4, loss="kd", progress=False))
    assert metrics(tmp_path / "j")[0]["lr"] == pytest.approx(1e-3 * 2 / 10)
    # without final/, the checkpoint's model state (here the same step)
    fin, _ = init_state(str(tmp_path / "a"))
    shutil.rmtree(tmp_path / "a/final")
    ck, where = init_state(str(tmp_path / "a"))
    assert "checkpoint" in where and ck.keys() == fin.keys() and all(torch.equal(ck[k], fin[k]) for k in fin)
    # a damaged checkpoint (truncated) or final (truncated weights) is named in one line, as --resume names it
    from alignti.common.errors import AlignTIError
    state = tmp_path / "a/checkpoint/state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(AlignTIError, match=rf"--init {tmp_path / 'a'}: its checkpoint {state} is damaged and cannot "
                       r"be read \(.*\); pass another run"):
        init_state(str(tmp_path / "a"))
    shutil.copytree(tmp_path / "j/final", tmp_path / "a/final")
    w = tmp_path / "a/final/model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(AlignTIError, match=rf"{tmp_path / 'a/final'} cannot be loaded \(.*\); pass another run"):
        init_state(str(tmp_path / "a"))


def test_ddp_two_ranks_mix_as_one_process_and_resume_after_kill(kit, cache, other_caches, tmp_path):
    """2 ranks x 1 micro-batch take the same draws per step as 1 process x 2 micro-batches (same weights up to
    float reduction order, same per-source metrics); killed (kill -9 at train-step:3) and resumed at 2 ranks:
    the uninterrupted run, bit for bit."""
    from tests.test_scale import alignti, final_weights
    b, _ = other_caches

    def args(out, *extra):
        return ["train-student", "--student", kit / "student", "--cache", cache, "--cache", b, "--cache-weights",
                "0.5,0.5", "--out", out, "--loss", "alignti", "--max-steps", 4, "--batch-size", 4, "--save-every", 2,
                "--lr", 3e-3, *extra]
    alignti(*args(tmp_path / "ddp", "--nproc", 2))
    alignti(*args(tmp_path / "one", "--grad-accum", 2))
    a, o = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "one")
    assert max(float((a[k] - o[k]).abs().max()) for k in a) < 1e-5
    md, mo = metrics(tmp_path / "ddp"), metrics(tmp_path / "one")
    assert [sorted(k for k in m if "/" in k) for m in md] == [sorted(k for k in m if "/" in k) for m in mo]
    assert [m["tokens"] for m in md] == [m["tokens"] for m in mo]
    for x, y in zip(md, mo):
        for k in x:
            if "/" in k or k in ("sft", "kd", "tpa", "iva", "loss"):
                assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), k
    crashed = tmp_path / "crashed"
    res = alignti(*args(crashed, "--nproc", 2), crash="train-step:3", check=False)
    assert res.returncode != 0
    alignti(*args(crashed, "--nproc", 2, "--resume"))
    c = final_weights(crashed)
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert strip(metrics(crashed)) == strip(md)
