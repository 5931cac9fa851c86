"""LLaVA-format records: one sample's id, image reference(s) and turns, parsed and checked.

Input records: ``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}, ...]}`` from a JSON list, a JSONL file or a table row (common.sources reads
them); ``parse_record`` checks one and says what is wrong with it by name (``DataError``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError, DataSourceError

PLACEHOLDER = "<image>"
# one placeholder with the line break that sets it apart from the text, if any ("<image>\\nQ", "Q\\n<image>")
_PLACEHOLDER_RE = re.compile(r"<image>\n|\n<image>|<image>")

ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
ROLE_OUT = {"user": "human", "assistant": "gpt", "system": "system"}  # the LLaVA name of each role ROLE_MAP gives

@dataclass
class Record:
    index: int
    sample_id: str
    # a path under --images, or "@ROW[:K]": embedded in row ROW of the data source (common.sources); a list for a
    # multi-image sample (one <image> per image, image_turns says which turn holds how many)
    image: str | list[str] | None
    turns: list[tuple[str, str]]  # (role, text), image placeholders (and the line break beside each) removed
    source: object = field(default=None, repr=False, compare=False)  # the table source of an embedded image
    # turn index -> the character offsets in that turn's text where its images go, one per image, in order (the
    # <image> placeholders' places); an image without a placeholder goes at offset 0 of the first human turn
    image_at: dict[int, list[int]] | None = None

    @property
    def image_turns(self) -> dict[int, int]:
        """Turn index -> how many images that turn holds."""
        return {t: len(offs) for t, offs in (self.image_at or {}).items()}

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
class Skipped:
    index: int
    sample_id: str
    error: str


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
        raise DataSourceError(str(path), "data file not found", "check the --data path")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors, pandas) is not data
    except UnicodeDecodeError as e:
        raise DataSourceError(str(path), f"the data file is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                              f"{e.start} is not valid UTF-8)",
                              f"convert it to UTF-8, e.g. iconv -f latin1 -t utf-8 {path.name} > "
                              f"{path.stem}.utf8{path.suffix}, and pass the converted file as --data") from None
    raw: list[tuple[int, object]] = []
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataSourceError(str(path), f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}",
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


def split_placeholders(text: str) -> tuple[str, list[int]]:
    """``text`` without its ``<image>`` placeholders (each with the line break that sets it apart, as in
    ``"<image>\\nQ"``), and the character offset in the returned text where each placeholder stood."""
    out, offsets, pos = [], [], 0
    for m in _PLACEHOLDER_RE.finditer(text):
        out.append(text[pos:m.start()])
        offsets.append(sum(len(x) for x in out))
        pos = m.end()
    out.append(text[pos:])
    return "".join(out), offsets


def join_placeholders(text: str, offsets: list[int]) -> str:
    """The inverse of ``split_placeholders``: ``text`` with an ``<image>`` placeholder at each offset (ascending),
    written so that ``split_placeholders`` gives back exactly ``(text, offsets)``: at the start as ``"<image>\\n"``,
    beside a line break of the text with a line break of its own (the regex takes one with the placeholder), else
    bare."""
    out, pos = [], 0
    for o in offsets:
        out.append(text[pos:o])
        pos = o
        if o == 0:
            out.append(PLACEHOLDER + "\n")
        elif text[o - 1] == "\n":
            out.append("\n" + PLACEHOLDER)
        elif o < len(text) and text[o] == "\n":
            out.append(PLACEHOLDER + "\n")
        else:
            out.append(PLACEHOLDER)
    out.append(text[pos:])
    return "".join(out)


def parse_record(index: int, item: object, generated_last: bool = False) -> Record:
    """One LLaVA-format sample, checked. Raises ``DataError`` (sample id, what, the fix) for: no conversations,
    a turn without ``from``/``value``, an unknown role, an empty answer, a human turn with no question text
    (empty or whitespace only), turns that do not alternate, an ``image`` that is not a path or list of paths,
    an ``<image>`` placeholder in an answer or system turn, a placeholder without an image, and placeholders that
    do not match the images. Where the placeholders stand decides where the images go (``Record.image_at``).
    ``generated_last``: the last turn is a student's generated answer (a rollout row, ``common.onpolicy``), which
    may be empty: the student ended the turn at once, and its response is the end-of-turn markup alone."""
    if not isinstance(item, dict):
        raise DataError(f"#{index}", f"expected a JSON object, got {type(item).__name__}")
    sid = str(item.get("id", f"#{index}"))
    convs = item.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise DataError(sid, "no 'conversations' list")
    turns: list[tuple[str, str]] = []
    places: dict[int, list[int]] = {}
    for j, msg in enumerate(convs):
        if not isinstance(msg, dict) or "from" not in msg or "value" not in msg:
            raise DataError(sid, f"conversation turn {j} needs 'from' and 'value'")
        role = ROLE_MAP.get(str(msg["from"]).lower())
        if role is None:
            raise DataError(sid, f"turn {j} has unknown role '{msg['from']}' (use human/gpt)")
        value = msg["value"]
        if not isinstance(value, str):
            raise DataError(sid, f"turn {j} value is not a string")
        text, offsets = split_placeholders(value)
        if offsets and role != "user":  # an answer cannot show an image; "<image>" there is not text either
            raise DataError(sid, f"{'assistant' if role == 'assistant' else role} turn {j} holds an <image> "
                            "placeholder, but images go in human turns (an answer holding the text '<image>' would "
                            "be read as an image placeholder by LLaVA-format tools and by the LLaVA families' "
                            "tokenizers)", "remove it from the answer (or write it another way, e.g. '<img>'), or "
                            "pass --skip-bad")
        if role == "assistant" and not value.strip() and not (generated_last and j == len(convs) - 1):
            raise DataError(sid, f"assistant turn {j} has an empty answer")
        if role == "user" and not text.strip():
            raise DataError(sid, f"human turn {j} has no question text (empty or whitespace only"
                            f"{', besides its <image>' if offsets else ''})",
                            "write the instruction the answer responds to, or pass --skip-bad")
        if offsets:
            places[j] = offsets
        turns.append((role, text))
    roles = [r for r, _ in turns if r != "system"]
    if "assistant" not in roles:
        raise DataError(sid, "no assistant turn: nothing to distil")
    for a, b in zip(roles, roles[1:]):
        if a == b:
            raise DataError(sid, f"two '{a}' turns in a row; turns must alternate human/gpt")
    if roles[0] != "user":
        raise DataError(sid, "the conversation must start with a human turn")
    image = item.get("image")
    if isinstance(image, list) and len(image) <= 1:  # [] is no image, [x] is one
        image = image[0] if image else None
    if isinstance(image, list):
        if not image or not all(isinstance(x, str) and x for x in image):
            raise DataError(sid, "'image' must be a path string or a list of path strings")
    elif image is not None and not isinstance(image, str):
        raise DataError(sid, "'image' must be a path string or a list of path strings")
    n_tags = sum(len(v) for v in places.values())
    n_images = len(image) if isinstance(image, list) else 1 if image else 0
    if n_tags and not n_images:
        have = "no 'image' key" if "image" not in item else f"'image' is {json.dumps(item['image'])}"
        raise DataError(sid, f"{n_tags} <image> placeholder(s) without an image ({have})",
                        "give the sample its image, remove the <image> placeholder for a text-only sample, or "
                        "pass --skip-bad")
    if isinstance(image, list):  # several images: each <image> says where one goes (in order)
        if n_tags != len(image):
            raise DataError(sid, f"{len(image)} images but {n_tags} <image> placeholder(s)",
                            "put one <image> in the human turn where each image belongs")
        return Record(index, sid, list(image), turns, image_at=places)
    if image and n_tags > 1:
        raise DataError(sid, f"{n_tags} <image> placeholders for one image",
                        "keep one <image> per image: give 'image' as a list for several")
    if image and not n_tags:  # an image with no <image> placeholder goes before the first human turn's text
        places = {next(i for i, (role, _) in enumerate(turns) if role == "user"): [0]}
    return Record(index, sid, image or None, turns, image_at=places or None)
