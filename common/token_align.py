"""Cross-tokenizer alignment: character spans of response tokens, chunks of identical text, the vocabulary map.

A teacher and a student with different tokenizers cut the same answer text into different tokens. Following GOLD
(TRL, ``docs/source/gold_trainer.md``) and ALM (Minixhofer et al., NeurIPS 2025; ``bminixhofer/tokenkit``), both
sides are aligned by the text itself: each response token gets the character span it covers in its turn's text,
and the turn is cut into **chunks** at every character offset where *both* sides start a token. A chunk is then
the same text on both sides, one or several tokens each; its first token on either side predicts the text that
starts at the same character after the same text prefix.

The span rule (``turn_char_starts``), on a turn's text of L characters plus one virtual character at index L that
stands for the end of the turn (the template's end-of-turn markup, "</s>" on one side, "<|im_end|>\\n" on the
other):

* a token's raw span is its tokenizer offsets clipped to the turn text; a token that reaches into the end-of-turn
  markup also covers L, a token wholly in the markup starts at L;
* spans are made monotone: a token starts no earlier than the previous one ends, so a token that shares a
  character with the one before it (byte-level BPE's bytes of one multi-byte character, SentencePiece's byte
  fallback) is a *continuation*: its span is empty and it belongs to the chunk of the token before it;
* the first token starts at 0 (SentencePiece's leading-space marker "▁" and byte-level BPE's "Ġ" sit on the
  template's space before the answer, outside the turn text); every gap is closed by the token before it, and the
  last token ends at L + 1.

So the spans partition [0, L + 1): every character of every answer is covered exactly once on each side.

The vocabulary map (``vocab_map``) sends a teacher id to the student id whose token adds the same bytes to the
decoded text (SentencePiece "▁Red" and byte-level "ĠRed" are both b" Red"); special tokens map by their role
(``special_roles``: the end of a turn to the end of a turn, padding to padding, ...) or, failing a role, by
identical content. With one tokenizer on both sides the map is the identity.

Where a token stands changes what it means, so two rows refine the map (``row_fix``, applied per paired row):

* a turn's **first** token may carry template markup with it: LLaVA-1.5 renders "ASSISTANT: A.", and
  SentencePiece's first answer token "▁A" holds the template's space, while ChatML's "assistant\n" + "A." gives the
  student "A". Each side's *lead* (``first_token_lead``: the bytes its realised first token adds before the answer
  text) is swapped: a teacher candidate b" X" at that row is the student's b"X" (a candidate without the teacher's
  lead continues other text than the answer's and maps to nothing);
* the **end of turn** (the row whose token starts at the virtual character L on both sides) maps the teacher's
  realised end-of-turn token ("</s>", "<|im_end|>", or LLaVA-1.5's trailing "▁") and its end-of-sequence tokens to
  the student's realised end-of-turn token, so the mass the teacher gives to stopping goes to the student's stop.
"""

from __future__ import annotations

import functools
import hashlib
import json

import numpy as np

from .errors import DataError


# --- token strings ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted (printable stand-in character -> byte)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _decoder_kind(tokenizer) -> str:
    """"byte_level" (GPT-2 / Qwen2 byte-level BPE), "sentencepiece" (a "▁" word marker: Llama, Mistral) or "plain"."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "sentencepiece" if any(t.startswith("\u2581") for t in list(tokenizer.get_vocab())[:2000]) else "plain"
    dec = backend.decoder  # its JSON alone (the whole tokenizer's JSON is megabytes for a 150k vocabulary)
    flat = json.dumps(json.loads(dec.__getstate__())) if dec is not None else "{}"
    if '"ByteLevel"' in flat:
        return "byte_level"
    if "\u2581" in flat or "\\u2581" in flat or '"Metaspace"' in flat:
        return "sentencepiece"
    return "plain"


def token_bytes(tokenizer) -> list[bytes | None]:
    """Per token id (0 .. the largest id), the bytes the token adds to decoded text: SentencePiece's "▁" is a space
    and "<0xNN>" the byte NN; byte-level BPE's stand-in characters their bytes. ``None`` for special tokens (BOS,
    EOS, image placeholders: markup, never text) and for ids the vocabulary skips."""
    return _token_bytes(tokenizer)[0]


def _token_bytes(tokenizer) -> tuple[list[bytes | None], set[int]]:
    """(``token_bytes``, the ids that are SentencePiece byte-fallback pieces "<0xNN>"), in one pass over the
    vocabulary."""
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    out: list[bytes | None] = [None] * size
    fallback: set[int] = set()
    special = set(tokenizer.all_special_ids)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special |= {i for i, t in added.items() if getattr(t, "special", False)}
    kind = _decoder_kind(tokenizer)
    dec = _byte_decoder()
    for piece, i in vocab.items():
        if i in special:
            continue
        if i in added:  # a non-special added token is inserted as its text
            out[i] = piece.encode("utf-8")
        elif kind == "byte_level":
            out[i] = bytes(dec[c] for c in piece) if all(c in dec for c in piece) else piece.encode("utf-8")
        elif kind == "sentencepiece" and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out[i] = bytes([int(piece[3:5], 16)])
            fallback.add(i)
        elif kind == "sentencepiece":
            out[i] = piece.replace("\u2581", " ").encode("utf-8")
        else:
            out[i] = piece.encode("utf-8")
    return out, fallback


def encode_token_bytes(tb: list[bytes | None]) -> list[str | None]:
    """JSON-safe form of ``token_bytes`` (hex strings), as the cache stores the teacher's."""
    return [None if b is None else b.hex() for b in tb]


def decode_token_bytes(hexes: list[str | None]) -> list[bytes | None]:
    return [None if h is None else bytes.fromhex(h) for h in hexes]


_MAP_MEMO: dict[tuple[str, str], np.ndarray] = {}


# --- special tokens by role ------------------------------------------------------------------------------------
ROLES = ("end", "bos", "pad", "unk", "image")  # "end": what ends an answer (end of sequence, template's end of turn)


def special_roles(tokenizer, end_of_turn: list[int] = (), image_token: str | None = None) -> dict:
    """The tokenizer's special tokens and their roles, JSON-ready: ``{"tokens": {id: content}, "roles": {role:
    [ids]}}``. Role "end" lists the template's end-of-turn ids (``end_of_turn``, from
    ``common.conversation.end_of_turn_ids``: "<|im_end|>" for ChatML) first, then the end-of-sequence token; "bos",
    "pad", "unk" the tokenizer's own; "image" the processor's image placeholder (``image_token``)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens = {int(i): str(t) for i, t in added.items() if getattr(t, "special", False)}
    for t, i in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids):
        tokens.setdefault(int(i), str(t))
    roles: dict[str, list[int]] = {r: [] for r in ROLES}
    roles["end"] = [int(i) for i in end_of_turn]
    for role, attr in (("end", "eos_token_id"), ("bos", "bos_token_id"), ("pad", "pad_token_id"),
                       ("unk", "unk_token_id")):
        i = getattr(tokenizer, attr, None)
        if i is not None and int(i) not in roles[role]:
            roles[role].append(int(i))
    if image_token:
        i = tokenizer.convert_tokens_to_ids(image_token)
        if i is not None and i != getattr(tokenizer, "unk_token_id", None):
            roles["image"] = [int(i)]
    return {"tokens": {str(k): v for k, v in sorted(tokens.items())}, "roles": roles}


def student_index(student_tokenizer) -> tuple[list[bytes | None], dict[bytes, int]]:
    """(the student's ``token_bytes``, bytes -> student id): where several student tokens have the same bytes, the
    one that is not a SentencePiece byte-fallback piece ("<0x41>" vs "A"), else the lowest id."""
    by_bytes: dict[bytes, int] = {}
    student_bytes, fallback = _token_bytes(student_tokenizer)
    for i, b in enumerate(student_bytes):
        if b is None:
            continue
        have = by_bytes.get(b)
        if have is None or (have in fallback and i not in fallback):
            by_bytes[b] = i
    return student_bytes, by_bytes


def vocab_map(teacher_bytes: list[bytes | None], student_tokenizer, student_key: str | None = None,
              teacher_specials: dict | None = None, student_specials: dict | None = None) -> np.ndarray:
    """int64 [V_teacher]: for each teacher id the student id whose token adds identical bytes to the text, -1 where
    the student has none. Special tokens (``*_specials``: ``special_roles`` of each side) map by role - the first
    student id of the same role, "end" to the student's end of turn - else to the student special of identical
    content, else to nothing. When the student's tokens and specials are the teacher's, the identity. Memoised per
    (teacher bytes and specials, ``student_key``: the student tokenizer's fingerprint hash) in this process."""
    h = hashlib.sha256()
    for b in teacher_bytes:  # length-prefixed, so the concatenation names the list
        h.update(b"\xff" if b is None else len(b).to_bytes(4, "little") + b)
    h.update(json.dumps([teacher_specials, student_specials], sort_keys=True).encode())
    key = (h.hexdigest(), student_key) if student_key else None
    if key is not None and key in _MAP_MEMO:
        return _MAP_MEMO[key]
    student_bytes, by_bytes = student_index(student_tokenizer)
    t_tok = (teacher_specials or {}).get("tokens", {})
    s_tok = (student_specials or {}).get("tokens", {})
    if student_bytes == list(teacher_bytes) and t_tok == s_tok:
        out = np.arange(len(teacher_bytes), dtype=np.int64)
    else:
        out = np.array([by_bytes.get(b, -1) if b is not None else -1 for b in teacher_bytes], dtype=np.int64)
        s_by_content = {v: int(k) for k, v in s_tok.items()}
        for k, v in t_tok.items():  # identical special content ("<image>", "<|im_end|>" in two Qwen tokenizers)
            if int(k) < len(out) and v in s_by_content:
                out[int(k)] = s_by_content[v]
        s_roles = (student_specials or {}).get("roles", {})
        for role, ids in ((teacher_specials or {}).get("roles", {})).items():
            target = s_roles.get(role) or []
            for i in ids:
                if target and 0 <= int(i) < len(out):
                    out[int(i)] = target[0]
    if key is not None:
        _MAP_MEMO[key] = out
    return out


def first_token_lead(token: bytes | None, text: str, n_chars: int) -> bytes:
    """The bytes a turn's first response token adds before the turn's text: ``token`` (its ``token_bytes``) covers
    the template markup before the answer plus the answer's first ``n_chars`` characters (b" A" for SentencePiece's
    "▁A" after "ASSISTANT:", b"" for "A" after ChatML's "assistant\\n"). b"" where the token does not end with those
    characters (a byte piece of a longer character, a special token)."""
    if not token:
        return b""
    own = text[:n_chars].encode("utf-8")
    if own and not token.endswith(own):
        return b""
    return token[:len(token) - len(own)]


def row_fix(ids: np.ndarray, mapped: np.ndarray, teacher_bytes: list[bytes | None], by_bytes: dict[bytes, int],
            t_lead: bytes = b"", s_lead: bytes = b"", end: tuple[list[int], int] | None = None) -> np.ndarray:
    """One paired row's teacher top-k ``ids`` [k] in the student's vocabulary, where the global map (``mapped`` [k],
    ``vocab_map``) does not tell where the token stands. ``t_lead`` / ``s_lead``: the row starts a turn and each
    side's first token carries these lead bytes (``first_token_lead``): a teacher token b = t_lead + rest maps to the
    student token s_lead + rest, one without the teacher's lead to nothing. ``end`` = (teacher ids, student id): the
    row is the end of the turn on both sides and those teacher ids (its realised end-of-turn token, its "end" role
    ids) are the student's end-of-turn token. Returns int64 [k], -1 for none."""
    out = np.asarray(mapped, np.int64).copy()
    if t_lead != s_lead:
        for j, i in enumerate(ids):
            b = teacher_bytes[int(i)] if 0 <= int(i) < len(teacher_bytes) else None
            if b is None:
                continue
            out[j] = by_bytes.get(s_lead + b[len(t_lead):], -1) if b.startswith(t_lead) else -1
    if end is not None:
        t_end, s_end = end
        out[np.isin(ids, np.asarray(list(t_end), np.int64))] = s_end
    return out


def turn_fixes(t_turns, s_turns, t_ids, s_ids, pair, teacher_bytes: list[bytes | None],
               student_bytes: list[bytes | None], t_end: list[int] = ()) -> list[tuple]:
    """The paired rows of one sample where a token's place matters (``row_fix``), as (teacher row in the sample,
    teacher lead, student lead, end or None): each turn's first row when the two sides' lead bytes differ
    (``first_token_lead`` of each side's realised first token), and each turn's end-of-turn row (the first token
    starting at the turn's virtual end character L on each side, when the two start the same chunk), with end =
    (the teacher's realised token there plus its "end" role ids ``t_end``, the student's realised token there).
    ``*_turns``: per response turn (text, token starts) as ``align_sample`` takes them; ``t_ids`` [N_t] / ``s_ids``
    [N_s]: each side's realised response ids; ``pair`` [N_s]: ``align_sample``'s."""
    out, t_at, s_at = [], 0, 0
    for (text, t_st), (_, s_st) in zip(t_turns, s_turns):
        n = len(text)
        if len(t_st) and len(s_st) and pair[s_at] == t_at:
            t_sp, s_sp = spans_from_starts(t_st, n), spans_from_starts(s_st, n)
            t0, s0 = int(t_ids[t_at]), int(s_ids[s_at])
            lead_t = first_token_lead(teacher_bytes[t0] if t0 < len(teacher_bytes) else None, text,
                                      int(min(t_sp[0, 1], n)))
            lead_s = first_token_lead(student_bytes[s0] if s0 < len(student_bytes) else None, text,
                                      int(min(s_sp[0, 1], n)))
            if lead_t != lead_s:
                out.append((t_at, lead_t, lead_s, None))
        t_eot = np.nonzero(np.asarray(t_st) >= n)[0]
        s_eot = np.nonzero(np.asarray(s_st) >= n)[0]
        if len(t_eot) and len(s_eot) and pair[s_at + s_eot[0]] == t_at + t_eot[0]:
            i, j = t_at + int(t_eot[0]), s_at + int(s_eot[0])
            out.append((i, b"", b"", (sorted({int(t_ids[i])} | {int(e) for e in t_end}), int(s_ids[j]))))
        t_at += len(t_st)
        s_at += len(s_st)
    return out


def merge_duplicates(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of mapped ids [P, k] (-1: none) and the teacher's log-probs [P, k]: where several slots of a row map to
    one student id (a role and a realised end of turn, "<0x41>" and "A"), their probabilities are summed into the
    first slot and the others become -1 with log-prob -inf, so each student id is named once per row and the
    teacher's mass is kept."""
    ids = np.asarray(ids, np.int64).copy()
    lp = np.asarray(logprobs, np.float32).copy()
    srt = np.sort(ids, -1)
    rows = np.nonzero(((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any(-1))[0] if ids.shape[-1] > 1 else []
    for r in rows:
        row = ids[r]
        first: dict[int, int] = {}
        for j, i in enumerate(row.tolist()):
            if i < 0:
                continue
            if i in first:
                lp[r, first[i]] = np.logaddexp(lp[r, first[i]], lp[r, j])
                lp[r, j] = -np.inf
                ids[r, j] = -1
            else:
                first[i] = j
    return ids, lp


# --- character spans -------------------------------------------------------------------------------------------
def turn_char_starts(offsets, content: tuple[int, int], end: int | None = None) -> np.ndarray:
    """int32 [n]: the start character of each of one assistant turn's response tokens in the turn's text, by the
    rule in the module docstring. ``offsets``: the tokens' [a, b) character offsets in the rendered text;
    ``content``: the turn text's [s, e) in the rendered text (L = e - s); ``end``: where the turn's end-of-turn
    markup ends in the rendered text (None: no markup in the response). A token's span is [start_j, start_{j+1})
    and the last one's [start_{n-1}, L + 1); an empty span marks a continuation token."""
    s, e = content
    n_char = e - s
    starts = np.zeros(len(offsets), np.int64)
    prev_end = 0
    for j, (a, b) in enumerate(offsets):
        a, b = int(a), int(b)
        lo = min(max(a - s, 0), n_char)
        hi = n_char + 1 if b > e else min(max(b - s, 0), n_char)
        if a >= e:
            lo = n_char
        if b <= a and a >= e:  # a special token in the markup (no characters of its own)
            hi = n_char + 1
        start = 0 if j == 0 else max(lo, prev_end)
        starts[j] = start
        prev_end = max(hi, start)
    return np.minimum(starts, n_char + 1).astype(np.int32)


def spans_from_starts(starts: np.ndarray, n_char: int) -> np.ndarray:
    """int64 [n, 2]: each token's [start, end) from its start (``turn_char_starts``); the last ends at n_char + 1."""
    starts = np.asarray(starts, np.int64)
    ends = np.append(starts[1:], n_char + 1)
    return np.stack([starts, ends], axis=1)


def align_turn(t_starts: np.ndarray, s_starts: np.ndarray, n_char: int):
    """The GOLD/ALM merge of one turn: chunk boundaries are the character offsets where both sides start a
    (non-empty) token. Returns (chunk_t [n_t], chunk_s [n_s], n_chunks, first_t [n_chunks], first_s [n_chunks]):
    each token's chunk (a continuation token joins the chunk of the token before it) and each chunk's first token
    on either side. Raises ValueError when either side's spans do not partition [0, n_char + 1)."""
    t_sp, s_sp = spans_from_starts(t_starts, n_char), spans_from_starts(s_starts, n_char)
    for name, sp in (("teacher", t_sp), ("student", s_sp)):
        if len(sp) == 0 or sp[0, 0] != 0 or (sp[:, 1] < sp[:, 0]).any():
            raise ValueError(f"the {name}'s token spans do not cover the turn text from its first character")
    real_t = t_sp[t_sp[:, 1] > t_sp[:, 0], 0]
    real_s = s_sp[s_sp[:, 1] > s_sp[:, 0], 0]
    bounds = np.intersect1d(real_t, real_s)  # sorted; holds 0 (both first tokens start there)

    def chunks(sp):
        c = np.searchsorted(bounds, sp[:, 0], side="right") - 1
        # continuation (empty span): the chunk of the last non-empty token before it (the first token is non-empty)
        own = np.where(sp[:, 1] > sp[:, 0], np.arange(len(sp)), 0)
        return c[np.maximum.accumulate(own)]

    def first(c):  # each chunk's first token (-1 for none; every chunk starts a token on both sides)
        out = np.full(len(bounds), -1, np.int64)
        u, at = np.unique(c, return_index=True)
        out[u] = at
        return out

    ct, cs = chunks(t_sp), chunks(s_sp)
    return ct, cs, len(bounds), first(ct), first(cs)


def align_sample(sample_id: str, teacher_turns: list[tuple[str, np.ndarray]],
                 student_turns: list[tuple[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One sample's alignment over its response turns (in response order). ``*_turns``: per response turn (its text,
    its tokens' character starts). Returns per-sample arrays: ``chunk_t`` [N_t], ``chunk_s`` [N_s] (chunk indices
    counted over the sample's turns), ``pair`` [N_s] (the teacher row, within the sample, that starts the same chunk
    as a student row that starts one; -1 otherwise), ``n_chunks``. Raises DataError naming the sample when the two
    sides' turn texts differ (a template or tokenizer that rewrites the answer): never guessed."""
    if len(teacher_turns) != len(student_turns):
        raise DataError(sample_id, f"the teacher's cache has {len(teacher_turns)} response turn(s), the student's "
                        f"encoding {len(student_turns)}", "use a student chat template that keeps every turn")
    ct_all, cs_all, pair_all = [], [], []
    n_chunks, t_at = 0, 0
    for k, ((t_text, t_st), (s_text, s_st)) in enumerate(zip(teacher_turns, student_turns)):
        if t_text != s_text:
            raise DataError(sample_id, f"response turn {k} reads differently for the student's template than it did "
                            f"for the teacher's ({t_text[:40]!r} vs {s_text[:40]!r}): cross-tokenizer alignment "
                            "needs the same text on both sides", "use a student chat template that inserts message "
                            "text verbatim, or drop the sample")
        try:
            ct, cs, n, first_t, first_s = align_turn(t_st, s_st, len(t_text))
        except ValueError as e:
            raise DataError(sample_id, f"response turn {k}: {e}", "report this tokenizer pair") from None
        pair = np.full(len(cs), -1, np.int64)
        pair[first_s] = first_t + t_at
        ct_all.append(ct + n_chunks)
        cs_all.append(cs + n_chunks)
        pair_all.append(pair)
        n_chunks += n
        t_at += len(t_st)
    cat = lambda xs: np.concatenate(xs).astype(np.int64) if xs else np.zeros(0, np.int64)  # noqa: E731
    return {"chunk_t": cat(ct_all), "chunk_s": cat(cs_all), "pair": cat(pair_all), "n_chunks": n_chunks}
