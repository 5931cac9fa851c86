"""`alignti inspect-cache`: what a cache holds and what it costs on disk."""

from __future__ import annotations

from .cache import CacheReader
from .schema import ARRAYS, PARTS_DIR, has_align_fields

TOPK_ARRAYS = ("topk_ids", "topk_logprobs", "tail_logmass", "target_logprob")


def array_bytes(reader: CacheReader) -> dict[str, int]:
    sizes = {name: 0 for name in ARRAYS}
    other = 0
    for rel in reader.manifest["files"]:
        size = reader.fs.size(f"{reader.root}/{rel}")
        parts = rel.split("/")
        if len(parts) >= 3 and parts[0] == PARTS_DIR and parts[1].endswith(".zarr") and parts[2] in sizes:
            sizes[parts[2]] += size
        else:
            other += size
    sizes["_metadata"] = other
    return sizes


ALIGN_COLUMNS = ("conversation", "resp_turns", "image_grids")  # v7 sample-table columns (cross-tokenizer training)


def align_bytes(reader: CacheReader, sizes: dict[str, int]) -> dict[str, int]:
    """Bytes on disk of what cross-tokenizer training needs (schema v7): the per-token ``resp_char_start`` array
    (from ``sizes``, ``array_bytes``'s), the sample tables' conversation / resp_turns / image_grids columns
    (compressed, from the parquet footers) and the teacher's token strings (TOKENS_FILE). Empty for an older
    cache."""
    import pyarrow.parquet as pq

    from .schema import TOKENS_FILE
    if not has_align_fields(reader.params):
        return {}
    out = {"resp_char_start": sizes["resp_char_start"], "turn_texts_and_grids": 0, TOKENS_FILE: 0}
    for rel in reader.manifest["files"]:
        if rel.endswith(".parquet"):
            with reader.fs.open(f"{reader.root}/{rel}", "rb") as f:
                meta = pq.ParquetFile(f).metadata
                for g in range(meta.num_row_groups):
                    rg = meta.row_group(g)
                    for c in range(rg.num_columns):
                        col = rg.column(c)
                        if col.path_in_schema.split(".")[0] in ALIGN_COLUMNS:
                            out["turn_texts_and_grids"] += col.total_compressed_size
        elif rel == TOKENS_FILE:
            out[TOKENS_FILE] += reader.fs.size(f"{reader.root}/{rel}")
    return out


def cache_summary(url: str) -> dict:
    reader = CacheReader(url)
    m = reader.manifest
    fp = reader.fingerprint
    sizes = array_bytes(reader)
    n_resp = max(1, m["counts"]["response_tokens"])
    vocab = fp["tokenizer"]["vocab_size"]
    total = sum(sizes.values())
    topk_bytes = sum(sizes[a] for a in TOPK_ARRAYS)
    full_fp16 = 2 * vocab
    align = align_bytes(reader, sizes)
    return {
        "url": reader.url, "schema_version": m["schema_version"], "counts": m["counts"],
        "top_k": reader.params["top_k"], "tpa_branches": reader.params["tpa_branches"],
        "tpa_top_k": reader.params["tpa_top_k"], "saliency_layer": reader.params["saliency_layer"],
        "irs_curve": (m.get("irs") or {}).get("curve"), "vocab_size": vocab,
        "logprob_encoding": reader.params.get("logprob_encoding", "float16"),
        "bytes_on_disk": total, "bytes_by_array": {k: v for k, v in sizes.items() if v},
        "bytes_per_token_by_array": {k: v / n_resp for k, v in sizes.items() if v},
        "bytes_per_token": total / n_resp, "topk_bytes_per_token": topk_bytes / n_resp,
        "full_vocab_fp16_bytes_per_token": full_fp16,
        "cross_tokenizer_bytes_per_token": {k: v / n_resp for k, v in align.items()},
        "compression_vs_full_fp16": full_fp16 / (total / n_resp),
        "topk_compression_vs_full_fp16": full_fp16 / max(1e-9, topk_bytes / n_resp),
        "fingerprint": {"teacher_config_hash": fp["teacher_config_hash"], "tokenizer_hash": fp["tokenizer"]["hash"],
                        "processor_hash": fp["processor"]["hash"], "code_version": fp["code_version"]},
    }


def _times(ratio: float) -> str:
    """A size ratio (full fp16 / cache) in words: "3.2x smaller", or "1.9x larger" when the cache is bigger (a tiny
    vocabulary, where a k-row with its saliency and TPA fields can outweigh the whole fp16 distribution)."""
    return f"{ratio:.1f}x smaller" if ratio >= 1 else f"{1 / ratio:.1f}x larger"


def render_summary(info: dict) -> str:
    c = info["counts"]
    lines = [
        f"cache            {info['url']} (schema v{info['schema_version']})",
        f"samples          {c['samples']} ({c['ok']} ok, {c['skipped']} skipped)",
        f"tokens           {c['tokens']} input, {c['response_tokens']} response",
        f"encoding         {info['logprob_encoding']}",
        f"k                {info['top_k']} (TPA: {info['tpa_branches']} branches x top-{info['tpa_top_k']}; "
        f"saliency layer {info['saliency_layer']})",
        f"on disk          {info['bytes_on_disk']:,} bytes",
        f"bytes/token      {info['bytes_per_token']:.1f} all fields, {info['topk_bytes_per_token']:.1f} top-k fields",
        f"vs full fp16     {info['full_vocab_fp16_bytes_per_token']} B/token (vocab {info['vocab_size']}): "
        f"{_times(info['compression_vs_full_fp16'])} (top-k fields alone "
        f"{_times(info['topk_compression_vs_full_fp16'])})",
        f"fingerprint      teacher {info['fingerprint']['teacher_config_hash'][:12]}  tokenizer "
        f"{info['fingerprint']['tokenizer_hash'][:12]}  processor {info['fingerprint']['processor_hash'][:12]}",
    ]
    lines.append("per array        " + ", ".join(f"{k} {v:,}" for k, v in info["bytes_by_array"].items()))
    xt = info.get("cross_tokenizer_bytes_per_token") or {}
    lines.append("cross-tokenizer  " + (f"{sum(xt.values()):.1f} B/token (" + ", ".join(
        f"{k} {v:.1f}" for k, v in xt.items()) + ")" if xt else "none (schema < 7: re-dump for --cross-tokenizer)"))
    lines.append("B/token by field " + ", ".join(f"{k} {v:.1f}" for k, v in info["bytes_per_token_by_array"].items()))
    return "\n".join(lines)
