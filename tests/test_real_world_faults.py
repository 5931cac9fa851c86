"""Real-world data faults (issue #21): images as the family's own processor sees them, placeholders as the text
places them, every per-sample failure named and skippable, resource failures in one line. Each input is built
here; each kind has a sibling that was not in the issue's table."""

import errno
import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageOps
from transformers.image_utils import load_image as hf_load_image

from alignti.common.adapters import LlavaOnevisionAdapter, Qwen2VLAdapter
from alignti.common.cache import CacheReader, committed_parts
from alignti.common.conversation import chat_messages, encode
from alignti.common.errors import DataError, ResourceError
from alignti.common.records import load_json_records, parse_record
from alignti.common.sources import DECODE_VERSION, decode_image
from alignti.demo import kit as demo_kit
from alignti.teacher_dump import dump as dump_mod
from alignti.teacher_dump.dump import DumpConfig, dump_teacher
from alignti.teacher_dump.select_layer import select_layer


# --- images: one decoding, the family processor's -----------------------------------------------------------
def _png(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _alpha_drawing(mode: str) -> Image.Image:
    """A black square drawn only in the alpha channel (the colour channels are black everywhere)."""
    a = np.zeros((32, 32), np.uint8)
    a[8:24, 8:24] = 255
    if mode == "RGBA":
        return Image.fromarray(np.dstack([np.zeros((32, 32, 3), np.uint8), a]), "RGBA")
    return Image.fromarray(np.dstack([np.zeros((32, 32), np.uint8), a]), "LA")


def _palette_with_transparency() -> Image.Image:
    p = Image.new("P", (32, 32), 0)
    p.putpalette([0, 0, 0] + [200, 30, 30] * 255)
    p.paste(1, (8, 8, 24, 24))
    p.info["transparency"] = 0  # palette entry 0 (the background) is transparent
    return p


def _exif(orientation: int) -> bytes:
    img = Image.new("RGB", (64, 32), (20, 160, 20))
    img.paste((200, 20, 20), (0, 0, 16, 32))  # a red band on the left of the stored pixels
    exif = img.getexif()
    exif[0x0112] = orientation
    return _png(img, "JPEG", exif=exif.tobytes(), quality=95)


def _animated() -> bytes:
    frames = [Image.new("RGB", (32, 32), c) for c in ((250, 0, 0), (0, 0, 250))]
    return _png(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


MODES = {
    "rgba_alpha_drawing": lambda: _png(_alpha_drawing("RGBA")),   # row 1
    "la_alpha_drawing": lambda: _png(_alpha_drawing("LA")),
    "palette_transparency": lambda: _png(_palette_with_transparency()),
    "cmyk_jpeg": lambda: _png(Image.new("CMYK", (32, 32), (0, 200, 200, 0)), "JPEG"),
    "exif_6": lambda: _exif(6),                                    # row 2
    "exif_8": lambda: _exif(8),
    "animated_gif": _animated,
    "grey_16bit": lambda: _png(Image.fromarray(np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 40)),
}
TRANSPARENT = {"rgba_alpha_drawing", "la_alpha_drawing", "palette_transparency"}


@pytest.fixture(scope="module")
def processors():
    return {f: demo_kit.build_processor(demo_kit.build_tokenizer(f), f) for f in ("llava", "qwen2_vl")}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_every_image_mode_is_decoded_as_the_familys_processor_sees_it(mode, family, processors, tmp_path):
    """decode_image (dump, evaluate and train all use it) gives the pixel values the family's own image processor
    makes of the file opened as transformers' load_image opens it: upright (exif_transpose) and, for transparency,
    composited on white by the processor's convert_to_rgb (load_image's own convert("RGB") would give the alpha
    drawing's black colour channels: an all-black image)."""
    data = MODES[mode]()
    path = tmp_path / "img"
    path.write_bytes(data)
    ip = processors[family].image_processor
    ours = decode_image(data, "s", "'img'")
    assert ours.mode == "RGB"
    want = ip(images=[ImageOps.exif_transpose(Image.open(path))], return_tensors="pt")["pixel_values"]
    got = ip(images=[ours], return_tensors="pt")["pixel_values"]
    assert torch.equal(got, want)
    if mode not in TRANSPARENT:  # load_image itself agrees where it keeps every pixel
        hf = hf_load_image(str(path))
        assert ours.size == hf.size and np.array_equal(np.asarray(ours), np.asarray(hf))
    else:
        px = np.asarray(ours)
        assert (px[0, 0] == 255).all() and (px[16, 16] < 255).any()  # white background, the drawing visible
    if mode.startswith("exif"):
        assert ours.size == (32, 64)  # stored 64x32, upright 32x64
        red_at = (0, 0) if mode == "exif_6" else (31, 63)  # the stored left band is now on top (6) / bottom (8)
        assert np.asarray(ours)[red_at[1], red_at[0]][0] > 150


def test_the_cache_records_the_image_decoding(cache):
    assert CacheReader(cache).params["image_decode"] == DECODE_VERSION


def test_a_student_reads_an_older_caches_images_as_its_teacher_did(kit, cache, tmp_path, caplog):
    """A cache without image_decode (made before decoding v2): the student's images are decoded as v1 decoded
    them, and the log says so (an RGBA image's black colour channels, as that teacher saw them)."""
    from alignti.student_train.data import CacheDataset
    reader = CacheReader(cache)
    reader.fingerprint = json.loads(json.dumps(reader.fingerprint))
    reader.fingerprint["params"].pop("image_decode")
    ds = CacheDataset(reader, None, str(tmp_path))
    assert ds.decode_version == 1 and "image decoding v1" in caplog.text
    (tmp_path / "a.png").write_bytes(MODES["rgba_alpha_drawing"]())
    ds.check_images = False
    assert np.asarray(ds._image("a.png", "", "s")).max() == 0


# --- placeholders ---------------------------------------------------------------------------------------------
def _conv(q, a="blue", *more):
    turns = [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    for k, v in enumerate(more):
        turns.append({"from": "human" if k % 2 == 0 else "gpt", "value": v})
    return turns


@pytest.mark.parametrize("answer", ["![fig](<image>)", "<image>\nblue", "see <image>"])
def test_image_placeholder_in_an_answer_is_refused_by_name(answer):
    """Row 5: an answer cannot show an image, and "<image>" as answer text is what LLaVA-format tools and the LLaVA
    families' tokenizers read as a placeholder: refused by name (docs/bad-inputs.md row 33), never cut out."""
    for image in ("x.png", None):
        with pytest.raises(DataError, match=r"sample d: assistant turn 1 holds an <image> placeholder.*--skip-bad"):
            parse_record(0, {"id": "d", "image": image, "conversations": _conv("<image>\nWhat?" if image else "What?",
                                                                              answer)})


def test_image_placeholder_in_a_system_turn_is_refused():
    with pytest.raises(DataError, match="system turn 0 holds an <image> placeholder"):
        parse_record(0, {"id": "d", "image": "x.png", "conversations": [
            {"from": "system", "value": "Look: <image>"}, *_conv("What?")]})


@pytest.mark.parametrize("image", ["", None, "missing key", []])
def test_placeholder_without_an_image_is_refused_by_name(image):
    """Row 6 ("" / null / no key) and its sibling (an empty list)."""
    item = {"id": "p", "conversations": _conv("<image>\nWhat colour is it?")}
    if image != "missing key":
        item["image"] = image
    with pytest.raises(DataError, match=r"sample p: 1 <image> placeholder\(s\) without an image.*--skip-bad"):
        parse_record(0, item)


@pytest.mark.parametrize("question", ["", "   ", "\n\t", "<image>\n  "])
def test_question_of_whitespace_only_is_refused_like_an_empty_one(question):
    with pytest.raises(DataError, match="human turn 0 has no question text"):
        parse_record(0, {"id": "w", "image": "x.png", "conversations": _conv(question)})


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_onevision"])
@pytest.mark.parametrize("shape", ["after", "middle", "second_turn", "two_in_two_turns"])
def test_placeholders_decide_where_the_image_goes(family, shape):
    """Where the <image> placeholders stand decides where the image tokens go, in every turn and every family:
    the ids equal the family's processor on the conversation rendered by its chat template with each image where
    its placeholder stood; the spans decode to the question text and the answers."""
    samples = {
        "after": ("x.png", _conv("What colour is the shape?\n<image>")),
        "middle": ("x.png", _conv("What colour is <image> the shape?")),
        "second_turn": ("x.png", _conv("Hello there.", "hi", "<image>\nWhat colour is it?", "blue")),
        "two_in_two_turns": (["x.png", "y.png"], _conv("<image>\nWhat is it?", "a shape", "And this <image>?", "red")),
    }
    image, conv = samples[shape]
    if family == "llava" and isinstance(image, list):
        pytest.skip("LLaVA-1.5 takes one image per sample")
    proc = demo_kit.build_processor(demo_kit.build_tokenizer(family), family)
    tok = proc.tokenizer
    rec = parse_record(0, {"id": "s", "image": image, "conversations": conv})
    imgs = [Image.fromarray(np.full((48, 48, 3), 60 * (k + 1), np.uint8)) for k in range(len(rec.images))]
    img = imgs if isinstance(image, list) else imgs[0]
    enc = encode(proc, rec, img)
    rendered = proc.apply_chat_template(chat_messages(rec), tokenize=False)
    want = proc(text=[rendered], images=[img], return_tensors="pt")["input_ids"][0].tolist()
    assert enc.input_ids.tolist() == want
    image_id = tok.convert_tokens_to_ids(proc.image_token)
    pos = np.nonzero(enc.input_ids == image_id)[0]
    answers = [t for r, t in rec.turns if r == "assistant"]
    for (s, e), answer in zip(enc.resp_spans, answers):
        assert tok.decode(enc.input_ids[s:e].tolist()).startswith(answer)
    for s, e in enc.instr_spans:  # never an image token among the instruction's query positions
        assert not np.isin(np.arange(s, e), pos).any()
    first_answer = enc.resp_spans[0][0]
    if shape == "second_turn":
        assert pos.min() > first_answer  # the image is shown in the turn that holds its placeholder
    if shape == "two_in_two_turns":
        assert pos.min() < first_answer < enc.image_spans[1][0]
    if shape == "after":
        s, e = enc.instr_spans[0]
        assert tok.decode(enc.input_ids[s:e].tolist()).strip() == "What colour is the shape?"
        assert pos.min() > s  # after the question's text (the demo template renders parts in order)


# --- the dump: named, skippable, before teacher time ---------------------------------------------------------
@pytest.fixture(scope="module")
def qwen_kit(tmp_path_factory):
    from alignti.demo.kit import make_demo
    out = tmp_path_factory.mktemp("qwen")
    make_demo(out, n_train=8, n_val=2, n_test=2, train_teacher=False, family="qwen2_vl")
    Image.new("RGB", (2000, 1), (200, 10, 10)).save(out / "data/images/wide.png")
    Image.new("RGB", (1, 300), (200, 10, 10)).save(out / "data/images/tall.png")
    Image.new("RGB", (96, 48), (10, 10, 200)).save(out / "data/images/w96.png")
    return out


def _qwen_data(qwen_kit, path, edit):
    recs = json.loads((qwen_kit / "data/train.json").read_text())[:6]
    for r in recs:
        r.pop("meta", None)
        r.pop("scene", None)
    edit(recs)
    path.write_text(json.dumps(recs))
    return recs


def _qcfg(qwen_kit, data, out, **kw):
    kw.setdefault("saliency_layer", "1")
    return DumpConfig(teacher=str(qwen_kit / "teacher"), data=str(data), images=str(qwen_kit / "data/images"),
                      out=str(out), irs_samples=8, progress=False, **kw)


@pytest.mark.parametrize("image, size", [("wide.png", "2000x1"), ("tall.png", "1x300")])
def test_qwen_image_of_extreme_aspect_ratio_is_named_before_teacher_time(qwen_kit, tmp_path, image, size,
                                                                         monkeypatch):
    """Row 3 (2000x1) and its sibling (1x300, the other orientation): the sample named with its size and the
    processor's limit, before the teacher is loaded; --skip-bad skips it and dumps the rest."""
    recs = _qwen_data(qwen_kit, tmp_path / "d.json", lambda rs: rs[2].update(image=image))
    real_load = dump_mod.load_model
    monkeypatch.setattr(dump_mod, "load_model", lambda *a, **k: pytest.fail("teacher loaded"))
    with pytest.raises(DataError, match=rf"sample {recs[2]['id']}: .*'{image}' is {size} pixels.*smaller than 200"):
        dump_teacher(_qcfg(qwen_kit, tmp_path / "d.json", tmp_path / "c"))
    assert not (tmp_path / "c").exists()
    monkeypatch.setattr(dump_mod, "load_model", real_load)
    m = dump_teacher(_qcfg(qwen_kit, tmp_path / "d.json", tmp_path / "c", skip_bad=True))
    assert m["counts"]["ok"] == 5 and m["counts"]["skipped"] == 1
    rows = pq.read_table(tmp_path / "c/parts/00000.parquet").to_pylist()
    assert size in next(r["error"] for r in rows if r["status"] == "skipped")


def test_qwen_irs_over_images_of_two_sizes(qwen_kit, tmp_path):
    """Row 4: the default dump (IRS layer selection) over 48x48 and 96x48 images (9 and 8 image tokens)."""
    _qwen_data(qwen_kit, tmp_path / "d.json", lambda rs: [rs[i].update(image="w96.png") for i in (1, 3)])
    m = dump_teacher(_qcfg(qwen_kit, tmp_path / "d.json", tmp_path / "c", saliency_layer="auto"))
    assert m["counts"]["ok"] == 6 and m["irs"]["pairs"] > 0
    lens = {CacheReader(tmp_path / "c")[i]["n_image_tokens"] for i in range(6)}
    assert lens == {8, 9}


def test_irs_with_no_pair_of_the_same_grid_says_what_to_do(qwen_kit, tmp_path):
    """Sibling of row 4: two samples, two images of different grids, no shared image: a clear error naming
    --saliency-layer, not a stack of maps of different lengths."""
    from alignti.common.models import load_vlm
    model, proc = load_vlm(str(qwen_kit / "teacher"), torch.device("cpu"))
    recs = [parse_record(i, {"id": f"s{i}", "image": im, "conversations": _conv("<image>\nWhat is it?")})
            for i, im in enumerate(["train_00000.png", "w96.png"])]
    with pytest.raises(ValueError, match="no two calibration samples with images of the same grid.*--saliency-layer"):
        select_layer(model, proc, recs, str(qwen_kit / "data/images"), progress=False)


def test_irs_calibration_never_holds_a_lone_sample_and_names_the_unpaired(qwen_kit, tmp_path, caplog):
    """Sibling of row 4: the calibration subset is never cut inside an image's group so as to leave one sample of
    it (that sample would be in no pair), and a sample in no compared pair is named, not dropped silently."""
    from alignti.common.models import load_vlm
    from alignti.teacher_dump.select_layer import calibration_subset
    recs = [parse_record(i, {"id": f"s{i}", "image": f"im{i // 3}.png", "conversations": _conv(f"<image>\nQ{i}?")})
            for i in range(9)]  # three images, three questions each
    for n in range(2, 10):
        sub = calibration_subset(recs, n)
        per_image = {}
        for r in sub:
            per_image[r.image] = per_image.get(r.image, 0) + 1
        assert len(sub) <= n and all(c >= 2 for c in per_image.values()), (n, per_image)
    model, proc = load_vlm(str(qwen_kit / "teacher"), torch.device("cpu"))
    recs = [parse_record(i, {"id": f"s{i}", "image": im, "conversations": _conv(q)})
            for i, (im, q) in enumerate([("train_00000.png", "<image>\nWhat is it?"),
                                         ("train_00000.png", "<image>\nWhat colour is it?"),
                                         ("w96.png", "<image>\nWhat is it?"), ("w96.png", "<image>\nWhat is it?")])]
    with caplog.at_level("WARNING", logger="alignti.irs"):
        irs = select_layer(model, proc, recs, str(qwen_kit / "data/images"), progress=False)
    assert irs["pairs"] == 1 and irs["samples"] == 2
    assert any("2 of 4 calibration samples are in no compared pair" in m and "s2, s3" in m for m in caplog.messages)


MEDIA = r"holds the qwen2_vl family's special token"
LITERAL = r"holds the tokenizer's special token"


@pytest.mark.parametrize("turn, token, said", [(0, "<|image_pad|>", MEDIA), (1, "<|vision_start|>", MEDIA),
                                               (0, "<|video_pad|>", MEDIA), (1, "<|vision_end|>", MEDIA),
                                               (1, "<|im_end|>", LITERAL), (0, "<|im_start|>", LITERAL)])
def test_special_tokens_typed_in_a_message_are_named_before_teacher_time(qwen_kit, tmp_path, turn, token, said,
                                                                         monkeypatch):
    """Row 7 (<|image_pad|> in a question, <|vision_start|> in an answer) and siblings (<|video_pad|>,
    <|vision_end|>), and the text tokenizer's own special tokens (an end of turn in an answer, a role marker in a
    question): named with the turn and the token before the teacher loads; --skip-bad skips the sample."""
    recs = _qwen_data(qwen_kit, tmp_path / "d.json",
                      lambda rs: rs[4]["conversations"][turn].update(value=rs[4]["conversations"][turn]["value"] +
                                                                      f" {token} more"))
    real_load = dump_mod.load_model
    monkeypatch.setattr(dump_mod, "load_model", lambda *a, **k: pytest.fail("teacher loaded"))
    with pytest.raises(DataError, match=rf"sample {recs[4]['id']}: .*turn {turn} {said} "
                       rf"'{token}'".replace("|", r"\|")):
        dump_teacher(_qcfg(qwen_kit, tmp_path / "d.json", tmp_path / "c"))
    monkeypatch.setattr(dump_mod, "load_model", real_load)
    m = dump_teacher(_qcfg(qwen_kit, tmp_path / "d.json", tmp_path / "c", skip_bad=True))
    assert m["counts"]["ok"] == 5 and m["counts"]["skipped"] == 1


def test_every_familys_media_tokens_are_refused():
    """The same for LLaVA-OneVision's <video> (and its <image> typed where no placeholder can be: the encoder
    counts image tokens), through the adapter interface; the encoder's own check catches a literal image token in
    a text-only sample of any family."""
    tok = demo_kit.build_tokenizer("llava_onevision")
    cfg = demo_kit.build_model("llava_onevision", tok, demo_kit.STUDENT, 0).config
    with pytest.raises(DataError, match="llava_onevision family's special token '<video>'"):
        LlavaOnevisionAdapter.check_text(cfg, tok, "v", [("user", "a <video> here"), ("assistant", "ok")])
    qtok = demo_kit.build_tokenizer("qwen2_vl")
    proc = demo_kit.build_processor(qtok, "qwen2_vl")
    rec = parse_record(0, {"id": "t", "conversations": _conv("text only <|image_pad|> here")})
    with pytest.raises(DataError, match=r"sample t: its rendered text holds 1 image token"):
        encode(proc, rec, None)
    assert "<|vision_start|>" in Qwen2VLAdapter.media_tokens(
        demo_kit.build_model("qwen2_vl", qtok, demo_kit.STUDENT, 0).config, qtok)


def test_undecodable_image_is_named_and_skippable(kit, tmp_path):
    """Sibling of row 3 for the image decoder: a PNG cut short is named (not a PIL traceback) and skipped."""
    recs = json.loads((kit / "data/train.json").read_text())[:6]
    images = tmp_path / "images"
    images.mkdir()
    for r in recs:
        (images / r["image"]).write_bytes((kit / "data/images" / r["image"]).read_bytes())
    data = (images / recs[3]["image"]).read_bytes()
    (images / "cut.png").write_bytes(data[:len(data) // 2])
    recs[3]["image"] = "cut.png"
    (tmp_path / "d.json").write_text(json.dumps(recs))
    cfg = dict(teacher=str(kit / "teacher"), data=str(tmp_path / "d.json"), images=str(images), saliency_layer="1",
               top_k=8, tpa_branches=2, progress=False)
    with pytest.raises(DataError, match=rf"sample {recs[3]['id']}: image 'cut.png' cannot be decoded"):
        dump_teacher(DumpConfig(out=str(tmp_path / "c"), **cfg))
    m = dump_teacher(DumpConfig(out=str(tmp_path / "c2"), skip_bad=True, **cfg))
    assert m["counts"]["skipped"] == 1


def test_a_sample_the_model_fails_on_is_named_and_the_rest_batched_as_if_skipped(kit, tmp_path, monkeypatch):
    """An exception from the teacher model for one sample (as get_rope_index's TypeError was) becomes a DataError
    naming it; with --skip-bad the unit's other samples are batched as if it had been skipped before: their
    arrays equal those of a dump where the pre-flight skipped it."""
    recs = json.loads((kit / "data/train.json").read_text())[:8]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    bad_id = recs[5]["id"]
    real_collate, real_batch = dump_mod.collate, dump_mod.teacher_batch

    def collate(samples, *a):
        return dict(real_collate(samples, *a), _ids=[x["sample_id"] for x in samples])

    def teacher_batch(adapter, batch, params):
        if bad_id in batch["_ids"]:
            raise TypeError("'NoneType' object is not subscriptable")
        return real_batch(adapter, batch, params)

    monkeypatch.setattr(dump_mod, "collate", collate)
    monkeypatch.setattr(dump_mod, "teacher_batch", teacher_batch)
    cfg = dict(teacher=str(kit / "teacher"), images=str(kit / "data/images"), saliency_layer="1", top_k=8,
               tpa_branches=2, progress=False, batch_size=4)
    with pytest.raises(DataError, match=rf"sample {bad_id}: the teacher model fails on it \(TypeError"):
        dump_teacher(DumpConfig(data=str(tmp_path / "d.json"), out=str(tmp_path / "c"), **cfg))
    dump_teacher(DumpConfig(data=str(tmp_path / "d.json"), out=str(tmp_path / "c2"), skip_bad=True, **cfg))
    monkeypatch.undo()
    recs[5]["image"] = "missing.png"
    (tmp_path / "e.json").write_text(json.dumps(recs))
    dump_teacher(DumpConfig(data=str(tmp_path / "e.json"), out=str(tmp_path / "c3"), skip_bad=True, **cfg))
    a, b = CacheReader(tmp_path / "c2"), CacheReader(tmp_path / "c3")
    assert len(a) == len(b) == 7
    for name, x in a.part_arrays(0).items():
        assert np.array_equal(x, b.part_arrays(0)[name]), name


# --- files and resources ---------------------------------------------------------------------------------------
def test_json_list_with_a_utf8_bom_reads_as_the_list_it_is(tmp_path):
    """Row 8, and its sibling: JSONL with a BOM."""
    items = [{"id": f"b{i}", "image": "x.png", "conversations": _conv("<image>\nWhat?")} for i in range(3)]
    (tmp_path / "d.json").write_text(json.dumps(items), encoding="utf-8-sig")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in items), encoding="utf-8-sig")
    for name in ("d.json", "d.jsonl"):
        recs = load_json_records(tmp_path / name)
        assert [r.sample_id for r in recs] == ["b0", "b1", "b2"], [getattr(r, "error", "") for r in recs]


@pytest.mark.parametrize("err, match", [
    (errno.ENOSPC, r"no space left on the device holding the cache .*c \(No space left on device\): it needs about [0-9.]+ "
                   r"[KMG]iB more free space "
                   r".*re-run the same command to resume"),
    (errno.EACCES, r"cannot write the cache .*c: Permission denied.*re-run the same command to resume")])
def test_disk_full_or_no_permission_mid_dump_is_one_line_and_the_rerun_resumes(kit, tmp_path, monkeypatch, err,
                                                                               match):
    """Row 9 (disk full in the middle of a dump) and its sibling (permission): one line naming the cache folder
    (and, when full, the free space needed), no traceback through the CLI; the re-run resumes and the cache is
    bit for bit the uninterrupted one."""
    from alignti.common import cache as cache_mod
    recs = json.loads((kit / "data/train.json").read_text())[:12]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    cfg = dict(teacher=str(kit / "teacher"), data=str(tmp_path / "d.json"), images=str(kit / "data/images"),
               saliency_layer="1", top_k=8, tpa_branches=2, progress=False, unit_size=4)
    real = cache_mod.PartWriter.commit

    def commit(self):
        if self.index == 1:  # the second work unit: the disk fills (or turns read-only) while writing it
            (self.root / "parts").mkdir(exist_ok=True)
            raise OSError(err, os.strerror(err), str(self.root / "parts" / "00001.zarr"))
        return real(self)

    monkeypatch.setattr(cache_mod.PartWriter, "commit", commit)
    with pytest.raises(ResourceError, match=match) as e:
        dump_teacher(DumpConfig(out=str(tmp_path / "c"), **cfg))
    assert "\n" not in str(e.value)
    done = committed_parts(tmp_path / "c")
    assert 0 in done and 1 not in done  # (the writer thread may have committed unit 2 as well)
    monkeypatch.undo()
    dump_teacher(DumpConfig(out=str(tmp_path / "c"), **cfg))
    dump_teacher(DumpConfig(out=str(tmp_path / "ref"), **cfg))
    a, b = CacheReader(tmp_path / "c"), CacheReader(tmp_path / "ref")
    assert a.table.to_pylist() == b.table.to_pylist()
    assert a.manifest["files"] == {k: v for k, v in b.manifest["files"].items()}


def test_out_of_memory_is_one_line(kit, tmp_path, monkeypatch):
    recs = json.loads((kit / "data/train.json").read_text())[:4]
    (tmp_path / "d.json").write_text(json.dumps(recs))

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(dump_mod, "teacher_batch", oom)
    with pytest.raises(ResourceError, match=r"out of memory on cpu .* batches of 8 samples.*lower --batch-size"):
        dump_teacher(DumpConfig(teacher=str(kit / "teacher"), data=str(tmp_path / "d.json"),
                                images=str(kit / "data/images"), out=str(tmp_path / "c"), saliency_layer="1",
                                top_k=8, tpa_branches=2, progress=False))


def test_several_bad_samples_are_listed_once_each(kit, tmp_path):
    """Pre-flight refusals of several samples at once (dump and rollout): one message with the count, each sample's
    own message once (its id not repeated in front of the list), nothing written."""
    from alignti.student_rollout.rollout import RolloutConfig, rollout
    recs = json.loads((kit / "data/train.json").read_text())[:6]
    for i in (1, 4):
        recs[i]["image"] = f"gone{i}.png"
    (tmp_path / "d.json").write_text(json.dumps(recs))
    with pytest.raises(DataError) as e:
        dump_teacher(DumpConfig(teacher=str(kit / "teacher"), data=str(tmp_path / "d.json"),
                                images=str(kit / "data/images"), out=str(tmp_path / "c"), progress=False))
    msg = str(e.value)
    assert msg.startswith("2 bad sample(s) found before dumping, nothing was written: ")
    assert [msg.count(f"sample {recs[i]['id']}:") for i in (1, 4)] == [1, 1] and e.value.sample == recs[1]["id"]
    assert not (tmp_path / "c").exists()
    for i in (1, 4):  # the rollout's pre-flight is the records' own (images are read per work unit)
        recs[i]["image"], recs[i]["conversations"] = f"train_{i:05d}.png", []
    (tmp_path / "d.json").write_text(json.dumps(recs))
    with pytest.raises(DataError) as e:
        rollout(RolloutConfig(student=str(kit / "student"), data=str(tmp_path / "d.json"),
                              images=str(kit / "data/images"), out=str(tmp_path / "r"), progress=False))
    assert str(e.value).startswith("2 bad sample(s) found before generating")
    assert [str(e.value).count(f"sample {recs[i]['id']}:") for i in (1, 4)] == [1, 1]
