"""`hpc status`: run directories built by the real Heartbeat driven by a simulated clock.

``simulate_run`` is also used by test_monitor_report.py: 4 ranks (rank 3 computes slower, so the
others wait in comm), checkpoints every 50 steps, an eval every 100, a preemption at step 170 after
the checkpoint at 150, a requeue that resumes from 150 and finishes at 300.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from hpc.monitor import Heartbeat
from hpc.monitor.status import collect_status, format_status
from hpc.util.io import atomic_write_json, atomic_write_text

T0 = 1_790_000_000.0


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _attempt(run_dir: Path, clock: Clock, rank: int, size: int, steps: range, restart: int,
             end_state: str, batch: int, rng: random.Random, metrics: list | None) -> None:
    hb = Heartbeat(run_dir, rank, interval_s=5, world_size=size, total_steps=300, restart_count=restart,
                   job_id="4242", start=False, clock=clock)
    clock.t += 8.0  # start-up: imports, reader, checkpoint load (not productive)
    for step in steps:
        with hb.phase("data"):
            clock.t += rng.uniform(0.02, 0.05) + (0.3 if step % 97 == 0 else 0)
        with hb.phase("compute"):
            clock.t += 0.20 * (1.5 if rank == 3 else 1.0) * rng.uniform(0.9, 1.1)
        with hb.phase("comm"):
            clock.t += 0.02 if rank == 3 else 0.12
        hb.set_step(step, epoch=step // 100, samples=batch)
        clock.t += 0.002  # optimizer step, logging: outside the measured phases
        if step % 50 == 0:
            with hb.phase("checkpoint"):
                clock.t += 2.0 + 0.01 * step
        if step % 100 == 0:
            with hb.phase("eval"):
                clock.t += 3.0
        if step % 10 == 0:  # one heartbeat per ~4 simulated seconds (interval_s=5)
            hb.write()
        if metrics is not None and step % 10 == 0:
            metrics.append({"kind": "train", "step": step, "epoch": step // 100, "time": clock.t,
                            "loss": 2.3 * 0.99 ** step + 0.05, "accuracy": 1 - 0.9 * 0.99 ** step,
                            "samples_per_s": size * batch / 0.4, "lr": 0.1})
        if metrics is not None and step % 100 == 0:
            metrics.append({"kind": "val", "step": step, "epoch": step // 100, "time": clock.t,
                            "loss": 2.3 * 0.992 ** step + 0.1, "accuracy": 1 - 0.9 * 0.992 ** step})
    hb.close(end_state)


def simulate_run(run_dir: Path, size: int = 4, finished: bool = True, seed: int = 0) -> float:
    """Write a realistic run directory; returns the simulated time at its end."""
    rng = random.Random(seed)
    metrics: list = []
    ends = []
    for rank in range(size):
        clock = Clock(T0)
        _attempt(run_dir, clock, rank, size, range(1, 171), 0, "preempted", 32, rng,
                 metrics if rank == 0 else None)
        clock.t += 120.0  # in the queue again: not allocated, not counted
        if rank == 0:  # the trainer truncates metrics.jsonl to the resumed step (MetricsLog.truncate_after)
            metrics[:] = [m for m in metrics if m["step"] <= 150]
        last = range(151, 301) if finished else range(151, 231)
        _attempt(run_dir, clock, rank, size, last, 1, "completed" if finished else "running", 32, rng,
                 metrics if rank == 0 else None)
        ends.append(clock.t)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    atomic_write_text(run_dir / "config.yaml", "name: sim\ndata:\n  batch_size: 128\ntrain:\n  grad_accum: 1\n")
    last_ckpt = 300 if finished else 200
    ck = run_dir / "checkpoints" / f"step-{last_ckpt:09d}"
    ck.mkdir(parents=True)
    atomic_write_json(ck / "meta.json", {"step": last_ckpt, "files": {}})
    atomic_write_text(run_dir / "checkpoints" / "latest", ck.name + "\n")
    if finished:
        atomic_write_json(run_dir / "summary.json", {
            "state": "completed", "world_size": size, "backend": "mpi", "samples_per_s": 320.0,
            "step": 300, "epoch": 3, "total_steps": 300,
            "wall_s": max(ends) - T0, "model": {"family": "mlp", "config": {}},
            "metrics": {"val": {"loss": 0.31, "accuracy": 0.91}, "test": {"loss": 0.33, "accuracy": 0.9}},
            "slurm": {"job_id": "4242", "restart_count": 1}})
    return max(ends)


def test_status_of_a_finished_requeued_run(tmp_path):
    end = simulate_run(tmp_path)
    st = collect_status(tmp_path, now=end + 60)
    assert st["state"] == "completed" and st["step"] == 300 and st["epoch"] == 3
    assert st["requeues"] == 1 and st["job_id"] == "4242" and st["eta_s"] is None
    assert st["checkpoint"]["step"] == 300
    assert [r["rank"] for r in st["ranks"]] == [0, 1, 2, 3]
    f = st["fractions"]
    # ranks 0-2 wait 0.12 s per step in comm, rank 3 computes 1.5x longer: compute dominates
    assert f["compute"] > f["comm"] > f["data"] > 0 and abs(sum(f.values()) - 1) < 1e-3
    text = format_status(st)
    assert "state      completed" in text and "requeued 1x" in text and "step-000000300" in text


def test_status_of_a_live_run_has_eta_per_rank_rates_and_spots_a_stale_rank(tmp_path):
    end = simulate_run(tmp_path, finished=False)
    st = collect_status(tmp_path, now=end + 1)
    assert st["state"] == "running" and st["step"] == 230 and st["total_steps"] == 300
    # each rank does 5 steps per ~1.8-2.4 s of simulated time: 70 steps left take ~30 s
    assert 15 < st["eta_s"] < 60, st["eta_s"]
    assert all(r["samples_per_s"] > 0 for r in st["ranks"])
    assert st["samples_per_s"] == pytest.approx(sum(r["samples_per_s"] for r in st["ranks"]), rel=1e-3)
    st = collect_status(tmp_path, now=end + 120)  # 2 minutes without a heartbeat (interval 5 s)
    assert st["state"] == "stale" and all(r["stale"] for r in st["ranks"])
    assert "STALE" in format_status(st)


def test_status_reports_a_hang_from_the_watchdog(tmp_path):
    simulate_run(tmp_path, finished=False)
    atomic_write_json(tmp_path / "hang-report" / "summary.json",
                      {"noticed_by": 0, "behind": [{"rank": 2, "why": "in phase 'data'"}]})
    st = collect_status(tmp_path)
    assert st["state"] == "hung" and "ranks behind: 2" in st["why"]


def test_status_cli_run_dir_json_and_errors(tmp_path, monkeypatch):
    simulate_run(tmp_path / "runs" / "mlp" / "r1")
    monkeypatch.setenv("HPC_HOME", str(tmp_path / "home"))
    def hpc(*a):
        return subprocess.run([sys.executable, "-m", "hpc", "status", *a], capture_output=True, text=True,
                              timeout=60, cwd=tmp_path)
    r = hpc("runs/mlp/r1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["state"] == "completed"
    r = hpc("runs/mlp/r1", "--watch", "0.2")   # a final state: prints once and returns
    assert r.returncode == 0 and r.stdout.count("state      completed") == 1, r.stdout + r.stderr
    r = hpc("4242", "--runs-root", "runs")       # job id -> the run whose heartbeats name it
    assert r.returncode == 0 and "runs/mlp/r1" in r.stdout, r.stdout + r.stderr
    # a job `hpc submit` recorded (its index names the run dir, wherever it is)
    from hpc.launch.jobs import record
    simulate_run(tmp_path / "elsewhere" / "x" / "y", finished=False)
    record("31337", "train", tmp_path / "elsewhere" / "x" / "y", tmp_path / "logs")
    r = hpc("31337", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["run_dir"].endswith("elsewhere/x/y"), r.stderr
    r = hpc("999999")
    assert r.returncode == 2 and "no run directory found" in r.stderr
    (tmp_path / "empty").mkdir()
    r = hpc("empty")
    assert r.returncode == 2 and "not a run directory" in r.stderr
