"""LLaVA-format records: one sample's id, image reference(s) and turns, parsed and checked.

Input records: ``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}, ...]}`` from a JSON list, a JSONL file or a table row (common.sources reads
them); ``parse_record`` checks one and says what is wrong with it by name (``DataError``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError

ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

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
