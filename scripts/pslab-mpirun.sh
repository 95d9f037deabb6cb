#!/usr/bin/env bash
# Runs a pslab job under an MPI launcher, one pslab process per rank with
# `pslab node --role auto`: rank 0 is the manager, the next S ranks servers,
# the rest workers. The job secret is made once here and handed to every rank
# through the launcher's environment.
#   scripts/pslab-mpirun.sh [--mpi openmpi|mpich] [-n RANKS] [--servers S] [--port P] [-- NODE_FLAGS...]
# e.g. scripts/pslab-mpirun.sh -n 6 --servers 2 -- --app check --shards 1 --no-pin
# Defaults: Open MPI, 6 ranks, 2 servers, port 7070, on this host (several
# hosts: give -- --manager HOST:PORT --listen 0.0.0.0:PORT and a hostfile
# through PS_MPIRUN_ARGS).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mpi=openmpi ranks=6 servers=2 port=7070
while [ $# -gt 0 ]; do
  case $1 in
    --mpi) mpi=$2; shift 2 ;;
    -n) ranks=$2; shift 2 ;;
    --servers) servers=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "pslab-mpirun: unknown option $1 (flags for pslab node go after --)" >&2; exit 2 ;;
  esac
done
pslab=${PSLAB:-$here/../target/release/pslab}
[ -x "$pslab" ] || { echo "pslab-mpirun: no $pslab: cargo build --release first (or set PSLAB)" >&2; exit 2; }
export PS_JOB_SECRET=${PS_JOB_SECRET:-$("$pslab" secret)}
node=("$pslab" node --role auto --servers "$servers" --listen "127.0.0.1:$port" "$@")
extra=()
read -r -a extra <<<"${PS_MPIRUN_ARGS:-}"
case $mpi in
  openmpi)
    command -v mpirun.openmpi >/dev/null || "$here"/apt-need.sh openmpi-bin
    # as root Open MPI wants to be told; more ranks than cores wants --oversubscribe
    root=()
    [ "$(id -u)" -eq 0 ] && root=(--allow-run-as-root)
    exec mpirun.openmpi "${root[@]}" --oversubscribe -n "$ranks" -x PS_JOB_SECRET -x RUST_LOG "${extra[@]}" "${node[@]}" ;;
  mpich)
    command -v mpiexec.mpich >/dev/null || "$here"/apt-need.sh mpich
    exec mpiexec.mpich -n "$ranks" -genv PS_JOB_SECRET "$PS_JOB_SECRET" "${extra[@]}" "${node[@]}" ;;
  *) echo "pslab-mpirun: --mpi is openmpi or mpich, not $mpi" >&2; exit 2 ;;
esac
