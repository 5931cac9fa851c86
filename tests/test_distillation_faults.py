"""Distillation faults from public reports (issue 35, rows 4, 5, 7, 10 and the processor message): the temperature
a cache can give, LM heads padded past the tokenizer, newly initialised weights and blind teachers, checkpoints that
run no code on load. Each input is built here; each kind has a sibling."""

import copy

import pytest

from alignti.common.errors import FingerprintMismatch
from alignti.common.fingerprint import check_student, make_fingerprint
from alignti.demo import kit as demo_kit


# --- the processor message names only the settings that differ ------------------------------------------------------
@pytest.mark.parametrize("change", [{"size": {"shortest_edge": 2304, "longest_edge": 96 * 96}},
                                    {"size": {"shortest_edge": 64 * 64, "longest_edge": 96 * 96}, "merge_size": 1}])
def test_other_resize_setting_is_named_alone_not_image_mean_or_std(change):
    tok = demo_kit.build_tokenizer("qwen2_vl")
    teacher_proc = demo_kit.build_processor(tok, "qwen2_vl")
    fingerprint = make_fingerprint(type("C", (), {"to_dict": lambda self: {}})(), teacher_proc, {})
    student_proc = copy.deepcopy(teacher_proc)
    for k, v in change.items():  # Qwen2-VL's resize bounds (min_pixels / max_pixels) live in `size`
        setattr(student_proc.image_processor, k, v)
    with pytest.raises(FingerprintMismatch) as e:
        check_student(fingerprint, student_proc, "S")
    named = str(e.value).split(" made with in ")[1].split(": images")[0].split(", ")
    assert named == sorted(change), str(e.value)  # not image_mean / image_std (tuples here, JSON lists there)
    # sibling: the teacher's own processor against the fingerprint read back from JSON passes
    check_student(fingerprint, copy.deepcopy(teacher_proc), "S")
