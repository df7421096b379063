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
    from hpc.ensemble.submit import submit_ensemble

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
