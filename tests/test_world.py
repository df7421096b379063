"""World discovery from every launcher's variables (pure function of the environment)."""

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
