"""Token-exact encoding with real tokenizer behaviour and templates that render like the shipped ones.

* a SentencePiece BPE model trained here with Llama-2's settings (dummy prefix, byte fallback, whitespace
  pieces), converted to the fast tokenizer transformers uses for Llama checkpoints; LLaVA-1.5's template;
* byte-level BPE (Qwen2-style) with Qwen2-VL's template (default system turn, <|im_start|>role\\n, vision
  markers, <|im_end|>\\n) and LLaVA-OneVision's (<|im_start|>role + space, <image>, \\n + text, <|im_end|>).

For each: the cached ids equal the processor's ids for the whole rendered conversation, every response span
decodes to exactly the answer plus its end-of-turn markup, every instruction span to exactly the question;
single- and multi-turn, and with a system turn in the data.
"""

import numpy as np
import pytest
from PIL import Image

from alignti.common.conversation import encode
from alignti.common.records import parse_record
from alignti.demo import kit

# llava-hf/llava-1.5-7b-hf's chat template (roles in capitals + ": ", images first, every text + " ")
LLAVA15 = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
# Qwen/Qwen2-VL-7B-Instruct's
QWEN2VL = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != "
    "'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>"
    "{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# llava-hf/llava-onevision-qwen2-7b-ov-hf's
ONEVISION = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{{'<|im_end|>'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

END = {"llava15": " ", "qwen2_vl": "<|im_end|>\n", "onevision": "<|im_end|>"}
CORPUS = ["USER: What color is the square? ASSISTANT: Red", "Describe the image in detail.",
          "The red circle is left of the blue square, and a green triangle sits below them.",
          "How many shapes are there? There are three shapes.", "Is there a yellow star? No."] * 40


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    """SentencePiece BPE with Llama-2's trainer settings, loaded the way a Llama checkpoint's tokenizer.model is."""
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    from transformers import LlamaTokenizer
    d = tmp_path_factory.mktemp("sp")
    (d / "corpus.txt").write_text("\n".join(CORPUS))
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        split_digits=True, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, minloglevel=2)
    tok = LlamaTokenizer.from_pretrained(str(d), legacy=False, add_bos_token=True, add_eos_token=False)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.pad_token = tok.unk_token
    assert tok.convert_ids_to_tokens(tok("What")["input_ids"])[:2] == ["<s>", "\u2581"] or \
        tok.convert_ids_to_tokens(tok("What")["input_ids"])[1].startswith("\u2581")  # the dummy prefix
    return tok


def _processor(family: str, sp_tokenizer):
    if family == "llava15":
        from transformers import LlavaProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
        ip = CLIPImageProcessorPil(size={"shortest_edge": 96}, crop_size={"height": 96, "width": 96})
        return LlavaProcessor(image_processor=ip, tokenizer=sp_tokenizer, patch_size=16,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=LLAVA15, image_token="<image>")
    if family == "qwen2_vl":
        proc = kit.build_processor(kit.build_tokenizer("qwen2_vl"), "qwen2_vl")
        proc.chat_template = QWEN2VL
        return proc
    tok = kit.build_tokenizer("qwen2_vl")
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    tok.image_token = "<image>"
    proc = kit.build_processor(tok, "llava_onevision")
    proc.chat_template = ONEVISION
    return proc


SAMPLES = {
    "single": {"id": "a", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color is the square?"}, {"from": "gpt", "value": "Red"}]},
    "multi": {"id": "b", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image in detail."},
        {"from": "gpt", "value": "The red circle is left of the blue square."},
        {"from": "human", "value": "How many shapes are there?"}, {"from": "gpt", "value": "There are three shapes."},
        {"from": "human", "value": "Is there a yellow star?"}, {"from": "gpt", "value": "No."}]},
    "system": {"id": "c", "image": "x.png", "conversations": [
        {"from": "system", "value": "Answer briefly."},
        {"from": "human", "value": "<image>\nWhat color is the square?"}, {"from": "gpt", "value": "Red"}]},
}


@pytest.mark.parametrize("family", ["llava15", "qwen2_vl", "onevision"])
@pytest.mark.parametrize("sample", list(SAMPLES))
def test_ids_are_the_processors_and_spans_decode_exactly(family, sample, sp_tokenizer):
    proc = _processor(family, sp_tokenizer)
    tok = proc.tokenizer
    rec = parse_record(0, SAMPLES[sample])
    img = Image.fromarray(np.full((96, 96, 3), 128, np.uint8))
    enc = encode(proc, rec, img)

    from alignti.common.conversation import chat_messages
    rendered = proc.apply_chat_template(chat_messages(rec), tokenize=False)
    bos = tok.bos_token if family == "llava15" else None
    whole = proc(text=[rendered], images=[img], add_special_tokens=not (bos and rendered.startswith(bos)), return_tensors="pt")
    assert enc.input_ids.tolist() == whole["input_ids"][0].tolist()

    users = [t for r, t in rec.turns if r == "user"]
    answers = [t for r, t in rec.turns if r == "assistant"]
    assert len(enc.resp_spans) == len(answers) == len(enc.instr_spans)
    for k, ((rs, re_), (is_, ie), answer, question) in enumerate(zip(enc.resp_spans, enc.instr_spans, answers, users)):
        got = tok.decode(enc.input_ids[rs:re_].tolist())
        last = k == len(answers) - 1
        # LLaVA-1.5's end-of-turn markup is one space; SentencePiece merges it into the next turn's "\u2581USER",
        # which stays markup, so a middle turn's span is the answer alone
        want = answer + (END[family] if last or family != "llava15" else "")
        assert got == want, (family, sample, k, got, want)
        assert tok.decode(enc.input_ids[is_:ie].tolist()) == question, (family, sample, k)
        assert enc.response_mask[rs:re_].all()
    assert int(enc.response_mask.sum()) == sum(e - s for s, e in enc.resp_spans)


def test_sentencepiece_tokenization_is_the_inference_one(sp_tokenizer):
    """The issue's case: tokenizing pieces apart put a word-boundary "\u2581" before the first question word;
    the ids now have the question's first word as the whole text gives it (after "<image>\\n": no prefix)."""
    proc = _processor("llava15", sp_tokenizer)
    rec = parse_record(0, SAMPLES["single"])
    img = Image.fromarray(np.full((96, 96, 3), 128, np.uint8))
    enc = encode(proc, rec, img)
    s, e = enc.instr_spans[0]
    first = proc.tokenizer.convert_ids_to_tokens([int(enc.input_ids[s])])[0]
    assert not first.startswith("\u2581"), first
    prompt = encode(proc, rec, img, generation_prompt=True)  # what the model sees at inference
    rs = enc.resp_spans[0][0]
    assert enc.input_ids[:rs].tolist()[:len(prompt.input_ids)] == prompt.input_ids.tolist()[:rs]


def test_old_piecewise_caches_refused_only_where_ids_change(sp_tokenizer):
    """A cache of encoding version 1 (schema v2/v3: pieces tokenized apart) is refused for a SentencePiece
    tokenizer, naming the versions and the re-dump; byte-level BPE gave the same ids, so it stays usable."""
    from alignti.common.errors import AlignTIError
    from alignti.common.fingerprint import check_encoding
    old = {"top_k": 32}
    with pytest.raises(AlignTIError, match=r"schema v3, token encoding v1.*dump-teacher"):
        check_encoding(old, _processor("llava15", sp_tokenizer), "c", 3)
    check_encoding(old, _processor("qwen2_vl", sp_tokenizer), "c", 3)
    check_encoding({"encoding_version": 2}, _processor("llava15", sp_tokenizer), "c", 4)
