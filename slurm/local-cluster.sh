#!/usr/bin/env bash
# A private single-host SLURM cluster, to try slurm/train.sbatch on a laptop and for the tests.
#
#   slurm/local-cluster.sh start     # prints the line to export, e.g. SLURM_CONF=...
#   export SLURM_CONF=/tmp/dist-w2v-slurm/slurm.conf
#   sbatch slurm/train.sbatch --config configs/ptb.yaml --run-dir runs/try
#   slurm/local-cluster.sh stop
#
# Needs SLURM and MUNGE installed (Debian/Ubuntu: apt-get install slurm-wlm munge) and is meant to
# run as root (slurmd starts jobs as their owner). It uses none of the system's files: its own
# munge key and socket, its own slurm.conf, state, spool, logs and PID files, all in
# $DIST_W2V_SLURM_DIR (default ${TMPDIR:-/tmp}/dist-w2v-slurm), and free TCP ports, so it runs
# beside a real installation. One node named localhost with this machine's CPUs, one default
# partition, requeue allowed. `stop` ends the daemons it started, by the PIDs in their files.
# Knobs: DIST_W2V_SLURM_DIR; DIST_W2V_SLURM_REQUEUE_DELAY (seconds a requeued job waits before
# it may start again; SLURM's AuthInfo cred_expire, default 120, at least 5 s).
set -euo pipefail

DIR="${DIST_W2V_SLURM_DIR:-${TMPDIR:-/tmp}/dist-w2v-slurm}"
REQUEUE_DELAY="${DIST_W2V_SLURM_REQUEUE_DELAY:-120}"
CONF="$DIR/slurm.conf"
DAEMONS=(slurmd slurmctld munged)  # stopped in this order

say() { echo "local-cluster: $*" >&2; }

# A TCP port nothing listens on now (the kernel picks it).
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

running() {  # running NAME: its PID file names a live process
  local pid_file="$DIR/run/$1.pid"
  [[ -s "$pid_file" ]] && kill -0 "$(<"$pid_file")" 2>/dev/null
}

write_conf() {
  local user
  user=$(id -un)
  cat > "$CONF" <<EOF
# Written by slurm/local-cluster.sh: one node (this host), one partition.
ClusterName=dist-w2v-local
SlurmctldHost=localhost
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=$user
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=$REQUEUE_DELAY
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
JobRequeue=1
ReturnToService=2
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
KillWait=10
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  local m="$DIR/munge"
  mkdir -p "$m"
  chmod 700 "$m"
  if [[ ! -s "$m/munge.key" ]]; then
    head -c 1024 /dev/urandom > "$m/munge.key"
    chmod 400 "$m/munge.key"
  fi
  munged --force --socket="$m/munge.socket" --key-file="$m/munge.key" \
    --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$m/munged.seed"
}

wait_until() {  # wait_until SECONDS WHAT COMMAND...
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      say "$what did not happen within the time allowed; logs in $DIR/log"
      return 1
    fi
    sleep 0.5
  done
}

node_idle() {
  [[ "$(SLURM_CONF="$CONF" sinfo --noheader --nodes=localhost --format=%t)" == idle ]]
}

start() {
  local name
  for name in "${DAEMONS[@]}"; do
    if running "$name"; then
      say "$name is already running in $DIR; run '$0 stop' first"
      exit 1
    fi
  done
  for tool in munged slurmctld slurmd sinfo python3; do
    command -v "$tool" >/dev/null || { say "$tool not found: install slurm-wlm and munge"; exit 1; }
  done
  rm -rf "$DIR/state" "$DIR/spool" "$DIR/run" "$DIR/log"
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/run" "$DIR/log"
  write_conf
  start_munge
  wait_until 10 "munged start" test -S "$DIR/munge/munge.socket"
  SLURM_CONF="$CONF" slurmctld -i -f "$CONF"
  SLURM_CONF="$CONF" slurmd -f "$CONF" -N localhost
  wait_until 60 "node localhost becoming idle" node_idle
  say "running; state and logs in $DIR"
  echo "export SLURM_CONF=$CONF"
}

stop() {
  local name pid pid_file stopped=()
  for name in "${DAEMONS[@]}"; do
    pid_file="$DIR/run/$name.pid"
    if running "$name"; then
      pid=$(<"$pid_file")
      kill -TERM "$pid"
      stopped+=("$pid")
    fi
  done
  for pid in "${stopped[@]}"; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; fi
  done
  say "stopped ${#stopped[@]} daemon(s) of $DIR"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop   (state in \$DIST_W2V_SLURM_DIR, default $DIR)" >&2; exit 2 ;;
esac
