"""Multi-image samples: "image": [..] with one <image> per image, for the families whose processors take several
(Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision). The cache records each image's token span; the saliency covers every image's tokens
(IVA aligns all of them); show-saliency draws each image; the dump -> train round trip works from JSON and from
parquet with embedded images; LLaVA-1.5 refuses such samples by name."""

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from alignti.common.adapters import FAMILIES
from alignti.common.cache import CacheReader
from alignti.common.conversation import encode
from alignti.common.records import parse_record
from alignti.common.sources import load_image
from alignti.common.errors import DataError
from alignti.common.models import load_vlm
from alignti.student_train.show_saliency import show_saliency
from alignti.student_train.trainer import TrainConfig, train_student
from alignti.teacher_dump.dump import DumpConfig, dump_teacher


def _two_image_data(kit, path):
    """Samples of two demo images each (a question about both), one single-image sample, multi-turn with the
    second image in the second human turn."""
    items = json.loads((kit / "data/train.json").read_text())
    imgs = [it["image"] for it in items]
    data = [
        {"id": "two-a", "image": [imgs[0], imgs[1]], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nDo the two images match?"}, {"from": "gpt", "value": "no"}]},
        {"id": "one", "image": imgs[2], "conversations": items[2]["conversations"]},
        {"id": "two-turns", "image": [imgs[3], imgs[4]], "conversations": [
            {"from": "human", "value": "<image>\nWhat is here?"}, {"from": "gpt", "value": "shapes"},
            {"from": "human", "value": "And here? <image>"}, {"from": "gpt", "value": "more shapes"}]},
        {"id": "two-b", "image": [imgs[5], imgs[0]], "conversations": [
            {"from": "human", "value": "<image><image>Compare them."}, {"from": "gpt", "value": "they differ"}]},
    ]
    path.write_text(json.dumps(data))
    return data


@pytest.fixture(scope="module", params=[t for t in FAMILIES if FAMILIES[t].kit and FAMILIES[t].adapter.multi_image])
def family_kit(request, tmp_path_factory):
    from alignti.demo.kit import make_demo
    out = tmp_path_factory.mktemp(request.param)
    make_demo(out, n_train=8, n_val=2, n_test=2, train_teacher=False, family=request.param)
    return request.param, out


def test_dump_and_train_with_two_images(family_kit, tmp_path):
    family, kit = family_kit
    data = _two_image_data(kit, tmp_path / "two.json")
    dump_teacher(DumpConfig(teacher=str(kit / "teacher"), data=str(tmp_path / "two.json"), images=str(kit / "data/images"),
                            out=str(tmp_path / "c"), irs_samples=4, unit_size=2, progress=False))
    reader = CacheReader(str(tmp_path / "c"))
    assert len(reader) == 4
    model, proc = load_vlm(str(kit / "teacher"), torch.device("cpu"))
    by_id = {reader[i]["sample_id"]: reader[i] for i in range(len(reader))}
    for item in data:
        x = by_id[item["id"]]
        refs = item["image"] if isinstance(item["image"], list) else [item["image"]]
        shas = [hashlib.sha256((kit / "data/images" / r).read_bytes()).hexdigest() for r in refs]
        assert x["image"] == (json.dumps(refs) if len(refs) > 1 else refs[0])
        assert x["image_sha256"] == (json.dumps(shas) if len(refs) > 1 else shas[0])
        # the spans are the processor's: one run of image tokens per image, in order, covering them all
        rec = parse_record(0, item)
        img, sha = load_image(rec, kit / "data/images")
        enc = encode(proc, rec, img, sha)
        np.testing.assert_array_equal(x["input_ids"], enc.input_ids)
        spans = x["image_spans"]
        assert len(spans) == len(refs) and spans == enc.image_spans
        image_id = int(model.config.image_token_id)  # the model's image token (Gemma 3's placeholder is another)
        pos = np.nonzero(x["input_ids"] == image_id)[0]
        # each span holds its image's tokens (Idefics3 / SmolVLM: with the sub-images' markup between them)
        in_span = [[p for p in range(a, e) if x["input_ids"][p] == image_id] for a, e in spans]
        assert sum(in_span, []) == pos.tolist() and all(len(p) for p in in_span)
        assert x["n_image_tokens"] == len(pos)
        # saliency: one distribution per turn over every image's tokens; an image shown before the turn's
        # instruction gets attention, one shown in a later turn none (causal)
        sal = x["saliency"]
        assert sal.shape == (len(x["resp_spans"]), len(pos))
        np.testing.assert_allclose(sal.astype(np.float64).sum(1), 1.0, atol=2e-3)
        for t, (q0, _) in enumerate(x["instr_spans"]):
            at = 0
            for (a, e), p in zip(spans, in_span):
                piece = sal[t, at:at + len(p)]
                assert (piece > 0).all() if a < q0 else (piece == 0).all(), (item["id"], t, a, q0)
                at += len(p)
    if family == "llava_onevision":  # several images: base resolution each (+1 newline token), no anyres tiles
        two, one = by_id["two-a"]["image_spans"], by_id["one"]["image_spans"]
        assert two[0][1] - two[0][0] == two[1][1] - two[1][0] < one[0][1] - one[0][0]
    # the second image of "two-turns" sits in its second human turn, after the first answer
    x = by_id["two-turns"]
    assert x["image_spans"][1][0] > x["resp_spans"][0][1]
    res = train_student(TrainConfig(student=str(kit / "student"), cache=str(tmp_path / "c"), out=str(tmp_path / "run"),
                                    loss="alignti", max_steps=2, batch_size=4, progress=False))
    assert res["last"]["iva"] > 0 and res["last"]["step"] == 2
    shown = show_saliency(str(tmp_path / "c"), "two-a", tmp_path / "s.png", student=str(tmp_path / "run/final"))
    teacher = "teacher (layer %d)" % reader.params["saliency_layer"]
    assert shown["panels"][:2] == [f"{teacher}, image 1", f"{teacher}, image 2"]
    assert len(shown["panels"]) == 4 and shown["panels"][3].startswith("student") and shown["panels"][3].endswith("image 2")
    assert Image.open(tmp_path / "s.png").size[0] > 480


def test_parquet_with_several_embedded_images(family_kit, tmp_path):
    datasets = pytest.importorskip("datasets")
    family, kit = family_kit
    data = _two_image_data(kit, tmp_path / "two.json")
    rows = [{"id": d["id"], "conversations": d["conversations"],
             "images": [{"bytes": (kit / "data/images" / r).read_bytes(), "path": r}
                        for r in (d["image"] if isinstance(d["image"], list) else [d["image"]])]} for d in data]
    feats = datasets.Features({"id": datasets.Value("string"), "images": [datasets.Image()],
                               "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}]})
    ds = datasets.Dataset.from_list(rows, features=feats).rename_column("images", "image")
    ds.to_parquet(str(tmp_path / "d.parquet"))
    dump_teacher(DumpConfig(teacher=str(kit / "teacher"), data=str(tmp_path / "d.parquet"), images=None,
                            out=str(tmp_path / "c"), saliency_layer="1", progress=False))
    reader = CacheReader(str(tmp_path / "c"))
    x = next(reader[i] for i in range(len(reader)) if reader[i]["sample_id"] == "two-b")
    assert json.loads(x["image"]) == ["@3:0", "@3:1"] and len(x["image_spans"]) == 2
    res = train_student(TrainConfig(student=str(kit / "student"), cache=str(tmp_path / "c"), out=str(tmp_path / "run"),
                                    loss="alignti", max_steps=1, batch_size=4, progress=False))
    assert res["last"]["step"] == 1


def test_llava_refuses_several_images_by_name(kit, tmp_path):
    _two_image_data(kit, tmp_path / "two.json")
    cfg = dict(teacher=str(kit / "teacher"), data=str(tmp_path / "two.json"), images=str(kit / "data/images"),
               saliency_layer="1", progress=False)
    with pytest.raises(DataError, match=r"sample two-a: 2 images, but the llava family takes one image per sample"):
        dump_teacher(DumpConfig(out=str(tmp_path / "c"), **cfg))
    assert not (tmp_path / "c").exists()
    m = dump_teacher(DumpConfig(out=str(tmp_path / "c"), skip_bad=True, **cfg))
    assert m["counts"]["ok"] == 1 and m["counts"]["skipped"] == 3


def test_placeholders_must_match_the_images():
    conv = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    with pytest.raises(DataError, match="2 images but 1 <image> placeholder"):
        parse_record(0, {"id": "x", "image": ["a.png", "b.png"], "conversations": conv})
    with pytest.raises(DataError, match="assistant turn 1 holds an <image> placeholder"):
        parse_record(0, {"id": "x", "image": ["a.png", "b.png"], "conversations": [
            {"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "<image>a"}]})
    rec = parse_record(0, {"id": "x", "image": ["a.png"], "conversations": conv})  # a list of one is one image
    assert rec.image == "a.png" and rec.images == ["a.png"]
