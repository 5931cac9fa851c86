"""The cost of one on-policy round (`alignti rounds`) split into its three stages, at real model shapes.

    python bench/round_cost.py [--device cpu|cuda] [--layers N] [--vision-layers N] [--samples 8] [--batch-size 4]
                               [--new-tokens 64]

The models are bench/scale.py's (config-built, random weights, no downloads): the student is LLaVA with Qwen2-0.5B's
language model (vocabulary 151,936) on a CLIP-L/14 336-px tower (576 image tokens), the teacher Qwen2-7B's shape on
the same tower; full depth on a GPU, ``--layers`` / ``--vision-layers`` trim both on CPU. The samples are prompts of
the realistic mix (576 image tokens, 20-200 text tokens); every stage works on the same samples and the same
``--new-tokens`` response tokens per sample:

* **rollout**: ``student_rollout.generate.generate_rows``, as `alignti rollout` calls it (seeded per-row sampling at
  temperature 1, the student's top-4 candidates captured per generated token), exactly ``--new-tokens`` tokens per
  prompt, in batches of ``--batch-size``;
* **dump**: ``teacher_dump.compute.teacher_batch`` on prompt + the student's generated tokens, as `dump-teacher`
  runs it on a rollout (top-32, saliency at the middle layer, TPA: 4 branches with top-8 after every response
  position, the rounds' default ``tpa_positions`` 1.0);
* **train**: one `train-student` optimizer step (alignti loss: KD + IVA + TPA at every position, AdamW) per batch
  of the same samples, with teacher tensors of the cache's shapes.

The three stages run in ``--repeat`` interleaved rounds (rollout, dump, train, rollout, ...) after a warm-up, in
this one process with both models resident, each over all the samples; a stage's seconds are its median, its
`x train` the median of its per-round ratios to the train stage (so a slow spell of a shared machine cancels out). A
round over N samples with E training epochs costs rollout + dump + E x train.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import device_name, sync, table  # noqa: E402
from scale import B, IMAGE_TOKEN, K, K2, build, realistic_lengths, student_batch  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

TOP_B = 4  # the rollout's --top-b = the dump's --tpa-branches


def prompts_of(n: int, seed: int = 0) -> list:
    """``n`` generation prompts of the realistic mix as ``Encoded`` (generation_prompt=True): [bos, 5 markup, 576 image
    tokens, prompt text, 4 markup of the assistant's header], random text ids, one 336-px image each."""
    from alignti.common.conversation import Encoded
    g = np.random.default_rng(seed)
    out = []
    for i, (prompt, _) in enumerate(realistic_lengths(n, seed=seed)):
        head = 6
        ids = np.concatenate([g.integers(0, 150_000, head), np.full(576, IMAGE_TOKEN),
                              g.integers(0, 150_000, prompt + 4)]).astype(np.int32)
        out.append(Encoded(i, f"s{i}", "", "", ids, np.zeros(len(ids), np.uint8),
                           {"pixel_values": torch.randn(1, 3, 336, 336)}, head, 576,
                           [(head + 576, head + 576 + prompt)], [], [(head, head + 576)]))
    return out


def answered(prompts: list, generated: list[list[int]]) -> list[dict]:
    """The samples as the dump reads a rollout row: prompt + the student's tokens, the loss on those tokens."""
    out = []
    for p, gen in zip(prompts, generated):
        ids = np.concatenate([p.input_ids, np.asarray(gen, np.int32)])
        mask = np.zeros(len(ids), np.uint8)
        mask[len(p.input_ids):] = 1
        out.append({"input_ids": ids, "response_mask": mask, "instr_spans": p.instr_spans,
                    "resp_spans": [(len(p.input_ids), len(ids))], "n_image_tokens": 576,
                    "image_tok_start": p.image_tok_start, "image_inputs": p.image_inputs})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=None, help="trim both language models to N layers (CPU)")
    ap.add_argument("--vision-layers", type=int, default=None, help="trim both vision towers to N layers (CPU)")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64, help="response tokens per sample (generated, scored, trained)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs of each stage first")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()

    from alignti.common.adapters import LlavaAdapter, adapter_for
    from alignti.common.batch import collate, to_device
    from alignti.common.losses import LossWeights, StepNorm, get_loss
    from alignti.student_rollout.generate import generate_rows
    from alignti.student_train.step import StudentStep
    from alignti.teacher_dump.compute import teacher_batch

    device = torch.device(args.device)
    bs, n, new = args.batch_size, args.samples, args.new_tokens
    prompts = prompts_of(n, seed=3)
    chunks = [list(range(i, min(i + bs, n))) for i in range(0, n, bs)]
    figures = {"device": device_name(device), "layers": args.layers, "vision_layers": args.vision_layers,
               "samples": n, "batch_size": bs, "new_tokens": new, "rounds": args.repeat}

    # the student: fp32 master weights with AdamW state resident (train-student); the rollout generates with a bf16
    # copy on CUDA (rollout's dtype auto), with the same fp32 model on CPU
    torch.manual_seed(0)
    student = build("student", args.layers, args.vision_layers, device)
    if device.type == "cuda":
        student.float()
    gen_model = copy.deepcopy(student).to(torch.bfloat16).eval() if device.type == "cuda" else student
    sadapter = adapter_for(student)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=0.0)  # lr 0: the same cost
    step_mod = StudentStep(student, sadapter, get_loss("alignti"), sadapter.num_layers // 2, LossWeights())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    torch.manual_seed(1)
    teacher = build("teacher", args.layers, args.vision_layers, device).eval()
    adapter = adapter_for(teacher)
    dtype = next(teacher.parameters()).dtype
    params = {"top_k": K, "tpa_branches": B, "tpa_top_k": K2, "saliency_layer": adapter.num_layers // 2,
              "tpa_positions": 1.0, "tpa_layout": "positions"}
    generated: list[list[int]] = [[] for _ in range(n)]
    gdtype = next(gen_model.parameters()).dtype

    def rollout():
        gen_model.eval()
        for c in chunks:
            batch = [copy.copy(prompts[i]) for i in c]
            for p in batch:
                p.image_inputs = {k: v.to(gdtype) for k, v in p.image_inputs.items()}
            gens = generate_rows(gen_model, batch, [1000 + i for i in c], temperature=1.0, top_p=1.0,
                                 max_new_tokens=new, top_b=TOP_B, pad_id=0, image_token_id=IMAGE_TOKEN,
                                 eos_ids=[], min_new_tokens=new)
            for i, g in zip(c, gens):
                generated[i] = g.token_ids

    rollout()  # warm-up; its tokens are the responses the dump scores and the student trains on
    assert all(len(g) == new for g in generated)
    samples = answered(prompts, generated)
    dump_batches = []
    for c in chunks:
        b = to_device(collate([samples[i] for i in c], 0, LlavaAdapter), device)
        b["image_inputs"] = {k: v.to(dtype) for k, v in b["image_inputs"].items()}
        dump_batches.append(b)
    train_batches = [student_batch([samples[i] for i in c], 1.0, device) for c in chunks]

    def dump():
        with torch.no_grad():
            for b in dump_batches:
                teacher_batch(adapter, b, params)["topk_ids"].sum().item()

    def train():
        student.train()
        for batch in train_batches:
            with autocast:
                out = step_mod(batch, StepNorm.of(batch))
            out["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=False)

    for _ in range(args.warmup):
        dump()
        train()
    times = {"rollout": [], "dump": [], "train": []}
    for _ in range(args.repeat):  # interleaved: a slow spell of the machine hits every stage of that round alike
        for name, fn in (("rollout", rollout), ("dump", dump), ("train", train)):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    t_rollout, t_dump, t_train = (statistics.median(times[k]) for k in ("rollout", "dump", "train"))
    x_rollout = statistics.median(a / b for a, b in zip(times["rollout"], times["train"]))
    x_dump = statistics.median(a / b for a, b in zip(times["dump"], times["train"]))
    student_params = sum(p.numel() for p in student.parameters()) / 1e6
    teacher_params = sum(p.numel() for p in teacher.parameters()) / 1e6
    figures["times"] = times
    total = 1 + x_rollout + x_dump
    rows = []
    for key, name, t, x in (("rollout", "rollout (student generates)", t_rollout, x_rollout),
                            ("dump", "dump-teacher (teacher scores, TPA all)", t_dump, x_dump),
                            ("train", "train-student (1 alignti step / batch)", t_train, 1.0)):
        rows.append([name, f"{t:.2f}", f"{t / n:.3f}", f"{n * new / t:,.0f}", f"{x:.2f}", f"{x / total:.0%}"])
        figures[key] = {"sec": t, "sec_per_sample": t / n, "response_tokens_per_s": n * new / t, "x_train": x,
                        "share": x / total}
    print(f"device: {figures['device']}; layers {args.layers or 'full'}, vision layers {args.vision_layers or 'full'}; "
          f"student {student_params:.0f}M params, teacher {teacher_params:.0f}M; {n} samples in batches of {bs}, "
          f"{new} response tokens each (prompts of the realistic mix, 576 image tokens)")
    print(table(rows, ["stage", "sec", "sec/sample", "resp tok/s", "x train", "share of round"]))
    print(f"RATIO rollout/train {x_rollout:.2f}x, dump/train {x_dump:.2f}x (medians of per-round ratios over "
          f"{args.repeat} interleaved rounds; one epoch: the round costs {total:.2f}x its training)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
