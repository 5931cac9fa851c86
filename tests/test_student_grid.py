"""A demo student on the teacher's vision tower at another input size (demo/kit.build_student(image_size=...)): its
own image-token grid, the tower's weights kept, the patch position embeddings resampled by transformers' ViT recipe
(bench/cross_tokenizer_demo.py's cross student)."""

import pytest
import torch
from PIL import Image

from alignti.common.losses import resample_saliency
from alignti.demo import kit, shapes


def test_student_on_another_patch_grid_is_the_teachers_tower_interpolated():
    tok = kit.build_tokenizer("llava")
    teacher = kit.build_model("llava", tok, kit.TEACHER, 0)
    student = kit.build_student("llava", tok, teacher, 1, image_size=64)
    t_proc, s_proc = kit.build_processor(tok, "llava"), kit.build_processor(tok, "llava", image_size=64)
    img = Image.new("RGB", (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE), (245, 245, 245))
    img.paste((200, 30, 30), (2, 2, 13, 13))
    image_id = tok.convert_tokens_to_ids("<image>")
    t_in, s_in = (p(images=img, text="<image>\nWhat colour?", return_tensors="pt") for p in (t_proc, s_proc))
    assert int((t_in["input_ids"] == image_id).sum()) == 9  # the teacher's 3x3 grid of 16 px patches
    assert int((s_in["input_ids"] == image_id).sum()) == 16  # the student's 4x4 grid at 64 px
    assert s_in["pixel_values"].shape[-2:] == (64, 64)
    # the reference: the teacher's own tower run on the 64 px pixels with transformers' position-embedding
    # interpolation (CLIPVisionEmbeddings.interpolate_pos_encoding). The student stores that interpolated table and
    # every other tower weight is the teacher's, so both sides run the same ops on the same values: bit for bit.
    with torch.no_grad():
        ref = teacher.model.vision_tower(s_in["pixel_values"], interpolate_pos_encoding=True).last_hidden_state
        got = student.model.vision_tower(s_in["pixel_values"]).last_hidden_state
        plain = kit.build_model("llava", tok, kit.STUDENT, 1, image_size=64).model.vision_tower(
            s_in["pixel_values"]).last_hidden_state  # a fresh tower (the regression: weights not carried over)
    assert got.shape == (1, 17, 64) and torch.equal(got, ref)
    assert not torch.allclose(plain, ref, atol=1e-2)
    t_pos = teacher.model.vision_tower.embeddings.position_embedding.weight
    s_pos = student.model.vision_tower.embeddings.position_embedding.weight
    assert torch.equal(s_pos[0], t_pos[0])  # the class position is kept; the 9 patch positions become 16
    # the teacher's saliency on its grid goes onto the student's (the path --loss kd+iva takes across tokenizers)
    sal = resample_saliency(torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0, 0]), (3, 3), (4, 4))
    assert sal.shape == (16,) and abs(float(sal.sum()) - 1) < 1e-6 and int(sal.argmax()) == 0


def test_image_size_is_refused_outside_llava():
    tok = kit.build_tokenizer("qwen2_vl")
    with pytest.raises(ValueError, match="llava demo family only"):
        kit.build_model("qwen2_vl", tok, kit.STUDENT, 0, image_size=64)
