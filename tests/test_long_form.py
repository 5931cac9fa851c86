"""The demo's long-form question ("describe every shape"): answers of 15-41 tokens in one fixed order, per-field
scores checked against a brute-force count, the split written and read like the other splits."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from alignti.demo import shapes
from alignti.demo.kit import build_tokenizer


def _brute_f1(ref_scene, said_items, field):
    """F1 by enumeration: every (position, value) the scene holds vs every one the answer states (first per
    position), matched one by one."""
    ref = []
    for it in ref_scene:
        pos = shapes.POSITIONS[it.cell]
        ref.append((pos,) if field == "position" else (pos, it.colour if field == "colour" else it.shape))
    said, seen = [], set()
    for pos, colour, shape in said_items:
        if pos in seen:
            continue
        seen.add(pos)
        said.append((pos,) if field == "position" else (pos, colour if field == "colour" else shape))
    hits = sum(1 for r in ref for s in said if r == s)
    if hits == 0:
        return 0.0
    p, r = hits / len(said), hits / len(ref)
    return 2 * p * r / (p + r)


def test_answers_are_long_form_and_in_reading_order():
    tok = build_tokenizer("llava")
    rng = random.Random(7)
    lengths = []
    for _ in range(400):
        scene = shapes.make_scene(rng, shapes.LONG_FORM_MAX_ITEMS)
        ans = shapes.long_form_answer(scene)
        lengths.append(len(tok(ans)["input_ids"]))
        items = shapes.parse_long_form(ans)
        assert [p for p, _, _ in items] == [shapes.POSITIONS[c] for c in sorted(it.cell for it in scene)]
        assert shapes.field_scores(ans, scene) == {"position": 1.0, "colour": 1.0, "shape": 1.0, "fields": 1.0}
    assert 15 <= min(lengths) and max(lengths) <= 41, (min(lengths), max(lengths))
    assert sum(lengths) / len(lengths) > 20


def test_field_scores_equal_a_brute_force_count():
    rng = random.Random(3)
    vocab_pos = list(shapes.POSITIONS)
    for _ in range(300):
        scene = shapes.make_scene(rng, shapes.LONG_FORM_MAX_ITEMS)
        # a noisy answer: drop, corrupt, duplicate and invent items
        said = [(shapes.POSITIONS[it.cell], it.colour, it.shape) for it in scene if rng.random() > 0.3]
        said = [(p, rng.choice(list(shapes.COLOURS)) if rng.random() < 0.3 else c,
                 rng.choice(shapes.SHAPES) if rng.random() < 0.3 else s) for p, c, s in said]
        if rng.random() < 0.5:
            said.append((rng.choice(vocab_pos), rng.choice(list(shapes.COLOURS)), rng.choice(shapes.SHAPES)))
        if said and rng.random() < 0.3:
            said.append(said[0])
        text = ", ".join(f"{c} {s} in the {p}" for p, c, s in said) + (" and some noise" if rng.random() < .5 else "")
        got = shapes.field_scores(text, scene)
        for field in shapes.FIELDS:
            assert got[field] == pytest.approx(_brute_f1(scene, said, field), abs=1e-12), (text, field)
        # "fields": the three kinds of pair pooled
        n_ref = 3 * len(scene)
        n_said = 3 * len({p for p, _, _ in said})
        hits = sum(_hits(scene, said, f) for f in shapes.FIELDS)
        want = 0.0 if hits == 0 else 2 * hits / (n_ref + n_said)
        assert got["fields"] == pytest.approx(want, abs=1e-12)


def _hits(scene, said, field):
    ref = {shapes.POSITIONS[it.cell]: it for it in scene}
    seen, n = set(), 0
    for p, c, s in said:
        if p in seen:
            continue
        seen.add(p)
        if p in ref and (field == "position" or (field == "colour" and ref[p].colour == c)
                         or (field == "shape" and ref[p].shape == s)):
            n += 1
    return n


def test_short_answers_score_zero_and_nothing_is_not_an_error():
    scene = [shapes.Item(0, "red", "circle"), shapes.Item(4, "blue", "square")]
    assert shapes.field_scores("", scene) == {"position": 0.0, "colour": 0.0, "shape": 0.0, "fields": 0.0}
    assert shapes.field_scores("red", scene)["fields"] == 0.0
    half = shapes.field_scores("red circle in the top-left", scene)
    assert half["position"] == pytest.approx(2 / 3) and half["fields"] == pytest.approx(2 / 3)


def test_long_form_split_written_and_read(tmp_path):
    from alignti.common.records import Record
    from alignti.common.sources import load_records
    paths = shapes.write_dataset(tmp_path, n_train=2, n_val=1, n_test=1, questions_per_image=1,
                                 n_long={"train": 5, "test": 3})
    assert set(paths) == {"train", "val", "test", "train_long", "test_long"}
    recs = [r for r in load_records(paths["test_long"]) if isinstance(r, Record)]
    assert len(recs) == 3
    raw = json.loads(paths["test_long"].read_text())
    for r, item in zip(recs, raw):
        scene = shapes.scene_of(item["meta"]["scene"])
        assert r.turns[0][1].endswith(shapes.LONG_FORM_QUESTION)
        assert r.turns[1][1] == shapes.long_form_answer(scene)
        assert (tmp_path / "images" / item["image"]).is_file()
    # the short splits are the ones write_dataset made before long-form existed (same seeds, same scenes)
    again = shapes.generate_split(tmp_path / "again", "train", 2, 1)
    assert json.loads(paths["train"].read_text()) == again


# sha256 of the first 30 records of stream(5, 0.2) before long-form existed (Python's random is the same everywhere)
STREAM_BEFORE = "3b8eb822e1e0559b457f497367bafa8a515403c17bfc11c9422933aa219033e4"


def test_stream_without_long_form_is_unchanged():
    """rate 0 draws nothing extra from the generator: the teacher's stream (and so the demo kits) stay as before."""
    import hashlib
    a = [x for x, _ in itertools.islice(shapes.stream(5, 0.2, long_form_rate=0.0), 30)]
    assert hashlib.sha256(json.dumps(a, sort_keys=True).encode()).hexdigest() == STREAM_BEFORE
    c = [x for x, _ in itertools.islice(shapes.stream(5, 0.0, long_form_rate=1.0), 10)]
    assert all(x["meta"]["type"] == shapes.LONG_FORM for x in c)


@pytest.mark.parametrize("mode", ["items", "scene", "off"])
def test_grounding_groups_of_long_form_answers(mode):
    """The teacher's grounding on a long-form answer ("items"): one group per listed shape, whose query positions
    are exactly those that predict that shape's tokens ("red circle in the top-left", read back from the encoded
    sample) and whose target is the shape's own cell; "scene": the answer's first position on every shape's cell
    (one group); "off": none. Short questions: one group, the first answer position, the question's region."""
    from alignti.demo import kit
    from alignti.demo.teacher_sft import StreamEncoder, grounding_groups

    proc = kit.build_processor(kit.build_tokenizer())
    tok = proc.tokenizer
    enc = StreamEncoder(proc, mode)
    for item, img in itertools.islice(shapes.stream(11, 0.0, long_form_rate=0.5), 40):
        it = enc(item, img)
        groups = grounding_groups([it])
        (s, e), = it["resp_spans"]
        region = item["meta"]["region"]
        if item["meta"]["type"] != shapes.LONG_FORM:
            assert it["instr_spans"] == [(s - 1, s)] and groups == [{"region": region}]
            continue
        parts = item["conversations"][-1]["value"].split(", ")
        if mode == "off":
            assert it["instr_spans"] == [] and groups == []
        elif mode == "scene":
            assert it["instr_spans"] == [(s - 1, s)] and groups == [{"region": region}]
        else:
            assert len(groups) == len(parts) == len(region)
            for (q0, q1), g, text, cell in zip(it["instr_spans"], groups, parts, region):
                predicted = tok.decode(list(it["input_ids"][q0 + 1:q1 + 1]))
                assert predicted.strip() == text and g == {"region": [cell]}
                (pos, _, _), = shapes.parse_long_form(text)
                assert shapes.POSITIONS[cell] == pos
            assert it["instr_spans"][-1][1] <= e - 1  # never the end-of-turn token's prediction


def test_long_form_batches_wait_for_the_phase():
    """The teacher's curriculum (train_sft's long_form_after): while phase["long_form"] is False no batch is
    long-form; once True, long-form batches come at the rate asked (binomial count over 200 batches, p = 0.5: within
    5 standard deviations), each batch all of one kind."""
    from alignti.demo import kit
    from alignti.demo.teacher_sft import _stream_batches

    proc = kit.build_processor(kit.build_tokenizer())
    phase = {"long_form": False}
    gen = _stream_batches(proc, 7, 2, 0.0, 0.5, "items", phase)

    def is_long(batch):
        kinds = {len(it["ground"]) > 1 or it["resp_spans"][0][1] - it["resp_spans"][0][0] > 8 for it in batch}
        assert len(kinds) == 1  # long-form batches are kept apart
        return kinds.pop()

    assert not any(is_long(next(gen)) for _ in range(60))
    phase["long_form"] = True
    n = sum(is_long(next(gen)) for _ in range(200))
    assert abs(n - 100) <= 5 * (200 * 0.25) ** 0.5
