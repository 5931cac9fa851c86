"""train-student's epoch order: a windowed shuffle across whole parts (student_train/data.py ``epoch_order``).

Why it matters: a part holds consecutive samples of the data file, and the quickstart's file holds its 150 long-form
samples last; shuffled only within parts, the student met them in one burst per epoch and lost 20-30 points of
long-form F1 against TRL's uniform sampler (bench/README.md, "Beside TRL's online distillation"). The references
here are brute force: the old block shuffle written out from its description (window 0 must stay it, bit for bit,
for runs resumed from older checkpoints), the worst window over every part order, and the parts a real reader
loads."""

import itertools
import random

import pytest
import torch

from alignti.common.cache import CacheReader
from alignti.student_train.data import SHUFFLE_WINDOW, epoch_order, epoch_sample_order, window_parts


class Parts:
    """What epoch_order reads of a CacheReader: its length and each sample's part."""

    def __init__(self, sizes):
        self.parts = [p for p, n in enumerate(sizes) for _ in range(n)]

    def __len__(self):
        return len(self.parts)

    def part_of(self, i):
        return self.parts[i]


def block_shuffle(reader, epoch, seed):
    """The order train-student used before shuffle windows: parts in random order, samples shuffled within each."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    by_part = {}
    for i in range(len(reader)):
        by_part.setdefault(reader.part_of(i), []).append(i)
    keys = sorted(by_part)
    order = []
    for j in torch.randperm(len(keys), generator=g).tolist():
        idx = by_part[keys[j]]
        order += [idx[k] for k in torch.randperm(len(idx), generator=g).tolist()]
    return order


QUICKSTART = [70] * 15  # the quickstart's cache: 1,050 samples in parts of 70, its long-form samples 900-1,049


def longest_burst(order, kind, span):
    """The largest share of ``kind`` samples in any ``span`` consecutive positions of ``order``."""
    flags = [i in kind for i in order]
    run = sum(flags[:span])
    best = run
    for a in range(span, len(flags)):
        run += flags[a] - flags[a - span]
        best = max(best, run)
    return best / span


@pytest.mark.parametrize("sizes", [QUICKSTART, [25, 25, 10], [256] * 9 + [17], [3, 1, 4, 1, 5, 9, 2, 6]])
@pytest.mark.parametrize("window", [0, 1, 50, 600, SHUFFLE_WINDOW])
def test_each_sample_once_per_epoch_and_deterministic(sizes, window):
    r = Parts(sizes)
    for epoch in range(3):
        order = epoch_order(r, epoch, 5, window)
        assert sorted(order) == list(range(len(r)))
        assert order == epoch_order(r, epoch, 5, window)  # a function of (seed, epoch): --resume finds it again
    assert epoch_order(r, 0, 5, window) != epoch_order(r, 1, 5, window)


@pytest.mark.parametrize("sizes", [QUICKSTART, [25, 25, 10], [3, 1, 4, 1, 5, 9, 2, 6]])
def test_window_zero_is_the_old_block_shuffle_bit_for_bit(sizes):
    r = Parts(sizes)
    for seed, epoch in [(0, 0), (0, 3), (7, 1), (1234, 2)]:
        assert epoch_order(r, epoch, seed, 0) == block_shuffle(r, epoch, seed)
    # and the default is not it (so the change is real); a window of one part equals window 0
    assert epoch_order(r, 0, 0) != block_shuffle(r, 0, 0)
    assert epoch_order(r, 0, 0, 1) == block_shuffle(r, 0, 0)


def test_a_kind_held_in_the_last_parts_is_spread_over_the_epoch():
    """The quickstart's case: 150 long-form samples in the last of 15 parts of 70. Within parts only, every epoch
    has a run of 9 batches of 8 that is (nearly) all long-form; with the default window the cache is shuffled as a
    whole and no such run holds more than half (the uniform share is 1/7; the bound is loose on purpose)."""
    r = Parts(QUICKSTART)
    long_form = set(range(900, 1050))
    for seed in range(10):
        assert longest_burst(block_shuffle(r, 0, seed), long_form, 72) > 0.9
        assert longest_burst(epoch_order(r, 0, seed), long_form, 72) < 0.5
    # a window of ~4 parts still spreads the kind over several windows, never worse than the block shuffle
    for seed in range(10):
        assert longest_burst(epoch_order(r, 0, seed, 280), long_form, 72) <= longest_burst(block_shuffle(r, 0, seed),
                                                                                           long_form, 72)


def test_windows_are_whole_parts_read_once():
    """Each window of the order is a set of whole parts (so a reader holding window_parts parts reads each part once
    per epoch), and no window spans more parts than window_parts says: brute force over every part order."""
    rng = random.Random(0)
    for _ in range(30):
        sizes = [rng.randint(1, 9) for _ in range(rng.randint(1, 6))]
        window = rng.randint(0, 25)
        worst = 0
        for perm in itertools.permutations(range(len(sizes))):  # the windows epoch_order cuts for each part order
            n, total = 0, 0
            for p in perm:
                n, total = n + 1, total + sizes[p]
                if total >= max(window, 1):
                    worst, n, total = max(worst, n), 0, 0
            worst = max(worst, n)
        assert window_parts(Parts(sizes), window) == worst, (sizes, window)


class CountingReader(CacheReader):
    loads: list

    def open_part(self, j):
        self.loads.append(j)
        return super().open_part(j)


@pytest.mark.parametrize("window", [0, 30, SHUFFLE_WINDOW])
def test_a_real_reader_loads_each_part_once_per_epoch(cache, window):
    """The session cache (60 samples in parts of 25, 25, 10) read in train-student's order (length-grouped within
    each window) with the LRU train-student sets: no part is read twice in an epoch; the default window holds the
    whole cache, read once for all epochs. Window 0 (the old order) groups lengths across parts, so it is read
    ungrouped here, as it was only then part-local."""
    r = CountingReader(cache, max_parts_in_memory=1)
    r.keep_parts(window_parts(r, window))
    assert r._max_parts == {0: 1, 30: 2, SHUFFLE_WINDOW: 3}[window]
    total = []
    for epoch in range(3):
        r.loads = []
        order = epoch_sample_order(r, epoch, 0, 4, window > 0, window)
        assert sorted(order) == list(range(len(r)))
        for i in order:
            r[i]
        assert len(r.loads) == len(set(r.loads)), (epoch, r.loads)
        total += r.loads
    if window == SHUFFLE_WINDOW:
        assert sorted(total) == list(range(len(r.part_names)))


def test_resuming_a_checkpoint_from_before_shuffle_windows(tmp_path):
    """A checkpoint written before the setting existed ran the block shuffle: resuming it with the new default would
    repeat and skip samples, so it is refused naming the flag that continues it; with --shuffle-window 0 it goes on."""
    from dataclasses import replace

    from alignti.student_train.trainer import CheckpointError, TrainConfig, _check_resume
    cfg = TrainConfig(student="s", cache="c", out=str(tmp_path))
    old = {k: v for k, v in vars(cfg).items() if k != "shuffle_window"}
    with pytest.raises(CheckpointError, match=r"shuffle_window: 0 then, 2048 now .*resume with --shuffle-window 0"):
        _check_resume(old, vars(cfg), tmp_path)
    _check_resume(old, vars(replace(cfg, shuffle_window=0)), tmp_path)
    _check_resume({**old, "shuffle_window": 2048}, vars(cfg), tmp_path)  # a new checkpoint compares as any setting
