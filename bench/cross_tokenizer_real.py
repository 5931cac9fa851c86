"""Cross-tokenizer losses on shipped tokenizers: does each one teach?

Teacher: a tiny LLaVA with llava-hf/llava-1.5-7b-hf's own tokenizer (Llama-2 SentencePiece, 32,002 ids) and
LLaVA-1.5's chat template ("USER: <image>\\nQ ASSISTANT: A "), SFT-trained on the shapes task so that its
distribution means something. Student: a tiny LLaVA with Qwen2's byte-level BPE (151,657 ids + <image>) and a
ChatML template ("<|im_start|>assistant\\nA<|im_end|>\\n"): the pairing of Align-TI's own students. Both tokenizers
are the vendored files of tests/data/tokenizers (sources beside them).

The same student init trains the same steps from the teacher's cache with ``--loss kd --cross-tokenizer M`` for M in
gold, uld, alm, and with ``--kd-weight 0`` (SFT on the student's own tokens alone: the control). Each is scored on
held-out questions (a cache of the validation split):

* ``kl``: the student's KL(teacher || student) at the aligned chunk starts, on the teacher's top-k mapped to
  student ids (the map where the token stands: first token, end of turn) plus one bin for the rest (gold's matched
  part, ``common.losses.gold_parts``), mean per paired row;
* ``first``: at each turn's first row, the share where the student's argmax is its own first answer token;
  ``eot``: at each turn's end row, the share where the argmax is ``<|im_end|>``, and the mean p(``<|im_end|>``);
* greedy answers (16 new tokens): ``first word`` kept (the reference's first word), ``stops`` (ends with
  ``<|im_end|>`` within the budget), ``exact`` match, ``collapsed`` (a word repeated 3 times in a row).

Run: python bench/cross_tokenizer_real.py --work /tmp/xt-real [--steps 150] [--teacher-steps 300] [--seeds 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

from _util import table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/real_tokenizers.py: the vendored tokenizers

METHODS = [("kd0", "gold", 0.0), ("gold", "gold", 1.0), ("uld", "uld", 1.0), ("alm", "alm", 1.0)]


def build(work: Path, teacher_steps: int) -> None:
    """Data, the SFT-trained teacher (shipped LLaVA-1.5 tokenizer and template) and its train / val caches."""
    import json as _json

    import torch

    from alignti.common.saving import save_checkpoint
    from alignti.demo import kit, shapes
    from alignti.demo.teacher_sft import train_sft
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher
    from tests.real_tokenizers import LLAVA15, DATA, load
    if (work / "cache-val/manifest.json").exists():
        return
    paths = shapes.write_dataset(work / "data", n_train=60, n_val=12, n_test=1, questions_per_image=2)
    tok = load(LLAVA15, work / "tok")
    proc = kit.build_processor(tok, "llava")
    proc.chat_template = _json.loads((DATA / LLAVA15 / "chat_template.json").read_text())["chat_template"]
    teacher = kit.build_model("llava", tok, kit.TEACHER, 0)
    teacher.config.text_config.eos_token_id = tok.eos_token_id
    teacher.generation_config.eos_token_id = tok.eos_token_id
    stats: dict = {}
    acc = train_sft(teacher, proc, paths["train"], paths["val"], work / "data/images", steps=teacher_steps,
                    batch_size=16, lr=3e-4, fresh=False, eval_every=teacher_steps, stats=stats)
    save_checkpoint(teacher, proc, work / "teacher")
    (work / "teacher.json").write_text(json.dumps({"val_exact": acc, "steps": stats.get("steps")}))
    for split in ("train", "val"):
        dump_teacher(DumpConfig(teacher=str(work / "teacher"), data=str(paths[split]),
                                images=str(work / "data/images"), out=str(work / f"cache-{split}"), top_k=32,
                                tpa_branches=0, progress=False))


def student(work: Path, seed: int) -> str:
    """The cross student: Qwen2's shipped tokenizer + <image>, ChatML, the teacher's vision tower."""
    from tokenizers import AddedToken
    from transformers import AutoModelForImageTextToText

    from alignti.common.saving import save_checkpoint
    from alignti.demo import kit
    from tests.real_tokenizers import CHATML_LLAVA, QWEN2, load
    path = work / f"student-seed{seed}"
    if (path / "config.json").exists():
        return str(path)
    tok = load(QWEN2, work / "tok")
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tok.chat_template = CHATML_LLAVA
    proc = kit.build_processor(tok, "llava")
    proc.chat_template = CHATML_LLAVA
    teacher = AutoModelForImageTextToText.from_pretrained(work / "teacher")
    model = kit.build_student("llava", tok, teacher, 1000 + seed)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    model.config.text_config.eos_token_id = im_end
    model.generation_config.eos_token_id = im_end
    model.generation_config.pad_token_id = tok.pad_token_id
    save_checkpoint(model, proc, path)
    return str(path)


def evaluate(model_dir: str, work: Path) -> dict:
    """The held-out scores of the module docstring for the student in ``model_dir``."""
    import torch

    from alignti.common.adapters import adapter_for
    from alignti.common.batch import lm_head
    from alignti.common.cache import CacheReader
    from alignti.common.conversation import encode
    from alignti.common.generate import _norm, exact_match, greedy_answers
    from alignti.common.losses import get_loss, gold_parts
    from alignti.common.models import load_vlm
    from alignti.common.sources import load_image, load_records
    from alignti.student_train.cross import CrossDataset, CrossTokenizer
    from alignti.student_train.data import StudentCollator
    from alignti.student_train.step import student_step_outputs
    model, proc = load_vlm(model_dir, torch.device("cpu"), "float32")
    adapter = adapter_for(model)
    reader = CacheReader(str(work / "cache-val"))
    cross = CrossTokenizer(reader, proc)
    ds = CrossDataset(reader, proc, cross, str(work / "data/images"))
    samples = [ds[i] for i in range(len(ds))]
    batch = StudentCollator(proc, type(adapter), cross)(samples)
    with torch.no_grad():
        res = student_step_outputs(adapter, batch, get_loss("kd"), 0)
        logits = lm_head(adapter)(res["resp_hidden"]).float()
    pair = batch["xt_pair"]
    rows = torch.nonzero(pair >= 0).flatten()
    tr = pair[rows]
    m, _ = gold_parts(logits[rows], batch["xt_ids"][tr], batch["xt_logprobs"][tr], batch["tail_logmass"][tr])
    im_end = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    tgt = batch["targets"]
    arg = logits.argmax(-1)
    first, eot = [], []
    off = 0
    for x in samples:  # each turn's first row and its <|im_end|> row (rows in sample and turn order)
        for s, e in x["resp_spans"]:
            first.append(int(arg[off] == tgt[off]))
            ends = [r for r in range(off, off + e - s) if int(tgt[r]) == im_end]
            if ends:
                eot.append((int(arg[ends[0]] == im_end), float(torch.softmax(logits[ends[0]], -1)[im_end])))
            off += e - s
    assert off == len(tgt)
    recs = load_records(str(work / "data/val.json"))
    prompts, refs = [], []
    for r in recs:
        img, sha = load_image(r, str(work / "data/images"))
        prompts.append(encode(proc, r, img, sha, generation_prompt=True))
        refs.append([t for role, t in r.turns if role == "assistant"][0])
    raw = greedy_answers(model, proc, prompts, max_new_tokens=16)
    stops = _stopped(model, proc, prompts)
    fw = [int(_norm(a).split()[:1] == _norm(b).split()[:1]) for a, b in zip(raw, refs)]
    collapsed = [int(bool(re.search(r"\b(\w+)(\s+\1\b){2,}", a.lower()))) for a in raw]
    return {"kl": float(m.mean()), "pairs": len(rows), "first": statistics.mean(first), "turns": len(first),
            "eot": statistics.mean(a for a, _ in eot), "p_eot": statistics.mean(p for _, p in eot),
            "first_word": statistics.mean(fw), "stops": statistics.mean(stops),
            "exact": statistics.mean(int(exact_match(a, b)) for a, b in zip(raw, refs)),
            "collapsed": statistics.mean(collapsed), "answers": raw[:6], "refs": refs[:6]}


def _stopped(model, proc, prompts) -> list[int]:
    """Per prompt whether greedy decoding emits <|im_end|> within 16 new tokens."""
    import torch

    from alignti.common.generate import left_padded
    tok = proc.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ids, att, image_inputs = left_padded(prompts, tok.pad_token_id, model.config.image_token_id)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=16, do_sample=False,
                             eos_token_id=im_end, pad_token_id=tok.pad_token_id, **image_inputs)
    return [int(im_end in row.tolist()) for row in out[:, ids.shape[1]:]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--methods", default=",".join(m for m, _, _ in METHODS))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    from alignti.student_train.trainer import TrainConfig, train_student
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    build(work, args.teacher_steps)
    print("teacher", (work / "teacher.json").read_text(), f"{time.perf_counter() - t0:.0f} s")
    results = []
    for seed in range(args.seeds):
        init = student(work, seed)
        for name, xt, w in METHODS:
            if name not in args.methods.split(","):
                continue
            out = work / "runs" / f"{name}-seed{seed}"
            if (out / "result.json").exists():
                results.append(json.loads((out / "result.json").read_text()))
                continue
            shutil.rmtree(out, ignore_errors=True)
            t1 = time.perf_counter()
            torch.manual_seed(seed)
            res = train_student(TrainConfig(student=init, cache=str(work / "cache-train"), out=str(out), loss="kd",
                                            kd_weight=w, cross_tokenizer=xt, max_steps=args.steps, batch_size=8,
                                            lr=3e-3, seed=seed, save_every=args.steps, progress=False, workers=0,
                                            freeze_vision=True, group_by_length=False))
            r = {"method": name, "seed": seed, **evaluate(res["final"], work),
                 "seconds": round(time.perf_counter() - t1)}
            (out / "result.json").write_text(json.dumps(r))
            results.append(r)
            print(name, seed, {k: v for k, v in r.items() if k not in ("answers", "refs")}, flush=True)
    init_scores = evaluate(student(work, 0), work)
    rows = [["init (untrained)", f"{init_scores['kl']:.3f}", f"{init_scores['first']:.2f}",
             f"{init_scores['eot']:.2f}", f"{init_scores['p_eot']:.3f}", f"{init_scores['first_word']:.2f}",
             f"{init_scores['stops']:.2f}", f"{init_scores['exact']:.2f}", f"{init_scores['collapsed']:.2f}"]]
    for name, _, _ in METHODS:
        rs = [r for r in results if r["method"] == name]
        if not rs:
            continue
        mean = lambda k: statistics.mean(r[k] for r in rs)  # noqa: E731
        rows.append([name if name != "kd0" else "kd-weight 0 (control)", f"{mean('kl'):.3f}", f"{mean('first'):.2f}",
                     f"{mean('eot'):.2f}", f"{mean('p_eot'):.3f}", f"{mean('first_word'):.2f}", f"{mean('stops'):.2f}",
                     f"{mean('exact'):.2f}", f"{mean('collapsed'):.2f}"])
    print(table(rows, ["run", "KL to teacher (aligned)", "first token argmax", "end-of-turn argmax",
                       "p(<|im_end|>) at end", "greedy first word", "greedy stops", "greedy exact", "collapsed"]))
    for r in results:
        print(r["method"], r["seed"], "answers:", r["answers"][:4], "refs:", r["refs"][:4])
    (work / "results.json").write_text(json.dumps({"init": init_scores, "runs": results}, indent=1))
    print(f"{time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
