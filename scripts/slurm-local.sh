#!/usr/bin/env bash
# A one-node Slurm on this machine, for trying and testing pslab under srun and
# sbatch: slurmctld and slurmd in the background with a throw-away config
# (no systemd, no munge: auth/none), as ../shared/notes/launchers.md records.
#   eval "$(scripts/slurm-local.sh start [DIR])"   # prints export SLURM_CONF=...; waits until idle
#   scripts/slurm-local.sh stop [DIR]
# DIR (default /tmp/pslab-slurm) holds the config, state, logs and pids.
# PS_SLURM_NODES=N (N > 1) emulates N nodes n1..nN on this machine (Slurm's
# multiple-slurmd mode: one slurmd per node, all on 127.0.0.1), so srun -N3
# gives a real multi-node host list (n[1-3], SLURM_TASKS_PER_NODE=2(x2),1).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cmd=${1:-start}
dir=${2:-/tmp/pslab-slurm}
stop() {
  local pids=()
  for f in "$dir"/slurmd*.pid "$dir"/slurmctld.pid; do
    if [ -f "$f" ]; then
      pids+=("$(cat "$f")")
      kill "${pids[-1]}" 2>/dev/null || true
      rm -f "$f"
    fi
  done
  # gone before we return, so a Slurm started next can take the ports
  for _ in $(seq 1 50); do
    local alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && return 0
    sleep 0.1
  done
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
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
nodes=${PS_SLURM_NODES:-1}
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
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
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
CONF
if [ "$nodes" -gt 1 ]; then
  names="n[1-$nodes]"
  echo "NodeName=$names NodeHostname=$host NodeAddr=127.0.0.1 Port=[17001-$((17000 + nodes))] CPUs=$cpus RealMemory=4000 State=UNKNOWN" >>"$dir/slurm.conf"
else
  names=$host
  echo "NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=4000 State=UNKNOWN" >>"$dir/slurm.conf"
fi
echo "PartitionName=debug Nodes=$names Default=YES MaxTime=INFINITE State=UP" >>"$dir/slurm.conf"
for n in $(if [ "$nodes" -gt 1 ]; then seq -f "n%g" 1 "$nodes"; else echo "$host"; fi); do
  mkdir -p "$dir/spool/$n"
done
export SLURM_CONF=$dir/slurm.conf
setsid slurmctld -D -f "$SLURM_CONF" >"$dir/slurmctld.out" 2>&1 < /dev/null &
echo $! >"$dir/slurmctld.pid"
if [ "$nodes" -gt 1 ]; then
  for i in $(seq 1 "$nodes"); do
    setsid slurmd -D -N "n$i" -f "$SLURM_CONF" >"$dir/slurmd-n$i.out" 2>&1 < /dev/null &
    echo $! >"$dir/slurmd-n$i.pid"
  done
else
  setsid slurmd -D -f "$SLURM_CONF" >"$dir/slurmd.out" 2>&1 < /dev/null &
  echo $! >"$dir/slurmd.pid"
fi
for _ in $(seq 1 100); do
  state=$(sinfo -h -o %t 2>/dev/null | sort -u | tr -d '\n' || true)
  [ "$state" = idle ] && { echo "export SLURM_CONF=$SLURM_CONF"; exit 0; }
  sleep 0.2
done
echo "slurm-local: the node did not come up (state: ${state:-none}); logs in $dir" >&2
tail -5 "$dir"/slurmctld.log "$dir"/slurmd*.log >&2 || true
stop
exit 1
