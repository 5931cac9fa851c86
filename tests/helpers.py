"""Small in-memory models and encoded samples for the tests."""

import torch

from alignti.common.adapters import adapter_for
from alignti.common.batch import collate
from alignti.common.conversation import encode
from alignti.common.records import Record, parse_record
from alignti.common.sources import load_image
from alignti.demo import kit, shapes


def tiny(family: str, tmp_path, n_images: int = 3, multi_turn_every: int = 2, seed: int = 0, dims=None):
    tok = kit.build_tokenizer(family)
    proc = kit.build_processor(tok, family)
    model = kit.build_model(family, tok, dims or kit.TEACHER, seed).float().eval()
    recs = shapes.generate_split(tmp_path, "train", n_images, questions_per_image=2, multi_turn_every=multi_turn_every)
    encoded = []
    for i, item in enumerate(recs):
        r = parse_record(i, item)
        img, sha = load_image(r, tmp_path / "images")
        encoded.append(encode(proc, r, img, sha))
    return model, proc, adapter_for(model), encoded


def batch_of(adapter, proc, encoded):
    return collate([e.__dict__ for e in encoded], proc.tokenizer.pad_token_id or 0, type(adapter))


def generate_once(folder) -> torch.Tensor:
    """Plain transformers: the Auto classes load the folder; one greedy generate through its processor (the
    library's own where it can build it: the video part of Qwen2-VL's needs torchvision)."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig

    from alignti.common.models import load_processor
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    gen = GenerationConfig.from_pretrained(folder)
    try:
        proc = AutoProcessor.from_pretrained(folder)
    except ImportError as e:  # the folder is complete; this machine lacks the library the video processor needs
        assert "torchvision" in str(e).lower(), e
        proc = load_processor(folder)
    image = Image.new("RGB", (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE), (200, 30, 30))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour?"}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    inputs = proc(text=[text], images=[image], return_tensors="pt")
    out = model.generate(**inputs, generation_config=gen, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    return out


def scripted_student(src, out, moves: dict, eos: str | None = None):
    """A copy of the checkpoint folder ``src`` in ``out`` whose next token depends on the current token alone, by
    ``moves`` ({token: next token}, as token strings; "<prompt>" stands for the generation prompt's last token): every
    decoder layer's attention and MLP output projections zeroed (the residual stream at a position is the token's own
    embedding), each moved-from token's embedding a distinct basis vector, and the LM head's row of each target the
    sum of its sources' basis vectors, all other rows zero: at a source token the target's logit is 10 sqrt(d) and
    every other logit 0 (greedy and sampled alike: the target has probability 1 - V e^(-10 sqrt(d)) or more).
    ``eos``: the token string saved as ``generation_config.eos_token_id`` (a base model's end of text). Returns
    ``out``."""
    import shutil
    from pathlib import Path

    from alignti.common.models import load_vlm
    out = Path(out)
    shutil.copytree(src, out)
    model, proc = load_vlm(str(out), torch.device("cpu"))
    tok = proc.tokenizer
    prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "q"}]}],
                                      add_generation_prompt=True, tokenize=False)
    last = tok(prompt, add_special_tokens=False)["input_ids"][-1]

    def tid(t: str) -> int:
        i = last if t == "<prompt>" else tok.convert_tokens_to_ids(t)
        assert i is not None and i != tok.unk_token_id or t == tok.unk_token, t
        return int(i)

    lm = adapter_for(model).language_model
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    d = emb.shape[1]
    with torch.no_grad():
        for layer in lm.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        lm.norm.weight.fill_(1.0)
        head.zero_()
        for k, (a, b) in enumerate(moves.items()):
            basis = torch.zeros(d)
            basis[k] = 1.0
            emb[tid(a)] = basis
            head[tid(b)] += basis * 10.0
    if eos is not None:
        model.generation_config.eos_token_id = tid(eos)
    model.save_pretrained(out)
    return out
