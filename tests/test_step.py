"""One optimizer step: the gradient does not depend on how its samples fall into micro-batches and ranks
(one normalisation over the step), and gradient checkpointing changes nothing but memory."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from grad_probe import step_gradients
from torch.utils._python_dispatch import TorchDispatchMode

from tests.exactness import EPS32

ROOT = Path(__file__).resolve().parents[1]


def _close(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def _reorder_close(want: dict, got: dict) -> None:
    """Gradients of the same step summed in another order (other micro-batches, their padding, ranks and their
    thread count): each element is a fp32 sum over the step's ~1,000 response tokens and their backward, whose
    rounding grows like sqrt(n) * eps32 (~4e-6) of its largest terms, so elementwise 1e-6 relative is not what fp32
    gives (an element near zero moves by its neighbours' rounding). Held to 1e-5 of the tensor's largest element
    (as test_loss_head's _fp32_reorder_tol), plus eps32 of the step's largest gradient for tensors whose gradient
    is zero in exact arithmetic (attention key biases: softmax ignores them; ~1e-11 of rounding noise either way).
    Seen here: 3.2e-7 of a tensor's largest element at most; per-micro-batch normalisation moves them by ~1e-2."""
    assert want.keys() == got.keys()
    floor = EPS32 * max(float(g.abs().max()) for g in want.values())
    for k in want:
        atol = 1e-5 * float(want[k].abs().max()) + floor
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def _torchrun(kit, cache, out, loss, per_micro, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    str(ROOT / "tests" / "grad_probe.py"), str(kit / "student"), str(cache), str(out), loss,
                    str(per_micro), *extra], env=env, check=True, capture_output=True, timeout=240)
    return torch.load(out)


def test_same_gradient_for_any_micro_batch_and_rank_split(kit, cache, tmp_path):
    """Batch 8 in one micro-batch, 2 x grad-accum 4, and 2 ranks x batch 4 (DDP, gloo): same gradients
    (to fp32 reordering, _reorder_close), on samples whose response lengths differ."""
    one = step_gradients(str(kit / "student"), str(cache), "alignti", per_micro=8)
    accum = step_gradients(str(kit / "student"), str(cache), "alignti", per_micro=2)
    _reorder_close(one, accum)
    ranks = _torchrun(kit, cache, tmp_path / "g.pt", "alignti", 4)
    _reorder_close(one, ranks)
    for mode in ("gc", "gc-reentrant"):  # DDP + gradient checkpointing, both modes
        ranks_gc = _torchrun(kit, cache, tmp_path / f"{mode}.pt", "alignti", 4, mode)
        _reorder_close(one, ranks_gc)
    # DDP under bf16 autocast: the recompute's lent weight casts give the same gradients as casting again, in both
    # modes (a reentrant recompute reaches the fp32 weights through the casts its no-grad forward made)
    lent, recast, reentrant = (_torchrun(kit, cache, tmp_path / f"{m}-amp.pt", "alignti", 4, m, "amp")
                               for m in ("gc", "gc-recast", "gc-reentrant"))
    _close(lent, recast, rtol=0, atol=0)
    _close(lent, reentrant, rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_gradients(kit, cache):
    """IVA's saliency capture and TPA's tree mask run again in the recompute, with the same results: non-reentrant,
    reentrant (the capture layer then runs unchecked) and every other layer."""
    for loss in ("alignti", "sft"):
        plain = step_gradients(str(kit / "student"), str(cache), loss, per_micro=4)
        for mode in ("gc", "gc-reentrant", "gc-reentrant-every2"):
            ckpt = step_gradients(str(kit / "student"), str(cache), loss, per_micro=4, gc=mode)
            _close(plain, ckpt, rtol=1e-6, atol=1e-8)


class _WeightCasts(TorchDispatchMode):
    """Counts casts of fp32 weights to bf16 (``_to_copy`` of a tensor sharing a parameter's storage), split into
    the forward's and the backward's (the recompute's)."""

    def __init__(self, model_params):
        super().__init__()
        self.ptrs = {p.data_ptr() for p in model_params}
        self.counts = {"forward": 0, "backward": 0}
        self.phase = "forward"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].dtype == torch.float32 \
                and args[0].data_ptr() in self.ptrs and (kwargs or {}).get("dtype") == torch.bfloat16:
            self.counts[self.phase] += 1
        return func(*args, **(kwargs or {}))


def test_recompute_reuses_the_forwards_weight_casts(kit, cache, monkeypatch):
    """Under bf16 autocast the recompute lends each layer the bf16 weights its forward cast (casting them again was
    516 of the 1,892 operations a recompute added to the benchmark's step): no weight is cast in backward, the forward
    casts as often as unchecked, and the gradients equal, bit for bit, those without checkpointing and those of a
    recompute that casts again, in both checkpoint modes."""
    from alignti.common.models import load_processor, load_vlm

    student, _ = load_vlm(str(kit / "student"), torch.device("cpu"), "float32")
    processor = load_processor(str(kit / "student"))
    monkeypatch.setattr("grad_probe.load_vlm", lambda *a, **k: (student, processor))  # the probes watch this model
    real_backward = torch.Tensor.backward
    probes = {}

    def probe_for(mode):
        def probe():
            counter = probes[mode] = _WeightCasts(student.parameters())

            def backward(self, *a, **k):  # what runs inside backward is the recompute
                counter.phase = "backward"
                try:
                    return real_backward(self, *a, **k)
                finally:
                    counter.phase = "forward"
            monkeypatch.setattr(torch.Tensor, "backward", backward)
            return counter
        return probe

    grads = {}
    for mode in ("", "gc", "gc-recast", "gc-reentrant", "gc-reentrant-recast"):
        for p in student.parameters():
            p.grad = None
        student.gradient_checkpointing_disable()
        grads[mode] = step_gradients(str(kit / "student"), str(cache), "alignti", per_micro=8, gc=mode, autocast=True,
                                     probe=probe_for(mode))
    counts = {m: p.counts for m, p in probes.items()}
    assert counts[""]["backward"] == 0
    assert len({c["forward"] for c in counts.values()}) == 1  # every mode's forward casts the same weights
    for lent, recast in (("gc", "gc-recast"), ("gc-reentrant", "gc-reentrant-recast")):
        assert counts[lent]["backward"] == 0, f"{lent}: the recompute cast weights again"
        assert counts[recast]["backward"] > 0.5 * counts[recast]["forward"]
        _close(grads[""], grads[lent], rtol=0, atol=0)
        _close(grads[lent], grads[recast], rtol=0, atol=0)


def test_checkpointing_replays_dropout_only_where_the_model_has_it():
    """The recompute restores the forward's random state only where dropout is live (has_dropout): a model with
    attention dropout gets the same gradients checkpointed as not, in both modes, from the same seed."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from alignti.common.models import enable_gradient_checkpointing, has_dropout
    cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97, attention_dropout=0.3)
    assert has_dropout(Qwen2ForCausalLM(Qwen2Config(**{**cfg.to_dict(), "attention_dropout": 0.0}))) is False
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))

    def grads(mode):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(cfg).train()
        assert has_dropout(model)
        model.config._attn_implementation = "eager"  # dropout inside attention
        if mode:
            enable_gradient_checkpointing(model, reentrant=mode == "reentrant")
        torch.manual_seed(5)
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads("")
    for mode in ("nonreentrant", "reentrant"):
        _close(plain, grads(mode), rtol=1e-6, atol=1e-8)
