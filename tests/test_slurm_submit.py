"""`hpc submit`, `hpc jobs/logs/cancel`, `hpc sweep`, `hpc schedule` and the sbatch templates on the
dev cluster, plus the refusals that must happen before anything is queued."""

from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

from hpc.cli import main
from test_slurm_preempt import REPO, make_tiny, state, wait_final

pytestmark = pytest.mark.slurm
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory, slurm_cluster):
    """A tiny config and its data."""
    root = tmp_path_factory.mktemp("slurm_submit")
    return {"root": root, "cfg": make_tiny(root, epochs=1)}


@pytest.fixture(scope="module")
def tiny(tiny_cfg):
    """... and a model trained in this process, registered as tiny@production."""
    from hpc.registry import Registry
    from hpc.train import run

    root, cfg = tiny_cfg["root"], tiny_cfg["cfg"]
    summary = run(str(cfg), ["run_id=local", "train.epochs=1"])
    reg = Registry(root / "registry")
    version = reg.add(summary["run_dir"], "tiny")
    reg.promote("tiny", version, "production")
    return {"root": root, "cfg": cfg, "registry": root / "registry", "test": root / "data" / "test"}


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("HPC_HOME", str(tmp_path / "home"))


def _queued(name: str) -> str:
    return subprocess.run(["squeue", "-h", "--states=all", "-n", name, "-o", "%i"], capture_output=True,
                          text=True, timeout=30).stdout.strip()


# ------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("args,expect", [
    (["--partition", "nosuchpart"], ["invalid partition", "--partition", "debug"]),
    (["--tasks-per-node", "512"], ["Requested node configuration is not available", "--tasks-per-node"]),
    (["--mem", "100000G"], ["Requested node configuration is not available", "--mem"]),
    (["optim.lr=-1"], ["optim.lr", "must be > 0"]),
    (["optim.nosuchkey=1"], ["nosuchkey"]),
    (["--time", "soon"], ["--time", "HH:MM:SS"]),
])
def test_refused_before_submission_with_slurms_message(tiny_cfg, capsys, args, expect):
    name = f"refuse{abs(hash(tuple(args))) % 10**6}"
    rc = main(["submit", "train", str(tiny_cfg["cfg"]), "--name", name, *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    for text in expect:
        assert text in err
    assert _queued(name) == ""  # nothing was queued


def test_infer_refused_before_submission(tiny, capsys):
    base = ["submit", "infer", "--input", str(tiny["test"]), "--output", str(tiny["root"] / "never"),
            "--infer-arg=--registry", f"--infer-arg={tiny['registry']}", "--name", "refuseinfer"]
    assert main([*base, "--model", "nosuch@production"]) == 2
    assert "nosuch" in capsys.readouterr().err
    assert main([*base, "--model", "tiny@production", "--infer-arg=--format=xml"]) == 2
    assert "--format" in capsys.readouterr().err
    assert main(["submit", "infer", "--model", "tiny@production", "--input", str(tiny["root"]),
                 "--output", "x", "--infer-arg=--registry", f"--infer-arg={tiny['registry']}"]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert _queued("refuseinfer") == ""


def test_missing_sbatch_is_refused(tiny_cfg, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["submit", "train", str(tiny_cfg["cfg"])]) == 2
    assert "`sbatch` not found" in capsys.readouterr().err


def test_debug_mode_is_one_rank(tiny_cfg, capsys):
    assert main(["submit", "train", str(tiny_cfg["cfg"]), "--debug", "--tasks-per-node", "2"]) == 2
    assert "--debug runs in this process" in capsys.readouterr().err


def test_dry_run_prints_the_script_and_submits_nothing(tiny_cfg, capsys):
    from hpc.launch.sbatch import SlurmResources, render_sbatch

    assert main(["submit", "train", str(tiny_cfg["cfg"]), "--tasks-per-node", "2", "--time", "0:20:00",
                 "--name", "dryrun", "--signal-delay-s", "60", "--dry-run"]) == 0
    out = capsys.readouterr().out
    folder = tiny_cfg["root"] / "runs" / "tiny" / "slurm-%j" / "submitit"
    res = SlurmResources(tasks_per_node=2, time="0:20:00", name="dryrun", signal_delay_s=60)
    assert out == render_sbatch(res, folder, shlex.quote(sys.executable))
    assert _queued("dryrun") == ""


# ------------------------------------------------------------------------------- jobs, logs, cancel
def _chatty(lines: int, sleep_s: float) -> int:
    from hpc.dist.world import world_from_env

    w = world_from_env()
    for i in range(lines):
        print(f"rank {w.rank} of {w.size} line {i}", flush=True)
        time.sleep(sleep_s)
    return w.rank


def test_jobs_logs_cancel(slurm_cluster, tmp_path, capsys):
    from hpc.launch.jobs import record, show_logs
    from hpc.launch.sbatch import SlurmResources
    from hpc.launch.submit import submit_function

    res = SlurmResources(tasks_per_node=2, time="5", name="chatty", mpi=False)
    long = submit_function(_chatty, (100, 1.0), res, tmp_path / "long" / "%j")
    record(long.job_id, "test", tmp_path / "long", tmp_path / "long" / "%j")
    short = submit_function(_chatty, (3, 0.5), res, tmp_path / "short" / "%j")
    deadline = time.monotonic() + 90
    while "line 1" not in (long.paths.folder / f"{long.job_id}_1_log.out").read_text(errors="ignore") \
            if (long.paths.folder / f"{long.job_id}_1_log.out").exists() else True:
        assert time.monotonic() < deadline, "the long job never printed"
        time.sleep(0.5)

    assert main(["jobs"]) == 0
    row = [ln for ln in capsys.readouterr().out.splitlines() if f"| {long.job_id} " in ln]
    assert row and "RUNNING" in row[0] and str(tmp_path / "long") in row[0]

    assert main(["logs", long.job_id, "--rank", "1", "--stream", "out"]) == 0
    out = capsys.readouterr().out
    assert "rank 1 of 2 line 0" in out and "rank 0 of 2" not in out

    assert main(["cancel", long.job_id]) == 0
    assert wait_final(long.job_id, 60) == "CANCELLED"

    # --follow returns once the job has ended, with everything it printed (no index: via scontrol).
    buf = io.StringIO()
    assert show_logs(short.job_id, 0, follow=True, out=buf, poll_s=0.3, stream="out") == 0
    assert [ln for ln in buf.getvalue().splitlines() if ln.startswith("rank")] == \
        [f"rank 0 of 2 line {i}" for i in range(3)]
    assert short.results() == [0, 1]


def _fails() -> None:
    raise RuntimeError("stage failed on purpose")


def test_a_failed_stage_cancels_its_dependents(slurm_cluster, tmp_path):
    from hpc.launch.sbatch import SlurmResources
    from hpc.launch.submit import submit_function

    first = submit_function(_fails, (), SlurmResources(time="5", name="chain1", mpi=False), tmp_path / "%j")
    second = submit_function(_chatty, (1, 0.0), SlurmResources(time="5", name="chain2", mpi=False,
                             dependency=f"afterok:{first.job_id}"), tmp_path / "%j")
    assert wait_final(first.job_id, 90) == "FAILED"
    assert wait_final(second.job_id, 60) == "CANCELLED"  # --kill-on-invalid-dep: not left pending


# ------------------------------------------------------------------------------- requeue limit
def _times_out(max_requeues: int) -> dict:
    from hpc.dist.world import world_from_env
    from hpc.launch.requeue import requeue_current_job

    w = world_from_env()
    if requeue_current_job(w, reason="timeout", max_requeues=max_requeues):
        sys.exit(3)  # requeued: this run ends, the next one starts from the queue
    return {"restart": w.slurm_restart_count}


def test_timeouts_requeue_at_most_max_requeues(slurm_cluster, tmp_path):
    from hpc.launch.sbatch import SlurmResources
    from hpc.launch.slurm import job_fields
    from hpc.launch.submit import submit_function

    job = submit_function(_times_out, (1,), SlurmResources(time="5", name="timeouts", mpi=False),
                          tmp_path / "%j")
    assert job.result() == {"restart": 1}  # requeued once, then refused
    err = job.paths.stderr.read_text()
    assert "time limit: requeued (1 of at most 1)" in err
    assert "reached its time limit 2 times and max_requeues=1: NOT requeued" in err
    assert job_fields(job.job_id).get("Comment") == "hpc_timeouts=1"


# ------------------------------------------------------------------------------- sweep
def test_sweep_is_one_array_with_a_summary(tiny_cfg, capsys):
    # Two ranks per member through torch.distributed (no --mpi=pmix): rendezvous from Slurm's variables.
    rc = main(["submit", "sweep", str(tiny_cfg["cfg"]), "train.epochs=1", "dist.backend=torch", "--grid",
               "optim.lr=0.2,0.05", "--tasks-per-node", "2", "--time", "10", "--max-parallel", "2", "--wait"])
    out = capsys.readouterr().out
    assert rc == 0, out
    sweep_dir = Path(out.split("hpc sweep show ")[1].split()[0])
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["finished"] == summary["total"] == 2
    array_id = sweep_dir.name.split("-", 1)[1]
    assert [m["job_id"] for m in summary["members"]] == [f"{array_id}_0", f"{array_id}_1"]
    for m, lr in zip(summary["members"], ("0.2", "0.05")):
        assert m["params"] == {"optim.lr": lr} and m["state"] == "completed"
        assert Path(m["run_dir"]).name == f"slurm-{m['job_id']}"
        member = json.loads((Path(m["run_dir"]) / "summary.json").read_text())
        assert member["world_size"] == 2 and member["backend"] == "torch"
        assert member["slurm"]["array_task_id"] == int(m["job_id"].split("_")[1])
    losses = [m["metrics"]["val.loss"] for m in summary["members"]]
    assert losses[0] != losses[1]  # different learning rates really ran
    assert main(["sweep", "show", array_id, "--runs-root", str(tiny_cfg["root"] / "runs")]) == 0
    table = capsys.readouterr().out
    assert "2/2 members completed" in table and "optim.lr" in table and "val.loss" in table


# ------------------------------------------------------------------------------- inference + schedule
def test_infer_template_submit_infer_and_schedule(tiny, tmp_path, capsys):
    env = {**os.environ, "MODEL": "tiny@production", "INPUT": str(tiny["test"]), "OUTPUT": str(tmp_path / "plain"),
           "HPC_REGISTRY": str(tiny["registry"]), "HPC_PYTHON": sys.executable}
    plain = subprocess.run(["sbatch", "--parsable", "--ntasks-per-node=2", "--time=10",
                            f"--output={tmp_path}/plain-%j.out", str(REPO / "slurm" / "infer.sbatch")],
                           capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    plain_id = plain.stdout.strip().split(";")[0]

    assert main(["submit", "infer", "--model", "tiny@production", "--input", str(tiny["test"]),
                 "--output", str(tmp_path / "sub"), "--infer-arg=--registry", f"--infer-arg={tiny['registry']}",
                 "--time", "10"]) == 0
    sub_id = capsys.readouterr().out.split("infer: job ")[1].split()[0]

    root = tmp_path / "scored"
    assert main(["schedule", "infer", "--cron", "* * * * *", "--model", "tiny@production", "--input",
                 str(tiny["test"]), "--output", str(root), "--registry", str(tiny["registry"]),
                 "--name", "every-minute", "--time", "10", "--run-now"]) == 0
    out = capsys.readouterr().out
    sched_id = out.split("submitted one run now: job ")[1].split()[0]
    if "not installed" in out:
        # No scrontab here (Debian's slurm-client lacks it): validate the printed crontab line's
        # sbatch options with Slurm itself; the job itself ran once through sbatch above.
        line = [ln for ln in out.splitlines() if ln.startswith("* * * * * sbatch ")][0]
        tokens = shlex.split(line)
        assert tokens[5] == "sbatch"
        opts = tokens[6:tokens.index("--wrap")]
        check = subprocess.run(["sbatch", "--test-only", *opts, "--wrap", "true"], capture_output=True,
                               text=True, timeout=60)
        assert check.returncode == 0, check.stderr
    else:
        assert main(["schedule", "remove", "every-minute"]) == 0

    for job_id, name in ((plain_id, "infer.sbatch"), (sub_id, "hpc submit infer"), (sched_id, "schedule")):
        assert wait_final(job_id, 180) == "COMPLETED", f"{name} job {job_id}: {state(job_id)}"
    assert (tmp_path / "plain" / "_SUCCESS").is_file() and (tmp_path / "sub" / "_SUCCESS").is_file()
    latest = root / "latest"
    assert latest.is_symlink() and (latest / "_SUCCESS").is_file()
    assert os.readlink(latest).endswith(f"-{sched_id}")
