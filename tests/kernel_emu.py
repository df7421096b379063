"""Run the kernels' CUDA C++ on the CPU (tests only): compile each .cu with g++ against kernel_emu.h and
launch template instances through ctypes on CPU tensors, so the real wrappers and the real kernel code
are tested without a GPU. Slow (every CUDA thread is a fiber); small shapes only. Not for production.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from hpc import kernels

_HERE = Path(__file__).resolve().parent          # kernel_emu.h, the emulated CUDA runtime
_KDIR = Path(kernels.__file__).resolve().parent  # the kernels' .cu sources
_libs: dict = {}
_lock = threading.Lock()
_SCALARS = {np.int64: ctypes.c_int64, np.int32: ctypes.c_int32, np.uint64: ctypes.c_uint64,
            np.float32: ctypes.c_float, np.float64: ctypes.c_double}


def cuda_include() -> str | None:
    """A directory with cuda_bf16.h for g++ (the host half of CUDA's fp16/bf16 headers)."""
    cands = [os.path.join(os.environ[v], "include") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    cands += ["/usr/local/cuda/include", *sorted(glob.glob("/usr/local/cuda-*/include"), reverse=True)]
    return next((c for c in cands if os.path.exists(os.path.join(c, "cuda_bf16.h"))), None)


def missing() -> str | None:
    """Why the emulator cannot run here, or None."""
    if shutil.which("g++") is None:
        return "g++ not found"
    if cuda_include() is None:
        return "no CUDA headers (cuda_bf16.h) found for g++"
    return None


SOURCES = ("bias_act.cu", "cross_entropy.cu", "embedding.cu", "layer_norm.cu", "optim.cu")


def _exprs(source: str) -> list[str]:
    """The source's template instances, less the fp16 ones (the tests emulate fp32, bf16 and fp64;
    fewer instances build faster)."""
    return sorted({e for src, ct, exprs in kernels.catalog() if src == source and ct != "__half" for e in exprs})


def _plan(source: str) -> tuple[str, Path, list[str]]:
    exprs = _exprs(source)
    runners = "\n".join(
        f'extern "C" void run_{i}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, '
        f"unsigned smem, void** a) {{ emu::launch(&{e}, gx, gy, gz, bx, by, bz, smem, a); }}"
        for i, e in enumerate(exprs))
    runners += '\nextern "C" int emu_deadlocked() { int d = emu::deadlocked; emu::deadlocked = 0; return d; }\n'
    code = "\n".join([(_HERE / "kernel_emu.h").read_text(), (_KDIR / "common.cuh").read_text(),
                      (_KDIR / source).read_text(), runners])
    key = hashlib.sha256(code.encode()).hexdigest()[:16]
    out_dir = Path(tempfile.gettempdir()) / f"hpc-kernel-emu-{os.getuid()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    return code, out_dir / f"{Path(source).stem}-{key}.so", exprs


def _build_all() -> None:
    """Build every missing library at once (g++ in parallel: the first emulated launch pays ~10 s)."""
    procs = []
    for source in SOURCES:
        code, so, _ = _plan(source)
        if so.exists():
            continue
        src = so.with_suffix(".cpp")
        src.write_text(code)
        tmp = so.with_suffix(f".{os.getpid()}.tmp")
        cmd = ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-w", f"-I{cuda_include()}", "-o", str(tmp), str(src)]
        procs.append((source, so, tmp, subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)))
    for source, so, tmp, p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"g++ could not build the emulated {source}:\n{err[-6000:]}")
        os.replace(tmp, so)


def _lib(source: str):
    with _lock:
        lib = _libs.get(source)
        if lib is not None:
            return lib
        _, so, exprs = _plan(source)
        if not so.exists():
            _build_all()
        _libs[source] = (ctypes.CDLL(str(so)), {e: i for i, e in enumerate(exprs)})
        return _libs[source]


def launch(fn, grid, block, args, shared_mem: int = 0) -> None:
    """Drop-in for kernels._runtime.launch, with ``fn`` = (source, ctype, expr) and CPU tensors."""
    source, _ct, expr = fn
    lib, index = _lib(source)
    objs = []
    for a in args:
        if isinstance(a, torch.Tensor):
            assert a.device.type == "cpu", "the emulator runs on CPU tensors"
            objs.append(ctypes.c_void_p(a.data_ptr()))
        elif a is None:
            objs.append(ctypes.c_void_p(None))
        else:
            objs.append(_SCALARS[type(a)](a))
    argv = (ctypes.c_void_p * max(1, len(objs)))(*[ctypes.addressof(o) for o in objs])
    g = tuple(grid) + (1,) * (3 - len(grid))
    b = tuple(block) + (1,) * (3 - len(block))
    getattr(lib, f"run_{index[expr]}")(*(ctypes.c_uint(v) for v in g + b + (shared_mem,)), argv)
    if lib.emu_deadlocked():
        raise AssertionError(f"{expr}: a barrier was never reached by every live thread (grid {g}, block {b})")
