"""Padded batches and the one forward pass every stage uses.

``collate`` turns per-sample dicts (from the encoder or the cache reader) into padded tensors;
``forward`` runs the model with alignti's masks and attention, optionally with TPA branch tokens
and saliency capture, and returns the final hidden states at the positions that matter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import (Branches, CaptureSpec, additive, branch_position_ids, causal_allowed, make_branches,
                        tree_allowed, use_alignti_attention)


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
    spans = batch["image_spans"][b]
    return torch.cat([torch.arange(a, e) for a, e in spans]) if spans else torch.zeros(0, dtype=torch.long)


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
    # language model's input embeddings of this pass (direct_branch_hidden)
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
    hook = adapter.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(embeds=kwargs.get("inputs_embeds")), with_kwargs=True) if direct else None
    try:
        with use_alignti_attention(adapter, spec):
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
    elif direct and branch_cands is not None:
        branch_hidden = direct_branch_hidden(adapter, seen["embeds"], pos, branch_cands,
                                             branch_pos if branch_pos is not None else batch["resp_pos"])
    rows = valid if br is None else torch.cat([valid, br.valid], 1)
    return ForwardOut(resp_hidden, branch_hidden, spec.results if spec else {}, spec,
                      getattr(out, "cache", None) or getattr(out, "past_key_values", None), pos,
                      h[:, :s] if keep_hidden else None, adapter.router_aux_loss(out, rows),
                      seen.get("embeds"))


def direct_branch_hidden(adapter, embeds: torch.Tensor, position_ids: torch.Tensor, cands: list[torch.Tensor],
                         branch_pos: list[torch.Tensor], max_tokens: int = 1 << 15) -> torch.Tensor:
    """TPA without masks (hybrid decoders): the final hidden state after each candidate, each computed as the model's
    own forward on the real prefix followed by the candidate, never with a branch token in the sequence's state.

    ``embeds`` [B, S, H]: the language model's input embeddings of the main pass (image features merged, as the model
    merges them; differentiable where the main pass is); ``position_ids`` [B, S] or [3, B, S] (M-RoPE); ``cands[b]``
    [n_b, n_branch] candidate ids for the sequence positions ``branch_pos[b]`` [n_b] (the positions of the tokens
    the candidates replace: candidate c at position t is the model on ``prefix[:t] + c`` at position id
    ``position_ids[..., t]``, exactly the tree mask's definition for attention decoders). Every (position, candidate)
    is one row, right-padded (causal layers: padding after a row's last real token changes nothing before it, so no
    mask), run through the language model in chunks of at most ``max_tokens`` padded tokens. Returns [N, n_branch, H]
    in sample then position order (N = sum n_b), as the tree path's ``branch_hidden``."""
    n_branch = cands[0].shape[-1]
    emb_layer = adapter.model.get_input_embeddings()
    mrope = position_ids.dim() == 3
    rows = []  # (b, t, candidate id)
    for b, (c, p) in enumerate(zip(cands, branch_pos)):
        for j, t in enumerate(p.tolist()):
            rows += [(b, t, c[j, i]) for i in range(n_branch)]
    if not rows:
        return embeds.new_zeros(0, n_branch, embeds.shape[-1])
    order = sorted(range(len(rows)), key=lambda r: rows[r][1])  # similar lengths share a chunk
    out: list[torch.Tensor | None] = [None] * len(rows)
    at = 0
    while at < len(order):
        n = 1
        while at + n < len(order) and (n + 1) * (rows[order[at + n]][1] + 1) <= max_tokens:
            n += 1
        chunk = order[at:at + n]
        length = rows[chunk[-1]][1] + 1
        pos = position_ids.new_zeros((3, len(chunk), length) if mrope else (len(chunk), length))
        cand_ids = torch.stack([rows[r][2] for r in chunk]).long().to(embeds.device)
        cand_emb = emb_layer(cand_ids).to(embeds.dtype)
        pieces, last = [], []
        for i, r in enumerate(chunk):
            b, t, _ = rows[r]
            x_i = torch.cat([embeds[b, :t], cand_emb[i:i + 1], embeds.new_zeros(length - t - 1, embeds.shape[-1])])
            pieces.append(x_i)
            if mrope:
                pos[:, i, :t + 1] = position_ids[:, b, :t + 1]
            else:
                pos[i, :t + 1] = position_ids[b, :t + 1]
            last.append(t)
        x = torch.stack(pieces)
        h = adapter.language_model(inputs_embeds=x, position_ids=pos, use_cache=False).last_hidden_state
        h = h[torch.arange(len(chunk), device=h.device), torch.tensor(last, device=h.device)]
        for i, r in enumerate(chunk):
            out[r] = h[i]
        at += n
    return torch.stack(out).view(-1, n_branch, embeds.shape[-1])


def branch_pass(adapter, batch: dict, main: ForwardOut, cands: list[torch.Tensor],
                branch_pos: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Teacher side: the branch tokens alone, against the KV cache of the main pass (same outputs as
    the one-forward tree layout, without recomputing the main sequence). ``branch_pos``: per sample the
    response positions that get branches (default: all). Returns [N, B, H]."""
    if not adapter.tpa_tree_mask:
        return replay_branch_hidden(adapter, main.embeds, main.position_ids, cands,
                                    branch_pos if branch_pos is not None else batch["resp_pos"])
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


@torch.no_grad()
def replay_branch_hidden(adapter, embeds: torch.Tensor, position_ids: torch.Tensor, cands: list[torch.Tensor],
                         branch_pos: list[torch.Tensor]) -> torch.Tensor:
    """Teacher side of TPA without masks (no gradient): ``direct_branch_hidden``'s result, from the model's own cache
    instead of one forward per (position, candidate). Per sample, the prefix runs through the language model in
    segments that end at each selected position t (the decoder's own cache carries the attention KV, the Gated
    DeltaNet recurrent and conv states, LFM2's conv states from one segment to the next); at t the cache is copied,
    repeated to the n_branch candidates (``Cache.reorder_cache``) and the candidates run as one-token continuations on
    the copy, so no branch token enters the sequence's state. Cost: one forward of each prefix up to its last selected
    position (in segments) plus n_branch one-token steps per position. Same arguments and result as
    ``direct_branch_hidden``; ``branch_pos[b]`` ascending (``tpa_layout``'s order)."""
    import copy

    from transformers import DynamicCache
    lm = adapter.language_model
    n_branch = cands[0].shape[-1]
    emb_layer = adapter.model.get_input_embeddings()
    mrope = position_ids.dim() == 3
    rep = torch.zeros(n_branch, dtype=torch.long, device=embeds.device)
    out = []
    for b, (c, p) in enumerate(zip(cands, branch_pos)):
        ts = p.tolist()
        if ts != sorted(ts):
            raise ValueError("replay_branch_hidden needs each sample's branch positions in ascending order")
        cache, prev = DynamicCache(config=lm.config), 0
        for j, t in enumerate(ts):
            if t > prev:
                seg = position_ids[:, b:b + 1, prev:t] if mrope else position_ids[b:b + 1, prev:t]
                lm(inputs_embeds=embeds[b:b + 1, prev:t], position_ids=seg, cache=cache, use_cache=True)
                prev = t
            fork = copy.deepcopy(cache)
            fork.reorder_cache(rep)
            at = (position_ids[:, b:b + 1, t:t + 1].expand(-1, n_branch, -1) if mrope else
                  position_ids[b:b + 1, t:t + 1].expand(n_branch, -1))
            x = emb_layer(c[j].long().to(embeds.device)).to(embeds.dtype)[:, None]
            out.append(lm(inputs_embeds=x, position_ids=at, cache=fork, use_cache=True).last_hidden_state[:, 0])
    if not out:
        return embeds.new_zeros(0, n_branch, embeds.shape[-1])
    return torch.stack(out)


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
