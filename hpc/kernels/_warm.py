"""Compile the kernels ahead of use (fills CuPy's on-disk cache) and report what ptxas made of them.

    python -m hpc.kernels._warm --list            # "SOURCE CTYPE" per module, for xargs -P
    python -m hpc.kernels._warm SOURCE CTYPE ...  # compile those modules
    python -m hpc.kernels._warm --report          # registers / local memory of every instance; exit 1 if a
                                              # register-resident row kernel spills or cannot run 512 threads
Needs CuPy and a GPU (scripts/gpu-check.sh runs it).
"""

from __future__ import annotations

import sys
import time

import torch

from hpc import kernels
from hpc.kernels import _runtime as rt


def _modules(pairs):
    cat = {(src, ct): exprs for src, ct, exprs in kernels.catalog()}
    for src, ct in pairs:
        yield src, ct, cat[(src, ct)]


def main(argv: list[str]) -> int:
    if argv == ["--list"]:
        for src, ct, _ in kernels.catalog():
            print(src, ct)
        return 0
    why = rt.cupy_missing() if torch.cuda.is_available() else "no CUDA device (torch.cuda.is_available() is False)"
    if why:
        print(f"kernels._warm: cannot compile here: {why}", file=sys.stderr)
        return 2
    if argv == ["--report"]:
        bad = 0
        for src, ct, exprs in kernels.catalog():
            for e in exprs:
                fn = rt.function(src, ct, exprs, e)
                local = fn.local_size_bytes
                print(f"{e:40s} regs {fn.num_regs:3d} local {local:5d} B max threads {fn.max_threads_per_block}")
                # the row kernels (register, shared-memory, streaming) always launch 512-thread blocks
                row = any(k in e for k in ("_reg<", "_smem<", "_stream<"))
                if (row and fn.max_threads_per_block < 512) or ("_reg<" in e and local > 64):
                    bad += 1
        print("cache dir:", rt.cache_dir(), "| row kernels that cannot run 512 threads or register-resident ones "
              "that spill:", bad)
        return 1 if bad else 0
    if len(argv) % 2:
        print(__doc__, file=sys.stderr)
        return 2
    for src, ct, exprs in _modules(zip(argv[::2], argv[1::2])):
        t0 = time.perf_counter()
        rt.function(src, ct, exprs, exprs[0])  # compiles the module with all its instances
        print(f"compiled {src} {ct}: {len(exprs)} instances in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
