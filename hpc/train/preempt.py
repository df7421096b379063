"""Stop signals: SIGUSR2 (Slurm's warning before the time limit, as submitit uses; or the signal
named by ``$HPC_PREEMPT_SIGNAL``) and SIGTERM (``scancel``/``hpc cancel``, node shutdown, Slurm's
own preemption) only set a flag. The trainer all-reduces the flag at step boundaries (inside the
per-step scalar all-reduce it does anyway, so it costs nothing extra), every rank checkpoints and
the run ends with state ``preempted`` and the signal's name. Only the requeue signal
(``requeues(name)``: SIGUSR2 by default) makes the launch layer (``hpc.launch.tasks.run_training``)
ask Slurm to requeue the job; after SIGTERM the job just ends (a cancelled job stays cancelled;
Slurm requeues its own preemptions itself). All ranks exit with status ``EXIT_PREEMPTED``.

Doing the work in the handler instead would run collectives from inside arbitrary code (maybe a
half-finished all-reduce) on one rank only: deadlock. The flag is the whole interface.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger("hpc.train")
SIGNALS = ("SIGUSR2", "SIGTERM")
REQUEUE_SIGNAL_ENV = "HPC_PREEMPT_SIGNAL"   # the signal that means "checkpoint and requeue"


def requeue_signal(env=None) -> str:
    """``SIGUSR2`` unless ``$HPC_PREEMPT_SIGNAL`` names another (``USR1`` or ``SIGUSR1``); never SIGTERM."""
    raw = (os.environ if env is None else env).get(REQUEUE_SIGNAL_ENV, "").strip().upper() or "SIGUSR2"
    name = raw if raw.startswith("SIG") else "SIG" + raw
    if not hasattr(signal, name) or name in ("SIGTERM", "SIGKILL", "SIGSTOP", "SIGINT"):
        raise ValueError(f"${REQUEUE_SIGNAL_ENV}={raw!r}: name a catchable signal other than SIGTERM/SIGINT "
                         "(default USR2)")
    return name


def requeues(signal_name: str | None, env=None) -> bool:
    """Whether a run stopped by ``signal_name`` is requeued (only the requeue signal; not SIGTERM)."""
    return signal_name is not None and signal_name == requeue_signal(env)
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
        for name in dict.fromkeys((*SIGNALS, requeue_signal())):
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()
