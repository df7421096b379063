"""What we ask Slurm for, and the sbatch script it becomes (pure functions, golden-file tested).

``SlurmResources`` is the validated request (`hpc submit` flags). ``slurm_parameters(res)`` turns it
into submitit's SlurmExecutor parameters and ``render_sbatch(...)`` into the exact script submitit
submits (it calls submitit's own renderer with those parameters, so `--dry-run` cannot drift from
what a real submission sends).

Inside the job: one Slurm task per rank (``--ntasks-per-node``), srun gets ``--mpi=pmix`` when the
ranks talk through MPI, and Slurm sends USR2 ``signal_delay_s`` seconds before the time limit
(submitit's choice: NCCL may use USR1). ``HPC_SIGNAL_DELAY_S`` and ``HPC_MAX_REQUEUES`` are exported
for ``hpc.launch.requeue``.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from submitit.slurm.slurm import _make_sbatch_string

from hpc.launch.slurmtime import UNLIMITED, parse_slurm_time

_MEM = re.compile(r"^\d+(?:\.\d+)?[KMGT]?B?$", re.IGNORECASE)
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


def parse_time(spec: str) -> int | None:
    """sbatch ``--time`` -> whole minutes (rounded up), None for UNLIMITED. ``"2:00:00"`` -> 120."""
    try:
        seconds = parse_slurm_time(spec)
    except ValueError as e:
        raise ValueError(f"--time {e}") from None
    if seconds is not None and seconds <= 0:
        raise ValueError(f"--time {spec!r}: must be more than zero")
    return None if seconds is None else -(-seconds // 60)


@dataclass
class SlurmResources:
    """One job's request. ``check()`` refuses what Slurm would refuse for sure, with what to change."""

    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem: str | None = None             # per node, Slurm syntax: 32G, 4000M
    time: str = "1:00:00"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    sbatch_args: list[str] = field(default_factory=list)   # extra "--key=value" / "--flag"
    name: str = "hpc"
    signal_delay_s: int = 90            # USR2 this long before the time limit (submitit's default)
    max_requeues: int = 3               # time-limit requeues; preemptions are unlimited
    mpi: bool = True                    # srun --mpi=pmix (ranks use MPI); False: torch rendezvous
    array_parallelism: int = 256        # job arrays: members running at once (--max-parallel)
    dependency: str | None = None       # e.g. afterok:123
    kill_on_bad_exit: bool = False      # srun --kill-on-bad-exit=1: one task dead ends the step (infer)

    def check(self) -> "SlurmResources":
        for name in ("mem", "time", "partition", "account", "qos", "constraint", "name", "dependency"):
            single_line(f"--{name.replace('_', '-')}", getattr(self, name))
        for arg in self.sbatch_args:
            single_line("--sbatch-arg", arg)
        for name in ("nodes", "tasks_per_node", "cpus_per_task"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} {v!r}: must be a positive integer")
        if not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 0:
            raise ValueError(f"--gpus-per-node {self.gpus_per_node!r}: must be 0 or a positive integer")
        if self.mem is not None and not _MEM.match(self.mem):
            raise ValueError(f"--mem {self.mem!r}: use Slurm's syntax, a number with an optional unit "
                             "K, M, G or T (e.g. 32G, 4000M)")
        minutes = parse_time(self.time)
        if not _NAME.match(self.name):
            raise ValueError(f"--name {self.name!r}: use letters, digits and _.+- only")
        if not isinstance(self.signal_delay_s, int) or self.signal_delay_s < 0:
            raise ValueError(f"--signal-delay-s {self.signal_delay_s!r}: must be >= 0 seconds")
        if minutes is not None and self.signal_delay_s >= minutes * 60:
            raise ValueError(f"--signal-delay-s {self.signal_delay_s}: the warning signal would come "
                             f"before the job starts (--time {self.time} = {minutes * 60}s); lower it "
                             "or raise --time")
        if not isinstance(self.max_requeues, int) or self.max_requeues < 0:
            raise ValueError(f"--max-requeues {self.max_requeues!r}: must be >= 0")
        if not isinstance(self.array_parallelism, int) or self.array_parallelism < 1:
            raise ValueError(f"--max-parallel {self.array_parallelism!r}: must be a positive integer")
        extra_params(self.sbatch_args)
        return self

    @property
    def ntasks(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def minutes(self) -> int | None:
        """The time limit in minutes; None for UNLIMITED."""
        return parse_time(self.time)

    @property
    def sbatch_time(self) -> int | str:
        """What ``--time=`` gets: minutes, or UNLIMITED."""
        m = self.minutes
        return UNLIMITED if m is None else m


# Flags that submitit or this module already set: letting --sbatch-arg change them would break
# the job's layout or its log paths.
_RESERVED = {"output", "error", "open-mode", "signal", "array", "ntasks-per-node", "nodes", "job-name",
             "time", "partition", "account", "qos", "constraint", "mem", "cpus-per-task",
             "gpus-per-node", "dependency", "wckey", "ntasks", "n", "N", "o", "e", "J", "t", "p"}


def single_line(what: str, value: object) -> None:
    """Every value lands on one ``#SBATCH`` / script line: a newline (or any control character)
    in it would add lines of its own to the rendered script (command injection). Refused."""
    if isinstance(value, str) and any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"{what} {value!r}: contains a newline or control character; every value "
                         "must be one line of the sbatch script")


def extra_params(args: list[str]) -> dict[str, object]:
    """``["--reservation=r1", "--exclusive"]`` -> ``{"reservation": "r1", "exclusive": True}``."""
    out: dict[str, object] = {}
    for arg in args:
        single_line("--sbatch-arg", arg)
        if not arg.startswith("--") or len(arg) < 3:
            raise ValueError(f"--sbatch-arg {arg!r}: expected a long sbatch option such as "
                             "--reservation=NAME or --exclusive")
        key, sep, value = arg[2:].partition("=")
        if key in _RESERVED:
            raise ValueError(f"--sbatch-arg {arg!r}: --{key} is set by hpc submit; use its own flag "
                             "(see `hpc submit train --help`)")
        out[key] = value if sep else True
    return out


def slurm_parameters(res: SlurmResources) -> dict:
    """submitit SlurmExecutor parameters for ``res`` (pure)."""
    res.check()
    params: dict = {
        "job_name": res.name,
        "time": res.sbatch_time,
        "nodes": res.nodes,
        "ntasks_per_node": res.tasks_per_node,
        "cpus_per_task": res.cpus_per_task,
        "signal_delay_s": res.signal_delay_s,
        # Torch/BLAS threads: one per CPU Slurm gave the task, not one per core of the node.
        "setup": [f"export HPC_SIGNAL_DELAY_S={res.signal_delay_s}",
                  f"export HPC_MAX_REQUEUES={res.max_requeues}",
                  f"export OMP_NUM_THREADS={res.cpus_per_task}"],
        "array_parallelism": res.array_parallelism,
    }
    if res.mpi:
        params["srun_args"] = ["--mpi=pmix"]
    if res.kill_on_bad_exit:
        # A task that dies (SIGKILL, a lost node, a non-zero exit) ends the whole step at once; by
        # default srun leaves the others running until their next collective finds the peer gone.
        params["srun_args"] = [*params.get("srun_args", []), "--kill-on-bad-exit=1"]
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    for key in ("mem", "partition", "account", "qos", "constraint", "dependency"):
        value = getattr(res, key)
        if value:
            params[key] = value
    extra = extra_params(res.sbatch_args)
    if res.dependency:
        # A stage whose dependency failed can never run: let Slurm cancel it instead of leaving it
        # pending forever ("a failed stage cancels the rest").
        extra.setdefault("kill-on-invalid-dep", "yes")
    if extra:
        params["additional_parameters"] = extra
    return params


def submitit_command(python: str, folder: str | Path) -> str:
    """The command submitit puts after ``srun`` (SlurmExecutor._submitit_command_str)."""
    return " ".join([shlex.quote(python), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def render_sbatch(res: SlurmResources, folder: str | Path, python: str, array_size: int | None = None) -> str:
    """The sbatch script submitit submits for ``res`` with logs in ``folder`` (pure)."""
    params = slurm_parameters(res)
    single_line("the log folder", str(folder))
    single_line("the python executable", python)
    if array_size is not None:
        params["map_count"] = array_size
    return _make_sbatch_string(command=submitit_command(python, folder), folder=folder, **params)
