"""Idefics3 / SmolVLM: an image split into a grid of sub-images plus a global image, each framed by markup tokens
(<fake_token_around_image>, <row_r_col_c>, <global-img>, line breaks) in the text. The family's end-to-end checks
against the model's own forward are the conformance suite's (tests/test_conformance.py); here the cases its demo
scenes (48 px: 2 x 2 sub-images) do not reach."""

from __future__ import annotations

import numpy as np
from PIL import Image

from alignti.common.batch import span_image_positions
from alignti.common.conversation import encode
from alignti.common.records import parse_record


def _wide(proc, width: int, height: int):
    item = {"id": "wide", "image": "w.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "red"}]}
    return encode(proc, parse_record(0, item), Image.new("RGB", (width, height), (200, 20, 20)))


def test_a_split_image_has_no_one_grid():
    """A 72 x 24 image at longest edge 72 is split into 1 x 3 sub-images of 24 px plus the global image, 4 image
    tokens each: 16, a square count, which is no 4 x 4 grid of the image (IVA across image grids must refuse it, not
    resample the map as one). The processor's own ids and the image's one span holding its 16 image tokens."""
    from alignti.demo.kit import build_processor, build_tokenizer
    tok = build_tokenizer("smolvlm")
    proc = build_processor(tok, "smolvlm")
    proc.image_processor.size = {"longest_edge": 72}
    enc = _wide(proc, 72, 24)
    ids = enc.input_ids
    # the span runs from the first sub-image's first image token to the global image's last
    a, e = enc.image_spans[0]
    marks = tok.convert_ids_to_tokens([int(i) for i in ids[a - 1:e]])
    assert [m for m in marks if m.startswith(("<row_", "<global"))] == [
        "<row_1_col_1>", "<row_1_col_2>", "<row_1_col_3>", "<global-img>"]
    assert enc.n_image_tokens == 16 and len(enc.image_spans) == 1
    pos = span_image_positions(ids, enc.image_spans).numpy()
    assert np.array_equal(pos, np.flatnonzero(ids == tok.convert_tokens_to_ids("<image>")))
    assert enc.image_grids == [(0, 0)]
    # an image no larger than a sub-image is not split: the global image alone, one run of 2 x 2 tokens
    proc.image_processor.size = {"longest_edge": 24}
    small = _wide(proc, 24, 24)
    assert small.n_image_tokens == 4 and small.image_grids == [(2, 2)]


def test_ids_at_the_shipped_image_settings():
    """SmolVLM-256M's shipped image settings (preprocessor_config.json: longest edge 2048, 512-px sub-images;
    image_seq_len 64: (512 / 16)^2 / 4^2, as public reimplementations read them from its files; its tokenizer.json has
    no public copy to test against, so the vocabulary here is the kit's) on a 1536 x 1024 photo: 3 x 4 sub-images plus the global
    image, 13 x 64 = 832 image tokens with row breaks between the rows. alignti's ids are the processor's own on the
    template-rendered text, the one span holds all 832, and the question and answer spans are the message texts."""
    from alignti.demo.kit import build_processor, build_tokenizer
    tok = build_tokenizer("smolvlm")
    proc = build_processor(tok, "smolvlm")
    proc.image_processor.size = {"longest_edge": 2048}
    proc.image_processor.max_image_size = {"longest_edge": 512}
    proc.image_seq_len = 64
    enc = _wide(proc, 1536, 1024)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    text = proc.apply_chat_template(msgs, tokenize=False)
    want = proc(text=[text], images=[[Image.new("RGB", (1536, 1024), (200, 20, 20))]])["input_ids"][0]
    assert enc.input_ids.tolist() == list(want)
    assert enc.n_image_tokens == 13 * 64 and len(enc.image_spans) == 1
    assert tok.decode(enc.input_ids[slice(*enc.instr_spans[0])].tolist()) == "What colour is it?"
    assert tok.decode(enc.input_ids[slice(*enc.resp_spans[0])].tolist(), skip_special_tokens=True).strip() == "red"
