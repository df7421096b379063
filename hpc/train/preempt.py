"""Preemption: SIGUSR2 (Slurm's warning before the time limit, as submitit uses) and SIGTERM
(preemption/scancel) only set a flag. The trainer all-reduces the flag at step boundaries (inside
the per-step scalar all-reduce it does anyway, so it costs nothing extra), every rank checkpoints
and the run ends with state ``preempted``; the launch layer (``hpc.launch.tasks.run_training``)
then has rank 0 ask Slurm to requeue the job, and all ranks exit with status ``EXIT_PREEMPTED``.

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
