"""Shipped tokenizers vendored in tests/data/tokenizers (their sources in each folder's SOURCE.md), unpacked once per
session: llava-hf/llava-1.5-7b-hf's Llama-2 SentencePiece tokenizer with LLaVA-1.5's chat template, Qwen2's
byte-level BPE with Qwen2-VL's special tokens (a LLaVA-style student adds ``<image>`` and takes a ChatML template),
Gemma 3's 262,144-id tokenizer with its chat template, Qwen3's tokenizer (Qwen3-VL's) and Mistral's Tekken vocabulary
(Pixtral's ``tekken_240911.json``). Large files are stored gzip- or xz-compressed and unpacked here."""

import gzip
import json
import lzma
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
            for suffix, opener in ((".gz", gzip.open), (".xz", lzma.open)):
                if f.name.endswith(".json" + suffix):
                    with opener(f, "rb") as src, open(out / f.name[:-len(suffix)], "wb") as dst:
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


GEMMA3 = "gemma-3"


def gemma3_processor(dest: Path):
    """google/gemma-3-*-it's processor from its shipped files (tests/data/tokenizers/gemma-3/SOURCE.md): the 262,145-id
    tokenizer (262,144 + ``<image_soft_token>``) with its chat template, the image processor's 896-px settings and 256
    soft tokens per image. The PIL image processor: transformers' own, same arithmetic."""
    from transformers import AutoTokenizer, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = AutoTokenizer.from_pretrained(str(unpack(GEMMA3, dest)))
    ip = json.loads((DATA / GEMMA3 / "preprocessor_config.json").read_text())
    keep = ("do_normalize", "do_rescale", "do_resize", "image_mean", "image_std", "resample", "rescale_factor", "size")
    settings = json.loads((DATA / GEMMA3 / "processor_config.json").read_text())
    return Gemma3Processor(image_processor=Gemma3ImageProcessorPil(**{k: ip[k] for k in keep}), tokenizer=tok,
                           chat_template=tok.chat_template, image_seq_length=settings["image_seq_length"])


QWEN3 = "qwen3"
# Qwen3-VL's image processor (Qwen2VLImageProcessor with 16-px patches merged 2x2, two frames per patch, mean and std
# 0.5, 2^16 to 2^24 pixels): tests/data/tokenizers/qwen3/SOURCE.md
QWEN3_VL_IMAGE = dict(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5, 0.5, 0.5],
                      image_std=[0.5, 0.5, 0.5], min_pixels=65536, max_pixels=16777216)


def qwen3_tokenizer(dest: Path):
    """Qwen3's shipped tokenizer.json (Qwen3-VL's, byte for byte: tests/data/tokenizers/qwen3/SOURCE.md) with
    Qwen3-VL's tokenizer settings: eos ``<|im_end|>``, pad ``<|endoftext|>``, no bos."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(unpack(QWEN3, dest)))


def qwen3_vl_processor(tokenizer, chat_template: str):
    """Qwen3VLProcessor (image-only) with ``tokenizer`` (``qwen3_tokenizer``: Qwen3's shipped one), Qwen3-VL's
    image-processor settings and ``chat_template``."""
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from alignti.common.models import image_only_processor_class
    return image_only_processor_class(Qwen3VLProcessor)(
        image_processor=Qwen2VLImageProcessorPil(**QWEN3_VL_IMAGE), tokenizer=tokenizer,
        chat_template=chat_template)


TEKKEN = "tekken"
# mistral-common's special tokens of a Tekken file that lists none (the 2024 files, tekken_240911.json among them):
# ``Tekkenizer.DEPRECATED_SPECIAL_TOKENS`` of mistral-common 1.13.1 (mistral_common/tokens/tokenizers/tekken.py), ranks
# 0-19; ranks 20-999 are fillers ``<SPECIAL_{rank}>``.
TEKKEN_SPECIALS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                   "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                   "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]")


def tekken_tokenizer(dest: Path):
    """Mistral's Tekken tokenizer (Pixtral-12B-2409's ``tekken_240911.json``, shipped in mistral-common's data folder:
    tests/data/tokenizers/tekken/SOURCE.md) converted by transformers' own converter
    (``transformers.integrations.mistral.convert_tekken_tokenizer``, what a Mistral checkpoint's tokenizer.json is
    made with). The file lists no special tokens (its 2024 format), so mistral-common's defaults for it are written
    into it first (``TEKKEN_SPECIALS``): without mistral-common installed the converter cannot supply them."""
    from transformers.integrations.mistral import convert_tekken_tokenizer

    out = Path(dest) / TEKKEN
    path = out / "tekken.json"
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        with lzma.open(DATA / TEKKEN / "tekken_240911.json.xz", "rb") as src:
            raw = json.load(src)
        raw["special_tokens"] = [{"rank": i, "token_str": t, "is_control": True} for i, t in enumerate(TEKKEN_SPECIALS)]
        path.write_text(json.dumps(raw))
    return convert_tekken_tokenizer(str(path), chat_template="")


def pixtral_processor(dest: Path, chat_template: str):
    """PixtralProcessor (Mistral 3's) with the Tekken tokenizer and the image settings its file ships (``image``:
    16-px patches, images up to 1024 px, one image token per patch: Pixtral-12B-2409's; Mistral-Small-3.1 merges
    2x2 patches of 14 px, which changes the number of [IMG] tokens per row, not how they are written)."""
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    from alignti.common.models import processor_class
    with lzma.open(DATA / TEKKEN / "tekken_240911.json.xz", "rb") as src:
        image = json.load(src)["image"]
    patch = image["image_patch_size"]
    ip = PixtralImageProcessorPil(size={"longest_edge": image["max_image_size"]},
                                  patch_size={"height": patch, "width": patch})
    return processor_class("PixtralProcessor")(image_processor=ip, tokenizer=tekken_tokenizer(dest), patch_size=patch,
                                               spatial_merge_size=1, chat_template=chat_template, image_token="[IMG]",
                                               image_break_token="[IMG_BREAK]", image_end_token="[IMG_END]")


GEMMA4 = "gemma-4"
# Gemma 4's markup at the ids its checkpoints use, each an unused slot (or Gemma 3's counterpart) of Gemma 3's
# vocabulary: <|turn> 105 / <turn|> 106 and the tool and channel tokens as public Gemma 4 test fixtures list them, the
# image / audio / video ids as Gemma4Config's defaults (tests/data/tokenizers/gemma-4/SOURCE.md)
GEMMA4_MARKUP = {46: "<|tool>", 47: "<tool|>", 48: "<|tool_call>", 49: "<tool_call|>", 50: "<|tool_response>",
                 51: "<tool_response|>", 52: '<|"|>', 98: "<|think|>", 100: "<|channel>", 101: "<channel|>",
                 105: "<|turn>", 106: "<turn|>", 255999: "<|image>", 256000: "<|audio>", 258880: "<|image|>",
                 258881: "<|audio|>", 258882: "<image|>", 258883: "<audio|>", 258884: "<|video|>"}


def gemma4_processor(dest: Path, chat_template: str):
    """Gemma4Processor (image-only) over Gemma 3's shipped tokenizer with Gemma 4's markup named at its ids
    (``GEMMA4_MARKUP``, the slots renamed in tokenizer.json's vocabulary and added tokens, nothing else changed), the
    kit's tokenizer settings (bos, eos ``<turn|>``, the image / audio token names), transformers' Gemma 4 image
    processor at its defaults (16-px patches pooled 3x3, at most 280 soft tokens) and ``chat_template``."""
    from transformers import AutoTokenizer, Gemma4Processor
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    from alignti.common.kit_recipes import GEMMA4_TOKENS
    from alignti.common.models import image_only_processor_class
    out = Path(dest) / GEMMA4
    if not (out / "tokenizer.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        with lzma.open(DATA / GEMMA3 / "tokenizer.json.xz", "rb") as src:
            raw = json.load(src)
        vocab = raw["model"]["vocab"]
        by_id = {i: t for t, i in vocab.items()}
        for i, name in GEMMA4_MARKUP.items():
            old = by_id[i]
            assert old.startswith("<unused") or old in ("<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                                                        "<end_of_image>"), (i, old)
            vocab[name] = vocab.pop(old)
        raw["added_tokens"] = [t for t in raw["added_tokens"] if t["content"] != "<image_soft_token>"]  # Gemma 3's
        for t in raw["added_tokens"]:
            if t["id"] in GEMMA4_MARKUP:
                t["content"], t["special"] = GEMMA4_MARKUP[t["id"]], True
        (out / "tokenizer.json").write_text(json.dumps(raw, ensure_ascii=False))
        cfg = dict(GEMMA4_TOKENS, tokenizer_class="GemmaTokenizer", add_bos_token=True, add_eos_token=False,
                   model_max_length=131072, padding_side="left", spaces_between_special_tokens=False)
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    tok = AutoTokenizer.from_pretrained(str(out))
    return image_only_processor_class(Gemma4Processor)(
        feature_extractor=Gemma4AudioFeatureExtractor(), image_processor=Gemma4ImageProcessorPil(), tokenizer=tok,
        chat_template=chat_template)


SMOLVLM = "smolvlm-instruct"


def smolvlm_processor(dest: Path, family: str = "idefics3"):
    """HuggingFaceTB/SmolVLM-256M-Instruct's (and -500M's: the same files) processor from its shipped files
    (tests/data/tokenizers/smolvlm-instruct/SOURCE.md): SmolLM2's 49,152-id BPE + the image markup tokens, the shipped
    chat template, images resized to 2048 px on the longest edge and split into 512-px sub-images plus the global
    image, 64 tokens each. ``family`` "idefics3": Idefics3Processor as the checkpoint names it; "smolvlm":
    SmolVLMProcessor (SmolVLM2's class, image-only) with the same files."""
    from transformers import AutoTokenizer, Idefics3Processor, SmolVLMProcessor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    from alignti.common.models import image_only_processor_class
    tok = AutoTokenizer.from_pretrained(str(unpack(SMOLVLM, dest)))
    ip = json.loads((DATA / SMOLVLM / "preprocessor_config.json").read_text())
    keep = ("do_convert_rgb", "do_image_splitting", "do_normalize", "do_pad", "do_rescale", "do_resize", "image_mean",
            "image_std", "max_image_size", "resample", "rescale_factor", "size")
    ip = {k: ip[k] for k in keep}
    settings = json.loads((DATA / SMOLVLM / "processor_config.json").read_text())
    template = json.loads((DATA / SMOLVLM / "chat_template.json").read_text())["chat_template"]
    if family == "idefics3":
        return Idefics3Processor(image_processor=Idefics3ImageProcessorPil(**ip), tokenizer=tok,
                                 chat_template=template, image_seq_len=settings["image_seq_len"])
    return image_only_processor_class(SmolVLMProcessor)(
        image_processor=SmolVLMImageProcessorPil(**ip), tokenizer=tok, chat_template=template,
        image_seq_len=settings["image_seq_len"])


# the conversations the token-exact tests render with each family's template: single-turn, multi-turn, two images
SAMPLES = {
    "single": {"id": "a", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color is the square?"}, {"from": "gpt", "value": "Red"}]},
    "multi-turn": {"id": "b", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image in detail."},
        {"from": "gpt", "value": "The red circle is left of the blue square."},
        {"from": "human", "value": "How many shapes are there?"}, {"from": "gpt", "value": "There are three shapes."}]},
    "two-images": {"id": "c", "image": ["x.png", "y.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nDo the two pictures match?"}, {"from": "gpt", "value": "No, they differ."},
        {"from": "human", "value": "Which is wider?"}, {"from": "gpt", "value": "The second."}]},
}
