#!/usr/bin/env bash
# A single-node Slurm cluster on localhost for the tests (as root; Debian's slurm-wlm and
# munge): slurm.conf and cgroup.conf beside this script, the node sized to this machine.
# Idempotent: a cluster that answers is left as it is. Falls back to Slurm without cgroups where
# the kernel's cgroup layout does not suit the cgroup/v1 plugin.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if sinfo -h -o %a 2>/dev/null | grep -q up && srun -n1 true 2>/dev/null; then
  exit 0
fi
mkdir -p /etc/slurm /run/munge /run/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
chown munge:munge /run/munge
chown slurm:slurm /run/slurm /var/spool/slurmctld /var/log/slurm
cpus=$(nproc)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
conf() {
  sed -e "s/^NodeName=.*/NodeName=localhost CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN/" "$here/slurm.conf"
}
stop() {
  for f in /run/slurm/slurmd.pid /run/slurm/slurmctld.pid; do
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
  done
  sleep 1
}
up() {
  slurmctld
  slurmd -N localhost
  for _ in $(seq 100); do
    if srun -n1 true 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  return 1
}
pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged
if [ "$(stat -fc %T /sys/fs/cgroup)" != cgroup2fs ]; then
  conf > /etc/slurm/slurm.conf
  cp "$here/cgroup.conf" /etc/slurm/cgroup.conf
  if up; then exit 0; fi
  echo "Slurm with cgroup/v1 did not come up; trying without cgroups" >&2
  stop
fi
conf | sed -e 's|^ProctrackType=.*|ProctrackType=proctrack/linuxproc|' \
  -e 's|^TaskPlugin=.*|TaskPlugin=task/affinity|' > /etc/slurm/slurm.conf
rm -f /etc/slurm/cgroup.conf
up || { tail -20 /var/log/slurm/slurmd.log /var/log/slurm/slurmctld.log >&2; exit 1; }
