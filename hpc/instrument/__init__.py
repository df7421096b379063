"""In-job instrumentation: per-rank heartbeats and the hang watchdog (docs/operability.md).

Below the trainer and above ``hpc.dist``: the trainer (and any other job) writes with these; the
operator tools in ``hpc.monitor`` read what they wrote. The trainer uses two objects::

    hb = Heartbeat(run_dir, rank, interval_s=5, world_size=size, total_steps=n)
    wd = Watchdog(hb, threshold_s=300, collective_timeout_s=comm.timeout_s)
    with hb.phase("data"): batch = next(it)
    ...
    hb.set_step(step, epoch, samples=len(batch))
    wd.close(); hb.close("completed")   # or the trainer's final state: failed, preempted
"""

from hpc.instrument.heartbeat import PHASES, Heartbeat, read_heartbeats
from hpc.instrument.watchdog import HANG_EXIT_CODE, HangReport, Watchdog

__all__ = ["PHASES", "Heartbeat", "read_heartbeats", "Watchdog", "HangReport", "HANG_EXIT_CODE"]
