"""Procedural image-question data: coloured shapes on a 3x3 grid.

Each question's answer depends on one region of the image named by the instruction (or on a
count over the whole image), so a teacher that answers well must look where the instruction
points: that is what makes instruction-aware saliency meaningful. Deterministic by seed; answers
are correct by construction (``answer_for`` recomputes them from the scene).
"""

from __future__ import annotations

import json
import random
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


def make_scene(rng: random.Random) -> list[Item]:
    n = rng.randint(2, 5)
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


def stream(seed: int, caption_rate: float = 0.0):
    """An endless stream of (record, image) pairs from fresh scenes, for teacher training."""
    rng = random.Random(seed)
    i = 0
    while True:
        scene = make_scene(rng)
        img = render(scene)
        if rng.random() < caption_rate:
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


def write_dataset(out_dir: str | Path, n_train: int = 300, n_val: int = 40, n_test: int = 60,
                  questions_per_image: int = 3) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        recs = generate_split(out_dir, split, n, questions_per_image)
        paths[split] = out_dir / f"{split}.json"
        paths[split].write_text(json.dumps(recs, indent=1))
    return paths


def corpus() -> list[str]:
    """Every word the generator can produce, for training the demo tokenizer."""
    words = list(COLOURS) + list(SHAPES) + list(POSITIONS) + list(NUMBERS) + ["yes", "no", "a"]
    texts = ["What colour is the shape in the", "What shape is in the", "Describe the shape in the",
             "How many circles are there?", "How many squares are there?", "How many triangles are there?",
             "Is there a", "Where is the", "?", "."]
    return (texts + words + [f"a {c} {s}" for c in COLOURS for s in SHAPES] + [f"the {p}?" for p in POSITIONS]
            + ["List the shapes.", ", "])
