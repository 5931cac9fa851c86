"""Cross-tokenizer alignment (common/token_align.py) on real tokenizer kinds: SentencePiece with Llama-2's settings
(dummy prefix, byte fallback) with LLaVA-1.5's template against byte-level BPE with Qwen2-VL's, both trained here as
tests/test_real_templates.py does, in both directions and against themselves.

Brute-force references: every character of every answer (plus the end-of-turn position) is covered by exactly one
token on each side; each chunk's tokens spell exactly the chunk's text on both sides (their bytes, from the
vocabulary); chunk boundaries are exactly the offsets where both sides start a token; each pair's two rows start at
the same character; the vocabulary map equals a string comparison through each tokenizer's own ``decode``."""

import numpy as np
import pytest
from PIL import Image

from alignti.common.conversation import encode
from alignti.common.errors import DataError
from alignti.common.records import parse_record
from alignti.common.token_align import align_sample, spans_from_starts, token_bytes, turn_char_starts, vocab_map
from tests.test_real_templates import SAMPLES, _processor, sp_tokenizer  # noqa: F401 (the fixture)

# non-ASCII answers: SentencePiece falls back to bytes (the corpus has no such characters), byte-level BPE splits a
# character into byte tokens; a digit run (Llama's split_digits), doubled spaces
EXTRA = {
    "unicode": {"id": "u", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat does the label say?"},
        {"from": "gpt", "value": "Le carré coûte 12€  — naïve 🙂 façade."}]},
    "digits": {"id": "d", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nHow many?"}, {"from": "gpt", "value": "There are 1024 shapes, 3 red."},
        {"from": "human", "value": "And blue?"}, {"from": "gpt", "value": "  Two  blue squares\nand a circle."}]},
}
ALL = {**SAMPLES, **EXTRA}
FAMILIES = ["llava15", "qwen2_vl"]  # SentencePiece + LLaVA-1.5, byte-level BPE + Qwen2-VL


def _turns(enc, proc):
    """[(turn text, token starts, token ids)] per response turn."""
    return [(enc.turn_texts[k], enc.char_start[s:e], enc.input_ids[s:e])
            for k, (s, e) in zip(enc.resp_turns, enc.resp_spans)]


def _encode(family, sample, sp_tokenizer):
    proc = _processor(family, sp_tokenizer)
    img = Image.fromarray(np.full((96, 96, 3), 128, np.uint8))
    return proc, encode(proc, parse_record(0, ALL[sample]), img)


def _spelled(tb, ids) -> bytes:
    return b"".join(tb[int(i)] or b"" for i in ids)


@pytest.mark.parametrize("sample", list(ALL))
@pytest.mark.parametrize("teacher", FAMILIES)
@pytest.mark.parametrize("student", FAMILIES)
def test_alignment_covers_every_character_once_and_chunks_spell_the_same_text(teacher, student, sample, sp_tokenizer):
    tp, te = _encode(teacher, sample, sp_tokenizer)
    spr, se = _encode(student, sample, sp_tokenizer)
    t_turns, s_turns = _turns(te, tp), _turns(se, spr)
    al = align_sample("x", [(t, st) for t, st, _ in t_turns], [(t, st) for t, st, _ in s_turns])
    tb_t, tb_s = token_bytes(tp.tokenizer), token_bytes(spr.tokenizer)
    t_at = s_at = c_at = 0
    for (text, t_st, t_ids), (text_s, s_st, s_ids) in zip(t_turns, s_turns):
        assert text == text_s
        n = len(text)
        n_t, n_s = len(t_st), len(s_st)
        ct, cs = al["chunk_t"][t_at:t_at + n_t] - c_at, al["chunk_s"][s_at:s_at + n_s] - c_at
        for st in (t_st, s_st):  # brute force: each of the n + 1 positions (the text and its end) covered once
            sp = spans_from_starts(st, n)
            cover = np.zeros(n + 1, int)
            for a, b in sp:
                cover[a:b] += 1
            assert (cover == 1).all()
        # brute force: boundaries = positions where both sides start a non-empty token
        starts = lambda st: {int(a) for a, b in spans_from_starts(st, n) if b > a}  # noqa: E731
        bounds = sorted(starts(t_st) & starts(s_st))
        n_chunks = len(bounds)
        assert int(max(ct.max(), cs.max())) + 1 == n_chunks and set(ct) == set(cs) == set(range(n_chunks))
        # each chunk spells its text on both sides (the first chunk may carry the template's space before the
        # answer, the last the end-of-turn markup after it)
        for c in range(n_chunks):
            lo, hi = bounds[c], bounds[c + 1] if c + 1 < n_chunks else n + 1
            want = text[lo:min(hi, n)].encode()
            for ids, ch, tb in ((t_ids, ct, tb_t), (s_ids, cs, tb_s)):
                got = _spelled(tb, ids[ch == c])
                if c == 0 and got.startswith(b" ") and not want.startswith(b" "):
                    got = got[1:]
                assert got[:len(want)] == want and (hi > n or got == want), (c, got, want)
        # pairs: one per chunk, from the chunk's first student row to its first teacher row, same start character
        pair = al["pair"][s_at:s_at + n_s]
        t_sp, s_sp = spans_from_starts(t_st, n), spans_from_starts(s_st, n)
        paired = np.nonzero(pair >= 0)[0]
        assert len(paired) == n_chunks
        for j in paired:
            i = pair[j] - t_at
            assert t_sp[i, 0] == s_sp[j, 0] == bounds[cs[j]] and ct[i] == cs[j]
        t_at, s_at, c_at = t_at + n_t, s_at + n_s, c_at + n_chunks
    assert c_at == al["n_chunks"]


def test_same_tokenizer_aligns_one_to_one(sp_tokenizer):
    """With one tokenizer on both sides every token is its own chunk and pairs with itself."""
    proc, enc = _encode("qwen2_vl", "multi", sp_tokenizer)
    turns = [(t, st) for t, st, _ in _turns(enc, proc)]
    al = align_sample("x", turns, turns)
    n = sum(len(st) for _, st in turns)
    # the end-of-turn markup's trailing "\n" is a continuation of <|im_end|>'s chunk (it adds nothing to the text)
    assert (al["pair"] >= -1).all() and len(al["pair"]) == n
    own = np.nonzero(al["pair"] >= 0)[0]
    assert (al["pair"][own] == own).all() and (al["chunk_t"] == al["chunk_s"]).all()


@pytest.mark.parametrize("teacher,student", [("llava15", "qwen2_vl"), ("qwen2_vl", "llava15")])
def test_vocab_map_equals_brute_force_string_comparison(teacher, student, sp_tokenizer):
    """Reference: each tokenizer's own ``decode`` of [anchor, token] minus its decode of [anchor] (the anchor keeps
    SentencePiece from stripping a word's leading space), for every token whose text is whole characters. The map
    must send each such teacher token to a student token with the same text, and to -1 exactly when none has it."""
    tt, st = _processor(teacher, sp_tokenizer).tokenizer, _processor(student, sp_tokenizer).tokenizer
    m = vocab_map(token_bytes(tt), st)

    def texts(tok):
        anchor = tok.convert_tokens_to_ids(tok.tokenize("a")[-1])
        base = tok.decode([anchor])
        special = set(tok.all_special_ids)
        out = {}
        for i in range(len(tok)):
            if i in special:
                continue
            s = tok.decode([anchor, i])
            if "\ufffd" not in s and s.startswith(base):
                out[i] = s[len(base):]
        return out

    t_text, s_text = texts(tt), texts(st)
    by_text: dict[str, set[int]] = {}
    for i, s in s_text.items():
        by_text.setdefault(s, set()).add(i)
    checked = 0
    for i, s in t_text.items():
        if s == "" or i >= len(m):
            continue
        want = by_text.get(s, set())
        if want:
            assert int(m[i]) in want, (i, s, int(m[i]))
        else:
            assert m[i] == -1 or s_text.get(int(m[i])) is None, (i, s, int(m[i]))
        checked += 1
    assert checked > 100 and (m >= 0).sum() > 50
    for i in tt.all_special_ids:  # markup never maps
        assert m[i] == -1


def test_span_rule_byte_split_and_leading_space():
    """The rule on hand-made offsets: a token sharing a character with the one before it is a continuation (empty
    span); the first token starts at 0 even when its offsets include the template's space; markup covers L."""
    # rendered "A: é!</s>", content "é!" at [3, 5): tokens " \xc3" (3..4 incl. the space at 2), "\xa9" (3..4), "!",
    # "</s>" (5..9)
    st = turn_char_starts([(2, 4), (3, 4), (4, 5), (5, 9)], (3, 5), 9)
    sp = spans_from_starts(st, 2)
    assert sp.tolist() == [[0, 1], [1, 1], [1, 2], [2, 3]]


def test_mismatched_texts_refused_by_sample_id():
    with pytest.raises(DataError, match="sample-7.*response turn 0 reads differently"):
        align_sample("sample-7", [("Red", np.array([0, 3]))], [("red", np.array([0, 3]))])


def test_template_that_rewrites_the_answer_is_named(sp_tokenizer):
    """A student template that changes message text (here: upper-cases it) is refused naming the sample."""
    proc = _processor("qwen2_vl", sp_tokenizer)
    proc.chat_template = proc.chat_template.replace("{{ content['text'] }}", "{{ content['text'] | upper }}")
    img = Image.fromarray(np.full((96, 96, 3), 128, np.uint8))
    with pytest.raises(DataError, match="sample a.*chat template"):
        encode(proc, parse_record(0, ALL["single"]), img)


@pytest.mark.parametrize("sample", list(ALL))
@pytest.mark.parametrize("family", FAMILIES)
def test_character_starts_from_ids_equal_the_encoders(family, sample, sp_tokenizer):
    """A rollout row whose answer the dump scores as the student's own ids (common.onpolicy.response_char_starts):
    the character starts derived from decoding the ids equal those the encoder derived from the tokenizer's offsets,
    for every response turn of every sample (SentencePiece byte fallback and byte-level BPE pieces included)."""
    from alignti.common.onpolicy import response_char_starts
    proc, enc = _encode(family, sample, sp_tokenizer)
    tok = proc.tokenizer
    for text, starts, ids in _turns(enc, proc):
        # the answer tokens: the longest prefix that decodes to the turn text (the rest is end-of-turn markup)
        body = max(k for k in range(1, len(ids) + 1)
                   if tok.decode(list(ids[:k]), skip_special_tokens=False, clean_up_tokenization_spaces=False).strip()
                   == text.strip())
        got = response_char_starts(tok, ids[:body], len(ids) - body, text)
        assert got is not None and np.array_equal(got, starts), (text, got, starts)
    assert response_char_starts(tok, ids[:body], 0, text + " and more") is None
