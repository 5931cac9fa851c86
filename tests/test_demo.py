"""The shapes generator, show-saliency, and a tiny-budget quickstart run."""

import json
import random

from PIL import Image

from demo import shapes


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


def test_show_saliency_writes_png(cache, kit, tmp_path):
    from common.cache import CacheReader
    from student_train.show_saliency import show_saliency
    sid = CacheReader(cache).samples[0]["sample_id"]
    res = show_saliency(str(cache), sid, tmp_path / "s.png", student=str(kit / "student"))
    img = Image.open(tmp_path / "s.png")
    assert img.size[0] > 400 and res["panels"][0].startswith("teacher") and res["panels"][1].startswith("student")
    assert "?" in res["instruction"] or "." in res["instruction"]


def test_quickstart_tiny_budget(tmp_path):
    from demo.quickstart import QuickstartConfig, quickstart
    over = dict(n_train=12, n_val=4, n_test=6, teacher_steps=5, student_steps=3, batch_size=4, eval_every=3,
                val_limit=4)
    res = quickstart(QuickstartConfig(workdir=str(tmp_path), seeds=2, methods=("sft", "alignti"), overrides=over,
                                      progress=False))
    assert set(res["methods"]) == {"sft", "alignti"} and res["methods"]["sft"]["n"] == 2
    assert (tmp_path / "results.md").read_text().count("|") > 10
    assert json.loads((tmp_path / "results.json").read_text())["seeds"] == 2
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_trained_teacher_saliency_sits_on_the_named_region(tmp_path):
    """The demo teacher as `alignti quickstart` trained it (90.7% validation exact match; stored in fp16
    under tests/data/shapes-teacher, regenerate with `alignti make-demo`). On fresh scenes, the cached
    saliency taken at the answer query (--saliency-query answer) puts its top image token on the cell
    the question names for most colour and shape questions (chance: 1 in 9). ("describe" answers start
    with "a", which needs no look; the look comes one token later.)"""
    from pathlib import Path

    from demo.saliency_check import region_hits
    from teacher_dump.dump import DumpConfig, dump_teacher
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
