#!/usr/bin/env bash
# Install the real services and tools the tests run against (Debian packages):
#   prometheus              -> /usr/bin/prometheus, /usr/bin/promtool
#   prometheus-pushgateway  -> /usr/bin/prometheus-pushgateway
#   qemu-user               -> /usr/bin/qemu-x86_64 (emulated processors: qlorax probe, verify --cpu)
#   chromium                -> /usr/bin/chromium (headless: renders `qlorax report --html` pages)
#   gdb, binutils           -> /usr/bin/gdb, /usr/bin/nm (scripts/vml_kernels.py: the VML calls of a step)
# Idempotent: does nothing when all seven binaries are on PATH. Never leaves a service
# running or enabled: the tests start their own instances on free loopback ports.
# Exit status: 0 when the binaries are available afterwards, 1 otherwise.
set -euo pipefail

export PATH="$PATH:/usr/sbin:/usr/bin:/sbin:/bin"

missing() {
    local name
    for name in prometheus prometheus-pushgateway promtool qemu-x86_64 chromium gdb nm; do
        command -v "$name" >/dev/null 2>&1 || { echo "$name"; }
    done
}

if [ -z "$(missing)" ]; then
    exit 0
fi

echo "install_test_services: missing: $(missing | tr '\n' ' ')" >&2

if [ "$(id -u)" -ne 0 ]; then
    echo "install_test_services: not root; install them with:" >&2
    echo "  sudo apt-get install -y --no-install-recommends prometheus prometheus-pushgateway qemu-user chromium gdb binutils" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_test_services: apt-get not found; install prometheus, promtool, pushgateway, qemu-user" \
        "(qemu-x86_64), chromium, gdb and binutils by hand" >&2
    exit 1
fi

# Keep the packages' maintainer scripts from starting their services: invoke-rc.d and
# deb-systemd-invoke both honour policy-rc.d (exit 101 = action forbidden). Restore any
# policy-rc.d that was there before, whatever happens.
POLICY=/usr/sbin/policy-rc.d
BACKUP=""
if [ -e "$POLICY" ]; then
    BACKUP="$(mktemp /usr/sbin/.policy-rc.d.qlorax.XXXXXX)"
    cp -p "$POLICY" "$BACKUP"
fi
restore_policy() {
    if [ -n "$BACKUP" ]; then
        mv -f "$BACKUP" "$POLICY"
    else
        rm -f "$POLICY"
    fi
}
trap restore_policy EXIT
printf '#!/bin/sh\nexit 101\n' > "$POLICY"
chmod 0755 "$POLICY"

export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends prometheus prometheus-pushgateway qemu-user chromium gdb binutils

# The maintainer scripts enabled the units for the next boot even though policy-rc.d kept
# them from starting now: disable them (works with or without a running systemd), and on
# a live systemd host also stop them in case something started them anyway.
for unit in prometheus.service prometheus-pushgateway.service; do
    if command -v systemctl >/dev/null 2>&1; then
        # `disable` edits the unit symlinks (and the SysV links) without a running systemd.
        systemctl disable "$unit" >/dev/null 2>&1 || true
        if [ -d /run/systemd/system ]; then
            systemctl stop "$unit" >/dev/null 2>&1 || true
        fi
    elif command -v update-rc.d >/dev/null 2>&1; then
        update-rc.d "${unit%.service}" disable >/dev/null 2>&1 || true
    fi
done

if [ -n "$(missing)" ]; then
    echo "install_test_services: still missing after install: $(missing | tr '\n' ' ')" >&2
    exit 1
fi
echo "install_test_services: installed $(dpkg-query -W -f='${Package} ${Version}, ' prometheus prometheus-pushgateway qemu-user chromium gdb binutils)" >&2
