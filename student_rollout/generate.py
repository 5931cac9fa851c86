"""Generation with the student's top-B candidates captured on the way, and per-row seeded sampling.

``generate_rows`` runs plain transformers ``generate`` once per batch. Two additions, both O(B·V) per step and row
(a top-k and a softmax, against a forward of the whole model):

* **Candidates** come from a forward hook on the model: each step's *raw* logits (the model's output at the last
  position, before any logits processor, temperature or top-p) give the B most likely next tokens and their
  probabilities at temperature 1 (``common.onpolicy.top_candidates``). No second pass, and never [steps, V] logits
  in memory (``output_logits=True`` would keep them all).
* **Sampling** is done by a logits processor that draws each row's token with the row's own generator (one uniform
  per row and step, inverse-CDF over the temperature-scaled, top-p-truncated distribution) and hands ``generate``
  a one-hot score, so ``generate`` runs in its greedy mode. A row's tokens depend on its seed alone, not on the
  batch it shares or the process that runs it. Temperature 0 is plain greedy (no processor).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from alignti.common.adapters import adapter_class
from alignti.common.generate import left_padded, stop_ids
from alignti.common.onpolicy import top_candidates


@dataclass
class Generated:
    token_ids: list[int]     # the student's tokens, up to and including the stop id (end of sequence / turn) if it
    #                          stopped
    cand_ids: np.ndarray     # int32 [n, B]: its top-B next tokens before each generated token
    cand_probs: np.ndarray   # float32 [n, B]
    finish: str              # "eos" or "length"


def sample_tokens(scores: torch.Tensor, u: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row of ``scores`` [R, V] for the uniforms ``u`` [R] in [0, 1): softmax(scores / temperature),
    truncated to the smallest set of most likely tokens whose mass reaches ``top_p`` (nucleus sampling, Holtzman
    et al. 2020; the most likely token always stays), renormalised, and inverted at u (inverse-CDF over the tokens
    in descending probability). Returns int64 [R]."""
    probs = torch.softmax(scores.float() / temperature, dim=-1)
    p, order = probs.sort(dim=-1, descending=True)
    cum = p.cumsum(-1)
    if top_p < 1.0:
        p = p * ((cum - p) < top_p)
        cum = p.cumsum(-1)
    target = (u.to(cum.device, cum.dtype) * cum[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cum, target, right=True).clamp_(max=p.shape[-1] - 1)
    # a zero-probability slot (past the nucleus) can only be hit by rounding at the top: step back into the nucleus
    idx = torch.minimum(idx, (p > 0).sum(-1, keepdim=True) - 1)
    return order.gather(-1, idx).squeeze(-1)


class SeededSampler(LogitsProcessor):
    """Samples each row with its own ``torch.Generator`` (CPU, seeded per row) and returns a one-hot score."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        u = torch.tensor([float(torch.rand((), generator=g)) for g in self.gens])
        tok = sample_tokens(scores, u, self.temperature, self.top_p)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, tok.unsqueeze(-1), 0.0)


class CandidateCapture:
    """Forward hook: the top-B of the raw last-position logits of every model call (one call per generated token)."""

    def __init__(self, top_b: int, exclude: int | None):
        self.top_b, self.exclude = top_b, exclude
        self.ids: list[torch.Tensor] = []
        self.probs: list[torch.Tensor] = []

    def __call__(self, module, args, output):
        logits = output.logits if hasattr(output, "logits") else output[0]
        ids, probs = top_candidates(logits[:, -1, :], self.top_b, self.exclude)
        self.ids.append(ids.to(torch.int32))
        self.probs.append(probs)


@torch.no_grad()
def generate_rows(model, prompts: list, seeds: list[int], *, temperature: float, top_p: float, max_new_tokens: int,
                  top_b: int, pad_id: int, image_token_id: int | None, eos_ids: list[int] | None = None,
                  min_new_tokens: int | None = None) -> list[Generated]:
    """One ``generate`` call for the encoded prompts (``Encoded`` with ``generation_prompt=True``; left-padded), one
    seed per prompt. ``eos_ids``: the ids that end an answer (the rollout passes ``common.generate.stop_ids`` with
    the processor: generation_config's end of sequence and the template's end of turn; None: generation_config's
    alone). Returns, per prompt, its tokens (through the first of those ids: ``finish`` "eos"; else cut at
    ``max_new_tokens``: "length") and the student's top-B candidates before each of them. ``min_new_tokens``: no
    end-of-sequence before that many (benchmarks)."""
    device = next(model.parameters()).device
    eos = stop_ids(model) if eos_ids is None else list(eos_ids)
    ids, att, image_inputs = left_padded(prompts, pad_id, image_token_id, adapter_class(model.config.model_type))
    s = ids.shape[1]
    capture = CandidateCapture(top_b, image_token_id)
    processors = LogitsProcessorList([SeededSampler(seeds, temperature, top_p)] if temperature > 0 else [])
    hook = model.register_forward_hook(capture)
    try:
        out = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1, repetition_penalty=1.0, eos_token_id=eos or None,
                             pad_token_id=pad_id, logits_processor=processors,
                             # an image placeholder is no answer token (a prompt-only slot; its candidates are
                             # skipped too): never sampled, so a generation re-runs as a plain forward
                             suppress_tokens=[image_token_id] if image_token_id is not None else None,
                             **({"min_new_tokens": min_new_tokens} if min_new_tokens else {}),
                             **{k: v.to(device) for k, v in image_inputs.items()})
    finally:
        hook.remove()
    gen = out[:, s:].cpu()
    cand_ids = torch.stack(capture.ids, 1).cpu().numpy()      # [R, steps, B]
    cand_probs = torch.stack(capture.probs, 1).float().cpu().numpy()
    res = []
    eos_set = set(eos)
    for b in range(len(prompts)):
        row = gen[b].tolist()
        stop = next((j for j, t in enumerate(row) if t in eos_set), None)
        n = len(row) if stop is None else stop + 1
        res.append(Generated(row[:n], cand_ids[b, :n], cand_probs[b, :n], "length" if stop is None else "eos"))
    return res


@torch.no_grad()
def teacher_forced_candidates(adapter, batch: dict, top_b: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The student's top-B candidates at every response token of a collated batch (one teacher-forced forward,
    the hidden state before each response token through the LM head). Per sample (ids int32 [n, B], probs
    float32 [n, B])."""
    from alignti.common.batch import forward, lm_head, to_device
    device = next(adapter.model.parameters()).device
    batch = to_device(batch, device)
    out = forward(adapter, batch)
    head = lm_head(adapter)
    ids, probs = [], []
    for i in range(0, out.resp_hidden.shape[0], 1024):  # [1024, V] logits at a time
        j, p = top_candidates(head(out.resp_hidden[i:i + 1024]), top_b, adapter.image_token_id)
        ids.append(j)
        probs.append(p)
    ids_all = torch.cat(ids).to(torch.int32).cpu()
    probs_all = torch.cat(probs).float().cpu()
    counts = [len(p) for p in batch["resp_pos"]]
    return [(a.numpy(), b.numpy()) for a, b in zip(torch.split(ids_all, counts), torch.split(probs_all, counts))]
