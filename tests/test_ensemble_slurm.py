"""Ensembles on the dev Slurm cluster: job arrays, the afterok combiner, reruns that skip."""

import subprocess

import pytest
import yaml

from hpc.launch.sbatch import SlurmResources
from hpc.registry import Registry

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def work(tmp_path_factory, slurm_cluster):
    from hpc.data.sources import shard_source
    from hpc.data.writer import WriterConfig

    # Slurm jobs run on the cluster's node: keep everything under a path it sees (this machine)
    root = tmp_path_factory.mktemp("ens-slurm")
    shard_source("sklearn:digits", root / "digits", split="train=0.8,val=0.1,test=0.1", seed=0,
                 config=WriterConfig(samples_per_shard=500))
    base = {"name": "m", "out_dir": str(root / "runs"), "data": {"dir": str(root / "digits"), "batch_size": 64},
            "model": {"family": "softmax"}, "optim": {"name": "sgd", "lr": 0.02},
            "train": {"epochs": 1, "monitor": "accuracy", "progress": False}}
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    return root


def _spec(work, name, **kw):
    p = work / f"{name}.yaml"
    p.write_text(yaml.safe_dump({"name": name, "base": "base.yaml", **kw}))
    return str(p)


def _dependency(job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return next((w for w in out.split() if w.startswith("Dependency=")), "")


def _submit(work, spec):
    from hpc.ensemble.slurm_jobs import submit_ensemble

    return submit_ensemble(spec, [], SlurmResources(time="10"), "slurm", False, str(work / "reg"))


def test_bagging_is_one_job_array_and_rerun_skips(work):
    spec = _spec(work, "sbag", method="bagging", bagging={"members": 3})
    sub = _submit(work, spec)
    members, combine = sub.jobs[:3], sub.jobs[3]
    arrays = {str(j.job_id).split("_")[0] for j in members}
    assert len(arrays) == 1 and sorted(str(j.job_id).split("_")[1] for j in members) == ["0", "1", "2"]
    assert f"afterok:{arrays.pop()}" in _dependency(str(combine.job_id))
    assert [j.result() for j in members] == ["sbag-m0@1", "sbag-m1@1", "sbag-m2@1"]
    out = combine.result()
    assert out["ensemble"] == "sbag@1"
    reg = Registry(work / "reg")
    assert reg.card("sbag@1")["ensemble"]["members"] == ["sbag-m0@1", "sbag-m1@1", "sbag-m2@1"]
    # resubmitting: the tasks find their members registered, nothing new is registered
    sub = _submit(work, spec)
    assert [j.result() for j in sub.jobs[:3]] == ["sbag-m0@1", "sbag-m1@1", "sbag-m2@1"]
    assert sub.jobs[3].result()["ensemble"] == "sbag@1"
    log = "".join(j.stdout() or "" for j in sub.jobs[:3])
    assert log.count("skipping") == 3 and "training (run" not in log
    assert reg.versions("sbag-m0") == [1] and reg.versions("sbag") == [1]


def test_stacking_is_array_plus_dependent_meta_job(work):
    spec = _spec(work, "sstack", method="stacking", stacking={"folds": 2, "meta": {"epochs": 50}})
    sub = _submit(work, spec)
    folds, meta = sub.jobs[:2], sub.jobs[2]
    array = str(folds[0].job_id).split("_")[0]
    assert {str(j.job_id).split("_")[0] for j in folds} == {array}
    assert f"afterok:{array}" in _dependency(str(meta.job_id))
    out = meta.result()
    assert out["ensemble"] == "sstack@1"
    card = Registry(work / "reg").card("sstack@1")
    assert card["ensemble"]["method"] == "stacking" and card["ensemble"]["groups"] == [[0, 1]]


def test_two_rank_members_and_a_preempted_array_task_requeues(work):
    """Members on 2 ranks each (srun --mpi=pmix); USR2 to one array task mid-run: it checkpoints,
    requeues, resumes, and the afterok combiner still registers the ensemble."""
    import json
    import time
    from pathlib import Path

    from hpc.ensemble.slurm_jobs import submit_ensemble

    spec = _spec(work, "spre", method="bagging", bagging={"members": 2})
    sub = submit_ensemble(spec, ["train.epochs=60", "train.log_every=10"],
                          SlurmResources(time="10", tasks_per_node=2), "slurm", False, str(work / "reg"))
    members, combine = sub.jobs[:2], sub.jobs[2]
    deadline = time.monotonic() + 180
    metrics = None
    while time.monotonic() < deadline:
        metrics = next((work / "runs" / "spre-m1").glob("ens-*/metrics.jsonl"), None)
        if metrics and any(json.loads(x).get("step", 0) >= 50 for x in metrics.read_text().splitlines() if x):
            break
        time.sleep(0.3)
    else:
        raise AssertionError(f"spre-m1 never reached step 50 ({metrics})")
    subprocess.run(["scancel", "--signal=USR2", str(members[1].job_id)], check=True, timeout=30)
    out = combine.result()
    assert out["ensemble"] == "spre@1" and out["members"] == ["spre-m0@1", "spre-m1@1"]
    reg = Registry(work / "reg")
    assert [reg.card(f"spre-m{i}@1")["lineage"]["world_size"] for i in range(2)] == [2, 2]
    run_dir = Path(metrics).parent
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["state"] == "completed" and summary["slurm"]["restart_count"] == 1, summary["slurm"]
    rank0 = (run_dir / "logs" / "rank-0.log").read_text()
    assert "preempted by SIGUSR2" in rank0 and "resumed from" in rank0
    resumed = int(rank0.split("resumed from")[1].split("(step ")[1].split(",")[0])
    assert 50 <= resumed < summary["total_steps"]
