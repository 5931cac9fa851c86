"""Mask-free TPA on a hybrid decoder (Qwen3.5: Gated DeltaNet + full attention, 3:1) against a plain forward of the
same batch, and the student's TPA step against its KD step, measured in one process with the variants interleaved
(the machine is shared: ratios, not seconds, are the figures).

Teacher: ``teacher_batch`` (the dump's per-batch compute: top-k of every response token, TPA at ``--tpa-positions``
of them with ``--branches`` candidates each, from the model's own states at those positions:
``branch_states.snapshot_branch_hidden``) against the model's own forward (``model(input_ids, attention_mask)``,
full logits) and against ``teacher_batch`` without TPA. Student: forward + backward of the main pass (the KD step's
model work: resp_hidden through the LM head, a log-softmax sum as the loss) against the same plus the branches at
the same positions (``forward`` with ``branch_cands``: the states at the positions recorded by the main pass itself,
``branch_states.states_in_main_pass``, the candidates forked from them), the head run once over the response and
branch rows as the trainer's chunked head runs it.

``--before REV``: also the mask-free paths of ``common/batch.py`` at git revision REV (loaded from git, run in the
same process on the same model and batch): there the teacher replayed each sample's prefix with a deep copy of the
whole cache per position and ran each position's candidates as their own forward (``replay_branch_hidden``), the
student ran one forward over prefix + candidate per (position, candidate) (``direct_branch_hidden``).

Text-only batches of random ids (the image prefix adds prompt tokens only); ``--vocab`` defaults to Qwen3.5's
248,320. Run: ``python bench/hybrid_tpa.py [--hidden 256] [--layers 8] [--seq 384] [--resp 96] [--batch 2]``
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from alignti.common.adapters import adapter_class, adapter_for
from alignti.common.batch import collate, forward, lm_head, tpa_layout
from alignti.teacher_dump.compute import select_tpa_positions, teacher_batch


def build(hidden: int, layers: int, vocab: int, work: Path):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from alignti.demo.kit import build_model, make_demo
    kit = work / "kit"
    if not (kit / "teacher/config.json").exists():
        make_demo(kit, n_train=2, n_val=1, n_test=1, train_teacher=False, family="qwen3_5")
    tok = AutoTokenizer.from_pretrained(kit / "teacher")
    small = build_model("qwen3_5", tok, dict(hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                                             num_attention_heads=8, num_key_value_heads=2), 0)
    cfg = small.config
    cfg.text_config.vocab_size = vocab
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(cfg).eval()


def module_at(rev: str, path: str = "common/batch.py"):
    """The module at ``path`` as it was at git revision ``rev`` (its relative imports resolve to today's package)."""
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, check=True, capture_output=True,
                         text=True).stdout
    package = "alignti." + path.rsplit("/", 1)[0].replace("/", ".")
    name = f"{package}._{Path(path).stem}_before"
    spec = importlib.util.spec_from_loader(name, loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = package
    sys.modules[name] = mod
    exec(compile(src, f"{rev}:common/batch.py", "exec"), mod.__dict__)
    return mod


def batch_of(n: int, seq: int, resp: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    samples = [dict(input_ids=torch.randint(10, vocab, (seq,), generator=g).numpy(),
                    response_mask=torch.cat([torch.zeros(seq - resp), torch.ones(resp)]).bool().numpy(),
                    instr_spans=[], n_image_tokens=0, image_tok_start=0, image_inputs=None) for _ in range(n)]
    return collate(samples, 0, adapter_class("qwen3_5"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=248_320)
    ap.add_argument("--seq", type=int, default=384)
    ap.add_argument("--resp", type=int, default=96)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--branches", type=int, default=4)
    ap.add_argument("--tpa-positions", type=float, default=0.25)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--before", default=None, help="git revision whose mask-free paths to time beside (e.g. main)")
    ap.add_argument("--split", action="store_true", help="then time the TPA variants' parts (language model calls)")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "alignti-bench-hybrid"))
    a = ap.parse_args()
    import os
    print(f"load average at start {os.getloadavg()}", flush=True)
    model = build(a.hidden, a.layers, a.vocab, Path(a.workdir))
    adapter = adapter_for(model)
    assert not adapter.tpa_tree_mask
    batch = batch_of(a.batch, a.seq, a.resp, a.vocab)
    params = dict(top_k=64, tpa_branches=a.branches, tpa_top_k=16, tpa_positions=a.tpa_positions, saliency_layer=None)
    no_tpa = dict(params, tpa_branches=0)

    def plain():
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["valid"].long())

    # the student's branch positions and candidates: the teacher's at the same fraction (random candidates: the
    # cost does not depend on which)
    counts = [len(p) for p in batch["resp_pos"]]
    sel = select_tpa_positions(torch.rand(sum(counts)), counts, a.tpa_positions)
    _, pos = tpa_layout(batch["resp_pos"], sel)
    cands = [torch.randint(10, a.vocab, (len(p), a.branches)) for p in pos]
    head = lm_head(adapter)

    def student(tpa: bool, fwd=forward):
        model.train()
        out = fwd(adapter, batch, branch_cands=cands if tpa else None, branch_pos=pos if tpa else None)
        rows = torch.cat([out.resp_hidden, out.branch_hidden.flatten(0, 1)]) if tpa else out.resp_hidden
        # one head call over the response and branch rows, as the trainer's chunked head (common/losses/head.py:
        # one weight gradient accumulated over every row) rather than two gradients of the 248,320-row head summed
        torch.log_softmax(head(rows).float(), -1).mean().backward()
        model.zero_grad(set_to_none=True)
        model.eval()

    variants = {"plain forward": plain, "teacher_batch, no TPA": lambda: teacher_batch(adapter, batch, no_tpa),
                f"teacher_batch, TPA at {a.tpa_positions}": lambda: teacher_batch(adapter, batch, params),
                "student KD step (fwd+bwd)": lambda: student(False),
                f"student KD+TPA step at {a.tpa_positions}": lambda: student(True)}
    if a.before:
        from alignti.teacher_dump import compute
        from alignti.common import branch_states as bs
        old_bs = module_at(a.before, "common/branch_states.py")
        old_bs.SnapshotLinearLayer = bs.SnapshotLinearLayer  # the adapter builds today's cache: one class for both
        old = module_at(a.before)
        for name in ("snapshot_branch_hidden", "main_pass_in_two", "prompt_split_at"):  # the revision's, not today's
            if hasattr(old_bs, name) and hasattr(old, name):
                setattr(old, name, getattr(old_bs, name))
        old_compute = module_at(a.before, "teacher_dump/compute.py")

        def teacher_before():  # today's teacher_batch with the revision's branch pass and top-k fold
            now = compute.branch_pass, compute.topk_fold_hidden
            compute.branch_pass, compute.topk_fold_hidden = old.branch_pass, old_compute.topk_fold_hidden
            try:
                teacher_batch(adapter, batch, params)
            finally:
                compute.branch_pass, compute.topk_fold_hidden = now

        variants[f"teacher_batch, TPA at {a.tpa_positions}, {a.before}"] = teacher_before
        variants[f"student KD+TPA step at {a.tpa_positions}, {a.before}"] = lambda: student(True, old.forward)
    times = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        fn()
    if a.before:  # the same branch hidden states, before and now
        with torch.no_grad():
            now_h = forward(adapter, batch, branch_cands=cands, branch_pos=pos).branch_hidden
            old_h = old.forward(adapter, batch, branch_cands=cands, branch_pos=pos).branch_hidden
        print(f"branch hidden states, now vs {a.before}: max |diff| {float((now_h - old_h).abs().max()):.2e} "
              f"(largest element {float(old_h.abs().max()):.2f})")
    for _ in range(a.repeat):
        for k, fn in variants.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    base, kd = med["plain forward"], med["student KD step (fwd+bwd)"]
    import os
    print(f"load average {os.getloadavg()}")
    print(f"qwen3_5 hidden {a.hidden}, {a.layers} layers {adapter.layer_types()}, vocab {a.vocab}, batch {a.batch} x "
          f"{a.seq} tokens ({a.resp} response), {a.branches} branches, threads {torch.get_num_threads()}")
    print("| variant | median s | x plain forward | x student KD step |")
    print("|---|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} | {v / base:.2f} | {v / kd:.2f} |")
    if a.split:
        split(adapter, teacher_batch_tpa=lambda: teacher_batch(adapter, batch, params), student=student,
              repeat=a.repeat)


def split(adapter, teacher_batch_tpa, student, repeat: int) -> None:
    """Where the TPA variants' time goes (after the table, one more timed run each): the language model's calls by
    kind (the main pass: the prompt and the rest; the prefix replay's segments; the candidates' continuations), the snapshot bookkeeping, and for the student the head's forward and the backward."""
    from alignti.common import batch as batch_mod
    from alignti.common import branch_states as bs
    acc: dict[str, float] = {}

    def timed(name, fn):
        def run(*args, **kw):
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                acc[name] = acc.get(name, 0.0) + time.perf_counter() - t
        return run

    lm = adapter.language_model
    lm_forward = lm.forward

    def lm_call(*args, **kw):
        kind = ("replay segments" if kw.get("cache") is not None and kw.get("attention_mask") is None else
                "continuation" if kw.get("cache") is not None and kw["inputs_embeds"].shape[1] == 1 else
                "main pass")  # the main pass: one call, or two (the prompt and the rest) with a cache
        return timed(f"lm {kind}", lm_forward)(*args, **kw)

    saved = (bs.snapshot_branch_hidden, bs.stack_snapshots, bs.stack_prefix_kv, bs.fork_cache)
    lm.forward = lm_call
    bs.stack_snapshots, bs.stack_prefix_kv, bs.fork_cache = (timed("snapshot bookkeeping", f) for f in saved[1:])
    batch_mod.snapshot_branch_hidden = timed("snapshot_branch_hidden (all)", saved[0])
    try:
        for name, fn in (("teacher_batch, TPA", teacher_batch_tpa), ("student KD+TPA step", lambda: student(True))):
            acc.clear()
            t = time.perf_counter()
            for _ in range(repeat):
                fn()
            total = (time.perf_counter() - t) / repeat
            print(f"{name}: {total:.3f} s per call; " + ", ".join(f"{k} {v / repeat:.3f}" for k, v in sorted(acc.items())))
    finally:
        lm.forward = lm_forward
        bs.stack_snapshots, bs.stack_prefix_kv, bs.fork_cache = saved[1:]
        batch_mod.snapshot_branch_hidden = saved[0]


if __name__ == "__main__":
    main()
