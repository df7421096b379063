"""Preemption: SIGUSR2 (Slurm's warning before the time limit, as submitit uses) and SIGTERM
(preemption/scancel) only set a flag. The trainer all-reduces the flag at step boundaries (inside
the per-step scalar all-reduce it does anyway, so it costs nothing extra), every rank checkpoints,
rank 0 asks Slurm to requeue the job, and all ranks exit with status ``EXIT_PREEMPTED``.

Doing the work in the handler instead would run collectives from inside arbitrary code (maybe a
half-finished all-reduce) on one rank only: deadlock. The flag is the whole interface.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("hpc.train")
SIGNALS = ("SIGUSR2", "SIGTERM")
EXIT_PREEMPTED = 3   # checkpointed and (under Slurm) requeued: not a success for `afterok` chains


class PreemptFlag:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handler(self, signum, frame) -> None:  # noqa: ARG002 - signal API
        self.signal_name = signal.Signals(signum).name

    def install(self) -> "PreemptFlag":
        if threading.current_thread() is not threading.main_thread():
            log.warning("not on the main thread: preemption signals are not handled")
            return self
        for name in SIGNALS:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()


def requeue(world, checkpoint_s: float | None = None) -> str:
    """Ask Slurm to requeue this job (rank 0 only); returns what happened, for the log line."""
    if not world.under_slurm:
        return "not under Slurm: not requeued (rerun with resume=auto to continue)"
    try:
        from hpc.launch.requeue import requeue_current_job
    except ImportError:
        return "hpc.launch.requeue is not available: not requeued (resubmit with resume=auto)"
    try:
        done = requeue_current_job(world, checkpoint_s=checkpoint_s)
    except Exception as e:  # a failed requeue must not lose the checkpoint we just wrote
        return f"requeue of Slurm job {world.slurm_job_id} failed: {e}"
    if not done:
        return f"Slurm job {world.slurm_job_id} not requeued (see the hpc.launch line above)"
    return f"requeued Slurm job {world.slurm_job_id}"
