"""The cache contract: names, dtypes and shapes of everything a dump writes.

`docs/cache-format.md` is the prose version of this file; bump SCHEMA_VERSION on any change
that an older reader could misread.

Layout of a cache directory::

    CACHE/
      plan.json                  written first: fingerprint, parameters, work units
      parts/00000.zarr/          zarr v3 group, one per work unit (arrays below)
      parts/00000.parquet        per-sample table of that unit
      parts/00000.commit.json    written last for the unit: sha256 of every object
      manifest.json              written last for the cache: counts, parts, fingerprint
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 7  # 1: top-k only; 2: + TPA transition statistics, saliency, spans, IRS; 3: + uint8 log-probs;
#                    4: TPA statistics on their own CSR axis ("tpa") for a chosen subset of response positions;
#                    5: several images per sample (image_spans; image / image_sha256 then JSON lists); IVA's
#                       token-KL statistics on their own axis "ivak" (dump-teacher --iva-token-kl);
#                    6: on-policy rows (alignti rollout): params.tpa_candidates "teacher" | "student" (TPA after the
#                       student's own candidates), sample columns for the rows' provenance, loss turns and how many
#                       TPA rows carry the student's candidates; and the "packed" top-k encoding
#                       (params["logprob_encoding"] = "packed", common/codecs.py), which a v5 reader refuses by version
#                       instead of failing on an unknown codec
#                    7: what cross-tokenizer training needs (params["align_fields"], common/token_align.py): per
#                       response token its start character in its turn's text ("resp_char_start"), per sample the
#                       conversation as the template received it, which assistant turns are response
#                       ("resp_turns") and each image's image-token grid ("image_grids"); the teacher's token
#                       strings in TOKENS_FILE. The teacher's log-prob of its realised token is target_logprob (v1).
#                    8: (only caches that need it) tiled images whose thumbnail has its own token grid (LFM2-VL:
#                       params["thumb_grid_tiles"]): their image_tiles entries hold 7 values (common/tiles.py
#                       ImageLayout.flat), which a v7 reader, knowing 5-value entries only, would misread; every
#                       other cache is still written as v7, which every reader since v7 reads
THUMB_GRID_SCHEMA_VERSION = 8
PACKED_SCHEMA_VERSION = SCHEMA_VERSION  # packed caches are written at the current version (first read by v6)
ALIGN_SCHEMA_VERSION = 7  # the first version whose caches carry the cross-tokenizer fields
READABLE_VERSIONS = (2, 3, 4, 5, 6, 7, 8)  # a v2 cache is a v3 cache with float16 log-probs; v2/v3 have TPA at every position

# Log-prob encodings (params["logprob_encoding"]; absent = float16). "uint8": q = round(-logp * 16) clipped
# to 0..255, i.e. 1/16-nat steps down to -15.94 nats; decoded as -q/16 (exact in float16). The rest mass
# (tail_logmass, tpa_tail) stays float32, and the loss renormalises the (k+1)-way fold.
# "packed" (v6): every top-k (main, TPA, IVA token-KL) stored by the codecs of common/codecs.py: the first
# params["packed"]["head"] entries in rank order, the rest as an id-sorted set; ids exact, log-probs within the
# codec's stated bound (head: head_step / 2 nats; tail: tail_step / 2 in sqrt(probability)); decoded float32.
LOGPROB_ENCODINGS = ("float16", "uint8", "packed")
UINT8_SCALE = 16.0
QUANTISED = ("topk_logprobs", "tpa_logprobs")
PACKED_PAIRS = (("topk_ids", "topk_logprobs"), ("tpa_ids", "tpa_logprobs"), ("ivak_ids", "ivak_logprobs"))

PLAN_FILE = "plan.json"
TOKENS_FILE = "teacher_tokens.json"  # v7: per teacher token id the bytes it adds to text (hex; null: special)
# v7, since the cross-tokenizer role map: the teacher's special tokens and their roles (token_align.special_roles)
SPECIALS_FILE = "teacher_specials.json"
MANIFEST_FILE = "manifest.json"
PARTS_DIR = "parts"

# Per-token arrays: (name, dtype, trailing shape keys). Leading axis is the CSR axis named in AXES.
# "tok": every input token of every sample, concatenated; "resp": every response token; "tpa": every
# response position with TPA statistics (v4; all of them unless dumped with --tpa-positions < 1, and in v2/v3
# caches the TPA arrays sit on the "resp" axis); "sal": every saliency value (n_turns * n_image_tokens per sample).
ARRAYS: dict[str, tuple[str, np.dtype, tuple[str, ...]]] = {
    "input_ids": ("tok", np.dtype("int32"), ()),
    "response_mask": ("tok", np.dtype("uint8"), ()),
    "topk_ids": ("resp", np.dtype("int32"), ("top_k",)),
    "topk_logprobs": ("resp", np.dtype("float16"), ("top_k",)),
    "tail_logmass": ("resp", np.dtype("float32"), ()),
    "target_logprob": ("resp", np.dtype("float32"), ()),
    "resp_char_start": ("resp", np.dtype("int32"), ()),  # v7: the token's start character in its turn's text
    "tpa_pos": ("tpa", np.dtype("int32"), ()),  # v4: index of the TPA row's response token within its sample
    "tpa_cand_ids": ("tpa", np.dtype("int32"), ("tpa_branches",)),
    "tpa_ids": ("tpa", np.dtype("int32"), ("tpa_branches", "tpa_top_k")),
    "tpa_logprobs": ("tpa", np.dtype("float16"), ("tpa_branches", "tpa_top_k")),
    "tpa_tail": ("tpa", np.dtype("float32"), ("tpa_branches",)),
    "saliency": ("sal", np.dtype("float16"), ()),
    # v5, dump-teacher --iva-token-kl: per (sample, turn) the top-r image tokens of the teacher's saliency
    # (r = ceil(iva_token_ratio * n_image_tokens)), their saliency renormalised over the r, and the teacher's
    # output distribution there (top-k + tail): IVA's token-KL reading
    "ivak_pos": ("ivak", np.dtype("int32"), ()),  # index among the sample's image tokens (image_spans order)
    "ivak_weight": ("ivak", np.dtype("float32"), ()),
    "ivak_ids": ("ivak", np.dtype("int32"), ("top_k",)),
    "ivak_logprobs": ("ivak", np.dtype("float16"), ("top_k",)),
    "ivak_tail": ("ivak", np.dtype("float32"), ()),
}
IVAK_ARRAYS = ("ivak_pos", "ivak_weight", "ivak_ids", "ivak_logprobs", "ivak_tail")

TPA_ARRAYS = ("tpa_cand_ids", "tpa_ids", "tpa_logprobs", "tpa_tail")
# params["tpa_layout"]: "positions" (v4: TPA rows on the "tpa" axis, with tpa_pos); absent: one row per
# response token on the "resp" axis (v2/v3)
TPA_LAYOUT = "positions"

CHUNK_TOKENS = 4096        # rows per chunk along the CSR axis
SHARD_CHUNKS = 16          # chunks per shard; shards are written whole

SAMPLE_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("index", pa.int64()),            # position in the dataset (global order)
    ("status", pa.string()),          # "ok" | "skipped"
    ("error", pa.string()),           # why it was skipped
    ("image", pa.string()),           # image path relative to --images, "@ROW[:K]" (embedded), a JSON list of them
    #                                   for a multi-image sample, or ""
    ("image_sha256", pa.string()),    # sha256 of the image bytes (a JSON list for several images)
    ("tok_start", pa.int64()),        # offset into input_ids / response_mask of this part
    ("tok_len", pa.int32()),
    ("resp_start", pa.int64()),       # offset into the per-response-token arrays of this part
    ("resp_len", pa.int32()),
    ("image_tok_start", pa.int32()),  # position of the first image token in the sample
    ("n_image_tokens", pa.int32()),
    ("instr_spans", pa.list_(pa.int32())),  # [start, end) pairs, one per assistant turn
    ("resp_spans", pa.list_(pa.int32())),   # [start, end) pairs, one per assistant turn
    ("sal_start", pa.int64()),        # offset into saliency of this part
    ("n_turns", pa.int32()),
    ("tpa_start", pa.int64()),        # v4: offset into the TPA arrays of this part
    ("tpa_len", pa.int32()),          # v4: TPA rows of this sample (<= resp_len)
    # v5: [start, end) pairs, one per image (saliency covers their image tokens in order; Idefics3 / SmolVLM: the span
    # also holds the sub-images' markup tokens, common/batch.py span_image_positions)
    ("image_spans", pa.list_(pa.int32())),
    ("ivak_start", pa.int64()),       # v5: offset into the ivak arrays of this part (--iva-token-kl)
    ("ivak_len", pa.int32()),         # v5: n_turns * r rows
    # v6, rows of an `alignti rollout` dataset (null for any other data): provenance and loss turns
    ("source_id", pa.string()),       # v6: the source sample the row answers
    ("source_turn", pa.int32()),      # v6: the assistant turn the student answered (-1: teacher-forced row)
    ("sample_index", pa.int32()),     # v6: k of the rollout's --samples-per-prompt
    ("round", pa.int32()),            # v6: the rollout's --round
    ("student_sha256", pa.string()),  # v6: sha256 of the rolling-out student's weights
    ("loss_turns", pa.list_(pa.int32())),  # v6: the assistant turns (indices among the row's) that are response
    ("tpa_student_rows", pa.int32()),  # v6: TPA rows whose candidates are the student's (the rest: the teacher's)
    ("conversation", pa.string()),    # v7: JSON {"turns": [[role, text], ...], "image_at": {turn: [offsets]}}
    ("resp_turns", pa.list_(pa.int32())),   # v7: per resp_spans entry, its assistant turn (among all of them)
    ("image_grids", pa.list_(pa.int32())),  # v7: (rows, cols) per image of its image tokens; (0, 0): unknown
    # a rollout row's ``finish`` ("eos", "length": cut at --max-new-tokens, so its loss turn has no end-of-turn
    # markup; "teacher-forced"); null for other data and for caches made before it was kept
    ("finish", pa.string()),
    # tiled images (InternVL's, LFM2-VL's tiles plus a thumbnail): per image (tile rows, tile cols, thumbnail 0/1, rows,
    # cols of each tile's tokens), or (.., 2, rows, cols, thumbnail rows, thumbnail cols) where the thumbnail's grid is
    # its own (common/tiles.py ImageLayout.flat), flat; empty or null when no image of the sample is tiled
    # (image_grids then says it all; a tiled image's image_grids entry is (0, 0), so a reader that knows no tiles
    # refuses it instead of misreading)
    ("image_tiles", pa.list_(pa.int32())),
])


def is_packed(params: dict) -> bool:
    return params.get("logprob_encoding") == "packed"


def schema_version_for(params: dict) -> int:
    """The schema version a cache made with these parameters is written as: the lowest that describes it (v8 only
    for a teacher whose tiled images' thumbnails have their own grid, so older readers refuse it by version)."""
    if params.get("thumb_grid_tiles"):
        return THUMB_GRID_SCHEMA_VERSION
    return PACKED_SCHEMA_VERSION if is_packed(params) else SCHEMA_VERSION


def array_dtype(name: str, params: dict) -> np.dtype:
    if is_packed(params) and name in {lp for _, lp in PACKED_PAIRS}:
        return np.dtype("float32")
    if name in QUANTISED and params.get("logprob_encoding", "float16") == "uint8":
        return np.dtype("uint8")
    return ARRAYS[name][1]


def encode_logprobs(a: np.ndarray, params: dict) -> np.ndarray:
    if is_packed(params):  # the zarr codec quantises (common/codecs.py)
        return a.astype(np.float32)
    if params.get("logprob_encoding", "float16") == "uint8":
        return np.clip(np.rint(-a.astype(np.float32) * UINT8_SCALE), 0, 255).astype(np.uint8)
    return a.astype(np.float16)


def decode_logprobs(a: np.ndarray) -> np.ndarray:
    """float16 log-probs from either encoding."""
    if a.dtype == np.uint8:
        return (-(a.astype(np.float16)) / np.float16(UINT8_SCALE)).astype(np.float16)
    return a


def array_shape_tail(name: str, params: dict) -> tuple[int, ...]:
    return tuple(int(params[key]) for key in ARRAYS[name][2])


def arrays_for(params: dict) -> list[str]:
    """Arrays present in a cache made with these parameters."""
    names = [n for n in ARRAYS if n not in TPA_ARRAYS and n not in IVAK_ARRAYS
             and n not in ("saliency", "tpa_pos", "resp_char_start")]
    if has_align_fields(params):
        names.append("resp_char_start")
    if params.get("tpa_branches", 0) > 0:
        names += (["tpa_pos"] if tpa_positions_layout(params) else []) + list(TPA_ARRAYS)
    if params.get("saliency_layer") is not None:
        names.append("saliency")
        if params.get("iva_token_kl"):
            names += list(IVAK_ARRAYS)
    return names


def tpa_positions_layout(params: dict) -> bool:
    """True for v4 caches: TPA rows on their own axis with tpa_pos; False: one TPA row per response token."""
    return params.get("tpa_layout") == TPA_LAYOUT


def has_align_fields(params: dict) -> bool:
    """True for caches (v7+) that carry what cross-tokenizer training needs."""
    return bool(params.get("align_fields"))
