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

from hpc.instrument import Heartbeat
from hpc.monitor.status import collect_status, format_status
from hpc.util.io import atomic_write_json, atomic_write_text

T0 = 1_790_000_000.0


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _attempt(run_dir: Path, clock: Clock, rank: int, size: int, steps: range, restart: int,
             end_state: str, batch: int, rng: random.Random, metrics: list | None) -> float:
    """One process of one rank; returns its samples/s as the trainer computes it (global samples over
    this rank's step seconds: first batch read to the end of the step, this attempt)."""
    hb = Heartbeat(run_dir, rank, interval_s=5, world_size=size, total_steps=300, restart_count=restart,
                   job_id="4242", start=False, clock=clock)
    clock.t += 8.0  # start-up: imports, reader, checkpoint load (not productive)
    step_s = 0.0
    for step in steps:
        t_step = clock.t
        with hb.phase("data"):
            clock.t += rng.uniform(0.02, 0.05) + (0.3 if step % 97 == 0 else 0)
        with hb.phase("compute"):
            clock.t += 0.20 * (1.5 if rank == 3 else 1.0) * rng.uniform(0.9, 1.1)
        with hb.phase("comm"):
            clock.t += 0.02 if rank == 3 else 0.12
        step_s += clock.t - t_step
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
                            "samples_per_s": size * batch * (step - steps[0] + 1) / step_s, "lr": 0.1 * 0.995 ** step,
                            "grad_norm": 5.0 * 0.98 ** step + 0.01})
        if metrics is not None and step % 100 == 0:
            metrics.append({"kind": "val", "step": step, "epoch": step // 100, "time": clock.t,
                            "loss": 2.3 * 0.992 ** step + 0.1, "accuracy": 1 - 0.9 * 0.992 ** step})
    hb.close(end_state)
    return size * batch * len(steps) / step_s


def simulate_run(run_dir: Path, size: int = 4, finished: bool = True, seed: int = 0) -> float:
    """Write a realistic run directory; returns the simulated time at its end."""
    rng = random.Random(seed)
    metrics: list = []
    ends, rates = [], []
    run_dir.mkdir(parents=True, exist_ok=True)  # the trainer writes config.yaml first, as here
    atomic_write_text(run_dir / "config.yaml", "name: sim\ndata:\n  batch_size: 128\ntrain:\n  grad_accum: 1\n")
    for rank in range(size):
        clock = Clock(T0)
        _attempt(run_dir, clock, rank, size, range(1, 171), 0, "preempted", 32, rng,
                 metrics if rank == 0 else None)
        clock.t += 120.0  # in the queue again: not allocated, not counted
        if rank == 0:  # the trainer truncates metrics.jsonl to the resumed step (MetricsLog.truncate_after)
            metrics[:] = [m for m in metrics if m["step"] <= 150]
        last = range(151, 301) if finished else range(151, 231)
        rates.append(_attempt(run_dir, clock, rank, size, last, 1, "completed" if finished else "running", 32,
                              rng, metrics if rank == 0 else None))
        ends.append(clock.t)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    last_ckpt = 300 if finished else 200
    ck = run_dir / "checkpoints" / f"step-{last_ckpt:09d}"
    ck.mkdir(parents=True)
    atomic_write_json(ck / "meta.json", {"step": last_ckpt, "files": {}})
    atomic_write_text(run_dir / "checkpoints" / "latest", ck.name + "\n")
    if finished:
        atomic_write_json(run_dir / "summary.json", {
            "state": "completed", "world_size": size, "backend": "mpi",
            "samples_per_s": rates[0],   # rank 0's, as the trainer writes it
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


def _hpc(cwd: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpc", "status", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def _starting_run(run_dir: Path) -> None:
    """What the trainer writes before its first heartbeat: the directory, logs/ and config.yaml."""
    (run_dir / "logs").mkdir(parents=True)
    (run_dir / "logs" / "rank-0.log").write_text("12:00:00 rank 0 INFO resume=auto: no checkpoint; starting\n")
    atomic_write_text(run_dir / "config.yaml", "name: sim\nout_dir: runs\n")


def test_status_of_a_starting_run_says_starting_and_exits_0(tmp_path):
    _starting_run(tmp_path / "runs" / "sim" / "r1")
    st = collect_status(tmp_path / "runs" / "sim" / "r1")
    assert st["state"] == "starting" and st["ranks"] == [] and st["step"] is None
    r = _hpc(tmp_path, "runs/sim/r1")
    assert r.returncode == 0, r.stderr
    assert "state      starting: run directory created" in r.stdout and "no heartbeat" in r.stdout
    assert "last log   12:00:00 rank 0 INFO resume=auto" in r.stdout   # how far it got
    r = _hpc(tmp_path, "runs/sim/r1", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "starting"


def test_heartbeat_samples_per_s_counts_step_time_only(tmp_path):
    """The one definition: samples in completed steps / seconds those steps took (first step phase to
    last, as the trainer times a step); start-up, evaluation, checkpoints and a step in progress do
    not count."""
    clock = Clock(T0)
    hb = Heartbeat(tmp_path, 0, interval_s=5, world_size=2, start=False, clock=clock)
    clock.t += 30.0                     # start-up
    for step in range(1, 11):
        with hb.phase("data"):
            clock.t += 0.1
        with hb.phase("compute"):
            clock.t += 0.15
        clock.t += 0.1                  # between phases inside the step (zero_grad, clipping): counts
        with hb.phase("comm"):
            clock.t += 0.05
        clock.t += 0.5                  # after the step, before set_step (logging): does not
        hb.set_step(step, 0, samples=32)
        if step == 5:
            with hb.phase("eval"):
                clock.t += 20.0
            with hb.phase("checkpoint"):
                clock.t += 10.0
    with hb.phase("data"):              # the 11th step is under way: its seconds have no samples yet
        clock.t += 3.0
        beat = hb.snapshot()
    assert beat["samples_per_s"] == pytest.approx(320 / 4.0)   # 10 x 32 samples in 10 x 0.4 s
    assert beat["step_s"] == pytest.approx(4.0)
    assert beat["attempts"][-1]["first_step_t"] == pytest.approx(T0 + 30.0)  # start-up ends at the first step


def test_status_shows_the_latest_loss_lr_and_val_while_running(tmp_path):
    end = simulate_run(tmp_path, finished=False)
    st = collect_status(tmp_path, now=end + 1)
    assert st["train"]["step"] == 230 and st["train"]["loss"] == pytest.approx(2.3 * 0.99 ** 230 + 0.05)
    assert st["val"]["step"] == 200
    text = format_status(st)
    assert f"loss       {st['train']['loss']:.4f} (train, step 230)  lr {0.1 * 0.995 ** 230:.4f}" in text
    assert f"val        accuracy {1 - 0.9 * 0.992 ** 200:.4f}  loss {2.3 * 0.992 ** 200 + 0.1:.4f} (step 200)" in text


def test_status_of_a_finished_run_prints_final_metrics_as_a_table(tmp_path):
    end = simulate_run(tmp_path)
    text = format_status(collect_status(tmp_path, now=end + 60))
    lines = text.splitlines()
    i = lines.index("final metrics (val: the best evaluation; test: the best model)")
    assert lines[i + 1:i + 4] == ["  metric       val    test",
                                  "  accuracy  0.9100  0.9000",
                                  "  loss      0.3100  0.3300"], "\n".join(lines[i:i + 4])
    assert "{" not in text and '"' not in text   # no raw JSON anywhere


def test_status_samples_per_s_is_the_trainers_figure_and_the_ranks_add_up_to_it(tmp_path):
    # live: the last metrics.jsonl train record (what the trainer logged); finished: summary.json
    end = simulate_run(tmp_path / "live", finished=False)
    st = collect_status(tmp_path / "live", now=end + 1)
    last_train = [json.loads(x) for x in (tmp_path / "live" / "metrics.jsonl").read_text().splitlines()
                  if json.loads(x)["kind"] == "train"][-1]
    assert st["samples_per_s"] == pytest.approx(last_train["samples_per_s"], abs=0.01)
    assert st["samples_per_s_from"] == "metrics.jsonl, step 230"
    # each rank's heartbeat figure is its share under the same definition (ranks differ by a few %)
    assert sum(r["samples_per_s"] for r in st["ranks"]) == pytest.approx(st["samples_per_s"], rel=0.03)
    end = simulate_run(tmp_path / "done")
    st = collect_status(tmp_path / "done", now=end + 1)
    summary = json.loads((tmp_path / "done" / "summary.json").read_text())
    assert st["samples_per_s"] == pytest.approx(summary["samples_per_s"], abs=0.01)
    assert "samples/s over 4 ranks (step time only; from summary.json)" in format_status(st)


def test_status_ignores_what_an_earlier_process_left_once_the_run_restarts(tmp_path):
    """A requeue or resume starts a new process in the same run directory; it rewrites config.yaml
    first. The preempted attempt's summary.json (and, until the new heartbeats come, its final
    heartbeats) must not make the run look preempted: --watch would stop on it."""
    import os
    end = simulate_run(tmp_path, finished=False)
    atomic_write_json(tmp_path / "summary.json", {"state": "preempted", "step": 170})
    os.utime(tmp_path / "summary.json", (T0 + 100, T0 + 100))      # when attempt 0 stopped
    os.utime(tmp_path / "config.yaml", (T0 + 200, T0 + 200))       # attempt 1 started; heartbeats since
    st = collect_status(tmp_path, now=end + 1)
    assert st["state"] == "running" and st["step"] == 230
    # the moment after the restart: only the earlier process's files, all older than config.yaml
    for p in list((tmp_path / "heartbeat").iterdir()) + [tmp_path / "metrics.jsonl"]:
        os.utime(p, (T0 + 150, T0 + 150))
    os.utime(tmp_path / "config.yaml", (end - 5, end - 5))
    st = collect_status(tmp_path, now=end)
    assert st["state"] == "starting" and "restarted 5.0s ago" in st["why"], st["why"]
    assert "previous process's last heartbeat: running at step 230" in st["why"]


def test_status_by_config_finds_its_newest_run(tmp_path):
    import os
    cfg = tmp_path / "sim.yaml"
    cfg.write_text(f"name: sim\nout_dir: {tmp_path / 'out'}\n")
    simulate_run(tmp_path / "out" / "sim" / "old")
    simulate_run(tmp_path / "out" / "sim" / "new", finished=False)
    # the old run finished (and wrote summary.json) after the new one started: started = config.yaml
    os.utime(tmp_path / "out" / "sim" / "old" / "config.yaml", (T0 - 7200, T0 - 7200))
    os.utime(tmp_path / "out" / "sim" / "new" / "config.yaml", (T0 - 60, T0 - 60))
    r = _hpc(tmp_path, str(cfg), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["run_dir"].endswith("out/sim/new")
    # a shipped config by name, moved by the same overrides `hpc train` got
    simulate_run(tmp_path / "elsewhere" / "digits_softmax" / "r7")
    r = _hpc(tmp_path, "digits_softmax", "out_dir=elsewhere")
    assert r.returncode == 0 and "elsewhere/digits_softmax/r7" in r.stdout, r.stdout + r.stderr
    r = _hpc(tmp_path, "out/sim")                          # a directory of runs: its newest
    assert r.returncode == 0 and "out/sim/new" in r.stdout, r.stdout + r.stderr
    r = _hpc(tmp_path, "digits_softmax")                   # no run of it under ./runs yet
    assert r.returncode == 2 and "no run under runs/digits_softmax yet" in r.stderr, r.stderr
    r = _hpc(tmp_path, "no_such_config")
    assert r.returncode == 2 and "not a config" in r.stderr and "shipped config" in r.stderr, r.stderr
    r = _hpc(tmp_path, "out/sim/new", "out_dir=x")
    assert r.returncode == 2 and "overrides go with a CONFIG target only" in r.stderr, r.stderr


def test_status_watch_follows_a_run_from_starting_until_it_is_final(tmp_path):
    import os
    import time
    run_dir = tmp_path / "runs" / "sim" / "r1"
    _starting_run(run_dir)
    out_file = tmp_path / "watch.out"
    with open(out_file, "w") as out:
        p = subprocess.Popen([sys.executable, "-m", "hpc", "status", "runs/sim/r1", "--watch", "0.2"],
                             cwd=tmp_path, stdout=out, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while "state      starting" not in out_file.read_text() and time.monotonic() < deadline:
                assert p.poll() is None, p.communicate()   # a starting run is watched, not an error
                time.sleep(0.1)
            time.sleep(0.5)
            assert p.poll() is None                    # still watching: starting is not final
            simulate_run(tmp_path / "staged")
            for name in ("metrics.jsonl", "checkpoints", "heartbeat", "summary.json"):  # as the trainer would
                os.rename(tmp_path / "staged" / name, run_dir / name)
            _, err = p.communicate(timeout=30)
        finally:
            p.kill()
    text = out_file.read_text()
    assert p.returncode == 0, err
    assert "state      starting" in text and text.count("state      completed") == 1, text
    assert text.rstrip().splitlines()[-1].startswith("   3  ")   # ended right after the final state
    r = _hpc(tmp_path, "runs/sim/r1", "--watch")                # no SECONDS: the default; final: returns
    assert r.returncode == 0 and r.stdout.count("state      completed") == 1, r.stdout + r.stderr
