"""What watches a run while it trains: the preemption flag (``hpc.train.preempt``), the per-rank
heartbeat and the hang watchdog (``hpc.instrument``; docs/operability.md), and rank 0's progress
bar or lines (``hpc.util.progress``). ``Trainer.fit`` starts them and stops them with the run's
final state."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable

from hpc.instrument import Heartbeat, Watchdog
from hpc.train.config import HANG_DEFAULT_S, AllRanksError, TrainConfig
from hpc.train.preempt import PreemptFlag, requeue_signal, requeues
from hpc.util.progress import Progress, progress_interval_s

log = logging.getLogger("hpc.train")


def hang_threshold_s(cfg: TrainConfig) -> float:
    """monitor.hang_s; the default (120 s) is lowered to half of dist.timeout_s when that is shorter,
    so the watchdog always reports before the backend's collective timeout aborts the ranks."""
    hang, timeout = cfg.monitor.hang_s, cfg.dist.timeout_s
    return min(hang, timeout / 2) if hang == HANG_DEFAULT_S and hang >= timeout else hang


class RunWatch:
    """``on_hang(report)``: called by the watchdog before the hung process exits, when
    ``monitor.on_hang=requeue`` (the launch layer passes one that requeues the Slurm job)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, comm, total_steps: int, started: float,
                 on_hang: Callable[[object], None] | None = None):
        self.cfg, self.run_dir, self.comm = cfg, run_dir, comm
        self.total_steps, self.started, self.on_hang = total_steps, started, on_hang
        self.flag = PreemptFlag()
        self.agreed_signal: str | None = None  # the signal every rank stops for (see agree_signal)
        self.hb: Heartbeat | None = None
        self.wd: Watchdog | None = None

    def start(self, step: int, epoch: int, device, steps_per_epoch: int) -> Progress:
        """Install the signal handlers, start the heartbeat and the watchdog, log the run line;
        returns the progress bar (rank 0 only shows it)."""
        try:
            every_s = progress_interval_s()
        except ValueError as e:  # the same environment on every rank: all stop here together (exit 2)
            raise AllRanksError(str(e)) from None
        self.flag.install()
        m, w, comm = self.cfg.monitor, self.comm.world, self.comm
        if m.heartbeat_s > 0:
            self.hb = Heartbeat(self.run_dir, comm.rank, interval_s=m.heartbeat_s, world_size=comm.size,
                                total_steps=self.total_steps, started=self.started,
                                job_id=w.slurm_job_id, restart_count=w.slurm_restart_count)
            self.hb.set_step(step, epoch)
            threshold = hang_threshold_s(self.cfg)
            if threshold > 0:
                self.wd = Watchdog(self.hb, threshold_s=threshold, collective_timeout_s=self.cfg.dist.timeout_s,
                                   on_hang=self.on_hang if m.on_hang == "requeue" else None)
        # Before the first step, so a piped/Slurm log shows where the run writes from the start.
        log.info("run %s: %d rank(s), backend %s, device %s; %d steps (%d per epoch)%s", self.run_dir,
                 comm.size, comm.backend, device, self.total_steps, steps_per_epoch,
                 f", resuming at step {step}" if step else "")
        return Progress(self.total_steps, label="train", noun="step", unit="steps", initial=step,
                        enabled=comm.rank == 0 and self.cfg.train.progress, interval_s=every_s, emit=log.info)

    def phase(self, name: str):
        """``with watch.phase("comm"):`` time spent in a phase (heartbeat's data/compute/comm/...)."""
        return self.hb.phase(name) if self.hb is not None else contextlib.nullcontext()

    def set_step(self, step: int, epoch: int, samples: int) -> None:
        if self.hb is not None:
            self.hb.set_step(step, epoch, samples=samples)

    @property
    def preempt_requested(self) -> bool:
        return self.flag.requested

    def stop_votes(self) -> tuple[float, float]:
        """This rank's votes for the step's flag all-reduce: (requeue signal seen, other signal seen)."""
        sig = self.flag.signal_name
        if sig is None:
            return 0.0, 0.0
        return (1.0, 0.0) if requeues(sig) else (0.0, 1.0)

    def agree_signal(self, requeue_votes: float, other_votes: float) -> None:
        """After the all-reduce every rank knows the same thing: a terminating signal (SIGTERM: cancel,
        shutdown) on any rank ends the job; else the requeue signal on any rank requeues it. So rank 0
        decides the requeue right even when only another rank received the signal."""
        if other_votes > 0:
            mine = self.flag.signal_name
            self.agreed_signal = mine if mine is not None and not requeues(mine) else "SIGTERM"
        elif requeue_votes > 0:
            self.agreed_signal = requeue_signal()

    @property
    def signal_name(self) -> str:
        return self.agreed_signal or self.flag.signal_name or "a signal received by another rank"

    def stop(self, state: str) -> None:
        """Signals back to what they were, the watchdog stopped, the heartbeat's final state
        written; only the first call counts."""
        self.flag.uninstall()
        if self.wd is not None:
            self.wd.close()
            self.wd = None
        if self.hb is not None:
            self.hb.close(state)
            self.hb = None
