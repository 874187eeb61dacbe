#!/usr/bin/env bash
# Stop the daemons that .ci/slurm-up.sh started, by their pid files (never by name).
LAB=${SLURM_CI_DIR:-/tmp/slurm-ci}
for pidfile in "$LAB/run/slurmd.pid" "$LAB/run/slurmctld.pid" "$LAB/run/munged.pid"; do
  [ -s "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "slurm-down: $pid ($pidfile) still alive, killing" >&2
      kill -KILL "$pid" 2>/dev/null
    fi
    echo "slurm-down: stopped $(basename "$pidfile" .pid) ($pid)"
  fi
  rm -f "$pidfile"
done
# Put /etc/slurm back as slurm-up.sh found it.
MARK="# written by .ci/slurm-up.sh"
for name in slurm.conf gres.conf; do
  if [ -e "$LAB/etc-saved/$name" ]; then
    cp -p "$LAB/etc-saved/$name" "/etc/slurm/$name" && rm -f "$LAB/etc-saved/$name"
  elif [ -e "/etc/slurm/$name" ] && grep -qxF "$MARK" "/etc/slurm/$name"; then
    rm -f "/etc/slurm/$name"
  fi
done
true
