"""Every folder alignti writes loads with the plain Auto classes (the hand-off to lmms-eval, vLLM, user scripts).

Demo kits of all four families (teacher and student) are loaded with ``AutoModelForImageTextToText``,
``GenerationConfig`` and ``AutoProcessor`` and run one ``generate`` through the processor they got. train-student's
``RUN/final`` and make-student's folders get the same check in tests/test_make_student.py.

Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision processors have a video processor; ``AutoProcessor`` looks for it and
failed on these folders ("Can't load video processor ... video_preprocessor_config.json"). They now carry its
settings (common/saving.py). Building the video processor needs torchvision: where it is missing, the test asserts
that this, and nothing about the folder, is what stops ``AutoProcessor``."""

from __future__ import annotations

import json

import pytest

from alignti.common.saving import VIDEO_PROCESSORS
from alignti.demo.kit import FAMILIES, make_demo

from tests.helpers import generate_once


@pytest.mark.parametrize("family", FAMILIES)
def test_demo_kit_folders_load_and_generate_with_the_auto_classes(family, tmp_path):
    make_demo(tmp_path, n_train=1, n_val=1, n_test=1, train_teacher=False, family=family)
    for name in ("teacher", "student"):
        folder = tmp_path / name
        saved = json.loads((folder / "processor_config.json").read_text())
        if saved["processor_class"] in VIDEO_PROCESSORS:
            video = saved["video_processor"]
            assert video["video_processor_type"] == VIDEO_PROCESSORS[saved["processor_class"]]
            image = saved["image_processor"]  # frames as the images: the same geometry (Gemma 4: patches, pooling)
            geometry = [k for k in ("size", "patch_size", "merge_size", "pooling_kernel_size") if k in image]
            assert geometry and all(video[k] == image[k] for k in geometry)
        generate_once(folder)


def test_before_the_fix_autoprocessor_failed_on_the_missing_video_processor(tmp_path):
    """What users saw: an image-only Qwen2-VL processor saved plainly lacks the video part AutoProcessor wants."""
    from transformers import AutoProcessor

    from alignti.common.saving import save_processor
    from alignti.demo import kit
    proc = kit.build_processor(kit.build_tokenizer("qwen2_vl"), "qwen2_vl")
    proc.save_pretrained(tmp_path / "plain")
    with pytest.raises(OSError, match="video"):
        AutoProcessor.from_pretrained(tmp_path / "plain")
    save_processor(proc, tmp_path / "complete")
    try:
        AutoProcessor.from_pretrained(tmp_path / "complete")
    except ImportError as e:  # found the video processor's settings; building it needs torchvision
        assert "torchvision" in str(e).lower()
