"""Data in as Hugging Face datasets and parquet: a `datasets` save_to_disk folder, parquet shards (local and through
an fsspec URL), with the image as embedded bytes or as a path. Each gives the same cache as the LLaVA JSON + image
folder it was built from; embedded images need no --images, their sha256 is that of the bytes, and the student
reads them from the same source. Bad rows are named as in JSON."""

import json
import shutil

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")
from typer.testing import CliRunner  # noqa: E402

from alignti.cli import app  # noqa: E402
from alignti.common.cache import CacheReader  # noqa: E402
from alignti.common.errors import DataError  # noqa: E402
from alignti.common.sources import open_source  # noqa: E402
from alignti.student_train.trainer import TrainConfig, train_student  # noqa: E402
from alignti.teacher_dump.dump import DumpConfig, dump_teacher  # noqa: E402

N = 10


def _rows(kit, embed: bool) -> list[dict]:
    items = json.loads((kit / "data/train.json").read_text())[:N]
    rows = []
    for it in items:
        path = kit / "data/images" / it["image"]
        image = {"bytes": path.read_bytes(), "path": it["image"]} if embed else it["image"]
        rows.append({"id": it["id"], "image": image, "conversations": it["conversations"]})
    return rows


def _features(embed: bool):
    return datasets.Features({"id": datasets.Value("string"),
                              "image": datasets.Image() if embed else datasets.Value("string"),
                              "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}]})


def _dataset(kit, embed: bool):
    rows = _rows(kit, embed)
    return datasets.Dataset.from_list(rows, features=_features(embed))


def _dump(kit, data, out, images=None, **kw):
    return dump_teacher(DumpConfig(teacher=str(kit / "teacher"), data=str(data), images=images, out=str(out),
                                   saliency_layer="1", unit_size=4, progress=False, **kw))


@pytest.fixture(scope="module")
def reference(kit, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "c"
    _dump(kit, kit / "data/train.json", out, images=str(kit / "data/images"), limit=N)
    return CacheReader(str(out))


def _same_cache(ref: CacheReader, got: CacheReader, embedded: bool):
    assert len(got) == len(ref) == N
    for i in range(N):
        a, b = ref[i], got[i]
        assert a["sample_id"] == b["sample_id"] and a["image_sha256"] == b["image_sha256"]
        assert b["image"] == (f"@{i}" if embedded else a["image"])
        for k in ("input_ids", "topk_ids", "topk_logprobs", "tail_logmass", "tpa_cand_ids", "tpa_ids", "saliency"):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_datasets_folder_with_embedded_images(kit, reference, tmp_path):
    """save_to_disk with datasets.Image: no --images; the same cache as JSON + folder; the student trains from it,
    reading the bytes from the dataset (and, moved, from --data)."""
    _dataset(kit, embed=True).save_to_disk(str(tmp_path / "ds"))
    _dump(kit, tmp_path / "ds", tmp_path / "c")
    got = CacheReader(str(tmp_path / "c"))
    _same_cache(reference, got, embedded=True)
    assert got.manifest["data"] == str((tmp_path / "ds").resolve()) and got.manifest["images"] == ""
    common = dict(student=str(kit / "student"), cache=str(tmp_path / "c"), loss="alignti", max_steps=2, batch_size=4,
                  progress=False)
    res = train_student(TrainConfig(out=str(tmp_path / "run"), **common))
    assert res["last"]["step"] == 2
    shutil.move(str(tmp_path / "ds"), str(tmp_path / "moved"))
    with pytest.raises(DataError, match="pass --data pointing at the data the cache was dumped from"):
        train_student(TrainConfig(out=str(tmp_path / "run2"), **common))
    # a DataLoader worker process opens the source itself
    res = train_student(TrainConfig(out=str(tmp_path / "run3"), data=str(tmp_path / "moved"), workers=1, **common))
    assert res["last"]["step"] == 2


def test_parquet_shards_local_and_by_url(kit, reference, tmp_path):
    """Two parquet shards with embedded images, as a folder and as a file:// URL: rows numbered across shards."""
    ds = _dataset(kit, embed=True)
    (tmp_path / "pq").mkdir()
    ds.select(range(6)).to_parquet(str(tmp_path / "pq/part-00000.parquet"), batch_size=3)  # two row groups
    ds.select(range(6, N)).to_parquet(str(tmp_path / "pq/part-00001.parquet"))
    _dump(kit, tmp_path / "pq", tmp_path / "c1")
    _same_cache(reference, CacheReader(str(tmp_path / "c1")), embedded=True)
    _dump(kit, f"file://{tmp_path / 'pq'}", tmp_path / "c2")
    _same_cache(reference, CacheReader(str(tmp_path / "c2")), embedded=True)
    src = open_source(f"file://{tmp_path / 'pq'}")
    assert [r.image for r in src.records()] == [f"@{i}" for i in range(N)]


def test_parquet_with_image_paths_needs_images(kit, reference, tmp_path):
    _dataset(kit, embed=False).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(DataError, match="is a path but no --images folder was given"):
        _dump(kit, tmp_path / "d.parquet", tmp_path / "none")
    _dump(kit, tmp_path / "d.parquet", tmp_path / "c", images=str(kit / "data/images"))
    _same_cache(reference, CacheReader(str(tmp_path / "c")), embedded=False)


def test_bad_rows_are_named_and_skippable(kit, tmp_path):
    rows = _rows(kit, embed=True)[:4]
    rows[1]["conversations"] = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "  "}]
    rows[2]["image"] = {"bytes": b"not an image", "path": "x.png"}
    datasets.Dataset.from_list(rows, features=_features(True)).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError) as e:
        _dump(kit, tmp_path / "bad.parquet", tmp_path / "c")
    assert "row 1 of" in str(e.value) and rows[1]["id"] in str(e.value) and "empty answer" in str(e.value)
    assert not (tmp_path / "c").exists()
    m = _dump(kit, tmp_path / "bad.parquet", tmp_path / "c", skip_bad=True)
    assert m["counts"]["ok"] == 2 and m["counts"]["skipped"] == 2
    skipped = {s["sample_id"]: s for s in CacheReader(str(tmp_path / "c")).skipped}
    assert set(skipped) == {rows[1]["id"], rows[2]["id"]}
    assert "cannot be decoded" in skipped[rows[2]["id"]]["error"]
    # conversations stored as JSON text (some exports do) parse the same; broken text is named
    t = [dict(r, conversations=json.dumps(r["conversations"])) for r in _rows(kit, embed=True)[:2]]
    t[1]["conversations"] = "[{"
    datasets.Dataset.from_list(t).to_parquet(str(tmp_path / "text.parquet"))
    recs = open_source(tmp_path / "text.parquet").records()
    answer = json.loads(t[0]["conversations"])[-1]["value"]
    assert recs[0].sample_id == t[0]["id"] and recs[0].turns[-1] == ("assistant", answer)
    assert "is not JSON" in recs[1].error and "row 1" in recs[1].error


def test_dataset_dict_and_empty_folders_are_explained(kit, tmp_path):
    dd = datasets.DatasetDict({"train": _dataset(kit, embed=True)})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"a DatasetDict with splits \['train'\].*--data .*dd/train"):
        open_source(tmp_path / "dd")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither a datasets save_to_disk state.json nor parquet shards"):
        open_source(tmp_path / "empty")
    res = CliRunner().invoke(app, ["dump-teacher", "--teacher", str(kit / "teacher"), "--data", str(tmp_path / "dd"),
                                   "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "DatasetDict" in " ".join(res.output.split())
