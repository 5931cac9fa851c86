"""Token-exact against shipped tokenizers and chat templates of the newer families (tests/data/tokenizers, each
folder's SOURCE.md): Gemma 3's tokenizer and chat template, Gemma 4's two public chat templates (over Gemma 3's
vocabulary with Gemma 4's markup), Qwen3's tokenizer (Qwen3-VL's, and LLaVA-OneVision-1.5's Qwen3 LM), Mistral's
Tekken vocabulary (Pixtral's ``tekken_240911.json``) with Mistral-Small-3.1's chat template. For each, alignti's ids are
the family's own processor's on the conversation its chat template renders (single-turn, multi-turn, two images), and
every span decodes to exactly its text; where the kit's template claims the shipped one's structure, the two render
the same text."""

import numpy as np
import pytest
from PIL import Image

from alignti.common.conversation import chat_messages, encode
from alignti.common.records import parse_record
from tests import real_tokenizers as rt

SAMPLES = rt.SAMPLES


def _pictures(n: int, sizes):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes[:n]]


def _check(proc, sample, sizes, end: str, lead: str = ""):
    """alignti's ids == the processor's on the template-rendered conversation of ``sample`` (a SAMPLES name or a
    record); each response span decodes to the answer plus ``end`` (the end-of-turn markup), each instruction span
    to the question. ``lead``: the space the template puts before a turn's text, which a byte-level BPE merges into
    the text's first token (SmolVLM's "Assistant: Red": "ĠRed" belongs to the answer)."""
    tok = proc.tokenizer
    rec = parse_record(0, SAMPLES[sample] if isinstance(sample, str) else sample)
    pics = _pictures(len(rec.images), sizes)
    enc = encode(proc, rec, pics if len(pics) > 1 else pics[0])
    rendered = proc.apply_chat_template(chat_messages(rec), tokenize=False)
    bos = tok.bos_token
    whole = proc(text=[rendered], images=[pics], return_tensors="pt",
                 add_special_tokens=not (bos and rendered.startswith(bos)))
    assert enc.input_ids.tolist() == whole["input_ids"][0].tolist()
    users = [t for r, t in rec.turns if r == "user"]
    answers = [t for r, t in rec.turns if r == "assistant"]
    assert len(enc.resp_spans) == len(answers) and len(enc.image_spans) == len(pics)
    for (rs, re_), (is_, ie), answer, question in zip(enc.resp_spans, enc.instr_spans, answers, users):
        assert tok.decode(enc.input_ids[rs:re_].tolist()) == lead + answer + end
        assert tok.decode(enc.input_ids[is_:ie].tolist()) in {question, lead + question}  # lead: not after an image
    return enc, whole


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    return rt.gemma3_processor(tmp_path_factory.mktemp("gemma3"))


@pytest.fixture(scope="module")
def tekken(tmp_path_factory):
    from alignti.common.kit_recipes import MISTRAL_CHAT_TEMPLATE
    return rt.pixtral_processor(tmp_path_factory.mktemp("tekken"), MISTRAL_CHAT_TEMPLATE)


@pytest.mark.parametrize("sample", list(SAMPLES))
def test_gemma3_ids_are_the_processors_with_the_shipped_template(gemma3, sample):
    """Gemma 3's shipped tokenizer, chat template (``| trim`` on every text, ``<start_of_image>`` for an image) and
    896-px, 256-token processor settings: each image becomes "\\n\\n<start_of_image>" + 256 soft tokens +
    "<end_of_image>\\n\\n"."""
    enc, whole = _check(gemma3, sample, [(640, 480), (300, 900)], "<end_of_turn>\n")
    assert [e - s for s, e in enc.image_spans] == [256] * len(enc.image_spans)
    assert whole["pixel_values"].shape[-2:] == (896, 896)


def test_gemma3_markup_ids_are_the_published_ones(gemma3):
    """Ids published for the shipped Gemma 3 checkpoints (pad 0, eos 1, bos 2 in their config.json; <start_of_turn>
    105, <end_of_turn> 106; <image_soft_token> 262144 = Gemma3Config's image_token_index default; boi/eoi 255999 and
    256000, its boi/eoi_token_index defaults), and Gemma 4's published ids of ordinary pieces, the same in Gemma 3's
    vocabulary (test fixtures of Gemma 4 tool-call parsers: "thought" 45518, "Tokyo" 89265, ":" 236787, ...)."""
    from transformers import Gemma3Config
    tok = gemma3.tokenizer
    cfg = Gemma3Config()
    ids = tok.convert_tokens_to_ids(["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>",
                                     "<image_soft_token>", "<start_of_image>", "<end_of_image>"])
    assert ids == [0, 1, 2, 105, 106, cfg.image_token_index, cfg.boi_token_index, cfg.eoi_token_index] == \
        [0, 1, 2, 105, 106, 262144, 255999, 256000]
    gemma4 = {"thought": 45518, "content": 3955, "final": 10218, "call": 6639, ":": 236787, "get": 828, "_": 236779,
              "weather": 19323, "{": 236782, "}": 236783, "city": 13319, "Tokyo": 89265, "Hello": 9259, "\n": 107}
    assert {t: tok.convert_tokens_to_ids(t) for t in gemma4} == gemma4


@pytest.fixture(scope="module")
def qwen3_tok(tmp_path_factory):
    return rt.qwen3_tokenizer(tmp_path_factory.mktemp("qwen3"))


@pytest.mark.parametrize("family", ["qwen3_vl", "llava_onevision1_5"])
@pytest.mark.parametrize("sample", list(SAMPLES))
def test_qwen3_ids_are_the_processors(family, sample, qwen3_tok, tmp_path_factory):
    """Qwen3's shipped tokenizer (Qwen3-VL's byte for byte) under the kit's ChatML template: Qwen3-VL's processor at
    Qwen3-VL's image settings (16-px patches merged 2x2), and LLaVA-OneVision-1.5's (its Qwen3 LM's tokenizer; the
    kit's processor class and image settings: no shipped copy was found)."""
    from alignti.common import kit_recipes
    if family == "qwen3_vl":
        proc = rt.qwen3_vl_processor(qwen3_tok, kit_recipes.QWEN_CHAT_TEMPLATE)
        sizes = [(448, 448), (300, 900)]
    else:
        proc = kit_recipes.ONEVISION1_5_KIT.processor(qwen3_tok, 48)
        sizes = [(48, 48), (48, 48)]
    assert proc.chat_template == kit_recipes.QWEN_CHAT_TEMPLATE
    enc, _ = _check(proc, sample, sizes, "<|im_end|>\n")
    if family == "qwen3_vl":  # 448 / 16 = 28 patches a side, merged 2x2: 14 x 14 tokens
        assert [e - s for s, e in enc.image_spans][0] == 196


@pytest.mark.parametrize("sample", list(SAMPLES))
def test_mistral3_ids_are_the_processors_with_tekken(tekken, sample):
    """Mistral's Tekken vocabulary converted as transformers converts a Mistral checkpoint's, the kit's Mistral 3
    template, PixtralProcessor at the file's image settings: rows of [IMG] closed by [IMG_BREAK], the last by
    [IMG_END]; an image's span runs from its first [IMG] to its last, rows and breaks in it, [IMG_END] right after."""
    enc, whole = _check(tekken, sample, [(64, 96), (48, 160)], "</s>")
    ids = enc.input_ids
    rows = [(4, 6), (3, 10)]  # 16-px patches of 64 x 96 and 48 x 160 px
    for (s, e), (r, c) in zip(enc.image_spans, rows):
        assert ids[s:e + 1].tolist() == ([10] * c + [12]) * (r - 1) + [10] * c + [13]


def test_tekken_ids_are_the_published_ones(tekken):
    """The ids transformers' own PixtralProcessor test publishes for mistral-community/pixtral-12b's shipped
    tokenizer ("USER: [IMG][IMG][IMG_BREAK][IMG][IMG][IMG_END]\\nWhat's the content of the image? ASSISTANT:");
    [IMG] 10, [IMG_BREAK] 12, [IMG_END] 13 (Mistral3Config's image_token_index default 10)."""
    from transformers import Mistral3Config
    tok = tekken.tokenizer
    text = "<s>USER: [IMG][IMG][IMG_BREAK][IMG][IMG][IMG_END]\nWhat's the content of the image? ASSISTANT:"
    assert tok(text, add_special_tokens=False)["input_ids"] == [
        1, 21510, 1058, 1032, 10, 10, 12, 10, 10, 13, 1010, 7493, 1681, 1278, 4701, 1307, 1278, 3937, 1063, 1349, 4290,
        16002, 41150, 1058]
    assert tok.convert_tokens_to_ids(["[IMG]", "[IMG_BREAK]", "[IMG_END]"]) == [Mistral3Config().image_token_index,
                                                                                 12, 13]
    assert len(tok) == 131072


SYSTEM = {"id": "s", "image": "x.png", "conversations": [
    {"from": "system", "value": "Answer briefly."},
    {"from": "human", "value": "<image>\nWhat color is the square?"}, {"from": "gpt", "value": "Red"}]}


def _renders(template: str, proc, sample: dict) -> str:
    saved = proc.chat_template
    proc.chat_template = template
    try:
        return proc.apply_chat_template(chat_messages(parse_record(0, sample)), tokenize=False)
    finally:
        proc.chat_template = saved


def test_kit_gemma3_template_renders_as_the_shipped_one(gemma3):
    """The kit's Gemma 3 template ("the shipped one's structure") renders conversations without a system turn exactly
    as the shipped template does."""
    from alignti.common.kit_recipes import GEMMA_CHAT_TEMPLATE
    for sample in SAMPLES.values():
        assert _renders(GEMMA_CHAT_TEMPLATE, gemma3, sample) == _renders(gemma3.chat_template, gemma3, sample)


GEMMA4_TEMPLATES = ("chat_template.jinja", "chat_template.json")


@pytest.fixture(scope="module")
def gemma4(tmp_path_factory):
    return rt.gemma4_processor(tmp_path_factory.mktemp("gemma4"), "")


def _gemma4_template(name: str) -> str:
    import json
    text = (rt.DATA / rt.GEMMA4 / name).read_text()
    return json.loads(text)["chat_template"] if name.endswith(".json") else text


@pytest.mark.parametrize("template", GEMMA4_TEMPLATES)
@pytest.mark.parametrize("sample", list(SAMPLES))
def test_gemma4_ids_are_the_processors_with_the_shipped_templates(gemma4, template, sample):
    """Gemma 4's two public chat templates (the first release's, which frames an image as "\\n\\n<|image|>\\n\\n", and
    the later one, "<|image|>" alone; ``| trim`` on user text, thinking stripped from model text) over Gemma 3's
    vocabulary with Gemma 4's markup, Gemma4Processor at its default image settings (aspect-ratio-preserving, at most
    280 soft tokens framed by <|image> ... <image|>)."""
    gemma4.chat_template = _gemma4_template(template)
    enc, whole = _check(gemma4, sample, [(224, 320), (300, 900)], "<turn|>\n")
    ids = enc.input_ids
    for s, e in enc.image_spans:  # <|image> soft tokens <image|>
        assert ids[s - 1] == 255999 and ids[e] == 258882 and set(ids[s:e].tolist()) == {258880}
    assert [e - s for s, e in enc.image_spans] == [280, 252][:len(enc.image_spans)]  # 224x320 and 300x900 px


def test_kit_gemma4_template_renders_as_the_shipped_one(gemma4):
    """The kit's Gemma 4 template renders conversations without a system turn exactly as the later shipped template
    does (the first release adds "\\n\\n" around each image)."""
    from alignti.common.kit_recipes import GEMMA4_CHAT_TEMPLATE
    shipped = _gemma4_template("chat_template.jinja")
    for sample in SAMPLES.values():
        assert _renders(GEMMA4_CHAT_TEMPLATE, gemma4, sample) == _renders(shipped, gemma4, sample)


MISTRAL_SMALL = (rt.DATA / "mistral-small-3.1" / "chat_template.jinja")


@pytest.mark.parametrize("sample", list(SAMPLES) + ["system"])
def test_mistral3_ids_are_the_processors_with_the_shipped_template(tekken, sample):
    """Mistral-Small-3.1-24B-Instruct-2503's shipped chat template (its default system prompt, dated today, when the
    data has none; [INST]..[/INST] user turns, answers closed by </s>) with the Tekken tokenizer."""
    saved = tekken.chat_template
    tekken.chat_template = MISTRAL_SMALL.read_text()
    try:
        enc, _ = _check(tekken, SYSTEM if sample == "system" else sample, [(64, 96), (48, 160)], "</s>")
        assert enc.input_ids[1] == tekken.tokenizer.convert_tokens_to_ids("[SYSTEM_PROMPT]")
    finally:
        tekken.chat_template = saved


def test_kit_mistral3_template_renders_as_the_shipped_one(tekken):
    """The kit's Mistral 3 template ("the shipped one's structure without the default system prompt") renders a
    conversation with a system turn exactly as Mistral-Small-3.1's shipped template does."""
    from alignti.common.kit_recipes import MISTRAL_CHAT_TEMPLATE
    assert _renders(MISTRAL_CHAT_TEMPLATE, tekken, SYSTEM) == _renders(MISTRAL_SMALL.read_text(), tekken, SYSTEM)


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("smolvlm")


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
@pytest.mark.parametrize("sample", list(SAMPLES))
def test_smolvlm_ids_are_the_processors_with_the_shipped_files(family, sample, smol_dir):
    """SmolVLM-256M/500M-Instruct's shipped tokenizer, chat template and processor settings (images resized to 2048 px
    on the longest edge, cut into 512-px sub-images framed by <fake_token_around_image><row_r_col_c>, plus the global
    image, 64 <image> tokens each), through Idefics3Processor (the checkpoints' class) and SmolVLMProcessor (SmolVLM2's,
    the same tokenizer): each image's span holds all its sub-images, and the kit's template is the shipped one."""
    from alignti.common.kit_recipes import SMOLVLM_CHAT_TEMPLATE
    proc = rt.smolvlm_processor(smol_dir, family)
    assert proc.chat_template == SMOLVLM_CHAT_TEMPLATE
    enc, whole = _check(proc, sample, [(256, 384), (300, 900)], "<end_of_utterance>\n", lead=" ")
    image = proc.tokenizer.convert_tokens_to_ids("<image>")
    # 256 x 384 -> 1366 x 2048 -> 3 x 4 sub-images + global; 300 x 900 -> 683 x 2048 -> 2 x 4 + global
    want = [13 * 64, 9 * 64][:len(enc.image_spans)]
    assert [int((enc.input_ids[s:e] == image).sum()) for s, e in enc.image_spans] == want
    assert int((enc.input_ids == image).sum()) == sum(want) == int((whole["input_ids"][0] == image).sum())
    # sub-images with markup between them: no one image-token grid recorded (IVA across grids refuses such images)
    assert enc.image_grids == [(0, 0)] * len(want) and not enc.image_tiles


def test_smolvlm_ids_are_the_published_ones(smol_dir):
    """SmolLM2's and SmolVLM's published ids: <|im_start|> 1, <|im_end|> 2 (SmolLM2's tokenizer_config), the image
    markup 49152 (<global-img>), 49153 (<row_1_col_1>), 49189 (<fake_token_around_image>), 49190 (<image>),
    <end_of_utterance> 49279 (public SmolVLM ports list <fake_token_around_image> 49189 and <global-img> 49152)."""
    tok = rt.smolvlm_processor(smol_dir, "idefics3").tokenizer
    names = ["<|im_start|>", "<|im_end|>", "<global-img>", "<row_1_col_1>", "<fake_token_around_image>", "<image>",
             "<end_of_utterance>"]
    assert tok.convert_tokens_to_ids(names) == [1, 2, 49152, 49153, 49189, 49190, 49279]
    assert len(tok) == 49280
