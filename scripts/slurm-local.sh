#!/usr/bin/env bash
# A one-node Slurm on this machine, for trying and testing pslab under srun and
# sbatch: slurmctld and slurmd in the background with a throw-away config
# (no systemd, no munge: auth/none), as ../shared/notes/launchers.md records.
#   eval "$(scripts/slurm-local.sh start [DIR])"   # prints export SLURM_CONF=...; waits until idle
#   scripts/slurm-local.sh stop [DIR]
# DIR (default /tmp/pslab-slurm) holds the config, state, logs and pids.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cmd=${1:-start}
dir=${2:-/tmp/pslab-slurm}
stop() {
  for d in slurmd slurmctld; do
    if [ -f "$dir/$d.pid" ]; then
      kill "$(cat "$dir/$d.pid")" 2>/dev/null || true
      rm -f "$dir/$d.pid"
    fi
  done
}
case $cmd in
  stop) stop; exit 0 ;;
  start) ;;
  *) echo "slurm-local: start or stop, not $cmd" >&2; exit 2 ;;
esac
command -v slurmctld >/dev/null || "$here"/apt-need.sh slurm-wlm >&2
stop
mkdir -p "$dir/state" "$dir/spool"
host=$(hostname -s)
cpus=${PS_SLURM_CPUS:-8}
cat >"$dir/slurm.conf" <<CONF
ClusterName=pslab
SlurmctldHost=$host(127.0.0.1)
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$dir/slurm.conf
setsid slurmctld -D -f "$SLURM_CONF" >"$dir/slurmctld.out" 2>&1 < /dev/null &
echo $! >"$dir/slurmctld.pid"
setsid slurmd -D -f "$SLURM_CONF" >"$dir/slurmd.out" 2>&1 < /dev/null &
echo $! >"$dir/slurmd.pid"
for _ in $(seq 1 100); do
  state=$(sinfo -h -o %t 2>/dev/null || true)
  [ "$state" = idle ] && { echo "export SLURM_CONF=$SLURM_CONF"; exit 0; }
  sleep 0.2
done
echo "slurm-local: the node did not come up (state: ${state:-none}); logs in $dir" >&2
tail -5 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
stop
exit 1
