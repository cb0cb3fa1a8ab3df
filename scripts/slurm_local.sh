#!/usr/bin/env bash
# Start (or stop) a single-node SLURM cluster on this machine for the integration tests.
#
#   scripts/slurm_local.sh start DIR   install slurm-wlm + munge when missing (root + apt only), write
#                                      DIR/slurm.conf for this host, start munged, slurmctld, slurmd;
#                                      prints SLURM_CONF=DIR/slurm.conf on success.
#   scripts/slurm_local.sh stop DIR    stop the daemons started from DIR (by their pid files).
#   scripts/slurm_local.sh install     only install the packages when missing (CI; ~30 s with apt).
#
# Everything lives under DIR (state, logs, pid files, the munge socket); nothing system-wide is
# configured except the packages themselves. Exit status 3 means SLURM cannot be had here.
set -euo pipefail
action=${1:?start|stop|install}

stop() {
    for name in slurmd slurmctld munged; do
        if [[ -f "$dir/$name.pid" ]]; then
            pid=$(cat "$dir/$name.pid")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            rm -f "$dir/$name.pid"
        fi
    done
}

install() {
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        echo "installing slurm-wlm and munge (apt)" >&2
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge) >&2 \
            || { echo "apt-get install slurm-wlm munge failed" >&2; exit 3; }
    else
        echo "slurm-wlm/munge are not installed and cannot be installed (needs root and apt-get)" >&2
        exit 3
    fi
fi
}

if [[ $action == install ]]; then install; exit 0; fi
dir=$(mkdir -p "${2:?DIR}" && cd "$2" && pwd)
if [[ $action == stop ]]; then stop; exit 0; fi
install

host=$(hostname -s)
cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # GNU nproc obeys OMP_NUM_THREADS (set per stage by milotile)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
user=$(id -un)
mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/munge"
chmod 700 "$dir/munge"

# munge: a private key and socket under DIR
if [[ ! -f "$dir/munge/munge.key" ]]; then
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$dir/munge/munge.key"
fi
sock="$dir/munge/munge.socket"
munged --key-file="$dir/munge/munge.key" --socket="$sock" --pid-file="$dir/munged.pid" \
       --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed" --force 2>>"$dir/log/munged.err" \
    || { echo "munged failed to start (see $dir/log)" >&2; exit 3; }

cat > "$dir/slurm.conf" <<CONF
ClusterName=milotile-test
SlurmctldHost=$host
SlurmUser=$user
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$sock
CredType=cred/munge
SlurmctldPort=$(( 16817 + RANDOM % 200 ))
SlurmdPort=$(( 17218 + RANDOM % 200 ))
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF

export SLURM_CONF="$dir/slurm.conf"
slurmctld -f "$SLURM_CONF" 2>>"$dir/log/slurmctld.err" || { echo "slurmctld failed (see $dir/log)" >&2; stop; exit 3; }
slurmd -f "$SLURM_CONF" 2>>"$dir/log/slurmd.err" || { echo "slurmd failed (see $dir/log)" >&2; stop; exit 3; }
for _ in $(seq 100); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
        echo "SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 0.2
done
echo "SLURM node did not become idle: $(sinfo -h 2>&1 | head -3)" >&2
stop
exit 3
