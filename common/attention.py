"""Attention-side machinery shared by the teacher dump and the student trainer.

* ``alignti`` attention implementation (registered with transformers' ``AttentionInterface``):
  sdpa for every layer, plus, for the capture layers only, the softmax of the instruction-query x
  all-key block, from which the instruction-to-image attention alpha (METHOD.md section 2) is
  taken. Nothing else is materialised: no eager attention, no attention maps of other layers.
* Additive 4-D masks built here for every forward: padding, causal, and the tree mask that lets
  TPA branch tokens sit at the position of y_t, see only y_<t and themselves, and be seen by
  nobody (METHOD.md section 4).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

IMPL_NAME = "alignti"


@dataclass
class CaptureSpec:
    """Which instruction queries and image keys to take the attention of, per group.

    A group is one (sample, assistant turn): ``group_batch[g]`` is its row in the batch,
    ``q_idx/q_valid`` [G, Q] the instruction token positions, ``k_idx/k_valid`` [G, V] the image token
    positions. ``results[layer]`` receives alpha [G, V] (rows sum to 1 over valid image tokens).
    """
    layers: dict[int, int]  # id(attention module) -> layer index
    group_batch: torch.Tensor
    q_idx: torch.Tensor
    q_valid: torch.Tensor
    k_idx: torch.Tensor
    k_valid: torch.Tensor
    results: dict[int, torch.Tensor] = field(default_factory=dict)


_ACTIVE: contextvars.ContextVar[CaptureSpec | None] = contextvars.ContextVar("alignti_capture", default=None)
# text configs currently routed through alignti attention (for forward_context)
_ROUTED: contextvars.ContextVar[tuple] = contextvars.ContextVar("alignti_routed", default=())


def instruction_to_image_attention(module, query, key, attention_mask, scaling, spec: CaptureSpec) -> torch.Tensor:
    """alpha [G, V]: softmax attention of the instruction queries over all keys, image columns kept,
    averaged over heads and queries, renormalised over the image tokens. Differentiable."""
    n_rep = query.shape[1] // key.shape[1]
    g = spec.group_batch
    hq, d = query.shape[1], query.shape[-1]
    q = query[g].gather(2, spec.q_idx[:, None, :, None].expand(-1, hq, -1, d)).float()   # [G,H,Q,D]
    k = repeat_kv(key, n_rep)[g].float()                                                 # [G,H,K,D]
    scores = torch.matmul(q, k.transpose(-1, -2)) * (scaling if scaling is not None else d ** -0.5)
    if attention_mask is not None:
        m = attention_mask[g]                                                            # [G,1,S,K]
        m = m.gather(2, spec.q_idx[:, None, :, None].expand(-1, m.shape[1], -1, m.shape[-1]))
        scores = scores + m.float()
    probs = torch.softmax(scores, dim=-1)
    img = probs.gather(-1, spec.k_idx[:, None, None, :].expand(-1, hq, probs.shape[2], -1))  # [G,H,Q,V]
    per_q = head_mean(module, img)                                                       # [G,Q,V]
    w = spec.q_valid.to(per_q.dtype)
    alpha = (per_q * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1)
    alpha = alpha * spec.k_valid.to(alpha.dtype)
    return alpha / alpha.sum(-1, keepdim=True).clamp_min(1e-30)


def head_group(module):
    """The process group over which ``module``'s attention heads are sharded (transformers' tensor parallelism:
    q_proj is a column-sharded DTensor, each rank computes its own heads), or None when this rank has them all."""
    weight = getattr(getattr(module, "q_proj", None), "weight", None)
    mesh = getattr(weight, "device_mesh", None)
    if mesh is None or mesh.size() == 1:
        return None
    return mesh.get_group()


def head_mean(module, per_head: torch.Tensor) -> torch.Tensor:
    """The mean of ``per_head`` [G, H_local, ...] over all of the attention's heads: with the heads sharded over a
    tensor-parallel group (the teacher's dump), this rank's sum is all-reduced over the group before dividing by
    the total head count, so every rank of the replica gets the whole replica's average (the sum's order differs
    from one rank's: within a few fp32 ulp)."""
    group = head_group(module)
    if group is None:
        return per_head.mean(1)
    import torch.distributed as tdist
    from torch.distributed._functional_collectives import all_reduce
    total = all_reduce(per_head.sum(1), "sum", group)
    return total / (per_head.shape[1] * tdist.get_world_size(group))


@dataclass
class ForkRows:
    """One-token continuations from shared prefixes (TPA without masks: common/branch_states.py
    ``fork_branch_hidden``): row r of the batch is one token that attends to its sample ``sample[r]``'s prefix keys
    and values before position ``t[r]`` and to itself. ``kv[layer_idx]`` = (keys, values) [B, kv_heads, S, head_dim]
    of the samples' prefixes (the main pass's cache); rows of one sample are consecutive."""
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]
    sample: torch.Tensor  # [R]
    t: torch.Tensor       # [R]


_FORK: contextvars.ContextVar[ForkRows | None] = contextvars.ContextVar("alignti_fork", default=None)


@contextlib.contextmanager
def fork_rows(rows: ForkRows):
    """Within: ``alignti_attention`` runs each layer of ``rows.kv`` as ``fork_attention``."""
    token = _FORK.set(rows)
    try:
        yield rows
    finally:
        _FORK.reset(token)


def fork_attention(module, query, key, value, rows: ForkRows, dropout: float = 0.0, scaling=None) -> torch.Tensor:
    """softmax(q [K_prefix; k] / sqrt(d)) [V_prefix; v] for each one-token row, the prefix of its own sample masked
    to the keys before its position, without copying a prefix per row: per sample one product of its rows' queries
    with its prefix keys (GQA: the query heads of one key head together). The same attention as sdpa over the row's
    concatenated keys under that mask (fp32 softmax, rounded differently). ``query`` [R, heads, 1, d], ``key`` /
    ``value`` [R, kv_heads, 1, d] (the rows' own). Returns [R, 1, heads, d], as transformers' attention functions."""
    keys, values = rows.kv[module.layer_idx]
    n_rows, heads, _, d = query.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    rep = heads // kv_heads
    scale = scaling if scaling is not None else d ** -0.5
    samples, counts = torch.unique_consecutive(rows.sample, return_counts=True)
    cols = torch.arange(length, device=query.device)
    out, lo = [], 0
    for b, n in zip(samples.tolist(), counts.tolist()):
        q = query[lo:lo + n, :, 0].reshape(n, kv_heads, rep, d).permute(1, 0, 2, 3)      # [kvh, n, rep, d]
        k_own = key[lo:lo + n, :, 0].transpose(0, 1)[:, :, None]                          # [kvh, n, 1, d]
        v_own = value[lo:lo + n, :, 0].transpose(0, 1)[:, :, None]
        prefix = (q.reshape(kv_heads, n * rep, d) @ keys[b].transpose(-1, -2)).view(kv_heads, n, rep, length)
        hidden = (cols[None] >= rows.t[lo:lo + n, None].to(cols.device))[None, :, None]  # [1, n, 1, S]
        scores = torch.cat([prefix.float().masked_fill(hidden, float("-inf")),
                            (q * k_own).sum(-1, keepdim=True).float()], -1) * scale
        p = torch.softmax(scores, -1).to(query.dtype)
        if dropout:
            p = torch.nn.functional.dropout(p, dropout, training=True)
        o = (p[..., :length].reshape(kv_heads, n * rep, length) @ values[b]).view(kv_heads, n, rep, d)
        o = o + p[..., length:] * v_own
        out.append(o.permute(1, 0, 2, 3).reshape(n, heads, d))
        lo += n
    return torch.cat(out)[:, None]


def alignti_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    rows = _FORK.get()
    if rows is not None and getattr(module, "layer_idx", None) in rows.kv:
        return fork_attention(module, query, key, value, rows, dropout=dropout, scaling=scaling), None
    out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    spec = _ACTIVE.get()
    if spec is not None and id(module) in spec.layers:
        spec.results[spec.layers[id(module)]] = instruction_to_image_attention(
            module, query, key, attention_mask, scaling, spec)
    return out


AttentionInterface.register(IMPL_NAME, alignti_attention)


@contextlib.contextmanager
def use_alignti_attention(adapter, spec: CaptureSpec | None = None):
    """Route the decoder's attention through ``alignti_attention`` (and capture if ``spec``)."""
    cfg = adapter.text_config
    old = cfg._attn_implementation
    cfg._attn_implementation = IMPL_NAME
    token = _ACTIVE.set(spec)
    routed = _ROUTED.set(_ROUTED.get() + (cfg,))
    try:
        yield spec
    finally:
        _ROUTED.reset(routed)
        _ACTIVE.reset(token)
        cfg._attn_implementation = old


def forward_context():
    """The capture spec and attention routing active now, as a context manager factory that re-enters them:
    a checkpointed layer's recompute in backward runs under what its forward saw (the forward's own context
    has been left by then), so it computes and saves the same tensors."""
    spec, configs = _ACTIVE.get(), _ROUTED.get()

    @contextlib.contextmanager
    def reenter():
        token = _ACTIVE.set(spec)
        old = [(c, c._attn_implementation) for c in configs]
        for c in configs:
            c._attn_implementation = IMPL_NAME
        try:
            yield
        finally:
            for c, impl in old:
                c._attn_implementation = impl
            _ACTIVE.reset(token)

    return reenter


def captures_in(module: torch.nn.Module) -> bool:
    """Whether the active capture spec records saliency inside ``module`` (a decoder layer)."""
    spec = _ACTIVE.get()
    return spec is not None and any(id(m) in spec.layers for m in module.modules())


# --- masks ----------------------------------------------------------------------------------
def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def causal_allowed(valid: torch.Tensor) -> torch.Tensor:
    """[B,S,S] bool: causal over real tokens; a padding row sees only itself (no empty softmax)."""
    s = valid.shape[1]
    ar = torch.arange(s, device=valid.device)
    allowed = (ar[None, :, None] >= ar[None, None, :]) & valid[:, None, :] & valid[:, :, None]
    return allowed | torch.eye(s, dtype=torch.bool, device=valid.device)[None]


@dataclass
class Branches:
    """Layout of TPA branch tokens appended after the (padded) main sequence.

    Slot j of row b is branch ``j % n_branch`` of the ``j // n_branch``-th response token of sample b.
    """
    ids: torch.Tensor        # [B, NB] candidate token ids
    at: torch.Tensor         # [B, NB] position (index in the main sequence) of the y_t it replaces
    valid: torch.Tensor      # [B, NB]
    n_branch: int


def make_branches(cand_ids: list[torch.Tensor], resp_pos: list[torch.Tensor], n_branch: int, device) -> Branches:
    """cand_ids[b]: [n_b, n_branch] candidates per response token; resp_pos[b]: [n_b] their positions."""
    nb = max(1, max(len(p) for p in resp_pos)) * n_branch
    bsz = len(resp_pos)
    ids = torch.zeros(bsz, nb, dtype=torch.long)
    at = torch.zeros(bsz, nb, dtype=torch.long)
    valid = torch.zeros(bsz, nb, dtype=torch.bool)
    for b, (c, p) in enumerate(zip(cand_ids, resp_pos)):
        n = len(p) * n_branch
        ids[b, :n] = c.reshape(-1).long()
        at[b, :n] = p.long().repeat_interleave(n_branch)
        valid[b, :n] = True
    return Branches(ids.to(device), at.to(device), valid.to(device), n_branch)


def tree_allowed(valid: torch.Tensor, br: Branches) -> torch.Tensor:
    """[B, S+NB, S+NB] bool: the main causal mask, plus branch rows that see the real prefix before
    the token they replace and themselves. No main token sees a branch token."""
    bsz, s = valid.shape
    nb = br.ids.shape[1]
    allowed = torch.zeros(bsz, s + nb, s + nb, dtype=torch.bool, device=valid.device)
    allowed[:, :s, :s] = causal_allowed(valid)
    ar = torch.arange(s, device=valid.device)
    allowed[:, s:, :s] = (ar[None, None, :] < br.at[:, :, None]) & valid[:, None, :] & br.valid[:, :, None]
    allowed[:, s:, s:] = torch.eye(nb, dtype=torch.bool, device=valid.device)[None]
    return allowed


def branch_position_ids(position_ids: torch.Tensor, br: Branches) -> torch.Tensor:
    """Position ids of the branch tokens: those of the token each one replaces (1-D or M-RoPE)."""
    if position_ids.dim() == 3:  # [3, B, S]
        return position_ids.gather(2, br.at[None].expand(position_ids.shape[0], -1, -1))
    return position_ids.gather(1, br.at)
