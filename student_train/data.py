"""Student-side data: cache samples + the student's own image inputs, batched with the teacher's tensors."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from alignti.common.batch import collate, image_token_positions, tpa_layout
from alignti.common.cache import CacheReader
from alignti.common.records import image_refs
from alignti.common.errors import DataError
from alignti.common.sources import DECODE_VERSION, TableSource, decode_image, is_embedded, open_source

log = logging.getLogger("alignti.train")


class CacheDataset(torch.utils.data.Dataset):
    """Sample i of the cache with its decoded image (checked against the sha256 the teacher saw).
    Pixel inputs are made per batch by ``StudentCollator`` (one image-processor call per batch)."""

    def __init__(self, reader: CacheReader, processor, images_dir: str | None = None, check_images: bool = True,
                 data: str | None = None):
        self.reader = reader
        self.processor = processor
        self.images_dir = images_dir or reader.manifest.get("images", "")
        self.data = data or reader.manifest.get("data", "")  # the dump's source: embedded images are read there
        self.check_images = check_images
        self._verified: dict[tuple, str] = {}  # (path, size, mtime) -> sha256, per process
        self._source = None
        # the teacher's image decoding (common.sources.DECODE_VERSION; caches without the key predate version 2):
        # the student decodes each image as the teacher did, so the pixels and the cached statistics match
        self.decode_version = int(reader.fingerprint.get("params", {}).get("image_decode", 1))
        if self.decode_version != DECODE_VERSION:
            log.warning("the cache at %s decoded images with alignti's image decoding v%d (now v%d: EXIF orientation "
                        "and transparency as transformers' processors see them); the student reads its images the "
                        "same way. Re-dump it for images with an EXIF orientation or transparency to be seen "
                        "upright and on white", reader.url, self.decode_version, DECODE_VERSION)

    def _image_bytes(self, ref: str, sample_id: str) -> bytes:
        """An embedded image's bytes, from the data source the teacher read (opened once per process)."""
        if self._source is None:
            try:
                self._source = open_source(self.data, self.images_dir or None)
            except DataError as e:
                raise DataError(sample_id, f"its image is embedded in the dump's data source, which cannot be "
                                f"opened ({e})", "pass --data pointing at the data the cache was dumped from") from None
            if not isinstance(self._source, TableSource):
                raise DataError(sample_id, f"its image is embedded in a table, but {self.data} is not one",
                                "pass --data pointing at the data the cache was dumped from")
        return self._source.image_bytes(ref, sample_id)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> dict:
        x = self.reader[i]
        x["image_inputs"] = {}
        refs = image_refs(x["image"])
        shas = image_refs(x["image_sha256"]) if len(refs) > 1 else [x["image_sha256"]]
        x["pil_images"] = [self._image(ref, sha, x["sample_id"]) for ref, sha in zip(refs, shas)]
        return x

    def _image(self, ref: str, sha: str, sample_id: str):
        """One image of a sample, decoded, checked against the sha256 the teacher saw."""
        if is_embedded(ref):  # embedded in the data source (common.sources)
            data = self._image_bytes(ref, sample_id)
            if self.check_images and hashlib.sha256(data).hexdigest() != sha:
                raise DataError(sample_id, f"image {ref} of {self.data} differs from the one the teacher saw "
                                "(sha256 mismatch)", "use the original data, or re-dump the teacher")
            return decode_image(data, sample_id, ref, self.decode_version)
        path = Path(self.images_dir) / ref
        if not path.is_file():
            raise DataError(sample_id, f"image '{ref}' not found under {self.images_dir}",
                            "pass --images pointing at the images the cache was dumped from")
        data = path.read_bytes()
        if self.check_images:
            st = path.stat()
            key = (str(path), st.st_size, st.st_mtime_ns)
            got = self._verified.get(key) or hashlib.sha256(data).hexdigest()
            self._verified[key] = got
            if got != sha:
                raise DataError(sample_id, f"image '{ref}' differs from the one the teacher saw "
                                "(sha256 mismatch)", "use the original images, or re-dump the teacher")
        return decode_image(data, sample_id, f"'{ref}'", self.decode_version)


SHUFFLE_WINDOW = 2048  # samples mixed at once by train-student's epoch order (--shuffle-window)


def epoch_order(reader: CacheReader, epoch: int, seed: int, window: int = SHUFFLE_WINDOW) -> list[int]:
    """One epoch's sample order, deterministic given (seed, epoch): a windowed shuffle (the shuffle buffer of tf.data
    and WebDataset, over whole parts). The cache's parts in random order are cut into windows of whole parts holding
    at least ``window`` samples each (the last may hold fewer), and the samples of each window are shuffled
    together. A cache smaller than the window is shuffled as a whole; a larger one is read a window at a time, each
    part once per epoch, so the reader keeps a window's parts (``window_parts``) and never reads one twice.

    ``window`` 0: one part per window, samples shuffled within their part only: the order train-student used before
    shuffle windows (kept, bit for bit, for runs resumed from their checkpoints). Why across parts: a part holds
    consecutive samples of the data file, so a file ordered by kind (concatenated datasets) otherwise reaches the
    student in bursts of one kind each epoch; on the quickstart's data (its 150 long-form samples last) that cost the
    kd student 20-30 points of long-form F1 against TRL's uniform sampler (bench/README.md, "Beside TRL").

    Returns sample indices into ``reader`` (each once). Raises nothing; ``window`` < 0 counts as 0."""
    return [i for w in epoch_windows(reader, epoch, seed, window) for i in w]


def epoch_windows(reader: CacheReader, epoch: int, seed: int, window: int = SHUFFLE_WINDOW) -> list[list[int]]:
    """``epoch_order`` cut at its windows: each window's sample indices in their shuffled order."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    by_part: dict[int, list[int]] = {}
    for i in range(len(reader)):
        by_part.setdefault(reader.part_of(i), []).append(i)
    keys = sorted(by_part)
    windows: list[list[int]] = []
    pool: list[int] = []
    for j in torch.randperm(len(keys), generator=g).tolist():
        pool += by_part[keys[j]]
        if len(pool) >= max(window, 1):
            windows.append([pool[k] for k in torch.randperm(len(pool), generator=g).tolist()])
            pool = []
    if pool:
        windows.append([pool[k] for k in torch.randperm(len(pool), generator=g).tolist()])
    return windows


def window_parts(reader: CacheReader, window: int = SHUFFLE_WINDOW) -> int:
    """The most parts any shuffle window of ``reader`` can span: the fewest parts whose smallest sizes add up to
    ``window`` samples (a window closes as soon as it holds ``window``), at most all of them; 1 for ``window`` 0."""
    sizes = sorted(Counter(reader.part_of(i) for i in range(len(reader))).values())
    total = 0
    for n, size in enumerate(sizes, 1):
        total += size
        if total >= max(window, 1):
            return n
    return max(len(sizes), 1)


MEGA_BATCHES = 50  # batches per length-sorted mega-batch (transformers' group_by_length uses 50 too)


def length_grouped(order: list[int], lengths, batch_size: int, generator: torch.Generator,
                   mega: int = MEGA_BATCHES) -> list[int]:
    """Group samples of similar length into the same batch, as LLaVA's group_by_modality_length and
    transformers' group_by_length do: cut the (shuffled) order into mega-batches of ``mega * batch_size``
    samples, sort each by length (longest first), cut it into batches and shuffle those batches within the
    mega-batch. Deterministic given the generator; the samples of a mega-batch stay the same, so reads keep
    the block shuffle's locality."""
    out: list[int] = []
    size = mega * batch_size
    for m in range(0, len(order), size):
        chunk = sorted(order[m:m + size], key=lambda i: -int(lengths[i]))
        batches = [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
        full = [b for b in batches if len(b) == batch_size]
        ragged = batches[len(full):]
        for j in torch.randperm(len(full), generator=generator).tolist():
            out += full[j]
        for b in ragged:  # a short last batch stays last, where an ungrouped epoch has it too
            out += b
    return out


def padding_fraction(batches: list[list[int]], lengths) -> float:
    """Padded positions / all positions when each batch is padded to its longest sample."""
    real = sum(int(lengths[i]) for b in batches for i in b)
    total = sum(max(int(lengths[i]) for i in b) * len(b) for b in batches if b)
    return 1.0 - real / max(total, 1)


def worker_init(_worker_id: int) -> None:
    """DataLoader workers decode images and slice arrays: one intra-op thread each, no oversubscription."""
    torch.set_num_threads(1)


def batches_of(order: list[int], batch_size: int) -> list[list[int]]:
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def batch_image_inputs(processor, per_sample: list[list]) -> dict:
    """The image inputs of a batch whose samples hold the images ``per_sample`` (a list of PIL images per sample;
    empty: none), from one image-processor call in sample order (the same tensors as per-sample calls), with the
    processor's own call defaults for images (``_merge_kwargs``, as its ``__call__`` passes them: InternVL's
    processor turns ``crop_to_patches`` on whatever its saved image processor says, so a direct call would give one
    tile where the cache's ids hold several). Several images in a sample: grouped per sample, the multi-image mode
    the teacher's processor call had."""
    try:
        kw = processor._merge_kwargs(tokenizer_init_kwargs=processor.tokenizer.init_kwargs)["images_kwargs"]
    except (AttributeError, TypeError):
        kw = {}
    kw = {**kw, "return_tensors": "pt"}
    if any(len(p) > 1 for p in per_sample):
        out = processor.image_processor(images=[p for p in per_sample if p], **kw)
    else:
        out = processor.image_processor(images=[p[0] for p in per_sample if p], **kw)
    # the model's inputs only: the tensors (not the layout the call defaults may ask for beside them, SmolVLM's
    # return_row_col_info rows / cols lists, which only the text expansion reads)
    return {k: v for k, v in dict(out).items() if torch.is_tensor(v)}


class StudentCollator:
    """Pads a batch, runs the student's image processor once over its images, and stacks the
    teacher's tensors in response-token order."""

    def __init__(self, processor, adapter_cls, cross=None):
        tok = processor.tokenizer
        self.processor, self.adapter_cls = processor, adapter_cls
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.cross = cross  # student_train.cross.CrossTokenizer: add the cross-tokenizer keys (xt_*)

    def __call__(self, samples: list[dict]) -> dict:
        batch = collate(samples, self.pad_id, self.adapter_cls)
        per_sample = [x.get("pil_images") or [] for x in samples]
        if any(per_sample):
            batch["image_inputs"] = batch_image_inputs(self.processor, per_sample)
        batch["sample_ids"] = [x["sample_id"] for x in samples]
        for name in ("topk_ids", "topk_logprobs", "tail_logmass", "target_logprob", "tpa_cand_ids", "tpa_ids",
                     "tpa_logprobs", "tpa_tail"):
            if name in samples[0]:
                batch[name] = torch.from_numpy(np.concatenate([x[name] for x in samples]))
        if "tpa_cand_ids" in samples[0]:
            # the TPA rows follow the cache: tpa_pos (per sample, indices into its response tokens) gives
            # their rows among the batch's response tokens and the sequence positions their branches replace
            batch["tpa_cand_list"] = [torch.from_numpy(x["tpa_cand_ids"]) for x in samples]
            sel = [torch.from_numpy(np.asarray(x["tpa_pos"])) for x in samples]
            batch["tpa_rows"], batch["tpa_pos"] = tpa_layout(batch["resp_pos"], sel)
        if "ivak_pos" in samples[0]:  # IVA token-KL rows: the teacher's salient image tokens, as sequence positions
            rows_b, rows_p = [], []
            for b, x in enumerate(samples):
                keys = image_token_positions(batch, b)
                idx = torch.from_numpy(np.asarray(x["ivak_pos"], np.int64))
                rows_b.append(torch.full((len(idx),), b, dtype=torch.long))
                rows_p.append(keys[idx] if len(idx) else idx)
            batch["ivak_b"], batch["ivak_p"] = torch.cat(rows_b), torch.cat(rows_p)
            for name in ("ivak_weight", "ivak_ids", "ivak_logprobs", "ivak_tail"):
                batch[name] = torch.from_numpy(np.concatenate([x[name] for x in samples]))
        if "saliency" in samples[0]:
            rows = [torch.from_numpy(x["saliency"].astype(np.float32)) for x in samples if x["n_image_tokens"] > 0]
            rows = [r for r in rows if r.numel()]
            if rows:
                v = max(r.shape[1] for r in rows)
                g = sum(r.shape[0] for r in rows)
                sal = torch.zeros(g, v)
                valid = torch.zeros(g, v, dtype=torch.bool)
                at = 0
                for r in rows:
                    sal[at:at + r.shape[0], :r.shape[1]] = r
                    valid[at:at + r.shape[0], :r.shape[1]] = True
                    at += r.shape[0]
                batch["teacher_sal"], batch["sal_valid"] = sal, valid
        if self.cross is not None:
            batch = self.cross.collate(batch, samples)
        return batch


TEACHER_KEYS = ("topk_ids", "topk_logprobs", "tail_logmass", "target_logprob", "tpa_cand_ids", "tpa_ids",
                "tpa_logprobs", "tpa_tail", "tpa_rows", "teacher_sal", "sal_valid", "ivak_b", "ivak_p", "ivak_weight",
                "ivak_ids", "ivak_logprobs", "ivak_tail", "xt_pair", "xt_ids", "xt_chunk_s", "xt_chunk_t",
                "xt_target_logprob", "xt_tpa_trows", "xt_logprobs")


def batch_to_device(batch: dict, device) -> dict:
    from alignti.common.batch import to_device
    out = to_device(batch, device)
    moved: dict[int, torch.Tensor] = {}  # one copy of a tensor held under two keys (xt_target_logprob)
    for k in TEACHER_KEYS:
        if k in batch:
            t = batch[k]
            if id(t) not in moved:
                moved[id(t)] = t.to(device, non_blocking=True)
            out[k] = moved[id(t)]
    for k in ("tpa_cand_list", "tpa_pos"):
        if k in batch:
            out[k] = [c.to(device) for c in batch[k]]
    return out


def epoch_sample_order(reader, epoch: int, seed: int, batch_size: int, group_by_length: bool,
                       window: int = SHUFFLE_WINDOW) -> list[int]:
    """A cache's sample order for one epoch: shuffled a window of parts at a time (``epoch_order``), then with
    ``group_by_length`` length-grouped so each batch of ``batch_size`` holds samples of similar token length (less
    padding), within each window (so reads stay in the window's parts: each part read once per epoch by a reader
    that keeps ``window_parts``; ``window`` 0 groups the whole order, as train-student did before shuffle windows).
    A function of (seed, epoch) only, so --resume picks up the same order."""
    if not group_by_length:
        return epoch_order(reader, epoch, seed, window)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 7_919)
    lengths = [r["tok_len"] for r in reader.samples]
    if window <= 0:
        return length_grouped(epoch_order(reader, epoch, seed, window), lengths, batch_size, g)
    return [i for w in epoch_windows(reader, epoch, seed, window) for i in length_grouped(w, lengths, batch_size, g)]
