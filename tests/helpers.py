"""Small in-memory models and encoded samples for the tests."""

import torch

from alignti.common.adapters import adapter_for
from alignti.common.batch import collate
from alignti.common.conversation import encode
from alignti.common.records import Record, parse_record
from alignti.common.sources import load_image
from alignti.demo import kit, shapes


def tiny(family: str, tmp_path, n_images: int = 3, multi_turn_every: int = 2, seed: int = 0, dims=None):
    tok = kit.build_tokenizer(family)
    proc = kit.build_processor(tok, family)
    model = kit.build_model(family, tok, dims or kit.TEACHER, seed).float().eval()
    recs = shapes.generate_split(tmp_path, "train", n_images, questions_per_image=2, multi_turn_every=multi_turn_every)
    encoded = []
    for i, item in enumerate(recs):
        r = parse_record(i, item)
        img, sha = load_image(r, tmp_path / "images")
        encoded.append(encode(proc, r, img, sha))
    return model, proc, adapter_for(model), encoded


def batch_of(adapter, proc, encoded):
    return collate([e.__dict__ for e in encoded], proc.tokenizer.pad_token_id or 0, type(adapter))


def generate_once(folder) -> torch.Tensor:
    """Plain transformers: the Auto classes load the folder; one greedy generate through its processor (the
    library's own where it can build it: the video part of Qwen2-VL's needs torchvision)."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig

    from alignti.common.models import load_processor
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    gen = GenerationConfig.from_pretrained(folder)
    try:
        proc = AutoProcessor.from_pretrained(folder)
    except ImportError as e:  # the folder is complete; this machine lacks the library the video processor needs
        assert "torchvision" in str(e).lower(), e
        proc = load_processor(folder)
    image = Image.new("RGB", (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE), (200, 30, 30))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour?"}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    inputs = proc(text=[text], images=[image], return_tensors="pt")
    out = model.generate(**inputs, generation_config=gen, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    return out
