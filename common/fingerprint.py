"""Fingerprints: what makes a cache valid for a student.

A cache is only meaningful for a student that tokenizes exactly like the teacher did (same vocab,
special tokens and chat template) and turns images into the same number of image tokens (same
processor settings). The teacher config hash and the dump parameters say what produced it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from . import __version__
from .errors import FingerprintMismatch
from .schema import schema_version_for

_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_attn_implementation", "_attn_implementation_internal",
                         "dtype", "torch_dtype", "architectures", "_commit_hash",
                         "distributed_config"}  # how the weights were placed (tensor parallelism), not what they are


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _strip(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _strip(v) for k, v in d.items() if k not in _VOLATILE_CONFIG_KEYS}
    if isinstance(d, list):
        return [_strip(v) for v in d]
    return d


def config_hash(config) -> str:
    return _sha(_strip(config.to_dict()))


def tokenizer_info(tokenizer, chat_template: str | None) -> dict:
    vocab = tokenizer.get_vocab()
    specials = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    return {
        "hash": _sha({"vocab": sorted(vocab.items()), "specials": specials, "chat_template": chat_template or ""}),
        "vocab_size": len(vocab),
        "special_tokens": specials,
    }


def processor_info(processor) -> dict:
    ip = getattr(processor, "image_processor", None)
    settings = _strip(ip.to_dict()) if ip is not None else {}
    settings.pop("image_processor_type", None)  # PIL and torchvision backends produce the same pixels
    for attr in ("patch_size", "num_additional_image_tokens", "vision_feature_select_strategy", "image_token",
                 "num_image_tokens"):
        if hasattr(processor, attr):
            settings[f"processor.{attr}"] = getattr(processor, attr)
    # as a manifest holds them (JSON: tuples as lists), so that a comparison with a cache's settings names only the
    # settings that differ in value (image_mean (0.5, ...) and [0.5, ...] are the same); the hash is unchanged
    settings = json.loads(json.dumps(settings, sort_keys=True, default=str))
    return {"hash": _sha(settings), "settings": settings}


def chat_template_of(processor) -> str | None:
    tmpl = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)
    return tmpl if isinstance(tmpl, str) else json.dumps(tmpl, sort_keys=True) if tmpl else None


def make_fingerprint(model_config, processor, params: dict) -> dict:
    """JSON-normalised (tuples become lists), so a fingerprint read back from plan.json compares equal."""
    return json.loads(json.dumps({
        "schema_version": schema_version_for(params),
        "code_version": __version__,
        "teacher_config_hash": config_hash(model_config),
        "tokenizer": tokenizer_info(processor.tokenizer, chat_template_of(processor)),
        "processor": processor_info(processor),
        "params": params,
    }, sort_keys=True, default=str))


def check_student(fingerprint: dict, processor, student_name: str) -> None:
    """Refuse a student whose tokenizer or processor differs from the one the cache was made with."""
    tok = tokenizer_info(processor.tokenizer, chat_template_of(processor))
    want = fingerprint["tokenizer"]
    if tok["hash"] != want["hash"]:
        raise FingerprintMismatch(
            f"the cache was made with another tokenizer than the student's ({student_name}): cache tokenizer "
            f"{want['hash'][:12]} with {want['vocab_size']} tokens, student tokenizer {tok['hash'][:12]} with "
            f"{tok['vocab_size']} tokens (vocab, special tokens or chat template differ). Token ids would not line "
            f"up. Re-run dump-teacher with a teacher that shares the student's tokenizer, or pick a student that "
            f"shares the teacher's, or train across tokenizers with --cross-tokenizer gold.")
    proc = processor_info(processor)
    if proc["hash"] != fingerprint["processor"]["hash"]:
        ours, theirs = proc["settings"], fingerprint["processor"]["settings"]
        diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        raise FingerprintMismatch(
            f"the student's processor ({student_name}) differs from the one the cache was made with in "
            f"{', '.join(diff)}: images would become different image tokens. Use the teacher's processor "
            f"settings for the student, re-dump, or train with --cross-tokenizer gold.")


ID_ARRAYS = ("topk_ids", "tpa_cand_ids", "tpa_ids", "ivak_ids")  # every cached array of token ids


def check_token_ids(reader, student_rows: int, student_name: str) -> None:
    """Refuse, before step 1, a cache holding token ids the student's LM head (``student_rows`` rows) has no row
    for: a teacher whose head is padded past the tokenizer (Qwen2.5-VL-7B, 152,064 rows) and a student whose head is
    smaller (the 3B, 151,936) would otherwise fail mid-run on the first such id. A cache records the ids it may hold
    (manifest ``vocabulary``: ``cached_ids_below``, the tokenizer's ids when the head is padded); an earlier cache,
    which records nothing, is scanned once. Raises FingerprintMismatch naming both head sizes and the fix."""
    vocab = reader.manifest.get("vocabulary") or {}
    below = vocab.get("cached_ids_below")
    if below is not None and below <= student_rows:
        return
    if below is None:  # an earlier cache: the largest id it holds
        import logging
        logging.getLogger("alignti.train").info("checking the token ids of %s against the student's LM head (%d "
                                                "rows): the cache records no id range", reader.url, student_rows)
        top = -1
        for j in range(len(reader.part_names)):
            arrays = reader.part_arrays(j)
            top = max([top] + [int(arrays[n].max()) for n in ID_ARRAYS if n in arrays and arrays[n].size])
        if top < student_rows:
            return
        held = f"token ids up to {top}"
    else:
        held = f"token ids up to {below - 1}"
    rows = vocab.get("lm_head_rows")
    teacher = (f"its teacher's LM head has {rows} rows for a tokenizer of {vocab.get('tokenizer_ids')} ids" if rows
               else f"made by an alignti that cached the teacher's top-k over its whole LM head; its tokenizer has "
                    f"{reader.fingerprint['tokenizer']['vocab_size']} tokens")
    raise FingerprintMismatch(
        f"the cache at {reader.url} holds {held} ({teacher}), but the student {student_name}'s LM head has "
        f"{student_rows} rows: ids from {student_rows} on have no student logit. Re-dump it with this alignti "
        f"(dump-teacher keeps the top-k among the ids the tokenizer produces; a padded head's other rows go to the "
        f"rest mass), or use a student whose LM head has at least {(below or top + 1)} rows")


def check_encoding(params: dict, processor, cache_url: str, schema_version) -> None:
    """Refuse a cache whose token ids were made by the old piecewise encoding (encoding version 1, caches of
    schema v2/v3) when this tokenizer gives other ids that way than on the whole text (SentencePiece's dummy
    prefix: LLaVA-1.5, Vicuna / Mistral LLaVA-NeXT, MobileVLM). Byte-level BPE tokenizers (Qwen-based
    families) give the same ids either way, so their old caches stay usable."""
    from .conversation import ENCODING_VERSION, piecewise_tokenization_differs
    version = int(params.get("encoding_version", 1))
    if version >= ENCODING_VERSION or not piecewise_tokenization_differs(processor.tokenizer):
        return
    raise FingerprintMismatch(
        f"the cache at {cache_url} (schema v{schema_version}, token encoding v{version}) tokenized the template "
        f"markup, instructions and answers apart; with this tokenizer ({type(processor.tokenizer).__name__}) that "
        f"gives other ids than the whole rendered conversation the model sees at inference. Re-dump it with this "
        f"alignti (encoding v{ENCODING_VERSION}): alignti dump-teacher --teacher ... --out NEW_CACHE")


def model_identity(model_config, processor) -> str:
    """A short content id of a checkpoint's architecture, tokenizer and processor settings (not its weights, not
    its path): what a training checkpoint records so that --resume refuses a different student."""
    return _sha({"config": config_hash(model_config),
                 "tokenizer": tokenizer_info(processor.tokenizer, chat_template_of(processor))["hash"],
                 "processor": processor_info(processor)["hash"]})[:16]


def cache_identity(manifest: dict) -> str:
    """A short content id of a finished cache: its fingerprint and every object's sha256 (wherever it is stored),
    recorded by a training checkpoint so that --resume refuses another cache, even one at the same path."""
    return _sha({"fingerprint": manifest.get("fingerprint"), "files": manifest.get("files")})[:16]
