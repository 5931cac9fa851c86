"""`alignti rollout`: the student answers every assistant turn of every sample; the rows are a dataset that
`dump-teacher --data` reads as it is.

Each assistant turn of each sample becomes ``--samples-per-prompt`` rows: the conversation up to that turn (the
image(s), system and user turns, earlier *reference* answers) followed by the student's answer, sampled at
``--temperature`` / ``--top-p`` (greedy at temperature 0) with the row's own seed (``common.onpolicy.seed_for``).
The row's loss turn is its last assistant turn (``loss_turns``), so the teacher's cache holds KD, TPA and IVA for
the student's answer only, the reference turns before it being context. Per generated token the row keeps the
student's top-B candidates and their probabilities (``student_rollout.generate``), for TPA on the student's
candidates. ``--teacher-forced`` generates nothing: one row per sample with its reference answers and the student's
top-B candidates at every response token (one forward).

Generation stops at the student's ``generation_config.eos_token_id`` and at the chat template's end-of-turn id
(``common.generate.stop_ids``), whichever comes first. A row is scored as generated: an answer cut at
``--max-new-tokens`` (``finish`` "length") gets no end-of-turn target at the dump (``common.onpolicy``), an answer the
student ended at once is a row with an empty answer (its target the end of turn alone); ``rollout.json`` counts both
(``cut``, ``empty``). Rows are left out (listed, with their seed) only where their text cannot stand for what was
generated: the text ``<image>``, or no answer text at all in a cut answer; a rollout with no row left fails naming
why (``DataSourceError``, no ``rollout.json``).

Work is split into fixed units of source samples, planned in ``OUT/plan.json``; unit u becomes
``OUT/data/u.parquet`` (written under a temporary name, then renamed: the rename commits it) and
``OUT/parts/u.json`` (rows dropped and why, counts). Re-running the same command after a crash (kill -9 anywhere)
generates only the missing units; the rows do not depend on batching or process count. ``OUT/rollout.json`` is
written last.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from alignti.common import distributed as dist
from alignti.common.cache import atomic_write_json
from alignti.common.config import check_ranges
from alignti.common.adapters import adapter_for, check_images_per_sample
from alignti.common.batch import collate
from alignti.common.conversation import encode
from alignti.common.errors import CacheError, DataError, DataSourceError
from alignti.common.faults import crash_point
from alignti.common.fingerprint import chat_template_of, tokenizer_info
from alignti.common.generate import stop_ids
from alignti.common.models import load_config, load_vlm
from alignti.common.onpolicy import (ROLLOUT_MANIFEST, ROLLOUT_PLAN, candidate_count, common_prefix, row_conversations,
                                     rollout_schema, seed_for, swap_student_tokens, weights_sha256)
from alignti.common.placement import check_placement
from alignti.common.progress import progress_bar
from alignti.common.records import Record, Skipped, parse_record
from alignti.common.sources import is_embedded, load_image, open_source, preflight

from .generate import generate_rows, teacher_forced_candidates

log = logging.getLogger("alignti.rollout")

PLAN, MANIFEST = ROLLOUT_PLAN, ROLLOUT_MANIFEST
DATA_DIR = "data"
PARTS_DIR = "parts"


@dataclass
class RolloutConfig:
    student: str
    data: str
    images: str | None
    out: str
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    samples_per_prompt: int = 1
    seed: int = 0
    round: int = 0
    top_b: int = 4               # the dump's --tpa-branches default
    teacher_forced: bool = False
    batch_size: int = 8
    unit_size: int = 64
    device: str = "auto"
    dtype: str = "auto"
    limit: int | None = None
    skip_bad: bool = False
    max_length: int | None = None
    tp_size: int = 1  # ranks per student replica (tensor parallelism inside it; replicas split the work units)
    max_memory: str | None = None  # a rank's memory for the plan check before loading ("70GiB")
    progress: bool = True


def _check(cfg: RolloutConfig) -> None:
    """Every numeric setting within its range (common.config.OPTION_RANGES["rollout"]), and settings that
    contradict each other. Raises OptionRangeError / ValueError naming the option."""
    check_ranges("rollout", cfg)
    if cfg.samples_per_prompt > 1 and cfg.temperature == 0 and not cfg.teacher_forced:
        raise ValueError("--samples-per-prompt > 1 at --temperature 0 gives identical copies of each greedy answer; "
                         "sample with --temperature > 0, or keep one sample per prompt")


def _assistant_turns(rec: Record) -> list[int]:
    return [i for i, (role, _) in enumerate(rec.turns) if role == "assistant"]


def _sampling_settings(cfg: RolloutConfig) -> dict:
    """The settings that decide a rollout's rows: the plan's ``settings`` and each row's ``sampling``."""
    return {k: getattr(cfg, k) for k in ("temperature", "top_p", "max_new_tokens", "samples_per_prompt", "seed",
                                         "top_b", "teacher_forced")}


def _row_item(rec: Record, upto: int, answer: str | None) -> tuple[dict, int]:
    """The LLaVA item of ``rec``'s turns before ``upto`` plus ``answer`` as the next assistant turn (``upto`` = the
    turn count and ``answer`` None: the whole conversation), and how many of its images it shows."""
    turns = list(rec.turns[:upto]) + ([("assistant", answer)] if answer is not None else [])
    placement = {t: offs for t, offs in (rec.image_at or {}).items() if t < len(turns)}
    n_img = sum(len(offs) for offs in placement.values())
    refs = rec.images[:n_img]
    item = {"id": rec.sample_id, "conversations": row_conversations(turns, placement)}
    if refs:
        item["image"] = refs if isinstance(rec.image, list) else refs[0]
    return item, n_img


def _images_of(rec: Record, loaded, n_img: int):
    """The first ``n_img`` of a record's loaded images (image, sha) in the shape load_image gives for that many."""
    img, sha = loaded
    if n_img == 0:
        return None, ""
    if isinstance(rec.image, list):
        imgs, shas = img[:n_img], json.loads(sha)[:n_img]
        return (imgs[0], shas[0]) if n_img == 1 else (imgs, json.dumps(shas))
    return img, sha


def _image_cell(source, rec: Record, refs: list[str], embedded: bool):
    """The output row's image column: the references as in the source (paths), or the bytes (embedded)."""
    if not refs:
        return None
    if not embedded:
        return list(refs)
    cell = []
    for ref in refs:
        if is_embedded(ref):
            cell.append({"bytes": rec.source.image_bytes(ref, rec.sample_id), "path": None})
        else:  # a path entry of a table source: read its bytes so the rollout stands alone
            cell.append({"bytes": source.image_bytes(ref, rec.sample_id), "path": ref})
    return cell


def student_fingerprint(cfg: RolloutConfig, model, processor) -> dict:
    return {"weights_sha256": weights_sha256(cfg.student, model),
            "tokenizer_sha256": tokenizer_info(processor.tokenizer, chat_template_of(processor))["hash"]}


def rollout(cfg: RolloutConfig) -> dict:
    """Under torchrun every rank runs this: rank 0 writes the plan, each rank generates the uncommitted units
    ``u % replicas == replica`` (``--tp-size`` ranks per replica, common.distributed.claim_units; each replica's
    first rank writes), rank 0 writes ``rollout.json`` last. Returns that manifest."""
    _check(cfg)
    out = Path(cfg.out)
    env = dist.dist_env(cfg.tp_size)
    device = dist.device_for(cfg.device, env)
    dist.init(env, device)
    try:  # the config alone, before any weight loads; an unreadable one is named by the loader
        config = load_config(cfg.student)
    except (OSError, ValueError, KeyError):
        config = None
    if config is not None:
        check_placement(config, cfg.student, device, cfg.dtype, env, cfg.tp_size, max_memory=cfg.max_memory)
    source = open_source(cfg.data, cfg.images)
    records = source.records()
    if cfg.limit is not None:
        records = records[:cfg.limit]
    if not records:
        raise DataSourceError(cfg.data, "no samples in the data", "check --data")
    records = preflight(records, cfg.images, cfg.skip_bad, "generating",
                        "fix them, or pass --skip-bad to leave them out (listed in rollout.json)")
    embedded = any(is_embedded(ref) for r in records if isinstance(r, Record) for ref in r.images)

    model, processor = load_vlm(cfg.student, device, cfg.dtype, tp_size=cfg.tp_size)
    model.eval()
    adapter = adapter_for(model)
    fp = student_fingerprint(cfg, model, processor)
    max_length = cfg.max_length or getattr(adapter.text_config, "max_position_embeddings", None)
    settings = _sampling_settings(cfg)
    units = [[s, min(s + cfg.unit_size, len(records))] for s in range(0, len(records), cfg.unit_size)]
    plan = {"student": fp, "round": cfg.round, "settings": settings, "embedded_images": embedded, "units": units,
            "data": str(cfg.data) if "://" in str(cfg.data) else str(Path(cfg.data).resolve()),
            "images": str(Path(cfg.images).resolve()) if cfg.images else "",
            "unit_ids": [[r.sample_id for r in records[s:e]] for s, e in units]}

    def prepare() -> bool:
        old = json.loads((out / PLAN).read_text()) if (out / PLAN).exists() else None
        if old is None:
            if out.exists() and any(out.iterdir()):
                raise CacheError(f"{out} exists and is not an alignti rollout; choose an empty or new --out")
            out.mkdir(parents=True, exist_ok=True)
            (out / DATA_DIR).mkdir(exist_ok=True)
            (out / PARTS_DIR).mkdir(exist_ok=True)
            atomic_write_json(out / PLAN, plan)
        else:
            diffs = [k for k in ("student", "round", "settings", "units", "unit_ids") if old.get(k) != json.loads(
                json.dumps(plan[k]))]
            if diffs:
                raise CacheError(f"{out} holds a rollout made with different {', '.join(diffs)}; refusing to mix "
                                 f"them. Use a new --out, or delete {out} to start over.")
        for p in list((out / DATA_DIR).glob(".*.tmp*")) + list(out.glob("*.tmp*")):
            p.unlink(missing_ok=True)  # a part or json interrupted mid-write
        return (out / MANIFEST).exists()

    if dist.on_main(env, prepare):
        log.info("%s is already complete; nothing to do", out)
        return json.loads((out / MANIFEST).read_text())

    done = {int(p.stem) for p in (out / DATA_DIR).glob("*.parquet")}
    todo = dist.claim_units(env, len(units), done)  # a replica's ranks: the same units; its first rank writes
    if done:
        log.info("resuming: %d of %d work units already written", len(done), len(units))
    pad_id = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else 0
    schema = rollout_schema(embedded)
    n_rows_todo = sum(_rows_per_record(r, cfg) for u in todo for r in records[units[u][0]:units[u][1]])
    speed = {"t0": time.perf_counter(), "tokens": 0}  # generated tokens / s, shown on the bar
    with progress_bar("rollout", total=n_rows_todo, unit="rows", enabled=cfg.progress and env.is_main) as bar:
        for u in todo:
            s, e = units[u]
            rows, dropped = _unit(cfg, model, processor, adapter, source, records[s:e], fp, embedded, pad_id,
                                  max_length, bar, speed)
            if env.is_writer:
                _write_unit(out, u, rows, dropped, schema)
    dist.barrier(env)

    def finish() -> dict:
        written = {int(p.stem) for p in (out / DATA_DIR).glob("*.parquet")}
        missing = [u for u in range(len(units)) if u not in written]
        if missing:
            raise CacheError(f"work units {missing[:5]} of {out} were not written; re-run the same command")
        parts = [json.loads((out / PARTS_DIR / f"{u:05d}.json").read_text()) for u in range(len(units))]
        if not sum(p["rows"] for p in parts):
            raise _no_usable_row(out, [d for p in parts for d in p["dropped"]], len(records))
        manifest = {"kind": "alignti-rollout", "plan": PLAN, "student": fp, "round": cfg.round, "settings": settings,
                    "data": plan["data"], "images": plan["images"], "embedded_images": embedded,
                    "counts": {"source_samples": len(records), "rows": sum(p["rows"] for p in parts),
                               "dropped": sum(len(p["dropped"]) for p in parts),
                               "generated_tokens": sum(p["generated_tokens"] for p in parts),
                               "cut": sum(p.get("cut", 0) for p in parts),
                               "empty": sum(p.get("empty", 0) for p in parts),
                               "retokenized_differs": sum(p["retokenized_differs"] for p in parts),
                               "text_retokenized_differs": sum(p.get("text_retokenized_differs", 0) for p in parts)},
                    "dropped": [d for p in parts for d in p["dropped"]],
                    "rollout_config": {k: v for k, v in asdict(cfg).items() if k != "progress"}}
        atomic_write_json(out / MANIFEST, manifest, point="rollout-manifest")
        return manifest

    manifest = dist.on_main(env, finish)
    c = manifest["counts"]
    log.info("rollout written to %s: %d rows from %d samples (%d dropped), %d generated tokens, %d answers cut at "
             "--max-new-tokens (scored as generated: no end of turn), %d empty; this process %.1f tok/s", out,
             c["rows"], c["source_samples"], c["dropped"], c["generated_tokens"], c["cut"], c["empty"],
             speed["tokens"] / max(time.perf_counter() - speed["t0"], 1e-9))
    if c["cut"] and c["cut"] * 2 >= c["rows"]:
        log.warning("%d of %d answers were cut at --max-new-tokens %d: they are scored as generated (no end of turn "
                    "is a target), so the student never learns where such answers end; raise --max-new-tokens if "
                    "the answers are meant to end", c["cut"], c["rows"], cfg.max_new_tokens)
    if c["empty"] and c["empty"] == c["rows"]:
        log.warning("the student ended every answer at once (%d empty answers): each row's target is the teacher's "
                    "view of that end of turn; if the student should answer, check its chat template and "
                    "generation_config.eos_token_id", c["empty"])
    return manifest


def _no_usable_row(out: Path, dropped: list[dict], n_samples: int) -> DataSourceError:
    """The error of a rollout none of whose rows is usable: how many were left out, for which reasons (counted)."""
    reasons: dict[str, int] = {}
    for d in dropped:
        why = d["reason"].split(" (")[0] if d["reason"].startswith("the student generated") else d["reason"]
        reasons[why] = reasons.get(why, 0) + 1
    listed = "; ".join(f"{n} x {why}" for why, n in sorted(reasons.items(), key=lambda x: -x[1])[:3])
    return DataSourceError(str(out), f"no usable row: every one of the {len(dropped)} rows from {n_samples} "
                           f"sample(s) was left out ({listed}), so dump-teacher would have nothing to score",
                           f"fix what the reasons name (a larger --max-new-tokens, other sampling settings, the "
                           f"samples themselves), then roll out into a new --out (or delete {out}); no rollout.json "
                           "was written, so nothing can dump this folder")


def _rows_per_record(r, cfg: RolloutConfig) -> int:
    if not isinstance(r, Record):
        return 0
    return 1 if cfg.teacher_forced else len(_assistant_turns(r)) * cfg.samples_per_prompt


def _write_unit(out: Path, u: int, rows: list[dict], dropped: list[dict], schema: pa.Schema) -> None:
    """The unit's sidecar first, then its parquet under a temporary name, renamed into place (the commit)."""
    name = f"{u:05d}"
    gen = [r for r in rows if r["turn"] >= 0]
    meta = {"unit": u, "rows": len(rows), "dropped": dropped,
            "generated_tokens": sum(len(r["student_token_ids"]) for r in gen),
            "cut": sum(1 for r in gen if r["finish"] == "length"),
            "empty": sum(1 for r in gen if not r["conversations"][-1]["value"].strip()),
            "retokenized_differs": sum(1 for r in rows if not r["retokenized_equal"]),
            "text_retokenized_differs": sum(1 for r in rows if not r.pop("_text_equal", True))}
    atomic_write_json(out / PARTS_DIR / f"{name}.json", meta)
    tmp = out / DATA_DIR / f".{name}.tmp{os.getpid()}"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp, compression="zstd")
    crash_point("rollout-part")
    os.replace(tmp, out / DATA_DIR / f"{name}.parquet")


def _unit(cfg, model, processor, adapter, source, records, fp, embedded, pad_id, max_length, bar, speed):
    """Rows of one work unit, in (sample, turn, k) order whatever the batching; rows dropped and why."""
    jobs, dropped = [], []  # job: (record, images loaded, assistant turn ordinal, turn index, k)
    for r in records:
        if isinstance(r, Skipped):
            dropped.append({"source_id": r.sample_id, "source_index": r.index, "reason": r.error})
            continue
        try:
            check_images_per_sample(adapter, r.sample_id, len(r.images))
            loaded = load_image(r, cfg.images) if r.images else (None, "")
        except DataError as err:
            if not cfg.skip_bad:
                raise DataError(err.sample, err.problem, err.fix + "; units already written are kept: re-run the "
                                "same command after fixing to resume") from None
            dropped.append({"source_id": r.sample_id, "source_index": r.index, "reason": str(err)})
            bar.advance(_rows_per_record(r, cfg))
            continue
        if cfg.teacher_forced:
            jobs.append((r, loaded, -1, len(r.turns), 0))
        else:
            for a, i in enumerate(_assistant_turns(r)):
                for k in range(cfg.samples_per_prompt):
                    jobs.append((r, loaded, a, i, k))
    sampling = json.dumps(_sampling_settings(cfg), sort_keys=True)  # every row's "sampling" column
    rows: dict[tuple, dict] = {}
    run = _teacher_forced_jobs if cfg.teacher_forced else _generated_jobs
    for key, row in run(cfg, model, processor, adapter, jobs, pad_id, max_length, bar, dropped):
        r = key[0]
        row.update(source_id=r.sample_id, source_index=r.index, sample_index=key[3], round=cfg.round,
                   student_weights_sha256=fp["weights_sha256"], student_tokenizer_sha256=fp["tokenizer_sha256"],
                   sampling=sampling)
        refs = r.images[:row.pop("_n_img")]
        row["image"] = _image_cell(source, r, refs, embedded)
        rows[(r.index, key[1], key[3])] = row
        speed["tokens"] += len(row["student_token_ids"]) if row["turn"] >= 0 else 0
        bar.update(speed=f"{speed['tokens'] / max(time.perf_counter() - speed['t0'], 1e-9):.1f} tok/s")
    return [rows[k] for k in sorted(rows)], dropped


def _prompt(processor, rec: Record, loaded, i: int, max_length):
    item, n_img = _row_item(rec, i, "x")  # parsed as the dump will parse the finished row
    prec = parse_record(rec.index, item)
    prec.source = rec.source
    img, sha = _images_of(rec, loaded, n_img)
    return encode(processor, prec, img, sha, max_length=max_length, generation_prompt=True), n_img


def _generated_jobs(cfg, model, processor, adapter, jobs, pad_id, max_length, bar, dropped):
    tok = processor.tokenizer
    stops = stop_ids(model, processor)  # generation_config's end of sequence and the template's end of turn
    prompts = []
    encoded: dict[tuple[int, int], tuple] = {}  # (record, turn) -> its prompt: encoded once for all its samples
    for job in jobs:
        r, loaded, a, i, k = job
        try:
            if (r.index, i) not in encoded:
                encoded[(r.index, i)] = _prompt(processor, r, loaded, i, max_length)
            enc, n_img = encoded[(r.index, i)]
        except DataError as err:
            if not cfg.skip_bad:
                raise
            dropped.append({"source_id": r.sample_id, "source_index": r.index, "turn": a, "sample_index": k,
                            "reason": str(err)})
            bar.advance(1)
            continue
        prompts.append((job, enc, n_img))
    prompts.sort(key=lambda x: -len(x[1].input_ids))  # similar lengths together; rows are put back in order
    for b in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[b:b + cfg.batch_size]
        seeds = [seed_for(cfg.seed, job[0].sample_id, job[2], job[4]) for job, _, _ in chunk]
        gens = generate_rows(model, [enc for _, enc, _ in chunk], seeds, temperature=cfg.temperature, top_p=cfg.top_p,
                             max_new_tokens=cfg.max_new_tokens, top_b=cfg.top_b, pad_id=pad_id,
                             image_token_id=adapter.image_token_id, eos_ids=stops)
        for (job, enc, n_img), g, seed in zip(chunk, gens, seeds):
            r, loaded, a, i, k = job
            bar.advance(1)
            eos_free = g.token_ids[:-1] if g.finish == "eos" else g.token_ids
            # no clean-up: it would rewrite the text the student's tokens spell (" ," -> ",")
            answer = tok.decode(eos_free, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            # an empty answer ended by the student (its stop token first) is kept: the end of turn alone is what
            # the student did, and the teacher's view of it is the on-policy target (TRL's GKD trains on it too)
            why = ("an answer holding the text <image>" if "<image>" in answer else
                   f"no answer text in --max-new-tokens {cfg.max_new_tokens} tokens"
                   if not answer.strip() and g.finish != "eos" else None)
            if why:
                dropped.append({"source_id": r.sample_id, "source_index": r.index, "turn": a, "sample_index": k,
                                "seed": seed, "reason": f"the student generated {why} ({len(g.token_ids)} tokens)"})
                continue
            item, _ = _row_item(r, i, answer)
            valid, equal, text_equal = _retokenized(processor, adapter, r, loaded, item, n_img, enc, g, max_length)
            row = {"id": f"{r.sample_id}/t{a}/s{k}", "conversations": item["conversations"], "turn": a,
                   "loss_turns": [a], "seed": seed, "finish": g.finish, "student_token_ids": list(g.token_ids),
                   "student_cand_ids": g.cand_ids.tolist(), "student_cand_probs": g.cand_probs.tolist(),
                   "student_cand_valid": valid, "retokenized_equal": equal, "_text_equal": text_equal,
                   "_n_img": n_img}
            if not equal:
                log.debug("sample %s turn %d: the re-encoded answer keeps %d of %d generated tokens' candidates",
                          r.sample_id, a, valid, len(g.token_ids))
            yield (r, a, i, k), row


def _retokenized(processor, adapter, rec, loaded, item, n_img, prompt_enc, gen, max_length) -> tuple[int, bool, bool]:
    """Encode the finished row as the dump will, with the student's own tokens in place of the re-encoded answer
    where the texts allow it (``common.onpolicy.swap_student_tokens``, the dump's own rule). Returns (the leading
    generated positions whose student candidates apply to the dump's encoding: ``common.onpolicy.candidate_count``, 0
    when the prompt itself re-encodes differently; whether that encoding holds every generated token; whether the
    text alone re-encodes to them, before any swap)."""
    row = parse_record(rec.index, item, generated_last=True)
    row.source = rec.source
    img, sha = _images_of(rec, loaded, n_img)
    try:
        full = encode(processor, row, img, sha, max_length=max_length)
    except DataError:
        return 0, False, False
    s, e = full.resp_spans[-1]
    p = prompt_enc.input_ids
    gen_ids = gen.token_ids
    if s != len(p) or not np.array_equal(full.input_ids[:s], p):
        return 0, False, False
    n = len(gen_ids)
    text_equal = common_prefix(full.input_ids[s:e], gen_ids) == n
    swap_student_tokens(full, gen_ids, gen.finish, processor.tokenizer, adapter.image_token_id, max_length)
    s, e = full.resp_spans[-1]
    resp = full.input_ids[s:e]
    return candidate_count(resp, gen_ids, n), common_prefix(resp, gen_ids) == n, text_equal


def _teacher_forced_jobs(cfg, model, processor, adapter, jobs, pad_id, max_length, bar, dropped):
    encs = []
    for job in jobs:
        r, loaded = job[0], job[1]
        item, n_img = _row_item(r, len(r.turns), None)
        rec = parse_record(r.index, item)
        rec.source = r.source
        img, sha = _images_of(r, loaded, n_img)
        try:
            encs.append((job, encode(processor, rec, img, sha, max_length=max_length), item, n_img))
        except DataError as err:
            if not cfg.skip_bad:
                raise
            dropped.append({"source_id": r.sample_id, "source_index": r.index, "reason": str(err)})
            bar.advance(1)
    encs.sort(key=lambda x: -len(x[1].input_ids))
    for b in range(0, len(encs), cfg.batch_size):
        chunk = encs[b:b + cfg.batch_size]
        batch = collate([enc.__dict__ for _, enc, _, _ in chunk], pad_id, type(adapter))
        cands = teacher_forced_candidates(adapter, batch, cfg.top_b)
        for (job, enc, item, n_img), (ids, probs) in zip(chunk, cands):
            r = job[0]
            bar.advance(1)
            resp = enc.input_ids[enc.response_mask.astype(bool)]
            row = {"id": f"{r.sample_id}/tf", "conversations": item["conversations"], "turn": -1,
                   "loss_turns": list(range(len(enc.resp_spans))), "seed": 0, "finish": "teacher-forced",
                   "student_token_ids": resp.tolist(), "student_cand_ids": ids.tolist(),
                   "student_cand_probs": probs.tolist(), "student_cand_valid": len(resp), "retokenized_equal": True,
                   "_n_img": n_img}
            yield (r, -1, len(r.turns), 0), row
