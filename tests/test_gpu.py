"""The CUDA paths: dump on the GPU (bf16 teacher, top-k / saliency / TPA computed on the device), train on
the GPU (bf16 autocast), NCCL under torchrun. Skipped where no GPU is present; run on a lent GPU machine."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from alignti.common.cache import CacheReader
from alignti.student_train.trainer import TrainConfig, train_student
from alignti.teacher_dump.dump import DumpConfig, dump_teacher

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _dump(kit, out, device, dtype="auto", **kw):
    dump_teacher(DumpConfig(teacher=str(kit / "teacher"), data=str(kit / "data/train.json"),
                            images=str(kit / "data/images"), out=str(out), limit=40, unit_size=20, irs_samples=16,
                            saliency_layer="1", device=device, dtype=dtype, progress=False, **kw))
    return CacheReader(out)


def test_gpu_dump_matches_cpu_dump(kit, tmp_path):
    """fp32 on the GPU equals the CPU dump to float tolerance; bf16 (the GPU default) keeps the teacher's
    top-1 and stays within bf16 rounding of the fp32 log-probs."""
    # float16 log-probs in rank order: this compares the dump's arithmetic on two devices, not the encoding (the
    # packed encoding keeps the top-1 first and the rest as an id set, test_cache.py / test_codec.py)
    cpu = _dump(kit, tmp_path / "cpu", "cpu", logprob_encoding="float16")
    gpu32 = _dump(kit, tmp_path / "gpu32", "cuda", "float32", logprob_encoding="float16")
    gpu16 = _dump(kit, tmp_path / "gpu16", "cuda", logprob_encoding="float16")
    assert gpu16.params["dtype"] == "bfloat16" and gpu32.params["dtype"] == "float32"
    for i in range(len(cpu)):
        a, b, c = cpu[i], gpu32[i], gpu16[i]
        assert np.array_equal(a["topk_ids"][:, 0], b["topk_ids"][:, 0])
        np.testing.assert_allclose(a["topk_logprobs"][:, :4].astype(np.float32),
                                   b["topk_logprobs"][:, :4].astype(np.float32), atol=2e-3)
        np.testing.assert_allclose(a["saliency"].astype(np.float32), b["saliency"].astype(np.float32), atol=2e-3)
        np.testing.assert_array_equal(a["tpa_cand_ids"][:, 0], b["tpa_cand_ids"][:, 0])
        top1 = a["topk_logprobs"][:, 0].astype(np.float32)
        confident = top1 > np.log(0.6)  # a clear winner stays the winner under bf16
        assert np.array_equal(a["topk_ids"][confident, 0], c["topk_ids"][confident, 0])
        np.testing.assert_allclose(top1, c["topk_logprobs"][:, 0].astype(np.float32), atol=0.08)


def test_gpu_training_from_a_cpu_cache_and_reload(kit, tmp_path):
    cpu = tmp_path / "cpu"
    _dump(kit, cpu, "cpu")
    run = tmp_path / "run"
    res = train_student(TrainConfig(student=str(kit / "student"), cache=str(cpu), out=str(run), loss="alignti",
                                    max_steps=40, batch_size=8, lr=3e-3, device="cuda", progress=False,
                                    workers=0))
    m = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for term in ("sft", "kd", "iva", "tpa"):
        assert all(np.isfinite(x[term]) for x in m)
        assert np.mean([x[term] for x in m[-8:]]) < np.mean([x[term] for x in m[:8]]), term
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(res["final"])
    assert next(model.parameters()).dtype == torch.float32  # master weights stay fp32 under autocast


def test_torchrun_on_the_gpu_dump_and_training(kit, tmp_path):
    """Under torchrun with one GPU (one rank), dump-teacher and train-student run end to end on CUDA. A single
    rank joins no process group (backend None in run.json); several ranks use NCCL (common/distributed.py)."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    cache, run = tmp_path / "c", tmp_path / "r"
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m", "alignti"]
    for args in (["dump-teacher", "--teacher", str(kit / "teacher"), "--data", str(kit / "data/train.json"),
                  "--images", str(kit / "data/images"), "--out", str(cache), "--limit", "24", "--device", "cuda"],
                 ["train-student", "--student", str(kit / "student"), "--cache", str(cache), "--out", str(run),
                  "--loss", "alignti", "--max-steps", "6", "--batch-size", "4", "--device", "cuda"]):
        p = subprocess.run(base + args, env=env, cwd=root, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-3000:]
    assert (run / "final" / "config.json").exists()
    info = json.loads((run / "run.json").read_text())
    assert info["world_size"] == 1 and info["backend"] is None and info["device"] == "cuda"
    assert (cache / "manifest.json").exists()


def test_chunked_loss_head_under_bf16_autocast():
    """The memory-flat head on CUDA under bf16 autocast (train-student's GPU setting) gives the unchunked
    autocast path's loss and gradients to bf16 precision, at a real vocabulary."""
    from alignti.common.losses import LossWeights, get_loss, head_loss, total_loss
    torch.manual_seed(0)
    dev = torch.device("cuda")
    n, h, v, b, k, k2 = 300, 256, 151_936, 4, 32, 8
    head = torch.nn.Linear(h, v, bias=False, device=dev)
    t = {"targets": torch.randint(0, v, (n,), device=dev), "topk_ids": torch.randint(0, v, (n, k), device=dev)}
    lp = torch.log_softmax(torch.randn(n, k + 1, device=dev) * 2, -1)
    t["topk_logprobs"], t["tail_logmass"] = lp[:, :k], lp[:, k]
    t["tpa_cand_ids"] = t["topk_ids"][:, :b]
    t["tpa_ids"] = torch.randint(0, v, (n, b, k2), device=dev)
    lp2 = torch.log_softmax(torch.randn(n, b, k2 + 1, device=dev) * 2, -1)
    t["tpa_logprobs"], t["tpa_tail"] = lp2[..., :k2], lp2[..., k2]
    hid = torch.randn(n, h, device=dev, requires_grad=True)
    bh = torch.randn(n, b, h, device=dev, requires_grad=True)
    spec, w = get_loss("kd+tpa"), LossWeights(temperature=2.0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = total_loss(spec, w, dict(t, logits=head(hid), branch_logits=head(bh)))["loss"]
    g_ref = torch.autograd.grad(ref, [hid, bh, head.weight])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = head_loss(spec, w, head, dict(t, resp_hidden=hid, branch_hidden=bh), chunk_bytes=64 * 2 ** 20)["loss"]
    g_got = torch.autograd.grad(got, [hid, bh, head.weight])
    assert got.item() == pytest.approx(ref.item(), rel=1e-2)
    for a, c in zip(g_ref, g_got):
        cos = torch.nn.functional.cosine_similarity(a.flatten().float(), c.flatten().float(), dim=0)
        assert cos > 0.999, float(cos)
        assert ((a - c).norm() / a.norm()) < 0.03


def weight_casts_in_backward(device: str, mode: str) -> tuple[int, dict]:
    """A small Qwen2 step under bf16 autocast on ``device``: the casts of weight-shaped tensors in its backward,
    counted by the profiler over every thread (for CUDA the recompute runs on the autograd engine's device thread;
    an unchecked backward has one per weight, its gradient back to fp32), and the gradients. ``mode``: ""
    unchecked, "gc" (casts lent to the recompute), "gc-recast"."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from alignti.common.models import enable_gradient_checkpointing
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97)
    cfg._attn_implementation = "eager"  # deterministic backward (sdpa's memory-efficient kernel accumulates atomically)
    model = Qwen2ForCausalLM(cfg).to(device).train()
    if mode:
        enable_gradient_checkpointing(model, reuse_casts=mode == "gc")
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        loss.backward()
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    casts = sum(1 for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes
                and tuple(e.input_shapes[0]) in shapes)
    return casts, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_recompute_reuses_weight_casts_on_the_gpu():
    """On CUDA the recompute runs on the autograd engine's device thread, where autocast's cache is cleared on every
    exit: the forward's casts lent by checkpoint_layer still spare every weight cast there, with the same
    gradients."""
    plain_casts, plain = weight_casts_in_backward("cuda", "")
    lent_casts, lent = weight_casts_in_backward("cuda", "gc")
    recast_casts, recast = weight_casts_in_backward("cuda", "gc-recast")
    assert lent_casts == plain_casts and recast_casts >= plain_casts + 3 * 7  # 7 linear weights a layer, 3 layers
    for n in plain:
        torch.testing.assert_close(lent[n], recast[n], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(plain[n], lent[n])
