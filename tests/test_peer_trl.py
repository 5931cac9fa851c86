"""bench/peer_trl.py's bookkeeping (no TRL needed): the many-students totals, the crossover N, peak RSS, and the
records as TRL's prompt-completion rows."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import peer_trl  # noqa: E402


def test_crossover_is_the_brute_force_smallest_n():
    rng = random.Random(0)
    for _ in range(500):
        dump, a, t = rng.uniform(0, 500), rng.uniform(1, 100), rng.uniform(1, 150)
        want = next((n for n in range(1, 100_000) if dump + n * a < n * t), None) if t > a else None
        assert peer_trl.crossover(dump, a, t) == want
    assert peer_trl.crossover(100.0, 30.0, 30.0) is None  # equal jobs: the dump is never paid back
    assert peer_trl.crossover(100.0, 20.0, 70.0) == 3  # 100 + 2*20 = 140 = 2*70 (not less); 160 < 210


def test_totals_sum_the_first_n_jobs_and_extrapolate_by_the_mean():
    rows = peer_trl.totals(10.0, [1.0, 2.0, 3.0], [5.0, 6.0, 7.0], ns=(1, 3, 5))
    assert [r["alignti"] for r in rows] == [11.0, 16.0, 10.0 + 6.0 + 2 * 2.0]
    assert [r["trl"] for r in rows] == [5.0, 18.0, 18.0 + 2 * 6.0]
    assert [r["measured"] for r in rows] == [True, True, False]
    assert rows[1]["ratio"] == pytest.approx(18.0 / 16.0)


def test_peak_rss_is_the_kernels_high_water_mark():
    """peak_rss_mib is this process's peak resident set as the kernel counts it: /proc/self/status's VmHWM (Linux),
    read around the call (the peak only grows), and at least the resident set now (VmRSS). Within 8 MiB: the kernel
    batches each thread's RSS count (up to 64 pages a thread) before getrusage and /proc see it."""
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("no /proc (not Linux)")

    def field(name: str) -> float:  # kB -> MiB
        line = next(l for l in status.read_text().splitlines() if l.startswith(name + ":"))
        return int(line.split()[1]) / 1024

    lo = field("VmHWM")
    got = peer_trl.peak_rss_mib()
    hi = field("VmHWM")
    assert lo - 8 <= got <= hi + 8
    assert got >= field("VmRSS") - 8  # a peak is never below the present


def test_a_job_started_by_a_large_parent_reports_its_own_peak():
    """The jobs run as child processes of the bench, which may have trained the kit's teacher itself (1.3 GiB):
    getrusage's ru_maxrss carries the parent's resident size at fork across the exec, so every job reported the
    parent's figure; VmHWM is the child's own."""
    if not Path("/proc/self/status").exists():
        pytest.skip("no /proc (not Linux)")
    ballast = bytearray(512 * 1024 * 1024)
    ballast[::4096] = b"\x01" * len(ballast[::4096])  # resident, not just reserved
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import peer_trl, resource; "
            "print(peer_trl.peak_rss_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code, str(Path(peer_trl.__file__).parent)], capture_output=True,
                         text=True, check=True).stdout.split()
    own, inherited = float(out[0]), float(out[1])
    assert inherited > 512  # the trap: the parent's ballast counted in the child
    assert own < inherited - 400, (own, inherited)
    del ballast


def test_records_become_trl_prompt_completion_rows(tmp_path):
    from PIL import Image
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "a.png")
    recs = [{"id": "s0", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]}]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    row, = peer_trl._records_for_trl(tmp_path / "d.json", str(tmp_path))
    assert row["prompt"] == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    assert row["completion"] == [{"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    assert row["images"][0].size == (8, 8) and row["images"][0].getpixel((0, 0)) == (255, 0, 0)


def test_interval_text():
    p = {"mean": 0.012, "low": -0.003, "high": 0.027}
    assert peer_trl.interval(p) == "+1.2 [-0.3, +2.7]"
    assert peer_trl.interval({"mean": 0.5, "low": None, "high": None}) == "+50.0 -"


def test_a_job_still_running_from_an_earlier_invocation_is_waited_for(tmp_path, monkeypatch):
    import os
    import subprocess
    import time
    monkeypatch.setattr(peer_trl, "POLL_S", 0.05)
    assert not peer_trl._alive(tmp_path / "missing")
    (tmp_path / "pid").write_text(str(os.getpid()))  # alive, but not a peer_trl job (a recycled id)
    assert not peer_trl._alive(tmp_path / "pid")
    d = tmp_path / "jobs" / "j"
    d.mkdir(parents=True)
    child = subprocess.Popen([sys.executable, "-c", "import time, sys; time.sleep(1.5); "
                              "open(sys.argv[1], 'w').write('{\"job_seconds\": 1.0}')", str(d / "result.json"),
                              "peer_trl.py", "--job"])
    (d / "pid").write_text(str(child.pid))
    while not Path(f"/proc/{child.pid}/cmdline").read_text():  # until the child has exec'd
        time.sleep(0.01)
    t = time.time()
    os.utime(d / "pid", (t - 5, t - 5))  # the job started 5 s before this invocation
    assert peer_trl._alive(d / "pid")
    res = peer_trl.run_job(tmp_path, "j", {"kind": "score"}, python="/nonexistent/python")  # never started again
    child.wait()
    assert res["job_seconds"] == 1.0
    assert 5.0 <= res["process_seconds"] < 30  # from the pid file's time to the result's
