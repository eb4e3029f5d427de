#!/usr/bin/env bash
# Install edge-agent on a host for its role: a venv under /opt/edge-agent with that role's
# pip extra, the role's systemd unit, a dedicated user (agent) and example configs in /etc
# (never overwriting ones that exist).
#
#   sudo scripts/install.sh --role agent|bridge|consumer [--role ...] [--model PATH] [--gpu]
#                           [--onnxruntime PACKAGE] [--enable]
#
#   --role agent    camera host: edge-agent[agent], edge-agent.service, /etc/edge-agent
#   --role bridge   central host: edge-agent[bridge], edge-bridge.service, /etc/edge-bridge
#   --role consumer central host: edge-agent[consumer], edge-consumer.service, /etc/edge-consumer
#   --model PATH    copy an ONNX model to $PREFIX/models (agent role)
#   --gpu           let the agent's unit open GPU/NPU device nodes (drop-in gpu.conf)
#   --onnxruntime PACKAGE   the onnxruntime build to run instead of the CPU one, e.g.
#                   onnxruntime-gpu or onnxruntime-openvino; kept for later upgrades
#                   (--onnxruntime onnxruntime goes back; docs/execution-providers.md)
#   --enable        enable and start the installed unit(s) (systemctl enable --now)
#
# Environment: PREFIX (default /opt/edge-agent), PYTHON (default python3), PIP_ARGS (extra
# pip arguments), DESTDIR (stage into this root: no user, no chown, no systemctl; the tests).
set -euo pipefail

PREFIX=${PREFIX:-/opt/edge-agent}
PYTHON=${PYTHON:-python3}
PIP_ARGS=${PIP_ARGS:-}
DESTDIR=${DESTDIR:-}
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
USER_NAME=edge-agent
MODEL=""
GPU=0
ORT_PACKAGE=""
ENABLE=0
ROLES=()

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }
usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --role) [[ $# -ge 2 ]] || die "--role needs agent, bridge or consumer"; ROLES+=("$2"); shift 2 ;;
    --model) [[ $# -ge 2 ]] || die "--model needs a path"; MODEL=$2; shift 2 ;;
    --gpu) GPU=1; shift ;;
    --onnxruntime) [[ $# -ge 2 ]] || die "--onnxruntime needs a package, e.g. onnxruntime-gpu"; ORT_PACKAGE=$2; shift 2 ;;
    --enable) ENABLE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
[[ ${#ROLES[@]} -gt 0 ]] || die "say which host this is: --role agent (camera) or --role bridge / --role consumer (central)"
has_role() { local r; for r in "${ROLES[@]}"; do [[ $r == "$1" ]] && return 0; done; return 1; }
for role in "${ROLES[@]}"; do
  [[ $role == agent || $role == bridge || $role == consumer ]] || die "--role takes agent, bridge or consumer, not $role"
done
[[ -z $MODEL ]] || has_role agent || die "--model is for --role agent (the central roles run no model)"
[[ $GPU -eq 0 && -z $ORT_PACKAGE ]] || has_role agent || die "--gpu and --onnxruntime are for --role agent"
[[ -n $DESTDIR || $(id -u) -eq 0 ]] || die "run as root (or set DESTDIR to stage)"
[[ -z $MODEL || -f $MODEL ]] || die "model not found: $MODEL"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$PYTHON is older than 3.11"

staged() { [[ -n $DESTDIR ]]; }
ROOT=${DESTDIR%/}
EXTRAS=$(IFS=,; echo "${ROLES[*]}")  # the pip extras are named after the roles

# 1. The agent's user: owns the state and may rewrite its config (set_config); video for /dev/video*.
#    The bridge and the consumer run as systemd DynamicUsers and need none.
if ! staged && has_role agent; then
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
say "installing edge-agent[$EXTRAS] into $PREFIX/venv"
# shellcheck disable=SC2086  # PIP_ARGS is a list of words on purpose
"$ROOT$PREFIX/venv/bin/pip" install --quiet --disable-pip-version-check $PIP_ARGS "${SRC}[$EXTRAS]"
# The onnxruntime build chosen once is kept for every later upgrade (the file remembers it).
ORT_CHOICE=$ROOT$PREFIX/onnxruntime-package
ORT_BEFORE=""
if has_role agent && [[ -s $ORT_CHOICE ]]; then ORT_BEFORE=$(<"$ORT_CHOICE"); fi
if has_role agent && [[ -z $ORT_PACKAGE ]]; then ORT_PACKAGE=$ORT_BEFORE; fi
if [[ -n $ORT_PACKAGE ]]; then
  # Every onnxruntime build installs the same `onnxruntime` module, so only one may be there,
  # and the project's requirement puts the CPU build back on each upgrade: remove the CPU build,
  # the build chosen before and the chosen one (its files may be overwritten), then install it.
  say "replacing onnxruntime with $ORT_PACKAGE"
  "$ROOT$PREFIX/venv/bin/pip" uninstall --quiet --yes onnxruntime ${ORT_BEFORE:+"$ORT_BEFORE"} "$ORT_PACKAGE"
  # shellcheck disable=SC2086
  "$ROOT$PREFIX/venv/bin/pip" install --quiet --disable-pip-version-check $PIP_ARGS "$ORT_PACKAGE"
  echo "$ORT_PACKAGE" > "$ORT_CHOICE"
fi
install -m 0644 "$SRC/README.md" "$ROOT$PREFIX/README.md" 2>/dev/null || true
# The README's links (the units' Documentation=) point into docs/.
install -d -m 0755 "$ROOT$PREFIX/docs"
install -m 0644 "$SRC"/docs/*.md "$ROOT$PREFIX/docs/"
if has_role agent; then
  install -d -m 0755 "$ROOT$PREFIX/models"
  [[ -z $MODEL ]] || install -m 0644 "$MODEL" "$ROOT$PREFIX/models/$(basename "$MODEL")"
fi

# 3. The role's unit, pointing at this PREFIX.
unit_of() { echo "edge-$1.service"; }  # edge-agent, edge-bridge, edge-consumer
install -d -m 0755 "$ROOT/etc/systemd/system"
for role in "${ROLES[@]}"; do
  unit=$(unit_of "$role")
  sed "s#/opt/edge-agent#$PREFIX#g" "$SRC/systemd/$unit" > "$ROOT/etc/systemd/system/$unit"
  chmod 0644 "$ROOT/etc/systemd/system/$unit"
done
if [[ $GPU -eq 1 ]]; then  # the unit stays closed to devices; the drop-in opens the GPU's classes
  install -d -m 0755 "$ROOT/etc/systemd/system/edge-agent.service.d"
  install -m 0644 "$SRC/systemd/edge-agent-gpu.conf" "$ROOT/etc/systemd/system/edge-agent.service.d/gpu.conf"
  say "installed /etc/systemd/system/edge-agent.service.d/gpu.conf (GPU/NPU device access)"
fi

# 4. Configs: examples only where none exist; secrets files readable by root alone.
put_example() {  # src dst mode
  if [[ -e $2 ]]; then say "keeping existing $2"; else install -m "$3" "$1" "$2"; say "installed example $2 (edit it)"; fi
}
if has_role agent; then
  install -d -m 0770 "$ROOT/etc/edge-agent"
  put_example "$SRC/examples/agent.yaml" "$ROOT/etc/edge-agent/agent.yaml" 0660
  put_example "$SRC/systemd/agent.env.example" "$ROOT/etc/edge-agent/agent.env" 0600
fi
if has_role bridge; then
  install -d -m 0755 "$ROOT/etc/edge-bridge"
  put_example "$SRC/systemd/bridge.yaml.example" "$ROOT/etc/edge-bridge/bridge.yaml" 0644
  put_example "$SRC/systemd/bridge.env.example" "$ROOT/etc/edge-bridge/bridge.env" 0600
fi
if has_role consumer; then
  install -d -m 0755 "$ROOT/etc/edge-consumer"
  put_example "$SRC/examples/consumer.yaml" "$ROOT/etc/edge-consumer/consumer.yaml" 0644
  put_example "$SRC/systemd/consumer.env.example" "$ROOT/etc/edge-consumer/consumer.env" 0600
fi

if staged; then
  say "staged into $DESTDIR"
  exit 0
fi
if has_role agent; then
  # The agent rewrites agent.yaml atomically (temp file + rename) so it needs the directory.
  chown root:"$USER_NAME" /etc/edge-agent /etc/edge-agent/agent.yaml
  chown root:root /etc/edge-agent/agent.env
fi
if has_role bridge; then chown root:root /etc/edge-bridge/bridge.env; fi
if has_role consumer; then chown root:root /etc/edge-consumer/consumer.env; fi

if command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
  systemctl daemon-reload
  if [[ $ENABLE -eq 1 ]]; then
    for role in "${ROLES[@]}"; do systemctl enable --now "$(unit_of "$role")"; done
  fi
else
  say "systemd is not running here: units installed, not loaded"
fi
for role in "${ROLES[@]}"; do
  dir=/etc/edge-$role
  say "next ($role): edit $dir/$role.yaml and $role.env, then"
  say "  $PREFIX/venv/bin/edge-agent check-config -c $dir/$role.yaml --env-file $dir/$role.env"
  say "  systemctl enable --now $(unit_of "$role")"
done
