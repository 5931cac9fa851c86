"""`alignti select-layer`: the Instruction-Relevance Score of every decoder layer (METHOD.md section 2).

IRS(l) = 1 - E[cos(alpha_l(x1), alpha_l(x2))] over pairs of samples that share an image but ask
different instructions; alpha_l is the instruction-to-image attention of layer l (captured for all
layers in one sdpa forward per batch). l* = argmax IRS. Falls back to random pairs (and says so)
when no image is asked about twice.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import defaultdict

import torch

from alignti.common.adapters import adapter_for
from alignti.common.batch import collate, forward, to_device
from alignti.common.conversation import encode, with_saliency_query
from alignti.common.errors import DataError
from alignti.common.records import Record, image_column
from alignti.common.sources import load_image
from alignti.common.progress import progress_bar

log = logging.getLogger("alignti.irs")


@torch.no_grad()
def attention_maps(model, processor, records: list[Record], images: str, layers, batch_size: int = 8,
                   progress: bool = True,
                   query: str = "instruction") -> tuple[list, dict[int, list[torch.Tensor]], list]:
    """alpha of the first assistant turn for every record and every layer in ``layers``: (the indices of the
    records that encode, their maps per layer, each a [n_image_tokens] tensor in that order, and each one's image
    geometry: its token count, image grids and tiles, equal for two maps that compare token by token). A record
    that does not encode (a DataError) is left out with a warning."""
    adapter = adapter_for(model)
    device = next(model.parameters()).device
    pad = processor.tokenizer.pad_token_id or 0
    encoded = []
    for r in records:
        try:
            img, sha = load_image(r, images)
            encoded.append(with_saliency_query(encode(processor, r, img, sha), query))
        except DataError as e:  # left out of the calibration; the dump itself names it (or skips it)
            log.warning("IRS calibration leaves out %s", e)
            encoded.append(None)
    keep = [i for i, e in enumerate(encoded) if e is not None]
    encoded = [encoded[i] for i in keep]
    maps: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    with progress_bar("select-layer", total=len(encoded), unit="samples", enabled=progress) as bar:
        for i in range(0, len(encoded), batch_size):
            chunk = [dict(e.__dict__, instr_spans=e.instr_spans[:1]) for e in encoded[i:i + batch_size]]
            batch = to_device(collate(chunk, pad, type(adapter)), device)
            out = forward(adapter, batch, capture_layers=list(layers))
            for layer in layers:
                for g, row in enumerate(out.saliency[layer].float().cpu()):
                    maps[layer].append(row[:chunk[g]["n_image_tokens"]])
            bar.advance(len(chunk))
    geometry = [(e.n_image_tokens, tuple(e.image_grids), tuple(e.image_tiles)) for e in encoded]
    return keep, maps, geometry


def make_pairs(records: list[Record], max_pairs_per_image: int = 6, seed: int = 0) -> tuple[list[tuple[int, int]], bool]:
    """Pairs (i, j) sharing an image with different instructions; (pairs, used_fallback)."""
    by_image = defaultdict(list)
    for i, r in enumerate(records):
        by_image[image_column(r.image)].append(i)
    rng = random.Random(seed)
    pairs = []
    for idx in by_image.values():
        cand = [(a, b) for a, b in itertools.combinations(idx, 2) if records[a].turns[0][1] != records[b].turns[0][1]]
        rng.shuffle(cand)
        pairs += cand[:max_pairs_per_image]
    if pairs:
        return pairs, False
    idx = list(range(len(records)))
    return [(a, b) for a, b in (rng.sample(idx, 2) for _ in range(4 * len(idx)))], True


def calibration_subset(records: list[Record], n: int, seed: int = 0) -> list[Record]:
    """Prefer images asked about more than once, so that pairs share an image."""
    by_image = defaultdict(list)
    for r in records:
        if r.image:
            by_image[image_column(r.image)].append(r)
    groups = [g for g in by_image.values() if len(g) > 1] or [[r] for g in by_image.values() for r in g]
    random.Random(seed).shuffle(groups)
    out = []
    for g in groups:
        room = n - len(out)
        if room <= 0 or (len(g) > 1 and room < 2):  # a lone sample of a shared image would be in no pair
            break
        out += g[:room]
    return out


def select_layer(model, processor, records: list[Record], images: str, n_samples: int = 256, batch_size: int = 8,
                 progress: bool = True, query: str = "instruction") -> dict:
    adapter = adapter_for(model)
    # the layers with softmax attention (a hybrid decoder's linear-attention / convolution layers have no map)
    layers = [i for i, m in enumerate(adapter.attention_modules()) if m is not None]
    calib = calibration_subset([r for r in records if r.image], n_samples)
    if len(calib) < 2:
        raise ValueError("select-layer needs at least two samples with images")
    keep, maps, geometry = attention_maps(model, processor, calib, images, layers, batch_size, progress, query)
    calib = [calib[i] for i in keep]
    if len(calib) < 2:
        raise ValueError("select-layer needs at least two samples whose images encode")
    pairs, fallback = make_pairs(calib)
    # a pair's maps compare token by token, so both must cover the same image grid: with dynamic resolution
    # (Qwen2-VL) images of other sizes have other grids, with InternVL's tiling other mosaics of tiles (1 x 3 and
    # 3 x 1 tiles: as many tokens, other places); pairs that share an image always match
    same = [(a, b) for a, b in pairs if geometry[a] == geometry[b]]
    if fallback:
        log.warning("no image is asked about with two different instructions: IRS uses random pairs")
    if len(same) < len(pairs):
        log.warning("IRS compares only pairs of the same image grid: %d of %d pairs kept (the rest have images of "
                    "different sizes)", len(same), len(pairs))
    n_dropped, pairs = len(pairs) - len(same), same
    unpaired = [] if fallback else sorted(set(range(len(calib))) - {i for p in pairs for i in p})
    if unpaired:
        log.warning("IRS: %d of %d calibration samples are in no compared pair (no other question about the same "
                    "image with another instruction, or another image grid): %s", len(unpaired), len(calib),
                    ", ".join(calib[i].sample_id for i in unpaired[:5]) + (" ..." if len(unpaired) > 5 else ""))
    if not pairs:
        raise ValueError("select-layer found no two calibration samples with images of the same grid (image "
                         "size), so no attention maps to compare: ask two questions about one image in the data, "
                         "or pass --saliency-layer N (a layer index) instead of auto")
    curve: list[float | None] = [None] * adapter.num_layers  # None: a layer without attention probabilities
    for layer in layers:  # per pair (pairs of different grids have maps of different lengths), then the mean
        cos = [torch.nn.functional.cosine_similarity(maps[layer][i], maps[layer][j], dim=0) for i, j in pairs]
        curve[layer] = float(1 - torch.stack(cos).mean())
    best = max(adapter.saliency_layers() or layers, key=lambda layer: curve[layer])  # IVA's (Gemma: global layers)
    return {"layer": best, "curve": curve, "pairs": len(pairs), "samples": len(calib) - len(unpaired),
            "random_pairs": fallback,
            "grid_mismatched_pairs_dropped": n_dropped}


def select_layer_command(teacher: str, data: str, images: str | None, samples: int = 256, batch_size: int = 8,
                         device: str = "auto", tp_size: int = 1, max_memory: str | None = None) -> dict | None:
    """``alignti select-layer``: the teacher at ``teacher`` (tensor-parallel over ``tp_size`` torchrun ranks, after
    the plan-before-load check), IRS over the records of ``data``. Returns the IRS result on rank 0, None on the
    other ranks (they take part in the teacher's forwards)."""
    from alignti.common import distributed as dist
    from alignti.common.models import load_config, load_vlm
    from alignti.common.placement import check_placement
    from alignti.common.sources import load_records

    env = dist.dist_env(tp_size)
    dev = dist.device_for(device, env)
    dist.init(env, dev)
    check_placement(load_config(teacher), teacher, dev, "auto", env, tp_size, max_memory=max_memory)
    model, processor = load_vlm(teacher, dev, tp_size=tp_size)
    records = [r for r in load_records(data) if isinstance(r, Record)]
    irs = dist.on_first_replica(env, lambda: select_layer(model, processor, records, images, n_samples=samples,
                                                          batch_size=batch_size, progress=env.is_main))
    return irs if env.is_main else None


def render_curve(irs: dict, width: int = 40) -> str:
    top = max(v for v in irs["curve"] if v is not None) or 1.0
    lines = ["layer  IRS       ", "-----  --------"]
    for layer, v in enumerate(irs["curve"]):
        if v is None:
            lines.append(f"{layer:5d}  {'-':>8}  (no attention: linear-attention or convolution layer)")
            continue
        mark = "  <- l*" if layer == irs["layer"] else ""
        lines.append(f"{layer:5d}  {v:8.5f}  {'#' * max(0, round(width * v / top))}{mark}")
    lines.append(f"l* = {irs['layer']} ({irs['pairs']} pairs over {irs['samples']} samples"
                 f"{', random pairs' if irs['random_pairs'] else ', pairs share the image'})")
    return "\n".join(lines)


def save_plot(irs: dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(range(len(irs["curve"])), [float("nan") if v is None else v for v in irs["curve"]], marker="o")
    ax.axvline(irs["layer"], ls="--", c="gray")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("IRS")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
