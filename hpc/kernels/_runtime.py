"""What every kernel wrapper shares: CuPy import and cache directory, compile-once modules, PyTorch's
current stream, DLPack zero-copy views, input checks and launch shapes.

Nothing here imports CuPy at module import time, so ``import hpc.kernels`` works on a machine without it;
``cupy_missing()`` says why the CuPy path cannot run.

Cache directory: CuPy writes compiled kernels to ``CUPY_CACHE_DIR`` (default ``~/.cupy/kernel_cache``,
which on clusters is often a read-only or over-quota home). Before CuPy is imported we set it to
``$HPC_KERNEL_CACHE_DIR`` if given, else a ``CUPY_CACHE_DIR`` the user already set, else the
node-local ``${TMPDIR:-/tmp}/<user>/cupy-kernel-cache``; the directory must be writable.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import torch

from hpc.util.versions import user

CACHE_ENV = "HPC_KERNEL_CACHE_DIR"
_HERE = Path(__file__).resolve().parent
_lock = threading.RLock()  # function() holds it while cupy() may take it again
_cupy = None
_modules: dict = {}
_functions: dict = {}
_streams: dict = {}
_device_info: dict = {}

# torch dtype -> (CUDA C++ storage type, accumulation torch dtype, numpy scalar type of the accumulator)
CTYPES = {
    torch.float32: ("float", torch.float32, np.float32),
    torch.float64: ("double", torch.float64, np.float64),
    torch.bfloat16: ("__nv_bfloat16", torch.float32, np.float32),
    torch.float16: ("__half", torch.float32, np.float32),
}


def cache_dir() -> Path:
    """The kernel cache directory (created, checked writable); ValueError naming the variable if not."""
    explicit = os.environ.get(CACHE_ENV) or os.environ.get("CUPY_CACHE_DIR")
    if explicit:
        path, source = Path(explicit), (CACHE_ENV if os.environ.get(CACHE_ENV) else "CUPY_CACHE_DIR")
    else:
        path = Path(os.environ.get("TMPDIR") or "/tmp") / user() / "cupy-kernel-cache"
        source = "the default (${TMPDIR:-/tmp}/<user>/cupy-kernel-cache)"
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise ValueError(f"kernel cache directory {path} (from {source}) cannot be created: {e}; "
                         f"set {CACHE_ENV} to a writable node-local directory") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"kernel cache directory {path} (from {source}) is not writable; "
                         f"set {CACHE_ENV} to a writable node-local directory")
    return path


def cupy():
    """Import CuPy once, after pointing its kernel cache at cache_dir()."""
    global _cupy
    if _cupy is None:
        with _lock:
            if _cupy is None:
                os.environ["CUPY_CACHE_DIR"] = str(cache_dir())
                import cupy as cp  # noqa: PLC0415 - optional dependency, imported on first use

                _cupy = cp
    return _cupy


def cupy_missing() -> str | None:
    """None when the CuPy path can run; otherwise why not, in words."""
    try:
        cp = cupy()
    except ImportError as e:
        return f"CuPy is not installed ({e}); install the wheel matching your CUDA, e.g. pip install cupy-cuda13x"
    except ValueError as e:
        return str(e)
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDA driver/runtime errors come as several CuPy exception types
        return f"CuPy cannot reach a CUDA device ({type(e).__name__}: {e})"
    return None if n > 0 else "CuPy sees no CUDA device"


def _include_opts() -> tuple[str, ...]:
    """-I for the CUDA headers (cuda_bf16.h), where NVRTC might not find them itself."""
    cands = []
    cp = cupy()
    try:
        cuda_path = cp.cuda.get_cuda_path()
        if cuda_path:
            cands.append(Path(cuda_path) / "include")
    except Exception:
        pass
    for env in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(env):
            cands.append(Path(os.environ[env]) / "include")
    cands.append(Path("/usr/local/cuda/include"))
    try:  # the headers of the CUDA pip wheels (cuda-toolkit / nvidia-cuda-runtime)
        import nvidia  # noqa: PLC0415

        for base in getattr(nvidia, "__path__", []):
            cands += [Path(base) / "cu13" / "include", Path(base) / "cuda_runtime" / "include"]
    except ImportError:
        pass
    for c in cands:
        if (c / "cuda_bf16.h").exists():
            return (f"-I{c}",)
    return ()


def module_source(source: str) -> str:
    """The code of one compiled module: kernels/common.cuh, then kernels/<source>."""
    return (_HERE / "common.cuh").read_text() + "\n" + (_HERE / source).read_text()


def nvrtc_check(modules, arch: str = "compute_90") -> list[dict]:
    """Compile each (source, ctype, template instances) of ``modules`` (``kernels.catalog()``) with the
    NVRTC that CuPy loads, with RawModule's options (ours, plus what it adds: CuPy's headers,
    -std=c++17, device code by default) for ``arch``. Needs CuPy and NVRTC, not a GPU or a driver, so
    it runs on a login node or in CI: it catches what nvcc does not (NVRTC has no host headers) and
    checks that every instance the wrappers launch resolves to a kernel. A failure is a ValueError
    naming the module with NVRTC's log. Returns one dict per module."""
    cp = cupy()
    nvrtc = cp.cuda.nvrtc
    opts = (*_include_opts(), f"-I{Path(cp.__file__).parent / '_core' / 'include'}", "--std=c++17",
            f"-arch={arch}", "--device-as-default-execution-space")
    out = []
    for source, ctype, exprs in modules:
        prog = nvrtc.createProgram(module_source(source), source, (), ())
        try:
            for e in exprs:
                nvrtc.addNameExpression(prog, e)
            try:
                nvrtc.compileProgram(prog, opts)
            except nvrtc.NVRTCError as e:
                raise ValueError(f"kernels/{source} ({ctype}) does not compile with NVRTC {nvrtc.getVersion()} "
                                 f"for {arch}: {e}\n{nvrtc.getProgramLog(prog)}") from None
            lowered = {e: nvrtc.getLoweredName(prog, e) for e in exprs}
            out.append({"source": source, "ctype": ctype, "instances": len(exprs), "lowered": lowered,
                        "ptx_bytes": len(nvrtc.getPTX(prog))})
        finally:
            nvrtc.destroyProgram(prog)
    return out


def function(source: str, ctype: str, exprs, expr: str):
    """The compiled kernel ``expr`` of ``hpc/kernels/<source>`` for one storage type, compiled once per
    (source, ctype, device) with all of ``exprs`` (the template instances that type uses; a list, or
    a callable giving it, so the hot path does not build the list)."""
    dev = torch.cuda.current_device()
    key = (source, ctype, dev, expr)
    fn = _functions.get(key)
    if fn is not None:
        return fn
    exprs = exprs() if callable(exprs) else exprs
    if expr not in exprs:
        raise AssertionError(f"{expr} is not among the instances compiled for {source}/{ctype}")
    with _lock:
        mkey = (source, ctype, dev)
        mod = _modules.get(mkey)
        if mod is None:
            cp = cupy()
            # No -std option: the code needs only C++11, below NVRTC's default, and CuPy may add its own.
            mod = cp.RawModule(code=module_source(source), options=_include_opts(), name_expressions=exprs)
            _modules[mkey] = mod
        with cupy().cuda.Device(dev):
            fn = mod.get_function(expr)
        _functions[key] = fn
    return fn


def stream():
    """CuPy's view of PyTorch's current stream on the current device (so kernels order with torch ops
    and nothing synchronizes); cached per stream handle."""
    dev = torch.cuda.current_device()
    ptr = torch.cuda.current_stream(dev).cuda_stream
    s = _streams.get((dev, ptr))
    if s is None:
        s = cupy().cuda.ExternalStream(ptr, dev)
        _streams[(dev, ptr)] = s
    return s


def as_cupy(t: torch.Tensor):
    """Zero-copy CuPy view of a CUDA tensor through DLPack (16-bit floats travel as int16: CuPy has no
    bfloat16; the kernels take the pointer). Call inside ``with stream():`` so DLPack adds no sync."""
    return cupy().from_dlpack(exportable(t))


def exportable(t: torch.Tensor) -> torch.Tensor:
    """The view of ``t`` that DLPack can export: detached (torch refuses to export a tensor that
    requires grad, as autograd inputs do) and, for 16-bit floats, reinterpreted as int16."""
    t = t.detach()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    return t


# How tensors reach a kernel: "dlpack" (default: cupy.from_dlpack, zero-copy, typed) or "ptr" (the raw
# device address as a 64-bit scalar: also zero-copy, skips DLPack's per-tensor host cost; for measuring
# that cost, see `hpc bench kernels`). Read once at import; set_arg_mode() changes it.
ARG_MODES = ("dlpack", "ptr")
_arg_mode = os.environ.get("HPC_KERNEL_ARGS", "dlpack")


def set_arg_mode(mode: str) -> None:
    global _arg_mode
    if mode not in ARG_MODES:
        raise ValueError(f"HPC_KERNEL_ARGS={mode!r}: must be one of {', '.join(ARG_MODES)}")
    _arg_mode = mode


def launch(fn, grid, block, args, shared_mem: int = 0) -> None:
    """Launch ``fn`` on PyTorch's current stream; tensors in ``args`` go through DLPack (or as raw
    pointers, see ARG_MODES), None becomes a null pointer, other values are passed as given (numpy
    scalars: exact C types). The tensors stay referenced by ``args`` until the launch is queued, and
    PyTorch's allocator is stream-ordered, so memory freed afterwards is not reused before the kernel ran."""
    if _arg_mode not in ARG_MODES:
        set_arg_mode(_arg_mode)  # raises the ValueError naming the variable
    ptr = _arg_mode == "ptr"
    # CuPy's current device is its own (torch.cuda.set_device does not move it): follow torch's.
    with cupy().cuda.Device(torch.cuda.current_device()), stream():
        conv = tuple((np.uint64(a.data_ptr()) if ptr else as_cupy(a)) if isinstance(a, torch.Tensor)
                     else (np.uint64(0) if a is None else a) for a in args)
        fn(tuple(grid), tuple(block), conv, shared_mem=shared_mem)


def smem_optin() -> int:
    """Dynamic shared memory a block may opt in to on this device (bytes; 227 KB on Hopper)."""
    dev = torch.cuda.current_device()
    key = ("smem", dev)
    n = _device_info.get(key)
    if n is None:
        try:
            n = int(cupy().cuda.runtime.getDeviceProperties(dev)["sharedMemPerBlockOptin"])
        except Exception:  # older CuPy without the field: the limit every device has
            n = 48 * 1024
        _device_info[key] = n
    return n


# Static shared memory a dynamic-shared-memory kernel may use besides (ce_fwd_smem: two [32] arrays of
# the accumulator type, <= 512 B): the per-block limit covers static + dynamic, so a row may take at
# most smem_optin() - STATIC_SMEM_RESERVE bytes.
STATIC_SMEM_RESERVE = 1024
_smem_allowed: dict = {}


def allow_smem(fn, nbytes: int) -> None:
    """Let ``fn`` launch with ``nbytes`` of dynamic shared memory on PyTorch's current device.

    Without the opt-in a kernel may take 48 KB minus its static shared memory, so the opt-in is
    needed whenever ``nbytes`` is above the function's current limit, not only above 48 KB. The
    attribute belongs to the function as loaded on one device, so it is set under torch's current
    device, as ``launch`` launches it; the limit reached is cached (no driver query per call)."""
    dev = torch.cuda.current_device()
    key = (id(fn), dev)
    if _smem_allowed.get(key, -1) >= nbytes:
        return
    with cupy().cuda.Device(dev):
        if fn.max_dynamic_shared_size_bytes < nbytes:
            fn.max_dynamic_shared_size_bytes = nbytes
        _smem_allowed[key] = fn.max_dynamic_shared_size_bytes


# The row kernels step an `int` column counter by up to 512 threads: rows stay clear of INT_MAX.
# One block per row: at most 2**31 - 1 rows (gridDim.x).
MAX_ROW_LEN = 2**31 - 1024
MAX_ROWS = 2**31 - 1


def check_rows(op: str, rows: int, row_len: int, what: str) -> None:
    """A ValueError naming the op when a row kernel cannot take ``rows`` rows of ``row_len``."""
    if row_len > MAX_ROW_LEN:
        raise ValueError(f"{op}: {what} {row_len}: at most {MAX_ROW_LEN} (2**31 - 1024) supported")
    if rows > MAX_ROWS:
        raise ValueError(f"{op}: {rows} rows: at most 2**31 - 1 supported (one CUDA block per row); "
                         "split the input")


def sm_count() -> int:
    dev = torch.cuda.current_device()
    n = _device_info.get(dev)
    if n is None:
        n = torch.cuda.get_device_properties(dev).multi_processor_count
        _device_info[dev] = n
    return n


def grid_1d(work: int, threads: int = 256, waves: int = 8) -> int:
    """Blocks for a grid-stride loop over ``work`` items: enough to fill the device ``waves`` times."""
    return max(1, min((work + threads - 1) // threads, sm_count() * waves))


def row_plan(n: int, max_npt: int) -> tuple[int, int]:
    """(values per thread NPT, threads) for one block (<= 512 threads) per row of length n with the row
    in registers, NPT <= max_npt (a power of two; more spills registers, see MAX_NPT); NPT = 0 means
    the row is too long for registers: use a shared-memory or streaming kernel, with 512 threads."""
    npt = 1
    while npt <= max_npt:
        threads = -(-n // npt)
        if threads <= 512:
            return npt, max(32, -(-threads // 32) * 32)
        npt *= 2
    return 0, 512


ROW_NPTS = (1, 2, 4, 8, 16, 32, 64)
# Largest NPT per (kernel, accumulator is double) that ptxas fits in the 128 registers a 512-thread
# block allows without spilling (nvcc 13.0 -arch=sm_90 -Xptxas -v; tests/test_kernels_gpu.py
# rechecks it): longer rows go to the shared-memory or streaming kernels.
MAX_NPT = {("ce_fwd_reg", False): 32, ("ce_fwd_reg", True): 32,
           ("ln_fwd_reg", False): 32, ("ln_fwd_reg", True): 32,
           ("ln_bwd_reg", False): 16, ("ln_bwd_reg", True): 8}


def npts(kernel: str, ctype: str) -> tuple[int, ...]:
    cap = MAX_NPT[(kernel, ctype == "double")]
    return tuple(k for k in ROW_NPTS if k <= cap)


def vec_width(dtype: torch.dtype, *tensors: torch.Tensor | None, multiple_of: int | None = None) -> int:
    """Elements per 16-byte access when every tensor is 16-byte aligned (and ``multiple_of`` divides
    evenly), else 1."""
    v = 16 // dtype.itemsize
    if multiple_of is not None and multiple_of % v != 0:
        return 1
    if any(t is not None and t.data_ptr() % 16 != 0 for t in tensors):
        return 1
    return v


def check(op: str, name: str, t: torch.Tensor, *, dtypes=None, device: torch.device | None = None,
          ndim: int | None = None) -> None:
    """ValueError naming the op and argument unless ``t`` is a contiguous CUDA tensor as required."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor; got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{op}: {name} has dtype {t.dtype}; supported: {', '.join(str(d) for d in dtypes)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions; got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} (shape {tuple(t.shape)}, strides {t.stride()}) is not contiguous; "
                         f"call .contiguous() first (a copy)")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the other inputs are on {device}")
    if not t.is_cuda:  # last, so tests can run every other check on CPU tensors
        raise ValueError(f"{op}: {name} is on {t.device}; {NEED_CUDA} (use kernels='torch' or 'auto' for CPU "
                         f"tensors)")
    if t.device.index != torch.cuda.current_device():
        raise ValueError(f"{op}: {name} is on {t.device} but the current CUDA device is "
                         f"cuda:{torch.cuda.current_device()}; call torch.cuda.set_device({t.device.index}) first")


NEED_CUDA = "the CuPy kernels need CUDA tensors"
FLOAT_DTYPES = tuple(CTYPES)
