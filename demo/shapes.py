"""Procedural image-question data: coloured shapes on a 3x3 grid.

Each question's answer depends on one region of the image named by the instruction (or on a
count over the whole image), so a teacher that answers well must look where the instruction
points: that is what makes instruction-aware saliency meaningful. Deterministic by seed; answers
are correct by construction (``answer_for`` recomputes them from the scene).
"""

from __future__ import annotations

import json
import random
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

GRID = 3
CELL = 16
IMAGE_SIZE = GRID * CELL
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 20)}
SHAPES = ("circle", "square", "triangle")
OUTLINE = (20, 20, 20)
POSITIONS = ("top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom", "bottom-right")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
SPLIT_SEEDS = {"train": 1000, "val": 2000, "test": 3000}


@dataclass(frozen=True)
class Item:
    cell: int
    colour: str
    shape: str


def make_scene(rng: random.Random, max_items: int = 5) -> list[Item]:
    n = rng.randint(2, max_items)
    cells = rng.sample(range(GRID * GRID), n)
    return [Item(c, rng.choice(list(COLOURS)), rng.choice(SHAPES)) for c in sorted(cells)]


def render(scene: list[Item]) -> Image.Image:
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (245, 245, 245))
    d = ImageDraw.Draw(img)
    for it in scene:
        x0, y0 = (it.cell % GRID) * CELL + 2, (it.cell // GRID) * CELL + 2
        x1, y1 = x0 + CELL - 5, y0 + CELL - 5
        col = COLOURS[it.colour]
        # a dark outline: the shape's signature in the pixels does not depend on its colour
        if it.shape == "circle":
            d.ellipse([x0, y0, x1, y1], fill=col, outline=OUTLINE)
        elif it.shape == "square":
            d.rectangle([x0 + 1, y0 + 1, x1 - 1, y1 - 1], fill=col, outline=OUTLINE)
        else:
            d.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=col, outline=OUTLINE)
    return img


def answer_for(scene: list[Item], qtype: str, arg: dict) -> str:
    by_cell = {it.cell: it for it in scene}
    if qtype == "colour":
        return by_cell[arg["cell"]].colour
    if qtype == "shape":
        return by_cell[arg["cell"]].shape
    if qtype == "describe":
        it = by_cell[arg["cell"]]
        return f"a {it.colour} {it.shape}"
    if qtype == "count":
        return NUMBERS[sum(it.shape == arg["shape"] for it in scene)]
    if qtype == "exists":
        return "yes" if any(it.colour == arg["colour"] and it.shape == arg["shape"] for it in scene) else "no"
    if qtype == "where":
        (it,) = [i for i in scene if i.colour == arg["colour"] and i.shape == arg["shape"]]
        return POSITIONS[it.cell]
    raise ValueError(qtype)


def question(scene: list[Item], rng: random.Random) -> tuple[str, str, dict, list[int]]:
    """(qtype, text, arg, region cells the answer depends on)."""
    qtype = rng.choices(["colour", "shape", "describe", "count", "exists", "where"], [3, 3, 2, 1, 1, 2])[0]
    if qtype in ("colour", "shape", "describe"):
        it = rng.choice(scene)
        text = {"colour": "What colour is the shape in the {}?", "shape": "What shape is in the {}?",
                "describe": "Describe the shape in the {}."}[qtype].format(POSITIONS[it.cell])
        return qtype, text, {"cell": it.cell}, [it.cell]
    if qtype == "count":
        shape = rng.choice(SHAPES)
        return qtype, f"How many {shape}s are there?", {"shape": shape}, [i.cell for i in scene if i.shape == shape]
    if qtype == "where":
        combos = {}
        for i in scene:
            combos.setdefault((i.colour, i.shape), []).append(i)
        uniq = [v[0] for v in combos.values() if len(v) == 1]
        if uniq:
            it = rng.choice(uniq)
            return qtype, f"Where is the {it.colour} {it.shape}?", {"colour": it.colour, "shape": it.shape}, [it.cell]
    # exists: half the time a present object
    if rng.random() < 0.5:
        it = rng.choice(scene)
        colour, shape, region = it.colour, it.shape, [it.cell]
    else:
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        region = [i.cell for i in scene if i.colour == colour and i.shape == shape]
    return "exists", f"Is there a {colour} {shape}?", {"colour": colour, "shape": shape}, region


def caption(scene: list[Item]) -> str:
    """Every occupied cell in reading order: dense supervision for teacher pretraining."""
    return ", ".join(f"{POSITIONS[it.cell]} {it.colour} {it.shape}" for it in sorted(scene, key=lambda i: i.cell))


LONG_FORM_QUESTION = "Describe every shape in the picture."
LONG_FORM = "long_form"  # the question type of the long-form split (meta "type")
FIELDS = ("position", "colour", "shape")


def long_form_answer(scene: list[Item]) -> str:
    """Every shape in reading order (cell 0 first), each as "<colour> <shape> in the <position>", joined by
    ", ": 15 to 40 tokens for 2 to 4 shapes with the demo tokenizer, one order so exact match is well defined.
    Its words are all in ``corpus()``, so the demo tokenizer is the same with or without long-form data."""
    return ", ".join(f"{it.colour} {it.shape} in the {POSITIONS[it.cell]}" for it in sorted(scene, key=lambda i: i.cell))


LONG_FORM_MAX_NEW_TOKENS = 48  # greedy budget for a long-form answer: the longest is 41 tokens (tests/test_long_form.py)
LONG_FORM_MAX_ITEMS = 4  # long-form scenes hold 2 to 4 shapes: 15 to 40 answer tokens with the demo tokenizer
_ITEM = re.compile(r"(\w+) (\w+) in the ([\w-]+)")


def parse_long_form(text: str) -> list[tuple[str, str, str]]:
    """The (position, colour, shape) items a long-form answer states, in its order; text that does not read as
    an item is ignored (it earns nothing in ``field_scores``)."""
    return [(pos, colour, shape) for colour, shape, pos in _ITEM.findall(text.lower())]


def field_scores(pred: str, scene: list[Item]) -> dict[str, float]:
    """Per-field F1 of a long-form answer against the scene: for each field F in (position, colour, shape), the
    answer's set of (position, F value) pairs against the scene's (position alone for "position"): precision over
    what the answer states, recall over the scene's shapes, F1 = 2PR / (P + R) (0 when both are empty of matches).
    "fields": the F1 over all three kinds of pair together. A shape listed twice counts once."""
    ref = {POSITIONS[it.cell]: (it.colour, it.shape) for it in scene}
    said: dict[str, tuple[str, str]] = {}
    for pos, colour, shape in parse_long_form(pred):
        said.setdefault(pos, (colour, shape))

    def pairs(items: dict, field: str) -> set:
        if field == "position":
            return {(p, "position") for p in items}
        k = 0 if field == "colour" else 1
        return {(p, field, v[k]) for p, v in items.items()}

    def f1(r: set, s: set) -> float:
        hit = len(r & s)
        return 0.0 if hit == 0 else 2 * hit / (len(r) + len(s))

    out = {f: f1(pairs(ref, f), pairs(said, f)) for f in FIELDS}
    out["fields"] = f1(set().union(*(pairs(ref, f) for f in FIELDS)), set().union(*(pairs(said, f) for f in FIELDS)))
    return out


def mean_field_scores(preds: list[str], scenes: list[list[Item]]) -> dict[str, float]:
    """``field_scores`` averaged over answers: {"position", "colour", "shape", "fields"} (0.0 for no answers)."""
    per = [field_scores(p, sc) for p, sc in zip(preds, scenes)]
    return {f: statistics.mean(x[f] for x in per) if per else 0.0 for f in (*FIELDS, "fields")}


def long_form_scenes(path: str | Path) -> dict[str, list[Item]]:
    """Sample id -> scene of a long-form split's records (their meta's "scene"); KeyError for a record without one
    (not a long-form split)."""
    return {str(r["id"]): scene_of(r["meta"]["scene"]) for r in json.loads(Path(path).read_text())}


def stream(seed: int, caption_rate: float = 0.0, long_form_rate: float = 0.0):
    """An endless stream of (record, image) pairs from fresh scenes, for teacher training; ``long_form_rate`` of
    them ask the long-form question (``long_form_answer``)."""
    rng = random.Random(seed)
    i = 0
    while True:
        long_form = bool(long_form_rate) and rng.random() < long_form_rate
        scene = make_scene(rng, LONG_FORM_MAX_ITEMS if long_form else 5)
        img = render(scene)
        if long_form:
            conv = [{"from": "human", "value": f"<image>\n{LONG_FORM_QUESTION}"},
                    {"from": "gpt", "value": long_form_answer(scene)}]
            meta = {"type": LONG_FORM, "region": [it.cell for it in scene]}
        elif rng.random() < caption_rate:
            conv = [{"from": "human", "value": "<image>\nList the shapes."}, {"from": "gpt", "value": caption(scene)}]
            meta = {"type": "caption", "region": []}  # names no single region
        else:
            qtype, text, arg, region = question(scene, rng)
            conv = [{"from": "human", "value": f"<image>\n{text}"}, {"from": "gpt", "value": answer_for(scene, qtype, arg)}]
            meta = {"type": qtype, "region": region}
        yield {"id": f"stream-{seed}-{i}", "image": None, "conversations": conv, "meta": meta}, img
        i += 1


def generate_split(out_dir: str | Path, split: str, n_images: int, questions_per_image: int = 3,
                   multi_turn_every: int = 10, seed: int | None = None) -> list[dict]:
    """Write images under out_dir/images/ and return LLaVA records for one split."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(SPLIT_SEEDS[split] if seed is None else seed)
    records = []
    for i in range(n_images):
        scene = make_scene(rng)
        name = f"{split}_{i:05d}.png"
        render(scene).save(out_dir / "images" / name)
        for q in range(questions_per_image):
            qtype, text, arg, region = question(scene, rng)
            conv = [{"from": "human", "value": f"<image>\n{text}"}, {"from": "gpt", "value": answer_for(scene, qtype, arg)}]
            meta = {"type": qtype, "region": region, "arg": arg}
            if multi_turn_every and (i * questions_per_image + q) % multi_turn_every == multi_turn_every - 1:
                qtype2, text2, arg2, region2 = question(scene, rng)
                conv += [{"from": "human", "value": text2}, {"from": "gpt", "value": answer_for(scene, qtype2, arg2)}]
                meta["turn2"] = {"type": qtype2, "region": region2}
            records.append({"id": f"{split}-{i:05d}-{q}", "image": name, "conversations": conv, "meta": meta,
                            "scene": [[it.cell, it.colour, it.shape] for it in scene]})
    return records


def generate_long_form_split(out_dir: str | Path, split: str, n_images: int, seed: int | None = None) -> list[dict]:
    """The long-form split: one question per fresh scene, "describe every shape" (``long_form_answer``), images
    under out_dir/images/ named ``<split>_long_NNNNN.png``; meta holds the scene for ``field_scores``."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random((SPLIT_SEEDS[split] if seed is None else seed) + LONG_FORM_SEED_OFFSET)
    records = []
    for i in range(n_images):
        scene = make_scene(rng, LONG_FORM_MAX_ITEMS)
        name = f"{split}_long_{i:05d}.png"
        render(scene).save(out_dir / "images" / name)
        conv = [{"from": "human", "value": f"<image>\n{LONG_FORM_QUESTION}"},
                {"from": "gpt", "value": long_form_answer(scene)}]
        scene_cells = [[it.cell, it.colour, it.shape] for it in scene]
        records.append({"id": f"{split}-long-{i:05d}", "image": name, "conversations": conv,
                        "meta": {"type": LONG_FORM, "region": [it.cell for it in scene], "scene": scene_cells},
                        "scene": scene_cells})
    return records


LONG_FORM_SEED_OFFSET = 500  # the long-form splits draw scenes apart from the short-question splits


def scene_of(cells: list) -> list[Item]:
    """A scene from its JSON form ``[[cell, colour, shape], ...]`` (records' "scene", long-form meta's "scene")."""
    return [Item(int(c), str(col), str(sh)) for c, col, sh in cells]


def write_dataset(out_dir: str | Path, n_train: int = 300, n_val: int = 40, n_test: int = 60,
                  questions_per_image: int = 3, n_long: dict[str, int] | None = None) -> dict[str, Path]:
    """train/val/test.json (short questions), and with ``n_long`` ({split: images}) the long-form splits
    ``<split>_long.json``, keyed ``<split>_long`` in the returned paths."""
    out_dir = Path(out_dir)
    paths = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        recs = generate_split(out_dir, split, n, questions_per_image)
        paths[split] = out_dir / f"{split}.json"
        paths[split].write_text(json.dumps(recs, indent=1))
    for split, n in (n_long or {}).items():
        key = f"{split}_long"
        paths[key] = out_dir / f"{key}.json"
        paths[key].write_text(json.dumps(generate_long_form_split(out_dir, split, n), indent=1))
    return paths


def corpus() -> list[str]:
    """Every word the generator can produce, for training the demo tokenizer."""
    words = list(COLOURS) + list(SHAPES) + list(POSITIONS) + list(NUMBERS) + ["yes", "no", "a"]
    texts = ["What colour is the shape in the", "What shape is in the", "Describe the shape in the",
             "How many circles are there?", "How many squares are there?", "How many triangles are there?",
             "Is there a", "Where is the", "?", "."]
    return (texts + words + [f"a {c} {s}" for c in COLOURS for s in SHAPES] + [f"the {p}?" for p in POSITIONS]
            + ["List the shapes.", ", "])
