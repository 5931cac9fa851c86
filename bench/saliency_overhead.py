"""Forward with saliency capture at one layer vs plain sdpa forward vs eager output_attentions=True.

Goal: capture <= 1.05x sdpa. Prints a table and a final ratio line. Run: python bench/saliency_overhead.py
"""

from __future__ import annotations

import argparse

from _util import device_name, table, timeit

import torch  # noqa: E402

from alignti.common.adapters import adapter_for  # noqa: E402
from alignti.common.attention import additive, causal_allowed, use_alignti_attention  # noqa: E402
from alignti.common.batch import capture_spec  # noqa: E402


def build(hidden, layers, heads, seq, n_img, batch, device, dtype):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    vc = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                          image_size=32, patch_size=16)
    tc = LlamaConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=seq + 8)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vc, text_config=tc, image_token_id=5)).to(device, dtype).eval()
    ids = torch.randint(10, 1000, (batch, seq), device=device)
    valid = torch.ones(batch, seq, dtype=torch.bool, device=device)
    img_start, instr = 8, (8 + n_img, 8 + n_img + 40)
    b = {"instr_spans": [[instr]] * batch, "n_image_tokens": [n_img] * batch, "image_tok_start": [img_start] * batch}
    return model, ids, valid, b


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--image-tokens", type=int, default=576)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model, ids, valid, b = build(a.hidden, a.layers, a.heads, a.seq, a.image_tokens, a.batch, device, dtype)
    adapter = adapter_for(model)
    mask = additive(causal_allowed(valid), dtype)
    pos = torch.arange(a.seq, device=device)[None].expand(a.batch, -1)
    layer = a.layers // 2

    @torch.no_grad()
    def sdpa():
        adapter.language_model(input_ids=ids, attention_mask=mask, position_ids=pos)

    @torch.no_grad()
    def capture():
        with use_alignti_attention(adapter, capture_spec(adapter, [layer], b, device)):
            adapter.language_model(input_ids=ids, attention_mask=mask, position_ids=pos)

    @torch.no_grad()
    def eager():
        cfg = adapter.text_config
        old, cfg._attn_implementation = cfg._attn_implementation, "eager"
        try:
            adapter.language_model(input_ids=ids, attention_mask=mask, position_ids=pos, output_attentions=True)
        finally:
            cfg._attn_implementation = old

    t_sdpa, t_cap, t_eager = (timeit(f, device, a.repeat) for f in (sdpa, capture, eager))
    print(f"device: {device_name(device)}; LM {a.layers} layers x {a.hidden} hidden, batch {a.batch} x {a.seq} tokens "
          f"({a.image_tokens} image, 40 instruction); capture at layer {layer}")
    print(table([["sdpa (plain)", f"{t_sdpa * 1e3:.1f}", "1.00"],
                 ["sdpa + capture (alignti)", f"{t_cap * 1e3:.1f}", f"{t_cap / t_sdpa:.3f}"],
                 ["eager output_attentions", f"{t_eager * 1e3:.1f}", f"{t_eager / t_sdpa:.3f}"]],
                ["forward", "ms", "x sdpa"]))
    print(f"RATIO capture/sdpa = {t_cap / t_sdpa:.3f} (goal <= 1.05); eager/sdpa = {t_eager / t_sdpa:.3f}")


if __name__ == "__main__":
    main()
