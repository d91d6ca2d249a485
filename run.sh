#!/usr/bin/env bash
# luoagent developer entry point: installs what it needs, then runs the demo or the tests.
#   ./run.sh demo    build the lab if needed and live-update its kernel under a running VM
#   ./run.sh test    run every test tier (unit, host, lab); fails loudly if the lab cannot run
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
VENV=${LUOAGENT_VENV:-$ROOT/.venv}

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

install_system_packages() {
    # Everything the lab build and the tests need from Debian; skipped when already present.
    local pkgs=(gcc make flex bison bc libelf-dev libssl-dev cpio debootstrap e2fsprogs xz-utils
                binutils python3-venv dpkg-dev)
    local missing=()
    for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    if ((${#missing[@]})); then
        say "installing Debian packages: ${missing[*]}"
        if [[ $(id -u) != 0 ]]; then echo "run.sh: need root to apt-get install ${missing[*]}" >&2; exit 1; fi
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

install_python() {
    if [[ ! -x $VENV/bin/python ]]; then
        say "creating virtualenv $VENV"
        python3 -m venv "$VENV"
    fi
    say "installing luoagent into $VENV"
    "$VENV/bin/pip" install -q --upgrade pip >/dev/null
    "$VENV/bin/pip" install -q -e "$ROOT[test]"
}

case "${1:-}" in
    demo)
        shift; install_system_packages; install_python
        exec "$VENV/bin/luoagent" lab demo "$@"
        ;;
    test)
        shift; install_system_packages; install_python
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    *)
        echo "usage: ./run.sh demo | ./run.sh test [pytest args]" >&2; exit 2
        ;;
esac
