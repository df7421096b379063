"""Stop signals reach a real `hpc train` process: SIGTERM (scancel, `hpc cancel`, shutdown) ends the
run checkpointed and is never requeued; only SIGUSR2 (the requeue signal) asks Slurm to requeue."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hpc.train.preempt import requeue_signal, requeues

FAKE = """#!/bin/sh
echo "$(basename "$0") $*" >> "{log}"
exit 0
"""


RUN = {"name": "s", "seed": 1, "data": {"batch_size": 8}, "model": {"family": "mlp", "config": {"widths": [16]}},
       "train": {"epochs": 100000, "max_steps": 10_000_000, "log_every": 1000},
       "checkpoint": {"every_steps": 1_000_000}}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Synthetic shards, a config that trains for ever, and a fake Slurm client on PATH."""
    from hpc.data import SynthConfig, synth

    root = tmp_path_factory.mktemp("signals")
    synth(SynthConfig(kind="tabular", samples=400, features=8, classes=3, seed=1), root / "data", split="train=0.8,val=0.1,test=0.1")
    cfg = {**RUN, "out_dir": str(root / "runs"), "data": {**RUN["data"], "dir": str(root / "data")}}
    (root / "base.yaml").write_text(yaml.safe_dump(cfg))
    bin_dir = root / "bin"
    bin_dir.mkdir()
    for cmd in ("scontrol", "squeue", "sacct"):   # a Slurm client that records what it was asked
        (bin_dir / cmd).write_text(FAKE.format(log=root / "slurm-calls.log"))
        (bin_dir / cmd).chmod(0o755)
    return root


def _train_then_signal(ws: Path, run_id: str, sig: signal.Signals) -> tuple[int, str, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMIX_", "PMI_"))}
    env.update({"SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0",
                "PATH": f"{ws / 'bin'}{os.pathsep}{env.get('PATH', '')}"})
    err = ws / f"{run_id}.err"
    with open(err, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "hpc", "train", str(ws / "base.yaml"), f"run_id={run_id}"],
                                stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ws)
    run = ws / "runs" / "s" / run_id
    deadline = time.time() + 120
    while time.time() < deadline and "steps (" not in err.read_text():   # the run line: in the loop
        assert proc.poll() is None, err.read_text()[-3000:]
        time.sleep(0.2)
    time.sleep(1.0)   # well into the loop
    proc.send_signal(sig)
    rc = proc.wait(timeout=120)
    return rc, err.read_text(), json.loads((run / "summary.json").read_text())


def test_sigterm_ends_the_run_checkpointed_without_requeue(ws):
    calls = ws / "slurm-calls.log"
    calls.unlink(missing_ok=True)
    rc, out, summary = _train_then_signal(ws, "term", signal.SIGTERM)
    assert rc == 3, out[-3000:]
    assert summary["state"] == "preempted" and summary["preemption"]["signal"] == "SIGTERM"
    assert (ws / "runs" / "s" / "term" / "checkpoints" / "latest").is_file()   # checkpointed first
    assert "not requeued: SIGTERM ends the job" in out, out[-3000:]
    assert "requeue" not in (calls.read_text() if calls.exists() else ""), "SIGTERM must not requeue"


def test_sigusr2_checkpoints_and_requeues(ws):
    calls = ws / "slurm-calls.log"
    calls.unlink(missing_ok=True)
    rc, out, summary = _train_then_signal(ws, "usr2", signal.SIGUSR2)
    assert rc == 3, out[-3000:]
    assert summary["preemption"]["signal"] == "SIGUSR2"
    assert "scontrol requeue 4242" in calls.read_text(), out[-3000:]


def test_requeue_signal_is_usr2_or_configured_never_sigterm():
    assert requeue_signal({}) == "SIGUSR2" and requeues("SIGUSR2", {}) and not requeues("SIGTERM", {})
    assert requeue_signal({"HPC_PREEMPT_SIGNAL": "usr1"}) == "SIGUSR1"
    assert requeues("SIGUSR1", {"HPC_PREEMPT_SIGNAL": "USR1"}) and not requeues("SIGUSR2", {"HPC_PREEMPT_SIGNAL": "USR1"})
    with pytest.raises(ValueError, match="other than SIGTERM"):
        requeue_signal({"HPC_PREEMPT_SIGNAL": "TERM"})



def test_default_hang_threshold_is_on_and_below_the_collective_timeout():
    from hpc.train.config import HANG_DEFAULT_S, load_config
    from hpc.train.watch import hang_threshold_s

    base = {"data": {"dir": "d"}, "model": {"family": "softmax"}}
    cfg = load_config(base)
    assert cfg.monitor.hang_s == HANG_DEFAULT_S == 120 and cfg.dist.timeout_s > HANG_DEFAULT_S
    assert hang_threshold_s(cfg) == 120
    assert hang_threshold_s(load_config(base, ["dist.timeout_s=60"])) == 30   # default, lowered
    assert hang_threshold_s(load_config(base, ["monitor.hang_s=0"])) == 0     # explicitly off


@pytest.mark.mpi
def test_a_sigstopped_rank_is_named_within_the_bound(ws):
    """2 ranks, monitor.hang_s=6: SIGSTOP rank 1; rank 0 waits in the all-reduce and the hang report
    names rank 1 within hang_s + 2 heartbeats + poll (plus start-up slack)."""
    from conftest import _bin, mpi_env

    mpiexec = _bin("mpiexec")
    if mpiexec is None:
        pytest.skip("mpiexec not found")
    run = ws / "runs" / "s" / "stop"
    hang_s, hb_s = 6, 1
    proc = subprocess.Popen([mpiexec, "-n", "2", "--oversubscribe", sys.executable, "-m", "hpc", "train",
                             str(ws / "base.yaml"), "run_id=stop", f"monitor.hang_s={hang_s}",
                             f"monitor.heartbeat_s={hb_s}", "dist.timeout_s=60"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=mpi_env(), cwd=ws)
    stopped = None
    try:
        beat = run / "heartbeat" / "rank-1.json"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                hb = json.loads(beat.read_text())
                if (hb.get("step") or 0) >= 3:
                    break
            except (OSError, ValueError):
                pass
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.2)
        stopped = int(hb["pid"])
        os.kill(stopped, signal.SIGSTOP)
        t0 = time.time()
        summary = run / "hang-report" / "summary.txt"
        while time.time() - t0 < hang_s + 2 * hb_s + 20 and not summary.exists():
            time.sleep(0.2)
        took = time.time() - t0
        if not summary.exists():  # say what each rank was doing, for a failure that shows only in CI
            beats = {b.name: b.read_text() for b in sorted((run / "heartbeat").glob("rank-*.json"))}
            os.kill(stopped, signal.SIGCONT)
            stopped = None
            proc.kill()
            out = proc.communicate(timeout=60)[0]
            pytest.fail(f"no hang report {took:.0f}s after SIGSTOP; heartbeats: {beats}; "
                        f"hang-report dir: {sorted(p.name for p in summary.parent.glob('*'))}; "
                        f"output: {out[-3000:]}")
        text = summary.read_text()
        assert "ranks behind: 1\n" in text and "rank 1: heartbeat" in text, text
        assert took < hang_s + 2 * hb_s + 15, took
    finally:
        if stopped:
            os.kill(stopped, signal.SIGCONT)
        proc.kill()
        proc.wait(timeout=60)


@pytest.mark.slurm
def test_scancel_of_a_training_job_ends_cancelled_without_restart(slurm_cluster, ws, monkeypatch, capsys):
    """On the real Slurm: `hpc cancel` of a running `hpc train` -> CANCELLED, Restarts 0, and the
    run checkpointed and did not ask for a requeue."""
    from hpc.cli import main
    from hpc.launch import slurm

    monkeypatch.setenv("HPC_HOME", str(ws / "home"))
    log = ws / "slurm-train.out"
    wrap = f"srun -n 1 {sys.executable} -m hpc train {ws / 'base.yaml'} run_id=scancel"
    out = subprocess.run(["sbatch", "--parsable", "-n", "1", "-t", "10", "-o", str(log), "--wrap", wrap],
                         capture_output=True, text=True, timeout=60, cwd=ws, check=True).stdout
    job = out.strip().split(";")[0]
    deadline = time.time() + 180
    while "steps (" not in (log.read_text(errors="ignore") if log.exists() else ""):
        assert time.time() < deadline, f"job {job} never started training: {slurm.job_state(job)}"
        time.sleep(0.5)
    time.sleep(2)
    assert main(["cancel", job]) == 0
    assert f"job {job}: CANCELLED by Slurm" in capsys.readouterr().out
    time.sleep(5)   # would a requeue come?
    assert slurm.job_state(job).split()[0] == "CANCELLED"
    if slurm.accounting_enabled():
        restarts = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "Restarts", "-j", job], capture_output=True,
                                  text=True, timeout=30).stdout.split()
        assert restarts[:1] == ["0"], restarts
    fields = slurm.job_fields(job)
    assert fields.get("Restarts", "0") == "0", fields
    deadline = time.time() + 30
    while "not requeued: SIGTERM ends the job" not in log.read_text(errors="ignore"):
        assert time.time() < deadline, log.read_text(errors="ignore")[-3000:]
        time.sleep(0.5)


def test_every_rank_agrees_on_the_signal_even_when_only_another_rank_received_it():
    """Rank 0 decides the requeue; the step's flag all-reduce tells it which kind of signal some rank
    received: a terminating one anywhere ends the job, else the requeue signal requeues it."""
    from types import SimpleNamespace

    from hpc.train.watch import RunWatch

    def watch(received):
        w = RunWatch.__new__(RunWatch)  # only the signal bookkeeping, no heartbeat or watchdog
        w.flag, w.agreed_signal = SimpleNamespace(signal_name=received), None
        return w

    r0, r1 = watch(None), watch("SIGUSR2")           # only rank 1 got USR2
    votes = [sum(v) for v in zip(r0.stop_votes(), r1.stop_votes())]
    assert votes == [1.0, 0.0]
    for w in (r0, r1):
        w.agree_signal(*votes)
    assert r0.signal_name == r1.signal_name == "SIGUSR2"

    r0, r1 = watch("SIGUSR2"), watch("SIGTERM")      # a cancel on one rank wins over USR2 on another
    votes = [sum(v) for v in zip(r0.stop_votes(), r1.stop_votes())]
    for w in (r0, r1):
        w.agree_signal(*votes)
    assert r0.signal_name == r1.signal_name == "SIGTERM"
