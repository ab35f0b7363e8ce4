#!/usr/bin/env bash
# Install Prometheus and promtool from the Debian package, for tests and local development.
#
#   deploy/prometheus/install.sh     install if missing (idempotent); print both binaries' paths
#
# Needs root (or password-less sudo) and apt. The package ships a system service; it is kept
# from starting (policy-rc.d) and disabled under systemd, because tests start their own
# Prometheus on loopback with a throw-away configuration. Cost on a fresh machine: one
# `apt-get update` plus a ~19 MB download and ~100 MB installed.
set -euo pipefail

print_paths() {
    echo "prometheus=$(command -v prometheus)"
    echo "promtool=$(command -v promtool)"
}

if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
    print_paths
    exit 0
fi

if [[ $EUID -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "install.sh: run as root (apt-get install)" >&2; exit 1; }
    exec sudo -n -- "$0" "$@"
fi
command -v apt-get >/dev/null || { echo "install.sh: needs apt-get (Debian/Ubuntu)" >&2; exit 1; }

# Keep the package's service from starting: policy-rc.d exit 101 vetoes invoke-rc.d and
# deb-systemd-invoke. An existing policy is left as it is.
guard=/usr/sbin/policy-rc.d
placed_guard=0
if [[ ! -e $guard ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$guard"
    chmod 755 "$guard"
    placed_guard=1
fi
cleanup() { if [[ $placed_guard -eq 1 ]]; then rm -f "$guard"; fi; }
trap cleanup EXIT

apt_opts=(-o DPkg::Lock::Timeout=300 -q)
apt-get "${apt_opts[@]}" update >&2
DEBIAN_FRONTEND=noninteractive apt-get "${apt_opts[@]}" install -y --no-install-recommends \
    prometheus >&2

# Under systemd the package also enables the unit for the next boot: undo that.
if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
    systemctl disable --now prometheus.service >&2 ||
        echo "install.sh: could not disable prometheus.service" >&2
fi
print_paths
