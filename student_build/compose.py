"""``make-student --vision V --lm L --like TEACHER``: a student of the teacher's family from a pretrained vision
tower, a pretrained language model and a fresh projector, LLaVA's recipe.

The student is the teacher's model class (LLaVA, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, as transformers defines
them) with the teacher's multimodal settings (image token id, feature layer and strategy, grid pinpoints), the
tower's vision config and the LM's text config. It takes the teacher's processor (tokenizer with its image token,
image processor, chat template) and generation config, so the teacher's caches fit it: the same token ids and the
same number of image tokens per image. What cannot fit is refused before anything is written, naming what differs:
an LM whose tokenizer gives other ids than the teacher's, a tower whose patch grid gives another image-token count.

``--vision`` is, for LLaVA and LLaVA-OneVision: a vision model checkpoint (``CLIPVisionModel``,
``SiglipVisionModel``), a dual encoder (CLIP, SigLIP: its vision half) or a VLM (its ``vision_tower``). For
Qwen2-VL / Qwen2.5-VL, whose vision tower and merger are one module of the model: a Qwen2-VL (or Qwen2.5-VL)
checkpoint whose visual tower (patch embedding and blocks) is taken; the merger, Qwen2-VL's projector, is always
fresh, sized to the LM.

The projector (LLaVA: ``multi_modal_projector``; Qwen2-VL: ``visual.merger``) gets transformers' own
initialisation of that module (the model built from its config under ``seed``), as LLaVA's stage-1 starts.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from alignti.common.errors import AlignTIError

log = logging.getLogger("alignti.student_build")

QWEN = ("qwen2_vl", "qwen2_5_vl")
COMPOSED = ("llava", "llava_onevision", "qwen2_vl")  # the adapter families whose students this recipe composes
# text-config fields that describe the language model's architecture (copied from the LM into Qwen2-VL's text config)
QWEN_TEXT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "rms_norm_eps", "max_position_embeddings", "hidden_act", "tie_word_embeddings", "attention_dropout",
                  "use_sliding_window", "sliding_window", "max_window_layers", "layer_types", "initializer_range")


def _tokenizer_or_none(path: str):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        return None


def check_tokenizer(lm: str, lm_config, teacher_tokenizer, teacher_vocab: int) -> None:
    """The LM must read the teacher's token ids: every token of the LM's tokenizer has the same id in the teacher's
    (the teacher's extra tokens, such as its image token, come after or replace unused ids) and its embedding has
    no row the teacher's vocabulary lacks past the teacher's size in use. Raises AlignTIError naming the tokens that
    differ. An LM folder without a tokenizer is compared by vocabulary size alone."""
    tok = _tokenizer_or_none(lm)
    if tok is None:
        rows = int(lm_config.vocab_size)
        if rows < len(teacher_tokenizer) - 64 or rows > teacher_vocab + 1024:
            raise AlignTIError(f"the language model at {lm} has {rows} embedding rows and no tokenizer to compare; the "
                               f"teacher's tokenizer has {len(teacher_tokenizer)} tokens: save the LM's tokenizer "
                               "beside it, or pick an LM of the teacher's tokenizer")
        return
    theirs, ours = tok.get_vocab(), teacher_tokenizer.get_vocab()
    differ = sorted((i, t) for t, i in theirs.items() if ours.get(t) != i)
    if differ:
        shown = ", ".join(f"{t!r} (id {i} in the LM, {ours.get(t, 'absent')} in the teacher)" for i, t in differ[:3])
        raise AlignTIError(
            f"the language model at {lm} uses another tokenizer than the teacher: {len(differ)} of its {len(theirs)} "
            f"tokens have other ids ({shown}). The teacher's caches hold the teacher's token ids, so the student must "
            "read them as the teacher does: pick an LM of the teacher's tokenizer (e.g. a smaller model of the same "
            "series)")


def _vision_model(vision: str, family: str):
    """The pretrained vision module named by ``--vision`` (see the module doc)."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    cfg = AutoConfig.from_pretrained(vision)
    if family in QWEN:
        if cfg.model_type not in QWEN:
            raise AlignTIError(f"--vision {vision} is a {cfg.model_type} checkpoint; a Qwen2-VL student takes its vision "
                               "tower from a Qwen2-VL or Qwen2.5-VL checkpoint (its `visual` module; the merger is "
                               "built fresh for the LM)")
        return AutoModelForImageTextToText.from_pretrained(vision, dtype=torch.float32).model.visual, cfg.vision_config
    sub = getattr(cfg, "vision_config", None)
    if sub is None:  # a vision model checkpoint
        return MODEL_MAPPING[type(cfg)].from_pretrained(vision, dtype=torch.float32), cfg
    if hasattr(cfg, "text_config") and getattr(cfg, "image_token_id", getattr(cfg, "image_token_index", None)) is not None:
        return AutoModelForImageTextToText.from_pretrained(vision, dtype=torch.float32).model.vision_tower, sub
    return MODEL_MAPPING[type(sub)].from_pretrained(vision, dtype=torch.float32), sub  # CLIP / SigLIP: vision half


def _grid(cfg) -> tuple[int, int]:
    return int(cfg.image_size), int(cfg.patch_size)


def check_vision(vision: str, vcfg, teacher_cfg, family: str, image_processor) -> None:
    """The tower must turn an image into as many image tokens as the teacher's does (the caches' spans). Raises
    AlignTIError naming both geometries."""
    if family in QWEN:
        mine = {"patch_size": vcfg.patch_size, "merge_size": vcfg.spatial_merge_size,
                "temporal_patch_size": vcfg.temporal_patch_size}
        theirs = {k: getattr(image_processor, k, None) for k in mine}
        differ = [f"{k} {mine[k]} (tower) vs {theirs[k]} (teacher's processor)" for k in mine if mine[k] != theirs[k]]
        if differ:
            raise AlignTIError(f"the vision tower of {vision} cuts images into another grid than the teacher's processor: "
                               + "; ".join(differ) + ". The caches' image-token counts would not fit; pick a tower of "
                               "the teacher's patch geometry")
        return
    tv = teacher_cfg.vision_config
    (size, patch), (t_size, t_patch) = _grid(vcfg), _grid(tv)
    cls = int(vcfg.model_type.startswith("clip")), int(tv.model_type.startswith("clip"))
    drop = int(getattr(teacher_cfg, "vision_feature_select_strategy", "default") == "default")
    n, t_n = (size // patch) ** 2 + cls[0] - drop, (t_size // t_patch) ** 2 + cls[1] - drop
    if (size, patch) != (t_size, t_patch) or n != t_n:
        raise AlignTIError(
            f"the vision tower of {vision} sees {size}-px images in {patch}-px patches ({size // patch}x{size // patch} "
            f"grid, {n} image tokens per image as the teacher selects them) and the teacher's {t_size}-px in {t_patch}-px "
            f"({t_size // t_patch}x{t_size // t_patch}, {t_n} tokens). The teacher's processor and caches fit only a "
            f"tower of the teacher's grid: pick one with image_size {t_size} and patch_size {t_patch}"
            + ("" if cls[0] == cls[1] else f" and, like the teacher's {tv.model_type}, "
               f"{'a' if cls[1] else 'no'} class token"))


def _mrope_section(head_dim: int, teacher: list[int] | None) -> list[int]:
    """Qwen2-VL's M-RoPE split of half a head (temporal, height, width): the teacher's when it fits the LM's head."""
    half = head_dim // 2
    if teacher and sum(teacher) == half:
        return list(teacher)
    third = half // 3
    return [half - 2 * third, third, third]


def _student_config(teacher_cfg, vcfg, lm_cfg, family: str):
    """The teacher's config class and multimodal settings with the tower's vision config and the LM's text config."""
    d = teacher_cfg.to_dict()
    t_text = teacher_cfg.text_config
    if family in QWEN:
        text = t_text.to_dict()
        lm = lm_cfg.to_dict()
        text.update({k: lm[k] for k in QWEN_TEXT_KEYS if k in lm and k in text})
        head_dim = int(lm_cfg.hidden_size) // int(lm_cfg.num_attention_heads)
        rope = dict(text.get("rope_parameters") or {})
        lm_rope = lm.get("rope_parameters") or {}
        rope["rope_theta"] = lm_rope.get("rope_theta", rope.get("rope_theta"))
        rope["mrope_section"] = _mrope_section(head_dim, rope.get("mrope_section"))
        text["rope_parameters"] = rope
        vision = vcfg.to_dict()
        vision["hidden_size" if family == "qwen2_vl" else "out_hidden_size"] = int(lm_cfg.hidden_size)
    else:
        text = lm_cfg.to_dict()
        vision = vcfg.to_dict()
        for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
            text[k] = getattr(t_text, k, text.get(k))
    text["vocab_size"] = int(t_text.vocab_size)
    d["text_config"], d["vision_config"] = text, vision
    d["tie_word_embeddings"] = bool(getattr(lm_cfg, "tie_word_embeddings", False))
    for k in ("architectures", "transformers_version", "_name_or_path"):
        d.pop(k, None)
    return type(teacher_cfg).from_dict(d)


def compose_student(vision: str, lm: str, like: str, out: str | Path, seed: int = 0) -> dict:
    """Write the composed student to ``out`` (see the module doc): model (``save_pretrained``), the teacher's
    processor (complete, ``common/saving.py``) and generation config; loads with the plain Auto classes.

    Returns {"out", "family", "student_params", "vision_params", "lm_params", "projector_params"}.
    Raises AlignTIError when the LM's tokenizer or the tower's image grid does not fit the teacher's."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, GenerationConfig

    from alignti.common.adapters import adapter_class
    from alignti.common.models import load_processor
    from alignti.common.saving import save_checkpoint

    teacher_cfg = AutoConfig.from_pretrained(like)
    family = adapter_class(teacher_cfg.model_type).family
    if family not in COMPOSED:
        raise AlignTIError(f"make-student --vision/--lm composes students of the {', '.join(COMPOSED)} families; the "
                           f"teacher at {like} is a {teacher_cfg.model_type}: build its student with --from-teacher "
                           "--keep-layers (a pruned teacher) instead")
    processor = load_processor(like)
    lm_cfg = AutoConfig.from_pretrained(lm)
    lm_cfg = getattr(lm_cfg, "text_config", None) or lm_cfg
    if family in QWEN and lm_cfg.model_type != "qwen2":
        raise AlignTIError(f"the language model at {lm} is a {lm_cfg.model_type}; a {family} student's language model is "
                           "Qwen2's architecture (q/k/v with bias, M-RoPE): pick a Qwen2 (Qwen2.5) checkpoint")
    check_tokenizer(lm, lm_cfg, processor.tokenizer, int(teacher_cfg.text_config.vocab_size))
    tower, vcfg = _vision_model(vision, family)
    check_vision(vision, vcfg, teacher_cfg, family, processor.image_processor)
    language = AutoModelForCausalLM.from_pretrained(lm, dtype=torch.float32)
    language.resize_token_embeddings(int(teacher_cfg.text_config.vocab_size))

    torch.manual_seed(seed)
    student = AutoModelForImageTextToText.from_config(_student_config(teacher_cfg, vcfg, lm_cfg, family),
                                                      dtype=torch.float32)
    with torch.no_grad():
        student.model.language_model.load_state_dict(language.model.state_dict())
        student.lm_head.weight.copy_(language.get_output_embeddings().weight)
        if family in QWEN:
            own = tower.state_dict()
            kept = {k: v for k, v in own.items() if not k.startswith("merger.")}
            missing, unexpected = student.model.visual.load_state_dict(kept, strict=False)
            if unexpected or any(not k.startswith("merger.") for k in missing):
                raise AlignTIError(f"the visual tower of {vision} does not fit a {family} tower of its own config "
                                   f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
            projector = student.model.visual.merger
            vision_module = student.model.visual
        else:
            student.model.vision_tower.load_state_dict(tower.state_dict())
            projector = student.model.multi_modal_projector
            vision_module = student.model.vision_tower
    try:
        generation = GenerationConfig.from_pretrained(like)
    except OSError:
        generation = None
    save_checkpoint(student, processor, out, generation_config=generation)
    count = (lambda m: sum(p.numel() for p in m.parameters()))
    info = {"out": str(out), "family": family, "student_params": count(student),
            "vision_params": count(vision_module) - (count(projector) if family in QWEN else 0),
            "lm_params": count(student.model.language_model) + count(student.lm_head),
            "projector_params": count(projector)}
    log.info("composed student in %s (%s): vision %.2fM + LM %.2fM + fresh projector %.2fM = %.2fM parameters", out,
             family, info["vision_params"] / 1e6, info["lm_params"] / 1e6, info["projector_params"] / 1e6,
             info["student_params"] / 1e6)
    return info
