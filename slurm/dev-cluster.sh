#!/usr/bin/env bash
# A real Slurm cluster on one host for development and CI: munged + slurmctld + one slurmd per node,
# started by hand. One node (named after the host) or N nodes n1..nN (one slurmd each, all on
# 127.0.0.1 with their own port, spool, pid and log: what a multi-node job needs to be tested here).
#
#   slurm/dev-cluster.sh up [--nodes N]
#                                 install the packages if missing (root only), write the config,
#                                 start the daemons, wait until every node is idle (idempotent).
#                                 Without --nodes: the node count of the existing config (else
#                                 HPC_SLURM_DEV_NODES, else 1). A running cluster with another count
#                                 is reconfigured (refused while it runs jobs).
#   slurm/dev-cluster.sh down     cancel the cluster's jobs and stop exactly the daemons `up` started
#   slurm/dev-cluster.sh status   daemons, node states and queue
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
#   HPC_SLURM_DEV_NODES      node count when neither --nodes nor an existing config says (default 1)
#   HPC_SLURM_DEV_CPUS       CPUs each node declares (default: max(8, 2*nproc)). More than the real
#                            cores on purpose: a 4-task test job fits on a 2-core machine and two
#                            test jobs run side by side instead of queueing (costs: oversubscribed
#                            cores when they do).
#   HPC_SLURM_DEV_PORT       slurmctld port (default 6817); node i's slurmd uses PORT+i
#   HPC_SLURM_DEV_PARTITION  partition name (default: debug)
#   HPC_SLURM_DEV_TIMEOUT    seconds to wait for the nodes to become idle (default 60)
#   HPC_SLURM_DEV_SLURMD_DEBUG  slurmd log level (default info; debug shows e.g. the PMIx plugin's steps)
#
# Several nodes on one host: each slurmd gets its own port (NodeName ... Port=), and %n (the node
# name) in SlurmdSpoolDir, SlurmdPidFile, SlurmdLogFile and TmpFS. TmpFS matters for
# `srun --mpi=pmix`: the PMIx plugin of every node's slurmstepd creates <TmpFS>/spmix_appdir_<uid>_<job>.<step>
# with an exclusive mkdir; with one shared /tmp the second node's fails ("File exists") and the step
# aborts (docs/slurm.md, "Two nodes on one host").
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${HPC_SLURM_DEV_DIR:-$REPO/.slurm-dev}"
CONF="$STATE/etc/slurm.conf"
PORT="${HPC_SLURM_DEV_PORT:-6817}"
PARTITION="${HPC_SLURM_DEV_PARTITION:-debug}"
TIMEOUT="${HPC_SLURM_DEV_TIMEOUT:-60}"
HOST="$(hostname -s)"
ETC_LINK=/etc/slurm/slurm.conf
PACKAGES=(slurmctld slurmd slurm-client munge libpmix2)
MAX_NODES=16

log() { printf '[dev-cluster] %s\n' "$*" >&2; }
die() { printf '[dev-cluster] error: %s\n' "$*" >&2; exit 1; }
usage() { echo "usage: $0 up [--nodes N] | down | status | env" >&2; exit 2; }

# --- nodes -----------------------------------------------------------------------------------
# One node is named after the host (what the one-node cluster always was); N > 1 nodes are n1..nN.
# They are names only: every slurmd listens on 127.0.0.1 (NodeAddr), so nothing needs to resolve
# them (jobs that need a node's address ask Slurm, see hpc/dist/world.py).
node_names() { if [ "$1" = 1 ]; then echo "$HOST"; else seq -f 'n%g' 1 "$1"; fi; }

conf_nodes() {  # the nodes of the config on disk, one per line (nothing without a config)
  [ -f "$CONF" ] || return 0
  sed -n 's/^NodeName=\([^ ]*\) .*/\1/p' "$CONF"
}

check_count() {
  case "$1" in
    ''|*[!0-9]*) log "--nodes '$1': expected a whole number of nodes from 1 to $MAX_NODES"; usage ;;
  esac
  if [ "$1" -lt 1 ] || [ "$1" -gt "$MAX_NODES" ]; then
    log "--nodes $1: expected a whole number of nodes from 1 to $MAX_NODES"; usage
  fi
}

# --- pids ------------------------------------------------------------------------------------
# A pid counts as ours only if it is alive and its command line names our daemon and our state
# directory (and, for a slurmd, its node): a stale pid file never makes us signal an unrelated
# process.
pid_in() {  # pid_in FILE NAME [NODE] -> prints the pid of our running daemon, or nothing
  local file="$1" name="$2" node="${3:-}" pid cmd
  [ -f "$file" ] || return 0
  pid="$(tr -dc 0-9 < "$file")"
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 0
  cmd="$(tr '\0' ' ' < "/proc/$pid/cmdline")"
  case "$cmd" in
    *"$name"*"$STATE/"*) ;;
    *) return 0 ;;
  esac
  if [ -n "$node" ]; then
    case "$cmd" in *" -N $node "*) ;; *) return 0 ;; esac
  fi
  echo "$pid"
}
pid_of() { pid_in "$STATE/run/$1.pid" "$1"; }                  # munged, slurmctld
slurmd_pid() { pid_in "$STATE/run/slurmd-$1.pid" slurmd "$1"; }  # slurmd of node $1 (SlurmdPidFile %n)

all_running() {  # munged, slurmctld and the slurmd of every configured node
  local n nodes
  [ -n "$(pid_of munged)" ] && [ -n "$(pid_of slurmctld)" ] || return 1
  nodes="$(conf_nodes)"
  [ -n "$nodes" ] || return 1
  for n in $nodes; do [ -n "$(slurmd_pid "$n")" ] || return 1; done
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
write_config() {  # write_config N
  local count="$1" node i nodes=() ncpu cpus mem user
  mapfile -t nodes < <(node_names "$count")
  mkdir -p "$STATE"/{etc,munge,ctld,spool,log,run,tmp}
  for node in "${nodes[@]}"; do mkdir -p "$STATE/spool/$node" "$STATE/tmp/$node"; done
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
  ncpu="$(nproc)"
  cpus="${HPC_SLURM_DEV_CPUS:-$(( ncpu * 2 > 8 ? ncpu * 2 : 8 ))}"
  mem="$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)"
  user="$(id -un)"
  {
  cat <<EOC
# Written by slurm/dev-cluster.sh; regenerated on every \`up\`. $count node(s) on this one host, no
# accounting database.
ClusterName=hpcdev
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT
# Every node has its own port (Port= below); this is the default for none.
SlurmdPort=$((PORT + 1))
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's restart (Slurm waits cred_expire+1 s): 10 s instead
# of the default 120 s keeps the preemption tests short.
AuthInfo=socket=$STATE/munge/munge.socket,cred_expire=10
StateSaveLocation=$STATE/ctld
# %n is the node name: each slurmd (and its job steps) has its own spool, pid file and log. The
# spool also holds the PMIx plugin's per-step socket and server directory (stepd.slurm.pmix.J.S,
# pmix.J.S/), which two slurmstepds of one step on one host must not share.
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
# Per node too: the PMIx plugin puts its clients' directories (spmix_appdir_*) under TmpFS.
TmpFS=$STATE/tmp/%n
SlurmctldDebug=info
SlurmdDebug=${HPC_SLURM_DEV_SLURMD_DEBUG:-info}
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
EOC
  i=0
  for node in "${nodes[@]}"; do
    i=$((i + 1))
    echo "NodeName=$node NodeAddr=127.0.0.1 NodeHostname=$HOST Port=$((PORT + i)) CPUs=$cpus RealMemory=$mem State=UNKNOWN"
  done
  echo "PartitionName=$PARTITION Nodes=$(IFS=,; echo "${nodes[*]}") Default=YES MaxTime=INFINITE State=UP"
  } > "$CONF.tmp"
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
  for f in "$STATE/munge/munged.log" "$STATE/log/slurmctld.log" "$STATE"/log/slurmd-*.log; do
    [ -f "$f" ] && { printf -- '--- tail %s\n' "$f" >&2; tail -n 15 "$f" >&2; }
  done
  return 0
}

node_states() {  # "node state" lines for every node slurmctld knows
  SLURM_CONF="$CONF" sinfo -h -N -o '%N %T' 2>/dev/null | sort -u
}

start_daemons() {
  local node
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
  for node in $(conf_nodes); do
    if [ -z "$(slurmd_pid "$node")" ]; then
      # -N: which NodeName line this slurmd is (its port, spool, pid file and log follow from it).
      slurmd -f "$CONF" -N "$node" || { logs_tail; die "slurmd of node $node failed to start"; }
      log "slurmd of node $node started"
    fi
  done
}

wait_idle() {
  local deadline=$((SECONDS + TIMEOUT)) states="" node state resumed=0 ready want
  want="$(conf_nodes | tr '\n' ' ')"
  while [ "$SECONDS" -lt "$deadline" ]; do
    states="$(node_states || true)"
    ready=1
    for node in $want; do
      state="$(awk -v n="$node" '$1 == n {print $2}' <<<"$states")"
      case "$state" in
        idle|mixed|allocated|completing) ;;
        down*|drain*|fail*)
          ready=0
          # A node left down by an unclean stop (ReturnToService cannot clear every reason).
          if [ "$resumed" = 0 ]; then
            SLURM_CONF="$CONF" scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
          fi ;;
        *) ready=0 ;;
      esac
    done
    resumed=1
    if [ "$ready" = 1 ]; then
      log "nodes up (partition $PARTITION): $(awk -v w=" $want" 'index(w, " " $1 " ") {printf "%s %s; ", $1, $2}' <<<"$states")"
      return 0
    fi
    sleep 1
  done
  logs_tail
  die "not every node ($want) became idle within ${TIMEOUT}s (last states: '$(tr '\n' ';' <<<"${states:-no answer from slurmctld}")'); logs above, all in $STATE/log and $STATE/munge; run 'slurm/dev-cluster.sh down' to stop what did start"
}

refuse_if_busy() {  # refuse_if_busy WHAT: stop here while the cluster runs jobs
  local jobs
  jobs="$(SLURM_CONF="$CONF" squeue -h -t running,completing,configuring,suspended -o %i 2>/dev/null | xargs || true)"
  if [ -n "$jobs" ]; then
    die "$1 would kill the running job(s) $jobs; wait for them (squeue) or cancel them first"
  fi
}

stop_slurmds() {  # every slurmd of ours, whatever node: pid files run/slurmd-*.pid (and a legacy run/slurmd.pid)
  local f node
  for f in "$STATE"/run/slurmd-*.pid "$STATE/run/slurmd.pid"; do
    [ -f "$f" ] || continue
    node="$(basename "$f" .pid)"; node="${node#slurmd}"; node="${node#-}"
    stop_pid_file "$f" slurmd "slurmd${node:+ of node $node}"
  done
}

up() {
  local want="" have count
  while [ $# -gt 0 ]; do
    case "$1" in
      --nodes) [ $# -ge 2 ] || usage; want="$2"; shift 2 ;;
      --nodes=*) want="${1#--nodes=}"; shift ;;
      *) log "unknown option '$1'"; usage ;;
    esac
  done
  [ -z "$want" ] || check_count "$want"
  install_packages
  ensure_pmix_link
  if [ -n "$(pid_in "$STATE/run/slurmd.pid" slurmd)" ]; then
    # Started by an older dev-cluster.sh (one slurmd, shared spool/pid/log paths): restart it with
    # the per-node paths, or a second slurmd for the same node would be started next to it.
    refuse_if_busy "restarting the cluster with per-node paths"
    log "restarting slurmctld and slurmd with per-node paths"
    stop_slurmds
    stop_pid slurmctld
  fi
  have="$(conf_nodes | wc -l)"
  count="${want:-}"
  if [ -z "$count" ]; then
    if [ "$have" -gt 0 ]; then count="$have"; else count="${HPC_SLURM_DEV_NODES:-1}"; check_count "$count"; fi
  fi
  if [ "$count" = "$have" ] && all_running; then
    # Already running as asked: leave the daemons (and their jobs) alone, just check the nodes.
    wait_idle; print_env_hint; return 0
  fi
  if [ "$count" != "$have" ] && [ -n "$(pid_of slurmctld)" ]; then
    refuse_if_busy "changing the cluster from $have to $count node(s)"
    log "reconfiguring from $have to $count node(s): restarting slurmctld and the slurmds"
    stop_slurmds
    stop_pid slurmctld
  fi
  write_config "$count"
  start_daemons
  wait_idle
  print_env_hint
}

print_env_hint() {
  if ! [ -L "$ETC_LINK" ] || [ "$(readlink "$ETC_LINK")" != "$CONF" ]; then
    log "clients need: export SLURM_CONF=$CONF   (or: source $STATE/env.sh)"
  fi
}

stop_pid_file() {  # stop_pid_file FILE NAME LABEL: TERM, wait up to 10 s, then KILL
  local file="$1" name="$2" label="$3" pid i node=""
  case "$label" in *" of node "*) node="${label##* of node }" ;; esac
  pid="$(pid_in "$file" "$name" "$node")"
  if [ -n "$pid" ]; then
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do
      [ -d "/proc/$pid" ] || break
      sleep 0.2
    done
    if [ -d "/proc/$pid" ]; then
      log "$label (pid $pid) ignored SIGTERM for 10 s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    log "stopped $label (pid $pid)"
  fi
  rm -f "$file"
}
stop_pid() { stop_pid_file "$STATE/run/$1.pid" "$1" "$1"; }

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
  stop_slurmds
  stop_pid slurmctld
  stop_pid munged
  if [ -L "$ETC_LINK" ] && [ "$(readlink "$ETC_LINK")" = "$CONF" ]; then
    rm -f "$ETC_LINK"
  fi
}

status() {
  local d pid node rc=0
  for d in munged slurmctld; do
    pid="$(pid_of $d)"
    if [ -n "$pid" ]; then echo "$d: running (pid $pid)"; else echo "$d: stopped"; rc=3; fi
  done
  for node in $(conf_nodes); do
    pid="$(slurmd_pid "$node")"
    if [ -n "$pid" ]; then echo "slurmd: running (pid $pid) node $node"; else echo "slurmd: stopped node $node"; rc=3; fi
  done
  [ -n "$(conf_nodes)" ] || { echo "slurmd: stopped (no config yet)"; rc=3; }
  echo "config: $CONF"
  if [ "$rc" = 0 ]; then
    SLURM_CONF="$CONF" sinfo || rc=3
    SLURM_CONF="$CONF" squeue || rc=3
  fi
  return "$rc"
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  up) up "$@" ;;
  down) [ $# = 0 ] || usage; down ;;
  status) [ $# = 0 ] || usage; status ;;
  env) [ $# = 0 ] || usage; printf 'export SLURM_CONF=%q\n' "$CONF" ;;
  *) usage ;;
esac
