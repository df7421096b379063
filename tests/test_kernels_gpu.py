"""The CuPy kernels (kernels/).

* CPU, always: every wrapper code path runs against a recording fake of the launch layer, and each
  recorded launch is checked against the kernel's C++ signature parsed from its .cu file (argument
  count, pointer vs scalar, element and scalar types, DLPack export, block and grid limits); the
  kernel cache directory rules; where nvcc is installed, a compile of every template instance for
  sm_90 with a check that the register-resident kernels do not spill (`slow`).
* numerics, on two backends: `emu` runs the kernels' own CUDA C++ on the CPU (g++ and tests/kernel_emu.h:
  every CUDA thread a fiber, barriers and warp shuffles emulated) through the real Python wrappers, on
  small shapes, wherever g++ and the CUDA headers exist; `gpu` runs them through CuPy on a CUDA device
  (`gpu` marker; skipped without CuPy and a GPU). Both: against the float64 references of
  tests/test_ops_torch.py, output buffers poisoned with NaN, forward and backward, fp32 (~1e-5) and
  bf16 (~1e-2), gradcheck in fp64.
* GPU only: DLPack zero-copy by data-pointer equality, PyTorch's current stream, no host
  synchronization, auto-mode routing, register use of the compiled kernels.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from hpc import kernels
from hpc.kernels import _runtime as rt

from test_ops_torch import (_randn, _targets, close, ref_bias_act, ref_cross_entropy, ref_embedding_grad,
                             ref_layer_norm)

KDIR = Path(kernels.__file__).resolve().parent

# ---------------------------------------------------------------------------------------------- signatures


def _signatures() -> dict[str, list[str]]:
    """kernel name -> parameter types, parsed from the .cu sources."""
    sigs = {}
    for src in [KDIR / "common.cuh", *sorted(KDIR.glob("*.cu"))]:
        text = src.read_text()
        for m in re.finditer(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(([^)]*)\)", text):
            params = []
            for p in m.group(2).split(","):
                p = " ".join(p.replace("__restrict__", "").replace("const", "").split())
                params.append(p.rsplit(" ", 1)[0].replace(" *", "*"))  # drop the name
            sigs[m.group(1)] = params
    return sigs


SIGS = _signatures()
STORAGE = {ct: dt for dt, (ct, _a, _n) in rt.CTYPES.items()}


def _expect(ptype: str, T: torch.dtype):
    acc_t, acc_np = rt.CTYPES[T][1], rt.CTYPES[T][2]
    base = ptype.rstrip("*").replace("typename ", "")
    elem = {"T": T, "Acc<T>::type": acc_t, "i64": torch.int64}[base] if base != "int" else None
    if ptype.endswith("*"):
        return "ptr", elem
    scal = {"i64": np.int64, "int": np.int32, "Acc<T>::type": acc_np,
            "T": {torch.float32: np.float32, torch.float64: np.float64}.get(T)}[base]
    return "scalar", scal


class FakeLaunch:
    def __init__(self):
        self.calls = []

    def function(self, source, ctype, exprs, expr):
        exprs = exprs() if callable(exprs) else exprs
        assert expr in exprs, f"{expr} is not among the instances compiled for {source}/{ctype}"
        return (source, ctype, expr)

    def launch(self, fn, grid, block, args, shared_mem=0):
        for a in args:  # the real launch exports every tensor through DLPack: that must work
            if isinstance(a, torch.Tensor):
                a_exp = rt.exportable(a)
                assert a_exp.data_ptr() == a.data_ptr()
                a_exp.__dlpack__()
        self.calls.append((fn, tuple(grid), tuple(block), args))


@pytest.fixture
def fake(monkeypatch):
    f = FakeLaunch()
    monkeypatch.setattr(rt, "function", f.function)
    monkeypatch.setattr(rt, "launch", f.launch)
    monkeypatch.setattr(rt, "sm_count", lambda: 132)
    monkeypatch.setattr(rt, "smem_optin", lambda: 227 * 1024)
    monkeypatch.setattr(rt, "allow_smem", lambda fn, n: None)
    orig = rt.check

    def check(*args, **kw):  # every check but "is a CUDA tensor", which rt.check makes last
        try:
            orig(*args, **kw)
        except ValueError as e:
            if rt.NEED_CUDA not in str(e):
                raise

    monkeypatch.setattr(rt, "check", check)
    return f


def _verify(calls):
    assert calls, "no launch recorded"
    for (source, ctype, expr), grid, block, args in calls:
        name, targs = re.match(r"(\w+)<(.*)>$", expr).groups()
        T = STORAGE[targs.split(",")[0].strip()]
        params = SIGS[name]
        assert len(args) == len(params), f"{expr}: {len(args)} arguments for {len(params)} parameters"
        for i, (a, p) in enumerate(zip(args, params)):
            kind, want = _expect(p, T)
            where = f"{expr} argument {i} ({p})"
            if kind == "ptr":
                assert a is None or isinstance(a, torch.Tensor), f"{where}: got {type(a).__name__}"
                if isinstance(a, torch.Tensor):
                    assert a.dtype == want, f"{where}: tensor dtype {a.dtype}, kernel reads {want}"
                    assert a.is_contiguous(), f"{where}: not contiguous"
            else:
                assert type(a) is want, f"{where}: {type(a).__name__}, kernel takes {want.__name__}"
        threads = math.prod(block)
        assert 32 <= threads <= 1024 and block[0] % 32 == 0, f"{expr}: block {block}"
        if any(k in expr for k in ("_reg<", "_stream<", "_smem<")):
            assert threads <= 512, f"{expr}: {threads} threads but __launch_bounds__(512)"
        assert grid[0] < 2**31 and all(g <= 65535 for g in grid[1:]) and all(g >= 1 for g in grid), expr


@pytest.mark.parametrize("dtype", list(rt.CTYPES))
def test_wrappers_launch_what_the_kernels_declare(fake, dtype):
    # Shapes cover the register and streaming row kernels, vector and scalar widths, all branches.
    for shape in [(3, 5), (4, 64), (2, 20000), (1, 90000)]:
        for act in ("relu", "gelu", "gelu_tanh"):
            x = torch.randn(shape).to(dtype).requires_grad_()
            b = torch.randn(shape[-1]).to(dtype).requires_grad_()
            kernels.bias_act(x, b, act).backward(torch.ones(shape, dtype=dtype))
            kernels.bias_act(x.detach().requires_grad_(), None, act).sum().backward()
        for red in ("mean", "sum", "none"):
            lg = torch.randn(shape).to(dtype).requires_grad_()
            t = torch.randint(0, shape[1], (shape[0],), dtype=torch.int32)
            loss = kernels.softmax_cross_entropy(lg, t, -100, 0.1, red)
            loss.sum().backward(retain_graph=True)
            loss.sum().backward()  # second backward: the recompute path
        for affine in (True, False):
            x = torch.randn(shape).to(dtype).requires_grad_()
            w = torch.randn(shape[-1]).to(dtype).requires_grad_() if affine else None
            kernels.layer_norm(x, w, w, 1e-5).sum().backward()
        for det in (False, True):
            w = torch.randn(shape).to(dtype).requires_grad_()
            kernels.embedding(torch.tensor([[0, 1], [1, 2]]), w, det).sum().backward()
    if dtype in (torch.float32, torch.float64):
        for n in (1, 13, 1024):
            p, g, m, v = (torch.randn(n, dtype=dtype) for _ in range(4))
            kernels.adam_step(p, g, m, v, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
                              adamw=True, bias_c1=0.1, bias_c2=0.001)
            kernels.sgd_step(p, g, m, lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True,
                             first=False)
            kernels.sgd_step(p, g, None, lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                             first=True)
    _verify(fake.calls)
    used = {fn[2].split("<")[0] for fn, *_ in fake.calls}
    want = {"bias_act_fwd", "bias_act_bwd", "col_reduce", "ce_fwd_reg", "ce_fwd_smem", "ce_fwd_stream",
            "scale_inplace",
            "ln_fwd_reg", "ln_bwd_reg", "ln_fwd_stream", "ln_bwd_stream", "emb_fwd", "emb_bwd_atomic",
            "emb_bwd_sorted"}
    if dtype in (torch.float32, torch.float64):
        want |= {"adam_step", "sgd_step"}
    assert want <= used, f"kernels never launched: {want - used}"


def test_every_kernel_has_a_parsed_signature():
    for _src, _ct, exprs in kernels.catalog():
        for e in exprs:
            assert e.split("<")[0] in SIGS, e


def test_wrapper_input_checks_name_the_problem(fake):
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="bias_act: x has dtype torch.int64"):
        kernels.bias_act(torch.ones(2, 3, dtype=torch.int64), None)
    with pytest.raises(ValueError, match=r"layer_norm: x \(shape \(6, 4\).*not contiguous"):
        kernels.layer_norm(x.t(), None, None)
    with pytest.raises(ValueError, match="softmax_cross_entropy: target has 3 rows"):
        kernels.softmax_cross_entropy(x, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="layer_norm: weight has dtype torch.float64"):
        kernels.layer_norm(x, torch.ones(6, dtype=torch.float64), None)


def test_shared_memory_rows_leave_room_for_static_shared_memory(fake, monkeypatch):
    """A row goes to the shared-memory kernel only if it fits beside the kernel's static shared memory
    (T4: 64 KB opt-in; fp16 C=32768 is exactly 64 KB, so it must stream)."""
    monkeypatch.setattr(rt, "smem_optin", lambda: 64 * 1024)
    for C, kernel in ((32000, "ce_fwd_smem"), (32768, "ce_fwd_stream")):
        fake.calls.clear()
        kernels.softmax_cross_entropy(torch.randn(2, C).half(), torch.tensor([0, 1]), reduction="sum")
        assert [fn[2].split("<")[0] for fn, *_ in fake.calls] == [kernel], C


def test_allow_smem_opts_in_above_the_current_limit_on_torchs_device(monkeypatch):
    """Without the opt-in a kernel gets 48 KB minus its static shared memory: 48 KB of dynamic shared
    memory already needs it. The attribute is set under torch's current device, once."""
    import contextlib

    entered, log = [], []

    class Fn:
        _limit = 48 * 1024 - 256

        @property
        def max_dynamic_shared_size_bytes(self):
            log.append("get")
            return self._limit

        @max_dynamic_shared_size_bytes.setter
        def max_dynamic_shared_size_bytes(self, n):
            log.append(("set", n))
            self._limit = n

    class Cuda:
        @staticmethod
        @contextlib.contextmanager
        def Device(d):
            entered.append(d)
            yield

    monkeypatch.setattr(rt, "cupy", lambda: type("cp", (), {"cuda": Cuda}))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(rt, "_smem_allowed", {})
    fn = Fn()
    rt.allow_smem(fn, 1000)           # under the default limit: nothing to set
    rt.allow_smem(fn, 48 * 1024)      # exactly 48 KB: above 48 KB - static, so opt in
    assert log == ["get", "get", "get", ("set", 48 * 1024), "get"] and entered == [3, 3]
    log.clear()
    rt.allow_smem(fn, 48 * 1024)      # cached: no driver query on the hot path
    rt.allow_smem(fn, 2000)
    assert log == [] and entered == [3, 3]


def test_row_limits_are_checked_by_the_wrappers(fake, monkeypatch):
    with pytest.raises(ValueError, match=r"layer_norm: last dimension 2147482625: at most 2147482624"):
        rt.check_rows("layer_norm", 1, 2**31 - 1023, "last dimension")
    with pytest.raises(ValueError, match=r"softmax_cross_entropy: 2147483648 rows: at most 2\*\*31 - 1"):
        rt.check_rows("softmax_cross_entropy", 2**31, 10, "classes")
    rt.check_rows("layer_norm", 2**31 - 1, 2**31 - 1024, "last dimension")
    monkeypatch.setattr(rt, "MAX_ROW_LEN", 8)  # the wrappers ask: a 9-wide row is refused by name
    with pytest.raises(ValueError, match="layer_norm: last dimension 9: at most 8"):
        kernels.layer_norm(torch.randn(2, 9), None, None)
    with pytest.raises(ValueError, match="softmax_cross_entropy: classes 9: at most 8"):
        kernels.softmax_cross_entropy(torch.randn(2, 9), torch.tensor([0, 1]))


def test_embedding_backward_is_deterministic_under_torch_deterministic_mode(fake, monkeypatch):
    from hpc.models import ops

    monkeypatch.setattr(ops, "_mode", "cupy")
    idx = torch.tensor([[0, 1], [1, 1]])
    for det_mode, kernel in ((False, "emb_bwd_atomic"), (True, "emb_bwd_sorted")):
        fake.calls.clear()
        was = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(det_mode)
        try:
            ops.embedding(idx, torch.randn(4, 3, requires_grad=True)).sum().backward()
        finally:
            torch.use_deterministic_algorithms(was)
        names = [fn[2].split("<")[0] for fn, *_ in fake.calls]
        assert kernel in names and ({"emb_bwd_atomic", "emb_bwd_sorted"} - {kernel}).isdisjoint(names)


def test_check_rejects_cpu_tensors_with_advice():
    with pytest.raises(ValueError, match="bias_act: x is on cpu; the CuPy kernels need CUDA tensors"):
        rt.check("bias_act", "x", torch.ones(2))


def test_row_plan_covers_every_length():
    for kernel in ("ce_fwd_reg", "ln_fwd_reg", "ln_bwd_reg"):
        for double in (False, True):
            cap = rt.npts(kernel, "double" if double else "float")[-1]
            for n in (1, 31, 32, 33, 511, 512, 513, 4097, 8193, 16384, 16385, 100000):
                npt, threads = rt.row_plan(n, cap)
                assert threads % 32 == 0 and 32 <= threads <= 512
                if npt:
                    assert npt <= cap and npt * threads >= n and (npt == 1 or (npt // 2) * 512 < n)
                else:
                    assert n > cap * 512


# ---------------------------------------------------------------------------------------------- cache dir


def test_cache_dir_env_default_and_unwritable(monkeypatch, tmp_path):
    monkeypatch.delenv("CUPY_CACHE_DIR", raising=False)
    monkeypatch.setenv(rt.CACHE_ENV, str(tmp_path / "kc"))
    assert rt.cache_dir() == tmp_path / "kc" and (tmp_path / "kc").is_dir()
    monkeypatch.delenv(rt.CACHE_ENV)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "node"))
    d = rt.cache_dir()
    assert d.parent.parent == tmp_path / "node" and d.name == "cupy-kernel-cache"
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path / "user-set"))
    assert rt.cache_dir() == tmp_path / "user-set"
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    monkeypatch.setenv(rt.CACHE_ENV, str(ro / "sub"))
    if os.geteuid() == 0:  # root writes anywhere: use a path under a regular file instead
        (tmp_path / "file").write_text("x")
        monkeypatch.setenv(rt.CACHE_ENV, str(tmp_path / "file" / "sub"))
    with pytest.raises(ValueError, match=f"cannot be created.*set {rt.CACHE_ENV}"):
        rt.cache_dir()


def test_cupy_missing_says_why():
    """None only where the kernels can run; otherwise the reason (CI has CuPy but no device)."""
    why = rt.cupy_missing()
    try:
        import cupy  # noqa: F401
    except ImportError:
        assert why is not None and "CuPy is not installed" in why
        return
    if torch.cuda.is_available():
        assert why is None
    else:
        assert why is not None and why.startswith(("CuPy cannot reach a CUDA device", "CuPy sees no CUDA device"))


# ---------------------------------------------------------------------------------------------- nvcc compile


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kernels_compile_for_sm90_without_spills(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    by_src: dict[str, list[str]] = {}
    for src, _ct, exprs in kernels.catalog():
        by_src.setdefault(src, []).extend(exprs)
    procs = []
    for src, exprs in by_src.items():
        # Taking each instance's address makes nvcc instantiate it, as NVRTC's name expressions do.
        code = rt.module_source(src) + "\nvoid* hpc_instances[] = {\n" + \
            ",\n".join(f"(void*)&{e}" for e in exprs) + "};\n"
        f = tmp_path / src
        f.write_text(code)
        procs.append((src, subprocess.Popen(
            [nvcc, "-std=c++17", "-arch=sm_90", "-cubin", "-Xptxas=-v", "-o", str(f) + ".cubin", str(f)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    spills = []
    for src, p in procs:
        out, _ = p.communicate(timeout=580)
        assert p.returncode == 0, f"{src} does not compile:\n{out[-6000:]}"
        cur = None
        for line in out.splitlines():
            m = re.search(r"Compiling entry function '(\S+)'", line)
            if m:
                cur = m.group(1)
            m = re.search(r"(\d+) bytes spill stores", line)
            if m and cur and "_reg" in cur and int(m.group(1)) > 64:
                spills.append((cur, line.strip()))
    assert not spills, f"register-resident row kernels spill (lower MAX_NPT in kernels/_runtime.py): {spills}"


def _nvrtc_ready() -> None:
    try:
        import cupy

        cupy.cuda.nvrtc.getVersion()
    except Exception as e:  # ImportError, or CuPy's error when it cannot load libnvrtc
        pytest.skip(f"CuPy with NVRTC is not installed ({type(e).__name__}: {e}); CI installs it: "
                    "pip install -e .[kernel-check]")


@pytest.mark.nvrtc
def test_kernels_compile_with_cupys_nvrtc():
    """What RawModule hands NVRTC on the GPU, compiled here without one: every module, every dtype,
    every template instance the wrappers launch resolves to a mangled kernel name."""
    _nvrtc_ready()
    mods = kernels.catalog()
    res = rt.nvrtc_check(mods, arch="compute_90")
    assert [(r["source"], r["ctype"]) for r in res] == [(src, ct) for src, ct, _ in mods]
    for r, (_src, _ct, exprs) in zip(res, mods):
        assert set(r["lowered"]) == set(exprs) and r["ptx_bytes"] > 1000
        assert all(name.startswith("_Z") for name in r["lowered"].values())  # a real instantiated symbol
    with pytest.raises(ValueError, match=r"(?s)kernels/optim\.cu \(float\) does not compile with NVRTC "
                                         r".*identifier \"adam_stp\" is undefined"):
        rt.nvrtc_check([("optim.cu", "float", ["adam_stp<float, 4>"])])


# ---------------------------------------------------------------------------------------------- numerics
# The numeric tests run on two backends: "gpu" (the real thing: CuPy + CUDA, `gpu`-marked) and "emu"
# (the same CUDA C++ compiled with g++ against tests/kernel_emu.h, each CUDA thread a fiber, on CPU
# tensors, through the same Python wrappers; small shapes, grids capped by a 2-SM fake device so the
# grid-stride loops go round). emu runs wherever g++ and the CUDA headers are (CI has them).


def _gpu_ready() -> bool:
    """Skip without CuPy and a GPU; with HPC_REQUIRE_GPU=1 (scripts/gpu-check.sh) fail instead."""
    why = None
    try:
        import cupy  # noqa: F401
    except ImportError as e:
        why = f"could not import cupy: {e}"
    if why is None and not torch.cuda.is_available():
        why = "no CUDA device"
    why = why or rt.cupy_missing()
    if why:
        (pytest.fail if os.environ.get("HPC_REQUIRE_GPU") == "1" else pytest.skip)(why)
    return True


def _backend(name: str, monkeypatch) -> torch.device:
    """Select the backend for this test; returns the device its tensors go on."""
    from hpc.models import ops

    if name == "gpu":
        _gpu_ready()
        monkeypatch.setattr(ops, "_mode", "cupy")
        return torch.device("cuda")
    import kernel_emu as _emu

    why = _emu.missing()
    if why:
        pytest.skip(f"kernel emulator: {why}")
    orig = rt.check

    def check(*args, **kw):
        try:
            orig(*args, **kw)
        except ValueError as e:
            if rt.NEED_CUDA not in str(e):
                raise

    monkeypatch.setattr(rt, "function", lambda source, ct, exprs, expr: (source, ct, expr))
    monkeypatch.setattr(rt, "launch", _emu.launch)
    monkeypatch.setattr(rt, "sm_count", lambda: 2)
    monkeypatch.setattr(rt, "smem_optin", lambda: 227 * 1024)
    monkeypatch.setattr(rt, "allow_smem", lambda fn, n: None)
    monkeypatch.setattr(rt, "check", check)
    monkeypatch.setattr(ops, "_mode", "cupy")
    monkeypatch.setattr(ops, "_cupy_reason", None)
    return torch.device("cpu")


def on(emu: list, gpu: list) -> list:
    """Parameters (backend, case): the emu cases, then the gpu cases marked `gpu`."""
    return ([pytest.param("emu", c, id=f"emu-{c}") for c in emu]
            + [pytest.param("gpu", c, id=f"gpu-{c}", marks=pytest.mark.gpu) for c in gpu])


@pytest.fixture
def gpu(monkeypatch):
    return _backend("gpu", monkeypatch)


def _poison(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(float("nan"))


DTYPES = [torch.float32, torch.bfloat16]
# Not multiples of the block sizes, size-1 edges, every register-row width (NPT) and the streaming rows.
# (2, 40000): shared-memory rows for cross-entropy; (2, 90000): streaming rows.
SIZES = [(1, 1), (1, 7), (3, 1), (5, 33), (17, 257), (9, 1000), (4, 4097), (3, 16385), (2, 40000), (2, 90000)]
EMU_SIZES = [(1, 1), (5, 33), (3, 700), (1, 16390), (1, 41000)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("backend,shape", on([(1, 1), (5, 33), (3, 64)], SIZES))
def test_bias_act_kernel(monkeypatch, backend, shape, dtype, act):
    from hpc.kernels import bias_act_op as K

    dev = _backend(backend, monkeypatch)
    x = _randn(shape, dtype, seed=1, scale=2.0).to(dev)
    b = _randn(shape[-1:], dtype, seed=2).to(dev)
    y = K.forward(x, b, act, out=_poison(torch.empty_like(x)))
    close(y.cpu(), ref_bias_act(x.cpu(), b.cpu(), act), dtype, scale=3.0)
    g = _randn(shape, dtype, seed=3).to(dev)
    gx, gb = K.backward(g, x, b, act, True, gx=_poison(torch.empty_like(x)))
    xr = x.cpu().double().requires_grad_()
    br = b.cpu().double().requires_grad_()
    ref_bias_act(xr, br, act).backward(g.cpu().double())
    close(gx.cpu(), xr.grad, dtype, scale=3.0)
    close(gb.cpu(), br.grad, dtype, scale=3.0 * math.sqrt(shape[0]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,case", on([(s, 0.1) for s in EMU_SIZES],
                                            [(s, ls) for s in SIZES for ls in (0.0, 0.1)]))
def test_cross_entropy_kernel(monkeypatch, backend, case, dtype):
    from hpc.kernels import cross_entropy_op as K

    dev = _backend(backend, monkeypatch)
    shape, smoothing = case
    B, C = shape
    logits = _randn(shape, dtype, seed=4, scale=3.0).to(dev)
    target = _targets(B, C, seed=5, ignore_index=-1, ignore_frac=0.25 if B > 1 else 0.0).to(dev)
    acc = rt.CTYPES[dtype][1]
    loss = _poison(torch.empty(B, dtype=acc, device=dev))
    grad = _poison(torch.empty_like(logits))
    scale = _randn((B,), torch.float64, seed=6).to(acc).to(dev)
    K.rows(logits, target, -1, smoothing, loss, grad, scale, 1)
    lr = logits.cpu().double().requires_grad_()
    ref = ref_cross_entropy(lr, target.cpu(), -1, smoothing, "none")
    ref.backward(scale.cpu().double())
    close(loss.cpu(), ref, torch.float32 if dtype == torch.bfloat16 else dtype, scale=3.0)  # fp32 math on bf16
    close(grad.cpu(), lr.grad, dtype)
    # Through autograd, every reduction, first and second backward.
    for red in ("mean", "sum", "none"):
        lg = logits.clone().requires_grad_()
        out = kernels.softmax_cross_entropy(lg, target, -1, smoothing, red)
        lr = logits.cpu().double().requires_grad_()
        ref = ref_cross_entropy(lr, target.cpu(), -1, smoothing, red)
        close(out.cpu(), ref, dtype, scale=3.0)
        up = torch.full(out.shape, 0.5, dtype=out.dtype, device=dev)
        out.backward(up, retain_graph=True)
        ref.backward(torch.full(ref.shape, 0.5, dtype=torch.float64))
        close(lg.grad.cpu(), lr.grad, dtype)
        first = lg.grad.clone()
        lg.grad = None
        out.backward(up)
        close(lg.grad.cpu(), first.cpu(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("backend,shape", on([(3, 1), (2, 3, 129), (2, 700), (1, 16390)],
                                             SIZES[1:] + [(2, 3, 129), (2, 70000)]))
def test_layer_norm_kernel(monkeypatch, backend, shape, dtype, affine):
    from hpc.kernels import layer_norm_op as K

    dev = _backend(backend, monkeypatch)
    D = shape[-1]
    x = (_randn(shape, torch.float64, seed=7, scale=3.0) + 2.0).to(dtype).to(dev)
    w = _randn((D,), dtype, seed=8).to(dev) if affine else None
    b = _randn((D,), dtype, seed=9).to(dev) if affine else None
    y, mean, rstd = K.forward(x, w, b, 1e-5, y=_poison(torch.empty_like(x)))
    cpu = lambda t: None if t is None else t.cpu().double().requires_grad_()  # noqa: E731
    xr, wr, br = cpu(x), cpu(w), cpu(b)
    ref = ref_layer_norm(xr, wr, br, 1e-5)
    close(y.cpu(), ref, dtype, scale=4.0)
    g = _randn(shape, dtype, seed=10).to(dev)
    gx, gw, gb = K.backward(g, x, w, mean, rstd, affine, affine, gx=_poison(torch.empty_like(x)))
    ref.backward(g.cpu().double())
    rows = x.numel() // D
    close(gx.cpu(), xr.grad, dtype, scale=4.0)
    if affine:
        close(gw.cpu(), wr.grad, dtype, scale=4.0 * math.sqrt(rows))
        close(gb.cpu(), br.grad, dtype, scale=4.0 * math.sqrt(rows))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,case", on([(1, 1, 1), (10, 3, 20), (7, 64, 24), (5, 130, 40)],
                                            [(1, 1, 1), (10, 3, 20), (50, 130, 3000), (1000, 128, 100000),
                                             (7, 64, 24)]))
def test_embedding_kernel(monkeypatch, backend, case, dtype):
    from hpc.kernels import embedding_op as K

    dev = _backend(backend, monkeypatch)
    V, D, n = case
    w = _randn((V, D), dtype, seed=11).to(dev)
    idx = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(12)).to(dev)
    out = K.forward(idx, w, out=_poison(torch.empty((n, D), dtype=dtype, device=dev)))
    assert torch.equal(out, w[idx])
    g = _randn((n, D), dtype, seed=13).to(dev)
    ref = ref_embedding_grad(idx.cpu(), g.cpu(), V)
    counts = torch.bincount(idx.cpu(), minlength=V).max().item()
    det1 = K.backward(g, idx, V, D, True)
    det2 = K.backward(g, idx, V, D, True)
    assert torch.equal(det1, det2), "deterministic backward differs between runs"
    close(det1.cpu(), ref, dtype, scale=3.0 * math.sqrt(counts))
    close(K.backward(g, idx, V, D, False).cpu(), ref, dtype, scale=3.0 * math.sqrt(counts))


@pytest.mark.parametrize("backend,n", on([1, 3, 1027], [1, 3, 1027, 1 << 20]))
def test_fused_optimizer_kernels_match_torch_path(monkeypatch, backend, n):
    from hpc.models import ops

    dev = _backend(backend, monkeypatch)
    for kind, kw in [("adamw", dict(lr=1e-2, weight_decay=0.1)), ("adam", dict(lr=1e-2, weight_decay=0.05)),
                     ("adam", dict(lr=1e-2, betas=(0.3, 0.9))),
                     ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True)), ("sgd", dict(lr=0.05, momentum=0.9,
                                                                                      dampening=0.2)),
                     ("sgd", dict(lr=0.05, weight_decay=0.01))]:
        results = []
        for mode in ("cupy", "torch"):
            monkeypatch.setattr(ops, "_mode", mode)
            p = torch.nn.Parameter(_randn((n,), torch.float32, seed=14).to(dev))
            q = torch.nn.Parameter(_randn((3, 5), torch.float32, seed=15).to(dev))
            opt = ops.fused_optimizer(kind, [p, q], **kw)
            assert opt._use_cupy() == (mode == "cupy")
            for step in range(3):
                opt.zero_grad()
                p.grad.copy_(_randn((n,), torch.float32, seed=16 + step).to(dev))
                q.grad.copy_(_randn((3, 5), torch.float32, seed=20 + step).to(dev))
                opt.step()
            results.append(opt.flat_param.clone())
        torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,shape", on([(2, 5)], [(4, 37)]))
def test_kernels_gradcheck_float64(monkeypatch, backend, shape):
    dev = _backend(backend, monkeypatch)
    R, N = shape
    x = _randn((R, N), torch.float64, seed=21).to(dev).requires_grad_()
    b = _randn((N,), torch.float64, seed=22).to(dev).requires_grad_()
    for act in ("relu", "gelu", "gelu_tanh"):
        assert torch.autograd.gradcheck(lambda x, b, act=act: kernels.bias_act(x, b, act), (x, b))
    w = _randn((N,), torch.float64, seed=23).to(dev).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: kernels.layer_norm(x, w, b, 1e-5), (x, w, b))
    t = torch.tensor([0, N - 1, -100, 3][:R], device=dev)
    for red in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(  # the 2nd backward recomputes: rounding may differ in the last bit
            lambda lg, red=red: kernels.softmax_cross_entropy(lg, t, -100, 0.1, red), (x,), nondet_tol=1e-12)
    emb = _randn((6, N), torch.float64, seed=24).to(dev).requires_grad_()
    idx = torch.tensor([[0, 5, 5], [2, 0, 0]], device=dev)
    for det in (True, False):  # float atomics may sum duplicates in another order on a second backward
        assert torch.autograd.gradcheck(lambda e, det=det: kernels.embedding(idx, e, det), (emb,),
                                        nondet_tol=0.0 if det else 1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_gpu_dlpack_is_zero_copy(gpu, dtype):
    t = torch.randn(1000, device=gpu).to(dtype).requires_grad_()  # autograd inputs require grad
    view = t[7:]
    with rt.stream():
        assert rt.as_cupy(t).data.ptr == t.data_ptr()
        assert rt.as_cupy(view).data.ptr == view.data_ptr()


@pytest.mark.gpu
def test_gpu_runs_on_torch_current_stream_without_sync(gpu):
    x = _randn((512, 1024), torch.float32, seed=25).to(gpu)
    b = _randn((1024,), torch.float32, seed=26).to(gpu)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing torch call inside raises
    try:
        with torch.cuda.stream(s):
            assert rt.stream().ptr == s.cuda_stream
            xs = x.clone().requires_grad_()
            y = kernels.bias_act(xs, b, "gelu")
            loss = kernels.softmax_cross_entropy(kernels.layer_norm(y, None, None), torch.zeros(512, dtype=torch.int64,
                                                                                              device=gpu))
            loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    s.synchronize()
    ref = torch.nn.functional.cross_entropy(
        torch.nn.functional.layer_norm(torch.nn.functional.gelu(x + b), (1024,)), torch.zeros(512, dtype=torch.int64,
                                                                                             device=gpu))
    close(loss.detach().cpu(), ref.cpu(), torch.float32, scale=3.0)


@pytest.mark.gpu
def test_gpu_cupy_mode_errors(gpu):
    from hpc.models import ops

    with pytest.raises(ValueError, match="is on cpu; the CuPy kernels need CUDA tensors"):
        ops.bias_act(torch.ones(2, 3), None, "relu")
    with pytest.raises(ValueError, match="not contiguous"):
        ops.layer_norm(torch.ones(4, 6, device=gpu).t(), None, None)


@pytest.mark.gpu
def test_gpu_register_kernels_fit(gpu):
    """Every register-resident instance launches with 512 threads and uses no local memory."""
    for src, ct, exprs in kernels.catalog():
        for e in exprs:
            if "_reg<" in e:
                fn = rt.function(src, ct, exprs, e)
                assert fn.max_threads_per_block >= 512, e
                assert fn.local_size_bytes <= 64, (e, fn.local_size_bytes)


def test_arg_mode_rejects_unknown():
    with pytest.raises(ValueError, match="HPC_KERNEL_ARGS='raw': must be one of dlpack, ptr"):
        rt.set_arg_mode("raw")


@pytest.mark.gpu
def test_gpu_pointer_args_match_dlpack(gpu):
    x = _randn((33, 257), torch.bfloat16, seed=27).to(gpu)
    b = _randn((257,), torch.bfloat16, seed=28).to(gpu)
    outs = []
    try:
        for mode in rt.ARG_MODES:
            rt.set_arg_mode(mode)
            outs.append(kernels.layer_norm(kernels.bias_act(x, b, "gelu_tanh"), b, b, 1e-5))
    finally:
        rt.set_arg_mode("dlpack")
    assert torch.equal(outs[0], outs[1])


@pytest.mark.gpu
def test_gpu_auto_mode_routes(gpu, monkeypatch):
    from hpc.models import ops

    ops.set_kernels("auto")
    calls = []
    real = kernels.layer_norm
    monkeypatch.setattr(kernels, "layer_norm", lambda *a: calls.append(1) or real(*a))
    x = _randn((8, 16), torch.float32, seed=29).to(gpu)
    w = torch.ones(16, device=gpu)
    ops.layer_norm(x, w, None)
    assert calls == [1], "contiguous fp32 CUDA tensors must take the kernel"
    ops.layer_norm(x.t().contiguous().t(), w, None)  # non-contiguous: torch path
    ops.layer_norm(x.bfloat16(), w, None)  # mixed dtypes (as under autocast): torch path
    ops.layer_norm(x.cpu(), w.cpu(), None)
    assert calls == [1]
    assert ops.kernels_in_use("cuda") == "cupy" and ops.kernels_in_use("cpu") == "torch"


@pytest.mark.parametrize("backend,dtype", on([torch.float32], [torch.float32, torch.bfloat16]))
def test_kernels_accept_empty_inputs(monkeypatch, backend, dtype):
    dev = _backend(backend, monkeypatch)
    x = torch.empty(0, 5, dtype=dtype, device=dev, requires_grad=True)
    b = torch.ones(5, dtype=dtype, device=dev, requires_grad=True)
    y = kernels.bias_act(x, b, "gelu")
    y.sum().backward()
    assert y.shape == (0, 5) and torch.equal(b.grad, torch.zeros_like(b))
    ln = kernels.layer_norm(x, b, b, 1e-5)
    assert ln.shape == (0, 5)
    lg = torch.empty(0, 7, dtype=dtype, device=dev, requires_grad=True)
    t = torch.empty(0, dtype=torch.int64, device=dev)
    assert torch.isnan(kernels.softmax_cross_entropy(lg, t))  # the mean of nothing, like F.cross_entropy
    kernels.softmax_cross_entropy(lg, t, reduction="sum").backward()
    assert lg.grad.shape == (0, 7)
    w = torch.ones(4, 3, dtype=dtype, device=dev, requires_grad=True)
    e = kernels.embedding(torch.empty(0, 2, dtype=torch.int64, device=dev), w)
    e.sum().backward()
    assert e.shape == (0, 2, 3) and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(5, 33), (9, 1000), (3, 20000)])
def test_gpu_float16_kernels(gpu, shape):
    """fp16 storage (fp32 arithmetic) against the float64 references, at fp16's ~2e-3."""
    dt = torch.float16
    x = _randn(shape, dt, seed=30, scale=2.0).to(gpu).requires_grad_()
    b = _randn(shape[-1:], dt, seed=31).to(gpu).requires_grad_()
    xr, br = x.detach().cpu().double().requires_grad_(), b.detach().cpu().double().requires_grad_()
    y = kernels.layer_norm(kernels.bias_act(x, b, "gelu"), b, b, 1e-5)
    yr = ref_layer_norm(ref_bias_act(xr, br, "gelu"), br, br, 1e-5)
    close(y.detach().cpu(), yr, dt, scale=8.0)
    t = _targets(shape[0], shape[1], seed=32, ignore_index=-100, ignore_frac=0.3).to(gpu)
    loss = kernels.softmax_cross_entropy(y, t, -100, 0.1, "mean")
    lossr = ref_cross_entropy(yr, t.cpu(), -100, 0.1, "mean")
    close(loss.detach().cpu(), lossr, dt, scale=8.0)
    loss.backward()
    lossr.backward()
    close(x.grad.cpu(), xr.grad, dt, scale=8.0)
    close(b.grad.cpu(), br.grad, dt, scale=8.0 * math.sqrt(shape[0]))
    w = _randn((50, 64), dt, seed=33).to(gpu)
    idx = torch.randint(0, 50, (300,), device=gpu)
    g = _randn((300, 64), dt, seed=34).to(gpu)
    from hpc.kernels import embedding_op as K

    ref = ref_embedding_grad(idx.cpu(), g.cpu(), 50)
    for det in (True, False):
        close(K.backward(g, idx, 50, 64, det).cpu(), ref, dt, scale=8.0 * math.sqrt(20))


@pytest.mark.parametrize("backend,opt", on(["adamw", "sgd"], ["adamw", "sgd"]))
def test_trainer_optim_fused_cupy_steps_on_the_kernel(monkeypatch, tmp_path, backend, opt):
    """`optim.fused=cupy` in a training config: every optimizer step runs the fused kernel (counted),
    and the trained weights equal those of `optim.fused=torch` (the same update on torch ops)."""
    from safetensors.torch import load_file

    from hpc.data import SynthConfig, synth
    from hpc.train import run
    _backend(backend, monkeypatch)
    steps = {"n": 0}
    for name in ("adam_step", "sgd_step"):
        orig = getattr(kernels, name)

        def counted(*a, _orig=orig, **kw):
            steps["n"] += 1
            return _orig(*a, **kw)

        monkeypatch.setattr(kernels, name, counted)
    synth(SynthConfig(kind="tabular", samples=200, features=5, classes=3, seed=2), tmp_path / "d",
          split="train=0.8,val=0.1,test=0.1")
    cfg = {"name": "fused", "out_dir": str(tmp_path / "runs"), "kernels": "torch",
           "data": {"dir": str(tmp_path / "d"), "batch_size": 16},
           "model": {"family": "mlp", "config": {"widths": [8]}},
           "optim": {"name": opt, "lr": 0.02 if opt == "adamw" else 0.1, "momentum": 0.0 if opt == "adamw" else 0.9,
                     "weight_decay": 0.01, "decay_bias_and_norm": True},
           "train": {"epochs": 2, "progress": False}}
    weights = {}
    for fused in ("cupy", "torch"):
        n0 = steps["n"]
        s = run(cfg, [f"optim.fused={fused}", f"run_id={fused}"])
        assert s["state"] == "completed" and s["step"] == 20
        assert s["optimizer"] == {"name": opt, "fused": fused, "step": fused}
        assert steps["n"] - n0 == (20 if fused == "cupy" else 0)
        weights[fused] = load_file(str(tmp_path / "runs" / "fused" / fused / "models" / "last.safetensors"))
    assert weights["cupy"].keys() == weights["torch"].keys()
    for k in weights["cupy"]:  # one step agrees to ~1e-7; 20 steps of training compound the rounding
        torch.testing.assert_close(weights["cupy"][k], weights["torch"][k], rtol=1e-4, atol=1e-5)
