"""Operability: per-rank heartbeats, the hang watchdog, and the readers behind `hpc status|report|doctor`.

The trainer uses two objects (see docs/operability.md for the exact calls)::

    hb = Heartbeat(run_dir, rank, interval_s=5, world_size=size, total_steps=n)
    wd = Watchdog(hb, threshold_s=300, collective_timeout_s=comm.timeout_s)
    with hb.phase("data"): batch = next(it)
    ...
    hb.set_step(step, epoch, samples=len(batch))
    wd.close(); hb.close("completed")   # or the trainer's final state: failed, preempted
"""

from hpc.monitor.heartbeat import PHASES, Heartbeat, read_heartbeats
from hpc.monitor.watchdog import HANG_EXIT_CODE, HangReport, Watchdog

__all__ = ["PHASES", "Heartbeat", "read_heartbeats", "Watchdog", "HangReport", "HANG_EXIT_CODE"]
