"""rollout -> dump-teacher -> train-student through the CLI from saved checkpoints, every family (single-turn); and
for Qwen2-VL multi-turn, multi-image and images embedded in parquet (the rollout embeds them too)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from alignti.cli import app
from alignti.common.cache import CacheReader
from alignti.demo.kit import FAMILIES

runner = CliRunner()


def _ok(*args):
    res = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output[-2000:]
    return res.output


def _round(kit, data, tmp_path, *rollout_extra, images=True):
    img = ["--images", kit / "data/images"] if images else []
    _ok("rollout", "--student", kit / "student", "--data", data, *img, "--out", tmp_path / "r",
        "--max-new-tokens", 4, "--batch-size", 4, *rollout_extra)
    _ok("dump-teacher", "--teacher", kit / "teacher", "--data", tmp_path / "r", *img, "--out", tmp_path / "c",
        "--irs-samples", 2, "--batch-size", 4, "--tpa-branches", 2)
    _ok("train-student", "--student", kit / "student", "--cache", tmp_path / "c", "--out", tmp_path / "run",
        "--loss", "alignti", "--max-steps", 1, "--batch-size", 4)
    assert (tmp_path / "run/final").is_dir()
    return CacheReader(str(tmp_path / "c"))


@pytest.mark.parametrize("family", FAMILIES)
def test_rollout_round_through_the_cli(family, tmp_path):
    kit = tmp_path / "kit"
    _ok("make-demo", kit, "--family", family, "--no-train-teacher", "--n-train", 1, "--n-val", 1, "--n-test", 1)
    items = [it for it in json.loads((kit / "data/train.json").read_text()) if len(it["conversations"]) == 2][:2]
    (tmp_path / "d.json").write_text(json.dumps(items))
    reader = _round(kit, tmp_path / "d.json", tmp_path, "--temperature", 0)
    assert reader.manifest["tpa_candidates"]["by"] == "student" and len(reader) == 2
    assert reader.table.column("round").to_pylist() == [0, 0]


def test_qwen2_vl_multi_turn_multi_image_embedded(tmp_path):
    kit = tmp_path / "kit"
    _ok("make-demo", kit, "--family", "qwen2_vl", "--no-train-teacher", "--n-train", 2, "--n-val", 1, "--n-test", 1)
    imgs = sorted(p.name for p in (kit / "data/images").iterdir())
    data = [
        {"id": "two-turns", "image": [imgs[0], imgs[1]], "conversations": [
            {"from": "human", "value": "<image>\nWhat is here?"}, {"from": "gpt", "value": "shapes"},
            {"from": "human", "value": "And here? <image>"}, {"from": "gpt", "value": "more shapes"}]},
        {"id": "pair", "image": [imgs[1], imgs[0]], "conversations": [
            {"from": "human", "value": "<image><image>Compare them."}, {"from": "gpt", "value": "they differ"}]},
    ]
    # a parquet source with the images embedded ({bytes, path} structs, as datasets.Image stores them)
    rows = [{"id": d["id"], "conversations": d["conversations"],
             "image": [{"bytes": (kit / "data/images" / f).read_bytes(), "path": None} for f in d["image"]]}
            for d in data]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "src.parquet")
    reader = _round(kit, tmp_path / "src.parquet", tmp_path, "--temperature", 1, "--samples-per-prompt", 2,
                    "--round", 2, images=False)
    out = [r for f in sorted((tmp_path / "r/data").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert all(isinstance(r["image"][0]["bytes"], bytes) for r in out)  # embedded, as the source
    by_id = {r["id"]: r for r in out}
    # the second turn's rows show both images (the second in the second human turn), the first turn's one
    assert len(by_id["two-turns/t1/s0"]["image"]) == 2 and len(by_id["two-turns/t0/s1"]["image"]) == 1
    assert by_id["two-turns/t1/s0"]["conversations"][1]["value"] == "shapes"  # the reference answer as context
    tab = reader.table.to_pylist()
    assert {r["round"] for r in tab} == {2}
    for i, r in enumerate(tab):
        x = reader[i]
        assert len(x["image_spans"]) == len(by_id[r["sample_id"]]["image"])
        assert len(x["resp_spans"]) == 1 and r["loss_turns"] == [r["source_turn"]]
