"""Every family saved, reloaded and run through the CLI: make-demo -> dump-teacher -> train-student --loss
alignti -> evaluate, from the saved checkpoints only (a processor must reload with what it needs)."""

import json

import pytest
from typer.testing import CliRunner

from alignti.cli import app
from alignti.demo.kit import FAMILIES

runner = CliRunner()


def _json(out: str) -> dict:
    """The command's result (logs and progress bars share the captured output): the last JSON object that
    runs to the end of the output."""
    dec = json.JSONDecoder()
    for i in [j for j, ch in enumerate(out) if ch == "{"]:
        try:
            obj, end = dec.raw_decode(out, i)
        except ValueError:
            continue
        if not out[end:].strip():
            return obj
    raise AssertionError(out[-2000:])


def _ok(*args):
    res = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output[-2000:]
    return res.output


@pytest.mark.parametrize("family", FAMILIES)
def test_family_through_the_cli(family, tmp_path):
    kit = tmp_path / "kit"
    out = _ok("make-demo", kit, "--family", family, "--no-train-teacher", "--n-train", 4, "--n-val", 2, "--n-test", 2)
    assert _json(out)["teacher_trained"] is False  # said, so that evaluate's near-0 accuracy is expected
    _ok("dump-teacher", "--teacher", kit / "teacher", "--data", kit / "data/train.json", "--images",
        kit / "data/images", "--out", tmp_path / "cache", "--irs-samples", 4, "--batch-size", 4)
    out = _ok("train-student", "--student", kit / "student", "--cache", tmp_path / "cache", "--out", tmp_path / "run",
              "--loss", "alignti", "--max-steps", 2, "--batch-size", 4)
    last = _json(out)["last"]
    assert all(last[k] >= 0 for k in ("sft", "kd", "iva", "tpa"))
    from transformers import AutoConfig  # a MoE student logs its load-balancing loss beside the distillation terms
    moe = getattr(AutoConfig.from_pretrained(kit / "student").text_config, "num_experts", None)
    assert ("router_aux" in last) == bool(moe) and last.get("router_aux", 1.0) > 0
    out = _ok("evaluate", "--model", tmp_path / "run/final", "--data", kit / "data/test.json", "--images",
              kit / "data/images", "--cache", tmp_path / "cache", "--json")
    assert _json(out)["samples"] > 0


def test_processor_missing_a_setting_is_named(tmp_path):
    """OneVision's processor without num_image_tokens: a clear error naming it, from the CLI no traceback."""
    kit = tmp_path / "kit"
    _ok("make-demo", kit, "--family", "llava_onevision", "--no-train-teacher", "--n-train", 2, "--n-val", 2,
        "--n-test", 2)
    cfg = kit / "teacher" / "processor_config.json"
    saved = json.loads(cfg.read_text())
    saved.pop("num_image_tokens")
    cfg.write_text(json.dumps(saved))
    res = runner.invoke(app, ["dump-teacher", "--teacher", str(kit / "teacher"), "--data", str(kit / "data/train.json"),
                              "--images", str(kit / "data/images"), "--out", str(tmp_path / "c")])
    assert res.exit_code == 2
    text = " ".join(res.output.split())  # the log handler wraps long lines
    assert "lacks num_image_tokens" in text and "processor_config.json" in text
    assert "Traceback" not in text and not (tmp_path / "c").exists()


def test_make_demo_names_the_package_a_family_needs(tmp_path, monkeypatch):
    """make-demo --family lfm2_vl where torchvision does not import (LFM2-VL's image processor has no PIL backend):
    refused in one line naming the fix, before any file is written."""
    import importlib.util
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchvision" else find(name, *a))
    res = runner.invoke(app, ["make-demo", str(tmp_path / "kit"), "--family", "lfm2_vl", "--no-train-teacher"])
    assert res.exit_code != 0
    one = " ".join(res.output.split())
    minor = int(__import__("torch").__version__.split(".")[1])
    assert "needs torchvision" in one and f"pip install 'torchvision==0.{minor + 15}.*'" in one  # torch's own
    assert not (tmp_path / "kit").exists()
    # an LFM2-VL checkpoint given to any other command (dump-teacher, train-student, evaluate load its processor):
    # the same fix named, not transformers' "Could not load any image processor class ... torchvision"
    import json
    import transformers
    from alignti.common.errors import AlignTIError
    from alignti.common.models import load_processor
    ckpt = tmp_path / "lfm2"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "lfm2_vl"}))
    for name in ("tokenizer_config.json", "preprocessor_config.json"):
        (ckpt / name).write_text("{}")

    def no_torchvision(*args, **kwargs):  # what transformers raises for LFM2-VL without torchvision
        raise ValueError("Could not load any image processor class for lfm2. Missing optional dependencies: "
                         "torchvision. Please install the missing dependencies")
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", no_torchvision)
    with pytest.raises(AlignTIError, match=r"lfm2_vl checkpoint's image processor needs torchvision.*pip install "
                                           r"'torchvision==0\."):
        load_processor(str(ckpt))


def test_make_demo_tells_a_family_without_a_kit_from_an_unknown_one(tmp_path):
    """make-demo --family F: a registry family without a demo kit is named as such (its checkpoints work with the
    other commands), not as unknown; a name outside the registry lists the kit families."""
    from alignti.demo.kit import FAMILIES, REGISTRY
    no_kit = sorted(f for f, fam in REGISTRY.items() if fam.kit is None)
    assert no_kit, "every registry family has a kit: pick another case for this test"
    for family, says in ((no_kit[0], f"family '{no_kit[0]}' has no demo kit"), ("gemma-4", "unknown demo family")):
        res = runner.invoke(app, ["make-demo", str(tmp_path / "kit"), "--family", family, "--no-train-teacher"])
        one = " ".join(res.output.split())
        assert res.exit_code != 0 and says in one and ", ".join(FAMILIES) in one, one
        assert not (tmp_path / "kit").exists()
