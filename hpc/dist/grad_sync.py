"""Fused, overlapped gradient all-reduce (``GradSync``) and rank-0 broadcasts of parameters/optimizer.

How a step goes (see docs/dist.md):
1. ``GradSync(comm, model.parameters())`` assigns the parameters to buckets (``assign_buckets``:
   reverse registration order, at most ``bucket_mb`` each), allocates one flat buffer per bucket and
   makes each ``p.grad`` a view into it, so backward accumulates straight into the buffers.
2. During ``loss.backward()`` a post-accumulate-grad hook divides each finished gradient by the world
   size (in place, while it is still in cache); when a bucket is complete, and every bucket before it
   was started (so all ranks issue the collectives in the same order), its all-reduce starts
   (``comm.iallreduce_``: MPI ``Iallreduce``, torch async work, in place on the bucket's buffer),
   at most ``max_inflight`` at a time (1 on the mpi backend, see ``MAX_INFLIGHT``); the hooks retire
   finished ones and start the next. On backends without overlap, reductions start in
   ``synchronize()``.
3. ``synchronize()`` (before ``optimizer.step()``) packs what backward did not deliver (parameters
   without a gradient on this rank contribute zeros) while the previous bucket is on the wire, starts
   each bucket when the in-flight limit allows, waits, and leaves the averaged gradients in ``p.grad``.

Costs: no extra gradient memory and no copies as long as the views stay in place: zero gradients
with ``gs.zero_grad()`` (or ``optimizer.zero_grad(set_to_none=False)``). ``set_to_none=True`` makes
autograd allocate fresh gradients, which the hook copies into the buffers (one copy per step, what
DDP does too). fp16 compression keeps separate float16 buffers: one copy in, one copy out.
Gradient accumulation: run the first k-1 micro-batches inside ``with gs.no_sync():``; the last
backward then reduces the accumulated sum. Clip gradients after ``synchronize()``.
With one rank nothing is packed, copied or hooked.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Any, Iterable, Iterator

import torch

from hpc.dist.buckets import assign_buckets
from hpc.dist.comm import Comm, Handle

# Chosen by `hpc bench allreduce` (docs/dist.md: 4/25/64/128 MB measured on 2 ranks). Stay at or
# below 32 MB: Open MPI's all-reduce allocates a message-sized scratch buffer, and glibc serves a
# malloc over 32 MB (its largest mmap threshold) with fresh pages from mmap on every call: a 64 MB
# bucket took about twice as long per byte as a 25 MB one (docs/dist.md).
DEFAULT_BUCKET_MB = 25.0
# Bucket reductions in flight at once on the mpi backend. More are slower, not faster: Open MPI's
# non-blocking collectives (libnbc) progress every active schedule round-robin inside whichever MPI
# call is made, so N concurrent all-reduces each move in small steps and evict each other's data
# from the caches (2 ranks, 100 MB in 4 MB pieces: 25 Iallreduces started together took 2.5x as
# long as the same 25 one after the other; GradSync.synchronize 5-18 % faster with the limit,
# docs/dist.md). One in flight still overlaps with the packing of the next bucket and with the
# rest of backward. Backends whose collectives progress on their own threads (torch: gloo/NCCL,
# horovod) keep no limit, as before.
MAX_INFLIGHT = 1
_CALLER_PROGRESS = ("mpi",)
COMPRESSIONS = (None, "fp16")
_MB = 1 << 20


class _Bucket:
    __slots__ = ("params", "views", "flat", "ready", "handle", "as_grad")

    def __init__(self, params: list[torch.Tensor], wire_dtype: torch.dtype):
        self.params = params
        n = sum(p.numel() for p in params)
        self.flat = torch.zeros(n, dtype=wire_dtype, device=params[0].device)
        self.views, off = [], 0
        for p in params:
            self.views.append(self.flat[off:off + p.numel()].view(p.shape))
            off += p.numel()
        # The gradients themselves live in the buffer unless the wire dtype differs (compression).
        self.as_grad = wire_dtype == params[0].dtype
        self.ready: set[int] = set()
        self.handle: Handle | None = None


def _is_view(grad: torch.Tensor | None, view: torch.Tensor) -> bool:
    return grad is not None and grad.data_ptr() == view.data_ptr() and grad.shape == view.shape


class GradSync:
    """All-reduce (average) the gradients of ``params`` over ``comm``; see the module docstring."""

    def __init__(self, comm: Comm, params: Iterable[torch.nn.Parameter], bucket_mb: float = DEFAULT_BUCKET_MB,
                 compression: str | None = None, average: bool = True, max_inflight: int | None = None):
        if not (isinstance(bucket_mb, (int, float)) and bucket_mb > 0):
            raise ValueError(f"bucket_mb={bucket_mb!r}: must be a positive number of MB")
        if max_inflight is not None and not (isinstance(max_inflight, int) and max_inflight >= 1):
            raise ValueError(f"max_inflight={max_inflight!r}: must be a positive integer (or None: "
                             f"{MAX_INFLIGHT} on the mpi backend, no limit on the others)")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression={compression!r}: valid values: {', '.join(map(str, COMPRESSIONS))}")
        self.comm, self.bucket_mb, self.compression, self.average = comm, bucket_mb, compression, average
        seen: set[int] = set()
        self.params: list[torch.nn.Parameter] = []
        for p in params:  # shared (tied) parameters appear once
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self.params.append(p)
        self.sync_enabled = True
        self.buckets: list[_Bucket] = []
        self._slot: dict[int, tuple[int, int]] = {}  # id(param) -> (bucket index, position in bucket)
        self._next = 0  # first bucket whose reduction has not started
        if max_inflight is None:
            max_inflight = MAX_INFLIGHT if comm.backend in _CALLER_PROGRESS else 1 << 30
        self.max_inflight = max_inflight
        self._inflight: collections.deque[_Bucket] = collections.deque()  # started, not seen finished
        self._hooks = []
        if comm.size == 1:
            return  # nothing to reduce: no buffers, no hooks, no copies
        wire = [torch.float16 if compression == "fp16" and p.dtype.is_floating_point else p.dtype
                for p in self.params]
        keys = [(w, p.dtype, p.device) for w, p in zip(wire, self.params)]
        sizes = [p.numel() * w.itemsize for w, p in zip(wire, self.params)]
        with torch.no_grad():
            for b, idx in enumerate(assign_buckets(sizes, int(bucket_mb * _MB), keys)):
                bucket = _Bucket([self.params[i] for i in idx], wire[idx[0]])
                self.buckets.append(bucket)
                for k, i in enumerate(idx):
                    self._slot[id(self.params[i])] = (b, k)
                    p = self.params[i]
                    if bucket.as_grad:  # keep the current gradient's values, now in the buffer
                        if p.grad is not None:
                            bucket.views[k].copy_(p.grad)
                        p.grad = bucket.views[k]
        for p in self.params:
            self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))

    @torch.no_grad()
    def zero_grad(self) -> None:
        """Zero the gradients in place, keeping them in the buckets (use instead of optimizer.zero_grad)."""
        in_buckets: set[int] = set()
        for bucket in self.buckets:
            if bucket.as_grad:
                bucket.flat.zero_()  # one memset per bucket
                for p, v in zip(bucket.params, bucket.views):
                    p.grad = v
                    in_buckets.add(id(p))
        for p in self.params:
            if p.grad is not None and id(p) not in in_buckets:
                p.grad.zero_()

    # -- during backward --------------------------------------------------------------------------
    @torch.no_grad()
    def _on_grad(self, p: torch.Tensor) -> None:
        if not self.sync_enabled:
            return
        b, k = self._slot[id(p)]
        bucket = self.buckets[b]
        if k in bucket.ready:  # (raised even when the bucket has not started yet: same rule every step)
            raise RuntimeError("backward ran again before GradSync.synchronize(): for gradient "
                               "accumulation wrap the first k-1 micro-batches in `with gradsync.no_sync():`")
        self._pack(bucket, k)
        bucket.ready.add(k)
        if self.comm.overlap:
            self._pump()

    def _pump(self) -> None:
        """Retire finished reductions and start complete buckets, in index order (the same on every
        rank), while fewer than ``max_inflight`` are in flight. The ``test()`` also moves the oldest
        reduction forward: MPI progresses a non-blocking collective only inside MPI calls."""
        while self._inflight and self._inflight[0].handle.test():
            self._inflight.popleft()
        while self._next < len(self.buckets) and len(self._inflight) < self.max_inflight:
            bucket = self.buckets[self._next]
            if len(bucket.ready) < len(bucket.params):
                break
            self._start(bucket)

    def _pack(self, bucket: _Bucket, k: int) -> None:
        """Put gradient k into the bucket, divided by the world size when averaging (before the sum:
        the pass happens while the gradient is in cache, and an fp16 sum cannot overflow)."""
        p, view = bucket.params[k], bucket.views[k]
        scale = 1.0 / self.comm.size if self.average else 1.0
        if bucket.as_grad and _is_view(p.grad, view):
            if scale != 1.0:
                view.mul_(scale)
            return
        if p.grad is None:
            view.zero_()
        elif bucket.as_grad:
            torch.mul(p.grad.detach(), scale, out=view)
        else:
            view.copy_(p.grad.detach() * scale)
        if bucket.as_grad:
            p.grad = view

    def _start(self, bucket: _Bucket) -> None:
        bucket.handle = self.comm.iallreduce_(bucket.flat, "sum")
        self._inflight.append(bucket)
        self._next += 1

    # -- before the optimizer step ----------------------------------------------------------------
    @torch.no_grad()
    def synchronize(self) -> None:
        """Finish every bucket's reduction; ``p.grad`` then holds the average over ranks."""
        for i in range(self._next, len(self.buckets)):
            bucket = self.buckets[i]
            # Pack what backward did not deliver while the previous bucket is on the wire...
            for k in range(len(bucket.params)):
                if k not in bucket.ready:
                    self._pack(bucket, k)
                    bucket.ready.add(k)
                    if k % 8 == 0:
                        self._pump()
            # ...then start this one as soon as the in-flight limit allows.
            self._pump()
            while self._next <= i:
                self._inflight[0].handle.wait()
                self._pump()
        self._inflight.clear()
        for bucket in self.buckets:
            bucket.handle.wait()
            if not bucket.as_grad:
                for p, v in zip(bucket.params, bucket.views):
                    if p.grad is None:
                        p.grad = torch.empty_like(p)
                    p.grad.copy_(v)
            bucket.ready.clear()
            bucket.handle = None
        self._next = 0

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (no communication) for the backward passes inside."""
        prev, self.sync_enabled = self.sync_enabled, False
        try:
            yield
        finally:
            self.sync_enabled = prev

    def remove(self) -> None:
        """Remove the hooks (the parameters go back to plain local gradients)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for p in self.params:
            if p.grad is not None:
                p.grad = p.grad.clone()  # detach the gradients from the buffers we release

    def __repr__(self) -> str:
        mb = sum(b.flat.numel() * b.flat.element_size() for b in self.buckets) / _MB
        return (f"<GradSync {len(self.params)} params in {len(self.buckets)} buckets ({mb:.1f} MB), "
                f"bucket_mb={self.bucket_mb:g}, compression={self.compression}, backend={self.comm.backend}>")


# -- broadcasts from rank 0 -----------------------------------------------------------------------
@torch.no_grad()
def broadcast_tensors(comm: Comm, tensors: list[torch.Tensor], root: int = 0,
                      bucket_mb: float = DEFAULT_BUCKET_MB) -> None:
    """Broadcast ``tensors`` in place from ``root``, fused into flat buffers of at most ``bucket_mb``."""
    if comm.size == 1 or not tensors:
        return
    keys = [(t.dtype, t.device) for t in tensors]
    sizes = [t.numel() * t.element_size() for t in tensors]
    for idx in assign_buckets(sizes, int(bucket_mb * _MB), keys):
        group = [tensors[i] for i in idx]
        flat = torch.cat([t.detach().reshape(-1).to(comm.device) for t in group])
        comm.broadcast_(flat, root)
        off = 0
        for t in group:
            t.copy_(flat[off:off + t.numel()].view(t.shape))
            off += t.numel()


def broadcast_parameters(comm: Comm, module: torch.nn.Module, root: int = 0) -> None:
    """Make every rank's parameters and buffers equal to ``root``'s (at start and after resume)."""
    broadcast_tensors(comm, [t for t in module.state_dict(keep_vars=True).values()
                             if isinstance(t, torch.Tensor)], root)


def broadcast_optimizer_state(comm: Comm, optimizer: torch.optim.Optimizer, root: int = 0) -> None:
    """Make every rank's optimizer state (moments, steps, hyper-parameters) equal to ``root``'s.

    The structure travels as a small object broadcast; tensors travel fused, so other ranks need no
    state of their own beforehand (e.g. fresh optimizers on ranks 1.. after rank 0 resumed).
    """
    if comm.size == 1:
        return
    tensors: list[torch.Tensor] = []

    def strip(x: Any) -> Any:  # tensors -> placeholders (root only)
        if isinstance(x, torch.Tensor):
            tensors.append(x.detach())
            return {"__tensor__": len(tensors) - 1, "shape": list(x.shape),
                    "dtype": str(x.dtype).removeprefix("torch."), "device": x.device.type}
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(strip(v) for v in x)
        return x

    skeleton = comm.broadcast_object(strip(optimizer.state_dict()) if comm.rank == root else None, root)
    metas: list[dict] = []

    def collect(x: Any) -> None:
        if isinstance(x, dict) and "__tensor__" in x:
            metas.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                collect(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                collect(v)

    collect(skeleton)
    if comm.rank != root:
        tensors = [torch.empty(m["shape"], dtype=getattr(torch, m["dtype"]), device=comm.device)
                   for m in sorted(metas, key=lambda m: m["__tensor__"])]
    staged = [t.to(comm.device).contiguous() for t in tensors]
    broadcast_tensors(comm, staged, root)

    def build(x: Any) -> Any:
        if isinstance(x, dict) and "__tensor__" in x:
            t = staged[x["__tensor__"]]
            return t.cpu() if x["device"] == "cpu" else t
        if isinstance(x, dict):
            return {k: build(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(build(v) for v in x)
        return x

    if comm.rank != root:
        optimizer.load_state_dict(build(skeleton))
