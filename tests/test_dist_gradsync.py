"""GradSync under real mpiexec: the synced gradient equals the mean of the per-rank gradients.

Every rank draws its own inputs (seeded by rank), so a missing or partial sync fails. Each rank can
recompute every other rank's gradients locally (same init, known seeds): that is the reference.
``gradsync`` runs on every rank under real mpiexec from tests/test_dist_mpi.py.
"""

import pytest
import torch
from torch import nn

from hpc.dist import GradSync, World, broadcast_optimizer_state, broadcast_parameters
from hpc.dist.comm import LocalComm

FP16_RTOL = 2e-3  # fp16 has an 11-bit significand (rel. error 4.9e-4 per rounding); a few roundings


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        # Registered first, so they land in the last buckets: a bucket waiting for a gradient that
        # never comes starts only in synchronize(), and so do the buckets after it (same order on
        # every rank); the body's buckets, filled first during backward, still overlap.
        self.only_rank0 = nn.Linear(16, 4)  # used by rank 0 only: others contribute zeros
        self.never = nn.Parameter(torch.ones(3))  # used by nobody: synced gradient is zero
        self.body = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))

    def forward(self, x, rank):
        y = self.body(x)
        return y + self.only_rank0(x) if rank == 0 else y


def net() -> Net:
    torch.manual_seed(0)
    return Net()


def batch(rank: int, micro: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rank + micro)
    return torch.randn(8, 16, generator=g) * (rank + 1)


def local_grads(model: Net, rank: int, micros: int) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    for m in range(micros):
        model(batch(rank, m), rank).pow(2).mean().backward()
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]


def expected(n: int, micros: int) -> list[torch.Tensor]:
    model = net()
    per_rank = [local_grads(model, r, micros) for r in range(n)]
    return [sum(g[i] for g in per_rank) / n for i in range(len(per_rank[0]))]


def check(model, want, rtol, what):
    for (name, p), w in zip(model.named_parameters(), want):
        err = (p.grad - w).abs().max().item()
        assert err <= rtol * w.abs().max().item() + 1e-7, f"{what}: {name} off by {err}"


def gradsync(comm, backend: str) -> None:
    r, n = comm.rank, comm.size
    for bucket_mb, compression, micros in [(0.004, None, 1), (25, None, 1), (0.004, "fp16", 1), (0.01, None, 3)]:
        model = net()
        gs = GradSync(comm, model.parameters(), bucket_mb=bucket_mb, compression=compression)
        assert len(gs.buckets) >= (3 if bucket_mb < 1 else 1), gs
        for m in range(micros - 1):  # accumulation: no communication for the first k-1
            with gs.no_sync():
                model(batch(r, m), r).pow(2).mean().backward()
            assert gs._next == 0
        model(batch(r, micros - 1), r).pow(2).mean().backward()
        if comm.overlap and bucket_mb < 1:
            assert gs._next > 0, "no bucket reduction started during backward"
        gs.synchronize()
        what = f"{backend} n={n} bucket_mb={bucket_mb} compression={compression} micros={micros}"
        want = expected(n, micros)
        check(model, want, FP16_RTOL if compression else 1e-5, what)
        # the same step again after each way of zeroing: gradients kept in the buckets, or set to
        # None (autograd allocates fresh ones, which the hooks move into the buckets)
        for zero in (gs.zero_grad, lambda: model.zero_grad(set_to_none=True)):
            zero()
            for m in range(micros - 1):
                with gs.no_sync():
                    model(batch(r, m), r).pow(2).mean().backward()
            model(batch(r, micros - 1), r).pow(2).mean().backward()
            gs.synchronize()
            check(model, want, FP16_RTOL if compression else 1e-5, what + " (again)")
        # the step after the sync keeps the replicas identical
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        assert all(torch.equal(flat, f) for f in comm.allgather_object(flat)), what
        # a second backward without no_sync before synchronize is a usage error, said clearly
        model(batch(r, 0), r).sum().backward()
        with pytest.raises(RuntimeError, match="no_sync"):
            model(batch(r, 1), r).sum().backward()
        gs.synchronize()
        gs.remove()

    # initial parameters and optimizer state from rank 0
    torch.manual_seed(100 + r)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7))
    model[1].running_mean.fill_(r)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3 * (r + 1))
    if r == 0:  # only rank 0 has optimizer state (as after a resume)
        model(torch.randn(4, 5)).sum().backward()
        opt.step()
    broadcast_parameters(comm, model)
    broadcast_optimizer_state(comm, opt)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd = opt.state_dict()
    mine = (state, {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in sd["state"].items()},
            sd["param_groups"][0]["lr"])
    ref = comm.broadcast_object(mine, root=0)
    assert set(ref[0]) == set(state) and all(torch.equal(ref[0][k], state[k]) for k in state)
    assert ref[1].keys() == mine[1].keys() and len(mine[1]) == 4  # 2 Linear + 2 BatchNorm params
    for k in ref[1]:
        assert all(torch.equal(ref[1][k][kk], mine[1][k][kk]) for kk in ref[1][k])
    assert mine[2] == pytest.approx(1e-3)


def test_one_rank_is_a_no_op():
    model = net()
    gs = GradSync(LocalComm(World()), model.parameters(), compression="fp16")
    model(batch(0, 0), 0).pow(2).mean().backward()
    before = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    gs.synchronize()
    assert not gs.buckets
    assert all((a is None and p.grad is None) or torch.equal(a, p.grad)
               for a, p in zip(before, model.parameters()))


def test_bad_arguments():
    comm = LocalComm(World())
    with pytest.raises(ValueError, match="bucket_mb"):
        GradSync(comm, net().parameters(), bucket_mb=0)
    with pytest.raises(ValueError, match="compression.*fp16"):
        GradSync(comm, net().parameters(), compression="int8")
