"""`alignti make-demo DIR`: a self-contained kit, no network.

DIR/teacher/, DIR/student/  tiny LlavaForConditionalGeneration checkpoints + processor (tokenizer
                            trained here with the `tokenizers` library), saved with save_pretrained
DIR/data/{train,val,test}.json, DIR/data/images/   the shapes VQA task (demo/shapes.py)

Teacher and student share the tokenizer, the processor and the vision geometry (same number of
image tokens); the teacher's language model is wider and deeper.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch

from . import shapes

log = logging.getLogger("alignti.demo")

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<|user|>", "<|assistant|>", "<|end|>"]
QWEN_SPECIAL_TOKENS = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"]
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "llava_onevision")
GRID_PINPOINTS = [[48, 48], [48, 96], [96, 48], [96, 96]]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<image>\n' }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
PATCH = 16  # one image token per grid cell (LLaVA, OneVision); Qwen2-VL merges 2x2 patches of 8 px
QWEN_PATCH = 8

TEACHER = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
STUDENT = dict(hidden_size=48, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def build_tokenizer(family: str = "llava", vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    qwen = family in ("qwen2_vl", "qwen2_5_vl")
    specials = QWEN_SPECIAL_TOKENS if qwen else SPECIAL_TOKENS
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(shapes.corpus() * 20, trainer)
    if qwen:
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                       unk_token="<unk>", extra_special_tokens={"image_token": "<|image_pad|>"})
    # eos: the template's end of turn, where generation stops (as Qwen2-VL's <|im_end|>): harnesses that stop at the
    # tokenizer's eos (lmms-eval's llava_hf) and not at generation_config's would otherwise run past the answer
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="<|end|>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    if family == "llava_onevision":
        fast.add_special_tokens({"additional_special_tokens": ["<video>"]})
    return fast


def build_processor(tokenizer, family: str = "llava", patch: int = PATCH, image_size: int | None = None):
    """``patch`` (LLaVA): vision patch size; 16 gives one image token per grid cell, 2 gives LLaVA-1.5's
    576 image tokens per image (the benchmarks' realistic sequence make-up). ``image_size`` (LLaVA, pixels;
    default the scenes' 48): the size the image processor resizes to, so (image_size // patch)^2 image tokens."""
    from transformers import LlavaProcessor

    if family == "llava_onevision":
        from transformers import LlavaOnevisionProcessor
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil)

        from alignti.common.models import image_only_processor_class
        size = shapes.IMAGE_SIZE
        ip = LlavaOnevisionImageProcessorPil(size={"height": size, "width": size}, image_grid_pinpoints=GRID_PINPOINTS,
                                             do_pad=True)
        return image_only_processor_class(LlavaOnevisionProcessor)(
            image_processor=ip, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE, image_token="<image>",
            video_token="<video>", num_image_tokens=(size // PATCH) ** 2, vision_feature_select_strategy="full")
    if family in ("qwen2_vl", "qwen2_5_vl"):
        from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        from alignti.common.models import image_only_processor_class
        n = shapes.IMAGE_SIZE ** 2
        ip = Qwen2VLImageProcessorPil(min_pixels=n, max_pixels=n, patch_size=QWEN_PATCH, merge_size=2,
                                      temporal_patch_size=2)
        cls = Qwen2VLProcessor if family == "qwen2_vl" else Qwen2_5_VLProcessor
        return image_only_processor_class(cls)(image_processor=ip, tokenizer=tokenizer, chat_template=QWEN_CHAT_TEMPLATE)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    size = image_size or shapes.IMAGE_SIZE
    ip = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=patch,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE, image_token="<image>")


def build_qwen2vl(tokenizer, text: dict, seed: int, v25: bool = False):
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    torch.manual_seed(seed)
    cid = tokenizer.convert_tokens_to_ids
    head_half = text["hidden_size"] // text["num_attention_heads"] // 2
    section = [head_half - 2 * (head_half // 3), head_half // 3, head_half // 3]
    eos = cid("<|im_end|>")
    vision = (dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=text["hidden_size"], num_heads=4,
                   patch_size=QWEN_PATCH, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                   fullatt_block_indexes=[1]) if v25 else
              dict(depth=2, embed_dim=32, hidden_size=text["hidden_size"], num_heads=4, patch_size=QWEN_PATCH,
                   spatial_merge_size=2, temporal_patch_size=2))
    cfg = (Qwen2_5_VLConfig if v25 else Qwen2VLConfig)(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None, eos_token_id=eos, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
                         **text),
        vision_config=vision,
        image_token_id=cid("<|image_pad|>"), video_token_id=cid("<|video_pad|>"),
        vision_start_token_id=cid("<|vision_start|>"), vision_end_token_id=cid("<|vision_end|>"))
    model = (Qwen2_5_VLForConditionalGeneration if v25 else Qwen2VLForConditionalGeneration)(cfg)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_onevision(tokenizer, text: dict, seed: int):
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,
                              SiglipVisionConfig)

    torch.manual_seed(seed)
    vc = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            image_size=shapes.IMAGE_SIZE, patch_size=PATCH)
    eos = tokenizer.convert_tokens_to_ids("<|end|>")
    tc = Qwen2Config(vocab_size=len(tokenizer), max_position_embeddings=1024, tie_word_embeddings=False,
                     pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, **text)
    cfg = LlavaOnevisionConfig(vision_config=vc, text_config=tc, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                               video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
                               vision_feature_select_strategy="full", vision_feature_layer=-1,
                               image_grid_pinpoints=GRID_PINPOINTS)
    model = LlavaOnevisionForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_model(family: str, tokenizer, text: dict, seed: int, patch: int = PATCH, image_size: int | None = None):
    if image_size is not None and family != "llava":
        raise ValueError(f"image_size is for the llava demo family only (got family '{family}')")
    builders = {"llava": lambda tok, text, seed: build_llava(tok, text, seed, patch, image_size),
                "qwen2_vl": build_qwen2vl, "llava_onevision": build_onevision,
                "qwen2_5_vl": lambda tok, text, seed: build_qwen2vl(tok, text, seed, v25=True)}
    if family not in builders:
        raise ValueError(f"unknown demo family '{family}' (choose {', '.join(FAMILIES)})")
    return builders[family](tokenizer, text, seed)


def build_llava(tokenizer, text: dict, seed: int, patch: int = PATCH, image_size: int | None = None):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    size = image_size or shapes.IMAGE_SIZE
    vc = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          image_size=size, patch_size=patch, projection_dim=64)
    n_image = (size // patch) ** 2
    tc = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=512 if n_image < 256 else 1024,
                     tie_word_embeddings=False,
                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.convert_tokens_to_ids("<|end|>"), **text)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(cfg)
    # Position embeddings on the scale of the patch embeddings, so each image token says which grid cell it
    # is: with the default 0.02 init the cell signature is ~4% of the token and the tiny teacher stays at
    # the answer prior (31% val); with this and lr 3e-4 it reached 43% (colour 72%) in 1,000 steps.
    torch.nn.init.normal_(model.model.vision_tower.embeddings.position_embedding.weight, std=1.0)
    model.generation_config.eos_token_id = tc.eos_token_id
    model.generation_config.pad_token_id = tc.pad_token_id
    return model


def build_student(family: str, tokenizer, teacher, seed: int, patch: int = PATCH, image_size: int | None = None):
    """The student: a fresh small language model and projector on the teacher's (trained) vision tower, as
    in VLM distillation practice, where student and teacher share the pretrained vision encoder.

    ``image_size`` (LLaVA only, pixels): the student's tower runs at this input size instead of the teacher's, so
    it has another patch grid, (image_size // patch)^2 image tokens per image: the teacher's weights with the patch
    position embeddings resampled to the new grid by transformers' own ViT recipe
    (``CLIPVisionEmbeddings.interpolate_pos_encoding``: bicubic, the class position kept; DINO / DINOv2)."""
    student = build_model(family, tokenizer, STUDENT, seed, patch, image_size)
    if not hasattr(student.model, "vision_tower"):  # Qwen2-VL's merger is sized to the LM: own tower
        return student
    state = teacher.model.vision_tower.state_dict()
    key = "embeddings.position_embedding.weight"
    if image_size is not None and student.config.vision_config.image_size != teacher.config.vision_config.image_size:
        emb = teacher.model.vision_tower.embeddings
        n = student.model.vision_tower.embeddings.num_positions
        with torch.no_grad():
            pos = emb.interpolate_pos_encoding(torch.zeros(1, n, emb.embed_dim), image_size, image_size)
        state = {**state, key: pos[0].clone()}
    student.model.vision_tower.load_state_dict(state)
    return student


def make_demo(out: str | Path, n_train: int = 300, n_val: int = 40, n_test: int = 60, train_teacher: bool = True,
              teacher_steps: int = 3000, seed: int = 0, questions_per_image: int = 3, family: str = "llava",
              teacher_lr: float = 3e-4, patch: int = PATCH, teacher_batch: int = 64, teacher_target: float | None = 0.9,
              caption_rate: float = 0.0, grounding: float = 1.0, device: str = "auto",
              long_form: dict[str, int] | None = None, long_form_rate: float = 0.0,
              long_form_target: float | None = None, long_form_grounding: str = "items",
              long_form_after: bool = False, teacher_eval_every: int = 250, teacher_lr_schedule: str = "linear") -> dict:
    """Data splits, tokenizer, processor, teacher and student checkpoints under ``out``. With ``train_teacher``
    the teacher trains on fresh scenes (and ``caption_rate`` of "list the shapes" captions) for at most
    ``teacher_steps`` steps, stopping once validation exact match reaches ``teacher_target``; ``grounding``
    weighs its auxiliary grounding loss (teacher_sft.grounding_loss). ``long_form`` ({split: images}) adds the
    long-form splits (``data/<split>_long.json``, shapes.generate_long_form_split) and ``long_form_rate`` the share
    of the teacher's batches that ask the long-form question; with a val_long split the early stop also needs its
    all-fields F1 to reach ``long_form_target`` (teacher_sft.train_sft; ``long_form_grounding``: how the grounding
    loss reads long-form answers; ``long_form_after``: long-form batches only once the short questions reach the
    target; ``teacher_lr_schedule``: teacher_sft.train_sft's ``lr_schedule``). The result holds the teacher's "teacher_steps_run", "teacher_seconds" and
    "teacher_history" (validation per evaluation, every ``teacher_eval_every`` steps)."""
    out = Path(out)
    data_dir = out / "data"
    paths = shapes.write_dataset(data_dir, n_train, n_val, n_test, questions_per_image, n_long=long_form)
    tokenizer = build_tokenizer(family)
    processor = build_processor(tokenizer, family, patch)
    teacher = build_model(family, tokenizer, TEACHER, seed, patch)
    result = {"data": {k: str(v) for k, v in paths.items()}, "images": str(data_dir / "images"),
              "teacher_params": sum(p.numel() for p in teacher.parameters())}
    if train_teacher:
        from alignti.common.models import resolve_device

        from .teacher_sft import train_sft
        teacher.to(resolve_device(device))
        stats: dict = {}
        acc = train_sft(teacher, processor, paths["train"], paths["val"], data_dir / "images", steps=teacher_steps,
                        seed=seed, lr=teacher_lr, batch_size=teacher_batch, target=teacher_target,
                        caption_rate=caption_rate, grounding=grounding, long_form_rate=long_form_rate,
                        long_form_val_path=paths.get("val_long") if long_form_rate else None,
                        long_form_target=long_form_target, long_form_grounding=long_form_grounding,
                        long_form_after=long_form_after, eval_every=teacher_eval_every,
                        lr_schedule=teacher_lr_schedule, stats=stats)
        result["teacher_val_accuracy"] = acc
        result.update(teacher_steps_run=stats["steps"], teacher_long_form_from=stats["long_form_from"], teacher_seconds=round(stats["seconds"], 1),
                      teacher_eval_seconds=round(stats["eval_seconds"], 1), teacher_history=stats["history"])
        teacher.cpu()
    student = build_student(family, tokenizer, teacher, seed + 1, patch)
    result["student_params"] = sum(p.numel() for p in student.parameters())
    from alignti.common.saving import save_checkpoint
    for name, model in (("teacher", teacher), ("student", student)):
        save_checkpoint(model, processor, out / name)  # loads with the plain Auto classes (tests/test_handoff.py)
    log.info("demo kit in %s: teacher %.2fM params, student %.2fM params", out, result["teacher_params"] / 1e6,
             result["student_params"] / 1e6)
    return result


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
