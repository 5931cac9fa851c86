"""Padded batches and the one forward pass every stage uses.

``collate`` turns per-sample dicts (from the encoder or the cache reader) into padded tensors;
``forward`` runs the model with alignti's masks and attention, optionally with TPA branch tokens
and saliency capture, and returns the final hidden states at the positions that matter.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .attention import (Branches, CaptureSpec, additive, branch_position_ids, causal_allowed, make_branches,
                        tree_allowed, use_alignti_attention)
from .branch_states import (fork_branch_hidden, main_pass_in_two, one_embedding_call, prompt_split_at,
                            records_in_main_pass, snapshot_branch_hidden, states_in_main_pass, tpa_pairs)


def collate(samples: list[dict], pad_id: int, adapter_cls) -> dict:
    """samples: dicts with input_ids, response_mask, image_inputs, spans (numpy or lists)."""
    s = max(len(x["input_ids"]) for x in samples)
    ids = torch.full((len(samples), s), pad_id, dtype=torch.long)
    valid = torch.zeros(len(samples), s, dtype=torch.bool)
    resp_pos = []
    for b, x in enumerate(samples):
        n = len(x["input_ids"])
        ids[b, :n] = torch.as_tensor(x["input_ids"], dtype=torch.long)
        valid[b, :n] = True
        resp_pos.append(torch.nonzero(torch.as_tensor(x["response_mask"]).bool()).flatten())
    resp_b = torch.cat([torch.full((len(p),), b, dtype=torch.long) for b, p in enumerate(resp_pos)])
    resp_p = torch.cat(resp_pos)
    return {
        "input_ids": ids, "valid": valid, "resp_pos": resp_pos, "resp_b": resp_b, "resp_p": resp_p,
        "targets": ids[resp_b, resp_p],
        "image_inputs": adapter_cls.collate_image_inputs([x.get("image_inputs") or {} for x in samples]),
        "instr_spans": [x["instr_spans"] for x in samples],
        "n_image_tokens": [int(x["n_image_tokens"]) for x in samples],
        "image_tok_start": [int(x["image_tok_start"]) for x in samples],
        "image_spans": [image_spans_of(x) for x in samples],
    }


def image_token_positions(batch: dict, b: int) -> torch.Tensor:
    """Sequence positions of sample b's image tokens, images in order (the axis saliency and ivak_pos index)."""
    return span_image_positions(batch["input_ids"][b], batch["image_spans"][b])


def span_image_positions(input_ids, spans: list[tuple[int, int]]) -> torch.Tensor:
    """The image-token positions of the image ``spans`` ([start, end) each, images in order) of one sample's
    ``input_ids`` [S]: in each span, the positions holding its first token's id, the family's image token. Every
    position of the span for most families; not the markup between an image's parts: Mistral 3's row ends
    (``[IMG_BREAK]``, text tokens the model puts no image feature on), Idefics3 / SmolVLM's sub-image tags and
    LFM2-VL's tile markers (common/conversation.py ``image_spans``)."""
    if not spans:
        return torch.zeros(0, dtype=torch.long)
    ids = torch.as_tensor(input_ids).cpu()
    return torch.cat([a + torch.nonzero(ids[a:e] == ids[a]).flatten() for a, e in spans]).long()


def image_spans_of(x: dict) -> list[tuple[int, int]]:
    """A sample's per-image [start, end) token spans (one span from image_tok_start where none are recorded)."""
    spans = x.get("image_spans")
    if spans:
        return [(int(a), int(b)) for a, b in spans]
    n = int(x["n_image_tokens"])
    return [(int(x["image_tok_start"]), int(x["image_tok_start"]) + n)] if n else []


def capture_spec(adapter, layers, batch, device) -> CaptureSpec | None:
    """Groups for every (sample, turn) of a padded batch with image tokens; the keys are every image token of the
    sample, image by image (several images: their spans in order)."""
    mods = adapter.attention_modules()
    rows, qs, ks = [], [], []
    for b, instr in enumerate(batch["instr_spans"]):
        keys = image_token_positions(batch, b)
        if not len(keys):
            continue
        for (s, e) in instr:
            rows.append(b)
            qs.append(torch.arange(s, e))
            ks.append(keys)
    if not rows:
        return None
    q_idx, q_valid = _pad(qs)
    k_idx, k_valid = _pad(ks)
    return CaptureSpec({id(mods[layer]): layer for layer in layers}, torch.tensor(rows, device=device),
                       q_idx.to(device), q_valid.to(device), k_idx.to(device), k_valid.to(device))


def _pad(seqs: list[torch.Tensor]):
    n = max(len(s) for s in seqs)
    idx = torch.zeros(len(seqs), n, dtype=torch.long)
    valid = torch.zeros(len(seqs), n, dtype=torch.bool)
    for i, s in enumerate(seqs):
        idx[i, :len(s)] = s
        valid[i, :len(s)] = True
    return idx, valid


def to_device(batch: dict, device) -> dict:
    out = dict(batch)
    for k in ("input_ids", "valid", "resp_b", "resp_p", "targets"):
        out[k] = batch[k].to(device, non_blocking=True)
    out["resp_pos"] = [p.to(device) for p in batch["resp_pos"]]
    out["image_inputs"] = {k: v.to(device, non_blocking=True) for k, v in batch["image_inputs"].items()}
    return out


@dataclass
class ForwardOut:
    resp_hidden: torch.Tensor                 # [N, H] hidden state that predicts each response token
    branch_hidden: torch.Tensor | None        # [N, B, H] hidden state at each branch token
    saliency: dict[int, torch.Tensor]         # layer -> [G, V] instruction-to-image attention
    sal_groups: object | None                 # the CaptureSpec (group layout) or None
    cache: object | None                      # KV cache of the main pass (teacher's branch pass)
    position_ids: torch.Tensor | None = None
    hidden: torch.Tensor | None = None        # [B, S, H] every final hidden state (``keep_hidden``)
    router_aux: torch.Tensor | None = None    # MoE decoders in training: the load-balancing loss (adapter)
    embeds: torch.Tensor | None = None        # [B, S, H] the language model's input embeddings (mask-free TPA)
    prefix: tuple | None = None               # mask-free TPA: the main pass's states after its first segment


def forward(adapter, batch: dict, capture_layers=(), branch_cands: list[torch.Tensor] | None = None,
            use_cache: bool = False, branch_pos: list[torch.Tensor] | None = None,
            keep_hidden: bool = False) -> ForwardOut:
    """One forward of the main sequence (plus branch tokens when ``branch_cands`` is given: per sample
    [n, B] candidate ids for the response positions ``branch_pos`` (default: every response position),
    appended under the tree mask). ``keep_hidden``: every final hidden state of the main sequence too (IVA's
    token-KL form reads the output distribution at image tokens)."""
    model = adapter.model
    dtype = next(model.parameters()).dtype
    ids, valid = batch["input_ids"], batch["valid"]
    pos = adapter.position_ids(ids, valid, batch["image_inputs"])
    s = ids.shape[1]
    br: Branches | None = None
    # hybrid decoders (adapter.tpa_tree_mask False): no branch token enters the sequence; the branches run from the
    # language model's input embeddings of this pass and the model's own states at their positions
    # (branch_states.snapshot_branch_hidden)
    direct = not adapter.tpa_tree_mask and (branch_cands is not None or use_cache)
    if branch_cands is not None and not direct:
        br = make_branches(branch_cands, branch_pos if branch_pos is not None else batch["resp_pos"],
                           branch_cands[0].shape[-1], ids.device)
        allowed = tree_allowed(valid, br)
        ids = torch.cat([ids, br.ids], 1)
        pos = torch.cat([pos, branch_position_ids(pos, br)], -1)
    else:
        allowed = causal_allowed(valid)
    spec = capture_spec(adapter, capture_layers, batch, ids.device) if capture_layers else None
    seen: dict = {}
    where = branch_pos if branch_pos is not None else batch["resp_pos"]
    # hybrid decoders with the TPA positions known before the pass (the student; a forward given candidates): the
    # states at those positions recorded by the main pass itself, the candidates forked from them
    # (branch_states.states_in_main_pass); else the main pass in two segments, the prompt and the rest, so that a
    # later replay (the teacher's branch_pass, or under activation checkpointing) starts after the prompt
    # (branch_states.prompt_split_at says where, and where not)
    pairs = tpa_pairs(where) if direct and branch_cands is not None else []
    record = bool(pairs) and records_in_main_pass(adapter)
    hook = adapter.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(embeds=kwargs.get("inputs_embeds")),
        with_kwargs=True) if direct and not record else None
    split_at = prompt_split_at(adapter, spec, where, s) if direct and not record else None
    try:
        with use_alignti_attention(adapter, spec), (
                states_in_main_pass(adapter, pairs) if record else main_pass_in_two(adapter, split_at)
                if split_at is not None else contextlib.nullcontext({})) as split:
            if record:
                with one_embedding_call(adapter, torch.cat([c.reshape(-1) for c in branch_cands])) as looked_up:
                    out = adapter.forward(ids, batch["image_inputs"], additive(allowed, dtype), pos,
                                          cache=split.cache, use_cache=True)
            else:
                out = adapter.forward(ids, batch["image_inputs"], additive(allowed, dtype), pos,
                                      use_cache=use_cache and not direct)
    finally:
        if hook is not None:
            hook.remove()
    h = out.last_hidden_state
    resp_hidden = h[batch["resp_b"], batch["resp_p"] - 1]
    branch_hidden = None
    if br is not None:
        branch_hidden = h[:, s:][br.valid].view(-1, br.n_branch, h.shape[-1])
    elif record:
        kv, kv_len = split.kv()
        branch_hidden = fork_branch_hidden(adapter, split.states(), kv, kv_len, pairs, list(range(len(pairs))),
                                           branch_cands, pos, cand_embeds=looked_up.get("extra"))
    elif direct and branch_cands is not None:
        branch_hidden = snapshot_branch_hidden(adapter, seen["embeds"], pos, branch_cands, where,
                                               prefix=split.get("prefix"))
    rows = valid if br is None else torch.cat([valid, br.valid], 1)
    return ForwardOut(resp_hidden, branch_hidden, spec.results if spec else {}, spec,
                      _cache_of(out), pos,
                      h[:, :s] if keep_hidden else None, adapter.router_aux_loss(out, rows),
                      seen.get("embeds"), None if record else split.get("prefix"))


def _cache_of(out):
    """The cache a model output returns: ``cache`` (transformers 5), else ``past_key_values`` for a model output
    class without it (reading the deprecated alias where ``cache`` exists but is None warns)."""
    if hasattr(out, "cache"):
        return out.cache
    return getattr(out, "past_key_values", None)


def branch_pass(adapter, batch: dict, main: ForwardOut, cands: list[torch.Tensor],
                branch_pos: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Teacher side: the branch tokens alone, against the KV cache of the main pass (same outputs as
    the one-forward tree layout, without recomputing the main sequence). ``branch_pos``: per sample the
    response positions that get branches (default: all). Returns [N, B, H]."""
    if not adapter.tpa_tree_mask:
        return snapshot_branch_hidden(adapter, main.embeds, main.position_ids, cands,
                                      branch_pos if branch_pos is not None else batch["resp_pos"], prefix=main.prefix)
    model = adapter.model
    dtype = next(model.parameters()).dtype
    valid = batch["valid"]
    s = valid.shape[1]
    br = make_branches(cands, branch_pos if branch_pos is not None else batch["resp_pos"], cands[0].shape[-1],
                       valid.device)
    allowed = tree_allowed(valid, br)[:, s:]
    pos = branch_position_ids(main.position_ids, br)
    with use_alignti_attention(adapter, None):
        out = adapter.forward(br.ids, {}, additive(allowed, dtype), pos, cache=main.cache, use_cache=True)
    h = out.last_hidden_state
    return h[br.valid].view(-1, br.n_branch, h.shape[-1])


def lm_head(adapter) -> torch.nn.Module:
    """The model's LM head as alignti applies it: ``model.lm_head``, wrapped in a SoftcappedHead where the family
    caps its final logits (``ModelAdapter.softcap``: Gemma 4)."""
    cap = adapter.softcap
    if cap:
        from .losses.head import SoftcappedHead
        return SoftcappedHead(adapter.model.lm_head, cap)
    return adapter.model.lm_head


def lm_logits(adapter, hidden: torch.Tensor) -> torch.Tensor:
    return lm_head(adapter)(hidden)


def tpa_layout(resp_pos: list[torch.Tensor], sel: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """TPA positions chosen per sample (``sel[b]``: indices into sample b's response tokens) as the batch's
    response-token rows that get TPA statistics, and per sample the sequence positions whose tokens the
    branches replace (what ``make_branches`` takes)."""
    offsets = torch.tensor([0] + [len(p) for p in resp_pos[:-1]], dtype=torch.long).cumsum(0).tolist()
    rows = torch.cat([s.long() + o for s, o in zip(sel, offsets)])
    return rows, [p[s.to(p.device).long()] for p, s in zip(resp_pos, sel)]
