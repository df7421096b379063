"""hpc.models.ops on the pure-torch path (runs everywhere, CI included) against float64 references.

The references below are written from the formulas (not by calling the op under test in float64), and
the same references hold the CuPy kernels to account in tests/test_kernels_gpu.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from hpc.models import ops

# (rtol, atol) per dtype: the error bounds docs/kernels.md states.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 1e-2), torch.float16: (2e-3, 2e-3),
       torch.float64: (1e-10, 1e-12)}
SHAPES_2D = [(1, 1), (1, 7), (3, 1), (5, 33), (17, 257), (64, 1000)]


@pytest.fixture(autouse=True)
def torch_path():
    before = ops.get_kernels()
    ops.set_kernels("torch")
    yield
    ops.set_kernels(before)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, dtype=torch.float32, seed=0, scale=1.0):
    # Never zeros: standard normal (plus an offset that keeps it off exact zeros) from a seeded generator.
    t = torch.randn(shape, generator=_gen(seed), dtype=torch.float64) * scale + 1e-3
    return t.to(dtype)


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale)


# ---------------------------------------------------------------------------------------------- references


def ref_bias_act(x, b, act):
    z = x.double() + (b.double() if b is not None else 0.0)
    if act == "relu":
        return torch.where(z > 0, z, torch.zeros_like(z))
    if act == "gelu":
        return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))
    u = math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)
    return 0.5 * z * (1.0 + torch.tanh(u))


def ref_cross_entropy(logits, target, ignore_index=-100, smoothing=0.0, reduction="mean"):
    x = logits.double()
    C = x.shape[1]
    lse = x.max(dim=1, keepdim=True).values
    lse = (lse + (x - lse).exp().sum(dim=1, keepdim=True).log()).squeeze(1)
    keep = target != ignore_index
    t = torch.where(keep, target, torch.zeros_like(target))
    xt = x.gather(1, t[:, None]).squeeze(1)
    rows = lse - (1.0 - smoothing) * xt - (smoothing / C) * x.sum(dim=1)
    rows = torch.where(keep, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / keep.sum()


def ref_layer_norm(x, w, b, eps):
    x = x.double()
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if w is not None:
        y = y * w.double()
    if b is not None:
        y = y + b.double()
    return y


def ref_embedding_grad(idx, g, V):
    D = g.shape[-1]
    out = torch.zeros(V, D, dtype=torch.float64)
    return out.index_add_(0, idx.reshape(-1), g.reshape(-1, D).double())


def _grads(fn, *inputs, round_to=None):
    """Forward with fresh leaf copies, backward with a fixed random upstream gradient (rounded to
    ``round_to`` first, so a float64 reference sees the values a low-precision op saw)."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in inputs]
    out = fn(*leaves)
    g = _randn(out.shape, torch.float64, seed=99)
    if round_to is not None:
        g = g.to(round_to)
    g = g.to(out.dtype)
    out.backward(g)
    return out, [lv.grad if lv is not None and lv.is_floating_point() else None for lv in leaves], g


# ---------------------------------------------------------------------------------------------- bias_act


@pytest.mark.parametrize("act", ops.ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES_2D + [(2, 3, 129)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_act_forward_backward(act, shape, dtype):
    x = _randn(shape, dtype, seed=1, scale=2.0)
    b = _randn(shape[-1:], dtype, seed=2)
    y, (gx, gb), g = _grads(lambda x, b: ops.bias_act(x, b, act), x, b)
    y_ref, (gx_ref, gb_ref), _ = _grads(lambda x, b: ref_bias_act(x, b, act), x.double(), b.double(),
                                        round_to=dtype)
    close(y, y_ref, dtype, scale=3.0)
    close(gx, gx_ref, dtype, scale=3.0)
    close(gb, gb_ref, dtype, scale=math.sqrt(x.numel() / shape[-1]) * 3.0)
    assert y.dtype == dtype and gx.dtype == dtype and gb.dtype == dtype


def test_bias_act_without_bias_and_gradcheck():
    x = _randn((3, 5), torch.float64, seed=3)
    for act in ops.ACTIVATIONS:
        close(ops.bias_act(x, None, act), ref_bias_act(x, None, act), torch.float64)
        xs = x.clone().requires_grad_()
        bs = _randn((5,), torch.float64, seed=4).requires_grad_()
        assert torch.autograd.gradcheck(lambda a, b, act=act: ops.bias_act(a, b, act), (xs, bs))


def test_bias_act_rejects_bad_input():
    x = torch.ones(2, 3)
    with pytest.raises(ValueError, match="act='tanh'.*relu, gelu, gelu_tanh"):
        ops.bias_act(x, torch.ones(3), "tanh")
    with pytest.raises(ValueError, match=r"bias shape \(4,\) must be \[3\]"):
        ops.bias_act(x, torch.ones(4), "relu")


# ---------------------------------------------------------------------------------------------- cross-entropy


def _targets(B, C, seed, ignore_index=-100, ignore_frac=0.0):
    t = torch.randint(0, C, (B,), generator=_gen(seed))
    if ignore_frac:
        mask = torch.rand(B, generator=_gen(seed + 1)) < ignore_frac
        mask[0] = False  # at least one counted row, so 'mean' is a number
        t = torch.where(mask, torch.full_like(t, ignore_index), t)
    return t


@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (4, 1), (7, 33), (33, 1025), (128, 10)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ops.REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_forward_backward(shape, smoothing, reduction, dtype):
    B, C = shape
    logits = _randn(shape, dtype, seed=5, scale=3.0)
    target = _targets(B, C, seed=6, ignore_index=-1, ignore_frac=0.3 if B > 1 else 0.0)
    fn = lambda lg: ops.softmax_cross_entropy(lg, target, ignore_index=-1, label_smoothing=smoothing,  # noqa: E731
                                              reduction=reduction)
    rfn = lambda lg: ref_cross_entropy(lg, target, -1, smoothing, reduction)  # noqa: E731
    loss, (gl,), _ = _grads(fn, logits)
    loss_ref, (gl_ref,), _ = _grads(rfn, logits.double(), round_to=dtype)
    # bf16: PyTorch rounds log_softmax to bf16 before the NLL, so its loss is looser than the kernel's.
    close(loss, loss_ref, dtype, scale=10.0 if dtype == torch.bfloat16 else 3.0)
    close(gl, gl_ref, dtype)


def test_cross_entropy_ignore_all_and_int32_targets():
    logits = _randn((4, 6), torch.float32, seed=7).requires_grad_()
    target = torch.full((4,), -100, dtype=torch.int64)
    loss = ops.softmax_cross_entropy(logits, target)
    assert torch.isnan(loss)  # 0/0 like F.cross_entropy
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    t32 = torch.tensor([0, 5, 2, 1], dtype=torch.int32)
    close(ops.softmax_cross_entropy(logits, t32, label_smoothing=0.2),
          ref_cross_entropy(logits, t32.long(), smoothing=0.2), torch.float32)


def test_cross_entropy_gradcheck():
    logits = _randn((5, 7), torch.float64, seed=8).requires_grad_()
    target = torch.tensor([0, 6, -100, 3, 3])
    for red in ops.REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda lg, red=red: ops.softmax_cross_entropy(lg, target, label_smoothing=0.15, reduction=red), (logits,))


def test_cross_entropy_rejects_bad_input():
    lg, t = torch.ones(3, 4), torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="reduction='avg'"):
        ops.softmax_cross_entropy(lg, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing=1.5"):
        ops.softmax_cross_entropy(lg, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="target dtype torch.float32"):
        ops.softmax_cross_entropy(lg, t.float())
    with pytest.raises(ValueError, match=r"logits must be \[B, C\]"):
        ops.softmax_cross_entropy(lg, torch.zeros(2, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------- layer norm


@pytest.mark.parametrize("shape", SHAPES_2D[1:] + [(2, 3, 129), (4, 4097)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_forward_backward(shape, affine, dtype):
    x = _randn(shape, dtype, seed=9, scale=3.0) + 2.0  # an offset mean: tests the centring
    x = x.to(dtype)
    D = shape[-1]
    w = _randn((D,), dtype, seed=10) if affine else None
    b = _randn((D,), dtype, seed=11) if affine else None
    y, grads, _ = _grads(lambda x, w, b: ops.layer_norm(x, w, b, 1e-5), x, w, b)
    y_ref, grads_ref, _ = _grads(lambda x, w, b: ref_layer_norm(x, w, b, 1e-5), x.double(),
                                 None if w is None else w.double(), None if b is None else b.double(),
                                 round_to=dtype)
    # bf16 output is rounded to 8 bits of mantissa: |y| up to ~4 gives ~1.6e-2 absolute.
    close(y, y_ref, dtype, scale=4.0)
    rows = x.numel() // D
    for got, want, sc in zip(grads, grads_ref, (4.0, 4.0 * math.sqrt(rows), 4.0 * math.sqrt(rows))):
        if want is None:
            assert got is None
        else:
            close(got, want, dtype, scale=sc)


def test_layer_norm_gradcheck_and_errors():
    x = _randn((3, 6), torch.float64, seed=12).requires_grad_()
    w = _randn((6,), torch.float64, seed=13).requires_grad_()
    b = _randn((6,), torch.float64, seed=14).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: ops.layer_norm(x, w, b, 1e-5), (x, w, b))
    with pytest.raises(ValueError, match=r"weight shape \(5,\) must be \[6\]"):
        ops.layer_norm(x, torch.ones(5, dtype=torch.float64), None)


# ---------------------------------------------------------------------------------------------- embedding


@pytest.mark.parametrize("V,D,idx_shape", [(1, 1, (1,)), (10, 3, (4, 5)), (50, 130, (300,)), (7, 64, (2, 3, 4))])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_forward_backward(V, D, idx_shape, deterministic, dtype):
    w = _randn((V, D), dtype, seed=15)
    idx = torch.randint(0, V, idx_shape, generator=_gen(16))  # many duplicates: segments of length > 1
    leaf = w.clone().requires_grad_()
    out = ops.embedding(idx, leaf, deterministic=deterministic)
    g = _randn(out.shape, torch.float64, seed=17)
    out.backward(g.to(dtype))
    assert out.shape == (*idx_shape, D)
    assert torch.equal(out, w[idx])  # a gather is exact
    counts = torch.bincount(idx.reshape(-1), minlength=V).max().item()
    close(leaf.grad, ref_embedding_grad(idx, g.to(dtype), V), dtype, scale=math.sqrt(counts) * 3.0)


def test_embedding_deterministic_is_bitwise_reproducible():
    V, D = 5, 33
    w = _randn((V, D), torch.float32, seed=18)
    idx = torch.randint(0, V, (2000,), generator=_gen(19))
    g = _randn((2000, D), torch.float32, seed=20)
    grads = []
    for _ in range(2):
        leaf = w.clone().requires_grad_()
        ops.embedding(idx, leaf, deterministic=True).backward(g)
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])
    close(grads[0], ref_embedding_grad(idx, g, V), torch.float32, scale=30.0)


def test_embedding_gradcheck_and_errors():
    w = _randn((6, 3), torch.float64, seed=21).requires_grad_()
    idx = torch.tensor([[0, 5, 5], [2, 0, 0]])
    assert torch.autograd.gradcheck(lambda w: ops.embedding(idx, w, deterministic=True), (w,))
    with pytest.raises(ValueError, match="idx dtype torch.float32"):
        ops.embedding(idx.float(), w)
    with pytest.raises(ValueError, match=r"weight must be \[V, D\]"):
        ops.embedding(idx, torch.ones(3))


# ---------------------------------------------------------------------------------------------- optimizers


def _model_pair(seed):
    torch.manual_seed(seed)
    a = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)).double()
    b = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)).double()
    b.load_state_dict(a.state_dict())
    return a, b


def _train(model, opt, steps, seed):
    g = _gen(seed)
    for _ in range(steps):
        x = torch.randn(16, 7, generator=g, dtype=torch.float64)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("kind,kw", [
    ("adamw", dict(lr=1e-2, weight_decay=0.1)),
    ("adam", dict(lr=1e-2, weight_decay=0.05, betas=(0.8, 0.95))),
    ("adam", dict(lr=3e-3, betas=(0.3, 0.9))),  # beta1 < 0.5 takes lerp's other branch
    ("sgd", dict(lr=0.05)),
    ("sgd", dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
    ("sgd", dict(lr=0.05, momentum=0.9, dampening=0.1)),
    ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True)),
])
def test_fused_optimizer_matches_torch_optim(kind, kw):
    ours, ref = _model_pair(0)
    opt = ops.fused_optimizer(kind, ours.parameters(), **kw)
    ref_cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[kind]
    ref_opt = ref_cls(ref.parameters(), **({"weight_decay": 0.0} if kind == "adamw" and "weight_decay" not in kw
                                           else {}), **kw)
    _train(ours, opt, 5, seed=22)
    _train(ref, ref_opt, 5, seed=22)
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
    # Parameters are views of the one flat buffer.
    base = opt.flat_param.data_ptr()
    assert all(base <= p.data_ptr() < base + opt.flat_param.numel() * 8 for p in ours.parameters())


def test_fused_optimizer_replaced_grad_and_state_dict():
    ours, ref = _model_pair(1)
    opt = ops.FusedAdam(ours.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0)
    _train(ours, opt, 2, seed=23)
    _train(ref, ref_opt, 2, seed=23)
    # A gradient assigned from outside (not accumulated into the view) is copied into the flat buffer.
    for p, q in zip(ours.parameters(), ref.parameters()):
        gnew = _randn(p.shape, torch.float64, seed=24)
        p.grad = gnew.clone()
        q.grad = gnew.clone()
    opt.step()
    ref_opt.step()
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
    sd = opt.state_dict()
    ours2, _ = _model_pair(1)
    opt2 = ops.FusedAdam(ours2.parameters(), lr=1e-2)
    opt2.load_state_dict(sd)
    assert opt2.step_count == opt.step_count == 3
    assert torch.equal(opt2.exp_avg_sq, opt.exp_avg_sq)


def test_fused_optimizer_rejects_bad_config():
    lin = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="betas"):
        ops.FusedAdam(lin.parameters(), betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="nesterov"):
        ops.FusedSGD(lin.parameters(), nesterov=True)
    with pytest.raises(ValueError, match="one device and dtype"):
        ops.FusedSGD([torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2, dtype=torch.float64))])
    with pytest.raises(ValueError, match="must be one of adam, adamw, sgd"):
        ops.fused_optimizer("lamb", lin.parameters())


# ---------------------------------------------------------------------------------------------- selection


def test_set_kernels_modes(monkeypatch):
    with pytest.raises(ValueError, match="kernels='fast'.*auto, cupy, torch"):
        ops.set_kernels("fast")
    ops.set_kernels("auto")
    assert ops.get_kernels() == "auto"
    assert ops.kernels_in_use("cpu") == "torch"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="kernels='cupy' cannot run here: CUDA is not available"):
            ops.set_kernels("cupy")
        assert ops.get_kernels() == "auto"  # a refused mode leaves the old one in place
    monkeypatch.setattr(ops, "_mode", None)
    monkeypatch.setenv("HPC_KERNELS", "torch")
    assert ops.get_kernels() == "torch"
    monkeypatch.setattr(ops, "_mode", None)
    monkeypatch.setenv("HPC_KERNELS", "fastest")
    with pytest.raises(ValueError, match="HPC_KERNELS='fastest'.*auto, cupy, torch"):
        ops.get_kernels()
    monkeypatch.setenv("HPC_KERNELS", "auto")


def test_auto_on_cpu_tensors_uses_torch_path(monkeypatch):
    ops.set_kernels("auto")

    def boom():
        raise AssertionError("the kernels package must not be touched for CPU tensors")

    monkeypatch.setattr(ops, "_k", boom)
    x = _randn((4, 8), torch.float32, seed=25)
    ops.bias_act(x, None, "gelu")
    ops.layer_norm(x, None, None)
    ops.softmax_cross_entropy(x, torch.zeros(4, dtype=torch.int64))
    ops.embedding(torch.tensor([1, 2]), x)
