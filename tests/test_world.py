"""World discovery from every launcher's variables (pure function of the environment)."""

import ast
import re
from pathlib import Path

import pytest

from hpc.dist.world import expand_nodelist, world_from_env


def test_single_process_default():
    w = world_from_env({})
    assert (w.rank, w.size, w.local_rank, w.local_size, w.launcher) == (0, 1, 0, 1, "single")
    assert not w.under_slurm and not w.distributed


@pytest.mark.parametrize("env, expect", [
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, (3, 8, 1, 2, "torchrun")),
    ({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "6", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "3"}, (5, 6, 2, 3, "openmpi")),
    ({"PMIX_RANK": "2", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_TASKS_PER_NODE": "2(x2)",
      "SLURM_NODEID": "1", "SLURM_JOB_ID": "77"}, (2, 4, 0, 2, "pmix")),
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}, (1, 2, 1, 2, "pmi")),
    ({"SLURM_PROCID": "7", "SLURM_NTASKS": "12", "SLURM_LOCALID": "3", "SLURM_STEP_ID": "0",
      "SLURM_TASKS_PER_NODE": "4(x3)", "SLURM_NODEID": "1", "SLURM_JOB_ID": "9"}, (7, 12, 3, 4, "slurm")),
])
def test_launchers(env, expect):
    w = world_from_env(env)
    assert (w.rank, w.size, w.local_rank, w.local_size, w.launcher) == expect


def test_mpi_wins_over_slurm_inside_srun_mpi():
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "SLURM_PROCID": "0",
           "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "41", "SLURM_RESTART_COUNT": "2",
           "SLURM_JOB_NODELIST": "cn[07-08]"}
    w = world_from_env(env)
    assert (w.rank, w.size, w.launcher) == (1, 2, "openmpi")
    assert w.slurm_job_id == "41" and w.slurm_restart_count == 2
    assert w.slurm_nodelist == ("cn07", "cn08") and w.master_addr == "cn07"


def test_batch_script_is_one_process():
    # The sbatch script itself has SLURM_PROCID=0 but is not inside an srun step.
    w = world_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "5"})
    assert (w.rank, w.size) == (0, 1) and w.under_slurm


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="OMPI_COMM_WORLD_RANK='x'"):
        world_from_env({"OMPI_COMM_WORLD_RANK": "x", "OMPI_COMM_WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="rank 4 is outside world size 2"):
        world_from_env({"RANK": "4", "WORLD_SIZE": "2"})


def test_expand_nodelist_at_scale():
    hosts = expand_nodelist("gpu[0001-1024],login1,cpu[1,3,5-6]")
    assert len(hosts) == 1024 + 1 + 4
    assert hosts[0] == "gpu0001" and hosts[1023] == "gpu1024"
    assert hosts[-5:] == ("login1", "cpu1", "cpu3", "cpu5", "cpu6")
    assert expand_nodelist("") == ()


def test_slurm_job_facts():
    w = world_from_env({"SLURM_JOB_ID": "15", "SLURM_ARRAY_JOB_ID": "12", "SLURM_ARRAY_TASK_ID": "3",
                        "SLURM_NTASKS": "4", "SLURM_RESTART_COUNT": "1"})
    assert (w.slurm_job_id, w.slurm_array_job_id, w.slurm_array_task_id, w.slurm_ntasks) == ("15", "12", 3, 4)
    assert (w.rank, w.size) == (0, 1)  # the batch script: not an srun step
    w = world_from_env({"SLURM_JOB_ID": "", "SLURM_ARRAY_JOB_ID": ""})
    assert w.slurm_job_id is None and w.slurm_array_job_id is None and w.slurm_ntasks is None
    assert not w.under_slurm
    with pytest.raises(ValueError, match="SLURM_NTASKS='x'"):
        world_from_env({"SLURM_NTASKS": "x"})


def _slurm_name(node) -> bool:
    """A string constant (or an f-string's head) that is a SLURM_* variable name, not a message."""
    if isinstance(node, ast.JoinedStr) and node.values:
        node = node.values[0]
    return (isinstance(node, ast.Constant) and isinstance(node.value, str)
            and re.fullmatch(r"SLURM_[A-Z0-9_]*", node.value) is not None)


def _is_env(node) -> bool:
    """``env``, ``environ``, ``os.environ`` (or ``self.env`` ...): something named like the environment."""
    name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")
    return name in ("env", "environ", "environment")


def slurm_env_reads(source: str) -> list[int]:
    """Lines of ``source`` that read a SLURM_* environment variable: ``X.get("SLURM_..")`` (also
    getenv/pop/setdefault), ``X["SLURM_.."]``, ``"SLURM_.." in X``, or a helper called with the
    environment and a SLURM_* name (``_int(env, "SLURM_NTASKS")``). Messages that mention SLURM_
    variables in text are not reads."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if fname in ("get", "getenv", "pop", "setdefault") and node.args and _slurm_name(node.args[0]):
                lines.append(node.lineno)
            elif any(_slurm_name(a) for a in node.args) and any(_is_env(a) for a in node.args):
                lines.append(node.lineno)
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and _slurm_name(node.slice):
            lines.append(node.lineno)
        elif (isinstance(node, ast.Compare) and _slurm_name(node.left)
              and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops)):
            lines.append(node.lineno)
    return sorted(set(lines))


def test_the_slurm_read_finder_is_precise():
    reads = ['os.environ.get("SLURM_JOB_ID")', "os.environ['SLURM_NTASKS']", 'env.get("SLURM_X", 1)',
             'os.getenv("SLURM_JOB_ID")', '"SLURM_PROCID" in env', "environ.get(f'SLURM_{x}')",
             '_int(env, "SLURM_NTASKS")', 'int(os.environ.get(\n    "SLURM_NTASKS") or 1)']
    assert all(slurm_env_reads(s) for s in reads)
    fine = ['raise ValueError(f"SLURM_JOB_ID={job_id!r} has no digits")', 'print("scontrol requeue $SLURM_JOB_ID")',
            'env.get("MASTER_PORT")', 'os.environ.get(name)', 'x = "see SLURM_CONF"', 'w.slurm_job_id']
    assert not any(slurm_env_reads(s) for s in fine)


def test_only_world_reads_slurm_variables():
    """hpc/dist/world.py is the one reader of SLURM_* variables: everything else takes a World."""
    root = Path(__file__).resolve().parents[1] / "hpc"
    found = [f"{path.relative_to(root.parent)}:{n}" for path in sorted(root.rglob("*.py"))
             if path != root / "dist" / "world.py" for n in slurm_env_reads(path.read_text())]
    assert not found, "SLURM_* read outside hpc/dist/world.py (use hpc.dist.world_from_env()): " + ", ".join(found)


# ------------------------------------------------------------------------------- nodes
def _srun_task(rank: int, nodes: int = 2, per_node: int = 2, job: str = "88", pmix: bool = False) -> dict:
    """The variables srun gives task ``rank`` of ``srun -N nodes --ntasks-per-node per_node`` (block
    distribution), as recorded from the dev cluster's n1/n2 (sbatch also exports the job's)."""
    env = {"SLURM_JOB_ID": job, "SLURM_STEP_ID": "0", "SLURM_STEPID": "0", "SLURM_PROCID": str(rank),
           "SLURM_NTASKS": str(nodes * per_node), "SLURM_STEP_NUM_TASKS": str(nodes * per_node),
           "SLURM_NODEID": str(rank // per_node), "SLURM_LOCALID": str(rank % per_node),
           "SLURM_STEP_NUM_NODES": str(nodes), "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NNODES": str(nodes),
           "SLURM_NTASKS_PER_NODE": str(per_node), "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{nodes})",
           "SLURM_TASKS_PER_NODE": f"{per_node}(x{nodes})", "SLURM_JOB_NODELIST": f"n[1-{nodes}]",
           "SLURM_STEP_NODELIST": f"n[1-{nodes}]", "SLURMD_NODENAME": f"n{rank // per_node + 1}",
           "SLURM_LAUNCH_NODE_IPADDR": "10.1.2.3"}
    if pmix:
        env["PMIX_RANK"] = str(rank)
    return env


@pytest.mark.parametrize("pmix", [False, True], ids=["srun", "srun-pmix"])
def test_every_rank_of_a_two_node_slurm_step_knows_its_node(pmix):
    seen = []
    for rank in range(4):
        w = world_from_env(_srun_task(rank, pmix=pmix))
        seen.append((w.rank, w.size, w.node_rank, w.num_nodes, w.local_rank, w.local_size, w.node_name))
        assert w.launcher == ("pmix" if pmix else "slurm")
        assert w.first_node == "n1" and w.master_addr == "n1" and w.slurm_launch_addr == "10.1.2.3"
        assert w.slurm_nodelist == ("n1", "n2")
    assert seen == [(0, 4, 0, 2, 0, 2, "n1"), (1, 4, 0, 2, 1, 2, "n1"),
                    (2, 4, 1, 2, 0, 2, "n2"), (3, 4, 1, 2, 1, 2, "n2")]
    assert world_from_env(_srun_task(3)).placement() == "node n2 (1/2), local rank 1/2"


def test_uneven_step_uses_the_steps_tasks_on_this_node():
    # srun -N 2 -n 4 on the dev cluster: Slurm allocates 3+1 (cons_tres packs); the job was submitted
    # with --ntasks-per-node=2, which the step does not follow, so the step's own layout must win.
    env = dict(_srun_task(3), SLURM_STEP_TASKS_PER_NODE="3,1", SLURM_NODEID="1", SLURM_LOCALID="0")
    w = world_from_env(env)
    assert (w.node_rank, w.num_nodes, w.local_rank, w.local_size) == (1, 2, 0, 1)
    env = dict(_srun_task(2), SLURM_STEP_TASKS_PER_NODE="3,1", SLURM_NODEID="0", SLURM_LOCALID="2")
    assert world_from_env(env).local_size == 3
    # A step on the second node only: rank 0 (and the rendezvous) is there, not on the job's first node.
    env = dict(_srun_task(0), SLURM_STEP_NODELIST="n2", SLURM_STEP_NUM_NODES="1", SLURM_STEP_NUM_TASKS="1",
               SLURM_STEP_TASKS_PER_NODE="1", SLURM_NODEID="0", SLURMD_NODENAME="n2")
    w = world_from_env(env)
    assert (w.size, w.node_rank, w.num_nodes, w.local_size, w.first_node) == (1, 0, 1, 1, "n2")


def test_openmpi_ranks_fill_nodes_in_order_and_ignore_inherited_slurm_variables():
    # mpiexec -n 4 over 2 nodes inside an sbatch job: every rank inherits the batch step's
    # SLURM_NODEID=0 and SLURMD_NODENAME=n1; only Open MPI's own variables describe the rank.
    inherited = {"SLURM_JOB_ID": "5", "SLURM_NODEID": "0", "SLURMD_NODENAME": "n1", "SLURM_JOB_NODELIST": "n[1-2]",
                 "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_STEP_ID": "0"}
    got = []
    for rank in range(4):
        env = dict(inherited, OMPI_COMM_WORLD_RANK=str(rank), OMPI_COMM_WORLD_SIZE="4",
                   OMPI_COMM_WORLD_LOCAL_RANK=str(rank % 2), OMPI_COMM_WORLD_LOCAL_SIZE="2")
        w = world_from_env(env)
        got.append((w.node_rank, w.num_nodes, w.local_rank, w.local_size))
        assert w.launcher == "openmpi" and w.node_name == w.hostname  # not the inherited n1
        assert w.first_node == "n1" and w.slurm_launch_addr is None
    assert got == [(0, 2, 0, 2), (0, 2, 1, 2), (1, 2, 0, 2), (1, 2, 1, 2)]


def test_torchrun_node_rank_is_its_group_rank():
    got = []
    for node in range(3):
        for local in range(2):
            w = world_from_env({"RANK": str(2 * node + local), "WORLD_SIZE": "6", "LOCAL_RANK": str(local),
                                "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": str(node), "GROUP_WORLD_SIZE": "3",
                                "MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "29500"})
            got.append((w.rank, w.node_rank, w.num_nodes, w.local_rank, w.local_size))
            assert w.master_addr == "10.0.0.9"
    assert got == [(0, 0, 3, 0, 2), (1, 0, 3, 1, 2), (2, 1, 3, 0, 2), (3, 1, 3, 1, 2),
                   (4, 2, 3, 0, 2), (5, 2, 3, 1, 2)]
    # Without GROUP_* (an older torchrun): ranks fill the nodes in order.
    w = world_from_env({"RANK": "5", "WORLD_SIZE": "6", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (w.node_rank, w.num_nodes) == (2, 3)


def test_one_process_is_node_zero_of_one():
    w = world_from_env({})
    assert (w.node_rank, w.num_nodes, w.first_node, w.slurm_launch_addr) == (0, 1, None, None)
    # The batch script: under Slurm, not in a step; its own node name is not a rank's.
    w = world_from_env({"SLURM_JOB_ID": "5", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "n[1-2]",
                        "SLURMD_NODENAME": "n1", "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.1"})
    assert (w.rank, w.size, w.node_rank, w.num_nodes, w.first_node) == (0, 1, 0, 1, "n1")
