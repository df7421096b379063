#!/usr/bin/env bash
# Everything the CuPy kernels need checked on a GPU, in one call (e.g. on the lent device machine):
#   1. compile every kernel instance with NVRTC through CuPy (python -m hpc.kernels._warm) and list
#      registers / local memory;
#   2. the `gpu`-marked tests (tests/test_kernels_gpu.py) against the float64 references;
#   3. `hpc bench kernels --json $OUT/kernels.json` (the table goes to $OUT/bench.txt).
# Pip-free: it needs only python3 with torch, CuPy, numpy and pytest, and runs from the source tree
# (PYTHONPATH), so nothing is installed. Writes into $OUT (default ./gpu-check-out).
# PHASES picks the phases (default "compile tests bench"); each has a time limit in seconds (COMPILE_S,
# TESTS_S, BENCH_S). All three may not fit one 10-minute device call (torch.compile baselines compile
# slowly): then run PHASES="compile tests" in one call and PHASES="bench" in the next, or set
# BENCH_ARGS="--no-compile" to skip the torch.compile baselines.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HPC_KERNEL_CACHE_DIR=${HPC_KERNEL_CACHE_DIR:-${TMPDIR:-/tmp}/hpc-kernel-cache}
export HPC_REQUIRE_GPU=1  # a gpu test that cannot find CuPy or a GPU fails here instead of skipping
status=0
PHASES=${PHASES:-compile tests bench}
has() { case " $PHASES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  "$PY" -c 'import sys, torch, cupy, numpy; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "cupy", cupy.__version__, "numpy", numpy.__version__)' 2>&1
  git rev-parse HEAD 2>/dev/null; git status --porcelain -- hpc/kernels hpc/models/ops.py hpc/bench/kernels.py tests 2>/dev/null | head -20
} >"$OUT/env.txt"
cat "$OUT/env.txt"

if has compile; then
  echo "== 1. compile (NVRTC via CuPy), 8 modules at a time, then the register report"
  {
    "$PY" -m hpc.kernels._warm --list | timeout "${COMPILE_S:-150}" xargs -P 8 -n 2 "$PY" -m hpc.kernels._warm
    timeout 60 "$PY" -m hpc.kernels._warm --report
  } >"$OUT/compile.txt" 2>&1
  rc=$?; grep -E "^compiled|cache dir|Error|error" "$OUT/compile.txt" | tail -30; echo "compile rc=$rc"
  [ $rc -eq 0 ] || status=1
fi

if has tests; then
  echo "== 2. gpu tests"
  timeout "${TESTS_S:-240}" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_gpu.py \
    -o addopts="" -rfEs --junitxml="$OUT/gpu-tests.xml" >"$OUT/gpu-tests.log" 2>&1
  rc=$?; tail -25 "$OUT/gpu-tests.log"; echo "tests rc=$rc"; [ $rc -eq 0 ] || status=1
fi

if has bench; then
  echo "== 3. bench"
  # shellcheck disable=SC2086
  timeout "${BENCH_S:-420}" "$PY" -m hpc.bench.kernels --json "$OUT/kernels.json" ${BENCH_ARGS:-} \
    >"$OUT/bench.txt" 2>&1
  rc=$?; tail -40 "$OUT/bench.txt"; echo "bench rc=$rc"; [ $rc -eq 0 ] || status=1
fi
exit $status
