"""Greedy answers with plain transformers ``generate`` (left-padded batches of encoded prompts)."""

from __future__ import annotations

import torch

from .adapters import ModelAdapter, adapter_class
from .conversation import end_of_turn_ids


def _norm(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def exact_match(pred: str, ref: str) -> bool:
    return _norm(pred) == _norm(ref)


def left_padded(prompts: list, pad_id: int, image_token_id: int | None,
                adapter: type[ModelAdapter]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A ``generate`` batch of encoded prompts (``Encoded`` made with ``generation_prompt=True``), on CPU:
    (input_ids [B, S] int64 left-padded with ``pad_id``, attention_mask [B, S] int64, the image inputs collated by
    the family's ``adapter`` (LLaVA-OneVision pads the patch axis when a one-image and a several-image prompt share
    the batch) plus what the family's ``generate`` needs beside them (``adapter.generation_inputs``: M-RoPE
    families' image-token type ids))."""
    s = max(len(p.input_ids) for p in prompts)
    ids = torch.full((len(prompts), s), pad_id, dtype=torch.long)
    att = torch.zeros(len(prompts), s, dtype=torch.long)
    for b, p in enumerate(prompts):
        n = len(p.input_ids)
        ids[b, s - n:] = torch.as_tensor(p.input_ids, dtype=torch.long)
        att[b, s - n:] = 1
    image_inputs = adapter.collate_image_inputs([p.image_inputs for p in prompts])
    return ids, att, adapter.generation_inputs(ids, image_inputs, image_token_id)


def stop_ids(model, processor=None) -> list[int]:
    """The ids generation stops at: the model's ``generation_config.eos_token_id`` (an int or a list) and the chat
    template's end-of-turn ids (``conversation.end_of_turn_ids``; without ``processor``, none), in that order, each
    once. A base model's generation config names its end-of-text token only (``<|endoftext|>``) while the template
    ends a turn with another (``<|im_end|>``): stopping at the former alone would run past the end of the answer."""
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    turn = end_of_turn_ids(processor) if processor is not None else []
    return list(dict.fromkeys([int(e) for e in eos] + turn))


@torch.no_grad()
def greedy_answers(model, processor, prompts: list, max_new_tokens: int = 8, batch_size: int = 32) -> list[str]:
    """Greedy answers to ``prompts`` (`Encoded` items made with ``generation_prompt=True``): each the text generated
    before the first stop id (``stop_ids``: generation_config's end of sequence and the template's end of turn) or
    pad, at most ``max_new_tokens`` tokens, special tokens skipped."""
    tok = processor.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    device = next(model.parameters()).device
    eos = stop_ids(model, processor)
    answers = []
    model.eval()
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        ids, att, image_inputs = left_padded(chunk, pad, getattr(model.config, "image_token_id", None),
                                             adapter_class(model.config.model_type))
        s = ids.shape[1]
        out = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos or None, pad_token_id=pad,
                             **{k: v.to(device) for k, v in image_inputs.items()})
        for row in out[:, s:]:
            row = row.tolist()
            stops = [j for j, t in enumerate(row) if t in eos or t == pad]
            answers.append(tok.decode(row[:stops[0]] if stops else row, skip_special_tokens=True))
    return answers
