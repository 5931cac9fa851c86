"""Cache writer and reader (the format is specified in common/schema.py and docs/cache-format.md).

The writer buffers one work unit (a few hundred samples) in memory and writes it as one *part*:
each array in one go, so every shard is written whole, then the part's parquet table, then the
commit marker with the sha256 of every object. Everything is written under temporary names and
renamed into place; a part without a commit marker is not part of the cache and is redone on
resume. ``manifest.json`` is written last for the whole cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from . import codecs as packed_codecs  # registers the packed encoding's codecs with numcodecs and zarr
from .errors import CacheError
from .faults import crash_point
from .schema import (CHUNK_TOKENS, IVAK_ARRAYS, MANIFEST_FILE, PACKED_PAIRS, PARTS_DIR, PLAN_FILE, QUANTISED,
                     READABLE_VERSIONS, SAMPLE_SCHEMA, SHARD_CHUNKS, SPECIALS_FILE, TOKENS_FILE, TPA_ARRAYS, array_dtype,
                     array_shape_tail, arrays_for, decode_logprobs, encode_logprobs, is_packed, schema_version_for,
                     tpa_positions_layout)

COMPRESSORS = (BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"), Crc32cCodec())
# the packed codecs lay their output out in byte planes themselves: zstd without blosc's shuffle
PACKED_COMPRESSORS = (BloscCodec(cname="zstd", clevel=5, shuffle="noshuffle"), Crc32cCodec())
PACKED_COMPRESSOR_NAMES = ("zstd", "lzma")  # params["packed"]["compressor"]; absent: zstd
# zarr warns on every array whose metadata names a numcodecs codec (lzma here) that such codecs are outside the zarr v3
# spec: known and documented (docs/cache-format.md), so not repeated on every read of a cache
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")


def packed_compressors(params: dict) -> tuple:
    """The bytes -> bytes codecs after the packed codecs: blosc-zstd (``"zstd"``, the default) or the standard
    library's LZMA through numcodecs (``"lzma"``: 3-5% fewer bytes, ~20x the compression time; bench/README.md,
    "Real LM"), then crc32c. Plain zarr reads either (both are named in the array's metadata)."""
    name = (params.get("packed") or {}).get("compressor", "zstd")
    if name == "zstd":
        return PACKED_COMPRESSORS
    if name == "lzma":
        from zarr.codecs.numcodecs import LZMA
        return (LZMA(preset=6), Crc32cCodec())
    raise CacheError(f"packed compressor '{name}' is not one of {', '.join(PACKED_COMPRESSOR_NAMES)}")


def packed_settings(params: dict) -> dict:
    """The packed encoding's codec settings (the keyword arguments of ``TopkLogprobsCodec``) from
    ``params["packed"]``. A recorded ``tail_step`` is used as it is (every packed cache records one); else the step
    comes from ``tail_kl`` (nats, default ``codecs.DEFAULT_TAIL_KL``) and ``params["top_k"]`` by
    ``codecs.tail_step_for``; without a top_k, ``codecs.DEFAULT_TAIL_STEP``."""
    got = dict(params.get("packed") or {})
    head = int(got.get("head", packed_codecs.DEFAULT_HEAD))
    if "tail_step" in got:
        tail_step = float(got["tail_step"])
    elif "top_k" in params:
        tail_step = packed_codecs.tail_step_for(int(params["top_k"]), head,
                                                float(got.get("tail_kl", packed_codecs.DEFAULT_TAIL_KL)))
    else:
        tail_step = packed_codecs.DEFAULT_TAIL_STEP
    return {"head": head, "head_step": float(got.get("head_step", packed_codecs.DEFAULT_HEAD_STEP)),
            "tail_step": tail_step}


def serializer_for(name: str, params: dict):
    """The zarr array -> bytes codec of an array (None: zarr's plain ``bytes``)."""
    if not is_packed(params):
        return None
    st = packed_settings(params)
    for ids, lps in PACKED_PAIRS:
        if name == ids:
            return packed_codecs.ZarrTopkIds(head=st["head"])
        if name == lps:
            return packed_codecs.ZarrTopkLogprobs(**st)
    return None


def part_name(i: int) -> str:
    return f"{i:05d}"


def sha256_file(path, fs=None) -> str:
    """sha256 of a local file, or of ``path`` on the fsspec filesystem ``fs``."""
    h = hashlib.sha256()
    with (fs.open(path, "rb") if fs is not None else open(path, "rb")) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_text(path: Path, text: str, point: str = "") -> None:
    """Write ``text`` to ``path`` all or nothing: a temporary ``NAME.tmpPID`` beside it, renamed into place.
    ``point``: the crash point (common.faults) between the two, for the kill -9 tests."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    if point:
        crash_point(point)
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj, point: str = "") -> None:
    """``atomic_write_text`` of ``obj`` as indented JSON with sorted keys."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True), point)


def write_array(group, name: str, data: np.ndarray, serializer=None, compressors=None) -> None:
    """One array of a part, written in one go (every shard whole). ``serializer``: a packed top-k codec
    (``serializer_for``), else zarr's ``bytes`` with blosc's byte shuffle. ``compressors``: the bytes -> bytes
    codecs after it (default: PACKED_COMPRESSORS after a packed codec, else COMPRESSORS)."""
    if compressors is None:
        compressors = PACKED_COMPRESSORS if serializer is not None else COMPRESSORS
    rows = max(1, data.shape[0])
    chunk = min(CHUNK_TOKENS, rows)
    shard = chunk * min(SHARD_CHUNKS, -(-rows // chunk))
    extra = {"serializer": serializer} if serializer is not None else {}
    group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=(chunk, *data.shape[1:]),
                       shards=(shard, *data.shape[1:]),
                       compressors=compressors, fill_value=0,
                       **extra)
    crash_point("shard-flush")
    group[name][...] = data


class PartWriter:
    """Collects the samples of one work unit, then commits them as a part."""

    def __init__(self, root: str | Path, index: int, params: dict):
        self.root = Path(root)
        self.index = index
        self.params = params
        self.names = arrays_for(params)
        self.buffers: dict[str, list[np.ndarray]] = {n: [] for n in self.names}
        self.offsets = {"tok": 0, "resp": 0, "sal": 0, "tpa": 0, "ivak": 0}
        self.rows: list[dict] = []

    def add_skipped(self, index: int, sample_id: str, error: str, image: str = "") -> None:
        self.rows.append(dict(sample_id=sample_id, index=index, status="skipped", error=error, image=image,
                              image_sha256="", tok_start=self.offsets["tok"], tok_len=0,
                              resp_start=self.offsets["resp"], resp_len=0, image_tok_start=0, n_image_tokens=0,
                              instr_spans=[], resp_spans=[], image_spans=[], sal_start=self.offsets["sal"], n_turns=0,
                              tpa_start=self.offsets["tpa"], tpa_len=0, ivak_start=self.offsets["ivak"], ivak_len=0,
                              resp_turns=[], image_grids=[], image_tiles=[]))

    def add(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """meta: the sample's row fields (ids, spans); arrays: its slice of every array."""
        n_tok = len(arrays["input_ids"])
        n_resp = len(arrays["topk_ids"])
        if int(arrays["response_mask"].sum()) != n_resp:
            raise CacheError(f"sample {meta['sample_id']}: {n_resp} teacher rows for "
                             f"{int(arrays['response_mask'].sum())} response tokens")
        if is_packed(self.params):  # canonical order: the head in rank order, the rest of each row sorted by id
            arrays = dict(arrays)
            head = packed_settings(self.params)["head"]
            for ids, lps in PACKED_PAIRS:
                if ids in self.names and ids in arrays:
                    arrays[ids], arrays[lps] = packed_codecs.canonical_order(np.asarray(arrays[ids]),
                                                                             np.asarray(arrays[lps]), head)
        for name in self.names:
            want = array_dtype(name, self.params)
            a = arrays[name]
            if name in QUANTISED and a.dtype != want:
                a = encode_logprobs(a, self.params)
            a = np.ascontiguousarray(a, dtype=want)
            tail = array_shape_tail(name, self.params)
            if a.shape[1:] != tail:
                raise CacheError(f"sample {meta['sample_id']}: array {name} has shape {a.shape}, expected (*, *{tail})")
            self.buffers[name].append(a)
        n_sal = len(arrays["saliency"]) if "saliency" in self.names else 0
        n_tpa = len(arrays["tpa_pos"]) if "tpa_pos" in self.names else 0
        n_ivak = len(arrays["ivak_pos"]) if "ivak_pos" in self.names else 0
        if n_tpa and (int(arrays["tpa_pos"].max()) >= n_resp or int(arrays["tpa_pos"].min()) < 0):
            raise CacheError(f"sample {meta['sample_id']}: TPA positions outside its {n_resp} response tokens")
        if meta.get("image_spans") is None:  # one image: its tokens from image_tok_start
            a0, n_img = int(meta.get("image_tok_start", 0)), int(meta.get("n_image_tokens", 0))
            meta = dict(meta, image_spans=[a0, a0 + n_img] if n_img else [])
        self.rows.append(dict(meta, status="ok", error="", tok_start=self.offsets["tok"], tok_len=n_tok,
                              resp_start=self.offsets["resp"], resp_len=n_resp, sal_start=self.offsets["sal"],
                              tpa_start=self.offsets["tpa"], tpa_len=n_tpa, ivak_start=self.offsets["ivak"],
                              ivak_len=n_ivak))
        self.offsets["tok"] += n_tok
        self.offsets["resp"] += n_resp
        self.offsets["sal"] += n_sal
        self.offsets["tpa"] += n_tpa
        self.offsets["ivak"] += n_ivak

    def commit(self) -> dict:
        parts = self.root / PARTS_DIR
        parts.mkdir(parents=True, exist_ok=True)
        name = part_name(self.index)
        tmp = parts / f".{name}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        group = zarr.open_group(str(tmp / f"{name}.zarr"), mode="w", zarr_format=3)
        group.attrs.update({"schema_version": schema_version_for(self.params), "part": self.index})
        for n in self.names:
            tail = array_shape_tail(n, self.params)
            data = np.concatenate(self.buffers[n]) if self.buffers[n] else np.zeros((0, *tail), array_dtype(n, self.params))
            ser = serializer_for(n, self.params)
            write_array(group, n, data, ser, packed_compressors(self.params) if ser is not None else None)
        table = pa.Table.from_pylist(self.rows, schema=SAMPLE_SCHEMA)
        pq.write_table(table, tmp / f"{name}.parquet", compression="zstd")
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        # move into place, then the marker (the marker is what makes the part exist)
        for entry in (f"{name}.zarr", f"{name}.parquet"):
            dest = parts / entry
            if dest.is_dir():
                shutil.rmtree(dest)
            elif dest.exists():
                dest.unlink()
            os.replace(tmp / entry, dest)
            crash_point("part-move")
        shutil.rmtree(tmp, ignore_errors=True)
        ok = [r for r in self.rows if r["status"] == "ok"]
        marker = {"part": self.index, "schema_version": schema_version_for(self.params), "samples": len(self.rows), "ok": len(ok),
                  "tokens": self.offsets["tok"], "response_tokens": self.offsets["resp"],
                  "tpa_rows": self.offsets["tpa"],
                  "files": {f"{PARTS_DIR}/{k}": v for k, v in files.items()}}
        atomic_write_json(parts / f"{name}.commit.json", marker, point="marker")
        return marker


def committed_parts(root: Path) -> dict[int, dict]:
    out = {}
    for p in sorted((root / PARTS_DIR).glob("*.commit.json")) if (root / PARTS_DIR).exists() else []:
        marker = json.loads(p.read_text())
        out[int(marker["part"])] = marker
    return out


def write_plan(root: Path, plan: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / PLAN_FILE, plan)


def read_plan(root: Path) -> dict | None:
    p = root / PLAN_FILE
    return json.loads(p.read_text()) if p.exists() else None


def write_manifest(root: Path, plan: dict, markers: dict[int, dict], extra: dict | None = None) -> dict:
    files = {PLAN_FILE: sha256_file(root / PLAN_FILE)}
    for name in (TOKENS_FILE, SPECIALS_FILE):  # v7: the teacher's token strings and specials (cross-tokenizer)
        if (root / name).exists():
            files[name] = sha256_file(root / name)
    parts = []
    for i in sorted(markers):
        m = markers[i]
        files.update(m["files"])
        marker_path = f"{PARTS_DIR}/{part_name(i)}.commit.json"
        files[marker_path] = sha256_file(root / marker_path)
        parts.append({"name": part_name(i), "samples": m["samples"], "ok": m["ok"], "tokens": m["tokens"],
                      "response_tokens": m["response_tokens"]})
    manifest = {
        "schema_version": schema_version_for(plan["fingerprint"]["params"]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fingerprint": plan["fingerprint"],
        "units": plan["units"],
        "counts": {"samples": sum(p["samples"] for p in parts), "ok": sum(p["ok"] for p in parts),
                   "skipped": sum(p["samples"] - p["ok"] for p in parts), "tokens": sum(p["tokens"] for p in parts),
                   "response_tokens": sum(p["response_tokens"] for p in parts)},
        "parts": parts,
        "files": files,
        **(extra or {}),
    }
    atomic_write_json(root / MANIFEST_FILE, manifest, point="manifest")
    return manifest


# --- reader ----------------------------------------------------------------------------------
def read_parquet_table(fs, path: str) -> pa.Table:
    """A part's samples table, read in this thread from an Arrow-owned copy of its bytes.

    ``pq.read_table`` goes through Arrow's async dataset reader: when the file is damaged it raises while a
    continuation on Arrow's thread pool still holds the file reader, and if that reader's last reference drops
    there during interpreter shutdown, releasing a Python-owned buffer needs the GIL and the process aborts
    ("terminate called without an active exception", exit 134) after validate-cache has reported the damage
    (3 of 30 runs on a busy machine). The synchronous reader on a buffer Arrow owns leaves nothing behind."""
    with fs.open(path, "rb") as f:
        data = f.read()
    buf = pa.allocate_buffer(len(data))
    pa.FixedSizeBufferWriter(buf).write(data)
    return pq.ParquetFile(pa.BufferReader(buf)).read(use_threads=False)


def _check_exists(fs, root: str, url) -> None:
    """CacheError where nothing is at ``root`` (the reader's and validate-cache's own wording for a wrong --cache)."""
    if not fs.exists(root):
        raise CacheError(f"{url} does not exist: give the folder (or URL) that dump-teacher --out wrote") from None


class CacheReader:
    """Reads a finished cache from a local path or any fsspec URL (s3://, file://, memory://).

    ``reader[i]`` is the i-th usable ("ok") sample in dataset order as a dict of numpy arrays.
    Arrays are read a part at a time (a part is a few hundred samples) and kept in a small LRU.
    """

    def __init__(self, url: str | Path, storage_options: dict | None = None, max_parts_in_memory: int = 4):
        self.url = str(url).rstrip("/")
        self.storage_options = storage_options or {}
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        try:
            with self.fs.open(f"{self.root}/{MANIFEST_FILE}", "r") as f:
                self.manifest = json.load(f)
        except FileNotFoundError:
            if self.fs.exists(f"{self.root}/{PLAN_FILE}"):
                raise CacheError(f"{self.url} is an unfinished dump (no {MANIFEST_FILE}): re-run the same "
                                 f"dump-teacher command to finish it") from None
            _check_exists(self.fs, self.root, self.url)
            raise CacheError(f"{self.url} is not an alignti cache (no {MANIFEST_FILE})") from None
        except json.JSONDecodeError as e:
            raise CacheError(f"{self.url}/{MANIFEST_FILE} is damaged ({e}); run validate-cache") from None
        version = self.manifest.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise CacheError(f"{self.url} has cache schema version {version}; this alignti reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))}. Re-dump the teacher with this version.")
        self.fingerprint = self.manifest["fingerprint"]
        self.params = self.fingerprint["params"]
        self.part_names = [p["name"] for p in self.manifest["parts"]]
        tables = []
        for j, name in enumerate(self.part_names):
            try:
                t = read_parquet_table(self.fs, f"{self.root}/{PARTS_DIR}/{name}.parquet")
            except (OSError, pa.ArrowException) as e:
                raise CacheError(f"part {name}: samples table {PARTS_DIR}/{name}.parquet cannot be read ({e}); "
                                 f"run 'alignti validate-cache {self.url}' and re-dump the part") from None
            if "tpa_start" not in t.column_names:  # v2/v3: one TPA row per response token
                t = t.append_column("tpa_start", t.column("resp_start")).append_column("tpa_len", t.column("resp_len"))
            if "ivak_start" not in t.column_names:  # v2-v4: no token-KL statistics
                zeros = pa.array([0] * t.num_rows, pa.int64())
                t = t.append_column("ivak_start", zeros).append_column("ivak_len", zeros.cast(pa.int32()))
            if "image_spans" not in t.column_names:  # v2-v4: one image, its tokens contiguous
                st, n = t.column("image_tok_start").to_pylist(), t.column("n_image_tokens").to_pylist()
                t = t.append_column("image_spans", pa.array([[a, a + b] if b else [] for a, b in zip(st, n)],
                                                            pa.list_(pa.int32())))
            for col in ("conversation", "resp_turns", "image_grids", "image_tiles"):  # v2-v6: no cross-tokenizer
                # fields; image_tiles: caches without tiled images
                if col not in t.column_names:
                    t = t.append_column(col, pa.nulls(t.num_rows, SAMPLE_SCHEMA.field(col).type))
            tables.append(t.append_column("part", pa.array([j] * t.num_rows, pa.int32())))
        self.table = pa.concat_tables(tables) if tables else SAMPLE_SCHEMA.empty_table()
        self.tpa_layout = tpa_positions_layout(self.params)
        rows = self.table.to_pylist()
        self.samples = [r for r in rows if r["status"] == "ok"]
        self.skipped = [r for r in rows if r["status"] != "ok"]
        self._parts: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._max_parts = max_parts_in_memory

    def __len__(self) -> int:
        return len(self.samples)

    def __getstate__(self):  # DataLoader workers reopen the filesystem and arrays themselves
        state = dict(self.__dict__)
        state["_parts"] = OrderedDict()
        state.pop("fs")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.fs, _ = fsspec.core.url_to_fs(self.url, **self.storage_options)

    def open_part(self, j: int):
        path = f"{self.url}/{PARTS_DIR}/{self.part_names[j]}.zarr"
        if "://" in self.url:
            return zarr.open_group(path, mode="r", storage_options=self.storage_options or None)
        return zarr.open_group(path, mode="r")

    def part_arrays(self, j: int) -> dict[str, np.ndarray]:
        if j in self._parts:
            self._parts.move_to_end(j)
            return self._parts[j]
        group = self.open_part(j)
        arrays = {}
        for name in arrays_for(self.params):
            try:
                arrays[name] = group[name][...]
                if name in QUANTISED:
                    arrays[name] = decode_logprobs(arrays[name])
            except Exception as e:  # noqa: BLE001 - any decode/checksum failure is a damaged chunk
                raise CacheError(f"part {self.part_names[j]}: array {name} cannot be read ({type(e).__name__}: "
                                 f"{e}); run 'alignti validate-cache {self.url}'") from None
        self._parts[j] = arrays
        while len(self._parts) > self._max_parts:
            self._parts.popitem(last=False)
        return arrays

    def keep_parts(self, n: int) -> None:
        """Keep up to ``n`` parts' arrays decoded (the LRU's size; at least the constructor's
        ``max_parts_in_memory``): train-student sets it to its shuffle window's parts."""
        self._max_parts = max(self._max_parts, int(n))

    def part_of(self, i: int) -> int:
        return int(self.samples[i]["part"])

    def __getitem__(self, i: int) -> dict:
        row = self.samples[i]
        a = self.part_arrays(int(row["part"]))
        ts, tl = row["tok_start"], row["tok_len"]
        rs, rl = row["resp_start"], row["resp_len"]
        out = {
            "sample_id": row["sample_id"], "index": row["index"], "image": row["image"],
            "image_sha256": row["image_sha256"], "image_tok_start": row["image_tok_start"],
            "n_image_tokens": row["n_image_tokens"],
            "image_spans": list(zip(row["image_spans"][0::2], row["image_spans"][1::2])),
            "instr_spans": list(zip(row["instr_spans"][0::2], row["instr_spans"][1::2])),
            "resp_spans": list(zip(row["resp_spans"][0::2], row["resp_spans"][1::2])),
            "input_ids": a["input_ids"][ts:ts + tl], "response_mask": a["response_mask"][ts:ts + tl],
        }
        for name in ("topk_ids", "topk_logprobs", "tail_logmass", "target_logprob", "resp_char_start"):
            if name in a:
                out[name] = a[name][rs:rs + rl]
        if row.get("conversation"):  # v7: what cross-tokenizer training needs
            out["conversation"] = row["conversation"]
            out["resp_turns"] = list(row["resp_turns"] or [])
            g = list(row["image_grids"] or [])
            out["image_grids"] = list(zip(g[0::2], g[1::2]))
            if row.get("finish"):  # a rollout row: "length" = its loss turn was cut (no end-of-turn markup)
                out["finish"] = row["finish"]
        if row.get("image_tiles"):  # tiled images: their layouts (common/tiles.py layouts_of)
            out["image_tiles"] = list(row["image_tiles"])
        if "tpa_cand_ids" in a:
            ps, pl = (row["tpa_start"], row["tpa_len"]) if self.tpa_layout else (rs, rl)
            for name in TPA_ARRAYS:
                out[name] = a[name][ps:ps + pl]
            out["tpa_pos"] = a["tpa_pos"][ps:ps + pl] if self.tpa_layout else np.arange(rl, dtype=np.int32)
        if "ivak_pos" in a:
            s0, n = row["ivak_start"], row["ivak_len"]
            for name in IVAK_ARRAYS:
                out[name] = a[name][s0:s0 + n]
        if "saliency" in a:
            n = row["n_turns"] * row["n_image_tokens"]
            out["saliency"] = a["saliency"][row["sal_start"]:row["sal_start"] + n].reshape(
                row["n_turns"], row["n_image_tokens"])
        return out


def _part_of(rel: str) -> str | None:
    return rel.split("/")[1].split(".")[0] if rel.startswith(f"{PARTS_DIR}/") else None


def _listing(fs, root: str) -> set[str]:
    """Every object under ``root``, relative to it, from one recursive listing (one request on s3)."""
    return {p[len(root.rstrip("/")) + 1:] for p in fs.find(root)} if fs.exists(root) else set()


def check_manifest(reader: CacheReader) -> None:
    """The check train-student runs before it starts (cheap, also on object storage): every object the
    manifest lists is there (one recursive listing), and the small objects (plan, commit markers,
    sample tables, zarr metadata) match their sha256. Chunk payloads are covered by their crc32c,
    checked on every read; ``validate_cache`` re-hashes everything."""
    fs, root = reader.fs, reader.root
    present = _listing(fs, root)
    files = reader.manifest["files"]
    missing = sorted(rel for rel in files if rel not in present)
    damaged = []
    for rel in sorted(files):
        if rel in present and rel.endswith((".json", ".parquet")):
            if sha256_file(f"{root}/{rel}", fs) != files[rel]:
                damaged.append(rel)
    if missing or damaged:
        what = [f"{len(missing)} object(s) missing ({', '.join(missing[:3])})"] if missing else []
        what += [f"{len(damaged)} object(s) changed since the dump ({', '.join(damaged[:3])})"] if damaged else []
        parts = sorted({_part_of(rel) for rel in missing + damaged} - {None})
        raise CacheError(f"the cache at {reader.url} does not match its manifest: {'; '.join(what)}"
                         + (f" in part(s) {', '.join(parts)}" if parts else "")
                         + f". Run 'alignti validate-cache --repair {reader.url}', then re-run the dump-teacher command "
                         "that made it: only the damaged parts are redone.")


def validate_cache(url: str | Path, storage_options: dict | None = None, damaged_parts: list | None = None) -> list[str]:
    """Re-check every object's sha256, every chunk's crc32c (by decoding it), counts and offsets.
    Returns a list of problems (empty when the cache is sound), each naming its part and that part's
    sample ids; the names of the damaged parts are appended to ``damaged_parts`` when given."""
    found: list[tuple[str | None, str]] = []
    fs, root = fsspec.core.url_to_fs(str(url), **(storage_options or {}))
    try:
        with fs.open(f"{root}/{MANIFEST_FILE}", "r") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        if fs.exists(f"{root}/{PLAN_FILE}"):  # not damaged: a dump that has not finished (the manifest comes last)
            raise CacheError(f"{url} is an unfinished dump (no {MANIFEST_FILE}): re-run the same dump-teacher "
                             f"command to finish it (nothing to validate or repair before that)") from None
        _check_exists(fs, root, url)
        if not fs.exists(f"{root}/{PARTS_DIR}"):  # nothing of a cache here: not a damaged one
            raise CacheError(f"{url} is not an alignti cache (no {MANIFEST_FILE}, no {PARTS_DIR}/): give the "
                             f"folder that dump-teacher --out wrote") from None
        return [f"{MANIFEST_FILE}: missing (the cache's parts are there but its manifest was deleted)"]
    except json.JSONDecodeError as e:
        return [f"{MANIFEST_FILE}: damaged ({type(e).__name__})"]
    present = _listing(fs, root)
    for rel, want in sorted(manifest["files"].items()):
        path = f"{root}/{rel}"
        if rel not in present:
            found.append((_part_of(rel), f"{rel}: missing"))
            continue
        if sha256_file(path, fs) != want:
            found.append((_part_of(rel), f"{rel}: sha256 mismatch (damaged or modified)"))
    bad_tables = {p for p, m in found if p and m.startswith(f"{PARTS_DIR}/{p}.parquet")}
    ids_by_part: dict[str, list[str]] = {}
    try:
        reader = CacheReader(url, storage_options)
    except CacheError as e:
        reader = None
        found.append((None, str(e)))
    if reader is not None:
        all_rows = reader.table.to_pylist()
        for j, part in enumerate(manifest["parts"]):
            name = part["name"]
            rows = [r for r in all_rows if r["part"] == j]
            ids_by_part[name] = [r["sample_id"] for r in rows]
            try:
                arrays = reader.part_arrays(j)
            except CacheError as e:
                found.append((name, str(e)))
                continue
            n_tok = sum(r["tok_len"] for r in rows)
            n_resp = sum(r["resp_len"] for r in rows)
            if len(arrays["input_ids"]) != n_tok or n_tok != part["tokens"]:
                found.append((name, f"part {name}: {len(arrays['input_ids'])} tokens stored, table says {n_tok}"))
            if len(arrays["topk_ids"]) != n_resp or n_resp != part["response_tokens"]:
                found.append((name, f"part {name}: {len(arrays['topk_ids'])} response rows, table says {n_resp}"))
            if "ivak_pos" in arrays:
                n_ivak = sum(r["ivak_len"] for r in rows)
                if any(len(arrays[a]) != n_ivak for a in IVAK_ARRAYS):
                    found.append((name, f"part {name}: {len(arrays['ivak_pos'])} token-KL rows, table says {n_ivak}"))
            if "tpa_pos" in arrays:
                n_tpa = sum(r["tpa_len"] for r in rows)
                if any(len(arrays[a]) != n_tpa for a in ("tpa_pos", *TPA_ARRAYS)):
                    found.append((name, f"part {name}: {len(arrays['tpa_pos'])} TPA rows, table says {n_tpa}"))
            for r in rows:
                if r["status"] != "ok":
                    continue
                m = arrays["response_mask"][r["tok_start"]:r["tok_start"] + r["tok_len"]]
                if int(m.sum()) != r["resp_len"]:
                    found.append((name, f"part {name}: sample {r['sample_id']} offsets do not match its mask"))
                if "tpa_pos" in arrays and r["tpa_len"]:
                    pos = arrays["tpa_pos"][r["tpa_start"]:r["tpa_start"] + r["tpa_len"]]
                    if len(pos) and (int(pos.max()) >= r["resp_len"] or int(pos.min()) < 0):
                        found.append((name, f"part {name}: sample {r['sample_id']} TPA positions out of range"))
    plan_ids = None  # read from plan.json only if a part's own sample table cannot name its samples
    problems = []
    for part, msg in found:
        if part is not None:
            ids = ids_by_part.get(part) if part not in bad_tables else None
            if not ids and plan_ids is None:
                try:  # the sample table itself is damaged: take the ids from the plan
                    with fs.open(f"{root}/{PLAN_FILE}", "r") as f:
                        plan_ids = json.load(f).get("unit_ids", [])
                except (OSError, json.JSONDecodeError):
                    plan_ids = []
            if not ids and plan_ids and int(part) < len(plan_ids):
                ids = plan_ids[int(part)]
            if ids:
                msg += f" [part {part}, samples {', '.join(ids[:8])}{f' ... ({len(ids)})' if len(ids) > 8 else ''}]"
            if damaged_parts is not None and part not in damaged_parts:
                damaged_parts.append(part)
        problems.append(msg)
    return problems


def mark_for_redump(root: str | Path, parts: list[str]) -> None:
    """Repair, step one: drop the damaged parts' commit markers and the manifest, so re-running the
    same dump-teacher command redoes exactly those work units (local caches)."""
    root = Path(root)
    for name in parts:
        (root / PARTS_DIR / f"{name}.commit.json").unlink(missing_ok=True)
    (root / MANIFEST_FILE).unlink(missing_ok=True)


def push_cache(src: str | Path, url: str, storage_options: dict | None = None) -> dict:
    """Copy a finished local cache to any fsspec URL (s3://, gs://, file://, memory://), then re-hash every
    object there against the manifest. Objects go first, commit markers next, plan.json and
    manifest.json last: a reader never sees a manifest whose objects are not all in place."""
    src = Path(src)
    manifest_path = src / MANIFEST_FILE
    if not manifest_path.exists():
        raise CacheError(f"{src} is not a finished cache (no {MANIFEST_FILE}); finish the dump before pushing")
    manifest = json.loads(manifest_path.read_text())
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if fs.exists(f"{root}/{MANIFEST_FILE}"):
        with fs.open(f"{root}/{MANIFEST_FILE}", "r") as f:
            there = json.load(f)
        if there.get("files") != manifest["files"]:
            raise CacheError(f"{url} already holds another cache; push to an empty location")
    rels = sorted(manifest["files"], key=lambda r: (r.endswith(".commit.json"), r == PLAN_FILE))
    for rel in rels + [MANIFEST_FILE]:
        target = f"{root}/{rel}"
        try:
            fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(src / rel), target)
        except OSError as e:  # read-only, full, gone, no permission: the destination's own words, on one line
            cause = e.strerror or str(e) or type(e).__name__
            raise CacheError(f"push-cache: cannot write {rel} to {url} ({cause}). Nothing there is usable yet (the "
                             f"manifest is written last), so nothing is lost: make the destination writable (or "
                             f"free space there) and re-run the same push-cache command") from None
    bad = []
    for rel, want in manifest["files"].items():
        if sha256_file(f"{root}/{rel}", fs) != want:
            bad.append(rel)
    if bad:
        raise CacheError(f"{len(bad)} object(s) differ after upload to {url}: {', '.join(bad[:3])}")
    return {"url": url, "objects": len(manifest["files"]) + 1,
            "bytes": sum((src / rel).stat().st_size for rel in manifest["files"])}


def read_teacher_tokens(reader: "CacheReader") -> list | None:
    """The teacher's token strings a v7 cache holds (``TOKENS_FILE``: per id the hex of the bytes the token adds to
    text, None for special tokens), or None when the cache has none."""
    path = f"{reader.root}/{TOKENS_FILE}"
    if TOKENS_FILE not in reader.manifest.get("files", {}) or not reader.fs.exists(path):
        return None
    with reader.fs.open(path, "r") as f:
        return json.load(f)


def read_teacher_specials(reader: "CacheReader") -> dict | None:
    """The teacher's special tokens and their roles (``SPECIALS_FILE``, ``token_align.special_roles``), or None for
    a cache dumped before they were recorded (its specials then map only where the turn ends)."""
    path = f"{reader.root}/{SPECIALS_FILE}"
    if SPECIALS_FILE not in reader.manifest.get("files", {}) or not reader.fs.exists(path):
        return None
    with reader.fs.open(path, "r") as f:
        return json.load(f)
