"""`alignti make-demo DIR`: a self-contained kit, no network.

DIR/teacher/, DIR/student/  tiny checkpoints of the chosen family (``--family``: a model type of the registry
                            with a kit recipe, common/adapters.py FAMILIES and common/kit_recipes.py) + processor
                            (tokenizer trained here with the `tokenizers` library), saved with save_pretrained
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

# the kit's configurations live with the family registry (common/kit_recipes.py, common/adapters.py FAMILIES)
from alignti.common.adapters import DEMO_FAMILIES as FAMILIES  # noqa: E402
from alignti.common.adapters import FAMILIES as REGISTRY  # noqa: E402
from alignti.common.kit_recipes import (CHAT_TEMPLATE, GRID_PINPOINTS, LLAVA_SPECIAL_TOKENS,  # noqa: E402,F401
                                        PATCH, QWEN_CHAT_TEMPLATE, QWEN_PATCH, QWEN_SPECIAL_TOKENS, KitRecipe)

SPECIAL_TOKENS = list(LLAVA_SPECIAL_TOKENS)

TEACHER = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
STUDENT = dict(hidden_size=48, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def recipe(family: str) -> KitRecipe:
    """The demo-kit recipe of ``family`` (a model type of the registry with a kit); ValueError naming the choices,
    AlignTIError naming the package to install when the family's processor needs one that is missing (LFM2-VL's
    image processor: torchvision)."""
    fam = REGISTRY.get(family)
    if fam is not None and fam.kit is None:
        raise ValueError(f"family '{family}' has no demo kit (make-demo builds {', '.join(FAMILIES)}); its "
                         "checkpoints work with every other command")
    if fam is None:
        raise ValueError(f"unknown demo family '{family}' (choose {', '.join(FAMILIES)})")
    why = fam.requirement_error()
    if why:
        from alignti.common.errors import AlignTIError
        raise AlignTIError(why)
    return fam.kit


def build_tokenizer(family: str = "llava", vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on the shapes corpus, opening with the family's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    kit = recipe(family)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(kit.special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(shapes.corpus() * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kit.tokens)
    if kit.added_tokens:
        fast.add_special_tokens({"additional_special_tokens": list(kit.added_tokens)})
    if kit.text_tokens:
        fast.add_tokens(list(kit.text_tokens))
    return fast


def build_processor(tokenizer, family: str = "llava", patch: int = PATCH, image_size: int | None = None):
    """The family's processor on ``tokenizer``. ``patch`` (LLaVA): vision patch size; 16 gives one image token per
    grid cell, 2 gives LLaVA-1.5's 576 image tokens per image (the benchmarks' realistic sequence make-up).
    ``image_size`` (LLaVA, pixels; default the scenes' 48): the size the image processor resizes to, so
    (image_size // patch)^2 image tokens."""
    return recipe(family).processor(tokenizer, image_size or shapes.IMAGE_SIZE, patch)


def build_model(family: str, tokenizer, text: dict, seed: int, patch: int = PATCH, image_size: int | None = None):
    """A freshly initialised (seeded) model of ``family`` from its recipe's config, with ``text`` the language
    model's dimensions; its generation config stops at the template's end of turn."""
    from transformers import AutoModelForImageTextToText

    kit = recipe(family)
    if image_size is not None and not kit.resizable:
        raise ValueError(f"image_size is for the llava demo family only (got family '{family}')")
    torch.manual_seed(seed)
    cfg = kit.config(tokenizer, text, image_size or shapes.IMAGE_SIZE, patch)
    model = AutoModelForImageTextToText.from_config(cfg)
    if kit.position_embedding_std is not None:
        # Position embeddings on the scale of the patch embeddings, so each image token says which grid cell it
        # is: with the default 0.02 init the cell signature is ~4% of the token and the tiny teacher stays at
        # the answer prior (31% val); with this and lr 3e-4 it reached 43% (colour 72%) in 1,000 steps.
        torch.nn.init.normal_(model.model.vision_tower.embeddings.position_embedding.weight,
                              std=kit.position_embedding_std)
    model.generation_config.eos_token_id = cfg.text_config.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
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
    recipe(family)  # an unknown family, or one whose processor needs a missing package: refused before any file
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
    if not train_teacher:
        result["teacher_trained"] = False
        log.info("the teacher is untrained (--no-train-teacher): every command runs, and a student distilled from "
                 "it answers at random (accuracy near 0)")
    return result


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
