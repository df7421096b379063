"""The synchronous data-parallel training loop, one process per rank (docs/train.md "Read the trainer").

Per optimizer step: ``grad_accum`` micro-batches (all but the last under ``GradSync.no_sync``), the
fused gradient all-reduce, then ONE small all-reduce of ``[loss, non-finite, stop for requeue, stop
for termination, checkpoint]`` that gives every rank the global loss and the same decisions (skip a
non-finite step, stop on a signal and which kind, checkpoint on rank 0's clock). The optimizer step follows; validation, logging
and checkpoints happen at step boundaries, which every rank reaches in the same order.

The trainer does not know how it was launched: a preemption ends ``fit`` with state "preempted"
(checkpointed), and whoever launched it decides what follows (``hpc.launch.tasks.run_training``
requeues the Slurm job). The summary is built by ``hpc.train.runner`` from the ``Outcome``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from hpc.dist.grad_sync import GradSync, broadcast_optimizer_state, broadcast_parameters
from hpc.models import ops
from hpc.models.families import build_model, task_of
from hpc.train.checkpoint import Checkpoints, load_model, save_model
from hpc.train.checks import check_precision
from hpc.train.config import TrainConfig
from hpc.train.inputs import TARGET, Data, load_data
from hpc.train.losses import per_sample_loss, train_loss
from hpc.train.metrics import MetricSums, higher_is_better, samples_per_s
from hpc.train.optim import build_optimizer, lr_at, set_lr
from hpc.train.rundir import MetricsLog
from hpc.train.sinks import open_sinks
from hpc.train.state import Outcome, TrainState
from hpc.train.watch import RunWatch
from hpc.util.progress import Progress

log = logging.getLogger("hpc.train")


# The start-up phases, each named by the mark that ends it: hpc.dist.spawn.launch_marks' (``launch``,
# ``mpiexec``, ``process``), then hpc.train.runner.run's and the trainer's.
STARTUP_PHASES = (("mpiexec", "cli"), ("process", "spawn"), ("entered", "imports"), ("preflight", "preflight"),
                  ("comm", "comm init"), ("rundir", "run dir"), ("data", "data open"),
                  ("model", "model build"), ("first_step", "first step"))


def startup_phases(marks: dict[str, float]) -> dict:
    """Seconds per start-up phase between the marks there are (pure). ``cli`` (the ``hpc train
    --nproc`` process: its imports, config and checks) and ``spawn`` (mpiexec starting the ranks)
    exist under ``--nproc`` only; ``to_first_step_s`` counts from the first mark there is (the
    launch, else this process's start)."""
    order = ["launch"] + [m for m, _ in STARTUP_PHASES]
    have = [m for m in order if m in marks]
    name = dict(STARTUP_PHASES)
    phases = {name[b]: round(marks[b] - marks[a], 4) for a, b in zip(have, have[1:])}
    first = marks.get("first_step")
    return {"phases_s": phases, "to_first_step_s": round(first - marks[have[0]], 4) if first and have else None,
            "from": have[0] if have else None, "marks": {m: marks[m] for m in have}}


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row, or non-finite weights about to be checkpointed."""


class Trainer:
    """One rank's part of a run. ``on_hang(report)``: what the hang watchdog calls before the hung
    process exits when ``monitor.on_hang=requeue`` (the launch layer passes a Slurm requeue)."""

    def __init__(self, cfg: TrainConfig, comm, run_dir: Path, resume_from: Path | None = None,
                 data: Data | None = None, on_hang: Callable[[object], None] | None = None,
                 started: float | None = None, startup: dict[str, float] | None = None):
        self.cfg, self.comm, self.run_dir, self.explicit_ckpt = cfg, comm, run_dir, resume_from
        self.rank, self.world = comm.rank, comm.size
        self.t_start = started or time.time()
        # Start-up marks (time.time()): the runner's, then "data", "model" and "first_step" here.
        self.startup = dict(startup or {})
        self.device = _pick_device(comm.world.local_rank)
        check_precision(cfg.train.precision, cuda=self.device.type == "cuda")
        ops.set_kernels(cfg.kernels)
        _seed_everything(cfg.seed)
        self.data = data or load_data(cfg, self.rank, self.world)
        self.startup["data"] = time.time()
        self.family, self.task = cfg.model.family, task_of(cfg.model.family, self.data.schema.get("task"))
        # Batches weigh samples other than 1 (padded tails, ensemble row weights): the loss uses them.
        self._weighted = cfg.data.remainder != "drop" or cfg.data.sample_weights is not None
        self.model = build_model(self.family, cfg.model.config, self.data.schema).to(self.device)
        self.opt = build_optimizer(self.model, cfg.optim, self.world)
        # fp16 only: scales the loss so that small gradients survive the half-precision backward.
        self.scaler = torch.amp.GradScaler("cuda") if cfg.train.precision == "fp16" else None
        self.sync = GradSync(comm, [p for p in self.model.parameters() if p.requires_grad],
                             bucket_mb=cfg.dist.bucket_mb,
                             compression=None if cfg.dist.compression == "none" else cfg.dist.compression)
        self.ckpt = Checkpoints(self.run_dir / "checkpoints", comm, cfg.checkpoint.keep)
        self.metrics_log = MetricsLog(self.run_dir / "metrics.jsonl", self.rank == 0,
                                      open_sinks(cfg, self.run_dir, comm) if self.rank == 0 else None)
        steps_per_epoch = self.data.train.batches_per_epoch // cfg.train.grad_accum
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
        self.state = TrainState()          # the loop's progress: what a checkpoint stores
        self.last_saved: tuple | None = None       # state.position of the newest checkpoint
        self.last_ckpt_s: float | None = None      # how long it took (the requeue compares it)
        self._last_ckpt_time = time.time()
        # Seconds in steps (data wait + compute + sync), of which data and comm; samples in steps.
        # Finer split of a step (hpc bench train prints it per rank): forward+backward (with the
        # bucket all-reduces started from its hooks), waiting for the gradient all-reduce, the
        # scalar all-reduce of the step's flags, the optimizer step.
        self.timers = {"data": 0.0, "comm": 0.0, "step": 0.0, "samples": 0,
                       "fwd_bwd": 0.0, "grad_sync": 0.0, "flags": 0.0, "optim": 0.0}
        self.timers_first: dict = {}   # the timers after this process's first step
        self.watch = RunWatch(cfg, self.run_dir, comm, self.total_steps, self.t_start, on_hang)  # fit starts it
        self._resume()
        # Every rank starts from rank 0's weights and optimizer state (fresh or resumed).
        broadcast_parameters(comm, self.model)
        broadcast_optimizer_state(comm, self.opt)
        self.startup["model"] = time.time()

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self) -> Outcome:
        """Train to ``total_steps`` (or early stopping, a preemption, a failure); every rank alike."""
        cfg, tc, s = self.cfg, self.cfg.train, self.state
        ga, per_epoch = tc.grad_accum, self.data.train.batches_per_epoch
        global_batch = cfg.data.batch_size * ga   # samples per optimizer step, all ranks together
        # Preemption signals, heartbeat, hang watchdog; the run line and the progress bar.
        bar = self.watch.start(s.step, s.epoch, device=self.device, steps_per_epoch=per_epoch // ga)
        self._last_ckpt_time = time.time()
        stop = None          # None | "early_stopping" | "preempted"
        window = []          # train losses since the last metrics.jsonl line
        batches = None       # iterator over the epoch in progress
        try:
            while s.step < self.total_steps and stop is None:
                if batches is None:  # a new epoch, or the rest of one after a resume
                    self.data.train.set_epoch(s.epoch)  # the order depends on (seed, epoch) only
                    batches = iter(self.data.train)
                # This rank's share of ga global batches: dicts of field -> [B/world, ...] tensors,
                # plus "weight" [B/world] (0 for padding) and "row_id" [B/world].
                t0 = time.perf_counter()
                with self.watch.phase("data"):
                    micro = list(itertools.islice(batches, ga))
                t_data = time.perf_counter() - t0
                assert len(micro) == ga, "the reader yielded fewer batches than batches_per_epoch"
                s.batch_in_epoch += ga
                out = self.train_step(micro, ckpt_local=self._checkpoint_due())
                self.timers["data"] += t_data
                self.timers["step"] += time.perf_counter() - t0
                if not self.timers_first:
                    self._first_step(global_batch if not out["nonfinite"] else 0)
                if out["nonfinite"]:
                    self._nonfinite()  # every rank skipped it; raises after max_nonfinite in a row
                else:
                    s.nonfinite_run = 0
                    s.step += 1
                    self.timers["samples"] += global_batch
                    self.watch.set_step(s.step, s.epoch, samples=global_batch // self.world)
                    window.append(out["loss"])
                    if s.step % tc.log_every == 0:
                        self._log_train(sum(window) / len(window), out["grad_norm"], bar)
                        window = []
                # The epoch ends eagerly (before any checkpoint of this step boundary), so a
                # checkpoint never has to remember "validation of the finished epoch pending".
                epoch_end = s.batch_in_epoch + ga > per_epoch
                if epoch_end:
                    s.epoch, s.batch_in_epoch = s.epoch + 1, 0
                if ((tc.eval_every and s.step % tc.eval_every == 0 and not out["nonfinite"])
                        or (epoch_end and not tc.eval_every)):
                    if self._validate():
                        stop = "early_stopping"
                every = cfg.checkpoint.every_steps
                if out["checkpoint"] or out["stop"] or (every and s.step % every == 0):
                    self.save_checkpoint()
                if out["stop"]:
                    stop = "preempted"  # checkpointed just above, on every rank
                bar.set(s.step, epoch=s.epoch)
                if epoch_end:
                    _close(batches)
                    batches = None
        except NonFiniteError as e:
            log.error("%s", e)
            return self._finish("failed", str(e), bar)
        finally:
            _close(batches)  # stops the reader's prefetch thread when we leave mid-epoch
        if stop == "preempted":
            return self._finish("preempted", f"signal {self.watch.signal_name}", bar)
        if stop == "early_stopping":
            log.info("early stopping at step %d: no val %s improvement in %d evaluations",
                     s.step, tc.monitor, tc.patience)
        elif self.data.val is not None and s.best["step"] != s.step and s.last_val_step != s.step:
            self._validate()  # max_steps ended mid-epoch or between evaluations
        if cfg.checkpoint.at_end:
            self.save_checkpoint()
        return self._finish("completed", stop, bar)

    # -- one optimizer step -----------------------------------------------------------------------
    def train_step(self, micro: list[dict], ckpt_local: bool = False) -> dict:
        self.model.train()
        self.opt.zero_grad(set_to_none=False)  # p.grad are views into GradSync's buckets: keep them
        loss_sum = torch.zeros((), device=self.device)
        t_fb = time.perf_counter()
        with self.watch.phase("compute"):
            for i, batch in enumerate(micro):
                batch = self._to_device(batch)
                # Only the last micro-batch's backward starts the bucket all-reduces.
                ctx = self.sync.no_sync() if i < len(micro) - 1 else contextlib.nullcontext()
                with ctx:
                    with self._autocast():
                        pred = self.model(batch)  # logits [B/world, C] or predictions [B/world]
                        loss = train_loss(self.model, self.task, self._weighted, pred, batch) / len(micro)
                    (self.scaler.scale(loss) if self.scaler else loss).backward()
                loss_sum += loss.detach().float()
        t0 = time.perf_counter()
        self.timers["fwd_bwd"] += t0 - t_fb
        with self.watch.phase("comm"):
            self.sync.synchronize()  # gradients are now the mean over all ranks
            t_sync = time.perf_counter()
            self.timers["grad_sync"] += t_sync - t0
            if self.scaler is not None:
                self.scaler.unscale_(self.opt)
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            gnorm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else loss_sum * 0
            # One device->host read of both (each float()/bool() of a tensor is one, and each small
            # tensor op costs ~5 us on the CPU: this block was 3 % of a 4 ms step, issue #20).
            loss_v, gnorm_v = torch.stack([loss_sum.float(), gnorm.float()]).tolist()
            bad = not math.isfinite(loss_v) or (self.scaler is None and not math.isfinite(gnorm_v))
            # The one scalar all-reduce per step, float64 [5]: the global loss and the decisions
            # every rank must share (skip the step, stop for a requeue signal or for a terminating
            # one, checkpoint now).
            requeue_vote, other_vote = self.watch.stop_votes()
            flags = torch.tensor([loss_v if not bad else 0.0, float(bad), requeue_vote, other_vote,
                                  float(ckpt_local)], dtype=torch.float64, device=self.comm.device)
            self.comm.allreduce_(flags)
            f = flags.tolist()
        t1 = time.perf_counter()
        self.timers["comm"] += t1 - t0
        self.timers["flags"] += t1 - t_sync
        out = {"loss": f[0] / self.world, "nonfinite": f[1] > 0, "stop": f[2] > 0 or f[3] > 0,
               "checkpoint": f[4] > 0, "grad_norm": gnorm_v}
        if out["stop"]:
            self.watch.agree_signal(f[2], f[3])
        if out["nonfinite"]:
            self.opt.zero_grad(set_to_none=False)
            if self.scaler is not None:
                self.scaler.update()  # lowers the scale: the usual cause of fp16 overflow
            return out
        if self.cfg.optim.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad_norm)
        set_lr(self.opt, lr_at(self.state.step, self.cfg.optim, self.total_steps, self.world))
        with self.watch.phase("compute"):
            if self.scaler is not None:
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                self.opt.step()
        self.timers["optim"] += time.perf_counter() - t1
        return out

    def _first_step(self, samples: int) -> None:
        """Keep the first step's timers apart (it also starts the reader and pays first-call costs)
        and log how long the start-up took, phase by phase (summary.json "startup")."""
        self.startup["first_step"] = time.time()
        self.timers_first = dict(self.timers, samples=samples)
        st = startup_phases(self.startup)  # every rank's own log; stderr shows rank 0's
        log.info("start-up: %.2fs from %s to the end of the first step (%s)", st["to_first_step_s"],
                 "`hpc train`" if st["from"] == "launch" else "the process start",
                 ", ".join(f"{k} {v:.2f}" for k, v in st["phases_s"].items()))

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _autocast(self):
        p = self.cfg.train.precision
        if p == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if p == "bf16" else torch.float16)

    def _nonfinite(self) -> None:
        s, tc = self.state, self.cfg.train
        s.nonfinite_run += 1
        log.warning("step %d: non-finite loss or gradients on some rank; step skipped (%d in a row, limit "
                    "train.max_nonfinite=%d)", s.step, s.nonfinite_run, tc.max_nonfinite)
        self.metrics_log.write(kind="nonfinite", step=s.step, epoch=s.epoch)
        if s.nonfinite_run > tc.max_nonfinite:
            raise NonFiniteError(
                f"{s.nonfinite_run} non-finite steps in a row at step {s.step} (train.max_nonfinite="
                f"{tc.max_nonfinite}); stopping without checkpointing: lower optim.lr, set "
                "optim.clip_grad_norm, or check the data")

    def _log_train(self, loss: float, grad_norm: float, bar: Progress) -> None:
        sps = samples_per_s(self.timers["samples"], self.timers["step"])
        self.metrics_log.write(kind="train", step=self.state.step, epoch=self.state.epoch, loss=loss,
                               lr=self.opt.param_groups[0]["lr"], grad_norm=grad_norm, samples_per_s=sps)
        # The periodic progress line (or the bar) shows these; metrics.jsonl keeps every one.
        bar.set_fields(loss=f"{loss:.4f}", **{"samples/s": sps})

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, reader) -> dict:
        """Global metrics over a split (sums all-reduced once; padding has weight 0)."""
        self.model.eval()
        binary = getattr(getattr(self.model, "cfg", None), "loss", None) == "bce"
        sums = MetricSums(self.task, int(self.data.schema.get("num_classes") or 0), binary_scores=binary,
                          target_mean=(self.data.schema.get("target") or {}).get("mean"))
        for batch in reader:
            batch = self._to_device(batch)
            with self._autocast():
                pred = self.model(batch)
            pred = pred.float()
            loss = per_sample_loss(self.model, self.task, pred, batch)
            sums.update(pred, batch[TARGET[self.task]], loss, batch["weight"])
        return sums.reduce(self.comm)

    def _validate(self) -> bool:
        """Evaluate on val, keep the best model; True when early stopping says stop."""
        s, key = self.state, self.cfg.train.monitor
        if self.data.val is None:
            return False
        with self.watch.phase("eval"):  # every validation, also the last one after the loop
            m = self.evaluate(self.data.val)
        if m.get(key) is None:
            raise ValueError(f"train.monitor={key!r}: validation produced {sorted(m)}; pick one of those")
        self.metrics_log.write(kind="val", step=s.step, epoch=s.epoch, **m)
        log.info("step %d val %s", s.step, " ".join(f"{k}={v:.4f}" for k, v in m.items()))
        if s.record_eval(m[key], m, higher_is_better(key)) and self.rank == 0:
            save_model(self.run_dir / "models" / "best.safetensors", self.model, self._model_meta())
        p = self.cfg.train.patience
        return p > 0 and s.evals_since_best >= p

    def _model_meta(self) -> dict[str, str]:
        return {"family": self.family, "config": json.dumps(self.cfg.model.config), "step": str(self.state.step)}

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Collective: every rank writes its part at the same step; nothing if nothing moved."""
        s = self.state
        if s.position == self.last_saved:
            return
        t0 = time.perf_counter()
        with self.watch.phase("checkpoint"):
            # Never checkpoint non-finite weights (a skipped step cannot produce them, but a finite
            # gradient times a huge lr can): every rank checks its identical copy, so all agree.
            if not all(torch.isfinite(p).all() for p in self.model.parameters()):
                raise NonFiniteError(f"step {s.step}: the parameters are not finite; refusing to write a "
                                     "checkpoint from them (lower optim.lr?)")
            shared = {**s.state_dict(), "config_hash": self.cfg.hash(),
                      "scaler": self.scaler.state_dict() if self.scaler is not None else None}
            path = self.ckpt.save(s.step, self.model, self.opt, shared, {"reader": self.data.train.state_dict()})
        self.last_saved = s.position
        self._last_ckpt_time = time.time()
        self.last_ckpt_s = time.perf_counter() - t0
        log.info("checkpoint %s written in %.2fs", path.name, self.last_ckpt_s)

    def _checkpoint_due(self) -> bool:
        """Rank 0's clock (checkpoint.every_minutes); the step's all-reduce tells every rank."""
        every = self.cfg.checkpoint.every_minutes
        return self.rank == 0 and every > 0 and time.time() - self._last_ckpt_time >= 60 * every

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
        self.state.load_state_dict(shared)
        if self.scaler is not None and shared.get("scaler"):
            self.scaler.load_state_dict(shared["scaler"])
        self.data.train.load_state_dict(mine["reader"])
        self.last_saved = self.state.position
        self.metrics_log.truncate_after(self.state.step)
        log.info("resumed from %s (step %d, epoch %d)", path, self.state.step, self.state.epoch)

    # -- the end ----------------------------------------------------------------------------------
    def _finish(self, state: str, reason: str | None, bar: Progress) -> Outcome:
        """Stop the instruments; a completed run saves its models and tests the best one."""
        bar.close()
        self.watch.stop(state)
        out = Outcome(state, reason, signal=self.watch.signal_name if state == "preempted" else None)
        if state != "completed":
            return out
        best_step = self.state.best["step"]
        if self.rank == 0:
            save_model(self.run_dir / "models" / "last.safetensors", self.model, self._model_meta())
            if best_step is None:  # no validation split: the last model is the best
                save_model(self.run_dir / "models" / "best.safetensors", self.model, self._model_meta())
        self.comm.barrier()  # best.safetensors is written before any rank reads it
        if self.data.test is not None:
            load_model(self.run_dir / "models" / "best.safetensors", self.model)
            out.test = self.evaluate(self.data.test)
            log.info("test (best model, step %s): %s", best_step if best_step is not None else self.state.step,
                     " ".join(f"{k}={v:.4f}" for k, v in out.test.items()))
            self.metrics_log.write(kind="test", step=self.state.step, **out.test)
        return out

    def close(self) -> None:
        self.watch.stop("failed")  # no-op after _finish (only the first stop counts)
        self.metrics_log.close()    # likewise: marks an MLflow run FAILED only when never closed
        self.sync.remove()


def _pick_device(local_rank: int) -> torch.device:
    """One GPU per local rank when there are GPUs (round robin), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def _close(batches) -> None:
    if batches is not None and hasattr(batches, "close"):
        batches.close()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)
