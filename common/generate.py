"""Greedy answers with plain transformers ``generate`` (left-padded batches of encoded prompts)."""

from __future__ import annotations

import torch

from .adapters import ModelAdapter


def _norm(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def exact_match(pred: str, ref: str) -> bool:
    return _norm(pred) == _norm(ref)


@torch.no_grad()
def greedy_answers(model, processor, prompts: list, max_new_tokens: int = 8, batch_size: int = 32) -> list[str]:
    """prompts: `Encoded` items made with ``generation_prompt=True``."""
    tok = processor.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    device = next(model.parameters()).device
    eos = model.generation_config.eos_token_id
    answers = []
    model.eval()
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        s = max(len(p.input_ids) for p in chunk)
        ids = torch.full((len(chunk), s), pad, dtype=torch.long)
        att = torch.zeros(len(chunk), s, dtype=torch.long)
        for b, p in enumerate(chunk):
            n = len(p.input_ids)
            ids[b, s - n:] = torch.as_tensor(p.input_ids, dtype=torch.long)
            att[b, s - n:] = 1
        image_inputs = ModelAdapter.collate_image_inputs([p.image_inputs for p in chunk])
        if "image_grid_thw" in image_inputs:  # M-RoPE: without the image tokens' type ids generate gives them text positions
            image_inputs["mm_token_type_ids"] = (ids == int(model.config.image_token_id)).int()
        out = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos, pad_token_id=pad,
                             **{k: v.to(device) for k, v in image_inputs.items()})
        for row in out[:, s:]:
            row = row.tolist()
            stops = [j for j, t in enumerate(row) if t in ([eos] if isinstance(eos, int) else list(eos or [])) or t == pad]
            answers.append(tok.decode(row[:stops[0]] if stops else row, skip_special_tokens=True))
    return answers
