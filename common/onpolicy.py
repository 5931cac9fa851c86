"""On-policy rows: what `alignti rollout` writes and `dump-teacher` reads beyond the LLaVA columns.

A rollout dataset is parquet with the LLaVA columns (``id``, ``conversations``, ``image``) that every alignti
source reads, plus the columns in ``ROLLOUT_COLUMNS``: provenance (which source sample and assistant turn a row
answers, which student wrote it, in which round, with which sampling settings), the row's *loss turns* and the
student's top-B next-token candidates per generated token.

Conventions shared by both stages:

* **Loss turns** (``loss_turns``, list of int): indices among the row's assistant turns (0 = its first assistant
  turn) that carry the loss; the other assistant turns are context. A row without the column (any ordinary
  dataset) keeps every assistant turn. ``restrict_to_loss_turns`` applies it to an encoding.
* **Student candidates** (``student_cand_ids`` [n][B] int32, ``student_cand_probs`` [n][B] float32): for the first
  n response tokens of the row's loss turns (concatenated in order), the student's B most likely next tokens
  (the image placeholder token excluded, as for the teacher's candidates) and their probabilities, from the
  student's raw logits at temperature 1 (before temperature / top-p). Only the first ``student_cand_valid`` of
  them apply: those whose context in the dump's re-encoding of the row equals the context the student saw
  (``candidate_count``); ``student_token_ids`` holds the tokens the student generated (or, teacher-forced, the
  reference tokens) so the dump re-checks that itself.
* **The student's own tokens.** A row stores the student's answer as text, and re-encoding a text need not give back
  the tokens that spelled it: a model can spell "red" as "r" + "ed" where the tokenizer says "red", or spell text in
  byte pieces that are no whole UTF-8 character (an untrained student does it on every row). The dump therefore scores the generated
  ids themselves, in place of the re-encoded answer, wherever the texts allow it: the prompt re-encodes to what the
  student saw (``student_cand_valid`` > 0) and the generated ids decode to exactly the text the re-encoded answer
  decodes to (``student_response_ids``). Where they do not (special or added tokens the student generated, which
  the row's text cannot hold), the re-encoded answer stays.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from .conversation import Encoded
from .errors import DataError, DataSourceError
from .records import ROLE_OUT, join_placeholders
from .token_align import turn_char_starts

# rollout dataset columns beyond id / conversations / image
ROLLOUT_FIELDS = [
    ("source_id", pa.string()),          # the source sample's id
    ("source_index", pa.int64()),        # its row in the source data
    ("turn", pa.int32()),                # the assistant turn (index among assistant turns) the student answered;
    #                                      -1 for a teacher-forced row (every assistant turn is a reference answer)
    ("sample_index", pa.int32()),        # k of --samples-per-prompt
    ("round", pa.int32()),               # --round
    ("loss_turns", pa.list_(pa.int32())),
    ("student_weights_sha256", pa.string()),
    ("student_tokenizer_sha256", pa.string()),
    ("sampling", pa.string()),           # JSON: temperature, top_p, max_new_tokens, seed, samples_per_prompt, top_b
    ("seed", pa.int64()),                # this row's own seed (seed_for)
    ("finish", pa.string()),             # "eos", "length" or "teacher-forced"
    ("student_token_ids", pa.list_(pa.int32())),
    ("student_cand_ids", pa.list_(pa.list_(pa.int32()))),
    ("student_cand_probs", pa.list_(pa.list_(pa.float32()))),
    ("student_cand_valid", pa.int32()),  # how many leading candidate rows apply after re-encoding
    ("retokenized_equal", pa.bool_()),   # the dump's encoding (own tokens where the texts allow) holds them all
]
ROLLOUT_COLUMNS = [n for n, _ in ROLLOUT_FIELDS]
CONVERSATIONS_TYPE = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))
EMBEDDED_IMAGE_TYPE = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
PATH_IMAGE_TYPE = pa.list_(pa.string())

ROLLOUT_PLAN = "plan.json"         # a rollout folder's plan, written first
ROLLOUT_MANIFEST = "rollout.json"  # written last: the rollout is finished


def rollout_schema(embedded: bool) -> pa.Schema:
    return pa.schema([("id", pa.string()), ("conversations", CONVERSATIONS_TYPE),
                      ("image", EMBEDDED_IMAGE_TYPE if embedded else PATH_IMAGE_TYPE), *ROLLOUT_FIELDS])


def seed_for(seed: int, sample_id: str, turn: int, k: int) -> int:
    """A row's own sampling seed: sha256 of (seed, sample id, turn, k), 63 bits. Independent of batching, work
    units and process count, so a row is the same whichever process generates it with whichever neighbours."""
    h = hashlib.sha256(f"{seed}\x1f{sample_id}\x1f{turn}\x1f{k}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def top_candidates(logits: torch.Tensor, n: int, exclude: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The n most likely next tokens of each row of raw ``logits`` [R, V] (softmax at temperature 1), skipping the
    token ``exclude`` (the image placeholder: a branch token must be text), by probability, descending.
    Returns (ids int64 [R, n], probs float32 [R, n])."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    v, j = lp.topk(n + 1, dim=-1, sorted=True)
    if exclude is not None:
        order = torch.argsort((j == exclude).int(), dim=-1, stable=True)[:, :n]
        v, j = v.gather(-1, order), j.gather(-1, order)
    else:
        v, j = v[:, :n], j[:, :n]
    return j, v.exp()


def common_prefix(a, b) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    a, b = np.asarray(a[:n]), np.asarray(b[:n])
    diff = np.nonzero(a != b)[0]
    return int(diff[0]) if len(diff) else n


def candidate_count(resp_ids, student_ids, n_cands: int) -> int:
    """How many leading response positions the student's candidates apply to: position j's candidates were taken
    with the student's tokens before j as context, so they hold while the re-encoded response tokens before j
    equal the student's (j <= common prefix), and only where a candidate row exists (j < n_cands)."""
    return min(common_prefix(resp_ids, student_ids) + 1, n_cands, len(resp_ids))


MAX_END_MARKUP = 8  # most tokens of end-of-turn markup after an answer (`<|im_end|>` "\n": 2)


def student_response_ids(resp_ids, student_ids, finish: str, tokenizer, image_token_id: int | None = None):
    """The response span the dump scores for a generated answer: the student's own tokens (``student_ids``, without
    its stop token when ``finish`` is "eos") followed by the end-of-turn markup of the re-encoded span ``resp_ids``
    (answer tokens then markup tokens, as ``conversation.encode`` makes a response span). An answer cut at
    --max-new-tokens (``finish`` "length") is scored as generated: its tokens alone, no end-of-turn markup (the
    student did not end the turn, so ending it is no target). Returns that int32 array, or None when the texts do
    not allow it: no split of ``resp_ids`` into answer + at most MAX_END_MARKUP markup tokens has an answer that
    decodes (special tokens kept, no clean-up) to exactly the text the student's tokens decode to, or the student's
    tokens hold the image token. Equal ids come back unchanged."""
    body = list(student_ids[:-1] if finish == "eos" else student_ids)
    resp = np.asarray(resp_ids, np.int32)
    markup = finish != "length"
    if not body or (image_token_id is not None and image_token_id in body):
        return None
    if len(resp) > len(body) and list(resp[:len(body)]) == body:
        return resp if markup else resp[:len(body)]  # the re-encoding holds the student's tokens already
    text = tokenizer.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    for m in range(0, min(MAX_END_MARKUP, len(resp) - 1) + 1):
        k = len(resp) - m
        if tokenizer.decode(resp[:k].tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False) == text:
            return np.concatenate([np.asarray(body, np.int32), resp[k:] if markup else resp[:0]])
    return None


def response_char_starts(tokenizer, body, n_markup: int, text: str) -> np.ndarray | None:
    """int32 [len(body) + n_markup]: each token's start character in the turn text ``text`` for a response span made
    of the answer tokens ``body`` then ``n_markup`` end-of-turn markup tokens, by the span rule of
    ``common.token_align`` (``turn_char_starts``; what ``conversation.encode`` stores as ``char_start``). A token's
    offsets come from decoding the prefixes of ``body`` (no clean-up, special tokens kept); a prefix that ends inside
    a character (byte pieces) is not a boundary, so the token after it is a continuation. None when ``body`` does
    not decode to ``text`` (up to leading / trailing whitespace outside it)."""
    dec = lambda ids: tokenizer.decode(list(ids), skip_special_tokens=False,  # noqa: E731
                                       clean_up_tokenization_spaces=False)
    full = dec(body)
    core = text.strip()  # a decode may drop or add whitespace at the answer's edges (SentencePiece's dummy prefix)
    at = full.find(core)
    if at < 0 or full[:at].strip() or full[at + len(core):].strip():
        return None
    off = at - (len(text) - len(text.lstrip()))  # where the turn text's character 0 falls in the decoded text
    n_char = len(text)
    pos = [len(p) if full.startswith(p) else None for p in (dec(body[:j]) for j in range(len(body)))] + [len(full)]
    for j in range(len(pos) - 2, -1, -1):  # a prefix ending inside a character: the next boundary stands in
        if pos[j] is None:
            pos[j] = pos[j + 1]
    clip = lambda c: min(max(c - off, 0), n_char)  # noqa: E731
    offsets = [(clip(pos[j]), clip(pos[j + 1])) for j in range(len(body))]
    offsets += [(n_char + 1 + i, n_char + 2 + i) for i in range(n_markup)]  # wholly in the end-of-turn markup
    return turn_char_starts(offsets, (0, n_char))


def swap_student_tokens(enc: Encoded, student_ids, finish: str, tokenizer, image_token_id: int | None,
                        max_length: int | None = None) -> bool:
    """The rule the dump scores a generated answer by, in place on ``enc`` (its last response span is the
    generated turn): that span becomes the student's own tokens ``student_ids`` and the re-encoded end-of-turn
    markup (``student_response_ids``), with their character starts (``response_char_starts``, where ``enc``
    keeps them), within ``max_length`` (``with_student_response``). Returns whether ``enc`` now holds every
    generated token (already, or by the swap); False (``enc`` unchanged) where the texts do not allow it."""
    s, e = enc.resp_spans[-1]
    new = student_response_ids(enc.input_ids[s:e], student_ids, finish, tokenizer, image_token_id)
    if new is None:
        return False
    starts = None
    if enc.char_start is not None and enc.turn_texts:
        body = len(student_ids) - (1 if finish == "eos" else 0)
        text = enc.turn_texts[enc.resp_turns[-1] if enc.resp_turns else len(enc.resp_spans) - 1]
        starts = response_char_starts(tokenizer, new[:body], len(new) - body, text)
    return with_student_response(enc, new, max_length, starts)


def with_student_response(enc: Encoded, new_resp: np.ndarray, max_length: int | None = None,
                          char_starts: np.ndarray | None = None) -> bool:
    """Put ``new_resp`` (``student_response_ids``) in place of ``enc``'s last response span, in place: the ids, the
    response mask and that span move (and ``enc.char_start``, with ``char_starts`` for the new span's tokens, see
    ``response_char_starts``); everything before the span (images, instructions) stays where it was. Returns
    False (``enc`` unchanged) when the result would be longer than ``max_length``, or when ``enc`` carries character
    starts and ``char_starts`` is None (they could not be derived)."""
    s, e = enc.resp_spans[-1]
    if len(new_resp) == e - s and np.array_equal(enc.input_ids[s:e], new_resp):
        return True
    ids = np.concatenate([enc.input_ids[:s], np.asarray(new_resp, np.int32), enc.input_ids[e:]]).astype(np.int32)
    if max_length is not None and len(ids) > max_length:
        return False
    if enc.char_start is not None:
        if char_starts is None or len(char_starts) != len(new_resp):
            return False
        enc.char_start = np.concatenate([enc.char_start[:s], np.asarray(char_starts, np.int32),
                                         enc.char_start[e:]]).astype(np.int32)
    mask = np.concatenate([enc.response_mask[:s], np.ones(len(new_resp), np.uint8),
                           enc.response_mask[e:]]).astype(np.uint8)
    enc.input_ids, enc.response_mask = ids, mask
    enc.resp_spans = [*enc.resp_spans[:-1], (s, s + len(new_resp))]
    return True


def without_end_markup(enc: Encoded) -> bool:
    """``enc``'s last response span without its end-of-turn markup, in place: the span keeps its tokens that start
    inside the turn's text (``char_start`` < the text's length; markup tokens start at or after it, the rule of
    ``common.token_align.turn_char_starts``). For an answer cut at --max-new-tokens that is scored from its re-encoded
    text. Returns False (``enc`` unchanged) where ``enc`` carries no character starts or no answer token would stay."""
    if enc.char_start is None or not enc.turn_texts or not enc.resp_spans:
        return False
    s, e = enc.resp_spans[-1]
    text = enc.turn_texts[enc.resp_turns[-1] if enc.resp_turns else len(enc.resp_spans) - 1]
    starts = enc.char_start[s:e]
    k = int((starts < len(text)).sum())
    if k == 0:
        return False
    return with_student_response(enc, enc.input_ids[s:s + k].copy(), None, starts[:k].copy())


def restrict_to_loss_turns(enc: Encoded, loss_turns: list[int] | None) -> Encoded:
    """The encoding with only the assistant turns ``loss_turns`` (indices among its assistant turns) as response:
    their spans in ``resp_spans`` / ``instr_spans`` (so KD, TPA and the saliency / IVA turns follow), the
    response mask on their tokens only; the other assistant turns stay in ``input_ids`` as context.
    ``None``: unchanged. Raises DataError for a turn the sample does not have."""
    if loss_turns is None:
        return enc
    n = len(enc.resp_spans)
    bad = [t for t in loss_turns if not 0 <= t < n]
    if bad or not loss_turns:
        raise DataError(enc.sample_id, f"loss turn(s) {bad or loss_turns} but the sample has {n} assistant turn(s)",
                        "fix the row's loss_turns column (indices among its assistant turns), or re-run the rollout")
    keep = sorted(set(int(t) for t in loss_turns))
    enc.resp_spans = [enc.resp_spans[t] for t in keep]
    enc.resp_turns = [enc.resp_turns[t] for t in keep] if enc.resp_turns else keep
    enc.instr_spans = [enc.instr_spans[t] for t in keep]
    mask = np.zeros_like(enc.response_mask)
    for s, e in enc.resp_spans:
        mask[s:e] = 1
    enc.response_mask = mask
    return enc


def weights_sha256(path: str, model: torch.nn.Module | None = None) -> str:
    """sha256 of a checkpoint's weight files (``*.safetensors`` / ``*.bin``, by name, streamed); for a hub id
    without a local folder, of the model's state dict (names, dtypes, shapes and bytes, in order)."""
    h = hashlib.sha256()
    p = Path(path)
    files = sorted(list(p.glob("*.safetensors")) + list(p.glob("*.bin"))) if p.is_dir() else []
    if files:
        for f in files:
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
        return h.hexdigest()
    if model is None:
        raise ValueError(f"{path} is not a checkpoint folder and no model was given to hash")
    for name, t in model.state_dict().items():
        h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class RolloutColumns:
    """The rollout columns of a table data source (``common.sources.TableSource``), by the source's row index.
    Provenance and loss turns are read once; candidate columns stay Arrow arrays, read a row at a time."""

    PROVENANCE = ("source_id", "turn", "sample_index", "round", "student_weights_sha256", "finish")

    def __init__(self, columns: dict[str, pa.ChunkedArray]):
        self.cols = columns
        self.loss = columns["loss_turns"].to_pylist()
        self.has_candidates = "student_cand_ids" in columns
        self.provenance_rows = {k: columns[k].to_pylist() for k in self.PROVENANCE if k in columns}
        if self.has_candidates:
            self.valid = columns["student_cand_valid"].to_pylist()
            widths = {len(r[0]) for r in columns["student_cand_ids"].to_pylist()[:64] if r}
            self.top_b = min(widths) if widths else None
            self.students = sorted({(w, t) for w, t in zip(columns["student_weights_sha256"].to_pylist(),
                                                           columns["student_tokenizer_sha256"].to_pylist())})

    @classmethod
    def of(cls, source) -> "RolloutColumns | None":
        """The source's rollout columns, or None when it has none (JSON, or a table without ``loss_turns``)."""
        check_finished(getattr(source, "location", ""))
        files = getattr(source, "files", None)
        if not files:
            return None
        wanted = [n for n in ROLLOUT_COLUMNS if n not in ("student_cand_probs",)]
        parts: dict[str, list] = {}
        for i in range(len(files)):
            handle = source._open(i)
            names = set(source._schema(handle).names)
            if "loss_turns" not in names:
                return None
            table = source._read(handle, [n for n in wanted if n in names])
            for n in table.column_names:
                parts.setdefault(n, []).extend(table.column(n).chunks)
        return cls({n: pa.chunked_array(c) for n, c in parts.items()})

    def with_student_tokens(self, enc: Encoded, tokenizer, image_token_id: int | None,
                            max_length: int | None = None) -> bool:
        """For a generated row (its ``turn`` >= 0) whose prompt re-encodes to what the student saw
        (``student_cand_valid`` > 0): its loss turn's response becomes the student's own tokens and, unless the
        answer was cut at --max-new-tokens, the re-encoded end-of-turn markup (``student_response_ids``,
        ``with_student_response``), in place. A cut answer whose tokens cannot be swapped in keeps its re-encoded
        answer without the markup (``without_end_markup``). Call it after ``restrict_to_loss_turns`` (the loss turn is
        the row's last assistant turn). Returns whether ``enc`` now holds every generated token (already, or by the
        swap); False for other rows and where the texts do not allow it."""
        row = enc.index
        turns = self.provenance_rows.get("turn")
        turn = None if turns is None else turns[row]
        if not self.has_candidates or turn is None or turn < 0:
            return False
        finish = self.cols["finish"][row].as_py() if "finish" in self.cols else ""  # unknown: ids kept, markup added
        student = self.cols["student_token_ids"][row].as_py() or []
        held = bool(int(self.valid[row] or 0)) and swap_student_tokens(enc, student, finish, tokenizer,
                                                                        image_token_id, max_length)
        if finish == "length" and not held:
            without_end_markup(enc)
        return held

    def loss_turns(self, row: int) -> list[int] | None:
        v = self.loss[row]
        return None if v is None else list(v)

    def provenance(self, row: int) -> dict:
        """The cache's sample-table provenance of a row (docs/cache-format.md)."""
        p = {k: v[row] for k, v in self.provenance_rows.items()}
        return {"source_id": p.get("source_id"), "source_turn": p.get("turn"), "sample_index": p.get("sample_index"),
                "round": p.get("round"), "student_sha256": p.get("student_weights_sha256"),
                "loss_turns": self.loss_turns(row), "finish": p.get("finish")}

    def candidates(self, enc: Encoded, n_branch: int) -> np.ndarray:
        """[n_resp, n_branch] int32: the student's candidates for each response token of ``enc`` (restricted to the
        row's loss turns) where they apply, -1 where they do not (the teacher's own candidates are used there)."""
        row = enc.index
        out = np.full((enc.n_resp, n_branch), -1, np.int32)
        cands = self.cols["student_cand_ids"][row].as_py() or []
        if not cands:
            return out
        if len(cands[0]) < n_branch:
            raise DataError(enc.sample_id, f"the rollout kept {len(cands[0])} student candidates per token, fewer "
                            f"than --tpa-branches {n_branch}", f"dump with --tpa-branches {len(cands[0])}, or re-run "
                            f"the rollout with --top-b {n_branch}")
        resp_ids = enc.input_ids[enc.response_mask.astype(bool)]
        student = self.cols["student_token_ids"][row].as_py() or []
        n = min(int(self.valid[row] or 0), candidate_count(resp_ids, student, len(cands)))
        if n > 0:
            out[:n] = np.asarray([c[:n_branch] for c in cands[:n]], np.int32)
        return out

    def summary(self) -> dict:
        """For the manifest: whose candidates, which students, rounds."""
        rounds = sorted({r for r in self.provenance_rows.get("round", []) if r is not None})
        out = {"rows": len(self.loss), "rounds": rounds}
        if self.has_candidates:
            out["students"] = [{"weights_sha256": w, "tokenizer_sha256": t} for w, t in self.students]
        return out


def check_finished(location: str) -> None:
    """A local rollout folder must be finished (``rollout.json`` written) before anything reads it as data."""
    p = Path(str(location))
    if "://" in str(location) or not p.is_dir() or not (p / ROLLOUT_PLAN).is_file():
        return
    try:
        plan = json.loads((p / ROLLOUT_PLAN).read_text())
    except (OSError, json.JSONDecodeError):
        return
    if "student" in plan and "settings" in plan and not (p / ROLLOUT_MANIFEST).is_file():
        raise DataSourceError(str(p), "an unfinished rollout (no rollout.json): some work units are missing",
                              "re-run the same alignti rollout command to finish it, then dump")


def row_conversations(turns: list[tuple[str, str]], image_at: dict[int, list[int]]) -> list[dict]:
    """LLaVA ``conversations`` of (role, text) turns, each turn's ``<image>`` placeholders back where they stood
    (``image_at``: turn -> character offsets, as ``Record.image_at``; records.join_placeholders)."""
    return [{"from": ROLE_OUT[role], "value": join_placeholders(text, image_at.get(i, []))}
            for i, (role, text) in enumerate(turns)]
