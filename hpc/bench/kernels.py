"""`hpc bench kernels`: each CuPy kernel against PyTorch eager and torch.compile of the same function.

Per kernel at a size that moves >= 64 MB: median time of --runs timed runs (CUDA events, after warm-up),
achieved GB/s (bytes that must move: each input read once, each output written once), that as a
fraction of the device-to-device copy bandwidth measured in this same run, and the speedups over the
baselines; then the host time per autograd call at a tiny size. Every case first checks the kernel's
result against the eager one (the 'rel err' column) so a wrong kernel cannot post a time.
Needs a CUDA GPU and CuPy: without them it says so and exits 2.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from hpc.util.table import emit
from hpc.util.versions import command_line, versions

# Heavy imports (torch ~1.6-2.3 s, mpi4py's MPI init ~1.1 s, and hpc.data/models/train/infer, which
# import torch) stay inside the functions: `hpc --help` imports every bench module to list it.

MB = 1 << 20


def register(sub) -> None:
    p = sub.add_parser("kernels", help="CuPy kernels vs torch eager and torch.compile (needs a GPU)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON (atomically)")
    p.add_argument("--runs", type=int, default=20, help="timed runs per measurement (median; default 20)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply the leading (row) sizes by this (< 1 for a smoke run; the table says so)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines (they compile slowly)")
    p.set_defaults(func=run)


@dataclass
class Case:
    name: str
    shape: str
    dtype: str
    nbytes: int
    ours: Callable[[], object]
    eager: Callable[[], object]
    compiled: Callable[[], object] | None
    notes: list[str] = field(default_factory=list)
    check: Callable[[], float] | None = None  # default: rel err of ours() against eager()


def _median_ms(fn, runs: int, warmup: int = 3) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(runs):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        events.append((s, e))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def _rel_err(a, b) -> float:
    import torch

    a = a if isinstance(a, (tuple, list)) else (a,)
    b = b if isinstance(b, (tuple, list)) else (b,)
    worst = 0.0
    for x, y in zip(a, b):
        x, y = x.detach().double(), y.detach().double()
        worst = max(worst, ((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item())
    return worst if torch.isfinite(torch.tensor(worst)) else float("inf")


def _cases(scale: float, compile_: bool):
    """Yield the cases one at a time so only one case's tensors are alive."""
    import torch
    import torch.nn.functional as F

    from hpc.models import ops

    dev = torch.device("cuda")
    rows = lambda n: max(1, int(n * scale))  # noqa: E731
    comp = (lambda f: torch.compile(f, dynamic=False)) if compile_ else (lambda f: None)

    def grads_of(fn, inputs, upstream):
        def run():
            out = fn(*inputs)
            return torch.autograd.grad(out, [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad],
                                       upstream)
        return run

    # bias + GELU (erf), forward and forward+backward
    M, N = rows(32768), 8192
    x = torch.randn(M, N, device=dev)
    b = torch.randn(N, device=dev)
    ref = lambda x, b: F.gelu(x + b)  # noqa: E731
    c = comp(ref)
    n = x.numel() * 4
    yield Case("bias_act gelu fwd", f"[{M}, {N}]", "fp32", 2 * n,
               lambda: ops.bias_act(x, b, "gelu"), lambda: ref(x, b), c and (lambda: c(x, b)))
    xg, bg = x.requires_grad_(), b.requires_grad_()
    gy = torch.randn_like(x)
    yield Case("bias_act gelu fwd+bwd", f"[{M}, {N}]", "fp32", 5 * n,
               grads_of(lambda x, b: ops.bias_act(x, b, "gelu"), (xg, bg), gy), grads_of(ref, (xg, bg), gy),
               c and grads_of(c, (xg, bg), gy))
    del x, b, xg, bg, gy

    # LayerNorm, forward and forward+backward
    M, D = rows(32768), 4096
    x = torch.randn(M, D, device=dev)
    w, bb = torch.randn(D, device=dev), torch.randn(D, device=dev)
    ref = lambda x, w, b: F.layer_norm(x, (D,), w, b, 1e-5)  # noqa: E731
    c = comp(ref)
    n = x.numel() * 4
    yield Case("layer_norm fwd", f"[{M}, {D}]", "fp32", 2 * n,
               lambda: ops.layer_norm(x, w, bb), lambda: ref(x, w, bb), c and (lambda: c(x, w, bb)))
    xg = x.requires_grad_()
    wg, bg = w.requires_grad_(), bb.requires_grad_()
    gy = torch.randn_like(x)
    yield Case("layer_norm fwd+bwd", f"[{M}, {D}]", "fp32", 5 * n,
               grads_of(lambda x, w, b: ops.layer_norm(x, w, b), (xg, wg, bg), gy), grads_of(ref, (xg, wg, bg), gy),
               c and grads_of(c, (xg, wg, bg), gy))
    del x, xg, w, bb, wg, bg, gy

    # Softmax cross-entropy forward+backward (the loss, then d loss / d logits), fp32 and bf16
    for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        B, C = rows(8192), 32768
        logits = torch.randn(B, C, device=dev).to(dtype).requires_grad_()
        target = torch.randint(0, C, (B,), device=dev)
        ref = lambda lg, t: F.cross_entropy(lg, t)  # noqa: E731
        c = comp(ref)
        one = torch.ones((), device=dev, dtype=dtype)
        yield Case("cross_entropy fwd+bwd", f"[{B}, {C}]", label, 2 * logits.numel() * logits.element_size(),
                   grads_of(lambda lg, t: ops.softmax_cross_entropy(lg, t), (logits, target), one),
                   grads_of(ref, (logits, target), one), c and grads_of(c, (logits, target), one))
        del logits, target

    # Embedding gather of 1 M rows of 128 floats (table of 1 M rows), and its deterministic backward
    V, D, nidx = 1 << 20, 128, rows(1 << 20)
    table = torch.randn(V, D, device=dev)
    idx = torch.randint(0, V, (nidx,), device=dev)
    ref = lambda i, w: F.embedding(i, w)  # noqa: E731
    c = comp(ref)
    yield Case("embedding gather", f"{nidx} x {D} of [{V}, {D}]", "fp32", 2 * nidx * D * 4 + nidx * 8,
               lambda: ops.embedding(idx, table), lambda: ref(idx, table), c and (lambda: c(idx, table)))
    tg = table.requires_grad_()
    g = torch.randn(nidx, D, device=dev)
    yield Case("embedding fwd+bwd (deterministic)", f"{nidx} x {D} of [{V}, {D}]", "fp32",
               # gather (read rows, write out) + backward (read g, zero and write the [V, D] gradient)
               2 * nidx * D * 4 + nidx * 8 + nidx * D * 4 + V * D * 4,
               grads_of(lambda i, w: ops.embedding(i, w, deterministic=True), (idx, tg), g),
               grads_of(ref, (idx, tg), g), c and grads_of(c, (idx, tg), g))
    del table, tg, g, idx

    # Adam(W) over 64 M parameters in 200 tensors: ours (flat, one launch) vs torch foreach and fused=True
    total, k = int((64 << 20) * scale), 200
    sizes = [total // k + (1 if i < total % k else 0) for i in range(k)]

    def params():
        gen = torch.Generator(device=dev).manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, device=dev, generator=gen)) for s in sizes]
        for p in ps:
            p.grad = torch.randn(p.shape, device=dev, generator=gen)
        return ps

    ours_opt = ops.FusedAdam(params(), lr=1e-3, weight_decay=0.01)
    foreach = torch.optim.AdamW(params(), lr=1e-3, weight_decay=0.01, foreach=True)
    fused = torch.optim.AdamW(params(), lr=1e-3, weight_decay=0.01, fused=True)

    def check():  # one step of each from the same start and gradients must agree
        ours_opt.step()
        fused.step()
        return _rel_err(ours_opt.flat_param, torch.cat([p.detach() for p in fused.param_groups[0]["params"]]))

    yield Case("adamw step", f"{total} params in {k} tensors", "fp32", 28 * total,
               ours_opt.step, foreach.step, fused.step, check=check,
               notes=["adamw step: 'eager' is torch.optim.AdamW(foreach=True), 'compiled' is AdamW(fused=True)"])
    del ours_opt, foreach, fused


def _copy_gbps(runs: int) -> float:
    import torch

    src = torch.empty(256 * MB, dtype=torch.float32, device="cuda").uniform_()  # 1 GiB
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), runs)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def _overhead(runs: int = 2000) -> list[list]:
    """Host time per autograd call at a tiny size (the GPU finishes each kernel before the next call)."""
    import torch
    import torch.nn.functional as F

    from hpc.models import ops

    x = torch.randn(8, 64, device="cuda", requires_grad=True)
    b = torch.randn(64, device="cuda", requires_grad=True)
    t = torch.randint(0, 64, (8,), device="cuda")
    cases = [("bias_act fwd", lambda: ops.bias_act(x, b, "gelu"), lambda: F.gelu(x + b)),
             ("layer_norm fwd", lambda: ops.layer_norm(x, b, b), lambda: F.layer_norm(x, (64,), b, b)),
             ("cross_entropy fwd+bwd", lambda: ops.softmax_cross_entropy(x, t).backward(),
              lambda: F.cross_entropy(x, t).backward())]
    from hpc.kernels import _runtime as rt

    rows = []
    for name, ours, eager in cases:
        per = []
        for mode, fn in (("dlpack", ours), ("ptr", ours), (None, eager)):
            if mode:
                rt.set_arg_mode(mode)
            for _ in range(50):
                fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(runs):
                fn()
            torch.cuda.synchronize()
            per.append((time.perf_counter() - t0) / runs * 1e6)
        rt.set_arg_mode("dlpack")
        rows.append([name, per[0], per[1], per[2], per[0] - per[2], per[1] - per[2]])
    return rows


def run(args) -> int:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        print("hpc bench kernels: PyTorch is missing")
        return 2
    if not torch.cuda.is_available():
        print("hpc bench kernels: no CUDA GPU here (torch.cuda.is_available() is False); the kernels need one. "
              "Run it on a GPU node (scripts/gpu-check.sh does, and writes the JSON).")
        return 2
    from hpc.kernels import _runtime as rt

    why = rt.cupy_missing()
    if why:
        print(f"hpc bench kernels: the CuPy kernels cannot run here: {why}")
        return 2
    if args.runs < 1 or not 0 < args.scale <= 1:
        raise ValueError(f"--runs {args.runs} must be >= 1 and --scale {args.scale} in (0, 1]")
    from hpc.models import ops

    ops.set_kernels("cupy")
    copy = _copy_gbps(args.runs)
    print(f"  device copy: {copy:,.0f} GB/s", flush=True)
    rows, out = [], []
    notes = []
    for case in _cases(args.scale, not args.no_compile):
        err = case.check() if case.check else _rel_err(case.ours(), case.eager())
        ms = _median_ms(case.ours, args.runs)
        eager_ms = _median_ms(case.eager, args.runs)
        comp_ms = _median_ms(case.compiled, args.runs) if case.compiled else None
        gbps = case.nbytes / (ms * 1e-3) / 1e9
        rows.append([case.name, case.shape, case.dtype, case.nbytes / MB, ms, gbps, gbps / copy, f"{err:.1e}",
                     eager_ms, eager_ms / ms, comp_ms if comp_ms is not None else "-",
                     comp_ms / ms if comp_ms is not None else "-"])
        out.append(dict(kernel=case.name, shape=case.shape, dtype=case.dtype, bytes=case.nbytes, ms=ms, gbps=gbps,
                        frac_copy=gbps / copy, rel_err_vs_eager=err, eager_ms=eager_ms, speedup_eager=eager_ms / ms,
                        compiled_ms=comp_ms, speedup_compiled=(comp_ms / ms) if comp_ms else None))
        notes += case.notes
        print(f"  {case.name} {case.shape} {case.dtype}: {ms:.3f} ms, {gbps:,.0f} GB/s ({gbps / copy:.2f} of copy), "
              f"x{eager_ms / ms:.2f} eager" + (f", x{comp_ms / ms:.2f} compiled" if comp_ms else ""), flush=True)
        del case
        torch.cuda.empty_cache()
    over = _overhead()
    dev = torch.cuda.get_device_name()
    title = (f"kernels on {dev}, copy {copy:,.0f} GB/s (read+write), median of {args.runs} runs"
             + (f", SCALED x{args.scale} (a smoke run, not the benchmark)" if args.scale < 1 else ""))
    result = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), device=dev, command=command_line(),
                  versions=versions(), runs=args.runs, scale=args.scale, copy_gbps=copy, cases=out,
                  overhead=[dict(op=r[0], ours_dlpack_us=r[1], ours_ptr_us=r[2], eager_us=r[3], added_dlpack_us=r[4],
                                 added_ptr_us=r[5]) for r in over])
    emit(title, ["kernel", "shape", "dtype", "MB", "ms", "GB/s", "of copy", "rel err", "eager ms", "x eager",
                 "compiled ms", "x compiled"], rows, result, None)
    for n in dict.fromkeys(notes):
        print(f"  note: {n}")
    emit("host time per call at [8, 64] (us; ours with tensors passed by DLPack, the default, or as raw pointers)",
         ["op", "ours dlpack", "ours ptr", "torch eager", "added dlpack", "added ptr"], over, result, args.json)
    return 0


if __name__ == "__main__":  # `python -m hpc.bench.kernels`: the same without the whole CLI (scripts/gpu-check.sh)

    parser = argparse.ArgumentParser(prog="python -m hpc.bench.kernels")
    register(parser.add_subparsers(dest="bench"))
    ns = parser.parse_args(["kernels", *sys.argv[1:]])
    sys.exit(ns.func(ns))
