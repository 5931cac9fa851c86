"""make-student, both ways, for LLaVA and Qwen2-VL: tiny config-built vision towers, LMs and teachers.

Composed (--vision --lm --like): the parts' weights are the student's, the teacher's processor and generation config
come along, it trains a few steps on a cache the teacher dumped and its RUN/final loads and generates with the plain
Auto classes; a tower of another grid is refused by name, an LM of another tokenizer gives a student that keeps it
(trained with --cross-tokenizer). Pruned (--from-teacher
--keep-layers): every kept tensor equals the teacher's bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from alignti.cli import app
from alignti.common.errors import AlignTIError
from alignti.common.saving import save_checkpoint
from alignti.demo import kit, shapes
from alignti.student_build.compose import compose_student
from alignti.student_build.prune import parse_layers
from tests.helpers import generate_once

LM = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _parts(tmp_path, family: str, patch: int | None = None):
    """Teacher (the kit's), a pretrained-looking vision tower and LM of the teacher's tokenizer, saved."""
    tok = kit.build_tokenizer(family)
    proc = kit.build_processor(tok, family)
    teacher = kit.build_model(family, tok, kit.TEACHER, 0)
    save_checkpoint(teacher, proc, tmp_path / "teacher")
    torch.manual_seed(5)
    if family == "llava":
        from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
        vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, image_size=shapes.IMAGE_SIZE,
                                                  patch_size=patch or kit.PATCH))
        lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), max_position_embeddings=512, **LM))
    else:  # Qwen2-VL: the vision tower comes from a Qwen2-VL checkpoint (another width of LM: the merger is fresh)
        from transformers import Qwen2Config, Qwen2ForCausalLM
        vision = kit.build_model(family, tok, dict(LM, hidden_size=64), 7)
        lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), max_position_embeddings=512, **LM))
    vision.save_pretrained(tmp_path / "vision")
    if family != "llava":
        proc.save_pretrained(tmp_path / "vision")
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    return tmp_path / "teacher", tmp_path / "vision", tmp_path / "lm"


def _dump(teacher, tmp_path):
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher
    paths = shapes.write_dataset(tmp_path / "data", n_train=6, n_val=1, n_test=1, questions_per_image=2)
    dump_teacher(DumpConfig(teacher=str(teacher), data=str(paths["train"]), images=str(tmp_path / "data/images"),
                            out=str(tmp_path / "cache"), saliency_layer="1", top_k=8, progress=False))
    return tmp_path / "cache"


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_composed_student_holds_the_parts_trains_on_the_teachers_cache_and_loads_plain(family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    teacher, vision, lm = _parts(tmp_path, family)
    out = tmp_path / "student"
    res = CliRunner().invoke(app, ["make-student", "--vision", str(vision), "--lm", str(lm), "--like", str(teacher),
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output[res.output.index("{"):])
    assert info["family"] == family and info["student_params"] > 0
    student = AutoModelForImageTextToText.from_pretrained(out)
    assert type(student).__name__ == type(AutoModelForImageTextToText.from_pretrained(teacher)).__name__
    lm_sd = AutoModelForCausalLM.from_pretrained(lm).state_dict()
    st = student.state_dict()
    for k, v in lm_sd.items():
        if k.startswith("model."):
            assert torch.equal(st["model.language_model." + k[len("model."):]], v), k
    assert torch.equal(st["lm_head.weight"], lm_sd["lm_head.weight"])
    if family == "llava":
        from transformers import CLIPVisionModel
        for k, v in CLIPVisionModel.from_pretrained(vision).state_dict().items():
            assert torch.equal(st["model.vision_tower." + k], v), k
    else:
        src = AutoModelForImageTextToText.from_pretrained(vision).state_dict()
        taken = [k for k in src if k.startswith("model.visual.") and ".merger." not in k]
        assert taken and all(torch.equal(st[k], src[k]) for k in taken)
        assert st["model.visual.merger.mlp.2.weight"].shape[0] == LM["hidden_size"]  # fresh, sized to the LM
    # the projector is named as fresh by design: train-student trains it and refuses to freeze it
    from alignti.common.models import FRESH_MARKER
    assert json.loads((out / FRESH_MARKER).read_text())["fresh"] == [
        "model.multi_modal_projector" if family == "llava" else "model.visual.merger"]
    # the teacher's caches fit it: train a few steps, then the run's final folder is plain transformers'
    from alignti.student_train.trainer import TrainConfig, train_student
    run = train_student(TrainConfig(student=str(out), cache=str(_dump(teacher, tmp_path)), out=str(tmp_path / "run"),
                                    loss="alignti", max_steps=3, batch_size=4, progress=False))
    generate_once(run["final"])
    generate_once(out)


def test_what_cannot_fit_is_named(tmp_path):
    teacher, vision, lm = _parts(tmp_path, "llava", patch=8)
    with pytest.raises(AlignTIError, match=r"8-px patches.*6x6.*16-px.*3x3.*patch_size 16"):
        compose_student(str(vision), str(lm), str(teacher), tmp_path / "s")
    assert not (tmp_path / "s").exists()
    other = kit.build_tokenizer("qwen2_vl")  # other ids, and no chat template that renders an image
    other.save_pretrained(lm)
    with pytest.raises(AlignTIError, match=r"another tokenizer than the teacher and its chat template renders no "
                                           r"image \(nor is it ChatML\)"):
        compose_student(str(vision), str(lm), str(teacher), tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_an_lm_of_another_tokenizer_gives_a_student_that_keeps_it(tmp_path, caplog):
    """--lm with a byte-level BPE tokenizer of other ids and Qwen2-VL's ChatML template (which renders no <image>)
    under a LLaVA teacher: the student keeps the LM's tokenizer with <image> added and a ChatML template that
    renders it, its config names that image token and vocabulary, generation stops at <|im_end|>; make-student says
    training needs --cross-tokenizer, training without it is refused naming it, with gold it runs."""
    from transformers import AutoConfig, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from alignti.common.errors import FingerprintMismatch
    from alignti.common.models import load_processor
    from alignti.student_train.trainer import TrainConfig, train_student
    from tests.test_real_templates import QWEN2VL
    teacher, vision, _ = _parts(tmp_path, "llava")
    qtok = kit.build_tokenizer("qwen2_vl")
    qtok.chat_template = QWEN2VL
    lm = tmp_path / "lm_q"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(qtok), max_position_embeddings=512, **LM)).save_pretrained(lm)
    qtok.save_pretrained(lm)
    out = tmp_path / "student"
    with caplog.at_level("WARNING", logger="alignti.student_build"):
        info = compose_student(str(vision), str(lm), str(teacher), out)
    assert info["train_with"] == "--cross-tokenizer gold" and info["vocab"] == len(qtok) + 1
    assert any("--cross-tokenizer gold" in m for m in caplog.messages)
    proc = load_processor(str(out))
    tok = proc.tokenizer
    assert tok.get_vocab() == dict(qtok.get_vocab(), **{"<image>": len(qtok)})
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]},
                                     {"role": "assistant", "content": [{"type": "text", "text": "A."}]}],
                                    tokenize=False)
    assert text == "<|im_start|>user\n<image>\nQ?<|im_end|>\n<|im_start|>assistant\nA.<|im_end|>\n"
    cfg = AutoConfig.from_pretrained(out)
    assert cfg.image_token_id == len(qtok) and cfg.text_config.vocab_size >= len(tok)
    assert tok.convert_tokens_to_ids("<|im_end|>") in GenerationConfig.from_pretrained(out).eos_token_id
    cache = _dump(teacher, tmp_path)
    with pytest.raises(FingerprintMismatch, match="--cross-tokenizer gold"):
        train_student(TrainConfig(student=str(out), cache=str(cache), out=str(tmp_path / "r0"), loss="kd",
                                  max_steps=1, batch_size=2, progress=False))
    run = train_student(TrainConfig(student=str(out), cache=str(cache), out=str(tmp_path / "run"), loss="kd",
                                    cross_tokenizer="gold", max_steps=2, batch_size=2, progress=False))
    assert run["final"] and (tmp_path / "run" / "final").exists()


def test_layer_specs(tmp_path):
    for args in ([], ["--vision", "V", "--lm", "L"], ["--from-teacher", "T", "--keep-layers", "0", "--like", "T"]):
        res = CliRunner().invoke(app, ["make-student", "--out", str(tmp_path / "s"), *args])
        assert res.exit_code == 2 and "either --vision, --lm and --like" in " ".join(res.output.split()), res.output
    assert parse_layers("0-3,8,15", 16) == [0, 1, 2, 3, 8, 15]
    assert parse_layers("every 2", 7) == [0, 2, 4, 6] and parse_layers("every 3", 8) == [0, 3, 6, 7]
    assert parse_layers("0,-1", 4) == [0, 3]
    for bad, msg in [("0-4", "outside the teacher's 4"), ("1,1", r"more than once"), ("a", "unreadable"),
                     ("", "keeps none")]:
        with pytest.raises(AlignTIError, match=msg):
            parse_layers(bad, 4)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "internvl"])  # internvl: InternViT's encoder.layer
def test_pruned_student_keeps_the_teachers_tensors_bit_for_bit(family, tmp_path):
    from transformers import AutoModelForImageTextToText
    tok = kit.build_tokenizer(family)
    teacher = kit.build_model(family, tok, dict(kit.TEACHER, num_hidden_layers=4), 0)
    save_checkpoint(teacher, kit.build_processor(tok, family), tmp_path / "teacher")
    res = CliRunner().invoke(app, ["make-student", "--from-teacher", str(tmp_path / "teacher"), "--keep-layers", "0,2-3",
                                   "--keep-vision-layers", "1", "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output[res.output.index("{"):])
    assert info["kept_layers"] == [0, 2, 3] and info["student_params"] < info["teacher_params"]
    student = AutoModelForImageTextToText.from_pretrained(tmp_path / "s")
    assert student.config.text_config.num_hidden_layers == 3
    t, s = teacher.state_dict(), student.state_dict()
    prefix = "model.language_model.layers."
    vision = next(p for p in ("model.visual.blocks.", "model.vision_tower.encoder.layers.",
                              "model.vision_tower.vision_model.encoder.layers.", "model.vision_tower.encoder.layer.")
                  if any(k.startswith(p) for k in t))
    renamed = {}
    for k in t:
        if k.startswith(prefix):
            i, rest = k[len(prefix):].split(".", 1)
            if int(i) in (0, 2, 3):
                renamed[f"{prefix}{[0, 2, 3].index(int(i))}.{rest}"] = t[k]
        elif k.startswith(vision):
            i, rest = k[len(vision):].split(".", 1)
            if int(i) == 1:
                renamed[f"{vision}0.{rest}"] = t[k]
        else:
            renamed[k] = t[k]
    assert set(renamed) == set(s)
    unequal = [k for k in s if not torch.equal(s[k], renamed[k])]
    assert not unequal, unequal[:5]
    generate_once(tmp_path / "s")


def test_pruned_qwen3_vl_keeps_deepstack_only_where_its_layers_are_kept(tmp_path):
    """Qwen3-VL's deepstack adds the tower's block-0 features to the image tokens at LM layer 0. A student without
    that layer drops the feature and its merger, and says so; its logits are the teacher's with deepstack off and
    layer 0 removed (not the feature added at the kept layer 1, which the pruned model would otherwise do). A tower
    pruned of the feature's source block is refused by name."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from alignti.student_build.prune import prune_student
    tok = kit.build_tokenizer("qwen3_vl")
    proc = kit.build_processor(tok, "qwen3_vl")
    save_checkpoint(kit.build_model("qwen3_vl", tok, kit.TEACHER, 0), proc, tmp_path / "t")
    whole = prune_student(str(tmp_path / "t"), "0,1", tmp_path / "all")
    assert whole["dropped"] == []
    info = prune_student(str(tmp_path / "t"), "1", tmp_path / "s")
    assert len(info["dropped"]) == 1 and "vision blocks [0] into LM layers [0] dropped" in info["dropped"][0]
    student = AutoModelForImageTextToText.from_pretrained(tmp_path / "s").eval()
    assert student.config.vision_config.deepstack_visual_indexes == []
    assert len(student.model.visual.deepstack_merger_list) == 0
    ref = AutoModelForImageTextToText.from_pretrained(tmp_path / "t").eval()
    ref.model.visual.deepstack_visual_indexes = []  # the tower yields no deepstack features
    ref.model.language_model.layers = torch.nn.ModuleList([ref.model.language_model.layers[1]])
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour?"}]}]
    inputs = proc(text=[proc.apply_chat_template(msgs, add_generation_prompt=True)],
                  images=[Image.new("RGB", (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE), (200, 30, 30))], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(student(**inputs).logits, ref(**inputs).logits, rtol=0, atol=1e-6)
    with pytest.raises(AlignTIError, match=r"drops vision blocks \[0\], which feed deepstack features into LM "
                                           r"layers \[0\]"):
        prune_student(str(tmp_path / "t"), "0,1", tmp_path / "v", keep_vision_layers="1")


def test_pruned_gemma4_keeps_its_per_layer_inputs_and_kv_sharing(tmp_path):
    """Gemma 4 packs every layer's per-layer input embedding into one table (``embed_tokens_per_layer`` [V, L x d])
    and one projection, gives its global layers their own head size (the config's per-layer overrides, by layer
    index), and lets its last layers reuse an earlier layer's keys and values (no key/value projections of their
    own). A student of the kit teacher's layers 1-3 (global; 3 reuses 2's keys and values) has the kept layers'
    slices, overrides and sharing: its logits are the teacher's with its sliding layer 0 skipped. Keeping the shared
    layer 3 without its producer 2 is refused by name."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from alignti.student_build.prune import prune_student
    tok = kit.build_tokenizer("gemma4")
    proc = kit.build_processor(tok, "gemma4")
    save_checkpoint(kit.build_model("gemma4", tok, kit.STUDENT, 0), proc, tmp_path / "t")
    prune_student(str(tmp_path / "t"), "1-3", tmp_path / "s")
    student = AutoModelForImageTextToText.from_pretrained(tmp_path / "s").eval()
    assert student.config.text_config.layer_types == ["full_attention"] * 3
    assert [layer.self_attn.is_kv_shared_layer for layer in student.model.language_model.layers] == [False, False, True]
    assert student.model.audio_tower is not None  # kept, as the teacher's

    class Skipped(torch.nn.Module):
        def forward(self, hidden_states, *args, **kwargs):
            return hidden_states
    ref = AutoModelForImageTextToText.from_pretrained(tmp_path / "t").eval()
    ref.model.language_model.layers[0] = Skipped()
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour?"}]}]
    inputs = proc(text=[proc.apply_chat_template(msgs, add_generation_prompt=True)],
                  images=[Image.new("RGB", (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE), (200, 30, 30))], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(student(**inputs).logits, ref(**inputs).logits, rtol=0, atol=1e-6)
    with pytest.raises(AlignTIError, match=r"keeps the teacher's layer 3, which reuses the keys and values of the "
                                           r"teacher's last unshared full_attention layer"):
        prune_student(str(tmp_path / "t"), "0,1,3", tmp_path / "v")


def test_composing_a_family_the_recipe_does_not_cover_is_named(tmp_path):
    """make-student --vision/--lm for a teacher family whose adapter composes no student (Qwen3.5's hybrid decoder):
    refused by name, pointing to --from-teacher; for a Qwen3-VL teacher an LM of another decoder kind (Qwen2) and a
    tower from another kind of checkpoint (Qwen2-VL) are refused naming what fits; nothing is written."""
    tok = kit.build_tokenizer("qwen3_5")
    save_checkpoint(kit.build_model("qwen3_5", tok, kit.TEACHER, 0), kit.build_processor(tok, "qwen3_5"), tmp_path / "t")
    with pytest.raises(AlignTIError, match=r"composes students of .*qwen3_vl.*gemma3 teachers; the teacher at .* is a "
                                           r"qwen3_5: build its student with --from-teacher"):
        compose_student(str(tmp_path / "v"), str(tmp_path / "l"), str(tmp_path / "t"), tmp_path / "s")
    teacher, vision, lm = _parts(tmp_path / "q2", "qwen2_vl")  # a Qwen2-VL tower and a Qwen2 LM
    tok = kit.build_tokenizer("qwen3_vl")
    save_checkpoint(kit.build_model("qwen3_vl", tok, kit.TEACHER, 0), kit.build_processor(tok, "qwen3_vl"),
                    tmp_path / "t3")
    with pytest.raises(AlignTIError, match=r"is a qwen2; a qwen3_vl student's language model is Qwen3's architecture"):
        compose_student(str(vision), str(lm), str(tmp_path / "t3"), tmp_path / "s")
    from transformers import Qwen3Config, Qwen3ForCausalLM
    Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), max_position_embeddings=512, **LM)).save_pretrained(
        tmp_path / "lm3")
    tok.save_pretrained(tmp_path / "lm3")
    with pytest.raises(AlignTIError, match=r"--vision .* is a qwen2_vl checkpoint; this student takes its vision tower "
                                           r"from a qwen3_vl or qwen3_vl_moe checkpoint"):
        compose_student(str(vision), str(tmp_path / "lm3"), str(tmp_path / "t3"), tmp_path / "s")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("family", ["qwen3_5", "lfm2_vl"])
def test_pruned_hybrid_student_keeps_a_valid_layer_pattern(family, tmp_path, caplog):
    """make-student --from-teacher on a hybrid decoder (Qwen3.5: Gated DeltaNet and full attention; LFM2-VL: short
    convolutions and full attention): the config's layer_types is pruned in step with the layers, and what the
    config derives it from (Qwen3.5's full_attention_interval, LFM2's full_attn_idxs) agrees with it. The saved
    student reloads with the Auto classes, each layer of the kind its layer_types names; its logits are the
    teacher's with the layers removed, and decoding on the cache the config builds (conv / recurrent states, KV)
    gives the full forward's logits. A kept set without a full-attention layer says so (a warning, and 'dropped')."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from alignti.student_build.prune import prune_student
    tok = kit.build_tokenizer(family)
    proc = kit.build_processor(tok, family)
    teacher = kit.build_model(family, tok, dict(kit.TEACHER, num_hidden_layers=4), 0)
    text = teacher.config.text_config
    types = list(text.layer_types)
    if family == "qwen3_5":  # as the released configs carry them beside layer_types
        text.full_attention_interval = 4
    else:
        text.full_attn_idxs = [i for i, t in enumerate(types) if t == "full_attention"]
    assert "full_attention" in types and len(set(types)) == 2
    save_checkpoint(teacher, proc, tmp_path / "t")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour?"}]}]
    inputs = proc(text=[proc.apply_chat_template(msgs, add_generation_prompt=True)],
                  images=[Image.new("RGB", (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE), (200, 30, 30))], return_tensors="pt")

    def derived_agrees(cfg):
        kept = list(cfg.layer_types)
        if family == "lfm2_vl":
            return cfg.full_attn_idxs == [i for i, t in enumerate(kept) if t == "full_attention"]
        k = getattr(cfg, "full_attention_interval", None)
        return k is None or kept == ["linear_attention" if (i + 1) % k else "full_attention" for i in range(len(kept))]

    keep = [1, 2, 3]
    info = prune_student(str(tmp_path / "t"), "1-3", tmp_path / "s")
    assert info["dropped"] == []
    student = AutoModelForImageTextToText.from_pretrained(tmp_path / "s").eval()
    cfg = student.config.text_config
    assert cfg.layer_types == [types[i] for i in keep] and derived_agrees(cfg)
    assert [hasattr(m, "self_attn") for m in student.model.language_model.layers] == [
        types[i] == "full_attention" for i in keep]
    ref = AutoModelForImageTextToText.from_pretrained(tmp_path / "t").eval()
    ref.model.language_model.layers = torch.nn.ModuleList([ref.model.language_model.layers[i] for i in keep])
    ref.config.text_config.layer_types = [types[i] for i in keep]
    ref.config.text_config.num_hidden_layers = len(keep)
    with torch.no_grad():
        full = student(**inputs, use_cache=False).logits
        torch.testing.assert_close(full, ref(**inputs, use_cache=False).logits, rtol=0, atol=1e-6)
        # generation on the cache the pruned config builds (conv / recurrent states, KV): each step's logits are
        # the full forward's on the prompt and the tokens before it
        gen = student.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
        n = inputs["input_ids"].shape[1]
        for j, step in enumerate(gen.logits):
            ids = gen.sequences[:, :n + j]
            again = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids))
            if "mm_token_type_ids" in inputs:
                again["mm_token_type_ids"] = torch.cat(
                    [inputs["mm_token_type_ids"], inputs["mm_token_type_ids"].new_zeros(1, j)], 1)
            want = student(**again, use_cache=False).logits[:, -1]
            torch.testing.assert_close(step, want, rtol=0, atol=1e-5)

    lone = [i for i, t in enumerate(types) if t != "full_attention"][:2]
    with caplog.at_level("WARNING", logger="alignti.student_build"):
        info = prune_student(str(tmp_path / "t"), ",".join(map(str, lone)), tmp_path / "s2")
    assert any("no full-attention layer is left for IVA" in d for d in info["dropped"])
    assert any("no full-attention layer is left for IVA" in r.getMessage() for r in caplog.records)
    cfg = AutoModelForImageTextToText.from_pretrained(tmp_path / "s2").config.text_config
    assert cfg.layer_types == [types[i] for i in lone] and derived_agrees(cfg)
