"""Exactness policy. Bit-for-bit equality is asserted only where the arithmetic guarantees it on any CPU: the same
computation re-run on the same shapes, batches and intra-op thread count (a dump resumed after kill -9 or after an
interruption, a redone part, 1 vs 2 dump processes with one thread each, training resumed from a checkpoint, a
checkpointed recompute against its forward), stored bytes read back (cache round trips, pushes to a URL, other data
sources giving the same samples), ids, integer data, token ids, pixels of the same image processor, a seeded RNG.
Where the two sides come from different arithmetic (another batching or padding, micro-batch split, ranks or thread
count, kernel path: batched vs single forward, cached branch pass vs tree layout, HF's attention vs ours) the tests
hold values to what that arithmetic guarantees, with the reason beside each bound (helpers in tests/exactness.py):
fp16 arrays whose fp32 sources may move by a few ulp: one fp16 ulp per element, at few elements; fp32 values of a
padded vs unpadded forward (or HF's own forward): 1e-5 (log-probs); top-k ids: equal up to near-ties
(candidates within that bound may trade places); fp32 gradients summed in another order: 1e-5 of the tensor's
largest element (sqrt(n) * eps32 growth over the step's ~1,000 tokens), plus eps32 of the step's largest
gradient for gradients that are zero in exact arithmetic. Each such test also shows it still fails on the
regression it guards (a wrong normalisation, a wrong id, branches at the wrong positions)."""

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
    """A dump at the defaults a user gets: the packed encoding, k = 64 (the kit's vocabulary is 320)."""
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher
    out = tmp_path_factory.mktemp("cache") / "c"
    dump_teacher(DumpConfig(teacher=str(kit / "teacher"), data=str(kit / "data/train.json"),
                            images=str(kit / "data/images"), out=str(out), limit=60, unit_size=25,
                            irs_samples=32, progress=False))
    return out


@pytest.fixture(scope="session")
def cache_fp16(kit, tmp_path_factory):
    """The same dump with float16 log-probs in rank order: the reference for tests about the dump's arithmetic
    (another batching, a TPA position budget, another encoding), whose two sides come from different fp32
    arithmetic; float16 holds them to one ulp (tests/exactness.py), where the packed codes would flip a whole step."""
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher
    out = tmp_path_factory.mktemp("cache_fp16") / "c"
    dump_teacher(DumpConfig(teacher=str(kit / "teacher"), data=str(kit / "data/train.json"),
                            images=str(kit / "data/images"), out=str(out), limit=60, unit_size=25,
                            irs_samples=32, progress=False, logprob_encoding="float16"))
    return out


def pytest_collection_modifyitems(config, items):
    """A registry-parametrised test of a family whose processor needs a package that is not installed here (LFM2-VL's
    image processor: torchvision, which the main env leaves out on purpose) is skipped, naming the package; it runs
    in the eval env (.ci/run's second pytest line)."""
    from alignti.common.adapters import FAMILIES
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        for value in params.values():
            fam = FAMILIES.get(value) if isinstance(value, str) else None
            missing = fam.missing_requirements() if fam is not None else []
            if missing:
                item.add_marker(pytest.mark.skip(reason=f"the {value} family's processor needs {', '.join(missing)} "
                                                        "(not installed here; .ci/run's eval env has it)"))
                break
