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
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<image>\n' }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
PATCH = 8

TEACHER = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
STUDENT = dict(hidden_size=48, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def build_tokenizer(extra_texts: list[str] | None = None, vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(shapes.corpus() * 20 + (extra_texts or []), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})


def build_processor(tokenizer):
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    size = shapes.IMAGE_SIZE
    ip = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE, image_token="<image>")


def build_llava(tokenizer, text: dict, seed: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vc = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          image_size=shapes.IMAGE_SIZE, patch_size=PATCH, projection_dim=64)
    tc = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=False,
                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.convert_tokens_to_ids("<|end|>"), **text)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = tc.eos_token_id
    model.generation_config.pad_token_id = tc.pad_token_id
    return model


def make_demo(out: str | Path, n_train: int = 300, n_val: int = 40, n_test: int = 60, train_teacher: bool = True,
              teacher_steps: int = 600, seed: int = 0, questions_per_image: int = 3) -> dict:
    out = Path(out)
    data_dir = out / "data"
    paths = shapes.write_dataset(data_dir, n_train, n_val, n_test, questions_per_image)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    teacher = build_llava(tokenizer, TEACHER, seed)
    student = build_llava(tokenizer, STUDENT, seed + 1)
    result = {"data": {k: str(v) for k, v in paths.items()}, "images": str(data_dir / "images"),
              "teacher_params": sum(p.numel() for p in teacher.parameters()),
              "student_params": sum(p.numel() for p in student.parameters())}
    if train_teacher:
        from .teacher_sft import train_sft
        acc = train_sft(teacher, processor, paths["train"], paths["val"], data_dir / "images", steps=teacher_steps,
                        seed=seed)
        result["teacher_val_accuracy"] = acc
    for name, model in (("teacher", teacher), ("student", student)):
        model.save_pretrained(out / name)
        processor.save_pretrained(out / name)
    log.info("demo kit in %s: teacher %.2fM params, student %.2fM params", out, result["teacher_params"] / 1e6,
             result["student_params"] / 1e6)
    return result


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
