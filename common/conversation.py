"""LLaVA-format data in, token ids with exact spans out.

Input records: ``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}, ...]}`` in a JSON list or JSONL file, multi-turn allowed.

Encoding uses the model family's own chat template and processor: every message content is
replaced by a sentinel, the conversation is rendered once, and the rendered text is cut at the
sentinels. Each piece (template markup, instruction text, response text) is tokenized on its own
and the ids concatenated, which gives exact token spans for the instruction of every user turn
and the response of every assistant turn. The piece holding the image placeholder goes through
the processor with the image, which expands the placeholder into the family's image tokens.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .adapters import ModelAdapter
from .errors import DataError

ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_SENTINEL = "\u2063ALIGNTI{}\u2063"


@dataclass
class Record:
    index: int
    sample_id: str
    # a path under --images, or "@ROW[:K]": embedded in row ROW of the data source (common.sources); a list for a
    # multi-image sample (one <image> per image, image_turns says which turn holds how many)
    image: str | list[str] | None
    turns: list[tuple[str, str]]  # (role, text), image tag removed
    source: object = field(default=None, repr=False, compare=False)  # the table source of an embedded image
    image_turns: dict[int, int] | None = None  # turn index -> images placed before its text (multi-image)

    @property
    def images(self) -> list[str]:
        return image_refs(self.image)


def image_refs(image) -> list[str]:
    """A sample's image references, from a record's ``image`` or the cache's image column (a JSON list there)."""
    if not image:
        return []
    if isinstance(image, list):
        return list(image)
    if image.startswith('["'):
        return json.loads(image)
    return [image]


def image_column(image) -> str:
    """The cache's image column value: the reference, or a JSON list of them for several images."""
    refs = image_refs(image)
    return refs[0] if len(refs) == 1 else json.dumps(refs) if refs else ""


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

    @property
    def n_resp(self) -> int:
        return int(self.response_mask.sum())


@dataclass
class Skipped:
    index: int
    sample_id: str
    error: str


def load_records(data: str | Path) -> list[Record | Skipped]:
    """The samples of ``--data``: a LLaVA JSON/JSONL file, a parquet file or folder, a datasets save_to_disk folder
    (common.sources). Problems come back as `Skipped` entries (the caller raises or records them, depending on
    --skip-bad); a source that cannot be read at all raises."""
    from .sources import open_source
    return open_source(data).records()


def check_unique(records: list) -> list:
    """Sample ids must be unique: a repeated id becomes a `Skipped` entry naming it."""
    out, seen = [], set()
    for r in records:
        if isinstance(r, Record):
            if r.sample_id in seen:
                r = Skipped(r.index, r.sample_id, str(DataError(r.sample_id, "duplicate sample id",
                                                                "give every sample a unique 'id'")))
            else:
                seen.add(r.sample_id)
        out.append(r)
    return out


def load_json_records(path: str | Path) -> list[Record | Skipped]:
    """Parse a LLaVA JSON list or JSONL file; a file that is not JSON at all raises."""
    path = Path(path)
    if not path.exists():
        raise DataError(str(path), "data file not found", "check the --data path")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(str(path), f"the data file is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                        f"{e.start} is not valid UTF-8)",
                        f"convert it to UTF-8, e.g. iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}, "
                        f"and pass the converted file as --data") from None
    raw: list[tuple[int, object]] = []
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(str(path), f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}",
                            "fix the file (a JSON list of samples, or JSONL with one sample per line)") from None
        raw = list(enumerate(items))
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                raw.append((len(raw), json.loads(line)))
            except json.JSONDecodeError as e:
                raw.append((len(raw), DataError(f"line:{lineno}", f"malformed JSON on line {lineno} of {path.name}: "
                                                 f"{e.msg} at column {e.colno}")))
    out: list[Record | Skipped] = []
    for index, item in raw:
        if isinstance(item, DataError):
            out.append(Skipped(index, item.sample, str(item)))
            continue
        try:
            out.append(parse_record(index, item))
        except DataError as e:
            out.append(Skipped(index, e.sample, str(e)))
    return check_unique(out)


def parse_record(index: int, item: object) -> Record:
    if not isinstance(item, dict):
        raise DataError(f"#{index}", f"expected a JSON object, got {type(item).__name__}")
    sid = str(item.get("id", f"#{index}"))
    convs = item.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise DataError(sid, "no 'conversations' list")
    turns: list[tuple[str, str]] = []
    for j, msg in enumerate(convs):
        if not isinstance(msg, dict) or "from" not in msg or "value" not in msg:
            raise DataError(sid, f"conversation turn {j} needs 'from' and 'value'")
        role = ROLE_MAP.get(str(msg["from"]).lower())
        if role is None:
            raise DataError(sid, f"turn {j} has unknown role '{msg['from']}' (use human/gpt)")
        value = msg["value"]
        if not isinstance(value, str):
            raise DataError(sid, f"turn {j} value is not a string")
        if role == "assistant" and not value.strip():
            raise DataError(sid, f"assistant turn {j} has an empty answer")
        turns.append((role, value.replace("<image>\n", "").replace("\n<image>", "").replace("<image>", "")))
    roles = [r for r, _ in turns if r != "system"]
    if "assistant" not in roles:
        raise DataError(sid, "no assistant turn: nothing to distil")
    for a, b in zip(roles, roles[1:]):
        if a == b:
            raise DataError(sid, f"two '{a}' turns in a row; turns must alternate human/gpt")
    if roles[0] != "user":
        raise DataError(sid, "the conversation must start with a human turn")
    image = item.get("image")
    if isinstance(image, list) and len(image) == 1:
        image = image[0]
    if isinstance(image, list):
        if not image or not all(isinstance(x, str) and x for x in image):
            raise DataError(sid, "'image' must be a path string or a list of path strings")
    elif image is not None and not isinstance(image, str):
        raise DataError(sid, "'image' must be a path string or a list of path strings")
    tags = [str(m["value"]).count("<image>") for m in convs]
    n_tags = sum(tags)
    if isinstance(image, list):  # several images: each <image> says where one goes (in order)
        if n_tags != len(image):
            raise DataError(sid, f"{len(image)} images but {n_tags} <image> placeholder(s)",
                            "put one <image> in the human turn where each image belongs")
        bad = [j for j, (t, (role, _)) in enumerate(zip(tags, turns)) if t and role != "user"]
        if bad:
            raise DataError(sid, f"turn {bad[0]} is not a human turn but holds an <image>",
                            "put each <image> in a human turn")
        return Record(index, sid, list(image), turns, image_turns={j: t for j, t in enumerate(tags) if t})
    if image and n_tags > 1:
        raise DataError(sid, f"{n_tags} <image> placeholders for one image",
                        "keep one <image> per image: give 'image' as a list for several")
    # an image with no <image> placeholder goes before the first human turn's text (LLaVA's convention)
    return Record(index, sid, image or None, turns)


def load_image(rec: Record, images_dir: str | Path | None):
    """Open the sample's image(s); returns (PIL image, sha256 of its bytes), or for a multi-image sample (list of
    PIL images, JSON list of their sha256s). An embedded image (``@ROW``) comes from the record's table source."""
    loaded = [_load_one(rec, ref, images_dir) for ref in rec.images]
    if isinstance(rec.image, list):
        return [img for img, _ in loaded], json.dumps([sha for _, sha in loaded])
    return loaded[0]


def _load_one(rec: Record, ref: str, images_dir):
    from .sources import decode_image, file_bytes, is_embedded
    if is_embedded(ref):
        if rec.source is None:
            raise DataError(rec.sample_id, f"image '{ref}' is embedded in a table, but the record has no source",
                            "load the records with common.sources.open_source")
        return rec.source.load_image(ref, rec.sample_id)
    if rec.source is not None and images_dir is None:
        images_dir = rec.source.images
    data = file_bytes(str(images_dir) if images_dir is not None else ".", ref, rec.sample_id)
    return decode_image(data, rec.sample_id, f"'{ref}'"), hashlib.sha256(data).hexdigest()


def _image_turns(rec: Record, image) -> dict[int, int]:
    """Turn index -> images placed before its text: a multi-image record's own placement; one image goes before
    the first human turn's text (LLaVA's convention)."""
    if image is None:
        return {}
    if rec.image_turns:
        return rec.image_turns
    first_user = next(i for i, (role, _) in enumerate(rec.turns) if role == "user")
    return {first_user: 1}


def _messages(turns, image_turns: dict[int, int], contents: list[str]):
    msgs = []
    for i, ((role, _), content) in enumerate(zip(turns, contents)):
        parts = [{"type": "image"}] * image_turns.get(i, 0)
        parts.append({"type": "text", "text": content})
        msgs.append({"role": role, "content": parts})
    return msgs


def _render(processor, msgs, add_generation_prompt=False) -> str:
    return processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)


def _prefix_special_ids(tokenizer) -> list[int]:
    with_sp = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    n = len(with_sp) - len(without)
    return list(with_sp[:n]) if n > 0 and with_sp[n:] == without else []


ENCODING_VERSION = 2  # 1: pieces tokenized apart (alignti < schema 4); 2: the whole rendered text at once


def _rendered_spans(processor, rec: Record, turns, image, generation_prompt: bool):
    """The rendered conversation and, per turn, the character span of its message text and (assistant
    turns) of its end-of-turn markup. Every message is first replaced by a sentinel, so the template's
    markup is known exactly; the real text is then put back and checked against the template's own
    rendering of the real messages."""
    sentinels = [_SENTINEL.format(i) for i in range(len(turns))]
    image_turns = _image_turns(rec, image)
    templ = _render(processor, _messages(turns, image_turns, sentinels), add_generation_prompt=generation_prompt)
    parts, pos, rest = [], 0, templ
    content: dict[int, tuple[int, int]] = {}
    ends: dict[int, tuple[int, int]] = {}
    for i, (s, (role, text)) in enumerate(zip(sentinels, turns)):
        if s not in rest:
            raise DataError(rec.sample_id, "the chat template dropped or altered a message",
                            "use a chat template that inserts message text verbatim")
        before, rest = rest.split(s, 1)
        parts += [before, text]
        pos += len(before)
        content[i] = (pos, pos + len(text))
        pos += len(text)
        if role == "assistant":  # the end-of-turn markup belongs to the response (the model must learn to stop)
            end = _render(processor, _messages(turns[:i + 1], image_turns, sentinels[:i + 1])).split(s, 1)[1]
            if end and rest.startswith(end):
                ends[i] = (pos, pos + len(end))
    parts.append(rest)
    full = "".join(parts)
    real = _render(processor, _messages(turns, image_turns, [t for _, t in turns]),
                   add_generation_prompt=generation_prompt)
    if real != full:
        raise DataError(rec.sample_id, "the chat template changes message text (it renders differently with the "
                        "real text than with placeholders)", "use a chat template that inserts message text verbatim")
    return full, content, ends


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
    if image is not None:
        # [image], or for several images of one sample [[...]]: the processor's multi-image mode (LLaVA-OneVision)
        out = processor(text=[full], images=[image], return_tensors="pt", add_special_tokens=add_special)
        ids = out["input_ids"][0].tolist()
        image_inputs = ModelAdapter.image_inputs(out)
        offsets = _expand_offsets(ids, text_ids, offsets, image_token_id, rec.sample_id)
    else:
        ids = text_ids

    # which piece each character of the rendered text belongs to: 0 markup, 1 instruction, 2 response
    kind_of = np.zeros(len(full) + 1, np.int8)
    turn_of_char = np.full(len(full) + 1, -1, np.int32)
    for i, (role, _) in enumerate(turns):
        s, e = content[i]
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
    img_pos = np.nonzero(input_ids == image_token_id)[0]
    spans: list[tuple[int, int]] = []
    if image is not None:
        if len(img_pos) == 0:
            raise DataError(rec.sample_id, "no image tokens after processing",
                            "check that the chat template renders {'type': 'image'}")
        spans = image_spans(img_pos, len(rec.images), rec.sample_id)
    instr_spans, resp_spans = [], []
    last_user = None
    for i, (role, _) in enumerate(turns):
        if role == "user":
            sel = np.nonzero((turn_a == i) & (kinds == 1))[0]
            last_user = (int(sel[0]), int(sel[-1]) + 1) if len(sel) else None
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
    if max_length is not None and len(input_ids) > max_length:
        raise DataError(rec.sample_id, f"{len(input_ids)} tokens, longer than the limit of {max_length}",
                        "shorten the conversation, raise --max-length if the model allows it, or pass --skip-bad")
    return Encoded(rec.index, rec.sample_id, image_column(rec.image), image_sha, input_ids, resp_mask, image_inputs,
                   int(img_pos[0]) if len(img_pos) else 0, len(img_pos), instr_spans, resp_spans, spans)


def image_spans(img_pos: np.ndarray, n_images: int, sample_id: str) -> list[tuple[int, int]]:
    """Each image's [start, end) among the image-token positions: one contiguous run per image, or (adjacent
    placeholders, as LLaVA-OneVision's template renders "<image><image>") equal runs split apart."""
    breaks = np.nonzero(np.diff(img_pos) != 1)[0] + 1
    runs = [(int(r[0]), int(r[-1]) + 1) for r in np.split(img_pos, breaks)]
    if len(runs) == n_images:
        return runs
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
