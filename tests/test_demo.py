"""The shapes generator, show-saliency, and a tiny-budget quickstart run."""

import json
import random

import pytest
from PIL import Image

from alignti.demo import shapes


def test_generator_is_deterministic_and_correct_by_construction(tmp_path):
    a = shapes.generate_split(tmp_path / "a", "val", 20)
    b = shapes.generate_split(tmp_path / "b", "val", 20)
    assert a == b
    assert (tmp_path / "a/images/val_00003.png").read_bytes() == (tmp_path / "b/images/val_00003.png").read_bytes()
    assert shapes.generate_split(tmp_path / "c", "test", 5) != a[:15]
    for rec in a:
        scene = [shapes.Item(c, col, s) for c, col, s in rec["scene"]]
        img = Image.open(tmp_path / "a/images" / rec["image"]).convert("RGB")
        for it in scene:  # the pixel at the centre-bottom of each occupied cell has the item's colour
            x = (it.cell % 3) * shapes.CELL + shapes.CELL // 2
            y = (it.cell // 3) * shapes.CELL + shapes.CELL - 5
            assert img.getpixel((x, y)) == shapes.COLOURS[it.colour]
        meta = rec["meta"]
        assert rec["conversations"][1]["value"] == shapes.answer_for(scene, meta["type"], meta["arg"])
        if meta["type"] in ("colour", "shape", "describe", "where"):
            assert len(meta["region"]) == 1 and any(it.cell == meta["region"][0] for it in scene)


def test_stream_answers_match_scene():
    gen = shapes.stream(7, caption_rate=0.5)
    items = [next(gen) for _ in range(20)]
    assert any(i[0]["conversations"][0]["value"].endswith("List the shapes.") for i in items)
    assert all(isinstance(img, Image.Image) for _, img in items)
    assert [i[0] for i in items] == [i[0] for i in (next(g) for g in [shapes.stream(7, 0.5)] for _ in range(20))]


def test_stream_encoder_equals_encode():
    """The teacher's memoised encoder gives exactly what ``encode`` gives, sample by sample (ids, masks,
    spans, pixels), also on the second sight of a conversation, where only the image is processed."""
    import numpy as np
    import torch

    from alignti.common.conversation import encode
    from alignti.common.records import parse_record
    from alignti.demo import kit
    from alignti.demo.teacher_sft import StreamEncoder

    proc = kit.build_processor(kit.build_tokenizer())
    enc = StreamEncoder(proc)
    gen = shapes.stream(3, caption_rate=0.2)
    hits = 0
    for _ in range(150):
        item, img = next(gen)
        hits += (tuple(m["value"] for m in item["conversations"]), img.size) in enc.memo
        fast = enc(item, img)
        rec = parse_record(0, dict(item, image="stream"))
        ref = encode(proc, rec, img).__dict__
        for k, v in ref.items():
            if k == "image_inputs":
                assert v.keys() == fast[k].keys() and all(torch.equal(v[j], fast[k][j]) for j in v)
            elif isinstance(v, np.ndarray):
                assert np.array_equal(v, fast[k]), k
            else:
                assert v == fast[k], k
        assert fast["region"] == item["meta"]["region"]
    assert hits > 20  # the memo is used (28 of 150 here)


def test_grounding_loss_against_brute_force():
    import torch

    from alignti.demo.teacher_sft import grounding_loss
    torch.manual_seed(0)
    sal = torch.softmax(torch.randn(3, 9), -1)
    items = [{"region": [0]}, {"region": []}, {"region": [4, 8]}]
    want = (-torch.log(sal[0, 0]) - 0.5 * (torch.log(sal[2, 4]) + torch.log(sal[2, 8]))) / 2
    assert torch.allclose(grounding_loss(sal, items), want)
    # a 36-token grid (patch 8): four tokens per cell
    sal36 = torch.full((1, 36), 1 / 36)
    assert torch.allclose(grounding_loss(sal36, [{"region": [2]}]), torch.tensor(float(-torch.log(torch.tensor(1 / 36)))))


def test_show_saliency_writes_png(cache, kit, tmp_path):
    from alignti.common.cache import CacheReader
    from alignti.student_train.show_saliency import show_saliency
    sid = CacheReader(cache).samples[0]["sample_id"]
    res = show_saliency(str(cache), sid, tmp_path / "s.png", student=str(kit / "student"))
    img = Image.open(tmp_path / "s.png")
    assert img.size[0] > 400 and res["panels"][0].startswith("teacher") and res["panels"][1].startswith("student")
    assert "?" in res["instruction"] or "." in res["instruction"]


def test_quickstart_tiny_budget(tmp_path):
    from alignti.demo.quickstart import QuickstartConfig, quickstart, render_table
    over = dict(n_train=12, n_val=4, n_test=6, teacher_steps=5, student_steps=3, batch_size=4, eval_every=3,
                val_limit=4, long_form={"train": 4, "val": 2, "test": 3})
    res = quickstart(QuickstartConfig(workdir=str(tmp_path), seeds=2, methods=("sft", "alignti"), overrides=over,
                                      progress=False))
    assert set(res["methods"]) == {"sft", "alignti"} and res["methods"]["sft"]["n"] == 2
    # the long-form split: the students trained on train + train_long (one cache), tested on test_long
    from alignti.common.cache import CacheReader
    ids = CacheReader(str(tmp_path / "cache")).table.column("sample_id").to_pylist()
    assert sum("-long-" in i for i in ids) == 4
    lf = res["long_form"]
    assert lf["test_questions"] == 3 and set(lf["methods"]) == {"sft", "alignti"}
    assert {"exact", "position", "colour", "shape", "fields"} <= set(lf["teacher"])
    assert [p["a"] for p in lf["paired_fields_f1"]] == ["alignti"] and "Long-form questions" in render_table(res)
    # where the time went: every stage timed, the students' sums add up over the runs
    st = res["stage_seconds"]
    assert set(st) == {"make_demo", "teacher_training", "teacher_validation", "dump", "teacher_test", "students_wall",
                       "students_train_sum", "students_eval_sum", "students_long_form_eval_sum"}
    assert res["teacher_steps_run"] == 5 and st["teacher_training"] > 0 and st["dump"] > 0
    assert st["students_train_sum"] == pytest.approx(sum(r["train_seconds"] for r in res["runs"]), abs=0.3)
    assert 0 <= st["students_long_form_eval_sum"] <= st["students_eval_sum"]
    assert sum(st[k] for k in ("make_demo", "dump", "teacher_test", "students_wall")) <= res["total_seconds"] + 0.5
    assert "Time (s): make-demo" in render_table(res)
    assert (tmp_path / "results.md").read_text().count("|") > 10
    assert json.loads((tmp_path / "results.json").read_text())["seeds"] == 2
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_trained_teacher_saliency_sits_on_the_named_region(tmp_path):
    """A demo teacher trained with plain SFT, no grounding loss (4 layers, 2,000 steps, 90.7% validation exact
    match; stored in fp16 under tests/data/shapes-teacher; plain SFT is `make-demo --teacher-grounding 0`). So
    its routing is learnt from the answers alone, not taught by make-demo's grounding loss. On fresh scenes, the cached
    saliency taken at the answer query (--saliency-query answer) puts its top image token on the cell
    the question names for most colour and shape questions (chance: 1 in 9). ("describe" answers start
    with "a", which needs no look; the look comes one token later.)"""
    from pathlib import Path

    from alignti.demo.saliency_check import region_hits
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher
    teacher = Path(__file__).parent / "data" / "shapes-teacher"
    recs = shapes.generate_split(tmp_path, "test", 30, seed=4242)
    (tmp_path / "d.json").write_text(json.dumps(recs))
    out = tmp_path / "c"
    dump_teacher(DumpConfig(teacher=str(teacher), data=str(tmp_path / "d.json"), images=str(tmp_path / "images"),
                            out=str(out), tpa_branches=0, saliency_layer="1", saliency_query="answer",
                            progress=False))
    hits = region_hits(out, tmp_path / "d.json")
    for qtype in ("colour", "shape"):
        assert hits[qtype]["n"] >= 5
        assert hits[qtype]["hit_rate"] >= 0.6 > 3 * hits[qtype]["chance"], (qtype, hits)
