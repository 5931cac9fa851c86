"""Teachers larger than one device: tensor-parallel dumps (transformers' tp_plan over gloo ranks on the CPU),
replicas of tensor-parallel ranks splitting the work units, kill -9 of a rank then resume, and the plan check that
refuses a teacher before loading it. Every process runs with one intra-op thread (tests/test_scale.py)."""

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.exactness import assert_fp16_ids_equal_up_to_ties, assert_fp16_within_one_ulp
from tests.test_scale import alignti, assert_same_cache


def tp_args(kit, out, *extra):
    # float16 log-probs: the tensor-parallel side changes the fp32 reduction order, which float16 holds to one ulp
    return ["dump-teacher", "--teacher", kit / "teacher", "--data", kit / "data/train.json", "--images",
            kit / "data/images", "--out", out, "--limit", 12, "--unit-size", 3, "--batch-size", 4,
            "--saliency-layer", 1, "--logprob-dtype", "float16", *extra]


@pytest.fixture(scope="module")
def one_rank(kit, tmp_path_factory):
    """The same dump in this process, unsplit (no process start: it is compared within bounds, not bit for bit)."""
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher
    out = tmp_path_factory.mktemp("tp1") / "cache"
    dump_teacher(DumpConfig(teacher=str(kit / "teacher"), data=str(kit / "data/train.json"),
                            images=str(kit / "data/images"), out=str(out), limit=12, unit_size=3, batch_size=4,
                            saliency_layer="1", logprob_encoding="float16", progress=False))
    return out


@pytest.fixture(scope="module")
def tp2(kit, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp2") / "cache"
    alignti(*tp_args(kit, out, "--nproc", 2, "--tp-size", 2))
    return out


def arrays(cache: Path) -> dict[str, np.ndarray]:
    m = json.loads((cache / "manifest.json").read_text())
    out: dict[str, list] = {}
    for part in m["parts"]:
        z = zarr.open_group(str(cache / "parts" / f"{part['name']}.zarr"), mode="r")
        for k in z.array_keys():
            out.setdefault(k, []).append(z[k][...])
    return {k: np.concatenate(v) for k, v in out.items()}


def test_tp2_dump_matches_one_rank(one_rank, tp2):
    """The teacher split over 2 ranks (heads and MLP columns sharded, partial sums all-reduced) gives the 1-rank
    dump: the same fingerprint (a resume may mix them), the same tokens exactly, top-k ids up to near-ties, the
    float16 log-probs and saliency (whose head average is all-reduced over the replica) within one ulp, the fp32
    rest mass and target log-prob within 1e-5 (the all-reduced sums' order moves the fp32 values by a few ulp)."""
    m1, m2 = (json.loads((c / "manifest.json").read_text()) for c in (one_rank, tp2))
    assert m1["fingerprint"] == m2["fingerprint"] and m1["counts"] == m2["counts"]
    a, b = arrays(one_rank), arrays(tp2)
    assert sorted(a) == sorted(b)
    for k in ("input_ids", "response_mask", "resp_char_start", "tpa_pos"):
        assert np.array_equal(a[k], b[k]), k
    assert_fp16_ids_equal_up_to_ties(a["topk_ids"], b["topk_ids"], a["topk_logprobs"], b["topk_logprobs"], "topk")
    assert_fp16_ids_equal_up_to_ties(a["tpa_ids"], b["tpa_ids"], a["tpa_logprobs"], b["tpa_logprobs"], "tpa")
    for k in ("topk_logprobs", "tpa_logprobs", "saliency"):
        assert_fp16_within_one_ulp(a[k], b[k], k)
    for k in ("tail_logmass", "target_logprob", "tpa_tail"):
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-5, err_msg=k)
    assert a["saliency"].size and np.abs(a["saliency"]).max() > 0.01  # a real saliency map, not zeros


COMMIT_LOG = """
import os
from alignti.common.cache import PartWriter
_commit = PartWriter.commit
def commit(self, *a, **k):  # every part a rank commits: "rank unit" (tests/test_tp.py)
    with open(os.environ["ALIGNTI_TEST_COMMITS"], "a") as f:
        f.write(f"{os.environ.get('RANK', 0)} {self.index}\\n")
    return _commit(self, *a, **k)
PartWriter.commit = commit
"""


def test_two_replicas_of_tp2_write_every_unit_once(kit, tp2, tmp_path, monkeypatch):
    """4 ranks = 2 replicas x TP 2: replica r's ranks take the units u % 2 == r (both ranks of it the same units),
    only its first rank commits them (every commit of every rank is logged through a sitecustomize hook), and the
    cache is the 1-replica TP 2 cache bit for bit (the same per-rank arithmetic)."""
    from alignti.common.distributed import DistEnv, claim_units
    claims = {r: claim_units(DistEnv(r, 4, r, 2), 7, done={3}) for r in range(4)}
    assert claims[0] == claims[1] == [0, 2, 4, 6] and claims[2] == claims[3] == [1, 5]
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(COMMIT_LOG)
    monkeypatch.setenv("PYTHONPATH", str(hook))  # the runner puts the repository first, then this
    monkeypatch.setenv("ALIGNTI_TEST_COMMITS", str(tmp_path / "commits"))
    out = tmp_path / "c"
    res = alignti(*tp_args(kit, out, "--nproc", 4, "--tp-size", 2))
    assert "replica 0 of 2, tensor-parallel rank 0 of 2): 2 work units" in " ".join(res.stderr.split())
    commits = sorted(tuple(map(int, line.split())) for line in (tmp_path / "commits").read_text().splitlines())
    assert commits == [(0, 0), (0, 2), (2, 1), (2, 3)]  # each unit once, by its replica's first rank
    assert_same_cache(tp2, out)


def test_kill9_of_a_rank_then_resume_matches_uninterrupted(kit, tp2, tmp_path):
    """The writing rank SIGKILLs itself after its second unit's commit marker is written under its temporary name;
    torchrun takes the other rank down. The same command then finishes the dump, bit for bit the uninterrupted
    TP run's, and validate-cache finds nothing to report."""
    out = tmp_path / "c"
    res = alignti(*tp_args(kit, out, "--nproc", 2, "--tp-size", 2), crash="marker:2", check=False)
    assert res.returncode != 0 and not (out / "manifest.json").exists()
    assert "SIGKILL" in res.stderr or f"Signal {int(signal.SIGKILL)}" in res.stderr, res.stderr[-2000:]
    assert len(list((out / "parts").glob("*.commit.json"))) == 1  # one unit kept, one to redo
    alignti(*tp_args(kit, out, "--nproc", 2, "--tp-size", 2))
    assert_same_cache(tp2, out)
    from alignti.common.cache import validate_cache
    assert validate_cache(out) == []  # every sha256 and crc32c, as for a data-parallel dump


def test_tp_size_must_divide_the_processes(kit, tmp_path):
    from typer.testing import CliRunner

    from alignti.cli import app
    res = CliRunner().invoke(app, [str(a) for a in tp_args(kit, tmp_path / "c", "--nproc", 3, "--tp-size", 2)])
    assert res.exit_code == 2 and "--tp-size 2 must divide the number of processes (3" in " ".join(res.output.split())
    assert not (tmp_path / "c").exists()  # refused before torchrun starts


def test_plan_check_sizes_and_refusal(kit, tmp_path):
    """The plan's sizes against the loaded teacher's own parameters (brute force), then a stated memory the teacher
    does not fit: refused before anything loads or is written, naming the sizes and the options that would fit."""
    import torch
    from transformers import AutoModelForImageTextToText

    from alignti.common.distributed import DistEnv
    from alignti.common.errors import ResourceError, human_bytes
    from alignti.common.models import load_config
    from alignti.common.placement import check_placement, plan_teacher

    config = load_config(str(kit / "teacher"))
    model = AutoModelForImageTextToText.from_pretrained(str(kit / "teacher"), dtype=torch.float32)
    params = dict(model.named_parameters())
    total = sum(p.numel() * 4 for p in params.values())
    sharded_names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens",
                     "lm_head")  # the llama text config's plan, and the VLM's head and embeddings
    sharded = sum(p.numel() * 4 for n, p in params.items()
                  if "language_model" in n and any(s in n for s in sharded_names) or n.startswith("lm_head"))
    plan = plan_teacher(config, torch.float32, tp_size=2)
    assert (plan.total, plan.tensor_parallel, plan.experts) == (total, sharded, 0)
    assert plan.per_rank == total - sharded + sharded // 2

    with pytest.raises(ResourceError) as e:
        check_placement(config, "T", torch.device("cpu"), "float32", DistEnv(), tp_size=1, max_memory="1MiB")
    msg = str(e.value)
    assert human_bytes(total) in msg and "the 1.0 MiB a rank has (--max-memory)" in msg
    # neither --tp-size 2 (1.4 MiB per rank) nor bfloat16 (1.2 MiB) fits 0.85 MiB alone: both together do
    assert f"--dtype bfloat16 with --tp-size 2 (about {human_bytes((total - sharded + sharded // 2) // 2)} per rank)" \
        in msg
    assert "--device-map auto" in msg
    # --dtype bfloat16 is offered alone only where half the bytes fit (it was offered whatever the sizes)
    assert ("--dtype bfloat16 (half the bytes" in msg) == (total // 2 <= int(2 ** 20 * 0.85))
    halves_fit = int(total / 2 / 0.85) + 1
    with pytest.raises(ResourceError, match=r"--dtype bfloat16 \(half the bytes: about"):
        check_placement(config, "T", torch.device("cpu"), "float32", DistEnv(), max_memory=str(halves_fit))
    with pytest.raises(ResourceError) as e:
        check_placement(config, "T", torch.device("cpu"), "float32", DistEnv(), max_memory="64KiB")
    assert "--dtype bfloat16 (half" not in str(e.value)
    # already --device-map auto: not offered it again, but a larger --max-memory or disk offload
    with pytest.raises(ResourceError) as e:
        check_placement(config, "T", torch.device("cpu"), "float32", DistEnv(), device_map="auto",
                        max_memory="cpu=64KiB")
    assert "--device-map auto with" not in str(e.value) and "a larger --max-memory, or one with disk" in str(e.value)
    # a memory the halves fit names --tp-size 2
    budget = int((total - sharded + sharded // 2) / 0.85) + 1
    assert total > budget * 0.85
    with pytest.raises(ResourceError, match="--tp-size 2"):
        check_placement(config, "T", torch.device("cpu"), "float32", DistEnv(), max_memory=str(budget))
    check_placement(config, "T", torch.device("cpu"), "float32", DistEnv(0, 2, 0, 2), tp_size=2,
                    max_memory=str(budget))  # fits at --tp-size 2
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher
    with pytest.raises(ResourceError, match="does not fit"):  # the dump runs the check before loading the weights
        dump_teacher(DumpConfig(teacher=str(kit / "teacher"), data=str(kit / "data/train.json"),
                                images=str(kit / "data/images"), out=str(tmp_path / "c"), max_memory="64KiB",
                                progress=False))
    assert not (tmp_path / "c").exists()


def test_device_map_auto_with_layers_offloaded_to_disk_matches(kit, one_rank, tmp_path):
    """--device-map auto with a CPU budget of 300 KiB: accelerate maps the teacher to disk and streams it
    back for each forward; the same arithmetic on the same device, so the cache equals the unsplit one bit for
    bit."""
    import torch

    from alignti.common.models import load_model
    from alignti.common.placement import placement_options
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher
    options = placement_options(device_map="auto", max_memory="cpu=300KiB,disk=1GiB")
    placed = load_model(str(kit / "teacher"), torch.device("cpu"), **options).hf_device_map
    assert "disk" in placed.values()  # accelerate offloads (here the whole teacher, at this budget)
    out = tmp_path / "c"
    dump_teacher(DumpConfig(teacher=str(kit / "teacher"), data=str(kit / "data/train.json"),
                            images=str(kit / "data/images"), out=str(out), limit=12, unit_size=3, batch_size=4,
                            saliency_layer="1", logprob_encoding="float16", progress=False, device_map="auto",
                            max_memory="cpu=300KiB,disk=1GiB"))
    assert_same_cache(one_rank, out)


def test_plan_of_a_moe_teacher_counts_its_experts():
    """Qwen3-VL-MoE (a config, on the meta device): the experts are sized apart (brute force: the parameters under
    ``.experts.``), held whole without --ep-size and split by it; a refusal names --ep-size."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForImageTextToText, Qwen3VLMoeConfig

    from alignti.common.errors import ResourceError
    from alignti.common.placement import check_fits, plan_teacher
    cfg = Qwen3VLMoeConfig(text_config=dict(hidden_size=64, num_experts=8, num_experts_per_tok=2,
                                            moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=128, vocab_size=300,
                                            head_dim=16),
                           vision_config=dict(depth=1, hidden_size=32, out_hidden_size=64, intermediate_size=64,
                                              num_heads=2, deepstack_visual_indexes=[0]))
    with init_empty_weights():
        model = AutoModelForImageTextToText.from_config(cfg)
    experts = sum(p.numel() * 2 for n, p in model.named_parameters() if ".experts." in n)
    total = sum(p.numel() * 2 for p in model.parameters())
    whole, split = (plan_teacher(cfg, torch.bfloat16, tp_size=2, ep_size=e) for e in (1, 2))
    assert whole.total == split.total == total and whole.experts == split.experts == experts > 0
    assert whole.per_rank - split.per_rank == experts // 2
    with pytest.raises(ResourceError, match="--ep-size 2 with --tp-size 2"):
        check_fits(whole, int(split.per_rank / 0.85) + 1, "--max-memory", "M")
    check_fits(split, int(split.per_rank / 0.85) + 1, "--max-memory", "M")
    # transformers 5.25 cannot load this family expert-parallel: refused by name, before loading
    from alignti.common.distributed import DistEnv
    from alignti.common.placement import check_placement
    with pytest.raises(ValueError, match="qwen3_vl_moe's experts expert-parallel.*use --tp-size alone"):
        check_placement(cfg, "M", torch.device("cpu"), "bfloat16", DistEnv(0, 2, 0, 2), tp_size=2, ep_size=2)


def test_select_layer_tp2_gives_the_one_rank_curve(kit, tmp_path):
    """select-layer with the teacher split over 2 ranks: the same IRS curve (the head average of the attention is
    all-reduced over the replica; fp32 sums in another order: within 1e-5) and the same chosen layer."""
    curves = {}
    for name, extra in (("one", ()), ("tp2", ("--nproc", 2, "--tp-size", 2))):
        alignti("select-layer", "--teacher", kit / "teacher", "--data", kit / "data/train.json", "--images",
                kit / "data/images", "--samples", 8, "--device", "cpu", "--out", tmp_path / f"{name}.json", *extra)
        curves[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert curves["one"]["layer"] == curves["tp2"]["layer"]
    assert curves["one"]["pairs"] == curves["tp2"]["pairs"] > 0
    np.testing.assert_allclose(curves["tp2"]["curve"], curves["one"]["curve"], rtol=0, atol=1e-5)


def test_rollout_tp2_generates_the_one_rank_rows(kit, tmp_path):
    """rollout with the student split over 2 ranks, greedy: the same generated tokens row for row, the candidates'
    probabilities within 1e-5 (fp32 partial sums all-reduced in another order) and their ids equal wherever two
    neighbouring candidates are not within that bound of each other (a near tie may swap them)."""
    import pyarrow.parquet as pq
    tables = {}
    for name, extra in (("one", ()), ("tp2", ("--nproc", 2, "--tp-size", 2))):
        alignti("rollout", "--student", kit / "student", "--data", kit / "data/train.json", "--images",
                kit / "data/images", "--out", tmp_path / name, "--limit", 6, "--temperature", 0,
                "--max-new-tokens", 8, "--device", "cpu", *extra)
        tables[name] = pq.read_table(tmp_path / name / "data" / "00000.parquet").to_pylist()
    one, tp2 = tables["one"], tables["tp2"]
    assert [r["id"] for r in one] == [r["id"] for r in tp2] and len(one) == 6
    for a, b in zip(one, tp2):
        assert a["student_token_ids"] == b["student_token_ids"], a["id"]
        pa, pb = np.asarray(a["student_cand_probs"], np.float64), np.asarray(b["student_cand_probs"], np.float64)
        np.testing.assert_allclose(pb, pa, rtol=0, atol=1e-5, err_msg=a["id"])
        ia, ib = np.asarray(a["student_cand_ids"]), np.asarray(b["student_cand_ids"])
        gap = np.abs(np.diff(pa, axis=-1)) > 1e-5  # [T, B-1]: candidate j and j+1 apart
        apart = np.ones_like(ia, dtype=bool)
        apart[..., :-1] &= gap
        apart[..., 1:] &= gap
        assert np.array_equal(ia[apart], ib[apart]), a["id"]
