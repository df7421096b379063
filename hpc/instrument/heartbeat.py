"""Per-rank heartbeat: where each rank is (step, phase) and where its time went, in a small JSON file.

``RUN_DIR/heartbeat/rank-R.json`` is rewritten atomically every ``interval_s`` by a daemon thread.
The hot path (``hb.phase("comm")``, ``hb.set_step(...)``) does no I/O and takes no lock: it stores a
few attributes (a few microseconds per call); the thread snapshots them. Readers: the watchdog
(which rank is behind), ``hpc status`` (live view) and ``hpc report`` (goodput, step-time
distribution, throughput over time).

The file also keeps the history a report needs without the trainer's metrics: a log-bucket
histogram of step times, the durations of checkpoint/eval phases, a decimated (time, step,
samples, step seconds) series and one entry per attempt (a Slurm requeue restarts the process: the
new Heartbeat finds the old file and appends an attempt, so time lost to requeues can be computed;
each attempt notes when its first step began, so start-up is told apart from idle time).

``samples_per_s`` is this rank's share of the one training throughput (docs/operability.md,
``hpc.train.metrics.samples_per_s``): samples in completed steps / seconds those steps took, each
from entering its first step phase (data) to leaving its last (the optimizer's compute), as the
trainer times them; evaluation, checkpointing and start-up (all after ``set_step`` or before the
first step) excluded.
"""

from __future__ import annotations

import collections
import math
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

from hpc.dist.world import world_from_env
from hpc.util.io import atomic_write_json, read_json

PHASES = ("data", "compute", "comm", "checkpoint", "eval", "idle")
STEP_PHASES = ("data", "compute", "comm")  # productive step time (goodput's numerator)
HEARTBEAT_DIR = "heartbeat"
FORMAT_VERSION = 1
# Step-time histogram: log-spaced bucket edges from 1 ms to ~1.6 h, 8 buckets per decade.
HIST_LO_S, HIST_PER_DECADE, HIST_BUCKETS = 1e-3, 8, 56
SERIES_MAX = 256      # points kept in the throughput series (halved by decimation when full)
EVENTS_MAX = 500      # checkpoint/eval durations kept
_EVENT_PHASES = ("checkpoint", "eval")


def hist_bucket(seconds: float) -> int:
    """Index of the histogram bucket holding ``seconds`` (pure; clamps at both ends)."""
    if seconds <= HIST_LO_S:
        return 0
    i = int(math.floor(math.log10(seconds / HIST_LO_S) * HIST_PER_DECADE)) + 1
    return min(i, HIST_BUCKETS - 1)


def hist_edges() -> list[float]:
    """Upper edge of each bucket in seconds (bucket 0 is <= 1 ms; the last is open-ended)."""
    return [HIST_LO_S * 10 ** (i / HIST_PER_DECADE) for i in range(HIST_BUCKETS)]


def hist_quantile(counts: list[int], q: float) -> float | None:
    """Upper bucket edge below which a fraction ``q`` of steps fall (pure; None when empty)."""
    total = sum(counts)
    if total == 0:
        return None
    need, seen = q * total, 0
    edges = hist_edges()
    for i, c in enumerate(counts):
        seen += c
        if seen >= need and c:
            return edges[i]
    return edges[-1]


def heartbeat_path(run_dir: str | os.PathLike, rank: int) -> Path:
    return Path(run_dir) / HEARTBEAT_DIR / f"rank-{rank}.json"


def read_heartbeats(run_dir: str | os.PathLike) -> dict[int, dict]:
    """All ranks' heartbeats by rank; unreadable files are skipped (a writer may be mid-rename)."""
    out: dict[int, dict] = {}
    for p in sorted((Path(run_dir) / HEARTBEAT_DIR).glob("rank-*.json")):
        try:
            hb = read_json(p)
            out[int(hb["rank"])] = hb
        except (ValueError, KeyError, TypeError):
            continue
    return out


class _Phase:
    """Context manager returned by ``Heartbeat.phase`` (one cached per phase name: no allocation)."""

    __slots__ = ("hb", "name")

    def __init__(self, hb: "Heartbeat", name: str):
        self.hb, self.name = hb, name

    def __enter__(self) -> "_Phase":
        self.hb._stack.append(self.hb._switch(self.name))
        return self

    def __exit__(self, *exc) -> None:
        self.hb._switch(self.hb._stack.pop())


class Heartbeat:
    """Write ``heartbeat/rank-R.json`` every ``interval_s`` from a daemon thread.

    ``with hb.phase("comm"): ...`` marks time; phases nest (the inner one counts, the outer resumes
    after it). Call ``hb.set_step(step, epoch, samples=n)`` once per step (``samples``: this rank's
    samples in that step, for samples/s), ``hb.close("completed"|"failed"|"preempted")`` at the end.
    """

    def __init__(self, run_dir: str | os.PathLike, rank: int, interval_s: float = 5.0, *,
                 world_size: int | None = None, total_steps: int | None = None,
                 restart_count: int | None = None, job_id: str | None = None, start: bool = True,
                 clock: Callable[[], float] | None = None, started: float | None = None,
                 node: str | None = None):
        if not interval_s > 0:
            raise ValueError(f"heartbeat interval_s={interval_s!r}: must be a positive number of seconds")
        if rank < 0:
            raise ValueError(f"heartbeat rank={rank!r}: must be >= 0")
        self.run_dir, self.rank, self.interval_s = Path(run_dir), int(rank), float(interval_s)
        self.path = heartbeat_path(run_dir, rank)
        self.world_size, self.total_steps = world_size, total_steps
        if job_id is None or restart_count is None:  # not given: this process's Slurm job, if any
            world = world_from_env()
            job_id = world.slurm_job_id if job_id is None else job_id
            restart_count = world.slurm_restart_count if restart_count is None else restart_count
        self.job_id, self.restart_count = job_id, restart_count
        # The Slurm node (several share one host on the dev cluster), else the host: what a hang
        # report names for a rank that is gone.
        self.node = node if node is not None else world_from_env().node_name
        # ``clock`` (simulations, tests): one callable giving epoch seconds for both wall and durations.
        self._mono = clock or time.monotonic
        self._wall = clock or time.time
        # ``started``: when this process began (e.g. the trainer's t_start), so start-up time before
        # the Heartbeat existed counts as allocated, idle time in goodput.
        now_w, now_m = self._wall(), self._mono()
        self.started = min(started, now_w) if started is not None else now_w
        self._t0 = now_m - (now_w - self.started)
        # Hot-path state (written by the training thread, read by the writer/watchdog threads).
        self._cur: tuple[str, float] = ("idle", self._t0)   # one tuple: read and written atomically
        self._phase_s = dict.fromkeys(PHASES, 0.0)
        self._ctx = {p: _Phase(self, p) for p in PHASES}
        self._stack: list[str] = []   # phases to return to (nesting)
        self.step: int | None = None
        self.epoch: int | None = None
        self.samples = 0
        self._first_step: int | None = None
        self._step_t: float | None = None
        self._step_s = 0.0                  # seconds of the steps up to the last set_step
        self._step_begin: float | None = None   # the step in progress entered its first step phase
        self._step_end = 0.0                # ... and last left one
        self._busy_t: float | None = None   # when the first step phase began: the end of start-up
        self._hist = [0] * HIST_BUCKETS
        self._events: list[list] = []
        self._series: list[list] = []
        self._series_every = 1
        self._recent: collections.deque = collections.deque(maxlen=6)  # for the current rate
        self._beats = 0
        self.state = "running"
        self._closed = False
        # A requeued process continues this rank's history: attempts, step-time histogram, events.
        old = self._previous()
        self._attempts = list(old.get("attempts") or [])
        hist = (old.get("step_hist") or {})
        if hist.get("lo_s") == HIST_LO_S and hist.get("per_decade") == HIST_PER_DECADE and \
                len(hist.get("counts") or []) == HIST_BUCKETS:
            self._hist = [int(c) for c in hist["counts"]]
        self._events = list(old.get("events") or [])[-EVENTS_MAX // 2:]  # room for this attempt's
        self._stop = threading.Event()
        self._write_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        if start:
            self.write()
            self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{rank}", daemon=True)
            self._thread.start()

    # -- hot path ---------------------------------------------------------------------------
    def phase(self, name: str) -> _Phase:
        ctx = self._ctx.get(name)
        if ctx is None:
            raise ValueError(f"heartbeat phase {name!r} is not one of {', '.join(PHASES)}")
        return ctx

    def _switch(self, name: str) -> str:
        now = self._mono()
        prev, since = self._cur
        self._phase_s[prev] += now - since
        if name in STEP_PHASES:
            if self._step_begin is None:
                self._step_begin = now
                if self._busy_t is None:
                    self._busy_t = now
        elif prev in STEP_PHASES:
            self._step_end = now
        if prev in _EVENT_PHASES and len(self._events) < EVENTS_MAX:
            self._events.append([prev, round(self.started + since - self._t0, 3), round(now - since, 4),
                                 self.step])
        self._cur = (name, now)
        return prev

    def set_step(self, step: int, epoch: int | None = None, samples: int = 0) -> None:
        """Record that ``step`` (global, 0-based or 1-based: the trainer's own count) finished."""
        now = self._mono()
        if self._step_t is not None:
            self._hist[hist_bucket(now - self._step_t)] += 1
        else:
            self._first_step = step
        self._step_t = now
        # The step's seconds, first step phase to last (the gaps between phases included, as in the
        # trainer's timer); counted here so samples/s covers only completed steps.
        if self._step_begin is not None:
            inside = self._cur[0] in STEP_PHASES
            self._step_s += (now if inside else self._step_end) - self._step_begin
            self._step_begin = now if inside else None
        self.step, self.epoch = step, epoch
        self.samples += samples

    # -- reading ---------------------------------------------------------------------------
    def current(self) -> tuple[str, float, int | None]:
        """(phase, seconds in it so far, last step): what the watchdog polls."""
        name, since = self._cur
        return name, self._mono() - since, self.step

    def snapshot(self, record: bool = False) -> dict[str, Any]:
        """The heartbeat as a dict; ``record`` (the writer only) also advances the series."""
        now_m, now = self._mono(), self._wall()
        name, since = self._cur
        phase_s = dict(self._phase_s)
        phase_s[name] += now_m - since  # include the phase in progress
        elapsed = now_m - self._t0
        if record:
            if self._beats % self._series_every == 0:
                self._series.append([round(elapsed, 3), self.step, self.samples, round(self._step_s, 4)])
                if len(self._series) > SERIES_MAX:  # keep the whole run at halving resolution
                    self._series = self._series[::2]
                    self._series_every *= 2
            self._beats += 1
            self._recent.append([elapsed, self.step])
        busy = self._busy_t
        attempt = {"restart_count": self.restart_count, "job_id": self.job_id, "started": self.started,
                   "last": now, "first_step": self._first_step, "last_step": self.step,
                   # None until the first step begins: the whole attempt so far is start-up.
                   "first_step_t": None if busy is None else round(self.started + busy - self._t0, 3),
                   "phase_s": {k: round(v, 4) for k, v in phase_s.items()}}
        return {
            "format_version": FORMAT_VERSION, "rank": self.rank, "world_size": self.world_size,
            "host": socket.gethostname(), "node": self.node, "pid": os.getpid(), "job_id": self.job_id,
            "restart_count": self.restart_count, "state": self.state,
            "time": now, "started": self.started, "interval_s": self.interval_s,
            "step": self.step, "epoch": self.epoch, "total_steps": self.total_steps,
            "samples": self.samples, "step_s": round(self._step_s, 4),
            "samples_per_s": round(self.samples / self._step_s, 3) if self._step_s > 0 and self.samples else None,
            "steps_per_s": _steps_per_s(list(self._recent)),
            "phase": name, "phase_elapsed_s": round(now_m - since, 4),
            "phase_s": {k: round(v, 4) for k, v in phase_s.items()},
            "step_hist": {"lo_s": HIST_LO_S, "per_decade": HIST_PER_DECADE, "counts": list(self._hist)},
            "events": list(self._events), "series": [list(p) for p in self._series],
            "attempts": self._attempts + [attempt],
        }

    # -- writing ---------------------------------------------------------------------------
    def write(self) -> None:
        with self._write_lock:
            try:
                atomic_write_json(self.path, self.snapshot(record=True))
            except OSError:
                pass  # a full or flaky file system must not kill training; status shows the age

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.write()

    def close(self, state: str = "completed") -> None:
        """Stop the thread and write the final heartbeat with ``state`` (the trainer's: completed,
        failed, preempted). Only the first call counts, so a ``finally: hb.close("failed")`` after a
        normal ``hb.close("completed")`` changes nothing."""
        if self._closed:
            return
        self._closed = True
        self._switch("idle")
        self.state = state
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval_s + 5)
        self.write()

    def __enter__(self) -> "Heartbeat":
        return self

    def __exit__(self, exc_type, *_exc) -> None:
        self.close("completed" if exc_type is None else "failed")

    def _previous(self) -> dict:
        """This rank's heartbeat left by an earlier process of the run (a requeue), or {}."""
        if not self.path.exists():
            return {}
        try:
            old = read_json(self.path)
        except ValueError:
            return {}
        return old if isinstance(old, dict) else {}


def _steps_per_s(recent: list[list]) -> float | None:
    """Steps per wall second over the last few beats [(t, step)] (pure). Wall time, evaluation and
    checkpoints included, because this is what the ETA needs, unlike samples/s."""
    pts = [p for p in recent if p[1] is not None]
    if len(pts) < 2 or pts[-1][0] <= pts[0][0]:
        return None
    return round((pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0]), 5)
