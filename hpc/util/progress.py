"""Progress of long loops (training steps; rows written, indexed, verified or scored).

On a terminal (stderr is a tty) a tqdm bar. Anywhere else (a pipe, mpiexec's forwarded stderr, a
Slurm output file) a bar is unreadable (carriage returns) and tqdm would not show where a job is,
so a plain line goes out every ``HPC_PROGRESS_S`` seconds (default 10) and once at the end:

    train: step 120/300 (40%) epoch 1 loss 0.4321 samples/s 12,345 | 2.31 steps/s, ETA 1m18s

The rate (and so the ETA) is measured over the time since the previous line, so it follows the
recent speed rather than an average that still counts start-up. The caller decides who reports
(rank 0 only: ``enabled=False`` elsewhere). The formatting functions are pure and the clock is
injectable, so tests need no sleeping. This is the bottom layer: stdlib and tqdm only.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Callable, Mapping

ENV = "HPC_PROGRESS_S"
DEFAULT_INTERVAL_S = 10.0


def progress_interval_s(env: Mapping[str, str] | None = None) -> float:
    """Seconds between plain progress lines: ``HPC_PROGRESS_S`` or 10; 0 = a line on every update."""
    raw = (os.environ if env is None else env).get(ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (0 <= value < math.inf):
        raise ValueError(f"{ENV}={raw!r}: must be a number of seconds >= 0 between progress lines "
                         f"(0: a line on every update; unset: {DEFAULT_INTERVAL_S:g})")
    return value


def format_duration(seconds: float | None) -> str:
    """``4.2s``, ``42s``, ``3m05s``, ``2h07m``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    if seconds < 10:  # short jobs and tests: whole seconds would say "0s"
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def eta_s(done: float, total: float | None, rate: float | None) -> float | None:
    """Seconds left at ``rate`` units per second; None when the total or the rate is unknown."""
    if total is None:
        return None
    remaining = total - done
    if remaining <= 0:
        return 0.0
    if not rate or rate <= 0 or not math.isfinite(rate):
        return None
    return remaining / rate


def format_value(v: Any) -> str:
    """Numbers for people: thousands separators for big ones, 4 significant digits for small ones."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if not math.isfinite(v):
        return str(v)
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.4g}"


def format_line(done: int, total: int | None, *, noun: str = "rows", unit: str | None = None,
                rate: float | None = None, fields: Mapping[str, Any] | None = None,
                label: str | None = None, elapsed_s: float | None = None) -> str:
    """One progress line (pure). ``elapsed_s`` given: the closing line (elapsed time instead of ETA)."""
    head = f"{label}: " if label else ""
    if total:
        head += f"{noun} {done:,}/{total:,} ({100 * done / total:.0f}%)"
    else:
        head += f"{noun} {done:,}" + ("" if total is None else f"/{total:,}")
    for k, v in (fields or {}).items():
        head += f" {k} {format_value(v)}"
    speed = f"{format_value(rate)} {unit or noun}/s" if rate is not None else f"? {unit or noun}/s"
    tail = (f"{format_duration(elapsed_s)} elapsed" if elapsed_s is not None
            else f"ETA {format_duration(eta_s(done, total, rate))}")
    return f"{head} | {speed}, {tail}"


class Progress:
    """``update(n)`` / ``set(done)`` per unit of work, ``set_fields(k=v)`` for what the line shows,
    ``close()`` at the end (or use it as a context manager: no closing line after an exception).

    ``enabled=False``: every call is a no-op (other ranks; ``train.progress=false``). ``tty``:
    override the terminal test of ``stream`` (stderr); ``emit``: where plain lines go (default:
    written to ``stream``; the trainer passes its logger so lines also reach ``logs/rank-0.log``).
    """

    def __init__(self, total: int | None, *, label: str | None = None, noun: str = "rows",
                 unit: str | None = None, initial: int = 0, enabled: bool = True,
                 interval_s: float | None = None, stream=None, emit: Callable[[str], Any] | None = None,
                 tty: bool | None = None, clock: Callable[[], float] = time.monotonic):
        self.enabled, self.total, self.done = enabled, total, initial
        self.label, self.noun, self.unit = label, noun, unit or noun
        self.fields: dict[str, Any] = {}
        self._bar = None
        self._closed = False
        if not enabled:
            return
        self.interval_s = progress_interval_s() if interval_s is None else interval_s
        stream = sys.stderr if stream is None else stream
        if tty is None:
            tty = bool(getattr(stream, "isatty", lambda: False)())
        if tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=label, unit=noun, dynamic_ncols=True,
                             mininterval=1.0, leave=False, file=stream)
        self._emit = emit or (lambda line: (stream.write(line + "\n"), stream.flush()))
        self._clock = clock
        self._t0 = self._last_t = clock()
        self._initial = self._last_done = initial

    def set_fields(self, **fields: Any) -> None:
        """Caller-supplied fields (loss, epoch, ...) shown from the next line or bar refresh on."""
        if not self.enabled or self._closed:
            return
        self.fields.update(fields)
        if self._bar is not None:
            self._bar.set_postfix({k: format_value(v) for k, v in self.fields.items()}, refresh=False)

    def update(self, n: int = 1, **fields: Any) -> None:
        self.set(self.done + n, **fields)

    def set(self, done: int, **fields: Any) -> None:
        if not self.enabled or self._closed:
            return
        if fields:
            self.set_fields(**fields)
        delta, self.done = done - self.done, done
        if self._bar is not None:
            self._bar.update(delta)
            return
        now = self._clock()
        if now - self._last_t >= self.interval_s:
            span = now - self._last_t
            rate = (done - self._last_done) / span if span > 0 else None
            self._emit(format_line(done, self.total, noun=self.noun, unit=self.unit, rate=rate,
                                   fields=self.fields, label=self.label))
            self._last_t, self._last_done = now, done

    def close(self, final: bool = True) -> None:
        """End the bar, or write the closing line (average rate, elapsed time) unless ``final=False``."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            return
        if final:
            elapsed = self._clock() - self._t0
            rate = (self.done - self._initial) / elapsed if elapsed > 0 else None
            self._emit(format_line(self.done, self.total, noun=self.noun, unit=self.unit, rate=rate,
                                   fields=self.fields, label=self.label, elapsed_s=elapsed))

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(final=exc_type is None)
