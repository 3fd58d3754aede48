#!/usr/bin/env bash
# Bring up a single-node Slurm cluster on this machine that SkyPilot can launch on
# (`--infra slurm/localcluster`). For tests and demos of llm-atc on Slurm.
#
#   sudo bash scripts/slurm-up.sh        # fresh Debian 12: ~1 min; already up: a few seconds
#   .venv/bin/sky launch -y -c tiny --infra slurm/localcluster --cpus 1 ...
#   bash scripts/slurm-down.sh           # stop everything this script started
#
# Run as root on Debian 12 (bookworm). No systemd needed: the daemons are started
# directly, each with a pid file, so slurm-down.sh can stop exactly them.
# Idempotent: running it again only (re)starts what is not running.
#
# SkyPilot is NOT installed here: it comes from the project's venv,
# $LLM_ATC_VENV (default: <repo>/.venv; `pip install -e .` makes it).
#
# Environment:
#   LLM_ATC_VENV        venv with SkyPilot (default: <repo>/.venv)
#   SLURM_CLUSTER_NAME  Host name in ~/.slurm/config = SkyPilot region (default: localcluster)
#   SLURM_PARTITION     partition name (default: debug)
#   SLURM_MAXTIME       partition MaxTime (default: 04:00:00)
#   SLURM_OFFLINE       auto (default: probe https://astral.sh), 1 (force the offline shims), 0 (never)
#   UV_VERSION          uv release used by the offline shim (default: 0.13.9)
#   SKYPILOT_API_SERVER_LOCAL_PORT  honoured by `sky check` (default 46580)
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LLM_ATC_VENV=${LLM_ATC_VENV:-$REPO/.venv}
CLUSTER=${SLURM_CLUSTER_NAME:-localcluster}
PARTITION=${SLURM_PARTITION:-debug}
MAXTIME=${SLURM_MAXTIME:-04:00:00}
SLURM_OFFLINE=${SLURM_OFFLINE:-auto}
UV_VERSION=${UV_VERSION:-0.13.9}
OFFLINE_DIR=/opt/llm-atc-slurm-offline
OFFLINE_PROFILE=/etc/profile.d/00-llm-atc-slurm-offline.sh
LOGIN_KEY=/root/.ssh/llm_atc_slurm_login
PACKAGES=(slurmctld slurmd slurm-client munge openssh-server openssh-client rsync curl ca-certificates python3)
export DEBIAN_FRONTEND=noninteractive
export SKYPILOT_DISABLE_USAGE_COLLECTION=1

T0=$(date +%s.%N); TS=$T0
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
step() {  # step "name": prints the time the previous step took, then the new step's name
  echo "[slurm-up] +$(elapsed "$TS")s (total $(elapsed "$T0")s) -> $1"
  TS=$(date +%s.%N)
}
die() { echo "[slurm-up] ERROR: $*" >&2; exit 1; }
on_err() { local rc=$?; echo "[slurm-up] FAILED (exit $rc) at line $1: $2" >&2; exit "$rc"; }
trap 'on_err $LINENO "$BASH_COMMAND"' ERR

# start_daemon: start CMD unless the process in PIDFILE is alive.
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
start_daemon() {  # start_daemon PIDFILE NAME CMD...
  local pidfile=$1 name=$2; shift 2
  if alive "$pidfile"; then echo "  $name already running (pid $(cat "$pidfile"))"; return; fi
  "$@"
  for _ in $(seq 1 50); do alive "$pidfile" && break; sleep 0.1; done
  alive "$pidfile" || die "$name did not start (no live pid in $pidfile)"
  echo "  started $name (pid $(cat "$pidfile"))"
}
stop_pidfile() {  # used only when a config changed and the daemon must restart
  local pidfile=$1 pid
  alive "$pidfile" || return 0
  pid=$(cat "$pidfile"); kill "$pid"
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  die "pid $pid ($pidfile) did not exit"
}

# --- 0. preconditions ----------------------------------------------------------
step "preconditions"
[ "$(id -u)" -eq 0 ] || die "run as root (it installs packages and starts daemons)"
command -v apt-get >/dev/null || die "apt-get not found: this script targets Debian 12"
[ -x "$LLM_ATC_VENV/bin/sky" ] || die "no SkyPilot in LLM_ATC_VENV=$LLM_ATC_VENV (expected $LLM_ATC_VENV/bin/sky); create the project venv first, e.g. python3 -m venv .venv && .venv/bin/pip install -e ."
[ "${HOME:-}" = /root ] || die "HOME must be /root (SkyPilot reads ~/.slurm/config of the user that runs it), got HOME=${HOME:-unset}"
NODE=$(hostname -s)

# --- 1. packages ---------------------------------------------------------------
# rsync is needed by the SkyPilot client ("`rsync` is required for provisioning").
step "apt packages"
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "  installing: ${missing[*]}"
  apt-get update -q >/dev/null || die "apt-get update failed"
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
else
  echo "  all installed"
fi
getent hosts "$NODE" >/dev/null || echo "127.0.0.1 $NODE" >> /etc/hosts

# --- 2. munge --------------------------------------------------------------------
step "munge"
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
start_daemon /run/munge/munged.pid munged su -s /bin/sh munge -c /usr/sbin/munged
for _ in $(seq 1 30); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
munge -n | unmunge >/dev/null || die "munge does not work (see /var/log/munge/munged.log)"

# --- 3. slurm: slurmctld + slurmd on this host ----------------------------------
step "slurm"
CPUS=$(nproc)
MEM_MB=$(( $(free -m | awk '/^Mem:/{print $2}') * 8 / 10 ))
mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
chown slurm:slurm /var/spool/slurmctld /var/log/slurm /run/slurm
NEW_CONF=$(cat <<EOF
# Written by llm-atc scripts/slurm-up.sh; rewritten on every run.
ClusterName=$CLUSTER
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
MpiDefault=none
# No cgroups: works in containers/VMs without systemd.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=60
KillWait=5
InactiveLimit=0
MinJobAge=60
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
# OverSubscribe=FORCE:4 lets several SkyPilot clusters share the few cores;
# MaxTime makes SkyPilot pass --time (and silences its warning at every launch).
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=$MAXTIME State=UP OverSubscribe=FORCE:4
EOF
)
if [ "$(cat /etc/slurm/slurm.conf 2>/dev/null)" != "$NEW_CONF" ]; then
  echo "  writing /etc/slurm/slurm.conf (CPUs=$CPUS RealMemory=${MEM_MB}M MaxTime=$MAXTIME)"
  printf '%s\n' "$NEW_CONF" > /etc/slurm/slurm.conf
  # A changed node/partition definition needs a restart, not just `scontrol reconfigure`.
  stop_pidfile /run/slurm/slurmd.pid; stop_pidfile /run/slurm/slurmctld.pid
fi
start_daemon /run/slurm/slurmctld.pid slurmctld /usr/sbin/slurmctld
start_daemon /run/slurm/slurmd.pid slurmd /usr/sbin/slurmd
state=
for i in $(seq 1 60); do
  state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1 || true)
  case "$state" in idle*|mixed*|allocated*) break ;; esac
  # A node left DOWN/DRAIN by an earlier unclean stop: put it back into service once.
  [ "$i" = 10 ] && scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true
  sleep 1
done
case "$state" in idle*|mixed*|allocated*) ;; *) die "Slurm node $NODE is '$state', not idle (see /var/log/slurm/)";; esac
sinfo
timeout 60 srun -N1 -t 1 hostname >/dev/null || die "test job 'srun hostname' failed (see /var/log/slurm/)"
echo "  srun OK"

# --- 4. sshd on 127.0.0.1 only, with a dedicated key (SkyPilot's "login node") ---
step "sshd"
mkdir -p /run/sshd /root/.ssh; chmod 700 /root/.ssh
ssh-keygen -A >/dev/null
SSHD_DROPIN=/etc/ssh/sshd_config.d/90-llm-atc-slurm.conf
NEW_SSHD=$(cat <<'EOF'
# Written by llm-atc scripts/slurm-up.sh: loopback only, keys only.
ListenAddress 127.0.0.1
PermitRootLogin prohibit-password
PasswordAuthentication no
# SkyPilot opens many sessions/connections at once.
MaxSessions 100
MaxStartups 100:30:200
EOF
)
SSHD_CHANGED=0
if [ "$(cat "$SSHD_DROPIN" 2>/dev/null)" != "$NEW_SSHD" ]; then
  printf '%s\n' "$NEW_SSHD" > "$SSHD_DROPIN"; SSHD_CHANGED=1
fi
/usr/sbin/sshd -t || die "sshd configuration is invalid (sshd -t)"
[ -f "$LOGIN_KEY" ] || ssh-keygen -t ed25519 -N '' -q -C llm-atc-slurm-login -f "$LOGIN_KEY"
touch /root/.ssh/authorized_keys; chmod 600 /root/.ssh/authorized_keys
grep -qF "$(cat "$LOGIN_KEY.pub")" /root/.ssh/authorized_keys || cat "$LOGIN_KEY.pub" >> /root/.ssh/authorized_keys
if [ "$SSHD_CHANGED" = 1 ]; then stop_pidfile /run/sshd.pid; fi
start_daemon /run/sshd.pid sshd /usr/sbin/sshd

# --- 5. ~/.slurm/config: the Slurm clusters SkyPilot knows (ssh_config syntax) ---
step "/root/.slurm/config"
mkdir -p /root/.slurm
cat > /root/.slurm/config <<EOF
# Written by llm-atc scripts/slurm-up.sh. Each Host is one Slurm cluster (--infra slurm/<Host>).
Host $CLUSTER
  HostName 127.0.0.1
  Port 22
  User root
  IdentityFile $LOGIN_KEY
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
EOF
chmod 600 /root/.slurm/config

# --- 6. OFFLINE SHIMS (only when https://astral.sh is unreachable) ----------------
# SkyPilot sets up its runtime on the node (sky/skylet/constants.py), with
# HOME=~/.sky_clusters/<cluster> (a fresh dir, so nothing can be pre-installed):
#   curl -LsSf https://astral.sh/uv/install.sh | UV_INSTALL_DIR=$HOME/.local/bin sh
#   $HOME/.local/bin/uv venv --seed <runtime dir>/skypilot-runtime --python 3.10
# Without internet beyond PyPI that fails three times: astral.sh does not resolve,
# uv cannot download a Python 3.10 (GitHub) and Debian 12 has none, and a
# TLS-intercepting proxy makes uv fail with "invalid peer certificate: UnknownIssuer".
# Shims (all under $OFFLINE_DIR, enabled by ONE file, $OFFLINE_PROFILE, which puts
# $OFFLINE_DIR/bin first on PATH of login shells; SkyPilot runs `bash --login -c`
# over ssh and srun passes that PATH on to the job):
#   bin/curl       answers only https://astral.sh/uv/install.sh (with uv-install.sh), else /usr/bin/curl
#   uv-install.sh  links $UV_INSTALL_DIR/uv -> $OFFLINE_DIR/uv
#   uv             wrapper: `--python 3.10` -> /usr/bin/python3 (3.11, which SkyPilot
#                  supports), and UV_SYSTEM_CERTS=1 (use the OS CA store)
#   uv-real        the uv binary, from the uv wheel on PyPI
# With internet (astral.sh reachable) the profile file is removed and SkyPilot
# downloads uv and Python itself.
step "offline shims"
if [ "$SLURM_OFFLINE" = auto ]; then
  # /usr/bin/curl, not `curl`: in a login shell of an earlier run, `curl` is the shim itself.
  if /usr/bin/curl -fsS -o /dev/null --connect-timeout 3 --max-time 5 https://astral.sh/uv/install.sh 2>/dev/null; then
    SLURM_OFFLINE=0; echo "  https://astral.sh is reachable: no shims"
  else
    SLURM_OFFLINE=1; echo "  https://astral.sh is unreachable: installing the offline shims"
  fi
fi
if [ "$SLURM_OFFLINE" = 1 ]; then
  mkdir -p "$OFFLINE_DIR/bin"
  if ! "$OFFLINE_DIR/uv-real" -V 2>/dev/null | grep -qx "uv $UV_VERSION.*"; then
    tmp=$(mktemp -d)
    "$LLM_ATC_VENV/bin/python" -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "uv==$UV_VERSION" \
      >"$tmp/pip.log" 2>&1 || { cat "$tmp/pip.log" >&2; die "could not download uv==$UV_VERSION from PyPI"; }
    "$LLM_ATC_VENV/bin/python" - "$tmp" "$OFFLINE_DIR/uv-real" <<'PY'
import glob, shutil, sys, zipfile
whl = glob.glob(sys.argv[1] + "/uv-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith(".data/scripts/uv"))
    with z.open(name) as src, open(sys.argv[2] + ".tmp", "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
    chmod 755 "$OFFLINE_DIR/uv-real.tmp"; mv -f "$OFFLINE_DIR/uv-real.tmp" "$OFFLINE_DIR/uv-real"; rm -rf "$tmp"
  fi
  cat > "$OFFLINE_DIR/uv" <<EOF
#!/bin/bash
# llm-atc offline shim: SkyPilot asks for Python 3.10, which cannot be downloaded here.
args=(); prev=
for a in "\$@"; do
  if [ "\$prev" = "--python" ] && [ "\$a" = "3.10" ]; then a=/usr/bin/python3; fi
  args+=("\$a"); prev=\$a
done
export UV_SYSTEM_CERTS=\${UV_SYSTEM_CERTS:-1}
exec $OFFLINE_DIR/uv-real "\${args[@]}"
EOF
  cat > "$OFFLINE_DIR/uv-install.sh" <<EOF
#!/bin/sh
# llm-atc offline shim for https://astral.sh/uv/install.sh
set -e
d="\${UV_INSTALL_DIR:-\$HOME/.local/bin}"
mkdir -p "\$d"
ln -sf $OFFLINE_DIR/uv "\$d/uv"
EOF
  cat > "$OFFLINE_DIR/bin/curl" <<EOF
#!/bin/bash
# llm-atc offline shim: serve uv's installer locally, pass everything else to /usr/bin/curl.
for a in "\$@"; do
  [ "\$a" = "https://astral.sh/uv/install.sh" ] && exec cat $OFFLINE_DIR/uv-install.sh
done
exec /usr/bin/curl "\$@"
EOF
  chmod 755 "$OFFLINE_DIR/uv" "$OFFLINE_DIR/uv-install.sh" "$OFFLINE_DIR/bin/curl"
  printf '# llm-atc scripts/slurm-up.sh offline shims (delete this file to disable them)\nexport PATH=%s/bin:$PATH\n' \
    "$OFFLINE_DIR" > "$OFFLINE_PROFILE"
  echo "  shims in $OFFLINE_DIR ($("$OFFLINE_DIR/uv-real" -V)), enabled by $OFFLINE_PROFILE"
else
  rm -f "$OFFLINE_PROFILE"
fi
# --- end of OFFLINE SHIMS --------------------------------------------------------

# --- 7. checks: the login node as SkyPilot sees it, then `sky check slurm` -------
step "ssh login check"
out=$(ssh -i "$LOGIN_KEY" -o IdentitiesOnly=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
      -o BatchMode=yes -o ConnectTimeout=10 -o LogLevel=ERROR root@127.0.0.1 \
      'bash --login -c "command -v curl; sinfo -h -o %P:%a"' 2>&1) || die "ssh root@127.0.0.1 with $LOGIN_KEY failed: $out"
echo "$out" | sed 's/^/  /'

step "sky check slurm ($LLM_ATC_VENV)"
log=$(mktemp)
# Output goes to a file: piping sky into grep -q can make it exit 1 or hang.
if ! timeout 300 "$LLM_ATC_VENV/bin/sky" check slurm >"$log" 2>&1; then
  cat "$log" >&2; die "sky check slurm failed"
fi
sed -i 's/\x1b\[[0-9;]*m//g' "$log"   # strip colours
grep -m2 -E "Slurm: |$CLUSTER: " "$log" | sed 's/^ */  /'
grep -q "$CLUSTER: enabled" "$log" || { cat "$log" >&2; rm -f "$log"; die "sky check: Slurm cluster '$CLUSTER' is not enabled"; }
rm -f "$log"
step "done"
echo "[slurm-up] OK: launch with  $LLM_ATC_VENV/bin/sky launch --infra slurm/$CLUSTER --cpus 1 ...  (total $(elapsed "$T0")s)"
