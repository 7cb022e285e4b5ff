#!/usr/bin/env bash
# One-time host set-up shared by `make run` and `make test` on Debian 12:
# installs the Debian packages netswap needs (only those missing), then builds
# the venv from Debian's /usr/bin/python3 -- the interpreter nbdkit's Python
# plugin embeds -- with --system-site-packages so python3-libnbd is importable.
set -euo pipefail

VENV=${VENV:-.venv}
EXTRA_APT=${EXTRA_APT:-}
APT_PACKAGES="nbdkit nbdkit-plugin-python nbd-client python3-libnbd libnbd-bin python3-venv
  python3-dev fio qemu-utils procps iproute2 qemu-system-x86 busybox-static cpio gcc libc6-dev
  chromium fonts-dejavu-core docker-compose kmod redis-server redis-tools
  podman runc debootstrap golang-github-containernetworking-plugin-dnsname dnsmasq-base
  $EXTRA_APT"

missing=()
for pkg in $APT_PACKAGES; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "setup: missing Debian packages: ${missing[*]} (run as root, or apt-get install them)" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

stamp="$VENV/.netswap-installed"
if [[ ! -x "$VENV/bin/python" ]]; then
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev]"
  touch "$stamp"
fi
# The hot modules, compiled with mypyc beside their source (deploy/compile.py says which
# and why); rebuilt only when a source changed. Without them the same code runs pure.
"$VENV/bin/python" deploy/compile.py
