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
        # the image's span holds its image tokens (Idefics3 / SmolVLM: with the sub-images' markup between them)
        img = span_image_positions(e.input_ids, e.image_spans).numpy()
        assert e.n_image_tokens == n_image == len(img) and img[0] == e.image_tok_start
        assert (img == np.flatnonzero(e.input_ids == adapter.image_token_id)).all()
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
