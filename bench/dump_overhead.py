"""dump-teacher wall time vs the same teacher's plain forward over the same batches.

Plain forward = the HF model's own forward (sdpa, full logits) over pre-encoded batches, the dump's own batches
(each ``--unit-size`` work unit's samples length-sorted, as dump-teacher's ``length_sorted_batches``): no top-k,
no saliency, no writing. dump-teacher is timed from its first batch to its last committed part
(model load and IRS excluded, encoding of the data included). Goal: <= 1.10x.

Each dump runs once per ``--logprob-dtype`` (default: packed, then float16) at ``--top-k`` (default: the dump's
default, 64): the ratio packed / float16 of the dump's wall time says what the packed encoding costs, and the
writer thread's busy seconds (results to host, the codecs, compression, commit; it runs beside the teacher's
forward loop) say whether it stays off the critical path (writer busy < dump wall time: it does).
``--repeats N`` (default 1): N rounds, each running every arm (the plain forward, then each dump) once in turn; each
arm's fastest round is reported. On a shared, loaded machine one pass's timings move by tens of percent (and single
arms by several times) between arms run minutes apart; interleaved rounds put the arms under the same conditions.
Run: python bench/dump_overhead.py [--device cuda] [--logprob-dtype packed,float16] [--top-k 64] [--family F]
     [--repeats 3]

``--family`` (default llava): the demo kit's family (a registry model type with a kit); the big teacher is that
family's recipe with the larger LM. The plain forward gets the image-token type ids the family's processor returns
(``ModelAdapter.generation_inputs``: Qwen-VL's ``mm_token_type_ids``, Gemma 3's ``token_type_ids``).

``--real-shapes`` (any family but llava): the family's image geometry at a real image-token count instead of the kit's
9-45 tokens per 48-px scene: ``--image-tokens N`` (a square, e.g. 256) sets, the family's own way (``real_geometry``),
the vision patch, merge / pooling / pixel-shuffle factors, tiles or sub-image grid, and the processor settings, and
the scenes are written upscaled (nearest) to the image side that yields about N LM image tokens; the vision tower
stays the kit's (2 layers, width 32-64), the LM is ``--hidden`` x ``--layers``, its vocabulary the kit tokenizer's.
``--text realistic`` (with ``--real-shapes``, the default there): each sample's prompt and answer lengths drawn from
the realistic mix of bench/scale.py (prompts of 20-200 text tokens; answers of 20-60 tokens for 60% of the samples,
150-400 for the rest), the words from the demo corpus; ``--text demo`` keeps the kit's questions (1-4-token
answers). ``--arms real``: plain forward, the dump without TPA (top-k + rest + saliency + target log-prob) and the
dump with TPA (B = 4) at ``--tpa-positions`` of the response positions (default 0.25), as bench/scale.py's dump
section; ``--arms kit`` (the default): top-k only, + saliency, + saliency + TPA at every position.
``ROUNDS`` lines: each arm's time over the plain forward of its own round, median and range (where the machine's
speed drifts between rounds, a paired ratio is steadier than fastest against fastest).
``--tpa-positions 0`` leaves the TPA arms out. ``--encode-workers 0,1``: each dump arm once per value, in the same
rounds (an interleaved A/B of dump-teacher's encoding in its loop against a worker process).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _util import IMAGE_TOKENS_HELP, demo_kit, device_name, patch_for, sync, table

import torch  # noqa: E402

from alignti.common.adapters import adapter_class  # noqa: E402
from alignti.common.conversation import encode  # noqa: E402
from alignti.common.records import Record  # noqa: E402
from alignti.common.sources import load_image, load_records  # noqa: E402
import alignti.teacher_dump.dump as dump_module  # noqa: E402
from alignti.teacher_dump.dump import DumpConfig, dump_teacher  # noqa: E402


def real_geometry(family: str, image_tokens: int) -> dict:
    """The family's image geometry at about ``image_tokens`` LM image tokens per image (a square count: t = its
    root tokens per side), each family's own way, with the released checkpoints' patch sizes; where the released
    merge / pooling factor would multiply the vision tower's patches (its attention is quadratic in them), a smaller
    factor of the same code path is used, so the LM sees the real token count from a cheap tower:

    - qwen3_vl, qwen3_vl_moe: 16-px patches merged 2x2 (as released), the image t * 32 px square (min = max pixels);
    - llava_onevision1_5: RICE's 14-px patches merged 2x2 (as released), one-frame patches, t * 28 px;
    - gemma3: SigLIP 14-px patches average-pooled 2x2 (released: 896 px pooled 4x4) into ``mm_tokens_per_image``
      = t^2 soft tokens, t * 28 px;
    - gemma4: 16-px patches pooled 2x2 (released: 3x3), ``max_soft_tokens`` the smallest supported budget >= t^2
      (released default 280), the image resized by the family's own budget rule (t * 32 px);
    - internvl: InternViT 14-px patches pixel-shuffled at 0.5 (as released) into t^2 tokens per t * 28-px tile,
      dynamic tiling 1-12 tiles as released (a square image of one tile's size: one tile, no thumbnail);
    - smolvlm, idefics3: 256-px sub-images in 16-px patches pixel-shuffled by 2 (released SmolVLM: 512 px by 4):
      64 tokens per sub-image as released, an image of g x g sub-images, g = round(sqrt(t^2 / 64)), plus the global
      image ((g^2 + 1) * 64 tokens and the row/column markup);
    - mistral3: Pixtral 14-px patches merged 2x2 (Mistral-Small-3.1's), t * 28 px: t rows of t [IMG], each closed
      by [IMG_BREAK] / [IMG_END].

    Returns {"side": image side in px, "vision": vision-config overrides, "top": top-level config overrides,
    "text": text-config overrides, "processor": f(tokenizer) -> the family's processor}. Raises SystemExit for a
    non-square count or a family without a geometry here."""
    t = round(image_tokens ** 0.5)
    if t * t != image_tokens:
        raise SystemExit(f"--image-tokens must be a square with --real-shapes (e.g. 256, 576), got {image_tokens}")
    import transformers
    from alignti.common import kit_recipes as kr
    from alignti.common.models import image_only_processor_class, processor_class
    text = dict(max_position_embeddings=8192)
    if family in ("qwen3_vl", "qwen3_vl_moe", "llava_onevision1_5"):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        ov = family == "llava_onevision1_5"
        patch, temporal = (14, 1) if ov else (16, 2)
        side = t * patch * 2

        def proc(tok):
            ip = Qwen2VLImageProcessorPil(min_pixels=side * side, max_pixels=side * side, patch_size=patch,
                                          merge_size=2, temporal_patch_size=temporal)
            if ov:
                from transformers.models.exaone4_5.processing_exaone4_5 import Exaone4_5_Processor
                return image_only_processor_class(Exaone4_5_Processor)(image_processor=ip, tokenizer=tok,
                                                                       chat_template=kr.QWEN_CHAT_TEMPLATE)
            return image_only_processor_class(transformers.Qwen3VLProcessor)(image_processor=ip, tokenizer=tok,
                                                                             chat_template=kr.QWEN_CHAT_TEMPLATE)
        vision = dict(patch_size=patch) if ov else dict(patch_size=patch, num_position_embeddings=(side // patch) ** 2)
        return dict(side=side, vision=vision, top={}, text=text, processor=proc)
    if family == "gemma3":
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
        side = t * 28

        def proc(tok):
            ip = Gemma3ImageProcessorPil(size={"height": side, "width": side}, do_pan_and_scan=False)
            return transformers.Gemma3Processor(image_processor=ip, tokenizer=tok, chat_template=kr.GEMMA_CHAT_TEMPLATE,
                                                image_seq_length=image_tokens)
        return dict(side=side, vision=dict(image_size=side, patch_size=14), top=dict(mm_tokens_per_image=image_tokens),
                    text=dict(text, sliding_window=512), processor=proc)
    if family == "gemma4":
        from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
        from transformers.models.gemma4.image_processing_pil_gemma4 import (_SUPPORTED_SOFT_TOKENS,
                                                                            Gemma4ImageProcessorPil)
        budget = min([b for b in _SUPPORTED_SOFT_TOKENS if b >= image_tokens] or [max(_SUPPORTED_SOFT_TOKENS)])
        side = t * 32

        def proc(tok):
            ip = Gemma4ImageProcessorPil(patch_size=16, pooling_kernel_size=2, max_soft_tokens=budget)
            return image_only_processor_class(transformers.Gemma4Processor)(
                feature_extractor=Gemma4AudioFeatureExtractor(), image_processor=ip, tokenizer=tok,
                chat_template=kr.GEMMA4_CHAT_TEMPLATE, image_seq_length=budget)
        return dict(side=side, vision=dict(patch_size=16, pooling_kernel_size=2, position_embedding_size=1024),
                    top={}, text=dict(text, sliding_window=512), processor=proc)
    if family == "internvl":
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
        side = t * 28

        def proc(tok):
            ip = GotOcr2ImageProcessorPil(size={"height": side, "width": side}, crop_to_patches=True, min_patches=1,
                                          max_patches=12, image_mean=[0.485, 0.456, 0.406],
                                          image_std=[0.229, 0.224, 0.225])
            return image_only_processor_class(transformers.InternVLProcessor)(
                image_processor=ip, tokenizer=tok, chat_template=kr.INTERNVL_CHAT_TEMPLATE,
                image_seq_length=image_tokens)
        return dict(side=side, vision=dict(image_size=[side, side], patch_size=[14, 14]),
                    top=dict(image_seq_length=image_tokens), text=text, processor=proc)
    if family in ("smolvlm", "idefics3"):
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
        sub, grid = 256, max(1, round((image_tokens / 64) ** 0.5))
        side = grid * sub

        def proc(tok):
            cls = Idefics3ImageProcessorPil if family == "idefics3" else SmolVLMImageProcessorPil
            ip = cls(size={"longest_edge": side}, max_image_size={"longest_edge": sub}, do_image_splitting=True)
            pcls = (transformers.Idefics3Processor if family == "idefics3"
                    else image_only_processor_class(transformers.SmolVLMProcessor))
            return pcls(image_processor=ip, tokenizer=tok, chat_template=kr.SMOLVLM_CHAT_TEMPLATE, image_seq_len=64)
        return dict(side=side, vision=dict(image_size=sub, patch_size=16), top=dict(scale_factor=2), text=text,
                    processor=proc)
    if family == "mistral3":
        from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil
        side = t * 28

        def proc(tok):
            ip = PixtralImageProcessorPil(size={"longest_edge": side}, patch_size={"height": 14, "width": 14})
            return processor_class("PixtralProcessor")(image_processor=ip, tokenizer=tok, patch_size=14,
                                                       spatial_merge_size=2, chat_template=kr.MISTRAL_CHAT_TEMPLATE,
                                                       image_token="[IMG]", image_break_token="[IMG_BREAK]",
                                                       image_end_token="[IMG_END]")
        return dict(side=side, vision=dict(image_size=side, patch_size=14), top={}, text=text, processor=proc)
    raise SystemExit(f"--real-shapes has no geometry for family '{family}'")


def big_teacher(kit: Path, out: Path, hidden: int, layers: int, patch: int, family: str = "llava",
                geometry: dict | None = None) -> Path:
    """The demo teacher's family and processor with a larger language model (realistic forward cost);
    ``geometry`` (``real_geometry``): its vision and processor settings instead of the kit's."""
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForImageTextToText

    from alignti.common.models import load_processor
    from alignti.common.saving import save_processor
    from alignti.demo.kit import build_model, recipe
    proc = load_processor(str(kit / "teacher"))  # image-only: the video half of some needs torchvision
    text = dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=8,
                num_key_value_heads=8)
    if geometry is None:
        model = build_model(family, proc.tokenizer, text, 0, patch if family == "llava" else None)
    else:
        from alignti.demo.shapes import IMAGE_SIZE
        cfg = recipe(family).config(proc.tokenizer, text, IMAGE_SIZE)
        for sub, over in ((cfg.vision_config, geometry["vision"]), (cfg.text_config, geometry["text"]),
                          (cfg, geometry["top"])):
            for k, v in over.items():
                setattr(sub, k, v)
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(cfg)
        model.generation_config.eos_token_id = cfg.text_config.eos_token_id
        model.generation_config.pad_token_id = proc.tokenizer.pad_token_id
        proc = geometry["processor"](proc.tokenizer)
    model.save_pretrained(out)
    save_processor(proc, out)
    return out


def realistic_data(kit: Path, tokenizer, n: int, side: int, out: Path, seed: int = 0) -> tuple[Path, Path]:
    """``n`` one-turn samples on the kit's train scenes, each image written upscaled (nearest) to ``side`` px, the
    prompt and answer lengths (in ``tokenizer`` tokens, within a word) bench/scale.py's realistic mix, their words
    drawn from the demo corpus. Returns (data JSON, images folder)."""
    import json
    import random

    from PIL import Image
    from scale import realistic_lengths

    from alignti.demo.shapes import corpus
    out.mkdir(parents=True, exist_ok=True)
    images = out / f"images-{side}"
    images.mkdir(exist_ok=True)
    rng = random.Random(seed)
    words = " ".join(corpus()).split()

    def text(n_tokens: int) -> str:
        w = []
        while len(tokenizer(" ".join(w))["input_ids"]) < n_tokens:
            w.append(rng.choice(words))
        return " ".join(w)

    src = json.loads((kit / "data" / "train.json").read_text())
    recs = []
    for i, (p, r) in enumerate(realistic_lengths(n, seed)):
        name = src[i % len(src)]["image"]
        if not (images / name).exists():
            Image.open(kit / "data" / "images" / name).convert("RGB").resize((side, side), Image.NEAREST).save(
                images / name)
        recs.append({"id": f"real-{i:05d}", "image": name,
                     "conversations": [{"from": "human", "value": "<image>\n" + text(p)},
                                       {"from": "gpt", "value": text(r)}]})
    path = out / f"real-{n}-{seed}.json"
    path.write_text(json.dumps(recs))
    return path, images


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "alignti-bench"))
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--image-tokens", type=int, default=576, help=IMAGE_TOKENS_HELP)
    ap.add_argument("--logprob-dtype", default="packed,float16",
                    help="Comma-separated encodings, each dump run once per encoding (packed, float16, uint8).")
    ap.add_argument("--top-k", type=int, default=None, help="Top-k per response token (default: the dump's, 64).")
    ap.add_argument("--family", default="llava", help="The demo kit's family (a registry model type with a kit).")
    ap.add_argument("--repeats", type=int, default=1, help="Rounds of every arm in turn; each arm's fastest is reported.")
    ap.add_argument("--unit-size", type=int, default=256,
                    help="dump-teacher's work unit (samples): below --samples, the next unit's encoding and the last "
                         "unit's write overlap the teacher's forward as in a long dump (the default is the dump's)")
    ap.add_argument("--real-shapes", action="store_true",
                    help="The family's image geometry at --image-tokens (real_geometry), not the kit's 48-px one.")
    ap.add_argument("--text", choices=("demo", "realistic"), default=None,
                    help="Prompt/answer lengths: the kit's questions, or bench/scale.py's realistic mix "
                         "(default: realistic with --real-shapes, else demo).")
    ap.add_argument("--arms", choices=("kit", "real"), default="kit",
                    help="kit: top-k only, + saliency, + saliency + TPA at every position; real: the dump without "
                         "TPA (top-k, saliency) and with TPA at --tpa-positions.")
    ap.add_argument("--encode-workers", default=None,
                    help="dump-teacher --encode-workers; comma-separated values (e.g. 0,1) run each dump arm once per "
                         "value in the same rounds, an interleaved A/B (default: the dump's own default).")
    ap.add_argument("--tpa-positions", type=float, default=0.25,
                    help="TPA's share of response positions (--arms real); 0 leaves the TPA arms out.")
    a = ap.parse_args()
    encodings = [e.strip() for e in a.logprob_dtype.split(",") if e.strip()]
    worker_counts = ([None] if a.encode_workers is None
                     else [int(w) for w in str(a.encode_workers).split(",") if w.strip()])
    device = torch.device(a.device)
    work = Path(a.workdir)
    text_mode = a.text or ("realistic" if a.real_shapes else "demo")
    geometry = None
    if a.family == "llava":
        if a.real_shapes:
            raise SystemExit("--real-shapes is for the other families: llava's geometry is --image-tokens already")
        kit = demo_kit(work / f"kit-{a.image_tokens}", train_teacher=False, image_tokens=a.image_tokens)
    else:  # the family's kit (its own image geometry: 9-45 image tokens per 48-px scene unless --real-shapes)
        kit = work / f"kit-{a.family}"
        if not (kit / "teacher" / "config.json").exists():
            from alignti.demo.kit import make_demo
            make_demo(kit, n_train=100, n_val=20, n_test=20, train_teacher=False, family=a.family)
        if a.real_shapes:
            geometry = real_geometry(a.family, a.image_tokens)
    tag = f"{a.family}-{a.hidden}x{a.layers}-{a.image_tokens}" + ("-real" if a.real_shapes else "")
    teacher = big_teacher(kit, work / f"teacher-{tag}", a.hidden, a.layers, patch_for(a.image_tokens)
                          if a.family == "llava" else 16, a.family, geometry)
    data, images = kit / "data" / "train.json", kit / "data" / "images"
    if text_mode == "realistic":
        from alignti.common.models import load_processor
        data, images = realistic_data(kit, load_processor(str(teacher)).tokenizer, a.samples,
                                      geometry["side"] if geometry else 48, work / f"data-{tag}")

    from alignti.common.models import load_vlm
    model, proc = load_vlm(str(teacher), device)
    recs = [r for r in load_records(data) if isinstance(r, Record)][:a.samples]
    t0 = time.perf_counter()
    enc = [encode(proc, r, *load_image(r, images)) for r in recs]
    t_encode = time.perf_counter() - t0
    enc_samples, model_config = enc, model.config
    resp_tokens = [int(e.response_mask.sum()) for e in enc]
    pad = proc.tokenizer.pad_token_id
    batches = []
    chunks = []  # the dump's batches: each work unit's samples length-sorted (_teacher_unit), then cut into batches
    for u in range(0, len(enc), a.unit_size):
        unit = sorted(enc[u:u + a.unit_size], key=lambda x: -len(x.input_ids))
        chunks += [unit[i:i + a.batch_size] for i in range(0, len(unit), a.batch_size)]
    for chunk in chunks:
        s = max(len(e.input_ids) for e in chunk)
        ids = torch.full((len(chunk), s), pad, dtype=torch.long)
        att = torch.zeros(len(chunk), s, dtype=torch.long)
        for b, e in enumerate(chunk):
            ids[b, :len(e.input_ids)] = torch.as_tensor(e.input_ids)
            att[b, :len(e.input_ids)] = 1
        adapter = adapter_class(model.config.model_type)
        img = adapter.generation_inputs(ids, adapter.collate_image_inputs([e.image_inputs for e in chunk]),
                                        int(model.config.image_token_id))
        batches.append((ids.to(device), att.to(device), {k: v.to(device) for k, v in img.items()}))

    @torch.no_grad()
    def plain():
        for ids, att, img in batches:
            model(input_ids=ids, attention_mask=att, **img)

    def timed_plain() -> float:
        sync(device)
        t0 = time.perf_counter()
        plain()
        sync(device)
        return time.perf_counter() - t0

    plain()  # warm-up
    allowed = adapter_class(model.config.model_type)(model).saliency_layers() or [a.layers // 2]
    sal_layer = str(min(allowed, key=lambda x: (abs(x - a.layers // 2), x)))  # a global layer (Gemma 3)

    # --arms real: the dump's compute alone (teacher_dump.compute.teacher_batch on the dump's collated batches, as
    # bench/scale.py's dump section: no encoding, no writing), timed in the same rounds as the plain forward
    from alignti.common.batch import collate, to_device
    from alignti.teacher_dump.compute import teacher_batch
    k_compute = a.top_k or 64
    compute_arms = {} if a.arms != "real" else {
        "compute, no TPA (teacher_batch)": dict(top_k=k_compute, tpa_branches=0, tpa_top_k=8,
                                                saliency_layer=int(sal_layer)),
        **({} if not a.tpa_positions else {
            f"compute, TPA at {a.tpa_positions:g} (teacher_batch)": dict(
                top_k=k_compute, tpa_branches=4, tpa_top_k=8, saliency_layer=int(sal_layer),
                tpa_positions=a.tpa_positions)})}
    cbatches = [collate([e.__dict__ for e in chunk], pad, adapter_class(model.config.model_type)) for chunk in chunks]

    def timed_compute(params: dict) -> float:
        ad = adapter_class(model.config.model_type)(model)
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            for b in cbatches:
                teacher_batch(ad, to_device(b, device), dict(params))
        sync(device)
        return time.perf_counter() - t0

    for params in compute_arms.values():  # warm-up
        timed_compute(params)
    t_compute = {name: float("inf") for name in compute_arms}

    writer_s = [0.0]
    real_write = dump_module._write_unit

    def timed_write(*args, **kwargs):  # the writer thread's busy time (it runs beside the forward loop)
        t = time.perf_counter()
        try:
            return real_write(*args, **kwargs)
        finally:
            writer_s[0] += time.perf_counter() - t

    dump_module._write_unit = timed_write
    rows, ratios, walls = [], {}, {}
    if a.arms == "real":
        configs = [("dump, no TPA (top-k, saliency)", dict(tpa_branches=0, saliency_layer=sal_layer))]
        if a.tpa_positions:
            configs.append((f"dump, TPA at {a.tpa_positions:g} (B=4, k2=8)",
                            dict(tpa_branches=4, saliency_layer=sal_layer, tpa_positions=a.tpa_positions)))
    else:
        configs = [("top-k only", dict(tpa_branches=0, saliency_layer="none")),
                   ("top-k + saliency", dict(tpa_branches=0, saliency_layer=sal_layer)),
                   ("top-k + saliency + TPA (B=4, k2=8)", dict(tpa_branches=4, saliency_layer=sal_layer))]
    if worker_counts != [None]:  # one arm per --encode-workers value, run in the same rounds
        configs = [(f"{name}, encode workers {w}", dict(kw, encode_workers=w)) for name, kw in configs
                   for w in worker_counts]
    k_used = None
    t_plain, best, busy, loop_of = float("inf"), {}, {}, {}
    plain_rounds, per_round = [], {}  # each round's plain forward; each arm's time / its round's plain forward
    for _ in range(max(1, a.repeats)):  # rounds: every arm once, in turn
        if _:  # the model was freed for the dumps: load it again for this round's plain forward
            model, _proc = load_vlm(str(teacher), device)
            plain()
        plain_rounds.append(timed_plain())
        t_plain = min(t_plain, plain_rounds[-1])
        for name, params in compute_arms.items():
            t = timed_compute(params)
            per_round.setdefault((name, "-"), []).append(t / plain_rounds[-1])
            t_compute[name] = min(t_compute[name], t)
        del model
        for name, kw in configs:
            for enc in encodings:
                out = work / "bench-cache"
                shutil.rmtree(out, ignore_errors=True)
                writer_s[0] = 0.0
                m = dump_teacher(DumpConfig(teacher=str(teacher), data=str(data), images=str(images), out=str(out),
                                            limit=a.samples, batch_size=a.batch_size, device=a.device,
                                            unit_size=a.unit_size,
                                            progress=False, top_k=a.top_k, logprob_encoding=enc, **kw))
                k_used = m["fingerprint"]["params"]["top_k"]
                t = m["timing"]["loop_s"]
                per_round.setdefault((name, enc), []).append(t / plain_rounds[-1])
                if t < best.get((name, enc), float("inf")):
                    best[(name, enc)], busy[(name, enc)] = t, writer_s[0]
                    loop_of[(name, enc)] = m["timing"]
    for name, _kw in configs:
        for enc in encodings:
            t = best[(name, enc)]
            ratios[(name, enc)] = t / t_plain
            walls[(name, enc)] = t
            rows.append([name, enc, f"{t:.2f}", f"{t / t_plain:.3f}", f"{t / (t_plain + t_encode):.3f}",
                         f"{busy[(name, enc)]:.2f}"])
    for name, t in t_compute.items():
        ratios[(name, "-")] = t / t_plain
        rows.append([name, "-", f"{t:.2f}", f"{t / t_plain:.3f}", "-", "-"])
    dump_module._write_unit = real_write
    img_id = int(model_config.image_token_id if hasattr(model_config, "image_token_id")
                 else model_config.image_token_index)
    n_img = [int((torch.as_tensor(e.input_ids) == img_id).sum()) for e in enc_samples]
    lens = [len(e.input_ids) for e in enc_samples]
    print(f"device: {device_name(device)}; {a.family} teacher LM {a.layers} x {a.hidden}; {a.samples} samples, "
          f"batch {a.batch_size}; k = {k_used}; fastest of {max(1, a.repeats)} interleaved round(s)")
    print(f"SHAPES {a.family}: image tokens per sample {min(n_img)}-{max(n_img)} (mean {sum(n_img) / len(n_img):.0f}); "
          f"sequence length {min(lens)}-{max(lens)} (mean {sum(lens) / len(lens):.0f}); response tokens mean "
          f"{sum(resp_tokens) / len(resp_tokens):.0f}; text: {text_mode}; plain forward {t_plain:.3f} s "
          f"({t_plain / len(batches):.3f} s a batch)")
    print(table([["plain forward (HF, full logits)", "-", f"{t_plain:.2f}", "1.000", "-", "-"],
                 ["encode data (tokenize + image processor)", "-", f"{t_encode:.2f}", "-", "-", "-"]] + rows,
                ["run", "encoding", "seconds", "x plain forward", "x (encode + plain forward)", "writer busy s"]))
    for enc in encodings:
        print(f"RATIO dump/plain forward ({enc}): " + ", ".join(f"{name} {ratios[(name, enc)]:.3f}"
                                                                 for name, _ in configs) + " (goal <= 1.10)")
    for (name, enc), tm in loop_of.items():  # where the fastest round's loop time went (dump-teacher's own timers)
        print(f"LOOP {name} ({enc}): {tm['loop_s']:.2f} s = teacher {tm['loop_teacher_s']:.2f} + waiting for the "
              f"encoding {tm['loop_encode_s']:.2f} + for the writer {tm['loop_write_s']:.2f} + after the last unit "
              f"{tm['loop_last_write_s']:.2f} + the rest; encode workers {tm['encode_workers']}")
    for (name, enc), rs in per_round.items():  # paired: under a machine whose speed drifts between rounds
        print(f"ROUNDS {name} ({enc}): x its round's plain forward, median {statistics.median(rs):.3f} (range "
              f"{min(rs):.3f}-{max(rs):.3f}; " + " ".join(f"{r:.3f}" for r in rs) + ")")
    if compute_arms:
        print("RATIO compute/plain forward: " + ", ".join(f"{name} {ratios[(name, '-')]:.3f}" for name in compute_arms))
    if "packed" in encodings and "float16" in encodings:
        print("RATIO packed/float16 dump wall time: " + ", ".join(
            f"{name} {walls[(name, 'packed')] / walls[(name, 'float16')]:.3f}" for name, _ in configs))


if __name__ == "__main__":
    main()
