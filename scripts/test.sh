#!/usr/bin/env bash
# Create or reuse .venv, install the suite with its test extras, bring up the local Slurm cluster
# where possible (root or an existing cluster), and run the whole test suite.
# Extra arguments go to pytest, e.g.  ./scripts/test.sh -k data -x
set -euo pipefail
HPC_EXTRAS="${HPC_EXTRAS:-test}"
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$REPO"

if [ "$(id -u)" = 0 ] || command -v sinfo >/dev/null 2>&1; then
  # Two nodes (n1, n2 on this host): the multi-node tests need them, and every one-node test runs
  # on them as well (a one-node job lands on either).
  log "bringing up the local Slurm cluster (slurm/dev-cluster.sh up --nodes 2)"
  if ! bash slurm/dev-cluster.sh up --nodes 2; then
    log "the local Slurm cluster did not come up: Slurm tests will skip (and fail under CI=true)"
  fi
fi
if [ -f "$REPO/.slurm-dev/env.sh" ]; then
  # shellcheck disable=SC1091
  source "$REPO/.slurm-dev/env.sh"
fi

# The report test renders a page in headless Chromium (Debian's package).
if [ "$(id -u)" = 0 ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  log "installing chromium (for the report test)"
  { [ -n "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v lock)" ] || apt-get update -qq; } >/dev/null 2>&1 || true
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 \
    || log "could not install chromium: the report's browser check will skip (and fail under CI=true)"
fi

log "checking the import layers (lint-imports: contracts in pyproject.toml, docs/DESIGN.md)"
lint-imports --no-cache

# Horovod for the horovod backend tests: built from source once (~3-10 minutes), then installed from
# the cached wheel in seconds (scripts/build-horovod.sh; HPC_HOROVOD_CACHE; HPC_SKIP_HOROVOD=1 skips).
if [ "${HPC_SKIP_HOROVOD:-0}" != 1 ]; then
  bash scripts/build-horovod.sh --install \
    || log "Horovod was not built: the horovod tests will skip (and fail under CI=true)"
fi

log "running the test suite"
set +e
python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "error: pytest collected no tests" >&2
fi
exit "$rc"
