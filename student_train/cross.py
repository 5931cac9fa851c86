"""Cross-tokenizer training's data side: the student encodes each cached sample itself and aligns it to the teacher.

With ``train-student --cross-tokenizer uld|gold|alm`` the student's tokenizer or processor may differ from the
teacher's (``common.fingerprint``). Each sample's conversation, as the teacher's template received it (cache
schema v7), goes through the student's own chat template and processor (its own image tokens); the teacher's and
the student's response tokens of every turn are aligned into chunks of identical text (``common.token_align``);
the teacher's cached rows stay as they are. The batch then carries, besides today's keys (flattened over response
rows, N_s student rows, N_t teacher rows):

* ``targets`` [N_s] the student's own response ids (SFT on them), the teacher's ``topk_ids`` / ``topk_logprobs``
  [N_t, k] and ``tail_logmass`` [N_t];
* ``xt_target_logprob`` [N_t]: the teacher's log-prob of its realised token (the cache's target_logprob);
* ``xt_pair`` [N_s]: for a student row that starts a chunk, the teacher row that starts the same chunk, else -1;
* ``xt_ids`` [N_t, k]: the teacher's top-k ids in the student's vocabulary (identical token bytes, special tokens by
  role), -1 where none; at a turn's first row and at its end of turn refined by where the token stands
  (``token_align.row_fix``: the template's lead before the answer swapped, the end of turn to the student's end of
  turn); ``xt_logprobs`` [N_t, k]: the teacher's top-k log-probs with the slots that map to one student id merged
  into the first (``token_align.merge_duplicates``);
* ``xt_chunk_s`` [N_s], ``xt_chunk_t`` [N_t]: batch-global chunk indices, ``xt_n_chunks`` int, ``xt_overlap``
  float: the share of the teacher's (non-special) vocabulary with an identical student token (GOLD's weights);
* for IVA, ``teacher_sal`` resampled to the student's image tokens, image by image (``common.tiles.resample_layout``);
* for TPA, the TPA rows whose position is a one-token chunk on both sides and whose candidates all map (their
  next-step top-k ids mapped; ids without a student token folded into the rest mass).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from alignti.common.batch import span_image_positions
from alignti.common.cache import CacheReader, read_teacher_specials, read_teacher_tokens
from alignti.common.conversation import (encode, end_of_turn_ids, record_from_conversation, rendered_text,
                                         with_saliency_query)
from alignti.common.errors import CacheError, DataError
from alignti.common.fingerprint import chat_template_of, tokenizer_info
from alignti.common.tiles import layouts_of, resample_layout
from alignti.common.onpolicy import restrict_to_loss_turns, without_end_markup
from alignti.common.records import image_refs
from alignti.common.schema import ALIGN_SCHEMA_VERSION, has_align_fields
from alignti.common.token_align import (align_sample, decode_token_bytes, merge_duplicates, row_fix, special_roles,
                                       student_index, turn_fixes, vocab_map)

from .data import CacheDataset

log = logging.getLogger("alignti.train")

TPA_KEYS = ("tpa_pos", "tpa_cand_ids", "tpa_ids", "tpa_logprobs", "tpa_tail")
# cross-tokenizer KD terms the train-student command does not offer, and why: measured on shipped tokenizers
# (bench/cross_tokenizer_real.py: the llava-1.5-7b-hf tokenizer's teacher, a Qwen2-BPE student, against the same run
# at --kd-weight 0; bench/README.md). The loss functions stay (common/losses/cross.py) for the benches that measure them.
NOT_OFFERED = {
    "uld": "ULD compares the two distributions' probabilities sorted by rank, with no token identity, so it raises "
           "whatever token the student already ranks first: on shipped tokenizers (LLaVA-1.5's Llama-2 teacher, a "
           "Qwen2-BPE student) the student's argmax at the answer's first token was its own in 1 of 26 turns against 7 "
           "of 26 without the term, and its greedy answers kept the reference's first word in 1 of 24 against 7 "
           "('triangle' for every question shown). Use --cross-tokenizer gold",
    "alm": "ALM matches only the likelihood of the realised chunks, which on a cache of reference answers is the "
           "signal SFT on the student's own tokens already gives: on shipped tokenizers the student's KL to the "
           "teacher stayed where the --kd-weight 0 run left it (1.0026 against 1.0034). Use --cross-tokenizer gold",
}


def check_cross_cache(reader: CacheReader, url: str) -> list:
    """Refuse, in one line naming the re-dump, a cache without what cross-tokenizer training needs (schema < 7).
    Returns the teacher's token strings as read (``read_teacher_tokens``), so they are read once."""
    tokens = read_teacher_tokens(reader) if has_align_fields(reader.params) else None
    if tokens is None:
        raise CacheError(f"the cache at {url} (schema v{reader.manifest.get('schema_version')}) holds no turn texts, "
                         f"character spans or teacher token strings, which --cross-tokenizer needs: re-dump it with "
                         f"this alignti (schema v{ALIGN_SCHEMA_VERSION}): alignti dump-teacher --teacher ... "
                         f"--out NEW_CACHE")
    return tokens


class CrossTokenizer:
    """One tokenizer pair: the teacher's (from the cache) and the student's processor. ``vocab_map`` is computed
    once per pair (memoised by both fingerprints in ``common.token_align``)."""

    def __init__(self, reader: CacheReader, processor, url: str = "", iva: bool = False, tpa: bool = False,
                 teacher_tokens: list | None = None):
        """``teacher_tokens``: what ``check_cross_cache`` returned for this cache, when the caller checked it
        already (read from the cache here otherwise)."""
        self.processor = processor
        if teacher_tokens is None:
            teacher_tokens = check_cross_cache(reader, url or reader.url)
        teacher_bytes = decode_token_bytes(teacher_tokens)
        student_hash = tokenizer_info(processor.tokenizer, chat_template_of(processor))["hash"]
        t_specials = read_teacher_specials(reader)
        s_specials = special_roles(processor.tokenizer, end_of_turn_ids(processor),
                                   getattr(processor, "image_token", None))
        self.map = vocab_map(teacher_bytes, processor.tokenizer, student_hash, t_specials, s_specials)
        self.teacher_bytes = teacher_bytes
        self.student_bytes, self.by_bytes = student_index(processor.tokenizer)
        self.t_end = [int(i) for i in ((t_specials or {}).get("roles") or {}).get("end", [])]
        self.identity = bool(np.array_equal(self.map, np.arange(len(self.map))))
        text = np.array([b is not None for b in teacher_bytes])
        n_text = int(text.sum())
        # student tokens no teacher token maps to: TPA's stand-ins for next-step ids without a student token
        # (a special token the role map names may be among them: tpa_rows drops a row whose stand-in it names)
        self.spare = np.setdiff1d(np.arange(len(processor.tokenizer)), self.map[text & (self.map >= 0)])[:256]
        self.overlap = float((self.map[text] >= 0).sum()) / max(n_text, 1)
        self.query = reader.params.get("saliency_query", "instruction")
        self.iva, self.tpa = iva, tpa
        self._memo: dict = {}  # (index, sample id) -> the sample's text side (``_encode``), per process
        log.info("cross-tokenizer: %d of the teacher's %d text tokens have an identical student token (%.1f%%)",
                 int((self.map[text] >= 0).sum()), n_text, 100 * self.overlap)

    def preflight(self, reader: CacheReader) -> None:
        """Before any step: every sample's conversation goes through the student's chat template verbatim (a
        template that rewrites, trims or drops message text would give texts that cannot be aligned). Renders the
        text only (no images, no tokenizer); raises one DataError naming the first bad samples and how many."""
        bad = []
        for row in reader.samples:
            rec, refs = _record(row)
            try:
                rendered_text(self.processor, rec, with_images=bool(refs))
            except DataError as e:
                bad.append(e)
        if bad:
            more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
            raise DataError(bad[0].sample, f"{len(bad)} sample(s) cannot be aligned across tokenizers, nothing was "
                            "trained: " + "; ".join(f"sample {b.sample}: {b.problem}" for b in bad[:3]) + more,
                            "use a student chat template that inserts message text verbatim")

    def student_view(self, x: dict) -> dict:
        """A cache sample (``CacheDataset`` item, with its decoded images) as the student sees it: its own ids and
        spans (its pixels are made per batch by ``StudentCollator``), the teacher's rows untouched, the per-sample
        alignment (``xt_*``)."""
        if "conversation" not in x:
            raise CacheError(f"sample {x['sample_id']} of the cache has no conversation text: re-dump the cache with "
                             f"this alignti (schema v{ALIGN_SCHEMA_VERSION})")
        key = (x["index"], x["sample_id"])
        if key not in self._memo:  # the text side once per sample and process (an epoch re-reads it)
            self._memo[key] = self._encode(x)
        rec, enc, al = self._memo[key]
        drop = set(TPA_KEYS) | {"saliency", "ivak_pos", "ivak_weight", "ivak_ids", "ivak_logprobs",
                                "ivak_tail"}  # teacher-side positions; IVA and TPA carried over below
        y = {k: v for k, v in x.items() if k not in drop}
        # the pixels: StudentCollator's one image-processor call per batch over pil_images, as on the same-tokenizer
        # path (the same image processor that expanded the student's image tokens in ``encode``)
        y.update(input_ids=enc.input_ids, response_mask=enc.response_mask, image_inputs={},
                 image_tok_start=enc.image_tok_start, n_image_tokens=enc.n_image_tokens, instr_spans=enc.instr_spans,
                 resp_spans=enc.resp_spans, image_spans=enc.image_spans,
                 xt_chunk_t=al["chunk_t"], xt_chunk_s=al["chunk_s"], xt_pair=al["pair"], xt_n_chunks=al["n_chunks"],
                 xt_fix=al["fix"])
        if self.iva and "saliency" in x:
            y["saliency"] = self.resample(x, enc)
        if self.tpa and "tpa_cand_ids" in x:
            y.update(self.tpa_rows(x, al))
        return y

    def _encode(self, x: dict):
        """(record, the student's Encoded without pixel inputs, the alignment) of a cache sample."""
        rec, refs = _record(x)
        imgs = x.get("pil_images") or []
        image = None if not imgs else (imgs if len(refs) > 1 else imgs[0])
        enc = with_saliency_query(encode(self.processor, rec, image, x["image_sha256"]), self.query)
        enc.image_inputs = {}
        turns = x.get("resp_turns") or list(range(len(x["resp_spans"])))
        if turns != list(range(len(enc.resp_spans))):
            enc = restrict_to_loss_turns(enc, turns)
        if x.get("finish") == "length":  # a rollout answer cut at --max-new-tokens: scored as generated on the
            without_end_markup(enc)      # teacher's side, so the student's own end-of-turn markup is no target either
        answers = [t for role, t in rec.turns if role == "assistant"]
        t_turns, at = [], 0
        for k, (s, e) in zip(turns, x["resp_spans"]):
            t_turns.append((answers[k], np.asarray(x["resp_char_start"][at:at + e - s])))
            at += e - s
        s_turns = [(enc.turn_texts[k], enc.char_start[s:e]) for k, (s, e) in zip(enc.resp_turns, enc.resp_spans)]
        t_ids = np.concatenate([np.asarray(x["input_ids"][s:e]) for s, e in x["resp_spans"]] or [np.zeros(0, int)])
        s_ids = np.concatenate([enc.input_ids[s:e] for s, e in enc.resp_spans] or [np.zeros(0, int)])
        if self.identity and np.array_equal(t_ids, s_ids):  # one tokenizer, one text: row for row, as kd pairs them
            n = np.arange(len(t_ids), dtype=np.int64)
            return rec, enc, {"chunk_t": n, "chunk_s": n, "pair": n, "n_chunks": len(n), "fix": []}
        al = align_sample(x["sample_id"], t_turns, s_turns)
        al["fix"] = turn_fixes(t_turns, s_turns, t_ids, s_ids, al["pair"], self.teacher_bytes, self.student_bytes,
                               self.t_end)
        return rec, enc, al

    def resample(self, x: dict, enc) -> np.ndarray:
        """The teacher's saliency [n_turns, teacher image tokens] on the student's image tokens [n_turns, student
        image tokens]: per image from the teacher's layout to the student's (``common.tiles.resample_layout``: a
        grid bilinear onto a grid, InternVL's and LFM2-VL's tiles per view, the mosaic of tiles and the thumbnail),
        each image keeping the share of the turn's mass the teacher gave it."""
        t_lay = layouts_of(x.get("image_grids") or [], x.get("image_tiles"))
        s_lay = layouts_of(enc.image_grids, enc.image_tiles)
        t_sizes = [len(span_image_positions(x["input_ids"], [sp])) for sp in x["image_spans"]]
        if len(t_lay) != len(s_lay) or not all(g.known for g in t_lay + s_lay):
            raise DataError(x["sample_id"], f"IVA across image-token grids needs each image's grid (teacher "
                            f"{list(x.get('image_grids') or [])}, student {list(enc.image_grids)}; (0, 0): not a "
                            "one grid, e.g. LLaVA-OneVision's any-res tiles, Idefics3 / SmolVLM's sub-images plus a "
                            "global image)", "train without IVA (--loss kd or kd+tpa), or pick families with a grid "
                            "(LLaVA, Qwen2-VL, InternVL, LFM2-VL)")
        sal = torch.from_numpy(np.asarray(x["saliency"], np.float32))
        rows = []
        for row in sal:
            pieces, at = [], 0
            for n, tl, sl in zip(t_sizes, t_lay, s_lay):
                piece = row[at:at + n]
                at += n
                pieces.append(resample_layout(piece, tl, sl) * piece.clamp_min(0).sum())
            rows.append(torch.cat(pieces))
        return torch.stack(rows).numpy() if rows else np.zeros((0, enc.n_image_tokens), np.float32)

    def tpa_rows(self, x: dict, al: dict) -> dict:
        """The cache's TPA rows carried over to the student: a row whose response token is a one-token chunk on
        both sides (the same text, one token each) and whose B candidates all have an identical student token;
        its next-step top-k ids mapped, the mass of slots without a (distinct) student token folded into the
        row's rest mass, each such slot then naming a student-only token with teacher probability 0. (The KL is
        then taken on a finer partition than {mapped ids, rest}: the student's mass on those stand-ins sits in
        their own bins, not in its rest; by the data-processing inequality it is >= the coarse KL, equal when the
        student gives them no mass.) ``xt_tpa_kept``: how many of the sample's rows survive."""
        ct, cs = al["chunk_t"], al["chunk_s"]
        n_t = np.bincount(ct, minlength=al["n_chunks"])
        n_s = np.bincount(cs, minlength=al["n_chunks"])
        s_of_chunk = np.full(al["n_chunks"], -1, np.int64)
        s_of_chunk[cs[::-1]] = np.arange(len(cs))[::-1]
        pos = np.asarray(x["tpa_pos"], np.int64)
        raw = np.asarray(x["tpa_cand_ids"])
        cands = self.map_ids(raw)
        fixes = {int(f[0]): f for f in al.get("fix", ())}  # a turn's first row, its end of turn: by place
        for j, p in enumerate(pos.tolist()):
            if p in fixes:
                _, lead_t, lead_s, end = fixes[p]
                cands[j] = row_fix(raw[j], cands[j], self.teacher_bytes, self.by_bytes, lead_t, lead_s, end)
        ids = self.map_ids(np.asarray(x["tpa_ids"]))
        lost = (ids < 0) | _duplicates(ids)  # no student token, or one a slot before already names
        c = ct[pos]
        keep = (n_t[c] == 1) & (n_s[c] == 1) & (cands >= 0).all(-1) & (~lost).any(-1).all(-1)
        keep &= lost.sum(-1).max(-1, initial=0) <= len(self.spare)
        ids, lost = ids[keep], lost[keep]
        lps = np.asarray(x["tpa_logprobs"], np.float32)[keep]
        tail = _fold_into_tail(np.asarray(x["tpa_tail"], np.float32)[keep], lps, lost)
        # a lost slot names a student-only token (no teacher token maps to it, so none of the row's) with teacher
        # probability 0: the row's ids stay distinct, as the student's fold needs
        ids = np.where(lost, self.spare[np.clip(np.cumsum(lost, -1) - 1, 0, len(self.spare) - 1)], ids)
        lps = np.where(lost, -np.inf, lps).astype(np.float32)
        ok = ~_duplicates(ids).any(-1).any(-1)  # a stand-in that a role-mapped special of the row names already
        if not ok.all():
            keep[np.nonzero(keep)[0][~ok]] = False
            ids, lps, tail = ids[ok], lps[ok], tail[ok]
        return {"tpa_pos": s_of_chunk[c[keep]].astype(np.int32), "tpa_cand_ids": cands[keep].astype(np.int32),
                "tpa_ids": ids.astype(np.int32), "tpa_logprobs": lps, "tpa_tail": tail.astype(np.float32),
                "xt_tpa_trow": pos[keep], "xt_tpa_kept": (int(keep.sum()), len(keep))}

    def collate(self, batch: dict, samples: list[dict]) -> dict:
        """``StudentCollator``'s hook: the batch-global cross-tokenizer keys (``collate_cross``)."""
        batch = collate_cross(batch, samples, self.map, self.overlap)
        self.fix_rows(batch, samples)
        return batch

    def fix_rows(self, batch: dict, samples: list[dict]) -> None:
        """``xt_ids`` refined at the rows ``token_align.turn_fixes`` names, then ``xt_logprobs``: the slots of a row
        that name one student id merged (``merge_duplicates``)."""
        ids = batch["xt_ids"].numpy().copy()
        topk = batch["topk_ids"].numpy()
        t_off = np.cumsum([0] + [len(x["topk_ids"]) for x in samples])
        for b, x in enumerate(samples):
            for row, lead_t, lead_s, end in x.get("xt_fix", ()):
                r = int(t_off[b] + row)
                ids[r] = row_fix(topk[r], ids[r], self.teacher_bytes, self.by_bytes, lead_t, lead_s, end)
        ids, lps = merge_duplicates(ids, batch["topk_logprobs"].float().numpy())
        batch["xt_ids"] = torch.from_numpy(ids)
        batch["xt_logprobs"] = torch.from_numpy(lps)

    def map_ids(self, ids: np.ndarray) -> np.ndarray:
        """Teacher ids -> student ids through this pair's map (``map_ids``)."""
        return map_ids(self.map, ids)


def _record(row: dict):
    """(the sample's record, its image references) from a cache sample row (``samples`` table or a
    ``CacheDataset`` item): the conversation as the teacher saw it."""
    refs = image_refs(row["image"])
    return record_from_conversation(row["index"], row["sample_id"], refs if len(refs) > 1 else
                                    (refs[0] if refs else None), row["conversation"]), refs


def map_ids(vocab: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Teacher ids -> student ids through ``vocab`` (``vocab_map``'s [V_t] array): int64 like ``ids``, -1 for no
    identical student token, or an id outside the teacher's vocabulary."""
    ids = np.asarray(ids, np.int64)
    inside = (ids >= 0) & (ids < len(vocab))
    return np.where(inside, vocab[np.clip(ids, 0, len(vocab) - 1)], -1)


def _duplicates(ids: np.ndarray) -> np.ndarray:
    """bool like ``ids`` [..., k]: a valid id that already occurs earlier in its row."""
    order = np.argsort(ids, axis=-1, kind="stable")  # equal ids keep their order: the first stays unmarked
    s = np.take_along_axis(ids, order, -1)
    dup = np.zeros(ids.shape, bool)
    dup[..., 1:] = (s[..., 1:] == s[..., :-1]) & (s[..., 1:] >= 0)
    out = np.zeros(ids.shape, bool)
    np.put_along_axis(out, order, dup, -1)
    return out


def _fold_into_tail(tail: np.ndarray, lps: np.ndarray, lost: np.ndarray) -> np.ndarray:
    """log(exp(tail) + sum of exp(lps) over the ``lost`` slots), per row."""
    if not lost.any():
        return tail
    lost_lp = np.where(lost, lps, -np.inf)
    return np.logaddexp(tail, np.logaddexp.reduce(lost_lp, axis=-1))


class CrossDataset(CacheDataset):
    """``CacheDataset`` whose items are the student's own encoding of each sample, aligned to the teacher's rows
    (``CrossTokenizer.student_view``)."""

    def __init__(self, reader: CacheReader, processor, cross: CrossTokenizer, images_dir: str | None = None,
                 data: str | None = None):
        super().__init__(reader, processor, images_dir, data=data)
        self.cross = cross

    def __getitem__(self, i: int) -> dict:
        return self.cross.student_view(super().__getitem__(i))


def collate_cross(batch: dict, samples: list[dict], vocab: np.ndarray, overlap: float) -> dict:
    """The batch-global ``xt_*`` keys from each sample's alignment (see the module docstring); ``vocab``: the
    teacher -> student id map, ``overlap``: GOLD's matched share."""
    t_off = np.cumsum([0] + [len(x["topk_ids"]) for x in samples])
    c_off = np.cumsum([0] + [int(x["xt_n_chunks"]) for x in samples])
    pair = [np.where(x["xt_pair"] >= 0, x["xt_pair"] + t_off[b], -1) for b, x in enumerate(samples)]
    batch["xt_pair"] = torch.from_numpy(np.concatenate(pair).astype(np.int64))
    batch["xt_chunk_t"] = torch.from_numpy(np.concatenate([x["xt_chunk_t"] + c_off[b]
                                                           for b, x in enumerate(samples)]).astype(np.int64))
    batch["xt_chunk_s"] = torch.from_numpy(np.concatenate([x["xt_chunk_s"] + c_off[b]
                                                           for b, x in enumerate(samples)]).astype(np.int64))
    batch["xt_n_chunks"] = int(c_off[-1])
    batch["xt_ids"] = torch.from_numpy(map_ids(vocab, batch["topk_ids"].numpy()))
    batch["xt_target_logprob"] = batch["target_logprob"]
    batch["xt_overlap"] = overlap
    if len(batch["xt_pair"]) != len(batch["targets"]):
        raise DataError(",".join(batch["sample_ids"]), f"{len(batch['xt_pair'])} aligned student rows for "
                        f"{len(batch['targets'])} response tokens", "report this tokenizer pair")
    kept = [x["xt_tpa_kept"] for x in samples if "xt_tpa_kept" in x]
    if kept:  # TPA's teacher rows (candidate weights look up the teacher's first step there) and its coverage
        batch["xt_tpa_trows"] = torch.from_numpy(np.concatenate([x["xt_tpa_trow"] + t_off[b]
                                                                 for b, x in enumerate(samples)]).astype(np.int64))
        batch["xt_tpa_kept"] = (sum(a for a, _ in kept), sum(b for _, b in kept))
    return batch
