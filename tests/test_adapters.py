"""Each family adapter: image tokens, instruction spans, position ids, reload with from_pretrained."""

import numpy as np
import pytest
import torch

from alignti.common.adapters import DEMO_FAMILIES, FAMILIES, adapter_for
from alignti.common.batch import span_image_positions
from alignti.common.models import load_vlm
from tests.helpers import tiny


@pytest.mark.parametrize("family", DEMO_FAMILIES)
def test_adapter_spans_positions_and_reload(family, tmp_path):
    model, proc, adapter, enc = tiny(family, tmp_path, n_images=1, multi_turn_every=2)
    n_image = FAMILIES[family].kit.image_tokens
    pos_dims = 3 if hasattr(model.model, "get_rope_index") else 2  # the model's own M-RoPE index: [3, B, S]
    assert model.config.model_type in adapter.model_types
    tok = proc.tokenizer
    for e in enc:
        img = e.input_ids[span_image_positions(e.input_ids, e.image_spans).numpy()]
        assert e.image_tok_start == e.image_spans[0][0] and len(e.image_spans) == 1
        assert e.n_image_tokens == n_image and (img == adapter.image_token_id).all()
        assert (e.input_ids == adapter.image_token_id).sum() == n_image
        first_q = tok.decode(e.input_ids[slice(*e.instr_spans[0])].tolist())
        assert first_q.rstrip("?.").split()[0] in ("What", "How", "Is", "Where", "Describe")
        answer = tok.decode(e.input_ids[slice(*e.resp_spans[-1])].tolist(), skip_special_tokens=True)
        assert answer.strip()
    ids = torch.as_tensor(enc[0].input_ids)[None].long()
    pos = adapter.position_ids(ids, torch.ones_like(ids, dtype=torch.bool), enc[0].image_inputs)
    assert pos.dim() == pos_dims and pos.shape[-1] == ids.shape[1]
    model.save_pretrained(tmp_path / "m")
    proc.save_pretrained(tmp_path / "m")
    m2, p2 = load_vlm(str(tmp_path / "m"), torch.device("cpu"))
    assert type(m2) is type(model) and adapter_for(m2).num_layers == adapter.num_layers
    assert p2.tokenizer.get_vocab() == tok.get_vocab() and p2.chat_template


def test_unsupported_family_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel
    with pytest.raises(NotImplementedError, match="gpt2"):
        adapter_for(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10)))


def test_mistral3_images_of_different_sizes_in_one_batch(tmp_path):
    """Mistral 3 at native resolution: images keep their aspect ratio, so a batch holds images of different sizes
    (pixel_values padded to the largest, as the image processor pads the images of one call) and each image is
    rows of [IMG] closed by [IMG_BREAK] / [IMG_END]. The batch's top-k log-probs equal the model's own forward on each
    sample alone, each image's grid (rows, cols) is the processor's image size over the merged patch, and its saliency
    columns are its [IMG] tokens."""
    from PIL import Image

    from alignti.common.batch import forward, lm_logits
    from alignti.common.conversation import encode
    from alignti.common.records import Record
    from alignti.demo import kit
    from tests.helpers import batch_of
    tok = kit.build_tokenizer("mistral3")
    proc = kit.build_processor(tok, "mistral3")
    model = kit.build_model("mistral3", tok, kit.TEACHER, 0).float().eval()
    adapter = adapter_for(model)
    sizes = [[(48, 32)], [(32, 48), (16, 48)]]  # (width, height) per image of each sample
    encs, own = [], []
    for i, whs in enumerate(sizes):
        imgs = [Image.new("RGB", wh, (40 * i + 20, 200 - 60 * k, 90)) for k, wh in enumerate(whs)]
        rec = Record(i, f"s{i}", [f"{i}_{k}.png" for k in range(len(imgs))],
                     [("user", "What colour is it?"), ("assistant", "red")], image_at={0: [0] * len(imgs)})
        enc = encode(proc, rec, imgs if len(imgs) > 1 else imgs[0])
        encs.append(enc)
        out = proc(text=[proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}] * len(imgs) + [
            {"type": "text", "text": "What colour is it?"}]}, {"role": "assistant", "content": [
                {"type": "text", "text": "red"}]}], tokenize=False)], images=[imgs], return_tensors="pt")
        assert enc.input_ids.tolist() == out["input_ids"][0].tolist()
        with torch.no_grad():
            own.append(torch.log_softmax(model(**out).logits[0], -1))
        # grid: the resized image's size over 16 px (8-px patches merged 2x2); rows end in [IMG_BREAK] / [IMG_END]
        want = [(int(h) // 16, int(w) // 16) for h, w in out["image_sizes"].tolist()]
        assert enc.image_grids == want and len(enc.image_spans) == len(imgs)
        for (a, e), (r, c) in zip(enc.image_spans, want):
            toks = tok.convert_ids_to_tokens(enc.input_ids[a:e + 1].tolist())
            assert toks == ((["[IMG]"] * c + ["[IMG_BREAK]"]) * r)[:-1] + ["[IMG_END]"]
        cols = span_image_positions(enc.input_ids, enc.image_spans)
        assert (enc.input_ids[cols.numpy()] == adapter.image_token_id).all()
        assert len(cols) == enc.n_image_tokens == sum(r * c for r, c in want)
    assert encs[0].image_inputs["pixel_values"].shape[-2:] != encs[1].image_inputs["pixel_values"].shape[-2:]
    batch = batch_of(adapter, proc, encs)
    with torch.no_grad():
        h = forward(adapter, batch, keep_hidden=True).hidden
        lp = torch.log_softmax(lm_logits(adapter, h), -1)
    for b, enc in enumerate(encs):
        n = len(enc.input_ids)
        torch.testing.assert_close(lp[b, :n], own[b], rtol=0, atol=1e-5)


def test_pixtral_processor_without_torchvision_is_the_librarys_own_class():
    """Mistral 3's processor in an environment without torchvision: transformers' own PixtralProcessor code (its
    module file, unmodified), whose one torchvision-only import (``get_resize_output_image_size``) is the PIL image
    processor's function of that name; the torchvision module's entry is not left behind in ``sys.modules``."""
    import inspect
    import sys

    import transformers
    from alignti.common.models import PIL_STAND_INS, _torchvision_available, processor_class
    cls = processor_class("PixtralProcessor")
    module, torchvision_module, pil_module = PIL_STAND_INS["PixtralProcessor"]
    if _torchvision_available():
        assert cls is transformers.PixtralProcessor
        return
    assert cls.__module__ == module and inspect.getsourcefile(cls).endswith("pixtral/processing_pixtral.py")
    assert sys.modules[module].get_resize_output_image_size is sys.modules[pil_module].get_resize_output_image_size
    assert torchvision_module not in sys.modules
    with pytest.raises(ImportError, match="(?i)torchvision"):
        transformers.PixtralProcessor()
