"""Stall detection: a thread per rank that turns a stuck collective into a hang report and an exit.

Each rank's watchdog polls its own ``Heartbeat`` (no I/O besides one ``stat`` per poll). When the
rank has been in phase ``comm`` longer than ``threshold_s`` (set it below the collective timeout,
so the report is written before the backend aborts), the watchdog

1. writes ``hang-report/rank-R.txt``: its phase, how long, last step, then the Python stacks of
   all its threads (``faulthandler``, which needs no cooperation from the stuck thread);
2. claims ``hang-report/summary.txt`` (a hard link of a complete temporary file: atomic and
   exclusive, so exactly one rank writes it) naming the ranks that are behind, read from every
   rank's heartbeat: lowest step, another phase than ``comm``, a stale heartbeat, or none at all;
3. waits up to ``grace_s`` for the other ranks' reports: the ranks that are behind are not in
   ``comm``, so their watchdogs do not fire on their own; they see ``summary.txt`` appear and dump
   their stacks too (that is the stack you want: where the slow rank is stuck);
4. calls ``on_hang(report)`` if configured (e.g. save a CPU copy of the last good state and
   ``scontrol requeue``), flushes stdio, and ends the process with ``os._exit(exit_code)``: the main
   thread is stuck in C inside the collective, so nothing softer would return.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hpc.instrument.heartbeat import Heartbeat, read_heartbeats
from hpc.util.io import atomic_path, atomic_write_json, fsync_dir, read_json

HANG_DIR = "hang-report"
HANG_EXIT_CODE = 4  # distinct from 1 (failure), 2 (usage) and 3 (preempted+requeued: hpc.train.preempt)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HangReport:
    rank: int
    reason: str                # "comm stall" (this rank noticed) or "peer reported a hang"
    phase: str
    phase_elapsed_s: float
    step: int | None
    report_path: Path
    summary_path: Path
    wrote_summary: bool
    behind: tuple[int, ...]    # what the summary names (from this rank's reading of the heartbeats)


def find_laggards(heartbeats: dict[int, dict], now: float,
                  world_size: int | None = None) -> list[tuple[int, str]]:
    """Ranks that are behind, each with why (pure): the ones the others wait for in a collective.

    Behind = no heartbeat at all, a stale heartbeat (dead, or stuck holding the GIL), a final state,
    a lower step than the leaders, or another phase than ``comm`` while others wait in ``comm``.
    """
    size = world_size or max([hb.get("world_size") or 0 for hb in heartbeats.values()] +
                             [max(heartbeats, default=-1) + 1])
    out: list[tuple[int, str]] = []
    live = {}
    for r in range(size):
        hb = heartbeats.get(r)
        if hb is None:
            out.append((r, "no heartbeat file (never started, or a different run directory)"))
            continue
        age = now - float(hb.get("time", 0))
        interval = float(hb.get("interval_s") or 5)
        if hb.get("state", "running") not in ("running", "hung"):  # hung: a peer that noticed too
            out.append((r, f"finished with state {hb.get('state')!r} while others wait"))
        elif age > 3 * interval + 2:
            out.append((r, f"heartbeat {age:.0f}s old (process dead, or stuck holding the GIL)"))
        else:
            live[r] = hb
    steps = [hb["step"] for hb in live.values() if hb.get("step") is not None]
    top = max(steps) if steps else None
    for r, hb in live.items():
        step = hb.get("step")
        if top is not None and (step is None or step < top):
            out.append((r, f"at step {step}, others at step {top} (phase {hb.get('phase')}, "
                           f"{hb.get('phase_elapsed_s', 0):.1f}s in it)"))
        elif hb.get("phase") != "comm":
            out.append((r, f"in phase {hb.get('phase')!r} for {hb.get('phase_elapsed_s', 0):.1f}s "
                           "while others wait in comm"))
    return sorted(out)


def format_summary(heartbeats: dict[int, dict], laggards: list[tuple[int, str]], now: float,
                   noticed_by: int, threshold_s: float) -> str:
    """The text of ``summary.txt`` (pure)."""
    lines = [f"hang detected by rank {noticed_by} at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))}"
             f": a collective waited more than {threshold_s:g}s",
             f"ranks behind: {', '.join(str(r) for r, _ in laggards) or 'none'}"]
    for r, why in laggards:
        hb = heartbeats.get(r) or {}
        where = hb.get("node") or hb.get("host")
        lines.append(f"  rank {r}: {why}" + (f" [node {where}, pid {hb.get('pid')}]" if where else ""))
    if not laggards:
        lines.append("  every rank waits in comm at the same step: a mismatched collective order "
                     "(different code paths per rank) or a network/fabric problem")
    lines += ["", f"{'rank':>4}  {'node':<16} {'pid':>7} {'step':>8} {'epoch':>5} {'phase':<10} "
                  f"{'in phase':>9} {'hb age':>7}"]
    for r in sorted(heartbeats):
        hb = heartbeats[r]
        lines.append(f"{r:>4}  {str(hb.get('node') or hb.get('host'))[:16]:<16} {hb.get('pid', ''):>7} "
                     f"{str(hb.get('step')):>8} {str(hb.get('epoch')):>5} {hb.get('phase', '?'):<10} "
                     f"{hb.get('phase_elapsed_s', 0):>8.1f}s {now - float(hb.get('time', now)):>6.1f}s")
    lines += ["", "stacks of every rank that reported: rank-R.txt next to this file"]
    return "\n".join(lines) + "\n"


class Watchdog:
    """Watch ``hb`` for a ``comm`` phase longer than ``threshold_s``; see the module docstring."""

    def __init__(self, hb: Heartbeat, threshold_s: float, *, poll_s: float | None = None,
                 collective_timeout_s: float | None = None, grace_s: float | None = None,
                 on_hang: Callable[[HangReport], None] | None = None, exit: bool = True,
                 exit_code: int = HANG_EXIT_CODE, world_size: int | None = None, start: bool = True):
        if not threshold_s > 0:
            raise ValueError(f"watchdog threshold_s={threshold_s!r}: must be a positive number of seconds")
        if collective_timeout_s is not None and threshold_s >= collective_timeout_s:
            raise ValueError(f"watchdog threshold_s={threshold_s:g} must be below the collective timeout "
                             f"({collective_timeout_s:g}s), or the backend aborts before the report is written")
        self.hb, self.threshold_s = hb, float(threshold_s)
        # Polling costs one stat per poll; 1 s resolution is plenty against minutes-long thresholds.
        self.poll_s = float(poll_s) if poll_s else min(1.0, self.threshold_s / 5)
        # Long enough for a peer polling every poll_s (and writing heartbeats) to dump its stacks.
        self.grace_s = float(grace_s) if grace_s is not None else 3 * self.poll_s + 2
        self.on_hang, self.exit, self.exit_code = on_hang, exit, exit_code
        self.world_size = world_size or hb.world_size
        self.dir = hb.run_dir / HANG_DIR
        self.summary_path = self.dir / "summary.txt"
        self.report_path = self.dir / f"rank-{hb.rank}.txt"
        self.fired: HangReport | None = None
        self._archive_previous()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._loop, name=f"watchdog-{hb.rank}", daemon=True)
            self._thread.start()

    def _archive_previous(self) -> None:
        """Move a hang report left by an earlier attempt (a requeue) to ``hang-report.<time>``.

        Otherwise every rank would see the old summary and "report" at once, and no new summary
        could be created. Only a report older than this process is moved (cross-node clock skew
        is far below the margin), so a late-starting rank never moves the current attempt's.
        """
        if not self.dir.is_dir():
            return
        try:
            t = float(read_json(self.dir / "summary.json")["time"])
        except (ValueError, KeyError, TypeError):
            t = self.dir.stat().st_mtime
        if t < self.hb.started - 5:
            try:
                os.rename(self.dir, self.dir.with_name(f"{HANG_DIR}.{int(t)}"))
            except OSError:
                pass  # another rank moved it first

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.poll_s + 5)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            phase, elapsed, _step = self.hb.current()
            if phase == "comm" and elapsed > self.threshold_s:
                self.fire("comm stall")
                return
            if self.summary_path.exists():
                self.fire("peer reported a hang")
                return

    def fire(self, reason: str) -> HangReport:
        """Write this rank's report (and the summary if first), then hand over or exit."""
        phase, elapsed, step = self.hb.current()
        self._write_rank_report(reason, phase, elapsed, step)
        self.hb.state = "hung"
        self.hb.write()
        wrote, behind = False, ()
        if reason == "comm stall":
            wrote, behind = self._claim_summary()
            self._wait_for_peers()
        self.fired = HangReport(self.hb.rank, reason, phase, round(elapsed, 3), step, self.report_path,
                                self.summary_path, wrote, behind)
        if self.on_hang is not None:
            try:
                self.on_hang(self.fired)
            except Exception:  # the exit below must still happen: the main thread is stuck
                log.exception("rank %d: on_hang callback failed", self.hb.rank)
        if self.exit:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            for h in logging.getLogger().handlers:
                try:
                    h.flush()
                except Exception:
                    pass
            os._exit(self.exit_code)
        return self.fired

    def _write_rank_report(self, reason: str, phase: str, elapsed: float, step: int | None) -> None:
        hb = self.hb
        head = (f"rank {hb.rank} pid {os.getpid()} reason: {reason}\n"
                f"phase {phase} for {elapsed:.1f}s (threshold {self.threshold_s:g}s); last step {step}; "
                f"epoch {hb.epoch}\ntime {time.strftime('%Y-%m-%d %H:%M:%S')}\n\n"
                "Python stacks of all threads (most recent call first):\n")
        try:
            with atomic_path(self.report_path) as tmp, open(tmp, "w") as f:
                f.write(head)
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError as e:  # still exit below; stderr reaches the job log
            print(f"rank {hb.rank}: cannot write {self.report_path}: {e}", file=sys.stderr)

    def _claim_summary(self) -> tuple[bool, tuple[int, ...]]:
        now = time.time()
        beats = read_heartbeats(self.hb.run_dir)
        beats[self.hb.rank] = self.hb.snapshot()  # our own view is fresher than our file
        laggards = find_laggards(beats, now, self.world_size)
        behind = tuple(r for r, _ in laggards)
        text = format_summary(beats, laggards, now, self.hb.rank, self.threshold_s)
        try:
            # Write a complete temporary file, then hard-link it into place: link() fails if the
            # name exists, so exactly one rank wins and readers never see a partial summary.
            with atomic_path(self.dir / f".summary.rank-{self.hb.rank}") as tmp:
                tmp.write_text(text)
            tmp_done = self.dir / f".summary.rank-{self.hb.rank}"
            try:
                os.link(tmp_done, self.summary_path)
            except FileExistsError:
                return False, behind
            finally:
                tmp_done.unlink(missing_ok=True)
            fsync_dir(self.dir)
            atomic_write_json(self.dir / "summary.json",
                              {"noticed_by": self.hb.rank, "time": now, "threshold_s": self.threshold_s,
                               "behind": [{"rank": r, "why": w} for r, w in laggards]})
            return True, behind
        except OSError as e:
            print(f"rank {self.hb.rank}: cannot write {self.summary_path}: {e}", file=sys.stderr)
            return False, behind

    def _wait_for_peers(self) -> None:
        size = self.world_size or 1
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline:
            if all((self.dir / f"rank-{r}.txt").exists() for r in range(size)):
                return
            time.sleep(min(0.2, self.poll_s))
