#!/usr/bin/env bash
# Everything the CuPy kernels need checked on a GPU, in one call (e.g. on the lent device machine):
#   1. compile every kernel instance with NVRTC through CuPy and list registers / local memory;
#   2. the `gpu`-marked tests (tests/test_kernels_gpu.py) against the float64 references;
#   3. `hpc bench kernels --json $OUT/kernels.json` (the table goes to $OUT/bench.txt).
# Pip-free: it needs only python3 with torch, CuPy, numpy and pytest, and runs from the source tree
# (PYTHONPATH), so nothing is installed. Writes into $OUT (default ./gpu-check-out). Each phase has a
# time limit (seconds: COMPILE_S, TESTS_S, BENCH_S) so the whole stays inside a 10-minute call.
# Set BENCH_ARGS="--no-compile" to skip the slow torch.compile baselines.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HPC_KERNEL_CACHE_DIR=${HPC_KERNEL_CACHE_DIR:-${TMPDIR:-/tmp}/hpc-kernel-cache}
status=0

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  "$PY" -c 'import sys, torch, cupy, numpy; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "cupy", cupy.__version__, "numpy", numpy.__version__)' 2>&1
  git rev-parse HEAD 2>/dev/null; git status --porcelain 2>/dev/null | head -20
} >"$OUT/env.txt"
cat "$OUT/env.txt"

echo "== 1. compile (NVRTC via CuPy)"
timeout "${COMPILE_S:-180}" "$PY" - >"$OUT/compile.txt" 2>&1 <<'PYEOF'
import time, torch, kernels
from kernels import _runtime as rt
bad = 0
for src, ct, exprs in kernels.catalog():
    t0 = time.perf_counter()
    for e in exprs:
        fn = rt.function(src, ct, exprs, e)
        spill = fn.local_size_bytes
        print(f"{e:40s} regs {fn.num_regs:3d} local {spill:5d} B max threads {fn.max_threads_per_block}")
        if "_reg<" in e and (spill > 64 or fn.max_threads_per_block < 512):
            bad += 1
    print(f"-- {src} {ct}: {len(exprs)} instances in {time.perf_counter() - t0:.1f} s")
print("cache dir:", rt.cache_dir())
raise SystemExit(1 if bad else 0)
PYEOF
rc=$?; tail -3 "$OUT/compile.txt"; echo "compile rc=$rc"; [ $rc -eq 0 ] || status=1

echo "== 2. gpu tests"
timeout "${TESTS_S:-240}" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_gpu.py \
  -o addopts="" -rfEs --junitxml="$OUT/gpu-tests.xml" >"$OUT/gpu-tests.log" 2>&1
rc=$?; tail -25 "$OUT/gpu-tests.log"; echo "tests rc=$rc"; [ $rc -eq 0 ] || status=1

echo "== 3. bench"
# shellcheck disable=SC2086
timeout "${BENCH_S:-300}" "$PY" -m hpc.bench.kernels --json "$OUT/kernels.json" ${BENCH_ARGS:-} >"$OUT/bench.txt" 2>&1
rc=$?; cat "$OUT/bench.txt" | tail -40; echo "bench rc=$rc"; [ $rc -eq 0 ] || status=1
exit $status
