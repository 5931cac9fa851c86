"""Fail points for the crash tests: ``ALIGNTI_CRASH_AT=point[:n]`` makes the process SIGKILL itself the
n-th time (default first) it reaches ``point``, exactly like ``kill -9`` at that instant.

Points: ``shard-flush`` (a part's zarr array created, its shards not yet written), ``part-move``
(a part's zarr moved into place, its parquet not), ``marker`` (a commit marker written under its
temporary name, not yet renamed), ``manifest`` (the manifest likewise), ``train-step`` (an optimizer
step taken, before its checkpoint), ``rollout-part`` (a rollout unit's parquet written under its temporary name,
not yet renamed), ``rollout-manifest`` (rollout.json likewise). Unset, this costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

_seen: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = os.environ.get("ALIGNTI_CRASH_AT")
    if not spec:
        return
    point, _, n = spec.partition(":")
    if point != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)
