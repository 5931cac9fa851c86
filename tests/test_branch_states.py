"""TPA without masks from the model's own states (common/branch_states.py) on tiny hybrid decoders built from configs:
LFM2-VL's short convolutions + attention and Qwen3.5's Gated DeltaNet + attention, text only (the conformance suite
checks the kit models with images through the dump and the student step).

The reference is the language model itself run on prefix + candidate, one forward per (position, candidate)."""

from __future__ import annotations

import re

import pytest
import torch

from alignti.common.adapters import ModelAdapter
from alignti.common.branch_states import snapshot_branch_hidden


def _lfm2_vl():
    from transformers import Lfm2VlConfig, Lfm2VlForConditionalGeneration
    cfg = Lfm2VlConfig(text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=300, conv_L_cache=3,
                                        layer_types=["conv", "full_attention", "conv", "conv"]),
                       vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2))
    return Lfm2VlForConditionalGeneration(cfg)


def _qwen3_5():
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration
    cfg = Qwen3_5Config(text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=300,
                                         linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                                         linear_value_head_dim=16,
                                         layer_types=["linear_attention", "full_attention", "linear_attention"]),
                        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                                           out_hidden_size=64))
    return Qwen3_5ForConditionalGeneration(cfg)


# the kernels' rounding (module docstring of branch_states): LFM2's conv layers compute the same sums over the same
# inputs in either layout; Qwen3.5's Gated DeltaNet runs the prefix through the chunked kernel from other chunk starts
# and the candidate through the recurrent kernel, both fp32 (measured: 9.5e-7 and 7.2e-7 on hidden states up to 3.8);
# 1e-5 absolute bounds both with margin and is far below any wrong state (a missing or leaked token moves the hidden
# states by O(1e-1))
ATOL = 1e-5


def _case(build, seed: int = 0):
    torch.manual_seed(seed)
    model = build().float()
    adapter = ModelAdapter(model)
    assert not adapter.tpa_tree_mask
    g = torch.Generator().manual_seed(seed)
    lengths = [23, 17]
    ids = [torch.randint(5, 300, (n,), generator=g) for n in lengths]
    emb = model.get_input_embeddings()
    s = max(lengths)
    embeds = torch.zeros(len(ids), s, 64)
    for b, x in enumerate(ids):
        embeds[b, :len(x)] = emb(x).detach()
    pos = torch.arange(s).expand(len(ids), -1).clone()
    if model.config.model_type == "qwen3_5":
        pos = pos[None].expand(3, -1, -1).clone()
    branch_pos = [torch.tensor([3, 4, 11, 22]), torch.tensor([1, 9, 16])]  # adjacent, first and last positions
    cands = [torch.randint(5, 300, (len(p), 3), generator=g) for p in branch_pos]
    return model, adapter, ids, embeds, pos, branch_pos, cands


def _direct(model, ids, branch_pos, cands):
    """The language model on prefix + candidate, one forward each: [N, n_branch, H]."""
    lm = model.model.language_model
    rows = []
    for x, p, c in zip(ids, branch_pos, cands):
        for j, t in enumerate(p.tolist()):
            for cand in c[j].tolist():
                seq = torch.cat([x[:t], torch.tensor([cand])])[None]
                rows.append(lm(input_ids=seq).last_hidden_state[0, -1])
    return torch.stack(rows).view(-1, cands[0].shape[-1], rows[0].shape[-1])


@pytest.mark.parametrize("window", [64, 5], ids=["one-window", "windows"])
@pytest.mark.parametrize("build", [_lfm2_vl, _qwen3_5], ids=["lfm2_vl", "qwen3_5"])
def test_branches_from_snapshots_are_the_model_on_prefix_plus_candidate(build, window):
    """Without a gradient the states come from one call per window of the prefix: at ``window`` 5 the positions sit
    at a window's start, inside it, at its end, and a window holds none (sample 0's 15-20)."""
    model, adapter, ids, embeds, pos, branch_pos, cands = _case(build)
    with torch.no_grad():
        got = snapshot_branch_hidden(adapter, embeds, pos, cands, branch_pos, max_rows=8,  # several continuations
                                     window=window)
        want = _direct(model, ids, branch_pos, cands)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("build", [_lfm2_vl, _qwen3_5], ids=["lfm2_vl", "qwen3_5"])
def test_each_prefix_token_runs_through_the_decoder_once(build):
    """The cost the mask-free path exists to cut: the decoder sees each sample's prefix once (up to its last TPA
    position) plus one token per (position, candidate), not a prefix per (position, candidate); the teacher (no
    gradient) reads the states at its positions from one call per window of the prefix, not one per position."""
    model, adapter, ids, embeds, pos, branch_pos, cands = _case(build)
    seen = []
    hook = adapter.decoder_layers()[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[:2]))
    try:
        with torch.no_grad():
            snapshot_branch_hidden(adapter, embeds, pos, cands, branch_pos)
    finally:
        hook.remove()
    tokens = sum(b * n for b, n in seen)
    rows = sum(c.shape[0] * c.shape[1] for c in cands)
    assert tokens == sum(int(p.max()) for p in branch_pos) + rows
    # without a gradient: a call per 64-token window of each prefix (not per position), one batched continuation
    assert len(seen) == sum(-(-int(p.max()) // 64) for p in branch_pos) + 1 < sum(len(p) for p in branch_pos) + 1


def _against_direct(model, got_h, ids, branch_pos, cands, seed: int, before=None) -> tuple[dict, dict]:
    """The parameters' gradients of one random-probe loss on ``got_h`` and on the direct forwards (``_direct``, after
    ``before()``), having checked the hidden states equal and the same parameters reached (the embedding among them)."""
    probe = torch.randn(got_h.shape, generator=torch.Generator().manual_seed(seed))
    (got_h * probe).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    if before is not None:
        before()
    want_h = _direct(model, ids, branch_pos, cands)
    (want_h * probe).sum().backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(got_h.detach(), want_h.detach(), rtol=0, atol=ATOL)
    assert set(got) == set(want) and any("embed_tokens" in n for n in got)
    return got, want


def test_student_gradients_through_snapshots_are_plain_autograd_with_checkpointing():
    """In training the snapshots stay in the autograd graph, with the decoder's gradient checkpointing on (which drops
    a cache in training: the replay turns it off): the gradients of a loss on the branch states equal plain autograd
    through the language model on prefix + candidate."""
    model, adapter, ids, embeds, pos, branch_pos, cands = _case(_lfm2_vl, seed=1)
    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    emb = model.get_input_embeddings()
    s = embeds.shape[1]
    x = torch.stack([torch.cat([emb(t), torch.zeros(s - len(t), 64)]) for t in ids])  # in the graph this time
    got_h = snapshot_branch_hidden(adapter, x, pos, cands, branch_pos)
    got, want = _against_direct(model, got_h, ids, branch_pos, cands, seed=2,
                                before=model.activation_checkpointing_disable)
    for n in want:  # the same sums in another order: fp32 rounding of the largest element
        scale = float(want[n].abs().max()) or 1.0
        assert float((got[n] - want[n]).abs().max()) <= 1e-5 * scale, n


def _batch(model, ids, branch_pos, cands, start: int = 12):
    """The adapter of ``model``'s family and a collated batch of ``ids`` whose responses start at ``start``, with the
    TPA positions and candidates among them."""
    from alignti.common.adapters import FAMILIES
    from alignti.common.batch import collate
    cls = FAMILIES[model.config.model_type].adapter if model.config.model_type in FAMILIES else ModelAdapter
    branch_pos = [p[p >= start] for p in branch_pos]
    cands = [c[:len(p)] for c, p in zip(cands, branch_pos)]
    samples = [dict(input_ids=x.numpy(), response_mask=(torch.arange(len(x)) >= start).numpy(), instr_spans=[],
                    n_image_tokens=0, image_tok_start=0, image_inputs=None) for x in ids]
    batch = collate(samples, 0, cls)
    assert [p.tolist() for p in batch["resp_pos"]] == [list(range(start, len(x))) for x in ids]
    return cls(model), batch, branch_pos, cands


@pytest.mark.parametrize("build", [_lfm2_vl, _qwen3_5], ids=["lfm2_vl", "qwen3_5"])
def test_main_pass_in_two_segments_is_the_one_pass_and_the_replay_skips_the_prompt(build, monkeypatch):
    """The teacher's ``forward`` (a cache kept for ``branch_pass``) on a hybrid decoder runs its main pass as the prompt
    and the rest (``main_pass_in_two``): the response hidden states and the branches equal those of one pass with the
    replay from position 0, and the replay no longer runs the prompt through the decoder."""
    import alignti.common.batch as batch_mod
    from alignti.common.batch import branch_pass, forward
    model, _, ids, _, _, branch_pos, cands = _case(build)
    adapter, batch, branch_pos, cands = _batch(model, ids, branch_pos, cands)
    seen = []
    hook = adapter.decoder_layers()[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[:2]))
    with torch.no_grad():
        two = forward(adapter, batch, use_cache=True, branch_pos=branch_pos)
        two_h = branch_pass(adapter, batch, two, cands, branch_pos)
        tokens_two = sum(b * n for b, n in seen)
        seen.clear()
        monkeypatch.setattr(batch_mod, "prompt_split_at", lambda *args, **kw: None)
        one = forward(adapter, batch, use_cache=True, branch_pos=branch_pos)
        one_h = branch_pass(adapter, batch, one, cands, branch_pos)
        tokens_one = sum(b * n for b, n in seen)
    hook.remove()
    assert two.prefix is not None and two.prefix[0] == min(int(p.min()) for p in branch_pos) and one.prefix is None
    torch.testing.assert_close(two.resp_hidden, one.resp_hidden, rtol=0, atol=ATOL)
    torch.testing.assert_close(two_h, one_h, rtol=0, atol=ATOL)
    assert tokens_one - tokens_two == two.prefix[0] * len(ids)  # each sample's prompt, once less


@pytest.mark.parametrize("build", [_lfm2_vl, _qwen3_5], ids=["lfm2_vl", "qwen3_5"])
def test_student_states_come_from_its_main_pass_with_plain_autograd_gradients(build):
    """The student's ``forward`` with its TPA candidates (positions known before the pass) reads each layer's state
    at the TPA positions from the main pass itself (``states_in_main_pass``: Qwen3.5's Gated DeltaNet states from its
    own chunked kernel, common/delta_rule.py): the decoder sees each sample's sequence once plus one token per
    (position, candidate), no replay; the branch hidden states equal the language model on prefix + candidate and a
    loss on them back-propagates the same gradients as plain autograd through those forwards."""
    from alignti.common.batch import forward
    model, _, ids, _, _, branch_pos, cands = _case(build, seed=3)
    adapter, batch, branch_pos, cands = _batch(model, ids, branch_pos, cands, start=2)
    model.train()
    seen = []
    hook = adapter.decoder_layers()[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[:2]))
    got_h = forward(adapter, batch, branch_cands=cands, branch_pos=branch_pos).branch_hidden
    hook.remove()
    rows = sum(c.shape[0] * c.shape[1] for c in cands)
    assert seen == [batch["input_ids"].shape, (rows, 1)]  # the main pass, then every candidate as one batch
    got, want = _against_direct(model, got_h, ids, branch_pos, cands, seed=4)
    # the same sums in another order and other kernels (the Gated DeltaNet kernels compute in fp32 whatever the
    # model's dtype: chunked in the main pass, recurrent on prefix + candidate), so the bound is on the scale of the
    # layer's mixer: the gated decay's parameters (dt_bias, A_log, in_proj_a) sum over every token with cancellation,
    # their own elements far below it (measured: A_log 6.2e-4 of its own largest element, alike with the replay this
    # replaces; every parameter <= 6.6e-7 of its mixer's largest)
    mixer = re.compile(r".*\.(linear_attn|self_attn|conv|feed_forward|mlp)\.")
    for n in want:
        m = mixer.match(n)
        module = m.group(0) if m else n.rsplit(".", 1)[0] + "."
        scale = max(float(g.abs().max()) for k, g in want.items() if k.startswith(module)) or 1.0
        assert float((got[n] - want[n]).abs().max()) <= 1e-5 * scale, n


def test_chunked_kernel_with_states_is_the_model_kernel_and_the_recurrence():
    """common/delta_rule.py: the output and final state are transformers' own chunked kernel bit for bit (the same
    operations in the same order), and the state after each requested token, in any chunk and at a chunk's first
    and last token, equals the token-by-token recurrence (transformers' recurrent kernel run up to that token) to
    fp32 rounding; with grouped key heads and an initial state."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as m
    from alignti.common.delta_rule import chunk_gated_delta_rule
    g = torch.Generator().manual_seed(0)
    B, T, Hk, Hv, dk, dv = 2, 150, 2, 4, 8, 8
    q, k = torch.randn(B, T, Hk, dk, generator=g), torch.randn(B, T, Hk, dk, generator=g)
    v = torch.randn(B, T, Hv, dv, generator=g)
    decay = -torch.rand(B, T, Hv, generator=g) * 0.5
    beta = torch.rand(B, T, Hv, generator=g)
    s0 = torch.randn(B, Hv, dk, dv, generator=g) * 0.1
    ends = (torch.tensor([0, 0, 1, 1, 1, 0]), torch.tensor([0, 63, 64, 100, 149, 127]))
    out, final, at = chunk_gated_delta_rule(q, k, v, decay, beta, initial_state=s0, output_final_state=True,
                                            use_qk_l2norm_in_kernel=True, ends=ends)
    ref_out, ref_final = m.torch_chunk_gated_delta_rule.__wrapped__(q, k, v, decay, beta, initial_state=s0,
                                                                    output_final_state=True,
                                                                    use_qk_l2norm_in_kernel=True) \
        if hasattr(m.torch_chunk_gated_delta_rule, "__wrapped__") else m.torch_chunk_gated_delta_rule(
            q, k, v, decay, beta, initial_state=s0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    assert torch.equal(out, ref_out) and torch.equal(final, ref_final)
    for p, (b, e) in enumerate(zip(*ends)):
        b, e = int(b), int(e)
        _, want = m.torch_recurrent_gated_delta_rule(q[b:b + 1, :e + 1], k[b:b + 1, :e + 1], v[b:b + 1, :e + 1],
                                                     decay[b:b + 1, :e + 1], beta[b:b + 1, :e + 1],
                                                     initial_state=s0[b:b + 1], output_final_state=True,
                                                     use_qk_l2norm_in_kernel=True)
        torch.testing.assert_close(at[p], want[0], rtol=0, atol=1e-5 * float(want.abs().max()))
    with pytest.raises(ValueError, match="an end token outside"):
        chunk_gated_delta_rule(q, k, v, decay, beta, ends=(torch.tensor([0]), torch.tensor([T])))


def test_teacher_entropy_is_the_brute_force_entropy_and_the_old_expression_bit_for_bit():
    """The entropy that picks the TPA positions (``topk_fold_hidden(..., entropy=True)``, computed in place over one
    [rows, V] temporary) is the fp32 expression -(exp(lp) * lp).nan_to_num(0).sum(-1) bit for bit (the same ops in
    the same order) and the float64 brute force to fp32 rounding (V * eps32 of the largest term's size), across the
    head's row chunks (chunk 3 of 7 rows), with a row whose logits underflow to p = 0 (0 * log 0 counted as 0)."""
    from alignti.teacher_dump.compute import topk_fold_hidden
    g = torch.Generator().manual_seed(0)
    V = 5000
    head = torch.nn.Linear(16, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, 16, generator=g))
    h = torch.randn(7, 16, generator=g)
    h[3] *= 60.0  # a near-one-hot row: most of its exp(lp) underflow to 0
    with torch.no_grad():
        *_, ent = topk_fold_hidden(h, head, 8, entropy=True, chunk=3)
        lp = torch.cat([torch.log_softmax(head(h[i:i + 3]).float(), -1) for i in range(0, 7, 3)])  # the same chunks
        old = -(lp.exp() * lp).nan_to_num(0.0).sum(-1)
        lp64 = torch.log_softmax(head(h).double(), -1)
        brute = -(lp64.exp() * lp64).sum(-1)
    assert torch.equal(ent, old)
    torch.testing.assert_close(ent.double(), brute, rtol=0, atol=V * torch.finfo(torch.float32).eps * 20)


def test_a_forward_that_ignores_recurrent_states_to_keep_is_refused_not_misread(monkeypatch):
    """Where the model's forward does not return the per-token recurrent states the teacher's windows ask for, the
    replay stops with an error naming ``recurrent_states_to_keep`` rather than reading a wrong state."""
    from transformers.cache_utils import DynamicCache
    model, adapter, ids, embeds, pos, branch_pos, cands = _case(_qwen3_5)
    monkeypatch.setattr(DynamicCache, "get_recurrent_states_to_keep", lambda self, layer_idx=None: 0)
    with torch.no_grad(), pytest.raises(RuntimeError, match="recurrent_states_to_keep"):
        snapshot_branch_hidden(adapter, embeds, pos, cands, branch_pos)


def test_a_window_position_inside_the_first_segment_is_refused_by_name():
    """The teacher's windows refuse a TPA position before where the replay starts (inside the main pass's first
    segment) as the per-position path does, naming the position, before running anything."""
    from alignti.common.branch_states import window_snapshots
    model, adapter, ids, embeds, pos, branch_pos, cands = _case(_qwen3_5)
    with torch.no_grad(), pytest.raises(ValueError, match="TPA position 3 is inside the main pass's first segment"):
        window_snapshots(adapter, adapter.branch_state_cache(), embeds[:1], pos[..., :1, :], 5, [3, 8], 64, [],
                         {3: (0, 3), 8: (0, 8)}, {})
