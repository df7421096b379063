"""Pure parts of hpc.launch: requeue decisions, sweep grids and tables, scrontab entries, `latest`."""

from __future__ import annotations

import os
import threading

import pytest

from hpc.launch import requeue, schedule, sweep
from hpc.launch.sbatch import SlurmResources
from hpc.launch.tasks import job_run_id, with_run_id


# ------------------------------------------------------------------------------- requeue
@pytest.mark.parametrize("spec,seconds", [("00:05:00", 300), ("1-02:03:04", 93784), ("4:59", 299),
                                          ("UNLIMITED", None), ("INVALID", None), ("", None)])
def test_parse_duration(spec, seconds):
    assert requeue.parse_duration(spec) == seconds


def test_classify_uses_the_time_left():
    assert requeue.classify(None, 90) == "preemption"          # no time limit
    assert requeue.classify(90 + 120, 90) == "timeout"         # the warning signal's window
    assert requeue.classify(90 + 121, 90) == "preemption"
    assert requeue.classify(30, 300) == "timeout"


def test_decide_caps_timeouts_not_preemptions():
    for n in range(10):
        assert requeue.decide("preemption", n, 3)[0] is True
    assert [requeue.decide("timeout", n, 3)[0] for n in range(5)] == [True, True, True, False, False]
    ok, msg = requeue.decide("timeout", 3, 3)
    assert not ok and "max_requeues=3" in msg and "NOT requeued" in msg and "resume=auto" in msg
    assert requeue.decide("timeout", 0, 0)[0] is False


def test_requeue_outside_slurm_or_off_rank0_does_nothing():
    from hpc.dist.world import World

    assert requeue.requeue_current_job(World()) is False
    assert requeue.requeue_current_job(World(rank=1, size=2, slurm_job_id="999999")) is False


def test_run_id_matches_submitit_job_id():
    from hpc.dist.world import world_from_env

    assert job_run_id(world_from_env({"SLURM_JOB_ID": "12"})) == "slurm-12"
    assert job_run_id(world_from_env({"SLURM_JOB_ID": "15", "SLURM_ARRAY_JOB_ID": "12",
                                      "SLURM_ARRAY_TASK_ID": "3"})) == "slurm-12_3"
    assert job_run_id(world_from_env({"SLURM_JOB_ID": "16", "SLURM_ARRAY_JOB_ID": "16",
                                      "SLURM_ARRAY_TASK_ID": "0"})) == "slurm-16_0"
    assert job_run_id(world_from_env({})) is None
    assert with_run_id(["a=1"], "slurm-1") == ["a=1", "run_id=slurm-1"]
    assert with_run_id(["run_id=mine"], "slurm-1") == ["run_id=mine"]


def test_train_task_fails_the_job_when_training_fails(monkeypatch):
    import hpc.train
    from hpc.launch import tasks

    seen = {}

    def fake_run(config, overrides, **kw):
        seen["overrides"] = overrides
        return {"state": "failed", "reason": "non-finite loss", "run_dir": "/r"}

    monkeypatch.setattr(hpc.train, "run", fake_run)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    with pytest.raises(RuntimeError, match="training ended failed: non-finite loss"):
        tasks.train_task("cfg.yaml", ["a=1"])
    assert seen["overrides"] == ["a=1", "run_id=slurm-77"]
    monkeypatch.setattr(hpc.train, "run", lambda c, o, **kw: {"state": "preempted"})
    monkeypatch.delenv("SLURM_JOB_ID")  # not under Slurm: no requeue of a real job 77
    with pytest.raises(SystemExit) as e:
        tasks.train_task("cfg.yaml", [])
    assert e.value.code == 3


# ------------------------------------------------------------------------------- sweeps
def test_expand_grid_is_the_product_in_order():
    pts = sweep.expand_grid(["optim.lr=0.1,0.01", "train.epochs=1,2,3"])
    assert len(pts) == 6
    assert pts[0] == {"optim.lr": "0.1", "train.epochs": "1"} and pts[-1] == {"optim.lr": "0.01", "train.epochs": "3"}
    assert sweep.point_overrides(pts[1]) == ["optim.lr=0.1", "train.epochs=2"]


@pytest.mark.parametrize("specs", [[], ["lr"], ["=1,2"], ["lr="], ["lr=1,,2"], ["lr=1,1"], ["a=1", "a=2"]])
def test_expand_grid_rejects(specs):
    with pytest.raises(ValueError):
        sweep.expand_grid(specs)


def test_summarize_and_table(tmp_path):
    from hpc.util.io import atomic_write_json

    members = []
    for i, lr in enumerate(["0.1", "0.01", "0.001"]):
        rd = tmp_path / f"slurm-7_{i}"
        members.append({"index": i, "params": {"optim.lr": lr}, "job_id": f"7_{i}", "run_dir": str(rd)})
        if i < 2:  # the third member has not finished
            metrics = {"val": {"loss": 1.0 / (i + 1)}, "test": {"accuracy": 0.5 + i / 10}}
            atomic_write_json(rd / "summary.json", {"state": "completed", "metrics": metrics})
    sweep.write_sweep(tmp_path, "cfg.yaml", [], members)
    result = sweep.summarize(tmp_path)
    assert result["finished"] == 2 and result["total"] == 3
    assert (tmp_path / "summary.json").is_file()
    headers, rows = sweep.table(result)
    assert headers == ["#", "job", "optim.lr", "state", "test.accuracy", "val.loss"]
    assert rows[1] == [1, "7_1", "0.01", "completed", 0.6, 0.5]
    assert rows[2][3] == "pending" and rows[2][4:] == ["", ""]
    assert sweep.find_sweep(str(tmp_path)) == tmp_path
    with pytest.raises(ValueError, match="not a sweep"):
        sweep.find_sweep("424242", [str(tmp_path)])


# ------------------------------------------------------------------------------- schedules
# Cron expressions, next run times and the crontab line as cron runs it: tests/test_schedule_cron.py.
def _sched(tmp_path, name="nightly") -> schedule.Schedule:
    return schedule.Schedule(name=name, cron="0 2 * * *", model="digits@production", input=str(tmp_path / "in"),
                             output=str(tmp_path / "out"), res=SlurmResources(tasks_per_node=2, time="30",
                             partition="debug"), cwd="/work dir", python="/venv/bin/python").check()


def test_scrontab_block_roundtrip_keeps_other_entries(tmp_path):
    s = _sched(tmp_path)
    block = schedule.render_block(s)
    assert block.splitlines()[0] == "# hpc-schedule nightly" and block.splitlines()[-1] == "# hpc-schedule end nightly"
    assert "#SCRON --job-name=hpc-sched-nightly" in block and "#SCRON --partition=debug" in block
    cron_line = [ln for ln in block.splitlines() if not ln.startswith("#")][0]
    assert cron_line.startswith("0 2 * * * cd '/work dir' && /venv/bin/python -m hpc.launch.schedule ")
    assert "--model digits@production" in cron_line and "--ntasks 2" in cron_line
    other = "# mine\n30 1 * * * echo hi\n"
    text = other + block + schedule.render_block(_sched(tmp_path, "other"))
    blocks = schedule.parse_blocks(text)
    assert list(blocks) == ["nightly", "other"] and blocks["nightly"] == block
    assert schedule.remove_block(text, "nightly") == other + schedule.render_block(_sched(tmp_path, "other"))
    assert schedule.remove_block(other, "nightly") == other


def test_schedule_check_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="--model"):
        schedule.Schedule("n", "0 2 * * *", "digits", "i", "o").check()
    with pytest.raises(ValueError, match="--name"):
        schedule.Schedule("a b", "0 2 * * *", "digits@1", "i", "o").check()


def test_point_latest_moves_only_to_complete_runs(tmp_path):
    root = tmp_path / "out"
    for run in ("r1", "r2"):
        (root / run).mkdir(parents=True)
        (root / run / "part-0.csv").write_text(run)
    with pytest.raises(ValueError, match="_SUCCESS"):
        schedule.point_latest(root, "r1")
    assert not (root / "latest").exists()
    (root / "r1" / "_SUCCESS").touch()
    schedule.point_latest(root, "r1")
    assert os.readlink(root / "latest") == "r1" and (root / "latest" / "part-0.csv").read_text() == "r1"
    (root / "r2" / "_SUCCESS").touch()
    # A reader polling `latest` during the swap always finds a complete run, never nothing.
    seen, stop = set(), threading.Event()

    def reader():
        while not stop.is_set():
            seen.add((root / "latest" / "part-0.csv").read_text())

    t = threading.Thread(target=reader)
    t.start()
    for i in range(200):
        schedule.point_latest(root, "r2" if i % 2 == 0 else "r1")
    stop.set()
    t.join()
    assert seen <= {"r1", "r2"}
    assert not list(root.glob(".latest.*"))
    (root / "latest").unlink()
    (root / "latest").mkdir()
    with pytest.raises(ValueError, match="not a symlink"):
        schedule.point_latest(root, "r2")


# ------------------------------------------------------------------------------- job index
def test_job_index_and_log_paths(tmp_path, monkeypatch):
    from hpc.launch import jobs

    monkeypatch.setenv("HPC_HOME", str(tmp_path / "home"))
    jobs.record("41", "train", tmp_path / "runs/x/slurm-41", tmp_path / "runs/x/slurm-%j/submitit")
    assert jobs.lookup("41")["kind"] == "train"
    out, err = jobs.log_paths("41", rank=3)
    assert out == tmp_path / "runs/x/slurm-41/submitit/41_3_log.out" and err.name == "41_3_log.err"
    for bad in ("abc", "1_2_3", "", "12;rm"):
        with pytest.raises(ValueError, match="job id"):
            jobs.check_job_id(bad)
    with pytest.raises(ValueError, match="--rank"):
        jobs.log_paths("41", rank=-1)
    (out.parent).mkdir(parents=True)
    out.write_text("rank 3 says hi\n")
    import io

    buf = io.StringIO()
    assert jobs.show_logs("41", 3, out=buf) == 0
    assert "rank 3 says hi" in buf.getvalue()
    with pytest.raises(ValueError, match="no log yet"):
        jobs.show_logs("41", 5, out=buf)


# ------------------------------------------------------------------------------- typed inference work
def _infer_cfg(tmp_path, **kw):
    from hpc.infer.job import InferConfig

    return InferConfig(**{"model": "digits@production", "input": str(tmp_path / "in"),
                          "output": str(tmp_path / "out"), **kw})


def test_infer_argv_parses_back_to_the_same_config(tmp_path):
    # The CLI parses `hpc infer` arguments into the typed config; the ranks a job starts itself
    # (launch_local, srun) get that config back as arguments: both ways agree.
    from hpc.cli.infer import parse_infer_args
    from hpc.launch.tasks import infer_argv

    for cfg in (_infer_cfg(tmp_path), _infer_cfg(tmp_path, model="a@1,b@production", format="csv", batch_size=7,
                                                   top_k=3, combine="vote", allow_unpromoted=True, overwrite=True,
                                                   registry=str(tmp_path / "reg"), device="cpu")):
        argv = infer_argv(cfg)
        assert argv[0] == "infer"
        assert parse_infer_args(argv[1:]) == (cfg, 1)
    with pytest.raises(ValueError, match="hpc infer --help"):
        parse_infer_args(["--model", "m@1", "--input", "i", "--output", "o", "--format", "xml"])
    with pytest.raises(ValueError, match="--top-k"):
        parse_infer_args(["--model", "m@1", "--input", "i", "--output", "o", "--top-k", "-1"])


def test_infer_task_runs_the_typed_config(tmp_path, monkeypatch):
    from hpc.launch import tasks

    seen = {}
    monkeypatch.setattr(tasks, "run_infer", lambda cfg, progress: seen.update(cfg=cfg, progress=progress) or
                        {"state": "done"})
    cfg = _infer_cfg(tmp_path)
    assert tasks.infer_task(cfg) == {"state": "done"}
    assert seen == {"cfg": cfg, "progress": True}
    monkeypatch.setenv("HPC_PROGRESS_S", "soon")
    with pytest.raises(ValueError, match="HPC_PROGRESS_S"):
        tasks.infer_task(cfg)


def test_scheduled_run_scores_then_moves_latest(tmp_path, monkeypatch):
    from hpc.launch import tasks

    def fake_infer_task(cfg, nproc=1):
        if "bad" in cfg.model:
            raise ValueError(f"--model {cfg.model}: no such model")
        (tmp_path / "runs.txt").open("a").write(f"{cfg.model} {cfg.input} {cfg.registry}\n")
        os.makedirs(cfg.output)
        open(os.path.join(cfg.output, "_SUCCESS"), "w").close()
        return {"state": "done"}

    monkeypatch.setattr(tasks, "infer_task", fake_infer_task)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "manifest.json").write_text("{}")  # a split: scored whole at every run
    root = tmp_path / "scored"
    dest = schedule.run_scheduled("n", "digits@production", str(tmp_path / "in"), str(root), registry="/reg")
    assert dest.name.endswith("-4242") and os.readlink(root / "latest") == dest.name
    assert (tmp_path / "runs.txt").read_text() == f"digits@production {tmp_path / 'in'} /reg\n"
    with pytest.raises(SystemExit, match="latest unchanged"):
        schedule.run_scheduled("n", "bad@production", str(tmp_path / "in"), str(root))
    assert os.readlink(root / "latest") == dest.name
