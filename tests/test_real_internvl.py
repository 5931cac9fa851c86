"""InternVL3's shipped processor (tests/real_tokenizers.internvl3_processor: Qwen2.5-VL's byte-level BPE with
InternVL's image tokens, the -hf chat template, 448-px tiles of 256 tokens, 1 to 12 tiles plus a thumbnail): alignti's
ids are the processor's on the template-rendered conversation (single-turn, multi-turn, two images of other tilings),
each span decodes to exactly its text, and each image's recorded tiles are the processor's."""

import numpy as np
import pytest
from PIL import Image

from alignti.common.conversation import chat_messages, encode
from alignti.common.records import parse_record
from alignti.common.tiles import ImageLayout, layouts_of
from tests.real_tokenizers import SAMPLES, internvl3_processor


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    return internvl3_processor(tmp_path_factory.mktemp("internvl3"))


def test_the_image_tokens_are_internvl3s(proc):
    """The ids the shipped checkpoints use: <img> 151665, </img> 151666, <IMG_CONTEXT> 151667 (transformers'
    InternVLConfig default image_token_id, InternVL3's), <|im_end|> 151645."""
    from transformers import InternVLConfig
    tok = proc.tokenizer
    assert [tok.convert_tokens_to_ids(t) for t in ("<img>", "</img>", "<IMG_CONTEXT>", "<|im_end|>")] == \
        [151665, 151666, InternVLConfig().image_token_id, 151645] == [151665, 151666, 151667, 151645]
    assert proc.image_token_id == 151667 and proc.image_seq_length == 256


@pytest.mark.parametrize("sample", list(SAMPLES))
def test_ids_are_the_processors_and_spans_decode_exactly(proc, sample):
    tok = proc.tokenizer
    rec = parse_record(0, SAMPLES[sample])
    rng = np.random.default_rng(0)
    pics = [Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 256, (300, 900, 3), dtype=np.uint8))][:len(rec.images)]
    image = pics if len(pics) > 1 else pics[0]
    enc = encode(proc, rec, image)
    rendered = proc.apply_chat_template(chat_messages(rec), tokenize=False)
    whole = proc(text=[rendered], images=[pics], return_tensors="pt")
    assert enc.input_ids.tolist() == whole["input_ids"][0].tolist()
    users = [t for r, t in rec.turns if r == "user"]
    answers = [t for r, t in rec.turns if r == "assistant"]
    for (rs, re_), (is_, ie), answer, question in zip(enc.resp_spans, enc.instr_spans, answers, users):
        assert tok.decode(enc.input_ids[rs:re_].tolist()) == answer + "<|im_end|>\n"
        assert tok.decode(enc.input_ids[is_:ie].tolist()) == question
    # the 448-px square is one tile (256 tokens); 900 x 300 is 3 tiles in a row + the thumbnail (1,024 tokens), the
    # processor's own count of tiles
    want = [ImageLayout((16, 16)), ImageLayout((16, 16), (1, 3), True)][:len(pics)]
    assert [b - a for a, b in enc.image_spans] == [lay.n_tokens for lay in want]
    assert whole["pixel_values"].shape[0] == sum(lay.n_tiles for lay in want)
    assert layouts_of(enc.image_grids, enc.image_tiles) == want


def test_the_student_batch_has_the_processors_tiles(proc):
    """The student's pixels (``StudentCollator``'s one image-processor call per batch) are the processor's: the
    shipped image processor has crop_to_patches off and InternVLProcessor turns it on at call time, so a direct call
    gave one tile per image where the cache's ids hold several."""
    import torch
    from alignti.student_train.data import batch_image_inputs
    rng = np.random.default_rng(1)
    a, b = (Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((300, 900), (448, 448)))
    ref = proc(text=["<IMG_CONTEXT>\n<IMG_CONTEXT>\n"], images=[[a, b]], return_tensors="pt")["pixel_values"]
    for per_sample in ([[a, b]], [[a], [b]]):
        got = batch_image_inputs(proc, per_sample)["pixel_values"]
        assert got.shape[0] == ref.shape[0] == 5 and torch.equal(got, ref)
