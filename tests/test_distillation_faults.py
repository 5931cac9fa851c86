"""Distillation faults from public reports (issue 35, rows 4, 5, 7, 10 and the processor message): the temperature
a cache can give, LM heads padded past the tokenizer, newly initialised weights and blind teachers, checkpoints that
run no code on load. Each input is built here; each kind has a sibling."""

import copy

import pytest

from alignti.common.errors import FingerprintMismatch
from alignti.common.fingerprint import check_student, make_fingerprint
from alignti.demo import kit as demo_kit


# --- the processor message names only the settings that differ ------------------------------------------------------
@pytest.mark.parametrize("change", [{"size": {"shortest_edge": 2304, "longest_edge": 96 * 96}},
                                    {"size": {"shortest_edge": 64 * 64, "longest_edge": 96 * 96}, "merge_size": 1}])
def test_other_resize_setting_is_named_alone_not_image_mean_or_std(change):
    tok = demo_kit.build_tokenizer("qwen2_vl")
    teacher_proc = demo_kit.build_processor(tok, "qwen2_vl")
    fingerprint = make_fingerprint(type("C", (), {"to_dict": lambda self: {}})(), teacher_proc, {})
    student_proc = copy.deepcopy(teacher_proc)
    for k, v in change.items():  # Qwen2-VL's resize bounds (min_pixels / max_pixels) live in `size`
        setattr(student_proc.image_processor, k, v)
    with pytest.raises(FingerprintMismatch) as e:
        check_student(fingerprint, student_proc, "S")
    named = str(e.value).split(" made with in ")[1].split(": images")[0].split(", ")
    assert named == sorted(change), str(e.value)  # not image_mean / image_std (tuples here, JSON lists there)
    # sibling: the teacher's own processor against the fingerprint read back from JSON passes
    check_student(fingerprint, copy.deepcopy(teacher_proc), "S")


# --- checkpoints that run no code on load ------------------------------------------------------------------------------
def _train(kit, cache, out, **kw):
    from alignti.student_train.trainer import TrainConfig, train_student
    base = dict(student=str(kit / "student"), cache=str(cache), out=str(out), batch_size=4, loss="kd", progress=False)
    stop_after = kw.pop("stop_after", None)
    return train_student(TrainConfig(**{**base, **kw}), stop_after=stop_after)


class _Payload:
    """What a crafted pickle holds: unpickling it writes a file (a stand-in for any code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('ran')",))


def test_a_crafted_checkpoint_runs_no_code_on_resume_or_init(kit, cache, tmp_path):
    """A shared run folder whose checkpoint is a pickle that would run code: --resume and --init refuse it by name
    and nothing runs; the checkpoint the trainer writes loads with torch's weights-only loader (it held numpy's
    RNG state as an array, which only a full unpickler reads)."""
    import torch

    from alignti.common.errors import AlignTIError
    from alignti.student_train.trainer import CheckpointError
    run = tmp_path / "r"
    assert _train(kit, cache, run, max_steps=3, save_every=1, stop_after=1) == {"stopped_at": 1}
    ckpt = run / "checkpoint/state.pt"
    written = ckpt.read_bytes()
    ran = tmp_path / "ran.txt"
    torch.save({"model": {}, "optimizer": {}, "scheduler": {}, "rng": {}, "step": 1, "extra": _Payload(ran)}, ckpt)
    with pytest.raises(CheckpointError, match=r"holds Python objects beyond tensors and plain data \(it names "
                                              r"\S*exec\).*not loaded"):
        _train(kit, cache, run, max_steps=3, save_every=1, resume=True)
    with pytest.raises(AlignTIError, match=rf"--init {run}: the checkpoint .*exec.*not loaded"):
        _train(kit, cache, tmp_path / "init", max_steps=1, init=str(run))
    assert not ran.exists()
    ckpt.write_bytes(written)  # what the trainer writes: plain data and tensors only
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "scheduler", "rng", "step"} <= set(state) and state["step"] == 1


def test_an_older_checkpoint_is_refused_and_converted_only_on_request(kit, cache, tmp_path):
    """A checkpoint of the earlier form (numpy's RNG state as an ndarray) is refused with the way out; converted by
    the one call the message names, it resumes bit for bit (weights and metrics as the uninterrupted run's)."""
    import json

    import numpy as np
    import torch
    from safetensors.torch import load_file

    from alignti.student_train.init_from import convert_trusted_checkpoint
    from alignti.student_train.trainer import MEASURED, CheckpointError
    common = dict(max_steps=3, save_every=1)
    _train(kit, cache, tmp_path / "a", **common)
    run = tmp_path / "b"
    _train(kit, cache, run, stop_after=2, **common)
    ckpt = run / "checkpoint/state.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    kind, keys, pos, has_gauss, gauss = state["rng"]["numpy"]
    state["rng"]["numpy"] = (kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)  # as np.random.get_state()
    torch.save(state, ckpt)
    with pytest.raises(CheckpointError, match=r"numpy.*convert_trusted_checkpoint"):
        _train(kit, cache, run, resume=True, **common)
    convert_trusted_checkpoint(ckpt)
    _train(kit, cache, run, resume=True, **common)
    a, b = load_file(tmp_path / "a/final/model.safetensors"), load_file(run / "final/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda r: [{k: v for k, v in json.loads(x).items() if k not in MEASURED}  # noqa: E731
                       for x in (r / "metrics.jsonl").read_text().splitlines()]
    assert strip(tmp_path / "a") == strip(run)


# --- temperature: the target is the tempered teacher, or the range the cache allows is named ------------------------
def _full_teacher(teacher, kit, sample_ids):
    """The teacher's full logits [T, V] at the response tokens of the kit's samples ``sample_ids`` (its own forward,
    the whole LM head), keyed by sample id."""
    import torch

    from alignti.common.adapters import adapter_for
    from alignti.common.batch import collate, forward, lm_head
    from alignti.common.conversation import encode
    from alignti.common.models import load_vlm
    from alignti.common.records import Record
    from alignti.common.sources import load_image, load_records
    model, proc = load_vlm(str(teacher), torch.device("cpu"), "float32")
    adapter = adapter_for(model.eval())
    recs = {r.sample_id: r for r in load_records(kit / "data/train.json") if isinstance(r, Record)}
    out = {}
    for sid in sample_ids:
        r = recs[sid]
        img, sha = load_image(r, kit / "data/images")
        enc = encode(proc, r, img, sha)
        batch = collate([enc.__dict__], proc.tokenizer.pad_token_id or 0, type(adapter))
        with torch.no_grad():
            out[sid] = lm_head(adapter)(forward(adapter, batch).resp_hidden).double()
    return out


@pytest.fixture(scope="module")
def tempered(kit, tmp_path_factory):
    """The kit's teacher dumped at temperature 1 and at 2 (float16 log-probs, 8 samples, no TPA / saliency)."""
    from alignti.common.cache import CacheReader
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher
    root = tmp_path_factory.mktemp("tempered")
    out = {}
    for t in (1.0, 2.0):
        dump_teacher(DumpConfig(teacher=str(kit / "teacher"), data=str(kit / "data/train.json"),
                                images=str(kit / "data/images"), out=str(root / f"t{t:g}"), limit=8, top_k=16,
                                tpa_branches=0, saliency_layer="none", logprob_encoding="float16", temperature=t,
                                progress=False))
        out[t] = root / f"t{t:g}"
    readers = {t: CacheReader(p) for t, p in out.items()}
    return out, readers, _full_teacher(kit / "teacher", kit, [x["sample_id"] for x in readers[1.0].samples[:4]])


def test_a_cache_dumped_at_a_temperature_is_the_tempered_teacher(tempered):
    """dump-teacher --temperature 2: the cached top-k and rest mass are the teacher's softmax(z / 2) (brute force over
    its whole vocabulary), where the T = 1 cache tempered as one lump is far off (the old target)."""
    import torch

    from alignti.common.losses import fold_teacher, temperature_bounds
    paths, readers, full = tempered
    assert readers[2.0].params["temperature"] == 2.0 and "temperature" not in readers[1.0].params
    lump_err, exact_err, inside = [], [], []
    for i, (sid, z) in enumerate(full.items()):
        x1, x2 = readers[1.0][i], readers[2.0][i]
        assert x1["sample_id"] == x2["sample_id"] == sid
        ids = torch.from_numpy(x2["topk_ids"]).long()
        assert torch.equal(ids, torch.from_numpy(x1["topk_ids"]).long())  # tempering keeps the order
        true = torch.log_softmax(z / 2, -1)
        true_fold = torch.cat([true.gather(-1, ids), torch.log1p(-true.gather(-1, ids).exp().sum(-1)).unsqueeze(-1)],
                              -1)
        cached = fold_teacher(torch.from_numpy(x2["topk_logprobs"]), torch.from_numpy(x2["tail_logmass"]), 2.0, 2.0)
        old = fold_teacher(torch.from_numpy(x1["topk_logprobs"]), torch.from_numpy(x1["tail_logmass"]), 2.0)
        exact_err.append((cached.exp().double() - true_fold.exp()).abs().max())
        lump_err.append((old.exp().double()[:, -1] - true_fold.exp()[:, -1]).abs().max())
        lo, hi, lump = temperature_bounds(torch.from_numpy(x1["topk_logprobs"]).double(),
                                          torch.from_numpy(x1["tail_logmass"]).double(), z.shape[-1] - 16, 2.0)
        rest = true_fold.exp()[:, -1]
        inside.append(bool(((lo - 1e-3 <= rest) & (rest <= hi + 1e-3)).all()))  # fp16 top-k: 1e-3 of slack
    assert max(exact_err) < 2e-3  # float16 log-probs: 2^-11 relative per probability
    assert max(lump_err) > 0.1, max(lump_err)  # the lump is far from the teacher's rest mass (0.17 vs 0.77 in the issue)
    assert all(inside)


def test_zipf_vocabulary_rest_mass_at_temperature_2():
    """A Zipf-shaped 152,064-token vocabulary (Qwen2.5-VL's head), k = 64: at T = 2 the teacher's rest mass (brute
    force) is about 0.9; the lump gives a tenth of that, outside the range the cache allows, which holds the truth; a
    dump at T = 2 (the dump's own top-k fold) caches it to fp32 rounding."""
    import torch

    from alignti.common.losses import temperature_bounds
    from alignti.teacher_dump.compute import topk_fold_hidden
    V, k = 152_064, 64
    rank = torch.arange(1, V + 1, dtype=torch.float64)
    s = torch.tensor([[0.9], [1.0], [1.1]], dtype=torch.float64)  # Zipf exponents, one per row
    head = torch.nn.Linear(1, V, bias=False).double()
    with torch.no_grad():
        head.weight.copy_(-rank.log()[:, None])  # logits z = -s log(rank)
    ids, lp1, tail1, _, _ = topk_fold_hidden(s, head, k)
    true_rest = 1 - torch.softmax(head(s) / 2, -1).gather(-1, ids).sum(-1)
    lo, hi, lump = temperature_bounds(lp1, tail1, V - k, 2.0)
    assert (true_rest > 0.8).all() and (lump < 0.25).all(), (true_rest, lump)
    assert ((lo <= true_rest) & (true_rest <= hi)).all() and (lump < lo).all()
    _, _, tail2, _, _ = topk_fold_hidden(s, head, k, temperature=2.0)
    assert torch.allclose(tail2.double().exp(), true_rest, atol=1e-5)  # the dump's fp32 softmax


def test_training_at_another_temperature_is_refused_naming_the_range(kit, tempered, tmp_path, caplog):
    """train-student --temperature 2 on the T = 1 cache is refused before the student loads, naming the range the
    teacher's rest mass can take and the lump's value; at the cache's own temperature it trains; with
    --approximate-temperature it trains with a warning."""
    paths, _, _ = tempered
    with pytest.raises(ValueError, match=r"--temperature 2, but the cache at .* holds the teacher at temperature 1 .*"
                                         r"anywhere from 0\.\d+ to 0\.\d+ .*one lump gives 0\.\d+.*"
                                         r"dump-teacher --temperature 2.*--temperature 1 \(train-student's default"):
        _train(kit, paths[1.0], tmp_path / "a", max_steps=1, temperature=2.0)
    with pytest.raises(ValueError, match=r"--temperature 1, but the cache .* at temperature 2"):
        _train(kit, paths[2.0], tmp_path / "b", max_steps=1)
    assert _train(kit, paths[2.0], tmp_path / "c", max_steps=1, temperature=2.0)["steps"] == 1
    caplog.set_level("WARNING", logger="alignti.train")
    assert _train(kit, paths[1.0], tmp_path / "d", max_steps=1, temperature=2.0,
                  approximate_temperature=True)["steps"] == 1
    assert "--approximate-temperature" in caplog.text


# --- an LM head padded past the tokenizer --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def padded(kit, tmp_path_factory):
    """The kit's teacher with its LM head and embeddings resized from 320 rows to 352, past its tokenizer's 320 ids
    (Qwen2.5-VL-7B vs 3B in small); the 32 new rows copy, x1.5, the rows of the tokens the teacher predicts on its
    first samples, so without the fold they win top-k slots."""
    import json

    import torch

    from alignti.common.models import load_vlm
    from alignti.common.saving import save_checkpoint
    first = [x["id"] for x in json.loads((kit / "data/train.json").read_text())[:2]]
    full = _full_teacher(kit / "teacher", kit, first)
    model, proc = load_vlm(str(kit / "teacher"), torch.device("cpu"), "float32")
    model.resize_token_embeddings(352)
    with torch.no_grad():
        hot = torch.cat([z.argmax(-1) for z in full.values()]).unique()[:32]
        w = model.get_output_embeddings().weight
        w[320:320 + len(hot)] = 1.5 * w[hot]
    out = tmp_path_factory.mktemp("padded") / "teacher"
    save_checkpoint(model, proc, out)
    return out


def _padded_dump(kit, teacher, out, **kw):
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher
    return dump_teacher(DumpConfig(teacher=str(teacher), data=str(kit / "data/train.json"),
                                   images=str(kit / "data/images"), out=str(out), limit=8, top_k=16, tpa_branches=2,
                                   tpa_top_k=8, saliency_layer="none", logprob_encoding="float16", progress=False, **kw))


def test_padded_head_ids_are_folded_into_the_rest_at_dump(kit, padded, tmp_path):
    """A teacher head of 352 rows over a 320-id tokenizer: no cached id (top-k, TPA candidates, TPA top-k) is 320
    or above, the padded rows' mass is in the rest bucket (brute force over the full head), the manifest records
    both sizes, and the 320-row student trains on it."""
    import torch

    from alignti.common.cache import CacheReader
    manifest = _padded_dump(kit, padded, tmp_path / "c")
    assert manifest["vocabulary"] == {"lm_head_rows": 352, "tokenizer_ids": 320, "cached_ids_below": 320}
    reader = CacheReader(tmp_path / "c")
    assert reader.params["ids_below"] == 320
    arrays = reader.part_arrays(0)
    assert all(int(arrays[n].max()) < 320 for n in ("topk_ids", "tpa_cand_ids", "tpa_ids"))
    full = _full_teacher(padded, kit, [x["sample_id"] for x in reader.samples[:2]])  # over its whole head
    padded_mass = []
    for i, (sid, z) in enumerate(full.items()):
        x = reader[i]
        p = torch.softmax(z, -1)
        rest = 1 - p.gather(-1, torch.from_numpy(x["topk_ids"]).long()).sum(-1)
        assert torch.allclose(torch.from_numpy(x["tail_logmass"]).double().exp(), rest, atol=1e-5)
        padded_mass.append(float(p[:, 320:].sum(-1).max()))
    assert max(padded_mass) > 0.01  # the padded rows hold mass the rest bucket now carries
    assert _train(kit, tmp_path / "c", tmp_path / "r", max_steps=1)["steps"] == 1


def test_cache_with_ids_past_the_students_head_is_refused_before_step_1(kit, padded, tmp_path, monkeypatch):
    """A cache holding ids 320..351 (the padded head cached whole, as before) and a 320-row student: refused before
    any step, naming both head sizes, for a cache that records its id range and for one that records none (an
    earlier alignti's: scanned); before, the run died mid-way in fold_rows with an IndexError."""
    import json

    from alignti.common.errors import FingerprintMismatch
    from alignti.teacher_dump import dump as dump_mod
    monkeypatch.setattr(dump_mod, "token_id_range",
                        lambda adapter, processor, teacher: {"lm_head_rows": 352, "tokenizer_ids": 352,
                                                             "cached_ids_below": 352})
    _padded_dump(kit, padded, tmp_path / "c")
    with pytest.raises(FingerprintMismatch, match=r"holds token ids up to 351 \(its teacher's LM head has 352 rows.*"
                                                  r"LM head has 320 rows"):
        _train(kit, tmp_path / "c", tmp_path / "r", max_steps=1)
    manifest = json.loads((tmp_path / "c/manifest.json").read_text())
    del manifest["vocabulary"]
    (tmp_path / "c/manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FingerprintMismatch, match=r"holds token ids up to 3[2-5]\d .*LM head has 320 rows"):
        _train(kit, tmp_path / "c", tmp_path / "r2", max_steps=1)
    assert not (tmp_path / "r/metrics.jsonl").exists() and not (tmp_path / "r2/metrics.jsonl").exists()


# --- weights newly initialised at load; a teacher blind to the image -----------------------------------------------
def _without(src, out, drop: str):
    """A copy of the model folder ``src`` whose model.safetensors lacks every tensor whose name contains ``drop``."""
    import shutil

    from safetensors.torch import load_file, save_file
    shutil.copytree(src, out)
    sd = load_file(out / "model.safetensors")
    kept = {k: v for k, v in sd.items() if drop not in k}
    assert len(kept) < len(sd)
    save_file(kept, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_teacher_with_newly_initialised_weights_is_refused_before_the_dump(kit, tmp_path):
    from alignti.common.errors import AlignTIError
    teacher = _without(kit / "teacher", tmp_path / "t", "vision_tower")
    with pytest.raises(AlignTIError, match=r"the teacher .* lacks \d+ weight tensor\(s\) .*initialised at random.*"
                                           r"vision_tower"):
        _padded_dump(kit, teacher, tmp_path / "c")
    assert not (tmp_path / "c").exists()  # refused before anything was written


@pytest.mark.parametrize("drop, extra", [("vision_tower", {}), ("vision_tower", {"freeze_vision": True}),
                                         ("multi_modal_projector", {"trainable": "projector"})])
def test_student_with_newly_initialised_weights_is_refused(kit, cache, tmp_path, drop, extra):
    """The student trained and saved its random tower into final/ before, which then loaded with no report."""
    from alignti.common.errors import AlignTIError
    student = _without(kit / "student", tmp_path / "s", drop)
    with pytest.raises(AlignTIError, match=rf"the student {student} lacks .*initialised at random.*{drop}"):
        _train(kit, cache, tmp_path / "r", student=str(student), max_steps=1, **extra)
    assert not (tmp_path / "r/final").exists()


def test_a_projector_fresh_by_design_is_named_and_must_train(kit, cache, tmp_path, caplog):
    """make-student's marker names its projector as fresh: the student trains (the projector logged as fresh), and
    settings that would freeze it are refused; make-student writes the marker."""
    import json
    import shutil

    from alignti.common.errors import AlignTIError
    from alignti.common.models import FRESH_MARKER
    student = tmp_path / "s"
    shutil.copytree(kit / "student", student)
    (student / FRESH_MARKER).write_text(json.dumps({"fresh": ["model.multi_modal_projector"]}))
    with pytest.raises(AlignTIError, match=r"fresh \(untrained\) model.multi_modal_projector.*freeze it"):
        _train(kit, cache, tmp_path / "r", student=str(student), max_steps=1, trainable="lm")
    caplog.set_level("INFO", logger="alignti.train")
    assert _train(kit, cache, tmp_path / "r2", student=str(student), max_steps=1, freeze_vision=True)["steps"] == 1
    assert "model.multi_modal_projector is fresh from make-student" in caplog.text
    assert not (tmp_path / "r2/final" / FRESH_MARKER).exists()  # the trained student is no longer fresh


def test_a_teacher_blind_to_the_image_is_warned_about(kit, tmp_path, caplog):
    """A teacher whose projector outputs nothing (zero weights: every image gives the same image tokens) dumps with a
    warning naming the samples; the kit's seeing teacher dumps without it."""
    import torch

    from alignti.common.models import load_vlm
    from alignti.common.saving import save_checkpoint
    model, proc = load_vlm(str(kit / "teacher"), torch.device("cpu"), "float32")
    with torch.no_grad():
        for p in model.model.multi_modal_projector.parameters():
            p.zero_()
    save_checkpoint(model, proc, tmp_path / "blind")
    caplog.set_level("WARNING", logger="alignti.dump")
    _padded_dump(kit, kit / "teacher", tmp_path / "c0")
    assert "does not see the images" not in caplog.text
    _padded_dump(kit, tmp_path / "blind", tmp_path / "c1")
    assert "gives the same outputs with each sample's image as with a blank image" in caplog.text


def test_rounds_refuse_a_train_temperature_the_dumps_do_not_hold_up_front(tmp_path):
    """A rounds YAML training at temperature 2 from dumps at 1 is refused when the YAML is read (before any teacher
    time), naming the setting that fixes it; dump.temperature 2 (or the approximation, asked for) is taken."""
    import yaml

    from alignti.common.config import ConfigError
    from alignti.workflows.rounds import load_config, template
    raw = yaml.safe_load(template())
    raw.update(teacher="T", student="S", data="D")
    path = tmp_path / "r.yaml"
    raw["train"] = {**raw["train"], "temperature": 2.0}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"train.temperature \(2\) is not dump.temperature \(1\).*dump.temperature: 2"):
        load_config(path)
    for fix in ({"dump": {**raw["dump"], "temperature": 2.0}},
                {"train": {**raw["train"], "approximate_temperature": True}}):
        path.write_text(yaml.safe_dump({**raw, **fix}))
        assert load_config(path)["train"]["temperature"] == 2.0
