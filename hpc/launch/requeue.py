"""Requeue the running Slurm job after the all-rank checkpoint (rank 0; ``hpc.launch.tasks.run_training``
calls it when a run ends preempted, and passes ``hang_requeuer`` to the trainer's hang watchdog).

Time-limit requeues are capped at ``max_requeues`` (``HPC_MAX_REQUEUES``, default 3): a job that
cannot finish within its limit would otherwise cycle forever. Preemptions are not capped: they are
the cluster's doing. Which one it was is read from the clock: a signal that arrives when the job
has less than ``signal delay + 2 min`` left is the time-limit warning (Slurm may send it up to a
minute early, and the checkpoint took some of it); anything earlier is a preemption or an
operator's ``scancel --signal``.

The timeout count survives requeues in the job's Slurm comment (``hpc_timeouts=N``), so no file
has to be shared between the old and the new run.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Callable

from hpc.launch import slurm
from hpc.launch.slurmtime import parse_slurm_time

DEFAULT_MAX_REQUEUES = 3
DEFAULT_SIGNAL_DELAY_S = 90
_COUNT = re.compile(r"hpc_timeouts=(\d+)")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def signal_delay_s() -> int:
    """Seconds between Slurm's warning signal and the time limit for this job."""
    return _env_int("HPC_SIGNAL_DELAY_S", DEFAULT_SIGNAL_DELAY_S)


def parse_duration(spec: str) -> int | None:
    """squeue's ``%L`` / scontrol's ``TimeLimit`` -> seconds; None for UNLIMITED and for what is no
    time at all (``INVALID``, ``NOT_SET``, empty): either way no time limit is known."""
    try:
        return parse_slurm_time(spec)
    except ValueError:
        return None


def classify(time_left_s: int | None, delay_s: int) -> str:
    """``"timeout"`` when the time limit is close (see module doc), else ``"preemption"`` (pure)."""
    if time_left_s is None:  # no time limit: it cannot be the time-limit warning
        return "preemption"
    return "timeout" if time_left_s <= delay_s + 120 else "preemption"


def decide(reason: str, timeouts_so_far: int, max_requeues: int) -> tuple[bool, str]:
    """(requeue?, message) for a ``reason`` given the timeouts already requeued (pure)."""
    if reason == "preemption":
        return True, "preempted: requeued (preemptions are not limited)"
    if timeouts_so_far >= max_requeues:
        return False, (f"reached its time limit {timeouts_so_far + 1} times and max_requeues={max_requeues}: "
                       "NOT requeued. The checkpoint is kept: resubmit with resume=auto and the same "
                       "run_id to continue, or raise --max-requeues / --time")
    return True, f"time limit: requeued ({timeouts_so_far + 1} of at most {max_requeues})"


def requeue_current_job(world, *, max_requeues: int | None = None, reason: str | None = None,
                        checkpoint_s: float | None = None) -> bool:
    """Rank 0: ``scontrol requeue $SLURM_JOB_ID`` unless the timeout limit is reached.

    Returns True when the job was requeued (every rank should now exit), False when it was not
    (not under Slurm, or the limit was hit; the reason is logged and printed to stderr). Other
    ranks return False without doing anything. ``checkpoint_s``, the time the last checkpoint
    took, is compared with the signal lead time (a warning when it did not fit).
    """
    if not world.under_slurm or not world.is_main:
        return False
    job_id = str(world.slurm_job_id)
    delay = signal_delay_s()
    if checkpoint_s is not None and checkpoint_s > delay:
        _say(f"warning: the checkpoint took {checkpoint_s:.0f}s, longer than the {delay}s between "
             "Slurm's warning signal and the time limit: raise --signal-delay-s or the job may be "
             "killed before its checkpoint is complete")
    limit = DEFAULT_MAX_REQUEUES if max_requeues is None else max_requeues
    limit = _env_int("HPC_MAX_REQUEUES", limit) if max_requeues is None else limit
    fields = slurm.job_fields(job_id)
    if reason is None:
        limited = parse_duration(fields.get("TimeLimit", "")) is not None
        reason = classify(_time_left(job_id) if limited else None, delay)
    if reason not in ("timeout", "preemption"):
        raise ValueError(f"requeue reason {reason!r}: one of timeout, preemption (or None to infer it)")
    comment = fields.get("Comment", "(null)")
    m = _COUNT.search(comment)
    timeouts = int(m.group(1)) if m else 0
    ok, message = decide(reason, timeouts, limit)
    if not ok:
        _say(f"Slurm job {job_id} {message}")
        return False
    if reason == "timeout":
        slurm.run(["scontrol", "update", f"jobid={job_id}", f"comment=hpc_timeouts={timeouts + 1}"])
    slurm.run(["scontrol", "requeue", job_id])
    _say(f"Slurm job {job_id} {message} (restart {world.slurm_restart_count + 1})")
    return True


def requeue_after_preemption(world, checkpoint_s: float | None = None) -> str:
    """Rank 0, after a run ended preempted (checkpointed): requeue the job under Slurm; returns
    what happened, for the log line. Never raises: a failed requeue must not lose the checkpoint."""
    if not world.under_slurm:
        return "not under Slurm: not requeued (rerun with resume=auto to continue)"
    try:
        done = requeue_current_job(world, checkpoint_s=checkpoint_s)
    except Exception as e:
        return f"requeue of Slurm job {world.slurm_job_id} failed: {e}"
    if not done:
        return f"Slurm job {world.slurm_job_id} not requeued (see the hpc.launch line above)"
    return f"requeued Slurm job {world.slurm_job_id}"


def hang_requeuer(world) -> Callable[[object], None] | None:
    """The hang watchdog's ``on_hang`` for ``monitor.on_hang=requeue``: rank 0 requeues the Slurm
    job (a time-limit requeue, counted against max_requeues) before the ranks exit; None outside
    Slurm, where there is nothing to requeue."""
    if not world.under_slurm:
        return None

    def on_hang(report) -> None:  # noqa: ARG001 - the hang report is already written
        if world.is_main:
            requeue_current_job(world, reason="timeout")

    return on_hang


def _time_left(job_id: str) -> int | None:
    out = slurm.run(["squeue", "-h", "-j", job_id, "-o", "%L"], check=False).stdout.strip()
    return parse_duration(out) if out else None


def _say(message: str) -> None:
    # stderr, not logging: it lands in the rank's Slurm log whatever logging setup the caller has.
    print(f"hpc.launch: {message}", file=sys.stderr, flush=True)
