"""Where samples come from: LLaVA JSON/JSONL plus an image folder, or tables (Hugging Face ``datasets``
``save_to_disk`` folders, parquet files or folders of shards, local or fsspec URLs) whose image column holds a path
or the image itself (``{"bytes", "path"}``, as ``datasets.Image`` stores it).

Every source gives the same ``Record`` list (``common.records.parse_record`` checks each row as it checks a
JSON sample) and opens a record's image. An embedded image is named by the reference ``@ROW`` (its row in the
source); the cache keeps that reference and the sha256 of the bytes, and the student reads the bytes from the same
source (``train-student --data`` if it moved). Bytes are read lazily, one row group at a time, never all at once."""

from __future__ import annotations

import glob
import hashlib
import json
from functools import lru_cache
from io import BytesIO
from pathlib import Path

from PIL import ExifTags, Image, ImageOps
from transformers.image_transforms import convert_to_rgb

from .errors import BadSamples, DataError, DataSourceError
from .records import Record, Skipped, check_unique, load_json_records, parse_record

EMBEDDED = "@"  # image reference prefix: "@12" = the image embedded in row 12 of the data source


def is_embedded(ref: str | None) -> bool:
    return bool(ref) and ref.startswith(EMBEDDED)


# how image bytes become the RGB picture every stage hands the processor (the fingerprint's params record it):
# 1: PIL's convert("RGB") (transparency dropped to its colour values, EXIF orientation ignored);
# 2: as transformers sees an image: ImageOps.exif_transpose (load_image's orientation step), then the image
#    processors' convert_to_rgb (transparency composited on white; CMYK, palette, grey converted), first frame
DECODE_VERSION = 2


def decode_image(data: bytes, sample_id: str, what: str, version: int = DECODE_VERSION) -> Image.Image:
    """The RGB PIL image of the encoded bytes ``data`` (any format PIL reads; an animated image: its first frame),
    as the family's own processor would see the file: upright per its EXIF orientation
    (``transformers.image_utils.load_image`` does the same ``ImageOps.exif_transpose``) and converted by
    transformers' ``convert_to_rgb`` (RGBA, LA and palette images with transparency composited on white), so the
    processor's own RGB conversion has nothing left to do. ``version`` 1 is the decoding of caches made before
    (plain ``convert("RGB")``), kept so a student reads such a cache's images as its teacher saw them.
    Raises DataError naming the sample and ``what`` when the bytes do not decode."""
    try:
        img = Image.open(BytesIO(data))
        img.load()
        if version < 2:
            return img.convert("RGB")
        return Image.fromarray(convert_to_rgb(ImageOps.exif_transpose(img), return_numpy=True))
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure is this image's (truncated, bomb, bad EXIF)
        raise DataError(sample_id, f"image {what} cannot be decoded ({type(e).__name__}: {e})",
                        "replace it or pass --skip-bad") from None


def upright_size(source, sample_id: str, what: str) -> tuple[int, int]:
    """(width, height) in pixels of an image (encoded bytes or a local path) as ``decode_image`` returns it (EXIF
    orientations 5-8 swap the sides), from its header alone; DataError when it is not an image PIL reads."""
    try:
        with Image.open(BytesIO(source) if isinstance(source, bytes) else source) as img:
            w, h = img.size
            if img.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8):
                w, h = h, w
            return w, h
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any header failure is this image's
        raise DataError(sample_id, f"image {what} cannot be decoded ({type(e).__name__}: {e})",
                        "replace it or pass --skip-bad") from None


def image_sizes(rec: Record, images_dir: str | Path | None) -> list[tuple[str, tuple[int, int]]]:
    """Each local or embedded image of a record with its upright size (header reads only; images behind a URL
    are left to the dump itself). Raises DataError for an image that is missing or does not decode."""
    out = []
    for ref in rec.images:
        if is_embedded(ref):
            out.append((ref, upright_size(_load_bytes(rec, ref, images_dir), rec.sample_id, f"'{ref}'")))
            continue
        folder = images_dir if images_dir is not None else rec.source.images if rec.source is not None else None
        if _is_url(folder or ""):
            continue
        out.append((ref, upright_size(str(Path(folder or ".") / ref) if Path(folder or ".", ref).is_file()
                                      else file_bytes(folder, ref, rec.sample_id), rec.sample_id, f"'{ref}'")))
    return out


def file_bytes(images: str | None, ref: str, sample_id: str) -> bytes:
    """The bytes of an image path ``ref`` under the folder ``images`` (local, or an fsspec URL)."""
    if images is None and not Path(ref).is_absolute():
        raise DataError(sample_id, f"image '{ref}' is a path but no --images folder was given",
                        "pass --images (the folder the data's image paths are relative to)")
    if _is_url(images or ""):
        fs, root = _fs(images)
        path = f"{root.rstrip('/')}/{ref}"
        if not fs.exists(path):
            raise DataError(sample_id, f"image '{ref}' not found under {images}",
                            "check --images and the sample's 'image' field, or pass --skip-bad")
        return fs.cat_file(path)
    path = Path(images or ".") / ref
    if not path.is_file():
        raise DataError(sample_id, f"image '{ref}' not found under {images}",
                        "check --images and the sample's 'image' field, or pass --skip-bad")
    return path.read_bytes()


def _is_url(data: str) -> bool:
    return "://" in str(data)


def _fs(data: str):
    import fsspec
    return fsspec.core.url_to_fs(str(data))


class DataSource:
    """Records and images of one --data (and --images) pair."""

    location: str
    images: str | None

    def records(self) -> list:
        raise NotImplementedError

    def image_bytes(self, ref: str, sample_id: str) -> bytes:
        """The bytes of a record's image reference (a path under --images, ``@ROW``, or ``@ROW:K`` for image K
        of a multi-image row)."""
        if is_embedded(ref):
            row, _, k = ref[1:].partition(":")
            return self._embedded(int(row), sample_id, int(k) if k else None)
        return self._file(ref, sample_id)

    def _file(self, ref: str, sample_id: str) -> bytes:
        return file_bytes(self.images, ref, sample_id)

    def _embedded(self, row: int, sample_id: str, k: int | None = None) -> bytes:
        raise DataError(sample_id, f"image reference '@{row}' names an embedded image, but {self.location} is a "
                        "JSON file", "pass the parquet / datasets source the cache was dumped from as --data")


class JsonSource(DataSource):
    """LLaVA JSON list or JSONL, image paths relative to --images."""

    def __init__(self, data: str, images: str | None):
        self.location, self.images = str(data), None if images is None else str(images)

    def records(self) -> list:
        return load_json_records(self.location)


class TableSource(DataSource):
    """Rows of Arrow tables: columns ``conversations`` (a list of {from, value}, or its JSON text), ``image``
    (a path string, or a struct {bytes, path}) and optionally ``id``. Rows are numbered across the files in
    order (shards sorted by name)."""

    def __init__(self, data: str, images: str | None, files: list[str], kind: str):
        self.location, self.images, self.files, self.kind = str(data), None if images is None else str(images), files, kind
        self._offsets: list[int] | None = None

    # --- reading -------------------------------------------------------------------------------------------
    def _open(self, i: int):
        """File i opened: a ``pq.ParquetFile`` (parquet), or the whole table read from its memory map (arrow,
        datasets' IPC files)."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        f = self.files[i]
        if self.kind == "parquet":
            if _is_url(f):
                fs, path = _fs(f)
                return pq.ParquetFile(fs.open(path, "rb"))
            return pq.ParquetFile(f)
        source = pa.memory_map(f, "r")
        try:
            return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            return pa.ipc.open_file(source).read_all()

    def _schema(self, handle):
        return handle.schema_arrow if self.kind == "parquet" else handle.schema

    def _num_rows(self, handle) -> int:
        return handle.metadata.num_rows if self.kind == "parquet" else handle.num_rows

    def _read(self, handle, columns: list[str]):
        if self.kind == "parquet":  # in this thread: a damaged file must not leave Arrow workers busy at exit
            return handle.read(columns=columns, use_threads=False)
        return handle.select([c.split(".")[0] for c in columns])

    def records(self) -> list:
        out, row, offsets = [], 0, []
        for i, f in enumerate(self.files):
            handle = self._open(i)
            schema = self._schema(handle)
            names = set(schema.names)
            if "conversations" not in names:
                raise DataSourceError(f, f"no 'conversations' column (columns: {', '.join(schema.names)})",
                                      "use LLaVA-style rows: conversations [{from, value}], image, id")
            image_type = schema.field("image").type if "image" in names else None
            embedded = image_type is not None and (_is_struct(image_type) or _is_list_of_structs(image_type))
            cols = ["conversations"] + (["id"] if "id" in names else [])
            if image_type is not None:  # (a single struct: its path only; the bytes are read when needed)
                cols.append("image.path" if _is_struct(image_type) and self.kind == "parquet" else "image")
            table = self._read(handle, cols)
            generated = {"loss_turns", "finish"} <= names  # rows of alignti rollout: an answer may be empty
            offsets.append(row)
            for item in table.to_pylist():
                item = _row_item(item, row, embedded)
                try:
                    if "_error" in item:
                        raise DataError(str(item.get("id", f"#{row}")), item["_error"])
                    rec = parse_record(row, item, generated_last=generated)
                    rec.source = self
                    out.append(rec)
                except DataError as e:
                    out.append(Skipped(row, e.sample, f"row {row} of {self.location}: {e}"))
                row += 1
        self._offsets = offsets + [row]
        return check_unique(out)

    def _locate(self, row: int) -> tuple[int, int]:
        if self._offsets is None:
            counts = [self._num_rows(self._open(i)) for i in range(len(self.files))]
            self._offsets = [0]
            for c in counts:
                self._offsets.append(self._offsets[-1] + c)
        for i in range(len(self.files)):
            if self._offsets[i] <= row < self._offsets[i + 1]:
                return i, row - self._offsets[i]
        raise IndexError(row)

    def _embedded(self, row: int, sample_id: str, k: int | None = None) -> bytes:
        try:
            i, local = self._locate(row)
        except IndexError:
            raise DataError(sample_id, f"row {row} is not in {self.location} ({self._offsets[-1]} rows)",
                            "pass the data source the cache was dumped from as --data") from None
        value = _image_cell(self, i, local)
        if k is not None:  # image k of a multi-image row
            if not isinstance(value, list) or k >= len(value):
                raise DataError(sample_id, f"row {row} of {self.location} has no image {k}",
                                "pass the data source the cache was dumped from as --data")
            value = value[k]
        if value is None:
            raise DataError(sample_id, f"row {row} of {self.location} has no image")
        if isinstance(value, dict):
            if value.get("bytes"):
                return value["bytes"]
            if value.get("path"):
                return self._file(value["path"], sample_id)
            raise DataError(sample_id, f"row {row} of {self.location}: the image has neither bytes nor a path")
        return self._file(str(value), sample_id)


def _is_struct(t) -> bool:
    import pyarrow as pa
    return pa.types.is_struct(t)


def _is_list_of_structs(t) -> bool:
    import pyarrow as pa
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_struct(t.value_type)


def _row_item(item: dict, row: int, embedded: bool) -> dict:
    """A table row as parse_record takes it: conversations as a list, the image as a reference string."""
    convs = item.get("conversations")
    if isinstance(convs, str):
        try:
            item["conversations"] = json.loads(convs)
        except json.JSONDecodeError as e:
            item["conversations"] = None
            item["_error"] = f"its 'conversations' text is not JSON ({e.msg})"
    image = item.get("image")
    if embedded and isinstance(image, list):  # several images: "@ROW:K" each (a path-only entry stays a path)
        item["image"] = [f"{EMBEDDED}{row}:{k}" if isinstance(im, dict) and im.get("bytes") is not None
                         else (im.get("path") if isinstance(im, dict) else im) for k, im in enumerate(image)]
    elif embedded:
        item["image"] = None if image is None else f"{EMBEDDED}{row}"
    if item.get("id") is None:
        item.pop("id", None)
    return item


@lru_cache(maxsize=4)
def _row_group(source: TableSource, i: int, group: int):
    """The image column of one row group of file i (parquet), or of the whole memory-mapped file (arrow)."""
    handle = source._open(i)
    if source.kind == "parquet":
        return handle.read_row_group(group, columns=["image"], use_threads=False).column("image")
    return handle.column("image")


def _image_cell(source: TableSource, i: int, local: int):
    if source.kind == "parquet":
        meta = _parquet_meta(source, i)
        start = 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            if local < start + n:
                return _row_group(source, i, g)[local - start].as_py()
            start += n
        raise IndexError(local)
    return _row_group(source, i, 0)[local].as_py()


@lru_cache(maxsize=64)
def _parquet_meta(source: TableSource, i: int):
    return source._open(i).metadata


def open_source(data: str | Path, images: str | Path | None = None) -> DataSource:
    """The source behind ``--data``: a JSON/JSONL file, a ``datasets`` save_to_disk folder, a parquet file, a folder
    of parquet shards, or a glob of them; local paths or fsspec URLs."""
    data = str(data)
    images = None if images is None else str(images)
    if _is_url(data):
        fs, path = _fs(data)
        protocol = data.split("://", 1)[0]
        full = (lambda p: f"{protocol}://{p}")
        if any(ch in path for ch in "*?["):
            files = sorted(fs.glob(path))
        elif fs.isdir(path):
            files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet"))
        elif path.endswith(".parquet"):
            files = [path]
        else:
            raise DataSourceError(data, "a remote --data must be parquet (a file, a folder of shards or a glob)",
                                  "export the data to parquet, or copy a JSON file locally")
        if not files:
            raise DataSourceError(data, "no parquet files there", "check the --data URL")
        return TableSource(data, images, [full(f) for f in files], "parquet")
    p = Path(data)
    if any(ch in data for ch in "*?["):
        files = sorted(glob.glob(data))
        if not files:
            raise DataSourceError(data, "no files match", "check the --data pattern")
        return TableSource(data, images, files, "parquet")
    if not p.exists():
        raise DataSourceError(data, "data file not found", "check the --data path")
    if p.is_dir():
        if (p / "dataset_dict.json").exists():
            splits = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
            raise DataSourceError(data, f"a DatasetDict with splits {splits}",
                                  f"pass one split, e.g. --data {p / (splits or ['train'])[0]}")
        if (p / "state.json").exists():
            state = json.loads((p / "state.json").read_text())
            files = [str(p / f["filename"]) for f in state.get("_data_files", [])]
            if not files:
                raise DataSourceError(data, "the datasets folder lists no data files", "re-save it with save_to_disk")
            return TableSource(data, images, files, "arrow")
        files = sorted(str(f) for f in p.rglob("*.parquet"))
        if not files:
            raise DataSourceError(data, "a folder with neither a datasets save_to_disk state.json nor parquet shards",
                                  "pass a JSON/JSONL file, a parquet file or folder, or a save_to_disk folder")
        return TableSource(data, images, files, "parquet")
    if p.suffix == ".parquet":
        return TableSource(data, images, [str(p)], "parquet")
    if p.suffix == ".arrow":
        return TableSource(data, images, [str(p)], "arrow")
    return JsonSource(data, images)


def load_records(data: str | Path) -> list[Record | Skipped]:
    """The samples of ``--data``: a LLaVA JSON/JSONL file, a parquet file or folder, a datasets save_to_disk folder
    (common.sources). Problems come back as `Skipped` entries (the caller raises or records them, depending on
    --skip-bad); a source that cannot be read at all raises."""
    return open_source(data).records()


def preflight(records: list, images: str | Path | None, skip_bad: bool, before: str, fix: str) -> list:
    """What can be checked of the samples before any model time is spent: those that do not parse (``Skipped``
    records) and image paths that are not there (or no ``images`` folder for them). Without ``skip_bad``, all of
    them at once are refused by name (``BadSamples``: "N bad sample(s) found before ``before``, nothing was written:
    sample S: ... (``fix``)"); with it, each comes back as a ``Skipped`` in its place (its reason named), the rest
    unchanged. dump-teacher, rollout and evaluate run it."""
    if images is not None and not Path(images).is_dir() and any(
            not is_embedded(ref) for r in records if not isinstance(r, Skipped) for ref in r.images):
        what = "is a file, not a folder" if Path(images).exists() else "does not exist"
        raise DataSourceError(images, f"the --images folder {what}",
                              "pass --images the folder the data's image paths are relative to")
    bad = []
    for r in records:
        if isinstance(r, Skipped):
            bad.append(r)
            continue
        paths = [ref for ref in r.images if not is_embedded(ref)]
        if paths and images is None:
            bad.append(Skipped(r.index, r.sample_id, str(DataError(
                r.sample_id, f"image '{paths[0]}' is a path but no --images folder was given",
                "pass --images (the folder the data's image paths are relative to)"))))
            continue
        missing = [ref for ref in paths if not (Path(images) / ref).is_file()]
        if missing:
            bad.append(Skipped(r.index, r.sample_id, str(DataError(
                r.sample_id, f"image '{missing[0]}' not found under {images}",
                "check --images and the sample's 'image' field, or pass --skip-bad"))))
    if bad and not skip_bad:
        raise BadSamples([(b.sample_id, b.error) for b in bad], before, fix)
    bad_by_index = {b.index: b for b in bad}
    return [bad_by_index.get(r.index, r) for r in records]


def load_image(rec: Record, images_dir: str | Path | None):
    """Open the sample's image(s); returns (PIL image, sha256 of its bytes), or for a multi-image sample (list of
    PIL images, JSON list of their sha256s). An embedded image (``@ROW``) comes from the record's table source."""
    loaded = [_load_one(rec, ref, images_dir) for ref in rec.images]
    if isinstance(rec.image, list):
        return [img for img, _ in loaded], json.dumps([sha for _, sha in loaded])
    return loaded[0]


def _load_bytes(rec: Record, ref: str, images_dir) -> bytes:
    if is_embedded(ref):
        if rec.source is None:
            raise DataError(rec.sample_id, f"image '{ref}' is embedded in a table, but the record has no source",
                            "load the records with common.sources.open_source")
        return rec.source.image_bytes(ref, rec.sample_id)
    if rec.source is not None and images_dir is None:
        images_dir = rec.source.images
    return file_bytes(str(images_dir) if images_dir is not None else ".", ref, rec.sample_id)


def _load_one(rec: Record, ref: str, images_dir):
    data = _load_bytes(rec, ref, images_dir)
    return decode_image(data, rec.sample_id, f"'{ref}'"), hashlib.sha256(data).hexdigest()
