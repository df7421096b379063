# Sourced by scripts/demo.sh and scripts/test.sh: create or reuse .venv and install the suite.
#
#   HPC_VENV         where the virtual environment lives (default: <repo>/.venv)
#   HPC_TORCH_SPEC   the torch requirement installed first (default: torch==2.13.0, the CPU build).
#                    On a GPU cluster set it to the CUDA build you want, e.g.
#                    HPC_TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu126"
#   HPC_EXTRAS       extras to install with the suite (test.sh: "test")
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HPC_VENV="${HPC_VENV:-$REPO/.venv}"
HPC_TORCH_SPEC="${HPC_TORCH_SPEC:-torch==2.13.0}"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

PY="${PYTHON:-$(command -v python3 || command -v python || true)}"
if [ -z "$PY" ]; then
  echo "error: python3 not found; install Python >= 3.10 and pip" >&2; exit 1
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "error: $("$PY" --version 2>&1) is too old; hpc needs Python >= 3.10" >&2; exit 1
fi

if [ ! -x "$HPC_VENV/bin/python" ]; then
  log "creating virtual environment $HPC_VENV"
  "$PY" -m venv "$HPC_VENV"
fi
# shellcheck disable=SC1091
. "$HPC_VENV/bin/activate"

pip_q() { python -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

# torch first and pinned: an unpinned torch (or one pulled in by a dependency) is a multi-GB CUDA build.
if ! python -c 'import torch' 2>/dev/null; then
  log "installing $HPC_TORCH_SPEC"
  # shellcheck disable=SC2086
  pip_q $HPC_TORCH_SPEC
fi
stamp="$HPC_VENV/.hpc-installed"
want="$(cat "$REPO/setup.py" | sha256sum | cut -c1-16)-${HPC_EXTRAS:-none}"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  log "installing the suite (editable) with extras [${HPC_EXTRAS:-}]"
  spec="$REPO"
  [ -n "${HPC_EXTRAS:-}" ] && spec="$REPO[$HPC_EXTRAS]"
  # The distribution was called hpc-suite until that name turned out to be taken on PyPI: an old
  # editable install of it would provide the same `hpc` package twice.
  if python -m pip show -q hpc-suite >/dev/null 2>&1; then python -m pip uninstall -y -q hpc-suite >/dev/null 2>&1 || true; fi
  pip_q -e "$spec"
  python -c 'import hpc, torch, h5py, mpi4py, submitit, safetensors, pyarrow' \
    || { echo "error: the install is incomplete (see pip output above)" >&2; exit 1; }
  echo "$want" > "$stamp"
fi

# Open MPI refuses to run as root unless told; containers and CI run as root.
if [ "$(id -u)" = 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
