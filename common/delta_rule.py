"""The gated delta rule (Gated DeltaNet's linear attention: Qwen3.5) as TPA without masks needs it
(common/branch_states.py): chunked, with the recurrent state after any chosen tokens as well as the final one (what
lets a hybrid student's TPA read the states at its TPA positions from its own main pass instead of replaying the
prefix: ``states_in_main_pass``), and one token per row from a start state shared by several rows (the candidates of
one TPA position: ``fork_branch_hidden``).

``chunk_gated_delta_rule`` is transformers' ``torch_chunk_gated_delta_rule`` (models/qwen3_5/modeling_qwen3_5.py,
transformers 5.x: the UT transform within chunks of 64 tokens, a sequential scan over chunks), the same operations in
the same order, so its output and final state are the model's own bit for bit. It also returns, for each requested
(batch row, token index e), the state after token e. Within chunk i, with S_i the state at its start, cum the
cumulative log-decay from the chunk's start, k the (l2-normalised) keys and u the chunk's corrected values
(``v_new``: the part of each token's value the state before it does not predict, from the lower-triangular UT
solve, so row m depends on the chunk's tokens up to m only), the state after the chunk's token j is

    S = S_i * exp(cum_j) + sum_{m <= j} exp(cum_j - cum_m) k_m^T u_m

the scan's own update (``S_{i+1} = S_i * exp(cum_last) + (k * exp(cum_last - cum))^T u``) cut at j (Yang et al.,
"Gated Delta Networks", 2024, the chunkwise form; the scan's update in transformers' kernel). One weighted product
per requested token, differentiable as the rest of the kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _l2norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-6) -> torch.Tensor:
    """transformers' ``l2norm`` of the Qwen3.5 modeling file (the same expression)."""
    inv_norm = torch.rsqrt((x * x).sum(dim=dim, keepdim=True) + eps)
    return x * inv_norm


def chunk_gated_delta_rule(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor,
                           beta: torch.Tensor, chunk_size: int = 64, initial_state: torch.Tensor | None = None,
                           output_final_state: bool = False, use_qk_l2norm_in_kernel: bool = False,
                           ends: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs):
    """transformers' ``torch_chunk_gated_delta_rule``, plus the states after the tokens ``ends``.

    ``query``/``key`` [B, T, Hk, dk], ``value`` [B, T, Hv, dv], ``g`` (log decay, <= 0) and ``beta`` [B, T, Hv];
    ``initial_state`` [B, Hv, dk, dv] or None (zeros); ``ends`` = (rows [P], tokens [P]) long tensors, token indices in
    0..T-1 of this call. Returns (output [B, T, Hv, dv] in ``query``'s dtype, the final state [B, Hv, dk, dv] fp32 or
    None unless ``output_final_state``, the states after the ``ends`` tokens [P, Hv, dk, dv] fp32 or None without
    ``ends``). ValueError for an end token outside 0..T-1."""
    initial_dtype = query.dtype
    batch_size, sequence_length, num_k_heads, k_head_dim = key.shape
    num_v_heads, v_head_dim = value.shape[-2:]
    recurrent_state_shape = (batch_size, num_v_heads, k_head_dim, v_head_dim)
    padded_output_shape = (batch_size, num_v_heads, -1, v_head_dim)
    decay = g
    if ends is not None and len(ends[1]) and not 0 <= int(ends[1].min()) <= int(ends[1].max()) < sequence_length:
        raise ValueError(f"an end token outside 0..{sequence_length - 1}: {ends[1].tolist()}")

    if num_k_heads != num_v_heads:
        query = query.repeat_interleave(num_v_heads // num_k_heads, dim=2)
        key = key.repeat_interleave(num_v_heads // num_k_heads, dim=2)
    query, key, value, beta, decay = [
        x.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        for x in (query, key, value, beta, decay)
    ]
    if use_qk_l2norm_in_kernel:
        query = _l2norm(query, dim=-1, eps=1e-6)
        key = _l2norm(key, dim=-1, eps=1e-6)
    scaling = query.shape[-1] ** -0.5
    query = query * scaling

    pad_size = (chunk_size - sequence_length % chunk_size) % chunk_size
    query, key, value = (F.pad(x, (0, 0, 0, pad_size)) for x in (query, key, value))
    beta, decay = (F.pad(x, (0, pad_size)) for x in (beta, decay))
    total_sequence_length = sequence_length + pad_size
    num_chunks = total_sequence_length // chunk_size

    v_beta = value * beta.unsqueeze(-1)
    k_beta = key * beta.unsqueeze(-1)
    query, key, k_beta, v_beta = [
        x.reshape(x.shape[0], x.shape[1], -1, chunk_size, x.shape[-1]) for x in (query, key, k_beta, v_beta)
    ]
    decay = decay.reshape(decay.shape[0], decay.shape[1], -1, chunk_size)
    strictly_upper_mask = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=query.device).triu(1)
    cum_decay = decay.cumsum(dim=3)
    pairwise_decay = cum_decay.unsqueeze(4) - cum_decay.unsqueeze(3)
    pairwise_decay = pairwise_decay.masked_fill(strictly_upper_mask, float("-inf"))
    pairwise_decay = pairwise_decay.exp()
    ut_system = (k_beta @ key.transpose(-1, -2)) * pairwise_decay
    intra_chunk_attn = (query @ key.transpose(-1, -2)) * pairwise_decay
    decayed_k_beta = k_beta * cum_decay.exp().unsqueeze(-1)
    new_values = torch.linalg.solve_triangular(ut_system, v_beta, upper=False, unitriangular=True)
    k_cumdecay = torch.linalg.solve_triangular(ut_system, decayed_k_beta, upper=False, unitriangular=True)

    if initial_state is None:
        last_recurrent_state = torch.zeros(recurrent_state_shape, dtype=new_values.dtype, device=new_values.device)
    else:
        last_recurrent_state = initial_state.to(new_values)
    core_attn_out = torch.zeros_like(new_values)
    raw_key = key  # before the decay to the chunk's end below: what the states at the ends are written with
    query = query * cum_decay.exp().unsqueeze(-1)
    key = key * (cum_decay[..., -1:] - cum_decay).exp().unsqueeze(-1)
    chunk_decay = cum_decay[..., -1].exp()[..., None, None]

    starts, corrected = [], []  # per chunk: the state at its start, its corrected values (only where ends ask)
    for i in range(num_chunks):
        v_new = new_values[:, :, i] - k_cumdecay[:, :, i] @ last_recurrent_state
        if ends is not None:
            starts.append(last_recurrent_state)
            corrected.append(v_new)
        inter_chunk_attn = query[:, :, i] @ last_recurrent_state
        core_attn_out[:, :, i] = inter_chunk_attn + intra_chunk_attn[:, :, i] @ v_new
        last_recurrent_state = last_recurrent_state * chunk_decay[:, :, i] + key[:, :, i].transpose(-1, -2) @ v_new

    at = None
    if ends is not None:
        rows, tok = ends[0].to(query.device), ends[1].to(query.device)
        ci, j = tok // chunk_size, tok % chunk_size
        pick = list(zip(ci.tolist(), rows.tolist()))  # not a stack of every chunk's states: P of them
        s0 = torch.stack([starts[c][r] for c, r in pick])                    # [P, Hv, dk, dv]
        u = torch.stack([corrected[c][r] for c, r in pick])                  # [P, Hv, C, dv]
        k = raw_key[rows, :, ci]                                             # [P, Hv, C, dk]
        cum = cum_decay[rows, :, ci]                                         # [P, Hv, C]
        cum_j = cum.gather(-1, j[:, None, None].expand(-1, cum.shape[1], 1))  # [P, Hv, 1]
        later = torch.arange(chunk_size, device=query.device)[None, None] > j[:, None, None]
        w = (cum_j - cum).masked_fill(later, float("-inf")).exp()            # exp(cum_j - cum_m), 0 past j
        at = s0 * cum_j.exp()[..., None] + (k * w[..., None]).transpose(-1, -2) @ u

    last_recurrent_state = None if not output_final_state else last_recurrent_state
    core_attn_out = core_attn_out.reshape(padded_output_shape)
    core_attn_out = core_attn_out[:, :, :sequence_length]
    core_attn_out = core_attn_out.transpose(1, 2).to(initial_dtype, memory_format=torch.contiguous_format)
    return core_attn_out, last_recurrent_state, at


CHUNK_KERNEL = "torch_chunk_gated_delta_rule"          # the module-level names transformers' Qwen3.5 modeling
RECURRENT_KERNEL = "torch_recurrent_gated_delta_rule"  # files call their kernels by (ModelAdapter.delta_rule_modules)


def shared_state_one_token_delta_rule(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor,
                                      beta: torch.Tensor, initial_state: torch.Tensor,
                                      output_final_state: bool = False, use_qk_l2norm_in_kernel: bool = False,
                                      **kwargs):
    """One token per row from a start state shared by consecutive rows: TPA's candidates of one position.

    transformers' ``torch_recurrent_gated_delta_rule`` for one token computes S' = S exp(g) + k^T (beta (v - k S
    exp(g))) and the output q S'; with S' never used again (a fork row runs one token), the output is
    q S exp(g) + (q . k) beta (v - k S exp(g)): two vector-matrix products with the row's start state, which
    ``initial_state`` holds once per group of n = R / P consecutive rows, so no state is copied per row nor
    updated (the same arithmetic as the recurrent kernel, in another order: fp32 rounding apart).

    ``query``/``key`` [R, 1, Hk, dk], ``value`` [R, 1, Hv, dv], ``g``/``beta`` [R, 1, Hv], ``initial_state``
    [P, Hv, dk, dv] with R a multiple of P. Returns (output [R, 1, Hv, dv] in ``query``'s dtype, ``initial_state``
    as the "final" state where ``output_final_state``, else None). ValueError for a sequence longer than one token
    or R not a multiple of P."""
    rows, length, num_k_heads, k_head_dim = key.shape
    num_v_heads, v_head_dim = value.shape[-2:]
    n_states = initial_state.shape[0]
    if length != 1 or rows % n_states:
        raise ValueError(f"one token per row, rows in groups sharing a state: got {rows} rows of {length} tokens "
                         f"for {n_states} states")
    n = rows // n_states
    initial_dtype = query.dtype
    if num_k_heads != num_v_heads:
        query = query.repeat_interleave(num_v_heads // num_k_heads, dim=2)
        key = key.repeat_interleave(num_v_heads // num_k_heads, dim=2)
    query, key, value, beta, g = (x[:, 0].float() for x in (query, key, value, beta, g))
    if use_qk_l2norm_in_kernel:
        query = _l2norm(query, dim=-1, eps=1e-6)
        key = _l2norm(key, dim=-1, eps=1e-6)
    query = query / (query.shape[-1] ** 0.5)

    def grouped(x):  # [R, Hv, d] -> [P, Hv, n, d]
        return x.view(n_states, n, num_v_heads, -1).transpose(1, 2)

    q, k, v = grouped(query), grouped(key), grouped(value)
    decay = grouped(g.exp()[..., None])
    state = initial_state.float()
    read = torch.cat([q, k], 2) @ state                         # [P, Hv, 2n, dv]: q S and k S
    kv_mem = read[:, :, n:] * decay
    delta = (v - kv_mem) * grouped(beta[..., None])
    out = read[:, :, :n] * decay + (q * k).sum(-1, keepdim=True) * delta
    out = out.transpose(1, 2).reshape(rows, 1, num_v_heads, v_head_dim).to(initial_dtype)
    return out, (initial_state if output_final_state else None)
