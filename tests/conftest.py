import logging
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def kit(tmp_path_factory):
    """A small demo kit; the teacher gets a short SFT run so its distributions carry signal."""
    from alignti.demo.kit import make_demo
    out = tmp_path_factory.mktemp("kit")
    # 80 quick steps at 3e-3: peaky, non-uniform teacher distributions and saliency for the mechanics tests
    make_demo(out, n_train=40, n_val=8, n_test=8, train_teacher=True, teacher_steps=80, teacher_lr=3e-3,
              teacher_batch=16, teacher_target=None, caption_rate=0.0)
    return out


@pytest.fixture(scope="session")
def cache(kit, tmp_path_factory):
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher
    out = tmp_path_factory.mktemp("cache") / "c"
    dump_teacher(DumpConfig(teacher=str(kit / "teacher"), data=str(kit / "data/train.json"),
                            images=str(kit / "data/images"), out=str(out), limit=60, unit_size=25,
                            irs_samples=32, progress=False))
    return out
