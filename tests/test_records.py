"""Placeholders written back: ``join_placeholders`` is the exact inverse of ``split_placeholders``, and a rollout
row puts each image where the source sample had it (mid-sentence included)."""

from __future__ import annotations

import random

from alignti.common.records import join_placeholders, parse_record, split_placeholders
from alignti.student_rollout.rollout import _row_item


def test_join_is_the_inverse_of_split():
    """Brute force over short texts of letters, spaces and line breaks, with 0-3 placeholders anywhere."""
    rng = random.Random(0)
    for _ in range(20_000):
        text = "".join(rng.choice("ab \n") for _ in range(rng.randint(0, 8)))
        offsets = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(0, 3)))
        assert split_placeholders(join_placeholders(text, offsets)) == (text, offsets), (text, offsets)


def test_rollout_row_keeps_the_images_where_the_source_put_them():
    for value in ("What is <image> showing?", "<image>\nWhat is it?", "What is it?\n<image>", "Say\n<image>\nwhat."):
        src = parse_record(0, {"id": "s", "image": "a.png",
                               "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": "A."}]})
        item, n_img = _row_item(src, 1, "B.")
        row = parse_record(0, item)
        assert n_img == 1 and row.image_at == src.image_at and row.turns[0] == src.turns[0], value
        assert row.turns[1] == ("assistant", "B.")
