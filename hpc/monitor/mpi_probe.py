"""`python -m hpc.monitor.mpi_probe MB`: run by `hpc doctor` under the launcher (mpiexec or srun).

Every rank all-reduces rank-dependent values (a wrong sum means a broken MPI, not a slow one), then
times all-reduces of an MB-sized float32 buffer. Rank 0 prints one JSON line: the MPI library,
the hosts, and the bandwidths (algorithm bandwidth = bytes / time; bus bandwidth = algbw * 2(n-1)/n,
the number comparable across rank counts, as nccl-tests report it).
"""

from __future__ import annotations

import json
import socket
import sys
import time

import numpy as np


def main(argv: list[str]) -> int:
    from mpi4py import MPI

    mb = float(argv[0]) if argv else 16.0
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    small = np.array([rank + 1.0, 2.0 ** rank], dtype=np.float64)
    out = np.empty_like(small)
    comm.Allreduce(small, out)
    want = [size * (size + 1) / 2, 2.0 ** size - 1]
    correct = bool(np.allclose(out, want))
    n = max(1, int(mb * (1 << 20) / 4))
    buf = np.full(n, float(rank), dtype=np.float32)
    res = np.empty_like(buf)
    comm.Allreduce(buf, res)  # warm-up: connection setup is not bandwidth
    t0 = time.perf_counter()
    comm.Allreduce(buf, res)
    # The iteration count must be the same on every rank (a rank-local loop condition deadlocks):
    # derived from the slowest rank's timing of one call, aiming at ~0.5 s of measurement.
    one = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
    iters = int(min(50, max(3, 0.5 / max(one, 1e-9))))
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        comm.Allreduce(buf, res)
    t = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
    hosts = comm.gather(socket.gethostname(), root=0)
    if rank == 0:
        algbw = n * 4 * iters / t / 1e9
        print(json.dumps({"ok": correct, "size": size, "hosts": sorted(set(hosts)), "mb": mb,
                          "iters": iters, "seconds_per_allreduce": t / iters, "algbw_gbs": algbw,
                          "busbw_gbs": algbw * 2 * (size - 1) / size,
                          "library": MPI.Get_library_version().strip("\x00 \n").split(",")[0]}), flush=True)
    return 0 if correct else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
