"""TPA without masks: each decoder layer's state at the TPA positions from one pass over the sequence, and every
candidate of every position as one batched one-token continuation from those states.

A hybrid decoder (Qwen3.5's Gated DeltaNet, LFM2's short convolutions) takes no tree mask: a branch token placed in
the sequence would flow into the recurrent / conv state of every later token. Its branches run instead from the
model's own cache (transformers' ``DynamicCache`` built from the text config's ``layer_types``: a
``LinearAttentionLayer`` holding the conv state and, for Gated DeltaNet, the recurrent state of a linear-attention or
convolution layer; a ``DynamicLayer`` holding an attention layer's keys and values):

1. the prefix runs through the language model in segments that end at the TPA positions (sorted, all samples of the
   batch together), with a cache whose linear / conv layers update **out of place** (``SnapshotLinearLayer``): the
   state after each segment is a reference kept for later, never overwritten, so it costs no copy and, in training,
   stays in the autograd graph (the student's TPA gradient reaches the prefix through it as through plain autograd);
   without a gradient (the teacher) the prefix runs in windows instead, the states at the positions read from each
   window's call (``window_snapshots``: the conv inputs the cache saw, the model's own per-token recurrent states);
2. the candidates of all positions are one batch of one-token continuations (``fork``): row r starts from the
   linear / conv states of its sample at its position (stacked along the batch) and from its sample's keys and
   values of the whole replayed prefix, masked to the keys before its position (plus its own).

Each row is then the model's own computation on prefix + candidate: the attention layers see the same keys under the
same mask; a linear-attention layer continues from its state at the position with the same update rule the model
uses to decode one token; a conv layer convolves its kernel over the same last inputs. What differs from the model
run on prefix + candidate in one forward is float rounding only: the Gated DeltaNet prefix runs through the chunked
kernel (chunks of 64 from each segment's start, not the sequence's) and the candidate through the recurrent kernel.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, LinearAttentionLayer

from .attention import ForkRows, fork_rows, use_alignti_attention
from .delta_rule import CHUNK_KERNEL, RECURRENT_KERNEL, chunk_gated_delta_rule, shared_state_one_token_delta_rule

logger = logging.getLogger(__name__)
_warned: list = []  # the replay's warning, once per process


class SnapshotLinearLayer(LinearAttentionLayer):
    """transformers' cache layer of a linear-attention or convolution layer (conv state, recurrent state), with every
    update out of place: a new tensor is assigned where ``LinearAttentionLayer`` copies into a fixed buffer. A state
    read after a forward stays what it was however many forwards follow (a snapshot is a reference), and autograd sees
    no tensor it saved modified in place. ``record_past`` routes every update through ``update_conv_state`` (the
    model's one-token path writes the conv buffer in place otherwise); no past is recorded (``crop`` is not used)."""

    def __init__(self, number_of_states: int = 1, **kwargs):
        super().__init__(number_of_states=number_of_states)
        self.record_past = True
        self.recurrent_states_to_keep = 0  # the model's forward computes no intermediate recurrent states
        self.cumulative_length_linear = 0
        self.recording = None  # a dict while ``window_snapshots`` records a call's conv inputs and per-token states

    def lazy_initialization(self, conv_states=None, recurrent_states=None, state_idx: int = 0,
                            conv_kernel_size: int | None = None) -> None:
        pass  # the states are assigned by the updates below

    def update_conv_state(self, conv_states: torch.Tensor, state_idx: int = 0, conv_kernel_size: int | None = None,
                          **kwargs) -> torch.Tensor:
        """``conv_states`` [B, C, n]: the conv's new inputs. Returns [B, C, K + n], the last K inputs before them (zeros
        at the start of the sequence, as the conv's own left padding) followed by them, K the kernel size; keeps the
        last K."""
        k = conv_kernel_size or self.conv_kernel_size[state_idx] or conv_states.shape[-1]
        self.conv_kernel_size[state_idx] = k
        prev = self.conv_states[state_idx]
        if prev is None:
            prev = conv_states.new_zeros(*conv_states.shape[:-1], k)
        full = torch.cat([prev, conv_states], -1)
        if self.recording is not None:
            self.recording.setdefault("conv", {})[state_idx] = full
        self.conv_states[state_idx] = full[..., -k:]
        self.is_conv_states_initialized[state_idx] = self.has_previous_state[state_idx] = True
        if state_idx == 0:
            self.cumulative_length_linear = self.cumulative_length_linear + conv_states.shape[-1]
        return full

    def update_recurrent_state(self, recurrent_states, state_idx: int = 0, **kwargs) -> torch.Tensor:
        last = recurrent_states if isinstance(recurrent_states, torch.Tensor) else recurrent_states[-1]
        if self.recording is not None and "kernel" in self.recording:  # the main pass (``states_in_main_pass``):
            got = self.recording["kernel"].pop("at", None)  # the states the wrapped kernel just computed
            if got is None:
                raise RuntimeError("TPA without masks: a linear-attention layer updated its state without alignti's "
                                   "chunked kernel (ModelAdapter.delta_rule_modules names none for it), so its states "
                                   "at the TPA positions are unknown")
            self.recording.setdefault("at", {})[state_idx] = got
        elif self.recording is not None:  # the model's per-token states of its last recurrent_states_to_keep tokens:
            per_token = [recurrent_states] if isinstance(recurrent_states, torch.Tensor) else recurrent_states
            self.recording.setdefault("count", {})[state_idx] = len(per_token)
            self.recording.setdefault("recurrent", {})[state_idx] = {  # only those asked for are kept
                i: per_token[i] for i in self.recording["want"] if i < len(per_token)}
        self.recurrent_states[state_idx] = last
        self.is_recurrent_states_initialized[state_idx] = self.has_previous_state[state_idx] = True
        return last

    def set_states(self, conv: dict, recurrent: dict, kernel: dict) -> None:
        """Start from the given states (per state index; None: none)."""
        for i in range(self.number_of_states):
            self.conv_states[i], self.recurrent_states[i] = conv[i], recurrent[i]
            self.conv_kernel_size[i] = kernel[i]
            self.is_conv_states_initialized[i] = conv[i] is not None
            self.is_recurrent_states_initialized[i] = recurrent[i] is not None
            self.has_previous_state[i] = conv[i] is not None or recurrent[i] is not None


class ForkAttentionLayer(DynamicLayer):
    """An attention layer's cache in a fork (``fork_cache``): it holds no keys; the rows read their samples' prefix
    keys and values through ``fork_attention`` (common/attention.py ``ForkRows``), so no prefix is copied per row.
    ``update`` returns the rows' own keys and values; its length is the prefix's (``length``), as the mask counts."""

    def __init__(self, length: int):
        super().__init__()
        self.length = length
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.length


def snapshot_cache(config) -> DynamicCache:
    """A ``DynamicCache`` for the language model of text config ``config``, laid out by its ``layer_types`` as the
    model's own, with ``SnapshotLinearLayer`` for its linear-attention / convolution layers. NotImplementedError
    naming the layer for a cache layer kind mask-free TPA does not know (sliding-window KV, hybrid layers)."""
    cache = DynamicCache(config=config)
    for i, layer in enumerate(cache.layers):
        if type(layer) is LinearAttentionLayer:
            cache.layers[i] = SnapshotLinearLayer(number_of_states=layer.number_of_states)
        elif type(layer) is not DynamicLayer:
            raise NotImplementedError(f"TPA without masks: decoder layer {i} has a {type(layer).__name__} cache; only "
                                      "full-attention (DynamicLayer) and linear-attention / convolution "
                                      "(LinearAttentionLayer) layers are supported")
    return cache


@contextlib.contextmanager
def without_checkpointing(layers):
    """Gradient checkpointing off for ``layers`` (transformers drops the cache of a checkpointed layer in training:
    the segments would each start from nothing; the language model itself is among them, whose forward would set
    ``use_cache`` off with a warning). The replayed prefix's activations are kept for backward instead."""
    old = [getattr(m, "gradient_checkpointing", False) for m in layers]
    for m in layers:
        if hasattr(m, "gradient_checkpointing"):
            m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m, o in zip(layers, old):
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = o


def _at(position_ids: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The position ids of (sample b[r], position t[r]) as a one-token sequence per row: [R, 1] or [3, R, 1]."""
    return (position_ids[:, b, t] if position_ids.dim() == 3 else position_ids[b, t])[..., None]


def tpa_pairs(branch_pos: list[torch.Tensor]) -> list[tuple[int, int]]:
    """The (sample b, TPA position t) pairs of ``branch_pos`` (per sample, its positions), in sample then position
    order: the order of the rows of ``branch_hidden``."""
    return [(b, t) for b, p in enumerate(branch_pos) for t in p.tolist()]


def snapshot_branch_hidden(adapter, embeds: torch.Tensor, position_ids: torch.Tensor, cands: list[torch.Tensor],
                           branch_pos: list[torch.Tensor], max_rows: int = 512, prefix=None,
                           window: int = 64) -> torch.Tensor:
    """The final hidden state after each candidate, each the model on the real prefix followed by the candidate,
    from the model's own states at the TPA positions (module docstring); differentiable where ``embeds`` is.

    ``embeds`` [B, S, H]: the language model's input embeddings of the main pass (image features merged, as the
    model merges them); ``position_ids`` [B, S] or [3, B, S] (M-RoPE); ``cands[b]`` [n_b, n_branch] candidate ids for
    the sequence positions ``branch_pos[b]`` [n_b] (positions >= 1, each the position of the token the candidates
    replace: candidate c at t is the model on ``prefix[:t] + c`` at position id ``position_ids[..., t]``, the tree
    mask's definition for attention decoders). ValueError for a position 0. ``prefix``: the main pass's states after
    its first segment (``main_pass_in_two``), where every sample's replay starts instead of at 0.

    Cost: one pass of each sample's prefix up to its last TPA position, in segments ending at its TPA positions (per
    sample: in a batch, a segment that ends where only one sample needs a state would pad every other sample's rows
    to the Gated DeltaNet kernel's 64-token chunk too), plus one one-token forward of all candidates in batches of at
    most ``max_rows`` rows (each row holds its sample's replayed keys and values of every attention layer). Without
    a gradient (the teacher) each sample's prefix runs in windows of at most ``window`` tokens instead, the states at
    its positions read from the model's own per-token states (``window_snapshots``): one call per window, not per
    position. Returns
    [N, n_branch, H] in sample then position order (N = sum n_b), as the tree path's ``branch_hidden``."""
    lm = adapter.language_model
    n_branch = cands[0].shape[-1]
    pairs = tpa_pairs(branch_pos)
    if not pairs:
        return embeds.new_zeros(0, n_branch, embeds.shape[-1])
    if min(t for _, t in pairs) < 1:
        raise ValueError("a TPA position 0 has no prefix to continue from")
    snap_of: dict[tuple[int, int], int] = {}  # (sample, stop) -> index into the snapshots
    snaps, caches = [], {}
    no_grad = not (torch.is_grad_enabled() and embeds.requires_grad)
    if not no_grad and not _warned:
        _warned.append(True)
        logger.warning("TPA on a hybrid decoder with gradient checkpointing: the main pass cannot keep its states at "
                       "the TPA positions (a checkpointed layer drops its cache in training), so each sample's prefix "
                       "is replayed, without checkpointing, in one call per TPA position; expect the step several "
                       "times slower than without --gradient-checkpointing (docs/method.md)")
    with without_checkpointing([adapter.language_model, *adapter.decoder_layers()]):
        for b in sorted({b for b, _ in pairs}):
            cache, prev = start_cache(adapter, prefix, b)
            stops = sorted({t for s, t in pairs if s == b})
            if no_grad and window_snapshots(adapter, cache, embeds[b:b + 1], position_ids[..., b:b + 1, :], prev, stops,
                                            window, snaps, {t: (b, t) for t in stops}, snap_of):
                caches[b] = cache
                continue
            for t in stops:
                if t < prev:
                    raise ValueError(f"TPA position {t} is inside the main pass's first segment (0-{prev})")
                if t > prev:
                        lm(inputs_embeds=embeds[b:b + 1, prev:t], position_ids=position_ids[..., b:b + 1, prev:t],
                       cache=cache, use_cache=True)
                snap_of[b, t] = len(snaps)
                snaps.append([(dict(layer.conv_states), dict(layer.recurrent_states))
                              if isinstance(layer, SnapshotLinearLayer) else None for layer in cache.layers])
                prev = t
            caches[b] = cache
        states = stack_snapshots(snaps)
        kv, kv_len = stack_prefix_kv(caches, len(branch_pos))
        return fork_branch_hidden(adapter, states, kv, kv_len, pairs, [snap_of[p] for p in pairs], cands, position_ids,
                                  max_rows)


def fork_branch_hidden(adapter, states: list, kv: list, kv_len: int, pairs: list[tuple[int, int]], snap: list[int],
                       cands: list[torch.Tensor], position_ids: torch.Tensor, max_rows: int = 512,
                       cand_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Every candidate of every TPA position as one batch of one-token continuations (``fork_cache``), at most
    ``max_rows`` rows per call: pair p = (sample b, position t) continues from the linear / conv states
    ``states[layer]`` of its snapshot ``snap[p]`` (``stack_snapshots``' layout) and from sample b's keys and values
    ``kv`` (``stack_prefix_kv``'s layout, ``kv_len`` keys) masked to the keys before t, plus its own. ``cands[b]``
    [n_b, n_branch] in the order of ``pairs``; ``position_ids`` [B, S] or [3, B, S]; ``cand_embeds`` [N * n_branch,
    H]: the candidates' input embeddings where already taken (``one_embedding_call``). Returns [N, n_branch, H]."""
    lm = adapter.language_model
    n_branch = cands[0].shape[-1]
    dev = position_ids.device
    dtype = next(adapter.model.parameters()).dtype
    emb_layer = adapter.model.get_input_embeddings()
    cand_all = torch.cat([c.reshape(-1, n_branch) for c in cands]).long().to(dev)
    per_call = max(1, max_rows // n_branch)
    keys = torch.arange(kv_len + 1, device=dev)
    out = []
    for at in range(0, len(pairs), per_call):
        chunk = pairs[at:at + per_call]
        b = torch.tensor([p[0] for p in chunk], device=dev).repeat_interleave(n_branch)
        t = torch.tensor([p[1] for p in chunk], device=dev).repeat_interleave(n_branch)
        fork = fork_cache(states, kv, torch.tensor(snap[at:at + per_call], device=dev), n_branch)
        allowed = (keys[None] < t[:, None]) | (keys[None] == kv_len)  # its prefix, and itself (appended last)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill_(
            ~allowed, torch.finfo(dtype).min)[:, None, None]
        x = (emb_layer(cand_all[at:at + len(chunk)].reshape(-1)) if cand_embeds is None
             else cand_embeds[at * n_branch:(at + len(chunk)) * n_branch])[:, None]
        rows = ForkRows({i: pair for i, pair in enumerate(kv) if pair is not None}, b, t)
        with use_alignti_attention(adapter, None), fork_rows(rows), kernels_replaced(
                adapter, RECURRENT_KERNEL, shared_state_one_token_delta_rule):
            h = lm(inputs_embeds=x, position_ids=_at(position_ids, b, t), attention_mask=mask, cache=fork,
                   use_cache=True).last_hidden_state[:, 0]
        out.append(h)
    return torch.cat(out).view(-1, n_branch, out[0].shape[-1])


def checkpointed_in_training(adapter) -> bool:
    """Whether the model trains with activation checkpointing on a decoder layer: transformers then drops that
    layer's cache (``use_cache`` is turned off for a checkpointed layer in training)."""
    return adapter.model.training and any(getattr(m, "gradient_checkpointing", False)
                                          for m in adapter.decoder_layers())


def records_in_main_pass(adapter) -> bool:
    """Whether a hybrid decoder's TPA states can be read from the main pass itself (``states_in_main_pass``): not
    when ``checkpointed_in_training`` (the per-position replay of ``snapshot_branch_hidden`` runs instead)."""
    return not checkpointed_in_training(adapter)


class MainPassStates:
    """What ``states_in_main_pass`` yields: ``cache`` to run the main pass with (``use_cache=True``); after the
    pass, ``states()`` / ``kv()`` in ``fork_branch_hidden``'s layouts, snapshot p being ``pairs[p]``."""

    def __init__(self, adapter, pairs: list[tuple[int, int]]):
        self.cache = adapter.branch_state_cache()
        self.pairs = pairs
        self.b = torch.tensor([p[0] for p in pairs], dtype=torch.long)  # [P] samples
        self.t = torch.tensor([p[1] for p in pairs], dtype=torch.long)  # [P] positions
        self.kernel: dict = {}
        self.linear = [x for x in self.cache.layers if isinstance(x, SnapshotLinearLayer)]

    def states(self) -> list:
        """Per decoder layer: None (attention) or ({state index: [P, C, K] conv states}, {state index: [P, H, dk, dv]
        recurrent states}): a conv state at (b, t) is the conv's last K inputs before token t (zeros before the
        sequence, as the conv's own padding), a recurrent state the state after token t - 1."""
        b, t = self.b, self.t
        out = []
        for x in self.cache.layers:
            if not isinstance(x, SnapshotLinearLayer):
                out.append(None)
                continue
            rec = x.recording
            conv = {}
            for k, v in x.conv_states.items():
                if v is None:
                    conv[k] = None
                    continue
                full = rec["conv"][k]  # [B, C, K + S]: K zeros, then the pass's inputs
                idx = (t[:, None] + torch.arange(v.shape[-1])).to(full.device)  # inputs t - K .. t - 1
                conv[k] = full[b.to(full.device)[:, None], :, idx].transpose(1, 2)
            recurrent = {k: None if v is None else rec["at"][k] for k, v in x.recurrent_states.items()}
            out.append((conv, recurrent))
        return out

    def kv(self) -> tuple[list, int]:
        """Per decoder layer: None (linear / conv) or the pass's (keys, values) [B, heads, S, head_dim]; S."""
        out = [None if isinstance(x, SnapshotLinearLayer) else (x.keys, x.values) for x in self.cache.layers]
        lens = [x.get_seq_length() for x in self.cache.layers if not isinstance(x, SnapshotLinearLayer)]
        return out, (lens[0] if lens else 0)


@contextlib.contextmanager
def states_in_main_pass(adapter, pairs: list[tuple[int, int]]):
    """Within: a main pass run with the yielded ``MainPassStates.cache`` records, at each (sample b, TPA position t)
    of ``pairs``, every layer's state before token t: a conv layer's from the inputs its cache sees
    (``update_conv_state``); a Gated DeltaNet layer's from the chunked kernel of the pass itself
    (common/delta_rule.py, in place of the module-level kernel of ``adapter.delta_rule_modules()``, restored on
    exit: the model's own output bit for bit, plus the states after tokens t - 1); an attention layer's
    keys and values stay in the cache. No prefix runs twice: the student's TPA costs its main pass plus one token
    per candidate. The pass must start at position 0 of every sample (no cache before it). ValueError for a
    position 0."""
    if any(t < 1 for _, t in pairs):
        raise ValueError("a TPA position 0 has no prefix to continue from")
    rec = MainPassStates(adapter, pairs)
    rows, ends = rec.b, rec.t - 1

    def kernel(*args, cu_seqlens=None, **kw):
        if cu_seqlens is not None:
            raise NotImplementedError("TPA without masks: packed sequences (cu_seqlens) in the main pass")
        out, final, rec.kernel["at"] = chunk_gated_delta_rule(*args, ends=(rows, ends), **kw)
        return out, final

    for x in rec.linear:
        x.recording = {"kernel": rec.kernel}
    with kernels_replaced(adapter, CHUNK_KERNEL, kernel):
        yield rec


@contextlib.contextmanager
def one_embedding_call(adapter, extra: torch.Tensor):
    """Within: the first call of the model's input-embedding module (the main pass's lookup of its ids) also looks up
    the ids ``extra`` (TPA's candidates), in the same call: in training one dense gradient of the embedding table
    (V x H: 1 GiB at Qwen3.5's 248,320 x 1,024 in fp32) instead of one per lookup, summed. Yields a dict whose
    ``"extra"`` then holds their embeddings [n, H] (absent where the module was not called with ids)."""
    emb = adapter.model.get_input_embeddings()
    got: dict = {}

    def pre(mod, args):
        if "shape" in got or not args or not isinstance(args[0], torch.Tensor):
            return None
        ids = args[0]
        got["shape"] = ids.shape
        return (torch.cat([ids.reshape(-1), extra.to(ids.device, ids.dtype).reshape(-1)]), *args[1:])

    def post(mod, args, out):
        if "shape" not in got or "extra" in got:
            return None
        n = got["shape"].numel()
        got["extra"] = out[n:]
        return out[:n].view(*got["shape"], out.shape[-1])

    hooks = [emb.register_forward_pre_hook(pre), emb.register_forward_hook(post)]
    try:
        yield got
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def kernels_replaced(adapter, name: str, kernel):
    """Within: the module-level kernel ``name`` of each of ``adapter.delta_rule_modules()`` is ``kernel``."""
    patched = [(mod, getattr(mod, name)) for mod in adapter.delta_rule_modules()]
    for mod, _ in patched:
        setattr(mod, name, kernel)
    try:
        yield
    finally:
        for mod, old in patched:
            setattr(mod, name, old)


def window_snapshots(adapter, cache: DynamicCache, embeds: torch.Tensor, position_ids: torch.Tensor, prev: int,
                     stops: list[int], window: int, snaps: list, key_of: dict, snap_of: dict) -> bool:
    """One sample's states at the positions ``stops`` (sorted, >= ``prev``), from calls over windows of at most
    ``window`` tokens of its prefix [prev, stops[-1]) rather than a call per position (no gradient: the teacher).

    The state at t is read from the call over the window that holds token t - 1: a convolution layer's state is its
    last K inputs before t, sliced from the inputs the cache saw (``update_conv_state``); a linear-attention layer's
    is the model's own recurrent state after token t - 1, which transformers' forward returns per token for the last
    ``recurrent_states_to_keep`` tokens of a call (the recurrent kernel there, the chunked kernel before: the state
    is the same recurrence, rounded differently); an attention layer keeps its keys and values in ``cache`` as
    before. Memory: the model's forward holds at most ``window`` per-token states of one layer at a time; of them
    only those at the positions are kept (``SnapshotLinearLayer.update_recurrent_state``).
    Appends to ``snaps`` / ``snap_of[key_of[t]]`` as ``snapshot_branch_hidden`` does. Returns False, having run
    nothing, where the decoder has no linear / conv layer or no position lies past ``prev``. ValueError for a
    position before ``prev`` (inside the main pass's first segment, as the per-position path). RuntimeError where the
    model returns fewer per-token recurrent states than asked (a forward that ignores ``recurrent_states_to_keep``)."""
    lm = adapter.language_model
    linear = [x for x in cache.layers if isinstance(x, SnapshotLinearLayer)]
    if not linear or stops[-1] <= prev:
        return False
    if stops[0] < prev:
        raise ValueError(f"TPA position {stops[0]} is inside the main pass's first segment (0-{prev})")
    todo = list(stops)
    while todo and todo[0] == prev:  # the state before any new token: the cache as it stands
        t = todo.pop(0)
        snap_of[key_of[t]] = len(snaps)
        snaps.append([(dict(x.conv_states), dict(x.recurrent_states)) if isinstance(x, SnapshotLinearLayer) else None
                      for x in cache.layers])
    s = prev
    while todo:
        e = min(s + window, todo[-1])
        here = [t for t in todo if t <= e]  # none: a window short of the next position, run for its states only
        keep = e - here[0] + 1 if here else 0
        for x in linear:
            x.recording, x.recurrent_states_to_keep = {"want": [t - 1 - (e - keep) for t in here]}, keep
        try:
            lm(inputs_embeds=embeds[:, s:e], position_ids=position_ids[..., s:e], cache=cache, use_cache=True)
            recs = [x.recording for x in linear]
        finally:
            for x in linear:
                x.recording, x.recurrent_states_to_keep = None, 0
        for t in here:
            row = []
            it = iter(recs)
            for x in cache.layers:
                if not isinstance(x, SnapshotLinearLayer):
                    row.append(None)
                    continue
                rec = next(it)
                conv = {k: None if v is None else rec.get("conv", {})[k][..., t - s:t - s + v.shape[-1]]
                        for k, v in x.conv_states.items()}
                recurrent = {}
                for k, v in x.recurrent_states.items():
                    if v is None:
                        recurrent[k] = None
                        continue
                    if rec["count"][k] != keep:
                        raise RuntimeError(f"TPA without masks: the language model returned {rec['count'][k]} "
                                           f"recurrent states for {keep} asked (recurrent_states_to_keep)")
                    recurrent[k] = rec["recurrent"][k][t - 1 - (e - keep)]
                row.append((conv, recurrent))
            snap_of[key_of[t]] = len(snaps)
            snaps.append(row)
        todo = todo[len(here):]
        s = e
    return True


def start_cache(adapter, prefix, b: int) -> tuple[DynamicCache, int]:
    """Sample b's replay cache and where its replay starts: empty at 0, or the main pass's states after its first
    segment (``prefix`` = (at, per layer: (conv, recurrent, kernel sizes) or (keys, values)), batch rows) at ``at``."""
    cache = adapter.branch_state_cache()
    if prefix is None:
        return cache, 0
    at, states = prefix
    for layer, st in zip(cache.layers, states):
        if isinstance(layer, SnapshotLinearLayer):
            conv, rec = ({k: None if v is None else v[b:b + 1] for k, v in d.items()} for d in st[:2])
            layer.set_states(conv, rec, st[2])
            layer.cumulative_length_linear = at
        else:
            layer.update(st[0][b:b + 1], st[1][b:b + 1])
    return cache, at


def prompt_split_at(adapter, spec, starts: list[torch.Tensor], length: int) -> int | None:
    """Where a hybrid decoder's main pass may end its first segment so that the TPA replay reuses it: the earliest
    position a branch of any sample can sit at (``starts[b]``: sample b's TPA or response positions), which leaves
    the prompt (image tokens included) out of the replay. None where the pass must stay whole: no position in
    1..length-1, a saliency query at or after it (``spec``: the capture runs in the first segment only), or in
    training a MoE decoder's router logits or activation checkpointing (which drops a cache in training)."""
    firsts = [int(p.min()) for p in starts if len(p)]
    if not firsts or not 1 <= min(firsts) < length:
        return None
    at = min(firsts)
    if spec is not None and bool(spec.q_valid.any()) and int(spec.q_idx[spec.q_valid].max()) >= at:
        return None
    if checkpointed_in_training(adapter) or (adapter.model.training and adapter.router_aux_coef > 0):
        return None
    return at


@contextlib.contextmanager
def main_pass_in_two(adapter, at: int):
    """Within: the language model's forward runs as two segments, [0, at) and [at, S), with ``branch_state_cache``
    (the same computation as one pass: the attention mask sliced to each segment's queries and keys, the linear /
    conv states carried by the cache; the saliency capture in the first segment only, where ``prompt_split_at`` put
    its queries), and returns the concatenated hidden states. Yields a dict that then holds ``prefix``: (at, each
    layer's states after the first segment), what ``snapshot_branch_hidden`` starts its replay from."""
    lm = adapter.language_model
    own = lm.__dict__.get("forward")
    original = lm.forward
    got: dict = {}

    def two(*args, **kw):
        x, pos, mask = kw.get("inputs_embeds"), kw.get("position_ids"), kw.get("attention_mask")
        if args or x is None or pos is None or not 1 <= at < x.shape[1]:
            return original(*args, **kw)
        cache = adapter.branch_state_cache()

        def part(a: int, b: int):
            k = dict(kw, inputs_embeds=x[:, a:b], position_ids=pos[..., a:b], cache=cache, use_cache=True)
            if mask is not None:
                k["attention_mask"] = ({n: m[:, :, a:b, :b] for n, m in mask.items()} if isinstance(mask, dict)
                                       else mask[:, :, a:b, :b])
            return original(**k)

        first = part(0, at)
        got["prefix"] = (at, [(dict(x.conv_states), dict(x.recurrent_states), dict(x.conv_kernel_size))
                              if isinstance(x, SnapshotLinearLayer) else (x.keys, x.values) for x in cache.layers])
        with use_alignti_attention(adapter, None):
            second = part(at, x.shape[1])
        first.last_hidden_state = torch.cat([first.last_hidden_state, second.last_hidden_state], 1)
        return first

    lm.forward = two
    try:
        yield got
    finally:
        if own is None:
            del lm.forward
        else:
            lm.forward = own


def stack_snapshots(snaps: list) -> list:
    """Per decoder layer: None for an attention layer, else ({state index: [P, ...] conv states or None}, {the same
    for recurrent states}), the P snapshots (``snaps[p][layer]``: a layer's state dicts, batch of one) stacked."""
    out = []
    for i, first in enumerate(snaps[0]):
        if first is None:
            out.append(None)
            continue
        out.append(tuple({k: None if first[which][k] is None else torch.cat([sn[i][which][k] for sn in snaps])
                          for k in first[which]} for which in (0, 1)))
    return out


def stack_prefix_kv(caches: dict, n: int) -> tuple[list, int]:
    """Per decoder layer: None for a linear / conv layer, else (keys, values) [n, heads, L, head_dim] of the samples'
    replayed prefixes (``caches[b]``, zeros past a sample's own length and for a sample without one), L the longest."""
    any_cache = next(iter(caches.values()))
    kv_len = max(c.get_seq_length(i) for c in caches.values() for i, layer in enumerate(c.layers)
                 if type(layer) is DynamicLayer) if any(type(x) is DynamicLayer for x in any_cache.layers) else 0
    out = []
    for i, layer in enumerate(any_cache.layers):
        if type(layer) is not DynamicLayer:
            out.append(None)
            continue
        pair = []
        for which in ("keys", "values"):
            ref = getattr(layer, which)
            full = ref.new_zeros(n, ref.shape[1], kv_len, ref.shape[3])
            rows = [torch.nn.functional.pad(getattr(caches[b].layers[i], which)[0],
                                            (0, 0, 0, kv_len - caches[b].layers[i].get_seq_length()))
                    if b in caches else full[b] for b in range(n)]
            pair.append(torch.stack(rows))
        out.append(tuple(pair))
    return out, kv_len


def fork_cache(states: list, kv: list, snap: torch.Tensor, n_branch: int) -> DynamicCache:
    """A cache of ``n_branch`` consecutive rows per snapshot snap[p]: each conv layer's states of that snapshot per
    row, each Gated DeltaNet layer's recurrent state once per snapshot (the rows of one snapshot read it through
    ``shared_state_one_token_delta_rule``), each attention layer a ``ForkAttentionLayer`` of the prefix's length
    (``kv``: ``stack_prefix_kv``'s layout; the rows read their samples' keys and values through ``fork_attention``);
    ``states``: ``stack_snapshots``."""
    fork = DynamicCache()
    fork.layer_class_to_replicate = None
    layers = []
    for st, pair in zip(states, kv):
        if st is not None:
            conv = {k: None if v is None else v.index_select(0, snap.to(v.device).repeat_interleave(n_branch))
                    for k, v in st[0].items()}  # each layer's own device (a teacher split over GPUs)
            rec = {k: None if v is None else v.index_select(0, snap.to(v.device)) for k, v in st[1].items()}
            f = SnapshotLinearLayer(number_of_states=len(conv))
            f.set_states(conv, rec, {k: None if v is None else v.shape[-1] for k, v in conv.items()})
        else:
            f = ForkAttentionLayer(pair[0].shape[-2])
        layers.append(f)
    fork.layers = layers
    return fork
