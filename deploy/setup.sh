#!/usr/bin/env bash
# Sets up a Debian/Ubuntu machine (as root) for flowbridge: Debian packages (bcc, kernel headers,
# the real collectors the tests decode with), then a virtual environment in .venv made from the
# system Python, so that Debian's bcc is importable, with flowbridge installed in it.
#   bash deploy/setup.sh          agent only
#   bash deploy/setup.sh --test   agent + test and benchmark tools
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

agent_pkgs=(python3 python3-venv python3-pip python3-bpfcc bpfcc-tools linux-headers-amd64 iproute2)
test_pkgs=(nfdump pmacct tshark softflowd nginx wrk tcpdump ethtool iputils-ping socat openssl)

missing=()
for p in "${agent_pkgs[@]}" $([ $want_test = 1 ] && echo "${test_pkgs[@]}"); do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    # Ubuntu names the headers metapackage differently.
    if ! apt-cache show linux-headers-amd64 >/dev/null 2>&1; then
        apt-get update -q
    fi
    apt-get update -q
    pkgs=()
    for p in "${missing[@]}"; do
        if [ "$p" = linux-headers-amd64 ] && ! apt-cache show linux-headers-amd64 >/dev/null 2>&1; then
            p=linux-headers-generic
        fi
        pkgs+=("$p")
    done
    apt-get install -y -q --no-install-recommends "${pkgs[@]}"
fi

# Debian's bcc is importable only from the system interpreter.
if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
if [ $want_test = 1 ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,bench]' tox
else
    .venv/bin/python -m pip install -q --disable-pip-version-check -e .
fi
