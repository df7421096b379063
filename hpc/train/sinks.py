"""Metric sinks: rank 0 copies every ``metrics.jsonl`` record to TensorBoard and/or MLflow.

``metrics.jsonl`` stays the record of truth; a sink is a copy for the tools researchers compare runs
in (docs/operability.md "Metric sinks"). ``MetricsLog`` (rundir.py) hands each record to ``Sinks``,
which runs every sink on its own daemon thread behind a bounded queue: the loop pays one queue put
per record whatever the sink costs, and an MLflow server that is down (its client retries for
minutes) never stalls a step. A sink that raises (not installed, unwritable, server down, too far
behind) logs ONE warning naming itself and the reason and is off for the rest of the run; the run
goes on.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import queue
import threading
import time
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from hpc.util.io import atomic_write_json, read_json

log = logging.getLogger("hpc.train")

QUEUE_RECORDS = 10_000   # a sink this far behind is turned off instead of holding memory
CLOSE_TIMEOUT_S = 30.0   # the end of a run waits at most this long for all sinks to drain
WRITE_BATCH = 1000       # records merged into one sink call when the sink is behind
_NONE = object()         # "no item held" (None is the queue's end marker)
_NOT_VALUES = ("kind", "step", "epoch", "time")


class Sink(Protocol):
    name: str
    hint: str  # how to install what it needs, for the warning when the import fails

    def start(self, params: dict[str, str], tags: dict[str, str]) -> None: ...
    def resumed(self, step: int) -> None: ...  # records after `step` will be written again
    def write(self, records: list[dict]) -> None: ...  # several when the sink fell behind
    def close(self, summary: dict | None) -> None: ...  # None: the run failed without a summary


def scalars(record: dict) -> list[tuple[str, float]]:
    """``kind/field`` for each number of a metrics.jsonl record (train/loss, val/accuracy, ...)."""
    kind = record.get("kind", "train")
    out = [(f"{kind}/{k}", float(v)) for k, v in record.items()
           if k not in _NOT_VALUES and isinstance(v, numbers.Real) and not isinstance(v, bool)]
    return out or [(kind, 1.0)]  # a record without values (kind=nonfinite) is an event: count it


def flat_params(d: dict, prefix: str = "") -> dict[str, str]:
    """The resolved config as dotted keys with YAML-like strings (``optim.lr`` -> ``0.01``)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, str) else json.dumps(v)
    return out


class TensorBoardSink:
    name, hint = "tensorboard", "pip install 'hpc-suite[tensorboard]'"

    def __init__(self, log_dir: Path):
        self.log_dir, self.writer, self.purge_step = log_dir, None, None

    def start(self, params, tags) -> None:  # noqa: ARG002 - TensorBoard has no run metadata to set
        from torch.utils.tensorboard import SummaryWriter  # ImportError without the tensorboard package

        self._writer_cls = SummaryWriter
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def resumed(self, step: int) -> None:
        self.purge_step = step + 1

    def write(self, records: list[dict]) -> None:
        if self.writer is None:
            # Opened at the first record, not in start: a resume's purge_step is known only then, and
            # it makes TensorBoard hide the steps of the interrupted attempt that this one repeats.
            self.writer = self._writer_cls(str(self.log_dir), purge_step=self.purge_step, flush_secs=10)
        for r in records:
            for tag, value in scalars(r):
                self.writer.add_scalar(tag, value, global_step=r["step"], walltime=r.get("time"))

    def close(self, summary) -> None:  # noqa: ARG002 - the summary's numbers are in summary.json
        if self.writer is not None:
            self.writer.close()


_MLFLOW_STATUS = {"completed": "FINISHED", "preempted": "KILLED", "failed": "FAILED"}


def tracking_uri(uri: str) -> str:
    """``file:`` URIs made absolute (from rank 0's working directory), so that ``mlflow.json`` and the
    log name one place; other URIs as given."""
    if not uri.startswith("file:"):
        return uri
    path = uri[len("file:"):]
    return Path(urlparse(uri).path if path.startswith("//") else path).expanduser().resolve().as_uri()


class MLflowSink:
    """One MLflow run per run directory: a resumed run (resume=auto, a Slurm requeue) continues the
    MLflow run recorded in ``<run_dir>/mlflow.json`` instead of starting a second one."""

    name, hint = "mlflow", "pip install 'hpc-suite[mlflow]'"

    def __init__(self, uri: str, experiment: str, run_dir: Path):
        self.uri, self.experiment, self.run_dir = tracking_uri(uri), experiment, run_dir
        self.run_id: str | None = None

    def start(self, params: dict[str, str], tags: dict[str, str]) -> None:
        if self.uri.startswith("file:"):
            # MLflow 3.x refuses its file store unless this is set ("maintenance mode", sqlite:/// is
            # its recommendation); a user who wrote a file: URI asked for exactly that store.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        # mlflow is the optional extra [mlflow]: imported only by a run that asks for this sink.
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        self.client = c = MlflowClient(tracking_uri=self.uri)
        record = self.run_dir / "mlflow.json"
        prev = read_json(record) if record.is_file() else {}
        existing: dict[str, str] = {}
        if prev.get("tracking_uri") == self.uri:
            self.run_id = prev["run_id"]
            existing = c.get_run(self.run_id).data.params
            c.update_run(self.run_id, status="RUNNING")
        else:
            run = c.create_run(self._experiment_id(), run_name=f"{self.run_dir.parent.name}/{self.run_dir.name}")
            self.run_id = run.info.run_id
            atomic_write_json(record, {"tracking_uri": self.uri, "run_id": self.run_id,
                                       "experiment": self.experiment})
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v[:6000])
        if changed:  # MLflow params are immutable; the trainer already warned that the config changed
            log.info("mlflow: params %s differ from the run's first attempt; MLflow keeps the first values",
                     ", ".join(changed))
        c.log_batch(self.run_id, params=[Param(k, v[:6000]) for k, v in params.items() if k not in existing],
                    tags=[RunTag(k, v) for k, v in tags.items()])
        log.info("mlflow: run %s in experiment %r at %s", self.run_id, self.experiment, self.uri)

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            try:
                return self.client.create_experiment(self.experiment)
            except Exception:
                exp = self.client.get_experiment_by_name(self.experiment)  # another job created it first
                if exp is None:
                    raise
        if exp.lifecycle_stage != "active":
            raise ValueError(f"experiment {self.experiment!r} is deleted; restore it or set "
                             "monitor.mlflow_experiment")
        return exp.experiment_id

    def resumed(self, step: int) -> None:
        pass  # MLflow cannot delete metric values: the repeated steps appear twice in the history

    def write(self, records: list[dict]) -> None:
        from mlflow.entities import Metric

        self.client.log_batch(self.run_id, metrics=[Metric(k, v, int(1000 * r["time"]), r["step"])
                                                    for r in records for k, v in scalars(r)])

    def close(self, summary: dict | None) -> None:
        from mlflow.entities import Metric, RunTag

        state = summary["state"] if summary else "failed"
        if summary:
            ms, step = int(1000 * time.time()), summary["step"]
            best = summary.get("best") or {}
            values = {"summary/samples_per_s": summary.get("samples_per_s"), "summary/wall_s": summary.get("wall_s"),
                      f"best/{best.get('monitor')}": best.get("value")}
            tags = {"hpc.state": state, "hpc.reason": summary.get("reason") or "", "hpc.best_step": best.get("step")}
            self.client.log_batch(
                self.run_id, metrics=[Metric(k, float(v), ms, step) for k, v in values.items() if v is not None],
                tags=[RunTag(k, str(v)) for k, v in tags.items() if v is not None])
        self.client.set_terminated(self.run_id, _MLFLOW_STATUS.get(state, "FAILED"))


class _Runner:
    """One sink on its own thread; the first exception turns the sink off with one warning."""

    def __init__(self, sink: Sink):
        self.sink, self.q = sink, queue.Queue(QUEUE_RECORDS)
        self.off = False
        self.thread = threading.Thread(target=self._loop, name=f"hpc-sink-{sink.name}", daemon=True)
        self.thread.start()

    def put(self, method: str, *args) -> None:
        if self.off:
            return
        try:
            self.q.put_nowait((method, args))
        except queue.Full:
            self._turn_off(f"more than {QUEUE_RECORDS} records behind (too slow or unreachable)")

    def _turn_off(self, reason: str) -> None:
        if not self.off:
            self.off = True
            log.warning("metric sink %s: %s; it is off for the rest of the run (metrics.jsonl has every "
                        "record)", self.sink.name, reason)

    def _items(self):
        """The queue's items, consecutive writes merged (up to WRITE_BATCH records): one call per batch
        (one MLflow transaction or request) lets a sink that fell behind catch up."""
        item = self.q.get()
        while item is not None:
            method, args = item
            item = _NONE
            while method == "write" and len(args[0]) < WRITE_BATCH:
                try:
                    item = self.q.get_nowait()
                except queue.Empty:
                    item = _NONE
                    break
                if item is None or item[0] != "write":
                    break
                args, item = (args[0] + item[1][0],), _NONE
            yield method, args
            if item is _NONE:
                item = self.q.get()

    def _loop(self) -> None:
        for method, args in self._items():
            if self.off:
                continue
            try:
                getattr(self.sink, method)(*args)
            except Exception as e:  # noqa: BLE001 - a sink never fails the run, whatever it raises
                msg = (str(e).strip().splitlines() or [""])[0][:500]
                hint = f" ({self.sink.hint})" if isinstance(e, ImportError) else ""
                self._turn_off(f"{type(e).__name__}: {msg}{hint}")

    def finish(self, summary: dict | None, deadline: float) -> None:
        self.put("close", summary)
        try:
            self.q.put(None, timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Full:
            pass
        self.thread.join(max(deadline - time.monotonic(), 0.0))
        if self.thread.is_alive():
            log.warning("metric sink %s: still writing %.0f s after the run ended; abandoned, its last "
                        "records may be missing", self.sink.name, CLOSE_TIMEOUT_S)
            self.off = True  # whatever the abandoned call raises later stays silent


class Sinks:
    """The sinks of one run (rank 0): ``write``/``resumed`` only enqueue; ``close`` drains them."""

    def __init__(self, sinks: list[Sink]):
        self.runners = [_Runner(s) for s in sinks]

    def start(self, params: dict[str, str], tags: dict[str, str]) -> None:
        for r in self.runners:
            r.put("start", params, tags)

    def resumed(self, step: int) -> None:
        for r in self.runners:
            r.put("resumed", step)

    def write(self, record: dict) -> None:
        for r in self.runners:
            r.put("write", [record])

    def close(self, summary: dict | None) -> None:
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        for r in self.runners:
            r.finish(summary, deadline)


def open_sinks(cfg, run_dir: Path, comm) -> Sinks | None:
    """The sinks ``cfg.monitor`` asks for, started with the config as params and the job as tags."""
    m = cfg.monitor
    sinks: list[Sink] = []
    if m.tensorboard:
        sinks.append(TensorBoardSink(run_dir / "tensorboard"))
    if m.mlflow_uri:
        sinks.append(MLflowSink(m.mlflow_uri, m.mlflow_experiment or cfg.name, run_dir))
    if not sinks:
        return None
    w = comm.world
    tags = {"hpc.run_dir": str(run_dir), "hpc.name": cfg.name, "hpc.world_size": str(comm.size),
            "hpc.backend": comm.backend, "hpc.config_hash": cfg.hash()}
    if w.slurm_job_id:
        tags.update({"hpc.job_id": str(w.slurm_job_id), "hpc.slurm_restart_count": str(w.slurm_restart_count)})
        if w.slurm_array_task_id is not None:
            tags["hpc.array_task_id"] = str(w.slurm_array_task_id)
    out = Sinks(sinks)
    out.start(flat_params(cfg.to_dict()), tags)
    return out
