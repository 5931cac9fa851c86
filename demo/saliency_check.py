"""Does the teacher's cached saliency sit on the region the question names?

For every sample whose first question names grid cells (its ``meta.region``), the image token with the
highest cached saliency (first assistant turn) is mapped to its grid cell; a hit is a top token inside
the named region. Reported per question type, with the chance rate (region size / 9) beside it.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from alignti.common.cache import CacheReader

from .shapes import GRID


def token_cell(token: int, n_tokens: int) -> int:
    """Grid cell (row-major over the GRID x GRID scene) under image token ``token`` of a square token grid."""
    side = int(round(math.sqrt(n_tokens)))
    r, c = divmod(token, side)
    return (r * GRID // side) * GRID + c * GRID // side


def region_hits(cache: str | Path, data_json: str | Path) -> dict[str, dict]:
    meta = {d["id"]: d.get("meta") for d in json.loads(Path(data_json).read_text())}
    reader = CacheReader(cache)
    hits: dict[str, list[int]] = defaultdict(list)
    chance: dict[str, list[float]] = defaultdict(list)
    for i in range(len(reader)):
        x = reader[i]
        m = meta.get(x["sample_id"])
        if not m or not m.get("region") or "saliency" not in x or not x["n_image_tokens"]:
            continue
        sal = x["saliency"][0].astype(np.float32)
        top = int(sal.argmax())
        hits[m["type"]].append(int(token_cell(top, len(sal)) in m["region"]))
        chance[m["type"]].append(len(set(m["region"])) / GRID ** 2)
    return {t: {"hit_rate": float(np.mean(h)), "chance": float(np.mean(chance[t])), "n": len(h)}
            for t, h in sorted(hits.items())}
