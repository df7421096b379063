"""Multi-node scoring on the dev cluster's two nodes (n1, n2: `slurm/dev-cluster.sh up --nodes 2`).

`hpc submit infer --nodes 2 --tasks-per-node 2` runs 4 scoring ranks as Slurm tasks (srun
--mpi=pmix; ranks 0-1 on the first node, 2-3 on the second): every partition is written once, by
the rank it was assigned to, and the output equals a local 1-process `hpc infer` of the same model
and input file for file and row for row. A second job of the same command whose second node's
tasks are SIGKILLed mid-run fails on every rank (srun names the lost node and ranks), leaves no
partial file where readers look, and rerunning the same command gives the clean run's files byte
for byte (all but `_MANIFEST.json` and `_SUCCESS`, which record times, nodes and per-rank timing:
docs/infer.md "Multi-node scoring").
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import mpi_env
from hpc.cli import main
from hpc.data.manifest import load_manifest
from hpc.data.partition import assign_shards
from hpc.data.synth import SynthConfig, synth
from hpc.data.writer import WriterConfig
from hpc.infer.output import _lock, lock_holder, sidecar_path
from hpc.registry import Registry
from test_registry import make_run_dir
from test_slurm_multinode import kill_node_tasks, srun_task_ends, two_nodes  # noqa: F401 (a fixture)
from test_slurm_preempt import wait_final

FEATURES, CLASSES, SHARDS, RANKS = 6, 3, 16, 4
# The killed job sleeps this long after each published partition (the test hook of hpc.infer.job),
# so once every rank has published one, the kill lands mid-run whatever the machine's load.
HOLD_S = "30"
METADATA = ("_MANIFEST.json", "_SUCCESS")  # times, nodes, per-rank timing: differ between runs


def submit(*args: str, env: dict | None = None) -> tuple[int, str, str]:
    """`hpc submit infer ARGS` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        for k, v in (env or {}).items():
            mp.setenv(k, v)  # sbatch hands the submitting environment to the job
        rc = main(["submit", "infer", *args])
    return rc, out.getvalue(), err.getvalue()


def job_id(stdout: str) -> str:
    return stdout.split("infer: job ")[1].split()[0]


def files(out: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``out``."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def strip(hashes: dict[str, str]) -> dict[str, str]:
    """``files()`` without the run records (METADATA): what must be byte-identical between runs."""
    return {k: v for k, v in hashes.items() if k not in METADATA}


def visible(out: Path) -> list[str]:
    """What pandas / pyarrow datasets read: names not starting with ``_`` or ``.``."""
    return sorted(p.name for p in out.iterdir() if not p.name.startswith(("_", ".")))


def squeue_line(job: str) -> str:
    return subprocess.run(["squeue", "-h", "--states=all", "-j", job, "-o", "%i %j %T %N %M"],
                          capture_output=True, text=True, timeout=30).stdout.strip()


@pytest.fixture(scope="module")
def scored(two_nodes, tmp_path_factory):
    """A clean 2-node job, a local 1-process `hpc infer`, and a 2-node job whose second node's tasks
    are killed once every rank has published a partition, then rerun with the same command."""
    root = tmp_path_factory.mktemp("infer_multinode")
    ms = synth(SynthConfig(kind="tabular", samples=2 * SHARDS * 40, features=FEATURES, classes=CLASSES, seed=5),
               root / "data", split="train=0.5,test=0.5", writer=WriterConfig(samples_per_shard=40))
    split = root / "data" / "test"
    assert len(ms["test"].shards) == SHARDS
    reg = Registry(root / "reg")
    reg.add(make_run_dir(root / "run", schema=ms["train"].schema(), stats=ms["train"].stats), "clf")
    reg.promote("clf", 1, "production")
    home = {"HPC_HOME": str(root / "home")}

    def command(out: Path, name: str = "infer-mn") -> list[str]:
        return ["--model", "clf@production", "--input", str(split), "--output", str(out), "--nodes", "2",
                "--tasks-per-node", "2", "--time", "10", "--name", name, "--infer-arg=--batch-size=16",
                f"--infer-arg=--registry={reg.root}"]

    clean, killed, local, nproc = (root / n for n in ("clean", "killed", "local", "nproc"))
    jobs: dict[str, str] = {}
    ref = None
    try:
        rc, out, err = submit(*command(clean), env=home)
        assert rc == 0, err
        jobs["clean"] = job_id(out)
        rc, out, err = submit(*command(killed), env={**home, "HPC_INFER_TEST_DELAY_S": HOLD_S})
        assert rc == 0, err
        jobs["killed"] = job_id(out)
        # The other mode: ONE Slurm task that starts 2 local MPI ranks (`hpc infer --nproc 2`).
        rc, out, err = submit(*command(nproc)[:6], "--time", "10", "--name", "infer-nproc", "--infer-arg=--nproc=2",
                              "--infer-arg=--batch-size=16", f"--infer-arg=--registry={reg.root}", env=home)
        assert rc == 0, err
        jobs["nproc"] = job_id(out)
        # The reference: `hpc infer` in one process with one thread (the job's tasks get
        # OMP_NUM_THREADS=--cpus-per-task=1), while the Slurm jobs run.
        ref = subprocess.Popen([sys.executable, "-m", "hpc", "infer", "--model", "clf@production", "--input",
                                str(split), "--output", str(local), "--batch-size", "16", "--registry", str(reg.root)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=mpi_env({"OMP_NUM_THREADS": "1"}))

        # Kill the second node's tasks once every rank has published one partition (each then sleeps).
        counts = [s.samples for s in load_manifest(split).shards]
        firsts = [shards[0] for shards in assign_shards(counts, RANKS)]
        deadline = time.monotonic() + 240
        while not all(sidecar_path(killed, s).exists() for s in firsts):
            assert time.monotonic() < deadline, \
                f"job {jobs['killed']} never published a partition per rank: {squeue_line(jobs['killed'])}"
            time.sleep(0.2)
        # While it runs, the same command is refused before submission: the output has a live owner.
        busy = submit(*command(killed, "infer-mn-busy"), env=home)
        running = squeue_line(jobs["killed"])
        victims = kill_node_tasks(jobs["killed"], two_nodes[1])
        t_kill = time.monotonic()
        failed = wait_final(jobs["killed"], timeout=120)
        fail_s = time.monotonic() - t_kill
        after_kill = {"files": files(killed), "visible": visible(killed),
                      "ls": sorted(p.name for p in killed.iterdir())}

        for name, out_dir in (("clean", clean), ("nproc", nproc)):
            log = root / f"{out_dir.name}.submitit-{jobs[name]}" / f"{jobs[name]}_0_log.err"
            assert wait_final(jobs[name], timeout=240) == "COMPLETED", log.read_text()[-3000:]
        _, err = ref.communicate(timeout=240)
        assert ref.returncode == 0, err[-3000:]

        rc, out, err = submit(*command(killed), "--wait", env=home)
        assert rc == 0, out + err
        jobs["rerun"] = job_id(out)
        assert wait_final(jobs["rerun"], timeout=60) == "COMPLETED"
    finally:  # a failed setup leaves nothing running on the shared cluster
        if ref is not None and ref.poll() is None:
            ref.kill()
        if jobs:
            subprocess.run(["scancel", *jobs.values()], capture_output=True, timeout=30)
    for name, j in jobs.items():
        print(f"{name}: {squeue_line(j)}")
    return {"root": root, "clean": clean, "nproc": nproc, "killed": killed, "local": local, "jobs": jobs,
            "victims": victims, "failed": failed, "fail_s": fail_s, "after_kill": after_kill, "busy": busy,
            "running": running, "nodes": two_nodes, "counts": counts, "command": command, "home": home}


def test_submit_probe_names_a_live_owner_and_creates_nothing(tmp_path):
    out = tmp_path / "out"
    assert lock_holder(out) is None  # no directory: nobody writes there
    out.mkdir()
    claim = _lock(out)  # a running job's claim
    assert lock_holder(out) == f"pid {os.getpid()} on {socket.gethostname()}"
    claim.release()
    assert lock_holder(out) is None and os.listdir(out) == []


@pytest.mark.slurm
def test_refused_before_submission_and_the_script(scored, tmp_path):
    command, home = scored["command"], scored["home"]
    rc, out, err = submit(*command(tmp_path / "dry"), "--dry-run", env=home)
    assert rc == 0, err
    assert "#SBATCH --nodes=2" in out and "#SBATCH --ntasks-per-node=2" in out
    assert "--mpi=pmix --kill-on-bad-exit=1" in out  # one task lost ends the step
    rc, _, err = submit(*command(tmp_path / "x", "infer-mn-refused"), "--infer-arg=--nproc=2", env=home)
    assert rc == 2 and "give one or the other" in err, err
    (tmp_path / "afile").write_text("")
    rc, _, err = submit(*command(tmp_path / "afile", "infer-mn-refused"), env=home)
    assert rc == 2 and "is a file, not a directory" in err, err
    assert subprocess.run(["squeue", "-h", "--states=all", "-n", "infer-mn-refused", "-o", "%i"], capture_output=True,
                          text=True, timeout=30).stdout.strip() == ""


@pytest.mark.slurm
@pytest.mark.slow
def test_two_node_job_writes_each_partition_once_and_equals_a_local_run(scored):
    n1, n2 = scored["nodes"]
    clean, local = scored["clean"], scored["local"]
    man = json.loads((clean / "_MANIFEST.json").read_text())
    manifest_sha = hashlib.sha256((clean / "_MANIFEST.json").read_bytes()).hexdigest()
    assert (clean / "_SUCCESS").read_text().strip() == manifest_sha
    # 4 ranks as Slurm tasks: 0-1 on the first node, 2-3 on the second.
    ranks = sorted(man["ranks"], key=lambda r: r["rank"])
    assert man["world_size"] == RANKS
    assert [(r["rank"], r["node"], r["node_rank"]) for r in ranks] == \
        [(0, n1, 0), (1, n1, 0), (2, n2, 1), (3, n2, 1)]
    job = scored["jobs"]["clean"]
    log = (clean.parent / f"clean.submitit-{job}" / f"{job}_0_log.out").read_text()
    assert f"{RANKS} rank(s) on 2 node(s): {n1} rank(s) 0-1, {n2} rank(s) 2-3" in log, log[-2000:]
    # Each partition written exactly once, by the rank it was assigned to; nothing skipped.
    assign = assign_shards(scored["counts"], RANKS)
    assert [r["written_parts"] for r in ranks] == assign and all(r["skipped"] == 0 for r in ranks)
    assert sorted(s for r in ranks for s in r["written_parts"]) == list(range(SHARDS))
    assert visible(clean) == [f"part-{s:05d}.parquet" for s in range(SHARDS)]
    assert sorted(p.name for p in clean.iterdir() if p.name.startswith(("_", "."))) == \
        ["_JOB.json", "_MANIFEST.json", "_SUCCESS", "_parts"]  # no _LOCK, no .*.tmp
    # Equal to the local 1-process run: the same files (partitions, sidecars, job identity) ...
    ours, theirs = files(clean), files(local)
    assert json.loads((local / "_MANIFEST.json").read_text())["world_size"] == 1
    assert strip(ours) == strip(theirs)
    assert man["partitions"] == json.loads((local / "_MANIFEST.json").read_text())["partitions"]
    # ... and the same rows read back with pandas, every input row once.
    a = pd.read_parquet(clean).sort_values(["shard", "index"]).reset_index(drop=True)
    b = pd.read_parquet(local).sort_values(["shard", "index"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert list(a["row_id"]) == list(range(sum(scored["counts"])))
    print(f"clean job {scored['jobs']['clean']}: " + ", ".join(f"rank {r['rank']} on {r['node']} wrote "
                                                              f"{r['written_parts']}" for r in ranks))


@pytest.mark.slurm
@pytest.mark.slow
def test_killing_one_nodes_tasks_fails_the_job_and_the_rerun_is_byte_identical(scored):
    n1, n2 = scored["nodes"]
    killed, clean, job = scored["killed"], scored["clean"], scored["jobs"]["killed"]
    # While the job ran, submitting the same command was refused before anything was queued.
    rc, _, err = scored["busy"]
    assert rc == 2 and "another hpc infer is writing this directory" in err, err
    assert subprocess.run(["squeue", "-h", "--states=all", "-n", "infer-mn-busy", "-o", "%i"], capture_output=True,
                          text=True, timeout=30).stdout.strip() == ""
    # The second node's tasks were ranks 2 and 3; the job failed (not its 10-minute limit), every
    # rank ended non-zero, and srun's log names the lost node and ranks.
    assert scored["victims"] == [2, 3] and scored["failed"] == "FAILED", scored
    ends = srun_task_ends((killed.parent / f"killed.submitit-{job}" / f"{job}_0_log.err").read_text())
    assert ends.get(2) == ends.get(3) == f"{n2}: Killed", ends
    assert set(ends) == {0, 1, 2, 3}, ends
    # Ranks 0-1 were holding after their first partition, outside any collective: srun
    # --kill-on-bad-exit ended them (without it they would score on and fail at the final barrier).
    assert ends[0] == ends[1] == f"{n1}: Killed", ends
    # Nothing partial where readers look: no _SUCCESS/_MANIFEST.json, and every visible file is a
    # complete partition, the very bytes of the clean run's (published by temp name + fsync + rename).
    after, want = scored["after_kill"], files(clean)
    assert "_SUCCESS" not in after["ls"] and "_MANIFEST.json" not in after["ls"]
    assert RANKS <= len(after["visible"]) < SHARDS, after["visible"]
    assert all(after["files"][n] == want[n] for n in after["visible"])
    # The rerun (same command) kept every rank's published partitions and wrote the rest.
    man = json.loads((killed / "_MANIFEST.json").read_text())
    assert man["world_size"] == RANKS and all(r["skipped"] >= 1 for r in man["ranks"]), man["ranks"]
    assert sum(r["written"] for r in man["ranks"]) + sum(r["skipped"] for r in man["ranks"]) == SHARDS
    # Byte-identical to the clean run: same names, same sha256 (all but the run records in METADATA).
    got = files(killed)
    assert strip(got) == strip(want)
    assert set(got) == set(want)  # no _LOCK, no .*.tmp left, in OUT or OUT/_parts
    assert man["partitions"] == json.loads((clean / "_MANIFEST.json").read_text())["partitions"]
    print(f"job {job} ({scored['running']}): killed ranks {scored['victims']} on {n2}; {scored['failed']} "
          f"{scored['fail_s']:.1f}s later; srun: {ends}; rerun {scored['jobs']['rerun']}: "
          + ", ".join(f"rank {r['rank']} on {r['node']} skipped {r['skipped']} wrote {r['written']}"
                      for r in sorted(man["ranks"], key=lambda r: r["rank"])))


@pytest.mark.slurm
@pytest.mark.slow
def test_nproc_mode_is_one_task_starting_local_ranks_with_the_same_output(scored):
    nproc, clean = scored["nproc"], scored["clean"]
    man = json.loads((nproc / "_MANIFEST.json").read_text())
    # One Slurm task on one node; mpiexec started 2 ranks in it (not on the allocation's other nodes).
    assert man["world_size"] == 2 and len({r["node"] for r in man["ranks"]}) == 1
    logs = nproc.parent / f"nproc.submitit-{scored['jobs']['nproc']}"
    assert sorted(p.name for p in logs.glob("*_log.out")) == [f"{scored['jobs']['nproc']}_0_log.out"]
    assert strip(files(nproc)) == strip(files(clean))
