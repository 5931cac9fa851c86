"""Writing a model folder that plain transformers loads: ``AutoModelForImageTextToText``, ``AutoProcessor``,
``GenerationConfig`` (the hand-off to lmms-eval, vLLM and user scripts).

Every folder alignti writes (demo kits, ``train-student``'s ``RUN/final``, ``make-student``) goes through
``save_checkpoint``. The one gap it closes: alignti works with image-only processors (the family's video processor
needs torchvision, which image-text distillation never uses), and a family whose processor has a video processor
(Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision, Gemma 4) saved that way lacks the ``video_processor`` entry ``AutoProcessor`` looks
for ("Can't load video processor ... video_preprocessor_config.json"). ``save_processor`` adds it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("alignti.saving")

# the family processor (by class name) -> its video processor class in transformers
VIDEO_PROCESSORS = {
    "Qwen2VLProcessor": "Qwen2VLVideoProcessor",
    "Qwen2_5_VLProcessor": "Qwen2VLVideoProcessor",
    "Qwen3VLProcessor": "Qwen3VLVideoProcessor",
    "InternVLProcessor": "InternVLVideoProcessor",
    "LlavaOnevisionProcessor": "LlavaOnevisionVideoProcessor",
    "Exaone4_5_Processor": "Qwen2VLVideoProcessor",  # LLaVA-OneVision-1.5's (transformers' video_processing_auto)
    "SmolVLMProcessor": "SmolVLMVideoProcessor",
    "Gemma4Processor": "Gemma4VideoProcessor",
}
# the image processor's settings a video processor shares (same names, same meaning: sizes in pixels, the
# vision tower's patch geometry, normalisation)
SHARED_SETTINGS = ("do_convert_rgb", "do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize",
                   "image_mean", "image_std", "patch_size", "temporal_patch_size", "merge_size", "max_image_size",
                   "pooling_kernel_size")
PROCESSOR_CONFIG = "processor_config.json"


def video_processor_settings(processor) -> dict | None:
    """The ``video_processor`` entry of ``processor_config.json`` for ``processor``'s family, made from its image
    processor's settings (the same frame geometry as its images), or None for a family without videos (LLaVA) or a
    processor that already has its video processor.

    With torchvision importable the family's own video processor class builds it (``to_dict``, the library's
    format); without it, the same settings under ``video_processor_type`` (what ``to_dict`` writes besides the
    class defaults, which the class fills in on load)."""
    name = VIDEO_PROCESSORS.get(type(processor).__name__)
    if name is None or getattr(processor, "video_processor", None) is not None:
        return None
    image = processor.image_processor.to_dict()
    settings = {k: image[k] for k in SHARED_SETTINGS if k in image}
    try:
        import transformers
        video = getattr(transformers, name)(**settings)  # torchvision missing: the library's stand-in raises
        out = video.to_dict()
    except ImportError:
        out = dict(settings)
    out["video_processor_type"] = name
    return out


def save_processor(processor, folder: str | Path) -> None:
    """``processor.save_pretrained(folder)``, complete: for Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision the family's
    video processor settings go into ``processor_config.json`` too, so ``AutoProcessor.from_pretrained(folder)``
    finds every part the family's processor has (it still needs torchvision installed to build the video part,
    as for any checkpoint of these families)."""
    folder = Path(folder)
    processor.save_pretrained(folder)
    video = video_processor_settings(processor)
    if video is None:
        return
    path = folder / PROCESSOR_CONFIG
    saved = json.loads(path.read_text()) if path.exists() else {"processor_class": type(processor).__name__}
    saved["video_processor"] = video
    path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    log.debug("%s: added the %s settings to %s", folder, video["video_processor_type"], PROCESSOR_CONFIG)


def save_checkpoint(model, processor, folder: str | Path, generation_config=None) -> None:
    """The model (``save_pretrained``: config, weights, ``generation_config.json``), its complete processor
    (tokenizer, image and video processor, chat template) in ``folder``. ``generation_config``: replaces the
    model's before saving (e.g. the teacher's, for a student built from parts)."""
    if generation_config is not None:
        model.generation_config = generation_config
    model.save_pretrained(folder)
    save_processor(processor, folder)
