"""Heartbeat + watchdog: the pure laggard logic, one process, and a real 4-rank hang under mpiexec."""

from __future__ import annotations

import json
import os
import textwrap
import time

import pytest

from conftest import run_mpi
from hpc.instrument import Heartbeat, Watchdog, read_heartbeats
from hpc.instrument.heartbeat import hist_bucket, hist_edges, hist_quantile
from hpc.instrument.watchdog import HANG_EXIT_CODE, find_laggards


def _hb(rank, step, phase, t=100.0, **kw):
    return {"rank": rank, "world_size": 4, "step": step, "phase": phase, "time": t, "interval_s": 1,
            "phase_elapsed_s": 3.0, "state": "running", **kw}


def test_find_laggards_names_other_phase_lower_step_stale_and_missing():
    beats = {0: _hb(0, 7, "comm"), 1: _hb(1, 7, "comm"), 2: _hb(2, 7, "compute"), 3: _hb(3, 7, "comm")}
    assert [r for r, _ in find_laggards(beats, 101.0)] == [2]
    beats[3] = _hb(3, 6, "comm")                      # stuck in an earlier collective
    assert [r for r, _ in find_laggards(beats, 101.0)] == [2, 3]
    beats[3] = _hb(3, 7, "comm", t=80.0)               # heartbeat thread silent for 21 s
    out = dict(find_laggards(beats, 101.0))
    assert sorted(out) == [2, 3] and "old" in out[3]
    del beats[1]
    assert [r for r, _ in find_laggards(beats, 101.0)] == [1, 2, 3]
    same = {r: _hb(r, 7, "comm") for r in range(4)}    # nobody behind: a mismatched collective
    assert find_laggards(same, 101.0) == []


def test_histogram_buckets_are_monotonic_and_quantiles_bracket():
    edges = hist_edges()
    assert all(a < b for a, b in zip(edges, edges[1:]))
    for s in (0.0005, 0.0011, 0.05, 0.3, 2.0, 1e6):
        i = hist_bucket(s)
        assert s <= edges[i] * 1.0000001 or i == len(edges) - 1
        assert i == 0 or s > edges[i - 1]
    counts = [0] * len(edges)
    for s in [0.01] * 90 + [1.0] * 10:
        counts[hist_bucket(s)] += 1
    assert 0.01 <= hist_quantile(counts, 0.5) < 0.014
    assert 1.0 <= hist_quantile(counts, 0.95) < 1.4


def test_heartbeat_records_phases_steps_and_attempts(tmp_path):
    hb = Heartbeat(tmp_path, rank=1, interval_s=0.05, world_size=2, total_steps=10, restart_count=0)
    for step in range(1, 6):
        with hb.phase("data"):
            time.sleep(0.01)
        with hb.phase("compute"):
            time.sleep(0.02)
            with hb.phase("comm"):  # nested: comm time is not also counted as compute
                time.sleep(0.01)
        hb.set_step(step, epoch=0, samples=32)
    with hb.phase("checkpoint"):
        time.sleep(0.03)
    time.sleep(0.15)
    live = read_heartbeats(tmp_path)[1]
    assert live["state"] == "running" and live["step"] == 5 and live["samples"] == 160
    hb.close("done")
    beat = json.loads((tmp_path / "heartbeat" / "rank-1.json").read_text())
    ps = beat["phase_s"]
    assert beat["state"] == "done" and beat["phase"] == "idle"
    assert 0.04 <= ps["data"] < 0.2 and 0.09 <= ps["compute"] < 0.4 and 0.04 <= ps["comm"] < 0.2
    assert sum(beat["step_hist"]["counts"]) == 4          # 5 set_step calls = 4 step intervals
    assert [e[0] for e in beat["events"]] == ["checkpoint"] and beat["events"][0][2] >= 0.03
    assert len(beat["attempts"]) == 1
    # A requeued process on the same rank appends an attempt instead of starting over.
    hb2 = Heartbeat(tmp_path, rank=1, interval_s=10, restart_count=1)
    hb2.set_step(3, 0)
    hb2.close("done")
    beat = json.loads((tmp_path / "heartbeat" / "rank-1.json").read_text())
    assert [a["restart_count"] for a in beat["attempts"]] == [0, 1]
    assert sum(beat["step_hist"]["counts"]) == 4 and len(beat["events"]) == 1   # history carried over
    assert beat["attempts"][0]["last_step"] == 5 and beat["attempts"][1]["first_step"] == 3


def test_heartbeat_counts_start_up_before_it_existed_as_idle(tmp_path):
    hb = Heartbeat(tmp_path, 0, interval_s=10, started=time.time() - 5.0)
    hb.close("completed")
    hb.close("failed")  # only the first close counts
    beat = json.loads((tmp_path / "heartbeat" / "rank-0.json").read_text())
    assert beat["state"] == "completed" and 5.0 <= beat["phase_s"]["idle"] < 8
    assert beat["attempts"][0]["last"] - beat["attempts"][0]["started"] >= 5.0


def test_heartbeat_takes_the_slurm_job_from_the_world_unless_given(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    hb = Heartbeat(tmp_path, 0, start=False)     # hpc.dist.world reads the variables
    assert (hb.job_id, hb.restart_count) == ("99", 2)
    hb = Heartbeat(tmp_path, 0, start=False, job_id="7", restart_count=0)
    assert (hb.job_id, hb.restart_count) == ("7", 0)


def test_heartbeat_rejects_unknown_phase(tmp_path):
    hb = Heartbeat(tmp_path, 0, start=False)
    with pytest.raises(ValueError, match="not one of data, compute, comm"):
        hb.phase("sleeping")
    with pytest.raises(ValueError, match="collective timeout"):
        Watchdog(hb, threshold_s=700, collective_timeout_s=600, start=False)


def test_watchdog_in_process_writes_report_and_summary_then_calls_back(tmp_path):
    hb = Heartbeat(tmp_path, rank=0, interval_s=0.1, world_size=1)
    hb.set_step(4, 1)
    got = []
    wd = Watchdog(hb, threshold_s=0.3, poll_s=0.05, grace_s=0.5, on_hang=got.append, exit=False)
    with hb.phase("comm"):
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
    wd.close()
    hb.close("hung")
    assert got and got[0].wrote_summary and got[0].reason == "comm stall" and got[0].step == 4
    report = (tmp_path / "hang-report" / "rank-0.txt").read_text()
    assert "phase comm" in report and "last step 4" in report
    assert "test_watchdog_in_process" in report  # the main thread's stack, via faulthandler
    summary = (tmp_path / "hang-report" / "summary.txt").read_text()
    assert "ranks behind: none" in summary and "mismatched collective" in summary


def test_a_requeued_attempt_archives_the_old_hang_report_instead_of_exiting(tmp_path):
    from hpc.util.io import atomic_write_json
    old = tmp_path / "hang-report"
    atomic_write_json(old / "summary.json", {"time": time.time() - 3600, "noticed_by": 1, "behind": []})
    (old / "summary.txt").write_text("ranks behind: 2\n")
    hb = Heartbeat(tmp_path, rank=0, interval_s=0.1, world_size=1)
    got = []
    wd = Watchdog(hb, threshold_s=0.3, poll_s=0.05, on_hang=got.append, exit=False)
    time.sleep(0.4)   # several polls: the old summary must not trigger a report
    assert got == [] and not old.exists()
    archived = list(tmp_path.glob("hang-report.*"))
    assert len(archived) == 1 and (archived[0] / "summary.txt").read_text() == "ranks behind: 2\n"
    with hb.phase("comm"):  # a new hang in this attempt still gets its own summary
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
    wd.close()
    hb.close("hung")
    assert got and got[0].wrote_summary and (old / "summary.txt").is_file()


HANG_SCRIPT = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    from mpi4py import MPI
    from hpc.instrument import Heartbeat, Watchdog
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    run_dir, threshold, slow = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    hb = Heartbeat(run_dir, rank, interval_s=0.5, world_size=size, total_steps=100)
    wd = Watchdog(hb, threshold_s=threshold, poll_s=0.25, collective_timeout_s=600)
    buf = np.full(1024, rank + 1.0)
    out = np.empty_like(buf)
    for step in range(1, 100):
        with hb.phase("data"):
            time.sleep(0.002 * (rank + 1))
        with hb.phase("compute"):
            if step == 3 and rank == slow:
                time.sleep(120)   # the straggler: stuck inside a step
        if step == 3:
            print(f"STALL_START {time.time():.3f} rank {rank}", flush=True)
        with hb.phase("comm"):
            comm.Allreduce(buf, out)
        assert out[0] == size * (size + 1) / 2
        hb.set_step(step, epoch=0, samples=8)
    wd.close(); hb.close("done")
""")


@pytest.mark.mpi
@pytest.mark.slow
def test_mpiexec_4_ranks_straggler_is_named_and_job_ends_soon(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(HANG_SCRIPT)
    run_dir = tmp_path / "run"
    threshold, slow = 4.0, 2
    t0 = time.time()
    proc = run_mpi(4, ["python", str(script), str(run_dir), str(threshold), str(slow)],
                   timeout=100, check=False, env={"PYTHONPATH": str(os.getcwd())})
    t_end = time.time()
    out = proc.stdout + proc.stderr
    assert proc.returncode == HANG_EXIT_CODE, out   # mpiexec passes on the first failing rank's code
    starts = [float(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("STALL_START")]
    assert len(starts) == 3, out   # the three fast ranks reached the allreduce; rank 2 never did
    # Ends within threshold + slack (startup, poll, grace for peers' stacks, mpiexec teardown on 2 cores),
    # far before the straggler's 120 s sleep.
    assert t_end - min(starts) < threshold + 15, (t_end - min(starts), out)
    assert t_end - t0 < 60
    summary = (run_dir / "hang-report" / "summary.txt").read_text()
    assert "ranks behind: 2\n" in summary, summary
    assert "rank 2: in phase 'compute'" in summary
    data = json.loads((run_dir / "hang-report" / "summary.json").read_text())
    assert [b["rank"] for b in data["behind"]] == [slow] and data["noticed_by"] != slow
    noticer = (run_dir / "hang-report" / f"rank-{data['noticed_by']}.txt").read_text()
    assert "reason: comm stall" in noticer and "phase comm" in noticer and "last step 2" in noticer
    # The straggler saw the summary appear and dumped its own stack: it sits in time.sleep in compute.
    straggler = (run_dir / "hang-report" / f"rank-{slow}.txt").read_text()
    assert "peer reported a hang" in straggler and "phase compute" in straggler
    assert 'hang.py", line' in straggler
    beats = read_heartbeats(run_dir)
    assert beats[data["noticed_by"]]["state"] == "hung"
