"""Saliency capture equals eager attention; branch tokens equal separate substituted forwards."""

import pytest
import torch

from alignti.common.attention import additive, causal_allowed
from alignti.common.batch import branch_pass, forward, lm_logits
from alignti.common.adapters import DEMO_FAMILIES as FAMILIES
from tests.helpers import batch_of, tiny


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_equals_eager_output_attentions(family, tmp_path):
    model, proc, adapter, enc = tiny(family, tmp_path)
    batch = batch_of(adapter, proc, enc)
    assert any(len(s) > 1 for s in batch["instr_spans"]), "needs a multi-turn sample"
    layers = adapter.saliency_layers()  # a sliding-window layer may keep an instruction from every image token
    with torch.no_grad():
        got = forward(adapter, batch, capture_layers=layers)
        cfg = adapter.text_config
        old, cfg._attn_implementation = cfg._attn_implementation, "eager"
        try:
            pos = adapter.position_ids(batch["input_ids"], batch["valid"], batch["image_inputs"])
            mask = additive(causal_allowed(batch["valid"]), torch.float32)
            if hasattr(adapter, "layer_masks"):  # per-layer-type masks (Gemma 3; the model's own rules are held by
                mask = adapter.layer_masks(batch["input_ids"], mask, pos)  # tests/test_conformance.py)
            ref = adapter.model.model(input_ids=batch["input_ids"], position_ids=pos, output_attentions=True,
                                      attention_mask=mask, **batch["image_inputs"])
        finally:
            cfg._attn_implementation = old
    # the model returns one map per softmax-attention layer (a hybrid decoder's linear / conv layers have none)
    with_attn = [i for i, m in enumerate(adapter.attention_modules()) if m is not None]
    assert len(ref.attentions) == len(with_attn)
    for layer in layers:
        att = ref.attentions[with_attn.index(layer)]
        rows = []
        for b, spans in enumerate(batch["instr_spans"]):
            # the sample's image tokens (Idefics3 / SmolVLM: not one run, markup between the sub-images)
            cols = torch.nonzero(batch["input_ids"][b] == adapter.image_token_id).flatten()
            assert len(cols) == batch["n_image_tokens"][b]
            for (qs, qe) in spans:
                a = att[b, :, qs:qe][:, :, cols].mean(0).mean(0)
                rows.append(a / a.sum())
        torch.testing.assert_close(got.saliency[layer], torch.stack(rows), atol=1e-5, rtol=1e-5)
        assert torch.allclose(got.saliency[layer].sum(-1), torch.ones(len(rows)), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_branch_tokens_equal_separate_forwards(family, tmp_path):
    model, proc, adapter, enc = tiny(family, tmp_path, n_images=2)
    batch = batch_of(adapter, proc, enc)
    n_branch = 3
    g = torch.Generator().manual_seed(0)
    cands = [torch.randint(10, 200, (len(p), n_branch), generator=g) for p in batch["resp_pos"]]
    with torch.no_grad():
        tree = forward(adapter, batch, branch_cands=cands)
        main_only = forward(adapter, batch)
        tree_logits = lm_logits(adapter, tree.branch_hidden)
        # the main sequence does not see the branch tokens
        torch.testing.assert_close(tree.resp_hidden, main_only.resp_hidden, atol=1e-5, rtol=1e-5)
        row = 0
        for b, e in enumerate(enc):
            ids = torch.as_tensor(e.input_ids, dtype=torch.long)
            for t, p in enumerate(batch["resp_pos"][b].tolist()):
                for j in range(n_branch):
                    seq = torch.cat([ids[:p], cands[b][t, j:j + 1]])[None]
                    valid = torch.ones_like(seq, dtype=torch.bool)
                    pos = adapter.position_ids(seq, valid, e.image_inputs)
                    out = adapter.forward(seq, e.image_inputs, additive(causal_allowed(valid), torch.float32), pos)
                    ref = lm_logits(adapter, out.last_hidden_state[0, -1])
                    torch.testing.assert_close(tree_logits[row + t, j], ref, atol=1e-4, rtol=1e-4)
            row += len(batch["resp_pos"][b])
        # the teacher's KV-cached branch pass gives the same outputs as the one-forward tree layout
        main = forward(adapter, batch, use_cache=True)
        cached = branch_pass(adapter, batch, main, cands)
        torch.testing.assert_close(cached, tree.branch_hidden, atol=1e-4, rtol=1e-4)


def test_student_saliency_is_differentiable(tmp_path):
    model, proc, adapter, enc = tiny("llava", tmp_path, n_images=1)
    batch = batch_of(adapter, proc, enc)
    out = forward(adapter, batch, capture_layers=[1])
    out.saliency[1][:, 0].sum().backward()
    grads = [p.grad for p in adapter.attention_modules()[1].q_proj.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
