"""`alignti show-saliency`: the teacher's cached saliency over the image, and a student's beside it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from alignti.common.adapters import adapter_for
from alignti.common.batch import forward
from alignti.common.cache import CacheReader
from alignti.common.errors import AlignTIError
from alignti.common.models import load_vlm, resolve_device

from .data import CacheDataset, StudentCollator


def grid_of(saliency: np.ndarray) -> np.ndarray:
    n = saliency.shape[-1]
    side = int(round(math.sqrt(n)))
    if side * side != n:
        raise AlignTIError(f"{n} image tokens do not form a square grid (anyres tiles?); cannot overlay")
    return saliency.reshape(side, side)


def overlay(img: Image.Image, grid: np.ndarray, size: int = 240) -> Image.Image:
    base = img.convert("RGB").resize((size, size), Image.NEAREST)
    g = grid.astype(np.float32)
    g = (g - g.min()) / max(1e-12, g.max() - g.min())
    heat = Image.fromarray((g * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    h = np.asarray(heat, dtype=np.float32)[..., None] / 255.0
    red = np.zeros((size, size, 3), np.float32)
    red[..., 0] = 255
    out = np.asarray(base, np.float32) * (1 - 0.6 * h) + red * 0.6 * h
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def student_saliency(student: str, reader: CacheReader, index: int, layer: int | None, device: str = "auto"):
    model, proc = load_vlm(student, resolve_device(device))
    adapter = adapter_for(model)
    from .trainer import student_layer_for
    layer = student_layer_for(layer, reader.params["saliency_layer"], reader.params["teacher_layers"], adapter.num_layers)
    batch = StudentCollator(proc, type(adapter))([CacheDataset(reader, proc)[index]])
    dev = next(model.parameters()).device
    from .data import batch_to_device
    with torch.no_grad():
        out = forward(adapter, batch_to_device(batch, dev), capture_layers=[layer])
    return out.saliency[layer].float().cpu().numpy(), layer


def show_saliency(cache: str, sample: str, out: str | Path, student: str | None = None, turn: int = 0,
                  images: str | None = None, student_layer: int | None = None, data: str | None = None) -> dict:
    reader = CacheReader(cache)
    ids = [s["sample_id"] for s in reader.samples]
    if sample not in ids:
        raise AlignTIError(f"sample {sample} is not in the cache (or was skipped); e.g. {', '.join(ids[:3])}")
    i = ids.index(sample)
    x = reader[i]
    if "saliency" not in x or not x["n_image_tokens"]:
        raise AlignTIError(f"the cache has no saliency for sample {sample} (dumped with --saliency-layer none?)")
    img = CacheDataset(reader, None, images, data=data)[i]["pil_image"]  # a file, or embedded in the data
    panels = [("teacher (layer %d)" % reader.params["saliency_layer"], overlay(img, grid_of(x["saliency"][turn])))]
    if student:
        s, layer = student_saliency(student, reader, i, student_layer)
        panels.append((f"student (layer {layer})", overlay(img, grid_of(s[turn]))))
    s0, e0 = x["instr_spans"][turn]
    if reader.params.get("saliency_query") == "answer":  # the query is one position: title with the whole prompt turn
        s0 = x["resp_spans"][turn - 1][1] if turn else x["image_tok_start"] + x["n_image_tokens"]
    title = reader_title(reader, x["input_ids"][s0:e0], skip_special=True).strip()
    w, h = 240, 240
    canvas = Image.new("RGB", (w * len(panels) + 10 * (len(panels) - 1), h + 44), "white")
    d = ImageDraw.Draw(canvas)
    d.text((4, 2), title, fill="black")
    for j, (name, panel) in enumerate(panels):
        canvas.paste(panel, (j * (w + 10), 40))
        d.text((j * (w + 10) + 4, 20), name, fill="black")
    canvas.save(out)
    return {"sample": sample, "out": str(out), "instruction": title, "panels": [p[0] for p in panels]}


def reader_title(reader: CacheReader, ids: np.ndarray, skip_special: bool = False) -> str:
    """Decode instruction ids with the tokenizer of the student or teacher dir recorded in the manifest."""
    teacher = reader.manifest.get("dump_config", {}).get("teacher")
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(teacher).decode(ids.tolist(), skip_special_tokens=skip_special)
    except Exception:  # noqa: BLE001 - the title is cosmetic; fall back to ids
        return " ".join(map(str, ids.tolist()))
