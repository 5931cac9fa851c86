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
