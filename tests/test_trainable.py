"""train-student --trainable and LoRA (student_train/trainable.py): what trains, what stays bit for bit, the merged
save against peft's adapter applied at load, resume and DDP bit for bit, and the bad inputs."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from alignti.cli import app
from alignti.common.adapters import adapter_for
from alignti.common.config import OptionRangeError
from alignti.demo import kit as demo_kit
from alignti.student_train.trainable import TrainableError, apply_trainable, lora_settings, selected_parameters
from alignti.student_train.trainer import MEASURED, TrainConfig, train_student

FAMILIES = demo_kit.FAMILIES  # every family of the registry with a demo kit


def metrics(run):
    return [{k: v for k, v in json.loads(x).items() if k not in MEASURED}
            for x in (run / "metrics.jsonl").read_text().splitlines()]


def tiny_model(family):
    tok = demo_kit.build_tokenizer(family)
    model = demo_kit.build_model(family, tok, demo_kit.STUDENT, 0).float()
    return model, adapter_for(model)


def weights(folder) -> dict:
    """The parameters of a saved model under their in-memory names (what --trainable's regex sees; some families'
    files store older names)."""
    from transformers import AutoModelForImageTextToText
    return {n: p.detach() for n, p in AutoModelForImageTextToText.from_pretrained(folder).named_parameters()}


def changed(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("family", FAMILIES)
def test_groups_are_the_families_modules(family):
    """Each family's groups against its modules as transformers names them: the projector is the module the model
    applies to the vision features (LLaVA's multi_modal_projector, Qwen2-VL's visual.merger), the vision group
    the rest of the vision encoder, the LM everything else; together every parameter, once."""
    model, adapter = tiny_model(family)
    inner = model.model
    # transformers' modules: the projectors, which map vision features into the LM, and the vision encoder they
    # belong to (Qwen-VL's merger lives inside its `visual` module; Qwen3-VL's deepstack mergers beside it)
    # Idefics3 / SmolVLM: vision_model, and the pixel-shuffle connector beside it
    tower = inner.visual if hasattr(inner, "visual") else getattr(inner, "vision_tower", None) or inner.vision_model
    projectors = ([tower.merger, *getattr(tower, "deepstack_merger_list", [])] if hasattr(tower, "merger")
                  else [inner.embed_vision] if hasattr(inner, "embed_vision")
                  else [getattr(inner, "multi_modal_projector", None) or inner.connector])
    # Gemma 4's audio tower and its projection into the LM: a modality distillation never feeds, never trained
    audio = [m for m in (getattr(inner, "audio_tower", None), getattr(inner, "embed_audio", None)) if m is not None]
    ids = {id(p): n for n, p in model.named_parameters()}
    want = {"projector": {ids[id(p)] for m in projectors for p in m.parameters()}}
    want["vision"] = {ids[id(p)] for p in tower.parameters()} - want["projector"]
    frozen = {ids[id(p)] for m in audio for p in m.parameters()}
    want["lm"] = set(ids.values()) - want["projector"] - want["vision"] - frozen
    assert all(want.values())
    for group, names in want.items():
        assert set(selected_parameters(model, adapter, group)) == names, group
    assert set(selected_parameters(model, adapter, "projector,lm")) == want["projector"] | want["lm"]
    assert set(selected_parameters(model, adapter, "all", freeze_vision=True)) == want["projector"] | want["lm"]
    assert set(selected_parameters(model, adapter, "all")) == set(ids.values()) - frozen
    assert {adapter.parameter_group(n) for n in frozen} <= {"frozen"}
    if frozen:  # a selection of the frozen tower alone is refused by name
        with pytest.raises(TrainableError, match="audio_tower.*never train"):
            selected_parameters(model, adapter, r"audio_tower\.")


def _train(kit, cache, out, stop_after=None, **kw):
    base = dict(student=str(kit / "student"), cache=str(cache), out=str(out), loss="alignti", max_steps=2,
                batch_size=8, lr=3e-3, warmup_steps=1, save_every=2, progress=False)
    return train_student(TrainConfig(**{**base, **kw}), stop_after=stop_after)


@pytest.mark.parametrize("spec, pattern", [("projector", "model.multi_modal_projector."),
                                           (r"language_model\.layers\.1\.mlp", "language_model.layers.1.mlp.")])
def test_only_the_selection_moves_and_the_optimizer_holds_only_it(kit, cache, tmp_path, spec, pattern):
    """After two steps every tensor outside the selection is bit for bit the student's, every selected matrix has
    moved; the optimizer's parameter groups and AdamW state hold exactly the selected parameters."""
    _train(kit, cache, tmp_path / "r", trainable=spec)
    before, after = weights(kit / "student"), weights(tmp_path / "r/final")
    selected = {k for k in before if pattern in k}
    assert selected and changed(before, after) == selected
    opt = torch.load(tmp_path / "r/checkpoint/state.pt", weights_only=False)["optimizer"]
    assert sum(len(g["params"]) for g in opt["param_groups"]) == len(opt["state"]) == len(selected)
    import yaml  # the setting is the run's: RUN/config.yaml (and `alignti config train-student --from RUN`) holds it
    assert yaml.safe_load((tmp_path / "r/config.yaml").read_text())["trainable"] == spec


@pytest.fixture(scope="module")
def qwen_kit(tmp_path_factory):
    """A Qwen2-VL kit (untrained teacher: only the mechanics matter here) and its cache."""
    from alignti.demo.kit import make_demo
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher
    root = tmp_path_factory.mktemp("qwen")
    make_demo(root / "kit", n_train=8, n_val=2, n_test=2, train_teacher=False, family="qwen2_vl", caption_rate=0.0)
    dump_teacher(DumpConfig(teacher=str(root / "kit/teacher"), data=str(root / "kit/data/train.json"),
                            images=str(root / "kit/data/images"), out=str(root / "cache"), irs_samples=8,
                            progress=False))
    return root / "kit", root / "cache"


def test_qwen2_vl_projector_is_the_merger(qwen_kit, tmp_path):
    kit, cache = qwen_kit
    _train(kit, cache, tmp_path / "r", trainable="projector")
    before, after = weights(kit / "student"), weights(tmp_path / "r/final")
    merger = {k for k in before if k.startswith("model.visual.merger.")}
    assert merger and changed(before, after) == merger


@pytest.mark.parametrize("extra", [dict(trainable="projector"),
                                   dict(lora_r=4, trainable="projector", lora_dropout=0.1, gradient_checkpointing=True)])
def test_resume_is_bit_for_bit(kit, cache, tmp_path, extra):
    """Killed after step 3 (checkpoint at 2) and resumed: the same weights and metrics as the uninterrupted run;
    LoRA with dropout and checkpointing (the adapters, the projector copy and every RNG come back). A resume with
    another --trainable or --lora-r is refused by name."""
    common = dict(max_steps=5, batch_size=4, **extra)
    _train(kit, cache, tmp_path / "a", **common)
    assert _train(kit, cache, tmp_path / "b", stop_after=3, **common) == {"stopped_at": 3}
    if "lora_r" in extra:  # an unfinished LoRA run has no merged weights to start another run from
        from alignti.common.errors import AlignTIError
        from alignti.student_train.init_from import init_state
        with pytest.raises(AlignTIError, match="holds unmerged LoRA adapters"):
            init_state(str(tmp_path / "b"))
    _train(kit, cache, tmp_path / "b", resume=True, **common)
    a, b = load_file(tmp_path / "a/final/model.safetensors"), load_file(tmp_path / "b/final/model.safetensors")
    assert not changed(a, b)
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    other = {**common, "trainable": "lm"} if "lora_r" not in extra else {**common, "lora_r": 8}
    with pytest.raises(Exception, match="trainable|lora_r"):
        _train(kit, cache, tmp_path / "b", resume=True, **other)


def _logits(model, kit):
    from PIL import Image

    from alignti.common.models import load_processor
    proc = load_processor(str(kit / "student"))
    image = Image.open(sorted((kit / "data/images").iterdir())[0]).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    inputs = proc(text=[proc.apply_chat_template(messages)], images=[image], return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits


def test_lora_merged_save_equals_the_adapter_applied_at_load(kit, cache, tmp_path):
    """LoRA on the LM + the projector trained fully (LLaVA-LoRA). RUN/final loads in plain transformers (no peft);
    its logits equal the student with peft's RUN/adapter applied at load (rel 1e-6: merging W + s B A in fp32 vs
    computing W x + s B (A x) differ by rounding only). Only the LM's adapted linear layers and the projector
    moved; the LM head (read directly by the memory-flat loss head) and the vision tower are bit for bit the
    student's."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText
    _train(kit, cache, tmp_path / "r", max_steps=3, lora_r=4, trainable="projector", save_adapter=True)
    state = torch.load(tmp_path / "r/checkpoint/state.pt", weights_only=False)
    trained = [k for k in state["model"] if ".lora_" in k or ".modules_to_save." in k]
    opt = state["optimizer"]  # the optimizer holds the adapters and the projector's trained copy, nothing else
    assert trained and sum(len(g["params"]) for g in opt["param_groups"]) == len(opt["state"]) == len(trained)
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "r/final").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    base = AutoModelForImageTextToText.from_pretrained(kit / "student")
    applied = PeftModel.from_pretrained(base, tmp_path / "r/adapter").eval()
    a, b = _logits(merged, kit), _logits(applied, kit)
    assert float((a - b).abs().max()) <= 1e-6 * float(b.abs().max())
    plain = _logits(AutoModelForImageTextToText.from_pretrained(kit / "student").eval(), kit)
    assert float((a - plain).abs().max()) > 1e-3  # the adapters did move the model
    before, after = weights(kit / "student"), weights(tmp_path / "r/final")
    proj = {k for k in before if "multi_modal_projector" in k}
    lm_linear = {k for k in before if "language_model.layers" in k and k.endswith("proj.weight")}
    moved = changed(before, after)
    assert proj <= moved and moved <= proj | lm_linear and len(moved & lm_linear) > len(lm_linear) // 2
    assert "lm_head.weight" not in moved
    # the adapter names the weights it applies to: the student here; with --init, the earlier run's final/ (the
    # student would give another model), and on that base it equals the merged final
    import json
    assert json.loads((tmp_path / "r/adapter/adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(kit / "student")
    _train(kit, cache, tmp_path / "s", max_steps=2, lora_r=4, trainable="projector", save_adapter=True,
           init=str(tmp_path / "r"))
    named = json.loads((tmp_path / "s/adapter/adapter_config.json").read_text())["base_model_name_or_path"]
    assert named == str(tmp_path / "r/final")
    applied = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(named), tmp_path / "s/adapter")
    a = _logits(AutoModelForImageTextToText.from_pretrained(tmp_path / "s/final").eval(), kit)
    b = _logits(applied.eval(), kit)
    assert float((a - b).abs().max()) <= 1e-6 * float(b.abs().max())


def test_lora_keeps_the_lm_head_a_plain_linear_and_trains_only_adapters(kit):
    """The loss head reads lm_head.weight: LoRA never wraps it. With LoRA alone only lora_A / lora_B train."""
    from alignti.common.models import load_vlm
    model, _ = load_vlm(str(kit / "student"), torch.device("cpu"), "float32")
    adapter = adapter_for(model)
    apply_trainable(model, adapter, None, lora=lora_settings(8, None, None, 0.0))
    assert type(model.lm_head) is torch.nn.Linear and not model.lm_head.weight.requires_grad
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all("language_model" in n for n in trainable)


def test_ddp_and_fsdp_with_lora_resume_bit_for_bit(kit, cache, tmp_path):
    """2 processes (gloo): DDP with LoRA + the projector, killed after step 3 and resumed, equals the uninterrupted
    DDP run bit for bit; FSDP2 with gradient checkpointing gives the same training up to reduction order (1e-5)."""
    from test_scale import alignti, final_weights
    args = ["train-student", "--student", kit / "student", "--cache", cache, "--loss", "alignti", "--max-steps", 4,
            "--batch-size", 4, "--save-every", 2, "--lr", 3e-3, "--lora-r", 4, "--trainable", "projector",
            "--nproc", 2]
    alignti(*args, "--out", tmp_path / "ddp")
    res = alignti(*args, "--out", tmp_path / "crashed", crash="train-step:3", check=False)
    assert res.returncode != 0
    alignti(*args, "--out", tmp_path / "crashed", "--resume")
    a, b = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "crashed")
    assert not changed(a, b)
    assert metrics(tmp_path / "ddp") == metrics(tmp_path / "crashed")
    alignti(*args, "--out", tmp_path / "fsdp", "--fsdp", "--gradient-checkpointing")
    c = final_weights(tmp_path / "fsdp")
    assert max(float((a[k] - c[k]).abs().max()) for k in a) < 1e-5
    before = load_file(kit / "student/model.safetensors")
    assert changed(before, a) == changed(before, c) and "lm_head.weight" not in changed(before, a)


@pytest.mark.parametrize("kw, message", [
    (dict(trainable="projecter"), "'projecter' is neither a group .* did you mean the group 'projector'"),
    (dict(trainable=r"no_such_module\."), r"nor a regular expression matching any of the student's"),
    (dict(trainable="none"), "--trainable none trains nothing"),
    (dict(trainable="all", lora_r=4), "--trainable all with --lora-r"),
    (dict(trainable="lm", lora_r=4), "a weight trains fully or through LoRA, not both"),
    (dict(lora_r=4, lora_targets="nothing_proj"), "--lora-targets 'nothing_proj' matches no module"),
    (dict(lora_r=4, lora_targets="lm_head"), "matches the LM head"),
    (dict(lora_r=4, trainable=r"projector\.linear_1\.weight"), "trains whole modules"),
])
def test_bad_selections_are_refused_by_name(kit, kw, message):
    from alignti.common.models import load_vlm
    model, _ = load_vlm(str(kit / "student"), torch.device("cpu"), "float32")
    lora = lora_settings(kw.pop("lora_r", None), None, kw.pop("lora_targets", None), 0.0)
    with pytest.raises(TrainableError, match=message):
        apply_trainable(model, adapter_for(model), kw.get("trainable"), lora=lora)


def test_bad_options_are_refused_before_anything_loads(tmp_path):
    """LoRA rank 0 or negative (OPTION_RANGES), LoRA settings without --lora-r: refused by the Python API and the
    CLI (exit 2, one line) before the student loads (it does not exist here)."""
    base = dict(student=str(tmp_path / "none"), cache=str(tmp_path / "none"), out=str(tmp_path / "r"))
    for r in (0, -1):
        with pytest.raises(OptionRangeError, match="--lora-r must be 1 or more"):
            train_student(TrainConfig(lora_r=r, **base))
    with pytest.raises(TrainableError, match="--lora-alpha without --lora-r"):
        train_student(TrainConfig(lora_alpha=16, **base))
    with pytest.raises(ValueError, match="--save-adapter saves LoRA adapters"):
        train_student(TrainConfig(save_adapter=True, **base))
    res = CliRunner().invoke(app, ["train-student", "--student", "S", "--cache", "C", "--out", str(tmp_path / "r"),
                                   "--lora-r", "0"])
    assert res.exit_code == 2 and not (tmp_path / "r").exists()


@pytest.mark.parametrize("trainable, lora", [("projector", None), (None, (4, 0.0))])
def test_checkpointing_gives_the_same_gradients_with_frozen_parts(kit, cache, trainable, lora):
    """With the LM frozen (projector only) or adapted by LoRA, every checkpointing mode gives the gradients of the
    plain step (the recompute's arithmetic is the forward's: rtol 1e-6, as tests/test_step.py), only on the
    trainable parameters, none of them lost (a reentrant checkpoint whose inputs need no gradient would drop
    them: transformers makes the embeddings' output require one)."""
    from grad_probe import step_gradients
    settings = lora_settings(lora[0], None, None, lora[1]) if lora else None
    kw = dict(per_micro=4, trainable=trainable, lora=settings)
    plain = step_gradients(str(kit / "student"), str(cache), "alignti", **kw)
    names = set(plain)
    assert names and all(("lora_" in n) or ("multi_modal_projector" in n) for n in names)
    assert any(float(g.abs().max()) > 0 for n, g in plain.items() if "lora_B" in n) == bool(lora)
    for mode in ("gc", "gc-reentrant"):
        ckpt = step_gradients(str(kit / "student"), str(cache), "alignti", gc=mode, **kw)
        assert ckpt.keys() == plain.keys()
        for k in plain:
            torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-6, atol=1e-8, msg=lambda m, k=k: f"{k}: {m}")
