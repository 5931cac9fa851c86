"""``make-student --from-teacher T --keep-layers SPEC``: the teacher with a subset of its decoder layers (and,
optionally, of its vision layers), the pruned initialisation of DistilBERT and Minitron.

Everything kept is the teacher's, bit for bit (tests/test_make_student.py): embeddings, vision tower, projector
(Qwen2-VL: the merger), final norm, LM head, and each kept layer. The student shares the teacher's tokenizer and
processor, so every cache the teacher dumps fits it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from torch import nn

from alignti.common.errors import AlignTIError

log = logging.getLogger("alignti.student_build")


def parse_layers(spec: str, n: int, what: str = "decoder layers") -> list[int]:
    """The layer indices (0-based, ascending) a SPEC keeps out of ``n``: ``"0-3,8,15"`` (ranges inclusive,
    singles; negative indices count from the end: ``-1`` is the last) or ``"every K"`` (layers 0, K, 2K, ...
    and always the last, so the final layer feeding the norm and head is the teacher's last).

    Raises AlignTIError naming the spec and the part that is out of range, repeated or unreadable."""
    text = spec.strip().lower()
    m = re.fullmatch(r"every\s*(\d+)", text)
    if m:
        k = int(m.group(1))
        if k < 1:
            raise AlignTIError(f"--keep-layers '{spec}': 'every K' needs K of 1 or more")
        return sorted(set(range(0, n, k)) | {n - 1})
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        r = re.fullmatch(r"(-?\d+)\s*-\s*(-?\d+)", part) if not re.fullmatch(r"-?\d+", part) else None
        try:
            lo, hi = (int(r.group(1)), int(r.group(2))) if r else (int(part), int(part))
        except ValueError:
            raise AlignTIError(f"the layer spec '{spec}' has an unreadable part '{part}' for the {what}: write "
                               "indices and ranges such as '0-3,8,15', or 'every 2'") from None
        lo, hi = (lo + n if lo < 0 else lo), (hi + n if hi < 0 else hi)
        if not (0 <= lo <= hi < n):
            raise AlignTIError(f"the layer spec '{spec}': '{part}' is outside the teacher's {n} {what} "
                               f"(0-{n - 1}, or -1 for the last)")
        out.extend(range(lo, hi + 1))
    if not out:
        raise AlignTIError(f"the layer spec '{spec}' keeps none of the teacher's {n} {what}")
    if len(set(out)) != len(out):
        twice = sorted({i for i in out if out.count(i) > 1})
        raise AlignTIError(f"the layer spec '{spec}' names the {what} {twice} more than once; name each once")
    return sorted(out)


def _vision_stack(model) -> tuple[nn.Module, str, str, nn.ModuleList]:
    """(the module holding the vision layers, its attribute name, the vision config key of their count, the
    layers): LLaVA / OneVision ``vision_tower.vision_model.encoder.layers``; Qwen2-VL ``visual.blocks``; InternVL's
    InternViT ``vision_tower.encoder.layer``; Idefics3 / SmolVLM ``vision_model.encoder.layers``."""
    from alignti.common.adapters import adapter_for
    inner = model.model
    if hasattr(inner, "visual"):
        return inner.visual, "blocks", "depth", inner.visual.blocks
    tower = adapter_for(model).vision_tower  # Idefics3 / SmolVLM: vision_model, its encoder.layers
    encoder = getattr(getattr(tower, "vision_model", tower), "encoder")
    name = "layers" if hasattr(encoder, "layers") else "layer"
    return encoder, name, "num_hidden_layers", getattr(encoder, name)


def prune_model(model, keep: list[int], keep_vision: list[int] | None = None) -> list[str]:
    """Keep only the decoder layers ``keep`` (and vision layers ``keep_vision``) of ``model`` in place, with
    the config and each attention layer's cache index renumbered, then the family's own settings
    (``ModelAdapter.prune_layers``: Qwen3-VL's deepstack). Returns the family's notes on what else was dropped."""
    from alignti.common.adapters import adapter_class
    notes = _prune_stacks(model, keep, keep_vision)
    cls = adapter_class(model.config.model_type)
    notes += cls.prune_layers(model, keep, keep_vision)
    if not cls(model).saliency_layers():
        types = sorted(set(cls(model).layer_types()))
        notes.append(f"no full-attention layer is left for IVA's saliency (the kept layers {keep} are {', '.join(types)} "
                     "layers): train this student with --loss kd or kd+tpa, or keep a full-attention layer")
    return notes


def _prune_stacks(model, keep: list[int], keep_vision: list[int] | None) -> list[str]:
    from alignti.common.adapters import adapter_for
    lm = adapter_for(model).language_model
    lm.layers = nn.ModuleList([lm.layers[i] for i in keep])
    for new, layer in enumerate(lm.layers):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new
    text = model.config.text_config
    text.num_hidden_layers = len(keep)
    if isinstance(getattr(text, "layer_types", None), list):
        text.layer_types = [text.layer_types[i] for i in keep]
    spec = text.__dict__.get("_heterogeneity_spec")  # per-layer overrides (Gemma 4's global layers' head_dim)
    if spec is not None:
        old = dict(spec.per_layer_overrides)
        text.per_layer_config = None
        renumbered = {new: old[i] for new, i in enumerate(keep) if i in old}
        if renumbered:
            text.per_layer_config = renumbered
    if keep_vision is None:
        return []
    holder, attr, key, layers = _vision_stack(model)
    setattr(holder, attr, nn.ModuleList([layers[i] for i in keep_vision]))
    vision = model.config.vision_config
    setattr(vision, key, len(keep_vision))
    full = getattr(vision, "fullatt_block_indexes", None)  # Qwen2.5-VL: the blocks with full attention
    if isinstance(full, list):
        vision.fullatt_block_indexes = [new for new, old in enumerate(keep_vision) if old in full]
    feature = getattr(model.config, "vision_feature_layer", None)  # LLaVA: which hidden state feeds the projector
    for f in (feature if isinstance(feature, list) else [feature]):
        if isinstance(f, int) and not -(len(keep_vision) + 1) <= f <= len(keep_vision):
            raise AlignTIError(f"the teacher's projector reads vision hidden state {f} (vision_feature_layer), which "
                               f"a tower of {len(keep_vision)} kept layers does not have: keep at least "
                               f"{f if f >= 0 else -f - 1} vision layers")
    return []


def prune_student(teacher: str, keep_layers: str, out: str | Path, keep_vision_layers: str | None = None) -> dict:
    """Write the pruned student to ``out``: the teacher checkpoint ``teacher`` (local folder or hub id) with the
    decoder layers of ``keep_layers`` (and the vision layers of ``keep_vision_layers``), its processor (complete,
    ``common/saving.py``) and generation config; loads with the plain Auto classes.

    Returns {"out", "family", "teacher_params", "student_params", "kept_layers", "kept_vision_layers", "dropped"
    (the family's notes on what else the pruning dropped, e.g. Qwen3-VL deepstack features)}.
    Raises AlignTIError for a spec that does not fit the teacher's layers."""
    import torch
    from transformers import AutoModelForImageTextToText

    from alignti.common.adapters import adapter_for
    from alignti.common.models import load_processor
    from alignti.common.saving import save_checkpoint

    processor = load_processor(teacher)
    model = AutoModelForImageTextToText.from_pretrained(teacher, dtype="auto")  # the stored dtype: bits unchanged
    adapter = adapter_for(model)
    n_teacher = sum(p.numel() for p in model.parameters())
    keep = parse_layers(keep_layers, adapter.num_layers)
    keep_vision = None
    if keep_vision_layers:
        keep_vision = parse_layers(keep_vision_layers, len(_vision_stack(model)[3]), "vision layers")
    with torch.no_grad():
        notes = prune_model(model, keep, keep_vision)
    for note in notes:
        log.warning("pruned student: %s", note)
    n_student = sum(p.numel() for p in model.parameters())
    save_checkpoint(model, processor, out)
    log.info("pruned student in %s: decoder layers %s of %d kept%s; %.2fM parameters (teacher %.2fM, %.0f%%)", out,
             keep, adapter.num_layers, f", vision layers {keep_vision}" if keep_vision else "", n_student / 1e6,
             n_teacher / 1e6, 100 * n_student / n_teacher)
    return {"out": str(out), "family": adapter.family, "teacher_params": n_teacher, "student_params": n_student,
            "kept_layers": keep, "kept_vision_layers": keep_vision, "dropped": notes}
