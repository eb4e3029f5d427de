#!/usr/bin/env bash
# Install edge-agent on a host: a venv under /opt/edge-agent, the systemd units, a
# dedicated user, and example configs in /etc (never overwriting ones that exist).
#
#   sudo scripts/install.sh [--model PATH] [--enable agent|bridge]...
#
# Environment: PREFIX (default /opt/edge-agent), PYTHON (default python3),
# EXTRAS (pip extras, default "bridge"), PIP_ARGS (extra pip arguments),
# DESTDIR (stage into this root: no user, no chown, no systemctl; used by the tests).
set -euo pipefail

PREFIX=${PREFIX:-/opt/edge-agent}
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-bridge}
PIP_ARGS=${PIP_ARGS:-}
DESTDIR=${DESTDIR:-}
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
USER_NAME=edge-agent
MODEL=""
ENABLE=()

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) [[ $# -ge 2 ]] || die "--model needs a path"; MODEL=$2; shift 2 ;;
    --enable) [[ $# -ge 2 ]] || die "--enable needs agent or bridge"; ENABLE+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
for unit in "${ENABLE[@]}"; do [[ $unit == agent || $unit == bridge ]] || die "--enable takes agent or bridge"; done
[[ -n $DESTDIR || $(id -u) -eq 0 ]] || die "run as root (or set DESTDIR to stage)"
[[ -z $MODEL || -f $MODEL ]] || die "model not found: $MODEL"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$PYTHON is older than 3.11"

staged() { [[ -n $DESTDIR ]]; }
ROOT=${DESTDIR%/}

# 1. The user: owns the state and may rewrite its config (set_config); video for /dev/video*.
if ! staged; then
  if ! id -u "$USER_NAME" >/dev/null 2>&1; then
    useradd --system --user-group --home-dir /var/lib/edge-agent --no-create-home \
      --shell /usr/sbin/nologin "$USER_NAME"
    say "created system user $USER_NAME"
  fi
  getent group video >/dev/null && usermod -a -G video "$USER_NAME"
fi

# 2. The venv, rebuilt in place on upgrade (pip replaces the package, keeps the venv).
install -d -m 0755 "$ROOT$PREFIX"
[[ -x $ROOT$PREFIX/venv/bin/python ]] || "$PYTHON" -m venv "$ROOT$PREFIX/venv"
# shellcheck disable=SC2086  # PIP_ARGS is a list of words on purpose
"$ROOT$PREFIX/venv/bin/pip" install --quiet --disable-pip-version-check $PIP_ARGS "$SRC${EXTRAS:+[$EXTRAS]}"
install -m 0644 "$SRC/README.md" "$ROOT$PREFIX/README.md" 2>/dev/null || true
install -d -m 0755 "$ROOT$PREFIX/models"
[[ -z $MODEL ]] || install -m 0644 "$MODEL" "$ROOT$PREFIX/models/$(basename "$MODEL")"

# 3. The units, pointing at this PREFIX.
install -d -m 0755 "$ROOT/etc/systemd/system"
for unit in edge-agent.service edge-bridge.service; do
  sed "s#/opt/edge-agent#$PREFIX#g" "$SRC/systemd/$unit" > "$ROOT/etc/systemd/system/$unit"
  chmod 0644 "$ROOT/etc/systemd/system/$unit"
done

# 4. Configs: examples only where none exist; secrets files readable by root alone.
put_example() {  # src dst mode
  if [[ -e $2 ]]; then say "keeping existing $2"; else install -m "$3" "$1" "$2"; say "installed example $2 (edit it)"; fi
}
install -d -m 0770 "$ROOT/etc/edge-agent"
install -d -m 0755 "$ROOT/etc/edge-bridge"
put_example "$SRC/systemd/agent.yaml.example" "$ROOT/etc/edge-agent/agent.yaml" 0660
put_example "$SRC/systemd/agent.env.example" "$ROOT/etc/edge-agent/agent.env" 0600
put_example "$SRC/systemd/bridge.yaml.example" "$ROOT/etc/edge-bridge/bridge.yaml" 0644
put_example "$SRC/systemd/bridge.env.example" "$ROOT/etc/edge-bridge/bridge.env" 0600

if staged; then
  say "staged into $DESTDIR"
  exit 0
fi
# The agent rewrites agent.yaml atomically (temp file + rename) so it needs the directory.
chown root:"$USER_NAME" /etc/edge-agent /etc/edge-agent/agent.yaml
chown root:root /etc/edge-agent/agent.env /etc/edge-bridge/bridge.env

if command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
  systemctl daemon-reload
  for unit in "${ENABLE[@]}"; do systemctl enable --now "edge-$unit.service"; done
else
  say "systemd is not running here: units installed, not loaded"
fi
say "done. Next: edit /etc/edge-agent/agent.yaml and agent.env, then"
say "  $PREFIX/venv/bin/edge-agent check-config -c /etc/edge-agent/agent.yaml"
say "  systemctl enable --now edge-agent.service"
