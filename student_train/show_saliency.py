"""`alignti show-saliency`: the teacher's cached saliency over the image, and a student's beside it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from alignti.common.adapters import adapter_for
from alignti.common.batch import forward, span_image_positions
from alignti.common.cache import CacheReader
from alignti.common.errors import AlignTIError
from alignti.common.models import load_vlm, resolve_device
from alignti.common.tiles import layouts_of

from .data import CacheDataset, StudentCollator


def grid_of(saliency: np.ndarray, aspect: float = 1.0) -> np.ndarray:
    """An image's tokens as a rows x cols grid: the factorisation of their count whose shape matches the image's
    aspect (width / height; Qwen2-VL's merged patches follow it), else a square plus one trailing token
    (LLaVA-OneVision's image-newline token, dropped), else the closest factorisation."""
    n = saliency.shape[-1]
    pairs = [(r, n // r) for r in range(2, n) if n % r == 0]
    best = min(pairs, key=lambda rc: abs(math.log(rc[1] / rc[0] / aspect))) if pairs else None
    if best and abs(math.log(best[1] / best[0] / aspect)) < math.log(1.25):
        return saliency.reshape(best)
    side = math.isqrt(max(n - 1, 0))
    if n > 1 and side > 1 and side * side == n - 1:
        return saliency[..., :-1].reshape(side, side)
    if best:
        return saliency.reshape(best)
    raise AlignTIError(f"{n} image tokens do not form a grid (anyres tiles?); cannot overlay")


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
    imgs = CacheDataset(reader, None, images, data=data)[i]["pil_images"]  # files, or embedded in the data
    spans = x["image_spans"]  # the reader fills them for one-image caches of before v5 too
    rows = [("teacher (layer %d)" % reader.params["saliency_layer"], x["saliency"][turn])]
    if student:
        s, layer = student_saliency(student, reader, i, student_layer)
        rows.append((f"student (layer {layer})", s[turn]))
    # tiled images (InternVL, LFM2-VL): each image's map per view, the tiles put back in place and the thumbnail
    layouts = layouts_of(x.get("image_grids") or [], x["image_tiles"]) if x.get("image_tiles") else None
    panels = []  # per image, the teacher's map (and the student's below it): saliency covers the images in order
    for name, sal in rows:
        at = 0
        for k, (img, span) in enumerate(zip(imgs, spans)):
            n = len(span_image_positions(x["input_ids"], [span]))  # its image tokens (Mistral 3: not its row ends)
            piece = sal[at:at + n]
            at += n
            label = name if len(imgs) == 1 else f"{name}, image {k + 1}"
            if layouts is not None and layouts[k].tiled:
                views = layouts[k].views(torch.from_numpy(np.asarray(piece, np.float32)))
                panels.append((f"{label}, {layouts[k].tiles[0]}x{layouts[k].tiles[1]} tiles",
                               overlay(img, views[0].numpy())))
                panels.extend((f"{label}, thumbnail", overlay(img, v.numpy())) for v in views[1:])
            else:
                panels.append((label, overlay(img, grid_of(piece, img.width / img.height))))
    s0, e0 = x["instr_spans"][turn]
    if reader.params.get("saliency_query") == "answer":  # the query is one position: title with the whole prompt turn
        s0 = x["resp_spans"][turn - 1][1] if turn else x["image_tok_start"] + x["n_image_tokens"]
    title = reader_title(reader, x["input_ids"][s0:e0], skip_special=True).strip()
    w, h = 240, 240
    per_row = len(panels) // len(rows)  # panels of one map: one per image, or per view of a tiled image
    n_cols = per_row if per_row > 1 else len(panels)
    n_rows = len(panels) // n_cols
    canvas = Image.new("RGB", (w * n_cols + 10 * (n_cols - 1), (h + 24) * n_rows + 20), "white")
    d = ImageDraw.Draw(canvas)
    d.text((4, 2), title, fill="black")
    for j, (name, panel) in enumerate(panels):
        col, row = j % n_cols, j // n_cols
        canvas.paste(panel, (col * (w + 10), 40 + row * (h + 24)))
        d.text((col * (w + 10) + 4, 20 + row * (h + 24)), name, fill="black")
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
