"""Bad inputs get a clear error naming the sample and the fix, and never lose finished work."""

import json
import shutil

import pyarrow.parquet as pq
import pytest

from alignti.common.cache import CacheReader, committed_parts
from alignti.common.errors import DataError
from alignti.teacher_dump.dump import DumpConfig, dump_teacher


@pytest.fixture()
def data(kit, tmp_path):
    recs = json.loads((kit / "data/train.json").read_text())[:12]
    return recs, tmp_path


def cfg(kit, path, out, **kw):
    return DumpConfig(teacher=str(kit / "teacher"), data=str(path), images=str(kit / "data/images"), out=str(out),
                      saliency_layer="1", tpa_branches=2, top_k=8, progress=False, **kw)


def write(path, recs, jsonl=False):
    path.write_text("\n".join(json.dumps(r) for r in recs) if jsonl else json.dumps(recs))
    return path


@pytest.mark.parametrize("breakage, match", [
    (lambda r: r.update(image="missing.png"), "image 'missing.png' not found"),
    (lambda r: r.update(conversations=r["conversations"][:1]), "no assistant turn"),
    (lambda r: r["conversations"][1].update(value="  "), "empty answer"),
    (lambda r: r.update(conversations="nope"), "no 'conversations' list"),
    (lambda r: r["conversations"].append({"from": "gpt", "value": "x"}), "two 'assistant' turns in a row"),
    (lambda r: r["conversations"][0].update({"from": "robot"}), "unknown role 'robot'"),
])
def test_bad_sample_is_named_and_nothing_is_written(kit, data, breakage, match):
    recs, tmp = data
    breakage(recs[4])
    with pytest.raises(DataError, match=match) as e:
        dump_teacher(cfg(kit, write(tmp / "d.json", recs), tmp / "out"))
    assert recs[4]["id"] in str(e.value) and "--skip-bad" in str(e.value)
    assert not (tmp / "out").exists()


def test_skip_bad_records_the_skip(kit, data):
    recs, tmp = data
    recs[2]["image"] = "missing.png"
    recs[7]["conversations"] = recs[7]["conversations"][:1]
    m = dump_teacher(cfg(kit, write(tmp / "d.json", recs), tmp / "out", skip_bad=True))
    assert m["counts"] == {**m["counts"], "samples": 12, "ok": 10, "skipped": 2}
    rows = pq.read_table(tmp / "out/parts/00000.parquet").to_pylist()
    skipped = {r["sample_id"]: r["error"] for r in rows if r["status"] == "skipped"}
    assert set(skipped) == {recs[2]["id"], recs[7]["id"]}
    assert "not found" in skipped[recs[2]["id"]] and "no assistant turn" in skipped[recs[7]["id"]]
    assert [r["index"] for r in rows] == list(range(12))
    assert len(CacheReader(tmp / "out")) == 10


def test_malformed_jsonl_line(kit, data):
    recs, tmp = data
    path = write(tmp / "d.jsonl", recs, jsonl=True)
    lines = path.read_text().splitlines()
    lines[3] = lines[3][:-5]
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match="line 4"):
        dump_teacher(cfg(kit, path, tmp / "out"))
    m = dump_teacher(cfg(kit, path, tmp / "out", skip_bad=True))
    assert m["counts"]["skipped"] == 1


def test_malformed_json_file(kit, data):
    recs, tmp = data
    path = tmp / "d.json"
    path.write_text(json.dumps(recs)[:-3])
    with pytest.raises(DataError, match="malformed JSON"):
        dump_teacher(cfg(kit, path, tmp / "out"))


def test_over_long_sample_mid_run_keeps_finished_units_and_resumes(kit, data):
    recs, tmp = data
    recs[9]["conversations"][0]["value"] += " and" * 200
    path = write(tmp / "d.json", recs)
    with pytest.raises(DataError, match=f"sample {recs[9]['id']}: .* longer than the limit of 120") as e:
        dump_teacher(cfg(kit, path, tmp / "out", unit_size=4, max_length=120))
    assert "re-run the same command" in str(e.value)
    done = committed_parts(tmp / "out")
    assert sorted(done) == [0, 1]  # the first two units were finished and are kept
    before = (tmp / "out/parts/00000.commit.json").read_text()
    recs[9]["conversations"][0]["value"] = "What shape is in the top?"
    write(tmp / "d.json", recs)
    m = dump_teacher(cfg(kit, path, tmp / "out", unit_size=4, max_length=120))
    assert m["counts"]["ok"] == 12
    assert (tmp / "out/parts/00000.commit.json").read_text() == before  # not redone


def test_changed_image_is_refused_at_training(kit, cache, tmp_path):
    from alignti.student_train.trainer import TrainConfig, train_student
    images = tmp_path / "images"
    shutil.copytree(kit / "data/images", images)
    first = CacheReader(cache).samples[0]["image"]
    (images / first).write_bytes((images / "train_00001.png").read_bytes() if first != "train_00001.png"
                                 else (images / "train_00002.png").read_bytes())
    with pytest.raises(DataError, match="sha256 mismatch"):
        train_student(TrainConfig(student=str(kit / "student"), cache=str(cache), out=str(tmp_path / "run"),
                                  images=str(images), max_steps=200, batch_size=60, progress=False))


def test_duplicate_ids_and_parameter_checks(kit, data):
    recs, tmp = data
    recs[5]["id"] = recs[4]["id"]
    with pytest.raises(DataError, match="duplicate sample id"):
        dump_teacher(cfg(kit, write(tmp / "d.json", recs), tmp / "out"))
    recs[5]["id"] = "unique"
    c = cfg(kit, write(tmp / "d.json", recs), tmp / "out2")
    c.top_k = 2
    with pytest.raises(ValueError, match="must be larger than --tpa-branches"):
        dump_teacher(c)


def test_loss_needing_missing_fields_is_refused(kit, data):
    from alignti.common.errors import CacheError
    from alignti.student_train.trainer import TrainConfig, train_student
    recs, tmp = data
    c = cfg(kit, write(tmp / "d.json", recs), tmp / "plain")
    c.tpa_branches, c.saliency_layer = 0, "none"
    dump_teacher(c)
    for loss, what in (("kd+tpa", "transition statistics"), ("kd+iva", "teacher saliency")):
        with pytest.raises(CacheError, match=what):
            train_student(TrainConfig(student=str(kit / "student"), cache=str(tmp / "plain"), out=str(tmp / loss),
                                      loss=loss, max_steps=1, progress=False))


def test_two_image_placeholders_for_one_image_are_refused(kit, data):
    recs, tmp = data
    recs[3]["conversations"][0]["value"] = "<image>\n<image>\n" + recs[3]["conversations"][0]["value"].replace(
        "<image>\n", "")
    with pytest.raises(DataError, match=rf"sample {recs[3]['id']}.*2 <image> placeholders for one image"):
        dump_teacher(cfg(kit, write(tmp / "d.json", recs), tmp / "c"))
    assert not (tmp / "c").exists()


def test_image_without_placeholder_goes_before_the_first_question(kit):
    """Documented: an image with no <image> placeholder is put where the template puts a first-turn image."""
    from alignti.common.conversation import encode
    from alignti.common.records import parse_record
    from alignti.common.sources import load_image
    from alignti.common.models import load_processor
    proc = load_processor(str(kit / "teacher"))
    rec = json.loads((kit / "data/train.json").read_text())[0]
    bare = json.loads(json.dumps(rec))
    bare["conversations"][0]["value"] = bare["conversations"][0]["value"].replace("<image>\n", "").replace("<image>", "")
    a, b = parse_record(0, rec), parse_record(0, bare)
    img, sha = load_image(a, kit / "data/images")
    assert encode(proc, a, img, sha).input_ids.tolist() == encode(proc, b, img, sha).input_ids.tolist()


def test_data_file_that_is_not_utf8_is_named_with_the_fix(kit, data):
    recs, tmp = data
    path = tmp / "latin.json"
    path.write_bytes(json.dumps(recs[:2]).replace("circle", "c\u00edrcle").encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.json.*not UTF-8.*iconv"):
        dump_teacher(cfg(kit, path, tmp / "c"))


def test_an_images_folder_that_is_not_there_is_named_once_and_nothing_is_written(kit, data):
    """A wrong --images folder: one error naming the folder, not one per sample, and no --skip-bad advice (skipping
    would drop every sample); a file given as the folder is said to be a file. A wrong cache path says it does not
    exist rather than that it is not a cache."""
    from alignti.common.errors import CacheError, DataSourceError
    recs, tmp = data
    for images, says in ((tmp / "imgs", "does not exist"), (write(tmp / "f.txt", []), "is a file, not a folder")):
        c = cfg(kit, write(tmp / "d.json", recs), tmp / "out")
        c.images = str(images)
        with pytest.raises(DataSourceError, match=f"the --images folder {says}") as e:
            dump_teacher(c)
        assert str(images) in str(e.value) and "--skip-bad" not in str(e.value) and "sample" not in str(e.value)
        assert not (tmp / "out").exists()
    with pytest.raises(CacheError, match="does not exist: give the folder"):
        CacheReader(tmp / "no-such-cache")
    (tmp / "empty").mkdir()
    with pytest.raises(CacheError, match="is not an alignti cache"):
        CacheReader(tmp / "empty")
