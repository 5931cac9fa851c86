"""dump-teacher on a rollout (``alignti rollout``): the student's TPA candidates in a batch, the checks and the
manifest entry that say whose candidates the cache holds (``common.onpolicy`` reads the rows)."""

from __future__ import annotations

import numpy as np
import torch

from alignti.common.errors import DataSourceError
from alignti.common.onpolicy import RolloutColumns


def student_candidates(onp: RolloutColumns, chunk: list, n_branch: int) -> torch.Tensor:
    """[N_resp, n_branch] int64 for a batch's samples (``chunk``, in batch order, response tokens concatenated as
    ``collate`` orders them): the student's candidates where they apply, -1 where the teacher's own top-B stand in
    (tokens after the student's generation, such as the end-of-turn markup after its end-of-sequence token, and
    positions after a re-tokenisation difference)."""
    return torch.from_numpy(np.concatenate([onp.candidates(enc, n_branch) for enc in chunk])).long()


def check_rollout(onp: RolloutColumns, teacher_tokenizer: str, n_branch: int, data: str) -> None:
    """Before any teacher time: the student's candidate ids are token ids of its tokenizer, so it must be the
    teacher's; and the rollout must have kept at least ``n_branch`` (--tpa-branches) candidates per token."""
    if onp.top_b is not None and onp.top_b < n_branch:
        raise DataSourceError(str(data), f"the rollout kept {onp.top_b} student candidates per token, fewer "
                              f"than --tpa-branches {n_branch}", f"dump with --tpa-branches {onp.top_b}, or re-run "
                              f"the rollout with --top-b {n_branch}")
    other = sorted({t for _, t in onp.students if t != teacher_tokenizer})
    if other:
        raise DataSourceError(str(data), f"the rollout's student tokenizer ({other[0][:12]}) is not the teacher's "
                              f"({teacher_tokenizer[:12]}): its TPA candidate ids would name other tokens",
                              "roll out with a student that shares the teacher's tokenizer (train-student refuses "
                              "any other)")


def onpolicy_manifest(onp: RolloutColumns | None, params: dict) -> dict:
    """The manifest's ``tpa_candidates`` (whose TPA candidates: teacher or student, with the students'
    fingerprints) and ``rollout`` (rows, rounds) entries."""
    who = params.get("tpa_candidates", "teacher") if params.get("tpa_branches") else None
    out: dict = {"tpa_candidates": None if who is None else {"by": who}}
    if onp is not None:
        summary = onp.summary()
        out["rollout"] = summary
        if who == "student":
            out["tpa_candidates"]["students"] = summary["students"]
    return out
