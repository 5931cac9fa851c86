"""Shipped tokenizers vendored in tests/data/tokenizers (their sources in each folder's SOURCE.md), unpacked once per
session: llava-hf/llava-1.5-7b-hf's Llama-2 SentencePiece tokenizer with LLaVA-1.5's chat template, and Qwen2's
byte-level BPE with Qwen2-VL's special tokens (a LLaVA-style student adds ``<image>`` and takes a ChatML template)."""

import gzip
import json
import shutil
from pathlib import Path

DATA = Path(__file__).parent / "data" / "tokenizers"
LLAVA15 = "llava-1.5-7b-hf"
QWEN2 = "qwen2-vl"
# a LLaVA-style ChatML template (LLaVA-OneVision's layout: the image placeholder, a line break, the text)
CHATML_LLAVA = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}")


def unpack(name: str, dest: Path) -> Path:
    """The vendored tokenizer ``name`` as a tokenizer folder under ``dest`` (tokenizer.json unzipped)."""
    out = Path(dest) / name
    if not (out / "tokenizer.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        for f in (DATA / name).iterdir():
            if f.name.endswith(".json"):
                shutil.copy(f, out / f.name)
        with gzip.open(DATA / name / "tokenizer.json.gz", "rb") as src, open(out / "tokenizer.json", "wb") as dst:
            shutil.copyfileobj(src, dst)
        if (out / "chat_template.json").exists():  # the processor's template: the tokenizer's too, for a bare load
            cfg = json.loads((out / "tokenizer_config.json").read_text())
            cfg["chat_template"] = json.loads((out / "chat_template.json").read_text())["chat_template"]
            (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return out


def load(name: str, dest: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(unpack(name, dest)))


INTERNVL3 = "internvl3-hf"


def internvl3_processor(dest: Path):
    """OpenGVLab/InternVL3-*-hf's processor as transformers' conversion script writes it (tests/data/tokenizers/
    internvl3-hf/SOURCE.md): Qwen2.5-VL's tokenizer (the vendored Qwen2 BPE with Qwen2-VL's specials, plus
    Qwen2.5-VL's added tokens 151657-151664) with InternVL's image tokens 151665-151673 and named extras, the
    shipped chat template, the image processor's and processor's shipped settings. Image-only (the video processor
    needs torchvision); its ``__call__`` is InternVLProcessor's."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from alignti.common.models import image_only_processor_class
    out = Path(dest) / INTERNVL3
    spec = json.loads((DATA / INTERNVL3 / "tokenizer_config.json").read_text())
    if not (out / "tokenizer.json").exists():
        tok = load(QWEN2, dest)
        for i, t in sorted(spec["added_tokens_decoder"].items(), key=lambda kv: int(kv[0])):
            tok.add_tokens([AddedToken(t["content"], special=t["special"], normalized=False)],
                           special_tokens=t["special"])
            assert tok.convert_tokens_to_ids(t["content"]) == int(i), t
        tok.save_pretrained(out)
        cfg = json.loads((out / "tokenizer_config.json").read_text())
        cfg.update({k: v for k, v in spec.items() if k != "added_tokens_decoder"})
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    tok = AutoTokenizer.from_pretrained(str(out))
    ip = json.loads((DATA / INTERNVL3 / "preprocessor_config.json").read_text())
    ip.pop("image_processor_type")
    settings = json.loads((DATA / INTERNVL3 / "processor_config.json").read_text())
    return image_only_processor_class(InternVLProcessor)(
        image_processor=GotOcr2ImageProcessorPil(**ip), tokenizer=tok, chat_template=spec["chat_template"],
        image_seq_length=settings["image_seq_length"])
