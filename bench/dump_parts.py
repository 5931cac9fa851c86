"""Where one dump batch's time goes, per part, against the model's own forward: for each family, one batch of 8 demo
samples through the plain HF forward, alignti's forward (without and with its KV cache), and the dump's whole
teacher_batch with top-k only, + saliency, + TPA (B = 4); every family's arms interleaved in one process, each arm's
fastest of REPS rounds (a loaded machine's timings move between arms run apart). Teachers: bench/dump_overhead.py's
(the family's kit with a 4 x 256 LM).
Run: OMP_NUM_THREADS=1 python bench/dump_parts.py REPS FAMILY [FAMILY ...]   (workdir: $TMPDIR/alignti-dump-parts)
"""
import sys
import tempfile
import time
from pathlib import Path

import torch
from dump_overhead import big_teacher
from alignti.demo.kit import make_demo
from alignti.common.models import load_vlm
from alignti.common.adapters import adapter_for
from alignti.common.batch import collate, forward
from alignti.common.conversation import encode
from alignti.common.records import Record
from alignti.common.sources import load_image, load_records
from alignti.teacher_dump.compute import teacher_batch
torch.set_num_threads(1)
reps = int(sys.argv[1]); fams = sys.argv[2:]
work = Path(tempfile.gettempdir()) / "alignti-dump-parts"
arms = {}
work.mkdir(parents=True, exist_ok=True)
for fam in fams:
    kit = work / f"kit-{fam}"
    if not (kit / "teacher/config.json").exists():
        make_demo(kit, n_train=40, n_val=2, n_test=2, train_teacher=False, family=fam)
    teacher = big_teacher(kit, work / f"teacher-{fam}", 256, 4, 16, fam)
    model, proc = load_vlm(str(teacher), torch.device("cpu")); model.eval()
    ad = adapter_for(model)
    recs = [r for r in load_records(kit / "data/train.json") if isinstance(r, Record)][:8]
    enc = [encode(proc, r, *load_image(r, kit / "data/images")) for r in recs]
    batch = collate([e.__dict__ for e in enc], proc.tokenizer.pad_token_id, type(ad))
    ids = batch["input_ids"]; att = batch["valid"].long()
    img = ad.generation_inputs(ids, batch["image_inputs"], ad.image_token_id)
    base = dict(top_k=64, tpa_branches=0, tpa_top_k=8, saliency_layer=None, tpa_positions=1.0)
    sal = str(min(ad.saliency_layers(), key=lambda x: abs(x - 2)))
    arms[fam] = dict(
        plain=lambda m=model, i=ids, a=att, g=img: m(input_ids=i, attention_mask=a, **g),
        main_no_cache=lambda ad=ad, b=batch: forward(ad, b),
        main_cache=lambda ad=ad, b=batch: forward(ad, b, use_cache=True),
        topk=lambda ad=ad, b=batch, p=base: teacher_batch(ad, b, dict(p)),
        topk_sal=lambda ad=ad, b=batch, p=base, s=sal: teacher_batch(ad, b, dict(p, saliency_layer=int(s))),
        topk_sal_tpa=lambda ad=ad, b=batch, p=base, s=sal: teacher_batch(ad, b, dict(p, saliency_layer=int(s),
                                                                                    tpa_branches=4)))
    print(fam, "batch", tuple(ids.shape), "response tokens", sum(len(p) for p in batch["resp_pos"]), flush=True)
best = {(f, k): 1e9 for f in arms for k in arms[f]}
with torch.no_grad():
    for f in arms:
        for fn in arms[f].values(): fn()
    for _ in range(reps):
        for f in arms:
            for k, fn in arms[f].items():
                t = time.perf_counter(); fn(); best[(f, k)] = min(best[(f, k)], time.perf_counter() - t)
for f in arms:
    print(f)
    for k in arms[f]:
        v = best[(f, k)]
        print(f"  {k:14s} {v*1000:8.1f} ms  {v/best[(f, 'plain')]:.3f}x plain")
