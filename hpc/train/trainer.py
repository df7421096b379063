"""The synchronous data-parallel training loop (one process per rank; see docs/train.md).

Per optimizer step: ``grad_accum`` micro-batches (all but the last under ``GradSync.no_sync``), the
fused gradient all-reduce, then ONE small all-reduce of ``[loss, non-finite, stop, checkpoint]``
that gives every rank the global loss and the same decisions (skip a non-finite step, stop on a
preemption signal, checkpoint on rank 0's clock). The optimizer step follows; validation, logging
and checkpoints happen at step boundaries, which every rank reaches in the same order.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch

from hpc.models import ops
from hpc.models.families import build_model, task_of
from hpc.train import preempt
from hpc.train.checkpoint import Checkpoints, load_model, save_model
from hpc.train.config import AllRanksError, TrainConfig, dump_yaml
from hpc.train.inputs import TARGET, Data, load_data
from hpc.train.metrics import MetricSums, higher_is_better, samples_per_s
from hpc.train.optim import build_optimizer, lr_at, set_lr
from hpc.train.rundir import MetricsLog, resolve_run_dir, setup_logging
from hpc.train.sinks import open_sinks
from hpc.util.io import atomic_write_json, atomic_write_text
from hpc.util.progress import Progress, progress_interval_s
from hpc.util.versions import code_version, versions

log = logging.getLogger("hpc.train")


class NonFiniteError(RuntimeError):
    pass


class Trainer:
    def __init__(self, cfg: TrainConfig, comm, data: Data | None = None):
        self.cfg, self.comm = cfg, comm
        self.rank, self.world = comm.rank, comm.size
        self.t_start = time.time()
        where = None
        if self.rank == 0:
            try:
                run_dir, explicit = resolve_run_dir(cfg, comm.world)
                where = (str(run_dir), explicit and str(explicit))
            except ValueError as e:
                where = str(e)
        where = comm.broadcast_object(where)
        if isinstance(where, str):
            raise AllRanksError(where)
        run_dir, explicit = where
        self.run_dir = Path(run_dir)
        self.explicit_ckpt = Path(explicit) if explicit else None
        self._handlers = setup_logging(self.rank, self.run_dir)
        if self.rank == 0:
            (self.run_dir / "models").mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", dump_yaml(cfg))
        self.device = (torch.device("cuda", comm.world.local_rank % torch.cuda.device_count())
                       if torch.cuda.is_available() else torch.device("cpu"))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if cfg.train.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("train.precision=fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
        ops.set_kernels(cfg.kernels)
        _seed_everything(cfg.seed)
        self.data = data or load_data(cfg, self.rank, self.world)
        self.family = cfg.model.family
        self.task = task_of(self.family)
        self.model = build_model(self.family, cfg.model.config, self.data.schema).to(self.device)
        self.opt = build_optimizer(self.model, cfg.optim, self.world)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.train.precision == "fp16" else None
        from hpc.dist.grad_sync import GradSync, broadcast_optimizer_state, broadcast_parameters

        self._broadcast_params, self._broadcast_opt = broadcast_parameters, broadcast_optimizer_state
        self.sync = GradSync(comm, [p for p in self.model.parameters() if p.requires_grad],
                             bucket_mb=cfg.dist.bucket_mb,
                             compression=None if cfg.dist.compression == "none" else cfg.dist.compression)
        self.ckpt = Checkpoints(self.run_dir / "checkpoints", comm, cfg.checkpoint.keep)
        self.metrics_log = MetricsLog(self.run_dir / "metrics.jsonl", self.rank == 0,
                                      open_sinks(cfg, self.run_dir, comm) if self.rank == 0 else None)
        steps_per_epoch = self.data.train.batches_per_epoch // cfg.train.grad_accum
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
        # Progress and bookkeeping (all of it goes into checkpoints, so resume continues exactly).
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.last_val_step = -1
        self.best: dict = {"value": None, "step": None, "metrics": {}}
        self.evals_since_best = 0
        self.nonfinite_run = 0
        self.last_saved: tuple | None = None
        self._last_ckpt_s: float | None = None
        self.timers = {"data": 0.0, "comm": 0.0, "step": 0.0, "samples": 0}
        self.flag = preempt.PreemptFlag()  # installed by fit()
        self.hb = self.wd = None            # heartbeat and hang watchdog, started by fit()
        self._resume()
        self._broadcast_params(comm, self.model)
        self._broadcast_opt(comm, self.opt)

    # -- resume / checkpoint ----------------------------------------------------------------------
    def _resume(self) -> None:
        if self.cfg.resume == "never" and self.explicit_ckpt is None:
            return
        path = self.ckpt.choose(self.explicit_ckpt)
        if path is None:
            log.info("resume=%s: no checkpoint in %s; starting from scratch", self.cfg.resume, self.ckpt.dir)
            return
        shared, mine = self.ckpt.load(path, self.model, self.opt)
        if shared["config_hash"] != self.cfg.hash():
            log.warning("resuming %s written with a different config (hash %s, now %s): the result will "
                        "not equal an uninterrupted run", path, shared["config_hash"][:12], self.cfg.hash()[:12])
        self.step, self.epoch, self.batch_in_epoch = shared["step"], shared["epoch"], shared["batch_in_epoch"]
        self.last_val_step = shared["last_val_step"]
        self.best, self.evals_since_best = shared["best"], shared["evals_since_best"]
        self.nonfinite_run = shared["nonfinite_run"]
        if self.scaler is not None and shared.get("scaler"):
            self.scaler.load_state_dict(shared["scaler"])
        self.data.train.load_state_dict(mine["reader"])
        self.last_saved = self._position()
        self.metrics_log.truncate_after(self.step)
        log.info("resumed from %s (step %d, epoch %d)", path, self.step, self.epoch)

    def _position(self) -> tuple[int, int, int]:
        return (self.step, self.epoch, self.batch_in_epoch)

    def save_checkpoint(self) -> None:
        if self._position() == self.last_saved:
            return
        t0 = time.perf_counter()
        # Never checkpoint non-finite weights (a skipped step cannot produce them, but a finite
        # gradient times a huge lr can): every rank checks its identical copy, so all agree.
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise NonFiniteError(f"step {self.step}: the parameters are not finite; refusing to write a "
                                 "checkpoint from them (lower optim.lr?)")
        shared = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                  "last_val_step": self.last_val_step, "config_hash": self.cfg.hash(), "best": self.best,
                  "evals_since_best": self.evals_since_best, "nonfinite_run": self.nonfinite_run,
                  "scaler": self.scaler.state_dict() if self.scaler is not None else None}
        path = self.ckpt.save(self.step, self.model, self.opt, shared, {"reader": self.data.train.state_dict()})
        self.last_saved = self._position()
        self._last_ckpt_time = time.time()
        self._last_ckpt_s = time.perf_counter() - t0
        log.info("checkpoint %s written in %.2fs", path.name, self._last_ckpt_s)

    # -- one optimizer step -----------------------------------------------------------------------
    def _autocast(self):
        p = self.cfg.train.precision
        if p == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if p == "bf16" else torch.float16)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def per_sample_loss(self, pred: torch.Tensor, batch: dict) -> torch.Tensor:
        if hasattr(self.model, "loss"):
            return self.model.loss(pred, batch)
        y = batch[TARGET[self.task]]
        if self.task == "classification":
            return ops.softmax_cross_entropy(pred.float(), y, reduction="none")
        return (pred.float() - y.float()) ** 2

    def train_loss(self, pred: torch.Tensor, batch: dict) -> torch.Tensor:
        """Mean over the rank's nominal batch; GradSync's average over ranks makes it the global mean."""
        if (self.task == "classification" and self.cfg.data.remainder == "drop" and not hasattr(self.model, "loss")
                and self.cfg.data.sample_weights is None):
            return ops.softmax_cross_entropy(pred.float(), batch[TARGET[self.task]])  # fused kernel path
        w = batch["weight"].to(pred.device)
        return (self.per_sample_loss(pred, batch) * w).sum() / w.numel()

    def train_step(self, micro: list[dict], ckpt_local: bool = False) -> dict:
        self.model.train()
        self.opt.zero_grad(set_to_none=False)
        loss_sum = torch.zeros((), device=self.device)
        with self._phase("compute"):
            for i, batch in enumerate(micro):
                batch = self._to_device(batch)
                ctx = self.sync.no_sync() if i < len(micro) - 1 else contextlib.nullcontext()
                with ctx:
                    with self._autocast():
                        loss = self.train_loss(self.model(batch), batch) / len(micro)
                    (self.scaler.scale(loss) if self.scaler else loss).backward()
                loss_sum += loss.detach().float()
        t0 = time.perf_counter()
        with self._phase("comm"):
            self.sync.synchronize()
            if self.scaler is not None:
                self.scaler.unscale_(self.opt)
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            gnorm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else loss_sum * 0
            bad = not bool(torch.isfinite(loss_sum)) or (self.scaler is None and not bool(torch.isfinite(gnorm)))
            # The one scalar all-reduce per step: global loss and the decisions every rank must share.
            flags = torch.tensor([float(loss_sum) if not bad else 0.0, float(bad), float(self.flag.requested),
                                  float(ckpt_local)], dtype=torch.float64, device=self.comm.device)
            self.comm.allreduce_(flags)
        self.timers["comm"] += time.perf_counter() - t0
        out = {"loss": float(flags[0]) / self.world, "nonfinite": bool(flags[1] > 0),
               "stop": bool(flags[2] > 0), "checkpoint": bool(flags[3] > 0), "grad_norm": float(gnorm)}
        if out["nonfinite"]:
            self.opt.zero_grad(set_to_none=False)
            if self.scaler is not None:
                self.scaler.update()
            return out
        if self.cfg.optim.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad_norm)
        set_lr(self.opt, lr_at(self.step, self.cfg.optim, self.total_steps, self.world))
        with self._phase("compute"):
            if self.scaler is not None:
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                self.opt.step()
        return out

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, reader) -> dict:
        self.model.eval()
        binary = getattr(getattr(self.model, "cfg", None), "loss", None) == "bce"
        sums = MetricSums(self.task, int(self.data.schema.get("num_classes") or 0), binary_scores=binary)
        for batch in reader:
            batch = self._to_device(batch)
            with self._autocast():
                pred = self.model(batch)
            pred = pred.float()
            sums.update(pred, batch[TARGET[self.task]], self.per_sample_loss(pred, batch), batch["weight"])
        return sums.reduce(_CPUComm(self.comm))

    def _validate(self) -> bool:
        """Evaluate on val, keep the best model; True when early stopping says stop."""
        if self.data.val is None:
            return False
        m = self.evaluate(self.data.val)
        self.last_val_step = self.step
        key = self.cfg.train.monitor
        value = m.get(key)
        if value is None:
            raise ValueError(f"train.monitor={key!r}: validation produced {sorted(m)}; pick one of those")
        self.metrics_log.write(kind="val", step=self.step, epoch=self.epoch, **m)
        log.info("step %d val %s", self.step, " ".join(f"{k}={v:.4f}" for k, v in m.items()))
        best = self.best["value"]
        up = higher_is_better(key)
        if best is None or (value > best if up else value < best):
            self.best = {"value": value, "step": self.step, "metrics": m}
            self.evals_since_best = 0
            if self.rank == 0:
                save_model(self.run_dir / "models" / "best.safetensors", self.model, self._model_meta())
        else:
            self.evals_since_best += 1
        p = self.cfg.train.patience
        return p > 0 and self.evals_since_best >= p

    def _model_meta(self) -> dict[str, str]:
        import json

        return {"family": self.family, "config": json.dumps(self.cfg.model.config), "step": str(self.step)}

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, tc = self.cfg, self.cfg.train
        try:
            every_s = progress_interval_s()
        except ValueError as e:  # the same environment on every rank: all stop here together (exit 2)
            raise AllRanksError(str(e)) from None
        self.flag.install()
        self._start_monitor()
        reader, ga = self.data.train, tc.grad_accum
        per_epoch = reader.batches_per_epoch
        # Before the first step, so a piped/Slurm log shows where the run writes from the start.
        log.info("run %s: %d rank(s), backend %s, device %s; %d steps (%d per epoch)%s", self.run_dir,
                 self.world, self.comm.backend, self.device, self.total_steps, per_epoch // ga,
                 f", resuming at step {self.step}" if self.step else "")
        bar = Progress(self.total_steps, label="train", noun="step", unit="steps", initial=self.step,
                       enabled=self.rank == 0 and tc.progress, interval_s=every_s, emit=log.info)
        global_batch = cfg.data.batch_size * ga
        stop = None  # None | "early_stopping" | "preempted"
        self._last_ckpt_time = time.time()
        window_loss, window_n = 0.0, 0
        try:
            while self.step < self.total_steps and stop is None:
                reader.set_epoch(self.epoch)
                it = iter(reader)
                while self.step < self.total_steps and stop is None and self.batch_in_epoch + ga <= per_epoch:
                    t0 = time.perf_counter()
                    with self._phase("data"):
                        micro = list(_take(it, ga))
                    t1 = time.perf_counter()
                    assert len(micro) == ga, "the reader yielded fewer batches than batches_per_epoch"
                    self.batch_in_epoch += ga
                    ckpt_due = (self.rank == 0 and cfg.checkpoint.every_minutes > 0 and
                                time.time() - self._last_ckpt_time >= 60 * cfg.checkpoint.every_minutes)
                    out = self.train_step(micro, ckpt_due)
                    self.timers["data"] += t1 - t0
                    self.timers["step"] += time.perf_counter() - t0
                    if out["nonfinite"]:
                        self._nonfinite()
                    else:
                        self.nonfinite_run = 0
                        self.step += 1
                        if self.hb is not None:
                            self.hb.set_step(self.step, self.epoch, samples=global_batch // self.world)
                        self.timers["samples"] += global_batch
                        window_loss, window_n = window_loss + out["loss"], window_n + 1
                        if self.step % tc.log_every == 0:
                            self._log_train(window_loss / window_n, out, bar)
                            window_loss, window_n = 0.0, 0
                    # The epoch ends eagerly (before any checkpoint of this step boundary), so a
                    # checkpoint never has to remember "validation of the finished epoch pending".
                    epoch_end = self.batch_in_epoch + ga > per_epoch
                    if epoch_end:
                        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    if ((tc.eval_every and self.step % tc.eval_every == 0 and not out["nonfinite"])
                            or (epoch_end and not tc.eval_every)):
                        with self._phase("eval"):
                            if self._validate():
                                stop = "early_stopping"
                    every = cfg.checkpoint.every_steps
                    if out["checkpoint"] or out["stop"] or (every and self.step % every == 0):
                        with self._phase("checkpoint"):
                            self.save_checkpoint()
                    if out["stop"]:
                        stop = "preempted"
                    bar.set(self.step, epoch=self.epoch)
                    if epoch_end:
                        break
                if hasattr(it, "close"):
                    it.close()  # stops the reader's prefetch thread when we leave mid-epoch
        except NonFiniteError as e:
            log.error("%s", e)
            return self._finish("failed", str(e), bar)
        if stop == "preempted":
            return self._finish("preempted", f"signal {self._signal_name()}", bar)
        if stop == "early_stopping":
            log.info("early stopping at step %d: no val %s improvement in %d evaluations",
                     self.step, tc.monitor, tc.patience)
        elif self.data.val is not None and self.best["step"] != self.step and self.last_val_step != self.step:
            self._validate()  # max_steps ended mid-epoch or between evaluations
        if cfg.checkpoint.at_end:
            self.save_checkpoint()
        return self._finish("completed", stop, bar)

    def _nonfinite(self) -> None:
        self.nonfinite_run += 1
        tc = self.cfg.train
        log.warning("step %d: non-finite loss or gradients on some rank; step skipped (%d in a row, limit "
                    "train.max_nonfinite=%d)", self.step, self.nonfinite_run, tc.max_nonfinite)
        self.metrics_log.write(kind="nonfinite", step=self.step, epoch=self.epoch)
        if self.nonfinite_run > tc.max_nonfinite:
            raise NonFiniteError(
                f"{self.nonfinite_run} non-finite steps in a row at step {self.step} (train.max_nonfinite="
                f"{tc.max_nonfinite}); stopping without checkpointing: lower optim.lr, set "
                "optim.clip_grad_norm, or check the data")

    def _log_train(self, loss: float, out: dict, bar: Progress) -> None:
        sps = samples_per_s(self.timers["samples"], self.timers["step"])
        lr = self.opt.param_groups[0]["lr"]
        self.metrics_log.write(kind="train", step=self.step, epoch=self.epoch, loss=loss, lr=lr,
                               grad_norm=out["grad_norm"], samples_per_s=sps)
        # The periodic progress line (or the bar) shows these; metrics.jsonl keeps every one.
        bar.set_fields(loss=f"{loss:.4f}", **{"samples/s": sps})

    # -- the end ----------------------------------------------------------------------------------
    def _finish(self, state: str, reason: str | None, bar: Progress) -> dict:
        bar.close()
        self.flag.uninstall()
        self._stop_monitor(state)
        metrics: dict = {"val": self.best.get("metrics") or {}, "test": {}}
        if state == "completed":
            if self.rank == 0:
                save_model(self.run_dir / "models" / "last.safetensors", self.model, self._model_meta())
                if self.best["step"] is None:  # no validation split: the last model is the best
                    save_model(self.run_dir / "models" / "best.safetensors", self.model, self._model_meta())
            self.comm.barrier()
            if self.data.test is not None:
                load_model(self.run_dir / "models" / "best.safetensors", self.model)
                metrics["test"] = self.evaluate(self.data.test)
                log.info("test (best model, step %s): %s", self.best["step"] if self.best["step"] is not None
                         else self.step, " ".join(f"{k}={v:.4f}" for k, v in metrics["test"].items()))
                self.metrics_log.write(kind="test", step=self.step, **metrics["test"])
        elif state == "preempted":
            what = preempt.requeue(self.comm.world, self._last_ckpt_s) if self.rank == 0 else ""
            log.warning("preempted by %s at step %d: checkpoint written; %s", self._signal_name(), self.step,
                        what or "rank 0 handles the requeue")
        w = self.comm.world
        step_t = max(self.timers["step"], 1e-9)
        summary = {
            "state": state, "reason": reason, "run_dir": str(self.run_dir), "name": self.cfg.name,
            "model": {"family": self.family, "task": self.task, "config": self.cfg.model.config,
                      "parameters": sum(p.numel() for p in self.model.parameters())},
            "data": self.data.info, "metrics": metrics,
            "best": {"step": self.best["step"], "monitor": self.cfg.train.monitor, "value": self.best["value"]},
            "step": self.step, "epoch": self.epoch, "total_steps": self.total_steps,
            "world_size": self.world, "backend": self.comm.backend, "device": str(self.device),
            "kernels": ops.kernels_in_use(self.device),
            "optimizer": {"name": self.cfg.optim.name, "fused": self.cfg.optim.fused,
                          "step": getattr(self.opt, "kernel_path", "torch.optim")},
            "precision": self.cfg.train.precision,
            "samples_per_s": samples_per_s(self.timers["samples"], self.timers["step"]),
            "time_fractions": {"data_wait": self.timers["data"] / step_t, "comm_wait": self.timers["comm"] / step_t},
            "wall_s": time.time() - self.t_start, "config_hash": self.cfg.hash(),
            "versions": versions(), "code_version": code_version(),
            "slurm": {"job_id": w.slurm_job_id, "array_task_id": w.slurm_array_task_id,
                      "restart_count": w.slurm_restart_count},
        }
        if self.rank == 0:
            atomic_write_json(self.run_dir / "summary.json", summary)
            if state == "completed" and self.cfg.registry is not None:
                summary["registry"] = _register(self.cfg, self.run_dir)
                atomic_write_json(self.run_dir / "summary.json", summary)
            self.metrics_log.close(summary)  # TensorBoard/MLflow: the final state, then drained
            log.info("run %s at step %d%s; summary: %s", state, self.step, f" ({reason})" if reason else "",
                     self.run_dir / "summary.json")
        return summary

    # -- heartbeats and the hang watchdog (hpc.monitor; docs/operability.md) -----------------------
    def _start_monitor(self) -> None:
        m = self.cfg.monitor
        if m.heartbeat_s <= 0:
            return
        from hpc.instrument import Heartbeat, Watchdog

        w = self.comm.world
        self.hb = Heartbeat(self.run_dir, self.rank, interval_s=m.heartbeat_s, world_size=self.world,
                            total_steps=self.total_steps, started=self.t_start)
        self.hb.set_step(self.step, self.epoch)
        if m.hang_s > 0:
            def requeue_on_hang(report):  # noqa: ARG001 - the report is already written
                if w.is_main:
                    from hpc.launch.requeue import requeue_current_job

                    requeue_current_job(w, reason="timeout")

            self.wd = Watchdog(self.hb, threshold_s=m.hang_s, collective_timeout_s=self.cfg.dist.timeout_s,
                               on_hang=requeue_on_hang if m.on_hang == "requeue" and w.under_slurm else None)

    def _phase(self, name: str):
        return self.hb.phase(name) if self.hb is not None else contextlib.nullcontext()

    def _stop_monitor(self, state: str) -> None:
        if self.wd is not None:
            self.wd.close()
            self.wd = None
        if self.hb is not None:
            self.hb.close(state)
            self.hb = None

    def _signal_name(self) -> str:
        return self.flag.signal_name or "a signal received by another rank"

    def close(self) -> None:
        self._stop_monitor("failed")  # no-op after _finish (only the first close counts)
        self.metrics_log.close()       # likewise: marks an MLflow run FAILED only when _finish never ran
        self.flag.uninstall()
        self.sync.remove()
        for h in self._handlers:
            logging.getLogger("hpc.train").removeHandler(h)
            h.close()


def _register(cfg: TrainConfig, run_dir: Path) -> dict:
    from hpc.registry import Registry, default_root  # lazily: training does not need the registry

    r = cfg.registry
    reg = Registry(r.root or default_root())
    version = reg.add(run_dir, r.name, source=r.source)
    if r.alias:
        reg.promote(r.name, version, r.alias)
    log.info("registered %s version %s%s", r.name, version, f" as @{r.alias}" if r.alias else "")
    return {"name": r.name, "version": version, "alias": r.alias}


class _CPUComm:
    """Metric sums live on the CPU; backends that need device tensors (NCCL) get a copy."""

    def __init__(self, comm):
        self.comm = comm

    def allreduce_(self, t: torch.Tensor) -> torch.Tensor:
        dev = getattr(self.comm, "device", torch.device("cpu"))
        if dev.type == "cpu":
            return self.comm.allreduce_(t)
        t.copy_(self.comm.allreduce_(t.to(dev)).cpu())
        return t


def _take(it, k: int):
    for _ in range(k):
        try:
            yield next(it)
        except StopIteration:
            return


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)

