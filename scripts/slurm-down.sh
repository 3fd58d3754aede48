#!/usr/bin/env bash
# Undo scripts/slurm-up.sh: tear down every SkyPilot cluster, stop the local API
# server, close SkyPilot's ssh ControlMaster connections, then stop the daemons
# slurm-up.sh started, by their pid files (never by process name).
# Packages, configs, keys and the offline shims stay on disk, so slurm-up.sh is
# fast the next time. Safe to run twice, and when nothing is running.
#
#   bash scripts/slurm-down.sh
#
# Environment: LLM_ATC_VENV (default <repo>/.venv), SKYPILOT_API_SERVER_LOCAL_PORT
# (the API server to stop; default 46580), SKY_DOWN_TIMEOUT (default 300 s).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LLM_ATC_VENV=${LLM_ATC_VENV:-$REPO/.venv}
SKY_DOWN_TIMEOUT=${SKY_DOWN_TIMEOUT:-300}
export SKYPILOT_DISABLE_USAGE_COLLECTION=1
T0=$(date +%s.%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
log() { echo "[slurm-down] +$(elapsed)s $*"; }
rc=0
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# 1. SkyPilot clusters, then the API server. `sky down -a` needs slurmctld and
# sshd, so it runs before the daemons stop. Skipped when no API server runs and
# SkyPilot's state lists no cluster (`sky down` would start a server, ~30 s, for nothing).
port=${SKYPILOT_API_SERVER_LOCAL_PORT:-46580}
n_clusters() {  # clusters in SkyPilot's local state, or "?" when unreadable
  "$LLM_ATC_VENV/bin/python" - <<'PY' 2>/dev/null || echo "?"
import os, sqlite3
db = os.path.expanduser("~/.sky/state.db")
print(sqlite3.connect(f"file:{db}?mode=ro", uri=True).execute("select count(*) from clusters").fetchone()[0] if os.path.exists(db) else 0)
PY
}
if [ ! -x "$LLM_ATC_VENV/bin/sky" ]; then
  log "no $LLM_ATC_VENV/bin/sky: skipping sky down / sky api stop"
elif ! curl -fsS -o /dev/null --max-time 3 "http://127.0.0.1:$port/api/health" 2>/dev/null && [ "$(n_clusters)" = 0 ]; then
  log "no API server on :$port and no SkyPilot cluster: skipping sky down / sky api stop"
else
  log "sky down -a -y (API server :$port, timeout ${SKY_DOWN_TIMEOUT}s)"
  timeout "$SKY_DOWN_TIMEOUT" "$LLM_ATC_VENV/bin/sky" down -a -y || { log "WARNING: sky down -a failed or timed out"; rc=1; }
  log "sky api stop"
  timeout 60 "$LLM_ATC_VENV/bin/sky" api stop || { log "WARNING: sky api stop failed"; rc=1; }
fi

# 2. SkyPilot's ssh ControlMaster processes (ControlPersist 300 s, or 1 day after
# `ssh <cluster>`) outlive the API server; close each through its socket.
while IFS= read -r s; do
  ssh -S "$s" -O exit localhost >/dev/null 2>&1 && log "closed ssh master $s"
done < <(find /tmp -maxdepth 3 -path '/tmp/sky_ssh_*' -type s 2>/dev/null)

# 3. Slurm jobs left behind (e.g. a cluster whose `sky down` failed): report them,
# cancel them only while slurmctld still runs.
if alive /run/slurm/slurmctld.pid && command -v squeue >/dev/null; then
  mapfile -t jobs < <(squeue -h -o %i 2>/dev/null)
  if [ ${#jobs[@]} -gt 0 ]; then
    log "cancelling leftover Slurm jobs: ${jobs[*]}"
    scancel "${jobs[@]}" || rc=1
    for _ in $(seq 1 30); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 1; done
  fi
fi

# 4. The daemons slurm-up.sh started, by pid file.
for f in /run/slurm/slurmd.pid /run/slurm/slurmctld.pid /run/sshd.pid /run/munge/munged.pid; do
  if alive "$f"; then
    pid=$(cat "$f"); kill "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then log "WARNING: pid $pid ($f) still running"; rc=1
    else log "stopped $(basename "$f" .pid) (pid $pid)"; fi
  fi
done
log "done (exit $rc)"
exit $rc
