#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for the `slurm` tests (tests/test_slurm.py) and CI.
#   bash scripts/slurm_cluster.sh start   # install Debian's slurm-wlm (+ MariaDB for accounting) if missing, start
#   bash scripts/slurm_cluster.sh stop    # cancel jobs, stop every daemon it started, by PID; nothing left running
# State lives in $SLURM_BASE (default /tmp/runner-slurm); export SLURM_CONF=$SLURM_BASE/etc/slurm.conf to use it.
# Accounting (slurmdbd) is on because submitit polls job states with sacct. Needs root (apt, munge, daemons).
set -euo pipefail
B=${SLURM_BASE:-/tmp/runner-slurm}
export SLURM_CONF=$B/etc/slurm.conf
NODE=$(hostname -s)

wait_for() {  # wait_for SECONDS CMD...: until CMD succeeds
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { echo "slurm_cluster: timed out waiting for: $*" >&2; exit 1; }
    sleep 0.2
  done
}
daemon() {  # daemon NAME CMD...: start in the background, remember its PID
  "${@:2}" >"$B/log/$1.out" 2>&1 &
  echo $! >"$B/pids/$1.pid"
}

start() {
  mkdir -p "$B"/{etc,state,spool,log,pids,db}
  local packages="munge slurmctld slurmd slurm-client slurmdbd mariadb-server mariadb-client" missing=""
  for p in $packages; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >"$B/log/apt.log" 2>&1
  fi
  for name in munged mariadbd slurmdbd slurmctld slurmd; do
    if [ -f "$B/pids/$name.pid" ] && kill -0 "$(cat "$B/pids/$name.pid")" 2>/dev/null; then
      echo "slurm_cluster: $name is running already (stop first)" >&2; exit 1
    fi
  done

  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
  mkdir -p /run/munge && chown munge:munge /run/munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
  daemon munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F
  wait_for 20 sh -c 'munge -n | unmunge'

  local sock=$B/db/mysql.sock
  chown mysql:mysql "$B/db"
  [ -d "$B/db/mysql" ] || mariadb-install-db --user=mysql --datadir="$B/db" --skip-test-db >"$B/log/dbinit.log" 2>&1
  daemon mariadbd /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$B/db" --socket="$sock" \
    --bind-address=127.0.0.1 --port=3306 --innodb-buffer-pool-size=128M
  wait_for 60 mariadb --socket="$sock" -uroot -e 'select 1'
  mariadb --socket="$sock" -uroot -e "CREATE USER IF NOT EXISTS slurm@'127.0.0.1' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO slurm@'127.0.0.1'"
  cat >"$B/etc/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
LogFile=$B/log/slurmdbd.log
PidFile=$B/state/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StorageUser=slurm
StoragePass=slurm
CONF
  chmod 600 "$B/etc/slurmdbd.conf"
  cat >"$SLURM_CONF" <<CONF
ClusterName=runner
SlurmctldHost=$NODE
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
JobRequeue=1
ReturnToService=2
KillWait=5
StateSaveLocation=$B/state
SlurmdSpoolDir=$B/spool
SlurmctldPidFile=$B/state/slurmctld.pid
SlurmdPidFile=$B/spool/slurmd.pid
SlurmctldLogFile=$B/log/slurmctld.log
SlurmdLogFile=$B/log/slurmd.log
NodeName=$NODE CPUs=$(nproc) RealMemory=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1200 )) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  daemon slurmdbd /usr/sbin/slurmdbd -D   # reads the slurmdbd.conf beside $SLURM_CONF
  wait_for 60 sacctmgr -n list cluster
  sacctmgr -i add cluster runner >/dev/null 2>&1 || true
  daemon slurmctld /usr/sbin/slurmctld -D -f "$SLURM_CONF"
  wait_for 60 scontrol ping
  daemon slurmd /usr/sbin/slurmd -D -f "$SLURM_CONF"
  wait_for 120 sh -c "sinfo -h -n $NODE -o %T | grep -qx idle"
  echo "slurm_cluster: up; export SLURM_CONF=$SLURM_CONF"
}

stop() {
  if [ -f "$B/pids/slurmctld.pid" ] && kill -0 "$(cat "$B/pids/slurmctld.pid")" 2>/dev/null; then
    local jobs; jobs=$(squeue -h -o %A 2>/dev/null | sort -u || true)
    if [ -n "$jobs" ]; then scancel $jobs || true; wait_for 60 sh -c '[ -z "$(squeue -h)" ]' || true; fi
  fi
  for name in slurmd slurmctld slurmdbd mariadbd munged; do
    local f="$B/pids/$name.pid"
    [ -f "$f" ] || continue
    local pid; pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$f"
  done
  echo "slurm_cluster: stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
