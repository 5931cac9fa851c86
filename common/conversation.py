"""LLaVA-format data in, token ids with exact spans out.

Input: ``common.records.Record`` (a LLaVA-format sample, multi-turn allowed) and its image(s).

Encoding uses the model family's own chat template and processor: every message content is
replaced by a sentinel, the conversation is rendered once, and the rendered text is cut at the
sentinels. Each piece (template markup, instruction text, response text) is tokenized on its own
and the ids concatenated, which gives exact token spans for the instruction of every user turn
and the response of every assistant turn. The piece holding the image placeholder goes through
the processor with the image, which expands the placeholder into the family's image tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from .adapters import ModelAdapter
from .errors import DataError
from .records import Record, image_column
from .token_align import turn_char_starts

_SENTINEL = "\u2063ALIGNTI{}\u2063"


@dataclass
class Encoded:
    index: int
    sample_id: str
    image: str
    image_sha256: str
    input_ids: np.ndarray             # int32 [S]
    response_mask: np.ndarray         # uint8 [S]
    image_inputs: dict = field(default_factory=dict)
    image_tok_start: int = 0
    n_image_tokens: int = 0
    instr_spans: list[tuple[int, int]] = field(default_factory=list)
    resp_spans: list[tuple[int, int]] = field(default_factory=list)
    image_spans: list[tuple[int, int]] = field(default_factory=list)  # per image, [start, end) of its tokens
    # cross-tokenizer alignment (schema v7, common/token_align.py): per token its start character in its assistant
    # turn's text (-1 outside the responses), the text of each assistant turn, which assistant turns the
    # resp_spans are (indices among all of them), the conversation as the template received it (JSON) and the
    # image-token grid (rows, cols) of each image
    char_start: np.ndarray | None = None  # int32 [S]
    turn_texts: list[str] = field(default_factory=list)
    resp_turns: list[int] = field(default_factory=list)
    conversation: str = ""
    image_grids: list[tuple[int, int]] = field(default_factory=list)
    # tiled images (InternVL, LFM2-VL): per image (tile rows, tile cols, thumbnail, rows, cols[, thumbnail rows, cols])
    # flat, common/tiles.py ImageLayout.flat; empty when no image of the sample is tiled
    image_tiles: list[int] = field(default_factory=list)

    @property
    def n_resp(self) -> int:
        return int(self.response_mask.sum())


def _segments(rec: Record, turn: int, text: str, with_images: bool) -> list[str | None]:
    """One turn's content in order: its text cut where its images go (``rec.image_at``), ``None`` for each image;
    empty text pieces dropped. Without images, the text alone."""
    offsets = rec.image_at.get(turn, []) if with_images and rec.image_at else []
    out: list[str | None] = []
    pos = 0
    for off in offsets:
        if text[pos:off]:
            out.append(text[pos:off])
        out.append(None)
        pos = off
    if text[pos:] or not out:
        out.append(text[pos:])
    return out


def _messages(rec: Record, turns, with_images: bool, texts=None) -> tuple[list[dict], list[list[int]]]:
    """The conversation as chat-template messages: each image a ``{"type": "image"}`` part where its placeholder
    stood, the text around it ``{"type": "text"}`` parts. ``texts`` (one per text part, in order) replaces the text
    parts (the sentinels); returns (messages, per turn the indices of its text parts among all text parts)."""
    msgs, owners, k = [], [], 0
    for i, (role, text) in enumerate(turns):
        parts, mine = [], []
        for seg in _segments(rec, i, text, with_images):
            if seg is None:
                parts.append({"type": "image"})
            else:
                parts.append({"type": "text", "text": seg if texts is None else texts[k]})
                mine.append(k)
                k += 1
        msgs.append({"role": role, "content": parts})
        owners.append(mine)
    return msgs, owners


def chat_messages(rec: Record, with_images: bool = True, generation_prompt: bool = False) -> list[dict]:
    """The sample as the messages the family's chat template renders (what the processor sees for it)."""
    turns = list(rec.turns)
    if generation_prompt:
        while turns and turns[-1][0] == "assistant":
            turns.pop()
    return _messages(rec, turns, with_images)[0]


def _render(processor, msgs, add_generation_prompt=False) -> str:
    return processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)


def _prefix_special_ids(tokenizer) -> list[int]:
    with_sp = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    n = len(with_sp) - len(without)
    return list(with_sp[:n]) if n > 0 and with_sp[n:] == without else []


ENCODING_VERSION = 2  # 1: pieces tokenized apart (alignti < schema 4); 2: the whole rendered text at once


def _rendered_spans(processor, rec: Record, turns, image, generation_prompt: bool):
    """The rendered conversation and, per turn, the character spans of its text parts and (assistant turns) of its
    end-of-turn markup. Every text part is first replaced by a sentinel, so the template's markup is known
    exactly; the real text is then put back and checked against the template's own rendering of the real
    messages."""
    real_msgs, owners = _messages(rec, turns, image is not None)
    pieces = [p["text"] for m in real_msgs for p in m["content"] if p["type"] == "text"]
    sentinels = [_SENTINEL.format(k) for k in range(len(pieces))]
    msgs, _ = _messages(rec, turns, image is not None, sentinels)
    templ = _render(processor, msgs, add_generation_prompt=generation_prompt)
    parts, pos, rest = [], 0, templ
    content: dict[int, list[tuple[int, int]]] = {i: [] for i in range(len(turns))}
    ends: dict[int, tuple[int, int]] = {}
    for i, (role, _) in enumerate(turns):
        for k in owners[i]:
            s, text = sentinels[k], pieces[k]
            if s not in rest:
                raise DataError(rec.sample_id, "the chat template dropped or altered a message",
                                "use a chat template that inserts message text verbatim")
            before, rest = rest.split(s, 1)
            parts += [before, text]
            pos += len(before)
            content[i].append((pos, pos + len(text)))
            pos += len(text)
        if role == "assistant" and owners[i]:  # the end-of-turn markup belongs to the response (the model must
            # learn to stop)
            head, _ = _messages(rec, turns[:i + 1], image is not None, sentinels)
            end = _render(processor, head).split(sentinels[owners[i][-1]], 1)[1]
            if end and rest.startswith(end):
                ends[i] = (pos, pos + len(end))
    parts.append(rest)
    full = "".join(parts)
    real = _render(processor, real_msgs, add_generation_prompt=generation_prompt)
    if real != full:
        raise DataError(rec.sample_id, "the chat template changes message text (it renders differently with the "
                        "real text than with placeholders)", "use a chat template that inserts message text verbatim")
    return full, content, ends


def literal_specials(processor) -> list[str]:
    """The text tokenizer's special tokens that a message must not hold as literal text ("</s>", "<|im_end|>",
    "<|im_start|>", "<|endoftext|>", ...): the tokenizer would read each as its control token, not as the characters.
    The image placeholder is left out (``encode`` refuses it by its own count check)."""
    tok = processor.tokenizer
    added = getattr(tok, "added_tokens_decoder", {}) or {}
    out = {str(t) for t in added.values() if getattr(t, "special", False)} | set(map(str, tok.all_special_tokens))
    out.discard(getattr(processor, "image_token", None) or "<image>")
    return sorted((t for t in out if t), key=lambda t: (-len(t), t))


def check_literal_specials(processor, rec: Record) -> None:
    """Raise DataError naming the sample, the turn and the token when a message text holds one of the text
    tokenizer's special tokens (``literal_specials``) typed as text: it would become an end-of-sequence, end-of-turn
    or role token silently. Skippable (``--skip-bad``) like a typed image token."""
    specials = literal_specials(processor)
    for i, (role, text) in enumerate(rec.turns):
        hit = next((t for t in specials if t in text), None)
        if hit is not None:
            raise DataError(rec.sample_id, f"{role} turn {i} holds the tokenizer's special token {hit!r} typed as "
                            "text: the model would read it as its control token (an end of sequence, end of turn "
                            "or role marker), not as characters", "remove it or write it another way, or pass "
                            "--skip-bad")


def end_of_turn_ids(processor) -> list[int]:
    """The token ids that end an assistant turn in the processor's chat template, where generation must stop: the
    special (added) tokens of the markup the template renders right after an answer, in order (Qwen2-VL's
    ``<|im_end|>`` of ``<|im_end|>\\n``, Phi-3's ``<|end|>``, Llama-3's ``<|eot_id|>``). The markup is found as
    ``encode`` finds a response's end-of-turn markup (the rendering of a one-turn conversation cut after the
    answer's sentinel). [] when the markup holds no such token (LLaVA-1.5's " ": its model's end-of-sequence
    token, which the template does not render, ends its answers)."""
    tok = processor.tokenizer
    sent = [_SENTINEL.format(k) for k in range(2)]
    msgs = [{"role": "user", "content": [{"type": "text", "text": sent[0]}]},
            {"role": "assistant", "content": [{"type": "text", "text": sent[1]}]}]
    try:
        rendered = _render(processor, msgs)
    except Exception:  # noqa: BLE001 - a template that needs more than a text turn: no markup known
        return []
    if sent[1] not in rendered:
        return []
    end = rendered.split(sent[1], 1)[1]
    special = set(tok.all_special_ids) | {int(i) for i in getattr(tok, "added_tokens_decoder", {})}
    ids = tok(end, add_special_tokens=False)["input_ids"] if end else []
    return [int(i) for i in dict.fromkeys(ids) if int(i) in special]


def rendered_text(processor, rec: Record, with_images: bool = True) -> str:
    """The conversation as the processor's chat template renders it, checked to hold every message text verbatim
    (DataError naming the sample otherwise, and for a special token of the tokenizer typed in a message); no
    tokenizer or image processor runs."""
    check_literal_specials(processor, rec)
    return _rendered_spans(processor, rec, list(rec.turns), object() if with_images else None, False)[0]


def piecewise_tokenization_differs(tokenizer) -> bool:
    """Whether tokenizing a message apart from the markup before it gives other ids than tokenizing the joined
    text (true for SentencePiece tokenizers with a dummy prefix, false for byte-level BPE)."""
    probes = [("USER: <image>\n", "What is shown here?"), ("ASSISTANT: ", "Describe it."),
              ("<|im_start|>user\n", "What is shown here?")]
    for a, b in probes:
        joined = tokenizer(a + b, add_special_tokens=False)["input_ids"]
        apart = tokenizer(a, add_special_tokens=False)["input_ids"] + tokenizer(b, add_special_tokens=False)["input_ids"]
        if joined != apart:
            return True
    return False


def _expand_offsets(ids: list[int], text_ids: list[int], offsets: list, image_token_id: int, sample_id: str):
    """Offsets for the processor's ids: the tokenizer's offsets of the same text, each image placeholder token's
    offset repeated for each of the image tokens the processor expanded it into (one or several placeholders)."""
    if ids == text_ids:
        return list(offsets)
    plain_text = [(t, o) for t, o in zip(text_ids, offsets) if t != image_token_id]
    # each placeholder: how many text tokens precede it, and its offset
    marks, m = [], 0
    for t, o in zip(text_ids, offsets):
        if t == image_token_id:
            marks.append((m, o))
        else:
            m += 1
    if [t for t in ids if t != image_token_id] != [t for t, _ in plain_text] or not marks:
        raise DataError(sample_id, "the processor's token ids differ from the tokenizer's ids of the same text "
                        "beyond the image-token expansion", "report this processor/tokenizer pair; alignti needs "
                        "them to agree")
    out, m = [], 0
    for t in ids:
        if t == image_token_id:  # the last placeholder at or before this point of the text
            out.append(next(o for k, o in reversed(marks) if k <= m) if marks[0][0] <= m else marks[0][1])
        else:
            out.append(plain_text[m][1])
            m += 1
    return out


def _call_observing_replacements(processor, **kwargs):
    """``processor(**kwargs)`` and the (expanded texts, replacement spans) its own ``get_text_with_replacements``
    (transformers' placeholder expansion) returned during that call, observed on the instance for that one call:
    the expansion the processor used with its own settings (Gemma 3's plain call, LFM2-VL's image special tokens and
    row/column settings). (output, None, None) for a processor that does not expand placeholders through it.
    Exceptions of the processor propagate."""
    seen: dict = {}
    own = getattr(processor, "get_text_with_replacements", None)
    if own is None:
        return processor(**kwargs), None, None

    def observe(text, *args, **kw):
        texts, spans = own(text, *args, **kw)
        seen.update(texts=list(texts), spans=spans)
        return texts, spans
    processor.get_text_with_replacements = observe
    try:
        out = processor(**kwargs)
    finally:
        del processor.get_text_with_replacements
    return out, seen.get("texts"), seen.get("spans")


def _replaced_offsets(processor, full: str, texts, spans, ids: list[int], add_special: bool, sample_id: str):
    """Offsets in ``full`` for the processor's ids where its image expansion is more than repeated image tokens
    (Gemma 3: each placeholder becomes "\\n\\n<start_of_image>" + image tokens + "<end_of_image>\\n\\n", whose
    line breaks the tokenizer merges with the text around them; LFM2-VL: "<|image_start|>" + image tokens +
    "<|image_end|>"). ``texts``, ``spans``: the processor's own replacement strings for ``full``, observed during the
    call that gave ``ids`` (``_call_observing_replacements``; None when it has none), which give the expanded
    text; the tokenizer's offsets on it are mapped back to ``full``, a character inside a replacement to the
    placeholder it replaced. DataError when the tokenizer's ids of that text are not the processor's."""
    if texts is not None:
        pieces, at = [], 0  # expanded character -> character of ``full``
        for r in spans[0]:
            (s, e), (ns, ne) = r["span"], r["new_span"]
            pieces.append(np.arange(at, s))
            pieces.append(np.full(ne - ns, s))
            at = e
        pieces.append(np.arange(at, len(full) + 1))
        back = np.concatenate(pieces)
        enc = processor.tokenizer(texts[0], add_special_tokens=add_special, return_offsets_mapping=True)
        if list(enc["input_ids"]) == ids:
            return [(int(back[a]), int(back[max(b - 1, a)]) + (1 if b > a else 0)) for a, b in enc["offset_mapping"]]
    raise DataError(sample_id, "the processor's token ids differ from the tokenizer's ids of the same text "
                    "beyond the image-token expansion", "report this processor/tokenizer pair; alignti needs "
                    "them to agree")


def encode(processor, rec: Record, image, image_sha: str = "", max_length: int | None = None,
           generation_prompt: bool = False) -> Encoded:
    """Tokenize a record exactly as the model sees it at inference: the family's chat template renders the
    whole conversation, and the processor tokenizes that text in one call (image placeholder expanded into
    image tokens). The instruction and response spans are then found on those ids from the fast tokenizer's
    offset mapping: a token belongs to the piece (template markup, instruction, response) that holds its first
    non-whitespace character, so a token that carries the space before an answer word (SentencePiece's
    "▁Red", byte-level BPE's "ĠRed") is part of the answer. A response span runs from its first answer
    token through its end-of-turn markup; where the markup is only whitespace that the tokenizer merges into the
    next turn's first token (LLaVA-1.5's " " before "USER:"), that token stays markup. With
    ``generation_prompt`` the last assistant turn is dropped and the template's generation prompt appended."""
    tok = processor.tokenizer
    turns = list(rec.turns)
    if generation_prompt:
        while turns and turns[-1][0] == "assistant":
            turns.pop()
    full, content, ends = _rendered_spans(processor, rec, turns, image, generation_prompt)

    check_literal_specials(processor, rec)
    bos = _prefix_special_ids(tok)
    add_special = bool(bos) and not full.startswith(tok.decode(bos))
    try:
        text = tok(full, add_special_tokens=add_special, return_offsets_mapping=True)
    except NotImplementedError:
        raise DataError(rec.sample_id, "the tokenizer gives no offset mapping", "use the checkpoint's fast tokenizer "
                        "(tokenizer.json)") from None
    text_ids, offsets = list(text["input_ids"]), list(text["offset_mapping"])
    placeholder = getattr(processor, "image_token", "<image>")
    image_token_id = tok.convert_tokens_to_ids(placeholder)
    image_inputs: dict = {}
    n_placed = sum(len(v) for v in (rec.image_at or {}).values()) if image is not None else 0
    if text_ids.count(image_token_id) != n_placed:  # the image token typed in a message, or a template that
        # renders a placeholder of its own: the processor would expand it as an image
        raise DataError(rec.sample_id, f"its rendered text holds {text_ids.count(image_token_id)} image token(s) "
                        f"'{placeholder}' for {n_placed} image(s): a message holds the family's image token typed as "
                        "text", "remove it (mark an image's place with <image>), or pass --skip-bad")
    if image is not None:
        # [image], or for several images of one sample [[...]]: the processor's multi-image mode (LLaVA-OneVision)
        try:
            # the expansion observed in this same call: an expansion with more than image tokens needs it below
            # (one processor call per sample: the image processor's work is most of the encoding)
            out, rep_texts, rep_spans = _call_observing_replacements(
                processor, text=[full], images=[image], return_tensors="pt", add_special_tokens=add_special)
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - the processor's failure on this sample's text and images
            raise DataError(rec.sample_id, f"the processor ({type(processor).__name__}) cannot take it "
                            f"({type(e).__name__}: {e})", "fix or drop its image(s), or pass --skip-bad") from None
        ids = out["input_ids"][0].tolist()
        image_inputs = ModelAdapter.image_inputs(out)
        try:
            offsets = _expand_offsets(ids, text_ids, offsets, image_token_id, rec.sample_id)
        except DataError:  # an expansion with more than image tokens in it (Gemma 3)
            offsets = _replaced_offsets(processor, full, rep_texts, rep_spans, ids, add_special, rec.sample_id)
    else:
        ids = text_ids

    # which piece each character of the rendered text belongs to: 0 markup, 1 instruction, 2 response
    kind_of = np.zeros(len(full) + 1, np.int8)
    turn_of_char = np.full(len(full) + 1, -1, np.int32)
    for i, (role, _) in enumerate(turns):
        for s, e in content[i]:
            if role in ("user", "assistant"):
                kind_of[s:e] = 1 if role == "user" else 2
                turn_of_char[s:e] = i
        if i in ends:
            s, e = ends[i]
            kind_of[s:e] = 2
            turn_of_char[s:e] = i
    kinds = np.zeros(len(ids), np.int8)
    turn_a = np.full(len(ids), -1, np.int32)
    for j, (a, b) in enumerate(offsets):
        if b <= a:
            continue  # special tokens (BOS) and the like: markup
        seg = full[a:b]
        k = next((a + m for m, ch in enumerate(seg) if not ch.isspace()), a)
        kinds[j], turn_a[j] = kind_of[k], turn_of_char[k]

    input_ids = np.asarray(ids, dtype=np.int32)
    # the token the processor expands each placeholder into: the placeholder itself for most families; Gemma 3's
    # processor keeps its placeholder <start_of_image> and expands it into the tokenizer's image_token
    expanded = getattr(tok, "image_token", None)
    expanded_id = tok.convert_tokens_to_ids(expanded) if expanded and expanded in tok.get_vocab() else image_token_id
    img_pos = np.nonzero(input_ids == expanded_id)[0]
    spans: list[tuple[int, int]] = []
    if image is not None:
        if len(img_pos) == 0:
            raise DataError(rec.sample_id, "no image tokens after processing",
                            "check that the chat template renders {'type': 'image'}")
        spans = image_spans(img_pos, len(rec.images), rec.sample_id, row_ends=_row_end_positions(processor, input_ids),
                            owners=[offsets[p][0] for p in img_pos])
    instr_spans, resp_spans = [], []
    last_user = None
    for i, (role, _) in enumerate(turns):
        if role == "user":
            sel = np.nonzero((turn_a == i) & (kinds == 1))[0]
            last_user = _instruction_run(sel)
        elif role == "assistant":
            sel = np.nonzero((turn_a == i) & (kinds == 2))[0]
            if len(sel) == 0:
                raise DataError(rec.sample_id, f"assistant turn {i} tokenized to nothing")
            if sel[-1] - sel[0] + 1 != len(sel):
                raise DataError(rec.sample_id, f"assistant turn {i}'s tokens are not contiguous",
                                "check the chat template")
            if last_user is None:
                raise DataError(rec.sample_id, f"assistant turn {i} has no instruction before it")
            instr_spans.append(last_user)
            resp_spans.append((int(sel[0]), int(sel[-1]) + 1))
    resp_mask = np.zeros(len(ids), np.uint8)
    for s, e in resp_spans:
        resp_mask[s:e] = 1
    char_start = np.full(len(ids), -1, np.int32)
    turn_texts = []
    a_turns = [i for i, (role, _) in enumerate(turns) if role == "assistant"]
    for (s, e), i in zip(resp_spans, a_turns):
        if len(content[i]) != 1:
            raise DataError(rec.sample_id, f"assistant turn {i} is cut into {len(content[i])} text parts",
                            "an answer holds no <image>: move the image to a question")
        turn_texts.append(full[content[i][0][0]:content[i][0][1]])
        char_start[s:e] = turn_char_starts(offsets[s:e], content[i][0], ends[i][1] if i in ends else None)
    if max_length is not None and len(input_ids) > max_length:
        raise DataError(rec.sample_id, f"{len(input_ids)} tokens, longer than the limit of {max_length}",
                        "shorten the conversation, raise --max-length if the model allows it, or pass --skip-bad")
    return Encoded(rec.index, rec.sample_id, image_column(rec.image), image_sha, input_ids, resp_mask, image_inputs,
                   int(img_pos[0]) if len(img_pos) else 0, len(img_pos), instr_spans, resp_spans, spans,
                   char_start, turn_texts, list(range(len(resp_spans))), conversation_json(rec),
                   *image_layouts(processor, image_inputs, spans, image, input_ids))


def conversation_json(rec: Record) -> str:
    """The conversation as the template received it: every turn's (role, text) and where its images go (the
    cache's ``conversation`` column, schema v7; ``record_from_conversation`` reads it back)."""
    return json.dumps({"turns": [list(t) for t in rec.turns],
                       "image_at": {str(k): list(v) for k, v in (rec.image_at or {}).items()}}, ensure_ascii=False)


def record_from_conversation(index: int, sample_id: str, image, conversation: str) -> Record:
    """The Record a cache row's ``conversation`` describes (the student encodes it with its own template)."""
    c = json.loads(conversation)
    return Record(index, sample_id, image, [(r, t) for r, t in c["turns"]],
                  image_at={int(k): list(v) for k, v in c["image_at"].items()} or None)


def image_layouts(processor, image_inputs: dict, spans: list[tuple[int, int]], images,
                  input_ids: np.ndarray | None = None) -> tuple[list[tuple[int, int]], list[int]]:
    """Each image's image-token grid and, where the processor tiles images, its tiles: (``image_grids``,
    ``image_tiles``). A processor that cuts images into tiles plus a thumbnail (InternVL's ``crop_to_patches``:
    ``image_seq_length`` tokens per tile) gives each image's ``common.tiles.ImageLayout`` from the image processor's
    own canvas choice, checked against the image's token count; ``image_grids`` then says (0, 0) for a tiled image
    (no one grid: a reader that knows no tiles refuses it) and ``image_tiles`` holds every image's layout (flat,
    ``ImageLayout.flat``). LFM2-VL's processor (``spatial_shapes`` per tile, the image processor's own
    ``_get_split_layout``; each tile's tokens after a ``<|img_row_R_col_C|>`` marker) likewise, its untiled images'
    grids exact whatever their aspect (``common.tiles.split_layouts``). Otherwise ``image_grids`` (below) and no
    tiles."""
    ip = getattr(processor, "image_processor", None)
    per_tile = getattr(processor, "image_seq_length", None)
    if images is not None and per_tile and getattr(ip, "max_patches", None) and hasattr(ip, "min_patches"):
        from .tiles import ImageLayout, tiled_layout
        pics = images if isinstance(images, (list, tuple)) else [images]
        # an image whose token count is not the processor's tiling of it (called with other settings): no grid
        layouts = [tiled_layout(ip, im.height, im.width, b - a, int(per_tile)) or ImageLayout((0, 0))
                   for im, (a, b) in zip(pics, spans)]
        return _grids_and_tiles(layouts)
    shapes = image_inputs.get("spatial_shapes")
    if images is not None and shapes is not None and hasattr(ip, "_get_split_layout") and input_ids is not None:
        from .tiles import ImageLayout, split_layouts
        pics = images if isinstance(images, (list, tuple)) else [images]
        layouts = (split_layouts(ip, [(im.height, im.width) for im in pics], shapes)
                   or [ImageLayout((0, 0))] * len(pics))
        # each image's tokens as many as its layout's (the tile markers between them not counted), else no grid
        counts = [int((np.asarray(input_ids[a:b]) == input_ids[a]).sum()) for a, b in spans]
        return _grids_and_tiles([lay if lay.known and lay.n_tokens == n else ImageLayout((0, 0))
                                 for lay, n in zip(layouts, counts)])
    return image_grids(processor, image_inputs, spans, input_ids), []


def _grids_and_tiles(layouts) -> tuple[list[tuple[int, int]], list[int]]:
    """(``image_grids``, ``image_tiles``) of the images' ``common.tiles.ImageLayout``s: a tiled image's grid (0, 0),
    every image's layout flat in ``image_tiles`` where one is tiled, else none."""
    grids = [(0, 0) if lay.tiled else lay.grid for lay in layouts]
    return grids, ([v for lay in layouts for v in lay.flat()] if any(lay.tiled for lay in layouts) else [])


def image_grids(processor, image_inputs: dict, spans: list[tuple[int, int]],
                input_ids: np.ndarray | None = None) -> list[tuple[int, int]]:
    """Each image's image-token grid (rows, cols) as the processor gives it: Qwen2-VL's ``image_grid_thw`` over
    the merge size (t = 1 for an image); an image laid out in equal rows closed by the processor's row-end token
    (Mistral 3's ``[IMG_BREAK]``; ``input_ids`` given) as its rows of image tokens; a square count of tokens in one
    run (LLaVA-1.5: 576 = 24 x 24) as its square; else (0, 0): no one grid (LLaVA-OneVision's any-res tiles with
    row-end tokens; an image split into sub-images with markup between them, Idefics3 / SmolVLM), which IVA across
    grids refuses."""
    thw = image_inputs.get("image_grid_thw")
    if thw is not None:
        merge = int(getattr(getattr(processor, "image_processor", None), "merge_size", 2) or 1)
        return [(int(h) // merge, int(w) // merge) for _, h, w in thw.tolist()]
    out = []
    row_end = getattr(processor, "image_break_token_id", None)
    for a, b in spans:
        if input_ids is not None:
            seg = np.asarray(input_ids[a:b])
            rows = _runs(np.flatnonzero(seg == seg[0]))
            if len(rows) > 1:  # rows closed by the row-end token, or sub-images with markup between them
                is_rows = row_end is not None and len({len(r) for r in rows}) == 1 and all(
                    seg[r[-1] + 1] == row_end for r in rows[:-1])
                out.append((len(rows), len(rows[0])) if is_rows else (0, 0))
                continue
        side = int(round((b - a) ** 0.5))
        out.append((side, side) if side * side == b - a else (0, 0))
    return out


def _runs(pos: np.ndarray) -> list[np.ndarray]:
    """Consecutive runs of the sorted positions ``pos``."""
    return np.split(pos, np.nonzero(np.diff(pos) != 1)[0] + 1) if len(pos) else []


def _row_end_positions(processor, input_ids: np.ndarray) -> np.ndarray:
    """Positions of the processor's row-end token inside its images (Mistral 3's ``[IMG_BREAK]``, the processor's
    ``image_break_token_id``); empty for processors without one."""
    row_end = getattr(processor, "image_break_token_id", None)
    return np.flatnonzero(input_ids == row_end) if row_end is not None else np.zeros(0, np.int64)


def _instruction_run(sel: np.ndarray) -> tuple[int, int] | None:
    """A human turn's instruction span from its text tokens' positions ``sel``: one contiguous run, so an image in
    the middle of the question ("What is <image> showing?") is never part of the instruction's query positions;
    where the text is cut by images, the longest run (the last of equal ones). None if the turn has no tokens."""
    if not len(sel):
        return None
    runs = np.split(sel, np.nonzero(np.diff(sel) != 1)[0] + 1)
    best = max(range(len(runs)), key=lambda r: (len(runs[r]), r))
    return int(runs[best][0]), int(runs[best][-1]) + 1


def image_spans(img_pos: np.ndarray, n_images: int, sample_id: str, row_ends: np.ndarray | None = None,
                owners: list[int] | None = None) -> list[tuple[int, int]]:
    """Each image's [start, end) among the image-token positions: one contiguous run per image, or (adjacent
    placeholders, as LLaVA-OneVision's template renders "<image><image>") equal runs split apart. ``row_ends``:
    positions of a row-end token that the processor puts between the rows of one image (Mistral 3's
    ``[IMG_BREAK]``): two runs with one such token between them are rows of the same image. ``owners``: each image
    token's offset in the rendered text, which is its image placeholder's: runs with one owner are the parts of one
    image (an image split into sub-images framed by markup tokens, Idefics3 / SmolVLM). Either way a span runs from
    the image's first image token to its last, and its image tokens are the positions in it that hold the image
    token (``common.batch.span_image_positions``)."""
    breaks = np.nonzero(np.diff(img_pos) != 1)[0] + 1
    runs = [(int(r[0]), int(r[-1]) + 1) for r in np.split(img_pos, breaks)]
    if row_ends is not None and len(row_ends):
        ends = set(int(p) for p in row_ends)
        joined = [runs[0]]
        for a, b in runs[1:]:
            if a == joined[-1][1] + 1 and joined[-1][1] in ends:
                joined[-1] = (joined[-1][0], b)
            else:
                joined.append((a, b))
        runs = joined
    if len(runs) == n_images:
        return runs
    if owners is not None and len(set(owners)) == n_images and list(owners) == sorted(owners):
        groups = np.split(img_pos, np.nonzero(np.diff(np.asarray(owners)) != 0)[0] + 1)
        return [(int(g[0]), int(g[-1]) + 1) for g in groups]
    if n_images > 1 and len(img_pos) % n_images == 0:
        per = len(img_pos) // n_images
        pieces = [img_pos[i * per:(i + 1) * per] for i in range(n_images)]
        if all(p[-1] - p[0] + 1 == per for p in pieces):
            return [(int(p[0]), int(p[-1]) + 1) for p in pieces]
    raise DataError(sample_id, f"{n_images} image(s) but their image tokens form {len(runs)} run(s)",
                    "check the chat template: one image placeholder per image")


SALIENCY_QUERIES = ("instruction", "answer")


def check_saliency_query(query: str) -> None:
    if query not in SALIENCY_QUERIES:
        raise ValueError(f"--saliency-query must be one of {', '.join(SALIENCY_QUERIES)}, not '{query}'")


def with_saliency_query(enc: Encoded, query: str) -> Encoded:
    """Which query positions the saliency map (IVA) is taken from, per assistant turn: "instruction", the
    turn's instruction tokens (Align-TI's definition, the default); "answer", the one position whose output
    predicts the turn's first answer token (where a small model routes to the region it needs, see
    docs/method.md). The spans are stored in the cache, so the student uses the same positions."""
    check_saliency_query(query)
    if query == "answer":
        enc.instr_spans = answer_query_spans(enc.resp_spans)
    return enc


def answer_query_spans(resp_spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Per assistant turn, the one position whose output predicts the turn's first answer token."""
    return [(s - 1, s) for s, _ in resp_spans]
