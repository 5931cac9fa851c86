"""A training run never ends silently ruined (issue #25): loss terms finite with finite gradients at the edges of their
options, a non-finite step stops the run (or is skipped under --skip-nonfinite), every numeric option checked against
its stated range before any work, --resume continues exactly its run or refuses naming what differs, and one-line
failures for unfinished caches, unwritable push destinations and model folders without processor files."""

import errno
import json
import math
import shutil
import typing
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from alignti.cli import app
from alignti.common.config import OPTION_RANGES, TEMPERATURE_MIN, OptionRangeError
from alignti.common.errors import AlignTIError
from alignti.common.losses import (LossWeights, candidate_weights, get_loss, head_loss, iva_loss, total_loss,
                                   tpa_loss)
from alignti.student_train.trainer import MEASURED, CheckpointError, NonFiniteStep, TrainConfig, train_student

runner = CliRunner()


def _text(res) -> str:
    return " ".join(res.output.split())  # the log handler wraps long lines


def _has(res, *needles) -> bool:
    """Every needle in the output, whitespace ignored (the log handler wraps long lines, paths included)."""
    squashed = "".join(res.output.split())
    return all("".join(n.split()) in squashed for n in needles)


def _finite(t) -> bool:
    return t is not None and bool(torch.isfinite(t).all())


def _metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _train(kit, cache, out, **kw):
    base = dict(student=str(kit / "student"), cache=str(cache), out=str(out), batch_size=8, progress=False)
    stop_after = kw.pop("stop_after", None)
    return train_student(TrainConfig(**{**base, **kw}), stop_after=stop_after)


# --- 1. every loss term finite, with a finite gradient, at the edges of its options --------------------------------
@pytest.mark.parametrize("ratio", [1e-6, 0.97, 0.99, 1.0])
def test_iva_is_finite_with_a_finite_gradient_up_to_every_token_salient(ratio):
    """--iva-ratio 1.0: every image token is salient, the rest bin is log 0 on both sides; the loss and the
    student's gradient stay finite (the old torch.where let log 0's infinite derivative through as NaN)."""
    g = torch.Generator().manual_seed(0)
    valid = torch.ones(3, 12, dtype=torch.bool)
    valid[2, 9:] = False  # a group with padding
    t = torch.softmax(torch.randn(3, 12, generator=g) * 2, -1) * valid
    z = torch.randn(3, 12, generator=g, requires_grad=True)
    loss = iva_loss(t, torch.softmax(z, -1) * valid, valid, ratio)
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() >= 0
    assert _finite(z.grad) and float(z.grad.abs().sum()) > 0


def _head_case(v=64, k=None, n=6, h=8, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = k or v
    lpt = torch.log_softmax(torch.randn(n, v, generator=g) * 3, -1)
    vals, ids = lpt.topk(k, -1)
    tail = (lpt.scatter(-1, ids, float("-inf")).logsumexp(-1) if k < v else torch.full((n,), float("-inf")))
    t = {"targets": torch.randint(0, v, (n,), generator=g), "topk_ids": ids, "topk_logprobs": vals,
         "tail_logmass": tail, "tpa_cand_ids": ids[:, :b].clone(),
         "tpa_ids": ids[:, None, :4].expand(n, b, 4).contiguous(),
         "tpa_logprobs": torch.log_softmax(torch.randn(n, b, 5, generator=g), -1)[..., :4],
         "tpa_tail": torch.log_softmax(torch.randn(n, b, 5, generator=g), -1)[..., 4],
         "teacher_sal": torch.rand(2, 5, generator=g), "sal_valid": torch.ones(2, 5, dtype=torch.bool)}
    head = torch.nn.Linear(h, v, bias=False)
    torch.nn.init.normal_(head.weight, std=2.0, generator=g)  # a peaked student: logits of tens
    hid = (torch.randn(n, h, generator=g) * 3).requires_grad_()
    bh = (torch.randn(n, b, h, generator=g) * 3).requires_grad_()
    sal = torch.randn(2, 5, generator=g).requires_grad_()
    return head, hid, bh, sal, t


@pytest.mark.parametrize("loss", ["kd", "rkl", "jsd", "alignti"])
@pytest.mark.parametrize("tau", [TEMPERATURE_MIN, 1.0])
@pytest.mark.parametrize("whole_vocab", [False, True])
def test_every_term_is_finite_at_its_temperature_and_top_k_edges(loss, tau, whole_vocab):
    """The loss head (what training runs) at the lowest temperature with a peaked student, and with the cache
    holding the whole vocabulary (--top-k = V, the rest bucket empty on both sides: reverse KL and JSD used to
    send NaN back from log 0); IVA at ratio 1.0 alongside."""
    head, hid, bh, sal, t = _head_case(k=None if whole_vocab else 8)
    out = dict(t, resp_hidden=hid, branch_hidden=bh, student_sal=torch.softmax(sal, -1))
    res = head_loss(get_loss(loss), LossWeights(temperature=tau, iva_ratio=1.0), head, out)
    res["loss"].backward()
    assert math.isfinite(res["loss"].item()) and all(math.isfinite(float(v)) for v in res["sums"].values())
    assert _finite(hid.grad) and _finite(head.weight.grad)
    if get_loss(loss).tpa:
        assert _finite(bh.grad)
    if get_loss(loss).iva:
        assert _finite(sal.grad)


def test_tpa_rows_without_candidates_and_without_rows_add_nothing():
    """A TPA row none of whose cached candidates is in the teacher's top-k has nothing to weigh: weight 0, not
    softmax(-inf, -inf) = NaN; a batch with no TPA row gives 0, not the NaN of an empty mean. Both through the
    unchunked path and the loss head, with finite gradients."""
    head, hid, bh, sal, t = _head_case(k=8)
    t["tpa_cand_ids"][1] = torch.tensor([i for i in range(64) if i not in t["topk_ids"][1].tolist()][:2])
    w = candidate_weights(t["tpa_cand_ids"], t["topk_ids"], t["topk_logprobs"])
    assert _finite(w) and w[1].sum() == 0 and torch.allclose(w[0].sum(), torch.tensor(1.0))
    branch = (bh @ head.weight.t())
    assert math.isfinite(float(tpa_loss(branch.detach(), t["tpa_cand_ids"], t["tpa_ids"], t["tpa_logprobs"], t["tpa_tail"],
                                        t["topk_ids"], t["topk_logprobs"])))
    empty = tpa_loss(branch[:0], t["tpa_cand_ids"][:0], t["tpa_ids"][:0], t["tpa_logprobs"][:0], t["tpa_tail"][:0],
                     t["topk_ids"][:0], t["topk_logprobs"][:0])
    assert float(empty) == 0.0
    res = head_loss(get_loss("kd+tpa"), LossWeights(), head, dict(t, resp_hidden=hid, branch_hidden=bh))
    res["loss"].backward()
    assert _finite(hid.grad) and _finite(bh.grad) and _finite(head.weight.grad)
    out = dict(t, logits=hid @ head.weight.t(), branch_logits=branch)
    assert math.isfinite(float(total_loss(get_loss("kd+tpa"), LossWeights(), out)["loss"]))


def test_iva_ratio_one_trains_to_finite_weights(kit, cache, tmp_path):
    """Row 1 end to end: --loss kd+iva --iva-ratio 1.0 used to exit 0 with 62 of 64 tensors NaN."""
    res = _train(kit, cache, tmp_path / "r", loss="kd+iva", iva_ratio=1.0, max_steps=3)
    weights = load_file(res["final"] + "/model.safetensors")
    assert all(_finite(v) for v in weights.values())
    assert all(math.isfinite(x["iva"]) and x["iva"] >= 0 for x in _metrics(tmp_path / "r"))


# --- 2. a non-finite step stops the run, naming the step, the term and the last good checkpoint ---------------------
def test_diverging_run_stops_at_the_step_and_writes_no_final(kit, cache, tmp_path):
    """--lr 1e6: the loss goes NaN in the first steps; the run stops there, names the step, the term and that no
    checkpoint exists yet, and writes no final/ (it used to save NaN weights and exit 0)."""
    run = tmp_path / "r"
    with pytest.raises(NonFiniteStep, match=r"step \d+: non-finite .*(term|gradient norm) = (nan|inf)") as e:
        _train(kit, cache, run, loss="kd", lr=1e6, max_steps=6)
    assert "No checkpoint was written yet" in str(e.value) and "--skip-nonfinite" in str(e.value)
    assert not (run / "final").exists()
    stopped = int(str(e.value).split()[1].rstrip(":"))
    assert [x["step"] for x in _metrics(run)] == list(range(1, stopped))  # every logged step was finite
    res = runner.invoke(app, ["train-student", "--student", str(kit / "student"), "--cache", str(cache), "--out",
                              str(tmp_path / "cli"), "--lr", "1e6", "--max-steps", "6"])
    assert res.exit_code == 2 and _has(res, "non-finite") and not (tmp_path / "cli/final").exists()


def test_stopped_run_names_its_checkpoint_and_resumes_skipping_bad_steps(kit, cache, tmp_path):
    """Sibling: with a checkpoint every step the message names the last good one; --resume --skip-nonfinite then
    continues from it, skipping (and logging) each non-finite step, and final/ holds finite weights only."""
    run = tmp_path / "r"
    with pytest.raises(NonFiniteStep) as e:
        _train(kit, cache, run, loss="kd", lr=1e6, max_steps=6, save_every=1)
    stopped = int(str(e.value).split()[1].rstrip(":"))
    assert f"The last good checkpoint is {run / 'checkpoint' / 'state.pt'} (step {stopped - 1})" in str(e.value)
    res = _train(kit, cache, run, loss="kd", lr=1e6, max_steps=6, save_every=1, resume=True, skip_nonfinite=True)
    m = _metrics(run)
    assert [x["step"] for x in m] == list(range(1, 7))
    assert any("skipped" in x for x in m) and all("non-finite" in x["skipped"] for x in m if "skipped" in x)
    assert all(_finite(v) for v in load_file(res["final"] + "/model.safetensors").values())


# --- 5. every numeric option has a stated range, checked before any work ------------------------------------------
def _outside(rng):
    """A value just outside a Range."""
    if rng.lo is not None:
        return rng.lo if rng.lo_open else rng.lo - 1
    return rng.hi if rng.hi_open else rng.hi + 1


def _numeric(param) -> bool:
    """An int or float option (Optional[...] included), from typer's record of its annotation."""
    ann = param.type_descriptor.annotation
    return ann in (int, float) or any(a in (int, float) for a in typing.get_args(ann))


_REQUIRED_ARGS = {
    "make-demo": ["{tmp}/kit"], "dump-teacher": ["--teacher", "T", "--data", "D", "--out", "{tmp}/c"],
    "select-layer": ["--teacher", "T", "--data", "D"], "train-student": ["--student", "S", "--cache", "C", "--out",
                                                                          "{tmp}/r"],
    "evaluate": ["--model", "M", "--data", "D"], "show-saliency": ["C", "--sample", "s", "--out", "{tmp}/x.png"],
    "quickstart": ["--workdir", "{tmp}/q"],
    "rollout": ["--student", "S", "--data", "D", "--out", "{tmp}/ro"],
    "make-student": ["--from-teacher", "T", "--keep-layers", "0", "--out", "{tmp}/s"],
    "export-task": ["--data", "D", "--out", "{tmp}/task"],
}


def test_every_numeric_option_of_every_command_is_range_checked_first(tmp_path):
    """Walk every command's numeric options: each has a declared range, and a value just outside it is refused
    (exit 2) naming the option, before anything is loaded or written."""
    group = __import__("typer").main.get_command(app)
    walked = 0
    for name, cmd in group.commands.items():
        numeric = [p for p in cmd.params if _numeric(p)]
        for p in numeric:
            assert name in OPTION_RANGES and p.name in OPTION_RANGES[name], f"{name} --{p.name} has no stated range"
            bad = _outside(OPTION_RANGES[name][p.name])
            flag = p.opts[0]
            args = [a.format(tmp=tmp_path) for a in _REQUIRED_ARGS[name]]
            res = runner.invoke(app, [name, *args, flag, str(bad)])
            assert res.exit_code == 2, (name, flag, bad, res.output[-500:])
            assert flag in _text(res) and _has(res, "must be"), (name, flag, res.output[-500:])
            walked += 1
        assert not any(tmp_path.iterdir()), name  # nothing written
    assert walked >= 40


@pytest.mark.parametrize("option, value", [("save_every", 0), ("grad_accum", 0), ("batch_size", 0),
                                           ("temperature", 0.0), ("iva_ratio", 1.01), ("iva_ratio", 0.0),
                                           ("lr", float("nan")), ("max_grad_norm", 0.0)])
def test_train_ranges_hold_in_the_python_api_and_config_files(tmp_path, option, value):
    """The zero options that used to divide by zero (--save-every 0 after step 1, with no final/), and siblings:
    refused by the Python API and from a config file alike, naming the option and its range, before the student
    loads (it does not exist here)."""
    with pytest.raises(OptionRangeError, match=f"--{option.replace('_', '-')} must be"):
        train_student(TrainConfig(student=str(tmp_path / "none"), cache=str(tmp_path / "none"),
                                  out=str(tmp_path / "r"), **{option: value}))
    f = tmp_path / "t.yaml"
    f.write_text(yaml.safe_dump({option: value}))
    res = runner.invoke(app, ["train-student", "--config", str(f), "--student", "S", "--cache", "C", "--out",
                              str(tmp_path / "r")])
    assert res.exit_code == 2 and _has(res, f"t.yaml: train-student --{option.replace('_', '-')} must be")
    assert not (tmp_path / "r").exists()


def test_dump_ranges_hold_in_the_python_api(tmp_path):
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher
    for option, value in (("unit_size", 0), ("tpa_positions", 0.0), ("top_k", 0), ("irs_samples", -1)):
        with pytest.raises(OptionRangeError, match=f"--{option.replace('_', '-')} must be"):
            dump_teacher(DumpConfig(teacher="T", data="D", images=None, out=str(tmp_path / "c"), **{option: value}))
    assert not (tmp_path / "c").exists()


# --- 6. --top-k above the teacher's vocabulary, refused before the teacher loads -----------------------------------
@pytest.mark.parametrize("option", ["--top-k", "--tpa-top-k"])
def test_top_k_above_the_vocabulary_is_refused_in_the_preflight(kit, tmp_path, option, monkeypatch):
    import alignti.teacher_dump.dump as dump
    monkeypatch.setattr(dump, "load_model", lambda *a, **k: pytest.fail("the teacher was loaded"))
    vocab = json.loads((kit / "teacher/config.json").read_text())["text_config"]["vocab_size"]
    res = runner.invoke(app, ["dump-teacher", "--teacher", str(kit / "teacher"), "--data", str(kit / "data/train.json"),
                              "--images", str(kit / "data/images"), "--out", str(tmp_path / "c"), option, "1000"])
    assert res.exit_code == 2, res.output[-1000:]
    assert _has(res, f"{option} 1000") and _has(res, f"vocabulary of {vocab} tokens")
    assert not (tmp_path / "c").exists()  # no plan.json left behind


def _small_vocab_teacher(kit, out, vocab: int = 48):
    """A LLaVA teacher (the demo's shape, untrained) whose tokenizer has fewer than 64 tokens: character-level BPE on
    the shapes corpus (no byte-level alphabet), so the default --top-k 64 is more than its vocabulary."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    from alignti.common.saving import save_checkpoint
    from alignti.demo import kit as demo_kit, shapes
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.train_from_iterator(shapes.corpus() * 20, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=demo_kit.SPECIAL_TOKENS, initial_alphabet=["\n"], show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="<|end|>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    save_checkpoint(demo_kit.build_model("llava", fast, demo_kit.TEACHER, 0), demo_kit.build_processor(fast), out)
    return len(fast)


def test_the_default_top_k_is_capped_at_a_small_vocabulary(kit, tmp_path):
    """The default k (64, and 8 per TPA branch) on a teacher of fewer tokens keeps its whole vocabulary (logged,
    recorded in the params as the k used, the rest mass empty), checked against the teacher itself; a k given above
    the vocabulary is still refused, and a vocabulary too small for --tpa-branches is named with the fix."""
    from alignti.common.cache import CacheReader
    from alignti.teacher_dump.dump import DEFAULT_TOP_K, DumpConfig, dump_teacher, resolve_top_k
    from tests.test_cache import check_dump_against_teacher
    teacher = tmp_path / "teacher"
    vocab = _small_vocab_teacher(kit, teacher)
    assert 8 < vocab < DEFAULT_TOP_K
    args = ["dump-teacher", "--teacher", str(teacher), "--data", str(kit / "data/train.json"), "--images",
            str(kit / "data/images"), "--limit", "6", "--irs-samples", "4", "--tpa-branches", "2"]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output[-2000:]
    assert _has(res, f"the teacher's vocabulary has {vocab} tokens, fewer than the default 64: keeping all {vocab}")
    reader = CacheReader(tmp_path / "c")
    assert reader.params["top_k"] == vocab and reader.params["tpa_top_k"] == 8
    assert reader.params["logprob_encoding"] == "packed" and reader.manifest["dump_config"]["top_k"] == vocab
    x = reader[0]
    assert np.all(np.sort(x["topk_ids"], -1) == np.arange(vocab)) and np.all(x["tail_logmass"] == -np.inf)
    check_dump_against_teacher(teacher, kit / "data/train.json", kit / "data/images", tmp_path / "c", 0)
    for option, k in (("--top-k", DEFAULT_TOP_K), ("--top-k", vocab + 1), ("--tpa-top-k", vocab + 1)):
        res = runner.invoke(app, [*args, "--out", str(tmp_path / "d"), option, str(k)])
        assert res.exit_code == 2 and _has(res, f"{option} {k} is larger than the teacher's vocabulary of {vocab} "
                                                f"tokens") and not (tmp_path / "d").exists(), res.output[-1000:]
    cfg = DumpConfig(teacher="T", data="D", images=None, out="O")
    assert (resolve_top_k(cfg, 5).top_k, resolve_top_k(cfg, 5).tpa_top_k) == (5, 5)
    assert resolve_top_k(replace(cfg, tpa_branches=0), 4).top_k == 4
    with pytest.raises(ValueError, match=r"vocabulary of 4 tokens \(T\) leaves --top-k at 4, not larger than "
                                         r"--tpa-branches \(4\): choose --tpa-branches 3 or less"):
        resolve_top_k(cfg, 4)


# --- 3 and 4. --resume continues exactly its run, or refuses naming what differs ----------------------------------
def test_resume_without_a_checkpoint_is_refused_and_no_step_is_logged_twice(kit, cache, tmp_path):
    """Killed after 3 steps with --save-every 100: --resume used to start again at step 1 and append (13 duplicate
    steps). Now it names the missing checkpoint; dropping --resume starts over with the metrics truncated."""
    run = tmp_path / "r"
    assert _train(kit, cache, run, max_steps=5, stop_after=3) == {"stopped_at": 3}
    with pytest.raises(CheckpointError, match=rf"no checkpoint in {run} \(it stopped after 3 step\(s\), before its "
                                              r"first checkpoint at step 100\); drop --resume to start over"):
        _train(kit, cache, run, max_steps=5, resume=True)
    _train(kit, cache, run, max_steps=5)
    assert [x["step"] for x in _metrics(run)] == [1, 2, 3, 4, 5]


def test_resume_with_a_damaged_checkpoint_is_named(kit, cache, tmp_path):
    run = tmp_path / "r"
    _train(kit, cache, run, max_steps=6, save_every=2, stop_after=3)
    ckpt = run / "checkpoint/state.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"the checkpoint {ckpt} is damaged and cannot be read .*start over"):
        _train(kit, cache, run, max_steps=6, save_every=2, resume=True)
    torch.save({"something": "else"}, ckpt)  # sibling: a readable file that is not a training checkpoint
    with pytest.raises(CheckpointError, match="not an alignti training checkpoint"):
        _train(kit, cache, run, max_steps=6, save_every=2, resume=True)
    res = runner.invoke(app, ["train-student", "--student", str(kit / "student"), "--cache", str(cache), "--out",
                              str(run), "--max-steps", "6", "--save-every", "2", "--resume"])
    assert res.exit_code == 2 and "Traceback" not in res.output and _has(res, "state.pt")


def test_resume_refuses_a_changed_setting_or_cache_and_takes_a_moved_one(kit, cache, tmp_path):
    """--max-grad-norm (not compared before) and the cache's contents (only its teacher and tokenizer were) must
    match the checkpoint's; the same cache at another path resumes, bit for bit."""
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher
    common = dict(loss="kd", max_steps=4, save_every=2)
    _train(kit, cache, tmp_path / "a", **common)
    run = tmp_path / "b"
    _train(kit, cache, run, stop_after=3, **common)
    with pytest.raises(CheckpointError, match=r"different settings \(max_grad_norm\): max_grad_norm: 1.0 then, 0.5 now"):
        _train(kit, cache, run, resume=True, max_grad_norm=0.5, **common)
    with pytest.raises(CheckpointError, match=r"max_steps: 4 then, 8 now.*To train beyond the run's own --max-steps "
                                              r"/ --epochs .*start a new run from its weights: --init "):
        _train(kit, cache, run, resume=True, **dict(common, max_steps=8))
    other = tmp_path / "other"
    dump_teacher(DumpConfig(teacher=str(kit / "teacher"), data=str(kit / "data/train.json"),
                            images=str(kit / "data/images"), out=str(other), limit=30, saliency_layer="1",
                            progress=False))
    with pytest.raises(CheckpointError, match=r"cache_content: another cache"):
        _train(kit, other, run, resume=True, **common)
    moved = tmp_path / "moved"
    shutil.copytree(cache, moved)
    _train(kit, moved, run, resume=True, **common)
    a, b = load_file(tmp_path / "a/final/model.safetensors"), load_file(run / "final/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda ms: [{k: v for k, v in x.items() if k not in MEASURED} for x in ms]  # noqa: E731
    assert strip(_metrics(tmp_path / "a")) == strip(_metrics(run))


# --- 7, 8, 9. one-line failures on the storage side and for missing processor files --------------------------------
def test_validate_on_an_unfinished_dump_says_re_run_the_dump(cache, tmp_path):
    c = tmp_path / "c"
    shutil.copytree(cache, c)
    (c / "manifest.json").unlink()  # killed before the manifest: plan.json and parts are there
    for args in (["validate-cache", str(c)], ["validate-cache", "--repair", str(c)]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and "DAMAGED" not in res.output
        assert _has(res, "is an unfinished dump (no manifest.json): re-run the same dump-teacher command")
    assert (c / "plan.json").exists() and any((c / "parts").glob("*.commit.json"))  # nothing un-committed


def test_validate_on_what_is_not_a_cache_says_so(cache, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray/notes.txt").write_text("x")
    for where, says in ((tmp_path / "nowhere", "does not exist"), (empty, "is not an alignti cache"),
                        (tmp_path / "stray", "is not an alignti cache (no manifest.json, no parts/)")):
        res = runner.invoke(app, ["validate-cache", str(where)])
        assert res.exit_code == 2 and "DAMAGED" not in res.output and _has(res, says), res.output
    c = tmp_path / "c"  # sibling: a finished cache whose manifest and plan were deleted is damaged, exit 1
    shutil.copytree(cache, c)
    (c / "manifest.json").unlink()
    (c / "plan.json").unlink()
    res = runner.invoke(app, ["validate-cache", str(c)])
    assert res.exit_code == 1 and "DAMAGED: manifest.json: missing" in res.output


def test_push_to_an_unwritable_or_full_destination_is_one_line(cache, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    res = runner.invoke(app, ["push-cache", str(cache), f"file://{blocker}/cache"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert _has(res, "cannot write", f"{blocker}/cache", "re-run the same push-cache"), res.output
    import fsspec.implementations.local as local

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(local.LocalFileSystem, "put_file", full)
    res = runner.invoke(app, ["push-cache", str(cache), f"file://{tmp_path}/dest"])
    assert res.exit_code == 2 and _has(res, "No space left on device", "re-run the same push-cache"), res.output
    assert not (tmp_path / "dest/manifest.json").exists()


def test_model_folder_without_processor_files_is_named(kit, cache, tmp_path):
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        if (kit / "student" / f).exists():
            shutil.copy(kit / "student" / f, weights_only / f)
    for args in (["evaluate", "--model", str(weights_only), "--data", str(kit / "data/test.json"), "--images",
                  str(kit / "data/images")],
                 ["train-student", "--student", str(weights_only), "--cache", str(cache), "--out",
                  str(tmp_path / "r"), "--max-steps", "1"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, res.output[-1000:]
        assert _has(res, f"the model folder {weights_only} has no processor files", "tokenizer.json",
                    "preprocessor_config.json", "save_pretrained") and "huggingface.co" not in res.output
    with pytest.raises(AlignTIError, match="has no processor files"):
        train_student(TrainConfig(student=str(weights_only), cache=str(cache), out=str(tmp_path / "r2")))
    assert not (tmp_path / "r2").exists()


def test_a_mistyped_model_folder_is_named_before_any_hub_call(kit, cache, tmp_path, monkeypatch):
    """A model path meant as a local folder that is not there (a typo beside the real folder, an absolute path, a
    file) is refused at once by name, with the folders that are there: transformers would otherwise take it for a hub
    id and retry huggingface.co for minutes before a traceback. A hub id (org/name, no such local folder) still
    goes to transformers."""
    from alignti.common.models import check_local_path
    monkeypatch.chdir(kit)
    typo = "teachr"
    for args in (["dump-teacher", "--teacher", typo, "--data", "data/train.json", "--images", "data/images",
                  "--out", str(tmp_path / "c")],
                 ["train-student", "--student", "studnt", "--cache", str(cache), "--out", str(tmp_path / "r"),
                  "--max-steps", "1"],
                 ["evaluate", "--model", str(kit / "studnt"), "--data", "data/test.json", "--images", "data/images"],
                 ["rollout", "--student", "./studnt", "--data", "data/train.json", "--images", "data/images",
                  "--out", str(tmp_path / "ro")]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args[0], res.output[-1000:])
        assert _has(res, "no model folder at", "student", "teacher") and "huggingface.co" not in res.output, \
            (args[0], res.output[-1000:])
    assert not (tmp_path / "c").exists() and not (tmp_path / "r").exists()
    with pytest.raises(AlignTIError, match="is a file, not a model folder"):
        check_local_path("teacher/config.json")
    check_local_path("some-org/some-model")  # a hub id: left to transformers


def test_packed_settings_without_the_packed_encoding_are_named(caplog):
    """--packed-kl / --packed-compressor with another encoding do nothing: said, not silently dropped."""
    from alignti.teacher_dump.dump import DumpConfig, check_dump_config
    cfg = DumpConfig(teacher="no-such-teacher", data="D", images=None, out="O", logprob_encoding="float16")
    with caplog.at_level("WARNING", logger="alignti.dump"):
        check_dump_config(cfg)
        assert not caplog.records  # the defaults: nothing to say
        check_dump_config(replace(cfg, packed_kl=1e-3))
    assert "--packed-kl / --packed-compressor apply to --logprob-dtype packed only: ignored with --logprob-dtype " \
           "float16" in caplog.text
