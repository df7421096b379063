#!/usr/bin/env bash
# A real one-node Slurm cluster for development and CI: munged + slurmctld + slurmd started by hand.
#
#   slurm/dev-cluster.sh up       install the packages if missing (root only), write the config,
#                                 start the daemons, wait until the node is idle (idempotent)
#   slurm/dev-cluster.sh down     cancel the cluster's jobs and stop exactly the daemons `up` started
#   slurm/dev-cluster.sh status   daemons, node state and queue
#   slurm/dev-cluster.sh env      print `export SLURM_CONF=...` (use: eval "$(slurm/dev-cluster.sh env)")
#
# Everything (slurm.conf, munge key and socket, state, spool, logs, pid files) lives in the state
# directory, never in /etc. Clients find the config through SLURM_CONF (written to $STATE/env.sh,
# which scripts/test.sh sources). As a convenience, when running as root and no
# /etc/slurm/slurm.conf exists, `up` also links /etc/slurm/slurm.conf to this cluster's config so
# a plain `sinfo`/`sbatch`/submitit finds it without SLURM_CONF; `down` removes only that link.
#
# Environment:
#   HPC_SLURM_DEV_DIR        state directory (default: <repo>/.slurm-dev)
#   HPC_SLURM_DEV_CPUS       CPUs the node declares (default: max(8, 2*nproc)). More than the real
#                            cores on purpose: a 4-task test job fits on a 2-core machine and two
#                            test jobs run side by side instead of queueing (costs: oversubscribed
#                            cores when they do).
#   HPC_SLURM_DEV_PORT       slurmctld port (default 6817); slurmd uses PORT+1
#   HPC_SLURM_DEV_PARTITION  partition name (default: debug)
#   HPC_SLURM_DEV_TIMEOUT    seconds to wait for the node to become idle (default 60)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${HPC_SLURM_DEV_DIR:-$REPO/.slurm-dev}"
CONF="$STATE/etc/slurm.conf"
PORT="${HPC_SLURM_DEV_PORT:-6817}"
PARTITION="${HPC_SLURM_DEV_PARTITION:-debug}"
TIMEOUT="${HPC_SLURM_DEV_TIMEOUT:-60}"
NODE="$(hostname -s)"
ETC_LINK=/etc/slurm/slurm.conf
PACKAGES=(slurmctld slurmd slurm-client munge libpmix2)

log() { printf '[dev-cluster] %s\n' "$*" >&2; }
die() { printf '[dev-cluster] error: %s\n' "$*" >&2; exit 1; }

# --- pids ------------------------------------------------------------------------------------
# A pid counts as ours only if it is alive and its command line names our daemon and our state
# directory: a stale pid file never makes us signal an unrelated process.
pid_of() {  # pid_of NAME -> prints the pid of our running daemon NAME, or nothing
  local name="$1" file="$STATE/run/$1.pid" pid cmd
  [ -f "$file" ] || return 0
  pid="$(tr -dc 0-9 < "$file")"
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 0
  cmd="$(tr '\0' ' ' < "/proc/$pid/cmdline")"
  case "$cmd" in
    *"$name"*"$STATE/"*) echo "$pid" ;;
  esac
}

# --- install ---------------------------------------------------------------------------------
have_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sinfo >/dev/null \
    && command -v munged >/dev/null && ls /usr/lib/*/libpmix.so.2* >/dev/null 2>&1
}

install_packages() {
  have_packages && return 0
  if [ "$(id -u)" != 0 ]; then
    die "Slurm is not installed and this is not root; run: sudo apt-get install -y ${PACKAGES[*]}"
  fi
  command -v apt-get >/dev/null || die "Slurm is not installed and apt-get is missing; install ${PACKAGES[*]} with your package manager"
  export DEBIAN_FRONTEND=noninteractive
  # `apt-get update` only when the package lists do not know slurmctld yet (a fresh CI image).
  if ! apt-cache policy slurmctld 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    log "apt-get update"
    apt-get update -qq
  fi
  log "apt-get install ${PACKAGES[*]}"
  # libpmix2 must be present before slurmd starts, or `srun --mpi=pmix` is unavailable.
  apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
  have_packages || die "apt-get install ${PACKAGES[*]} did not provide slurmctld/slurmd/sinfo/munged/libpmix"
}

# Debian's mpi/pmix plugin dlopens the unversioned .../pmix2/lib/libpmix.so, which only
# libpmix-dev ships (with autotools and headers as dependencies). Without it `srun --mpi=pmix`
# fails with "can not load PMIx library". The one symlink libpmix-dev would add is enough.
ensure_pmix_link() {
  local dir lib
  for dir in /usr/lib/*/pmix2/lib; do
    [ -d "$dir" ] || continue
    lib="$dir/libpmix.so"
    [ -e "$lib" ] && return 0
    if [ "$(id -u)" = 0 ]; then
      ln -s libpmix.so.2 "$lib"
      log "linked $lib -> libpmix.so.2 (what libpmix-dev provides) so srun --mpi=pmix works"
    else
      log "warning: $lib is missing: srun --mpi=pmix will fail; run: sudo ln -s libpmix.so.2 $lib"
    fi
    return 0
  done
}

# --- config ----------------------------------------------------------------------------------
write_config() {
  mkdir -p "$STATE"/{etc,munge,ctld,spool,log,run}
  # munged wants its socket directory searchable by all (clients connect to the socket); the key
  # file itself is 0400.
  chmod 755 "$STATE/munge"
  if [ ! -s "$STATE/munge/munge.key" ]; then
    # A private key for this cluster only (never the system's /etc/munge/munge.key).
    if command -v mungekey >/dev/null; then
      mungekey --create --keyfile="$STATE/munge/munge.key" --force
    else
      dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
    fi
    chmod 400 "$STATE/munge/munge.key"
  fi
  local ncpu cpus mem user
  ncpu="$(nproc)"
  cpus="${HPC_SLURM_DEV_CPUS:-$(( ncpu * 2 > 8 ? ncpu * 2 : 8 ))}"
  mem="$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)"
  user="$(id -un)"
  cat > "$CONF.tmp" <<EOF
# Written by slurm/dev-cluster.sh; regenerated on every \`up\`. Single node, no accounting database.
ClusterName=hpcdev
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's restart (Slurm waits cred_expire+1 s): 10 s instead
# of the default 120 s keeps the preemption tests short.
AuthInfo=socket=$STATE/munge/munge.socket,cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
# Memory is not a consumable resource here: --mem is checked against the node, not reserved.
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
# No slurmdbd: no accounting. sacct then reports "accounting storage is disabled"; hpc.launch
# falls back to squeue/scontrol for job states (MinJobAge keeps finished jobs visible there).
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=3600
JobRequeue=1
ReturnToService=2
ScronParameters=enable
# The node declares more CPUs than it has (see HPC_SLURM_DEV_CPUS); config_overrides makes
# slurmd accept that instead of draining the node.
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
# Look at pending jobs every 2 s instead of every 60/30 s: a requeued or dependent job starts as
# soon as it may (costs a scheduling pass every 2 s, nothing with a handful of jobs).
SchedulerParameters=sched_interval=2,bf_interval=2
KillWait=5
InactiveLimit=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$CONF.tmp" "$CONF"
  printf 'export SLURM_CONF=%q\n' "$CONF" > "$STATE/env.sh"
  if [ "$(id -u)" = 0 ]; then
    if [ -L "$ETC_LINK" ] && [ "$(readlink "$ETC_LINK")" = "$CONF" ]; then
      :
    elif [ ! -e "$ETC_LINK" ] && [ ! -L "$ETC_LINK" ]; then
      mkdir -p "$(dirname "$ETC_LINK")"
      ln -s "$CONF" "$ETC_LINK"
      log "linked $ETC_LINK -> $CONF (removed by \`down\`)"
    else
      log "$ETC_LINK exists and is not ours: point clients here with: source $STATE/env.sh"
    fi
  fi
}

# --- daemons ---------------------------------------------------------------------------------
logs_tail() {
  local f
  for f in "$STATE/munge/munged.log" "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log"; do
    [ -f "$f" ] && { printf -- '--- tail %s\n' "$f" >&2; tail -n 15 "$f" >&2; }
  done
  return 0
}

node_state() { SLURM_CONF="$CONF" sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -n1 | tr -d ' '; }

start_daemons() {
  export SLURM_CONF="$CONF"
  if [ -z "$(pid_of munged)" ]; then
    rm -f "$STATE/munge/munge.socket" "$STATE/munge/munge.socket.lock"
    # --force: the state directory may live on a filesystem whose permissions munged distrusts
    # (a group-writable home, a container overlay); the key itself is private (0400).
    munged --force --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.socket" \
      --pid-file="$STATE/run/munged.pid" --log-file="$STATE/munge/munged.log" \
      --seed-file="$STATE/munge/munged.seed" \
      || { logs_tail; die "munged failed to start"; }
    log "munged started (pid $(pid_of munged))"
  fi
  if [ -z "$(pid_of slurmctld)" ]; then
    # The pid-file check needs our path on the daemon's command line: pass -f explicitly.
    slurmctld -f "$CONF" || { logs_tail; die "slurmctld failed to start"; }
    log "slurmctld started"
  fi
  if [ -z "$(pid_of slurmd)" ]; then
    slurmd -f "$CONF" -N "$NODE" || { logs_tail; die "slurmd failed to start"; }
    log "slurmd started"
  fi
}

wait_idle() {
  local deadline=$((SECONDS + TIMEOUT)) state="" resumed=0
  while [ "$SECONDS" -lt "$deadline" ]; do
    state="$(node_state || true)"
    case "$state" in
      idle|mixed|allocated|completing) log "node $NODE is $state (partition $PARTITION)"; return 0 ;;
      down*|drain*|fail*)
        # A node left down by an unclean stop (ReturnToService cannot clear every reason).
        if [ "$resumed" = 0 ]; then
          SLURM_CONF="$CONF" scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
          resumed=1
        fi ;;
    esac
    sleep 1
  done
  logs_tail
  die "node $NODE did not become idle within ${TIMEOUT}s (last state: '${state:-no answer from slurmctld}'); logs above, all in $STATE/log and $STATE/munge; run 'slurm/dev-cluster.sh down' to stop what did start"
}

up() {
  install_packages
  ensure_pmix_link
  for d in munged slurmctld slurmd; do
    [ -n "$(pid_of $d)" ] || break
    # Already running: leave the daemons (and their jobs) alone, just check the node.
    [ "$d" = slurmd ] && { wait_idle; print_env_hint; return 0; }
  done
  write_config
  start_daemons
  wait_idle
  print_env_hint
}

print_env_hint() {
  if ! [ -L "$ETC_LINK" ] || [ "$(readlink "$ETC_LINK")" != "$CONF" ]; then
    log "clients need: export SLURM_CONF=$CONF   (or: source $STATE/env.sh)"
  fi
}

stop_pid() {  # stop_pid NAME: TERM, wait up to 10 s, then KILL
  local name="$1" pid i
  pid="$(pid_of "$name")"
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 50); do
    [ -d "/proc/$pid" ] || break
    sleep 0.2
  done
  if [ -d "/proc/$pid" ]; then
    log "$name (pid $pid) ignored SIGTERM for 10 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$STATE/run/$name.pid"
  log "stopped $name (pid $pid)"
}

down() {
  if [ -n "$(pid_of slurmctld)" ]; then
    # Cancel this cluster's jobs first so no slurmstepd outlives its slurmd.
    local jobs
    jobs="$(SLURM_CONF="$CONF" squeue -h -o %i 2>/dev/null || true)"
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086
      SLURM_CONF="$CONF" scancel $jobs 2>/dev/null || true
      sleep 2
    fi
  fi
  stop_pid slurmd
  stop_pid slurmctld
  stop_pid munged
  if [ -L "$ETC_LINK" ] && [ "$(readlink "$ETC_LINK")" = "$CONF" ]; then
    rm -f "$ETC_LINK"
  fi
}

status() {
  local d pid rc=0
  for d in munged slurmctld slurmd; do
    pid="$(pid_of $d)"
    if [ -n "$pid" ]; then echo "$d: running (pid $pid)"; else echo "$d: stopped"; rc=3; fi
  done
  echo "config: $CONF"
  if [ "$rc" = 0 ]; then
    SLURM_CONF="$CONF" sinfo || rc=3
    SLURM_CONF="$CONF" squeue || rc=3
  fi
  return "$rc"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  env) printf 'export SLURM_CONF=%q\n' "$CONF" ;;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
