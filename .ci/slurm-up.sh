#!/usr/bin/env bash
# Bring up a real single-node SLURM (munged + slurmctld + slurmd) on Debian 12,
# as root, without systemd. Measured recipe: /work/shared/notes/slurm-single-node.md
# (cgroup-free, no accounting, one fake GPU). Stop it with .ci/slurm-down.sh.
# Its state, logs and pid files live in $SLURM_CI_DIR (default /tmp/slurm-ci).
set -euo pipefail
LAB=${SLURM_CI_DIR:-/tmp/slurm-ci}
HOST=$(hostname)
export DEBIAN_FRONTEND=noninteractive

if [ "$(id -u)" != 0 ]; then
  echo "slurm-up: must run as root (it writes /etc/slurm and starts daemons)" >&2
  exit 1
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v pgrep >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge procps >/dev/null
fi
if pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null; then
  echo "slurm-up: a slurmctld/slurmd is already running on this machine; not touching it" >&2
  exit 1
fi

# slurmctld and slurmd must be able to resolve the node name.
getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >> /etc/hosts
rm -rf "$LAB"
mkdir -p "$LAB"/{state,spool,log,run,etc-saved}

# slurm-down.sh puts /etc/slurm back as it was: a config left behind makes
# every later scontrol (and so every snakemake start, through the SLURM
# plugin) wait 10 s for a controller that is gone.
MARK="# written by .ci/slurm-up.sh"
for name in slurm.conf gres.conf; do
  if [ -e "/etc/slurm/$name" ] && ! grep -qxF "$MARK" "/etc/slurm/$name"; then
    cp -p "/etc/slurm/$name" "$LAB/etc-saved/$name"
  fi
done

cpus=$(nproc)
real_mb=$(( $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) * 85 / 100 ))
cat > /etc/slurm/slurm.conf <<CONF
$MARK
ClusterName=ci
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
MailProg=/bin/true
# No cgroups at all: works in containers and VMs without a writable cgroup fs.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# No slurmdbd: sacct fails, so snakemake must poll with squeue.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
# Without a default, a job with no --mem takes the whole node and jobs serialize.
DefMemPerCPU=1000
# Finished jobs stay visible to squeue for 5 min (snakemake's status source).
MinJobAge=300
ReturnToService=2
StateSaveLocation=$LAB/state
SlurmdSpoolDir=$LAB/spool
SlurmctldPidFile=$LAB/run/slurmctld.pid
SlurmdPidFile=$LAB/run/slurmd.pid
SlurmctldLogFile=$LAB/log/slurmctld.log
SlurmdLogFile=$LAB/log/slurmd.log
GresTypes=gpu
NodeName=$HOST CPUs=$cpus RealMemory=$real_mb Gres=gpu:1 State=UNKNOWN
PartitionName=debug Default=YES Nodes=ALL MaxTime=INFINITE State=UP
CONF

# One fake GPU backed by /dev/null, no autodetection (no NVML needed):
# `resources: gpu=1` becomes --gpus=1 and the job sees CUDA_VISIBLE_DEVICES=0.
cat > /etc/slurm/gres.conf <<CONF
$MARK
AutoDetect=off
NodeName=$HOST Name=gpu File=/dev/null
CONF

# The Debian postinst normally creates the munge key; create one if missing.
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
fi
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /run/munge/munged.pid ] || ! kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; then
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
  # Remember that this script started munged, so slurm-down.sh stops it.
  cp /run/munge/munged.pid "$LAB/run/munged.pid"
fi

slurmctld   # daemonizes and writes $LAB/run/slurmctld.pid
for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
slurmd      # daemonizes and writes $LAB/run/slurmd.pid
for _ in $(seq 150); do [ "$(sinfo -h -N -o %T 2>/dev/null)" = idle ] && break; sleep 0.2; done

sinfo -N -o '%N %T %c %m %G'
if [ "$(sinfo -h -N -o %T)" != idle ]; then
  echo "slurm-up: node did not become idle; logs in $LAB/log" >&2
  tail -n 20 "$LAB"/log/*.log >&2 || true
  exit 1
fi
