"""``make-student --vision V --lm L --like TEACHER``: a student of the teacher's family from a pretrained vision
tower, a pretrained language model and fresh projectors, LLaVA's recipe.

How a family's student is composed is its adapter's ``composition`` (common/adapters.py ``Composition``): which
module is the tower, which modules start fresh, which checkpoints the tower and the LM may come from. The student is
the teacher's model class (LLaVA, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, Gemma 3, as
transformers defines them) with the teacher's multimodal settings (image token id, feature layer and strategy, grid
pinpoints, tokens per image), the tower's vision config and the LM's text config. It takes the teacher's processor
(tokenizer with its image token, image processor, chat template) and generation config, so the teacher's caches fit
it: the same token ids and the same number of image tokens per image. What cannot fit is refused before anything is
written, naming what differs: a tower whose patch grid gives another image-token count, an LM of another kind.

An LM of **another tokenizer** (families whose composition has ``other_tokenizer``: LLaVA, LLaVA-OneVision) gives
a student that keeps it: the LM's tokenizer with the family's image token added, the LM's chat template when it
renders images (else, for a ChatML LM, the ChatML layout LLaVA-OneVision uses: ``<|im_start|>user\n<image>\nQ<|im_end|>\n``),
the LM's generation config with the template's end of turn among its stop ids; the teacher's image processor. Such
a student cannot read the teacher's caches' token ids: it trains from them with ``train-student --cross-tokenizer
gold``, which the log and the returned ``train_with`` say.

``--vision`` is, for LLaVA, LLaVA-OneVision and Gemma 3: a vision model checkpoint (``CLIPVisionModel``,
``SiglipVisionModel``), a dual encoder (CLIP, SigLIP: its vision half) or a VLM (its ``vision_tower``). For the
Qwen-VL families, whose vision tower and merger are one module of the model: a checkpoint of the family's kind
(``Composition.tower_from``) whose visual tower (patch embedding, blocks) is taken; the merger (and Qwen3-VL's
deepstack mergers), the projectors in Qwen-VL's terms, are always fresh, sized to the LM. A Qwen3-VL LM with fewer
layers than the tower's deepstack features drops the features past its last layer (the adapter's ``prune_layers``,
logged).

The fresh modules get transformers' own initialisation (the model built from its config under ``seed``), as LLaVA's
stage-1 starts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from alignti.common.errors import AlignTIError

log = logging.getLogger("alignti.student_build")

# text-config fields that describe the language model's architecture (copied from the LM into the teacher's text
# config where the composition keeps it: Qwen-VL's, whose M-RoPE settings stay); MoE fields for Qwen3-VL-MoE
TEXT_ARCH_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "attention_bias", "rms_norm_eps", "max_position_embeddings", "hidden_act",
                  "tie_word_embeddings", "attention_dropout", "use_sliding_window", "sliding_window",
                  "max_window_layers", "layer_types", "initializer_range", "num_experts", "num_experts_per_tok",
                  "moe_intermediate_size", "decoder_sparse_step", "mlp_only_layers", "norm_topk_prob",
                  "router_aux_loss_coef")


# the ChatML layout of LLaVA-OneVision's template, for an LM whose own ChatML template renders no image
CHATML_VLM = ("{{% for message in messages %}}{{{{ '<|im_start|>' + message['role'] + '\\n' }}}}"
              "{{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}}{{{{ '{image}\\n' }}}}"
              "{{% endfor %}}{{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}}"
              "{{{{ content['text'] }}}}{{% endfor %}}{{{{ '<|im_end|>\\n' }}}}{{% endfor %}}"
              "{{% if add_generation_prompt %}}{{{{ '<|im_start|>assistant\\n' }}}}{{% endif %}}")


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


def _renders_images(template: str | None, tokenizer, image_token: str) -> bool:
    """Whether ``template`` renders a conversation of image and text parts with the image placeholder and every text
    verbatim (a template written for string contents fails or prints the parts' repr)."""
    if not template:
        return False
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q\u2063"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A\u2063"}]}]
    try:
        text = tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False)
    except Exception:  # noqa: BLE001 - jinja's error for list contents: this template renders strings only
        return False
    return text.count(image_token) == 1 and "Q\u2063" in text and "A\u2063" in text and "'type'" not in text


def student_processor(teacher_processor, tokenizer, lm: str):
    """The teacher's processor with ``tokenizer`` (an LM's own) in place of the teacher's: the family's image (and
    video) placeholder added to it as special tokens, the LM's chat template if it renders images, else the ChatML
    layout (``CHATML_VLM``) for a ChatML LM. Raises AlignTIError for an LM template that renders no image and is
    not ChatML."""
    import copy

    from tokenizers import AddedToken
    proc = copy.deepcopy(teacher_processor)
    marks = [t for t in (getattr(proc, "image_token", None), getattr(proc, "video_token", None)) if t]
    new = [AddedToken(t, special=True, normalized=False) for t in marks if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
    image = proc.image_token
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if not _renders_images(template, tokenizer, image):
        if template and "<|im_start|>" in template:
            template = CHATML_VLM.format(image=image)
        else:
            raise AlignTIError(f"the language model at {lm} has another tokenizer than the teacher and its chat "
                               "template renders no image (nor is it ChatML): save a chat template that renders "
                               f"{{'type': 'image'}} parts as '{image}' with the LM's tokenizer, or pick an LM of the "
                               "teacher's tokenizer")
    tokenizer.chat_template = template
    for attr in ("image_token", "video_token"):  # a tokenizer naming its own family's placeholder (Qwen2-VL's
        # <|image_pad|>): the processor reads the placeholder from the tokenizer when loaded
        if getattr(tokenizer, attr, None) not in (None, getattr(proc, attr, None)) and getattr(proc, attr, None):
            setattr(tokenizer, attr, getattr(proc, attr))
    proc.tokenizer, proc.chat_template = tokenizer, template
    for attr, tok in (("image_token_id", getattr(proc, "image_token", None)),
                      ("video_token_id", getattr(proc, "video_token", None))):
        if tok and hasattr(proc, attr):
            setattr(proc, attr, tokenizer.convert_tokens_to_ids(tok))
    return proc


def _vision_model(vision: str, comp):
    """The pretrained vision module named by ``--vision`` (see the module doc) and its vision config; ``comp``: the
    family's ``Composition``."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    cfg = AutoConfig.from_pretrained(vision)
    if comp.tower_from is not None:
        if cfg.model_type not in comp.tower_from:
            raise AlignTIError(f"--vision {vision} is a {cfg.model_type} checkpoint; this student takes its vision tower "
                               f"from a {' or '.join(comp.tower_from)} checkpoint (its `{comp.tower}` module; "
                               f"{', '.join(comp.fresh)} built fresh for the LM)")
        model = AutoModelForImageTextToText.from_pretrained(vision, dtype=torch.float32)
        return getattr(model.model, comp.tower), cfg.vision_config
    sub = getattr(cfg, "vision_config", None)
    if sub is None:  # a vision model checkpoint
        return MODEL_MAPPING[type(cfg)].from_pretrained(vision, dtype=torch.float32), cfg
    if hasattr(cfg, "text_config") and getattr(cfg, "image_token_id", getattr(cfg, "image_token_index", None)) is not None:
        return AutoModelForImageTextToText.from_pretrained(vision, dtype=torch.float32).model.vision_tower, sub
    return MODEL_MAPPING[type(sub)].from_pretrained(vision, dtype=torch.float32), sub  # CLIP / SigLIP: vision half


def _grid(cfg) -> tuple[int, int]:
    return int(cfg.image_size), int(cfg.patch_size)


def check_vision(vision: str, vcfg, teacher_cfg, comp, image_processor) -> None:
    """The tower must turn an image into as many image tokens as the teacher's does (the caches' spans); ``comp``:
    the family's ``Composition``. Raises AlignTIError naming both geometries."""
    if comp.merged_grid:
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


def _student_config(teacher_cfg, vcfg, lm_cfg, comp, own=None):
    """The teacher's config class and multimodal settings with the tower's vision config and the LM's text config
    (``comp``: the family's ``Composition``). ``own``: the student's own processor (an LM of another tokenizer): its
    vocabulary size, image / video token ids and the LM's special ids instead of the teacher's."""
    d = teacher_cfg.to_dict()
    t_text = teacher_cfg.text_config
    if comp.teacher_text:
        text = t_text.to_dict()
        lm = lm_cfg.to_dict()
        text.update({k: lm[k] for k in TEXT_ARCH_KEYS if k in lm and k in text})
        # the LM's head width: its config's head_dim, else hidden / heads (Qwen3-MoE's configs name none)
        head_dim = int(getattr(lm_cfg, "head_dim", None) or int(lm_cfg.hidden_size) // int(lm_cfg.num_attention_heads))
        if "head_dim" in text:
            text["head_dim"] = head_dim
        rope = dict(text.get("rope_parameters") or {})
        lm_rope = lm.get("rope_parameters") or {}
        rope["rope_theta"] = lm_rope.get("rope_theta", rope.get("rope_theta"))
        rope["mrope_section"] = _mrope_section(head_dim, rope.get("mrope_section"))
        text["rope_parameters"] = rope
        vision = vcfg.to_dict()  # the merger's output width: out_hidden_size (Qwen2.5-VL, Qwen3-VL), else hidden_size
        vision["out_hidden_size" if "out_hidden_size" in vision else "hidden_size"] = int(lm_cfg.hidden_size)
    else:
        text = lm_cfg.to_dict()
        vision = vcfg.to_dict()
        for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
            text[k] = getattr(t_text, k, text.get(k)) if own is None else text.get(k)
    text["vocab_size"] = int(t_text.vocab_size) if own is None else max(len(own.tokenizer), int(lm_cfg.vocab_size))
    if own is not None:
        for key, attr in (("image_token_id", "image_token"), ("image_token_index", "image_token"),
                          ("video_token_id", "video_token"), ("video_token_index", "video_token")):
            if key in d and getattr(own, attr, None):
                d[key] = int(own.tokenizer.convert_tokens_to_ids(getattr(own, attr)))
    d["text_config"], d["vision_config"] = text, vision
    d["tie_word_embeddings"] = bool(getattr(lm_cfg, "tie_word_embeddings", False))
    for k in ("architectures", "transformers_version", "_name_or_path"):
        d.pop(k, None)
    return type(teacher_cfg).from_dict(d)


def compose_student(vision: str, lm: str, like: str, out: str | Path, seed: int = 0) -> dict:
    """Write the composed student to ``out`` (see the module doc): model (``save_pretrained``), the teacher's
    processor (complete, ``common/saving.py``) and generation config; loads with the plain Auto classes.

    Returns {"out", "family", "student_params", "vision_params", "lm_params", "projector_params"}.
    With an LM of another tokenizer (LLaVA families) the student keeps it (``student_processor``) and the returned
    dict adds "tokenizer", "vocab", "teacher_vocab" and "train_with" ("--cross-tokenizer gold").
    Raises AlignTIError when the family composes no student (its adapter has no ``composition``), the LM is not of
    the family's decoder kind, the tower's image grid does not fit the teacher's, or an LM of another tokenizer
    cannot be given an image-rendering chat template (or is for a family that keeps the teacher's tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, GenerationConfig

    from alignti.common.adapters import ADAPTERS, adapter_class
    from alignti.common.models import FRESH_MARKER, load_processor
    from alignti.common.saving import save_checkpoint

    teacher_cfg = AutoConfig.from_pretrained(like)
    adapter = adapter_class(teacher_cfg.model_type)
    family, comp = adapter.family, adapter.composition
    if comp is None:
        composed = ", ".join(t for c in ADAPTERS if c.composition is not None for t in c.model_types)
        raise AlignTIError(f"make-student --vision/--lm composes students of {composed} teachers; the teacher at "
                           f"{like} is a {teacher_cfg.model_type}: build its student with --from-teacher "
                           "--keep-layers (a pruned teacher) instead")
    processor = load_processor(like)
    lm_cfg = AutoConfig.from_pretrained(lm)
    lm_cfg = getattr(lm_cfg, "text_config", None) or lm_cfg
    if comp.lm_types is not None and lm_cfg.model_type not in comp.lm_types:
        raise AlignTIError(f"the language model at {lm} is a {lm_cfg.model_type}; a {teacher_cfg.model_type} "
                           f"student's language model is {comp.lm_note}")
    own_proc = None
    try:
        check_tokenizer(lm, lm_cfg, processor.tokenizer, int(teacher_cfg.text_config.vocab_size))
    except AlignTIError as e:
        lm_tok = _tokenizer_or_none(lm)
        if lm_tok is None or not comp.other_tokenizer:  # e.g. Qwen-VL: its template and vision tokens are its own
            across = ", ".join(t for c in ADAPTERS if c.composition and c.composition.other_tokenizer
                               for t in c.model_types)
            raise AlignTIError(f"{e}; across tokenizers make-student builds {across} students (the LM's tokenizer "
                               "saved beside it)") from None
        own_proc = student_processor(processor, lm_tok, lm)
    tower, vcfg = _vision_model(vision, comp)
    check_vision(vision, vcfg, teacher_cfg, comp, processor.image_processor)
    language = AutoModelForCausalLM.from_pretrained(lm, dtype=torch.float32)
    vocab = int(teacher_cfg.text_config.vocab_size) if own_proc is None else max(len(own_proc.tokenizer),
                                                                            int(lm_cfg.vocab_size))
    language.resize_token_embeddings(vocab)

    torch.manual_seed(seed)
    student = AutoModelForImageTextToText.from_config(_student_config(teacher_cfg, vcfg, lm_cfg, comp, own_proc),
                                                      dtype=torch.float32)
    vision_module = getattr(student.model, comp.tower)
    fresh = [student.model.get_submodule(f) for f in comp.fresh]
    inside = [f[len(comp.tower) + 1:] + "." for f in comp.fresh if f.startswith(comp.tower + ".")]  # in the tower
    with torch.no_grad():
        student.model.language_model.load_state_dict(language.model.state_dict())
        student.lm_head.weight.copy_(language.get_output_embeddings().weight)
        kept = {k: v for k, v in tower.state_dict().items() if not k.startswith(tuple(inside))}
        missing, unexpected = vision_module.load_state_dict(kept, strict=False)
        if unexpected or any(not k.startswith(tuple(inside)) for k in missing):
            raise AlignTIError(f"the vision tower of {vision} does not fit a {teacher_cfg.model_type} tower of its own "
                               f"config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    notes = adapter.prune_layers(student, list(range(int(lm_cfg.num_hidden_layers))), None)
    for note in notes:  # e.g. Qwen3-VL: deepstack features into LM layers the LM does not have
        log.warning("make-student: %s", note)
    try:
        generation = GenerationConfig.from_pretrained(like if own_proc is None else lm)
    except OSError:
        generation = None if own_proc is None else GenerationConfig()
    if own_proc is not None:  # the LM's stop ids and its template's end of turn
        from alignti.common.conversation import end_of_turn_ids
        stops = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
        stops = [int(i) for i in stops if i is not None]
        stops += [i for i in end_of_turn_ids(own_proc) + [own_proc.tokenizer.eos_token_id]
                  if i is not None and i not in stops]
        generation.eos_token_id = stops or None
        if own_proc.tokenizer.pad_token_id is not None:
            generation.pad_token_id = own_proc.tokenizer.pad_token_id
    save_checkpoint(student, processor if own_proc is None else own_proc, out, generation_config=generation)
    # the projectors start untrained by design: train-student names them and refuses settings that would freeze them
    names = ["model." + f for f in comp.fresh]
    (Path(out) / FRESH_MARKER).write_text(json.dumps({"fresh": names, "made_by": "alignti make-student"}, indent=2))
    count = (lambda m: sum(p.numel() for p in m.parameters()))
    n_fresh = sum(count(m) for m in student.model.get_submodule(comp.tower).modules() if any(m is f for f in fresh))
    info = {"out": str(out), "family": family, "student_params": count(student),
            "vision_params": count(vision_module) - n_fresh,
            "lm_params": count(student.model.language_model) + count(student.lm_head),
            "projector_params": sum(count(m) for m in fresh)}
    if notes:
        info["notes"] = notes
    if own_proc is not None:
        info.update(tokenizer="the LM's own", vocab=len(own_proc.tokenizer),
                    teacher_vocab=len(processor.tokenizer),
                    train_with="--cross-tokenizer gold")
        log.warning("the student in %s reads its LM's own tokenizer (%d tokens; the teacher's has %d) and chat "
                    "template: the teacher's caches hold the teacher's token ids, so train it from them with "
                    "alignti train-student ... --cross-tokenizer gold", out, len(own_proc.tokenizer),
                    len(processor.tokenizer))
    log.info("composed student in %s (%s): vision %.2fM + LM %.2fM + fresh projector %.2fM = %.2fM parameters", out,
             family, info["vision_params"] / 1e6, info["lm_params"] / 1e6, info["projector_params"] / 1e6,
             info["student_params"] / 1e6)
    return info
