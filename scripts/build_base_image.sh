#!/usr/bin/env bash
# Build a Debian bookworm base image for docker/Dockerfile from Debian's own packages, for a
# machine that can reach a package index but no image registry (the container test's case):
#
#   scripts/build_base_image.sh [TAG]        (default TAG: localhost/qlorax-base:bookworm)
#
# mmdebstrap writes a minimal root filesystem (python3, venv, pip, CA certificates) and
# `podman import` turns it into an image. The image's /etc/pip.conf points pip at this host's
# CA bundle (copied in, so a TLS-inspecting proxy keeps working), at /opt/wheels as find-links
# (mounted read-only with `podman build -v /opt/wheels:/opt/wheels:ro` when the host has it),
# and allows installing into the system interpreter (Debian marks it externally managed).
# An existing image with the same tag is kept unless QLORAX_REBUILD_BASE=1.
set -euo pipefail

tag="${1:-localhost/qlorax-base:bookworm}"
suite="${QLORAX_BASE_SUITE:-bookworm}"

if [ "${QLORAX_REBUILD_BASE:-0}" != 1 ] && podman image exists "$tag"; then
    echo "base image $tag exists (QLORAX_REBUILD_BASE=1 rebuilds it)"
    exit 0
fi

for tool in mmdebstrap podman; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "error: $tool is not installed (scripts/container_test_setup.sh installs it)" >&2
        exit 2
    fi
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
ca_bundle=/etc/ssl/certs/ca-certificates.crt
[ -r "$ca_bundle" ] || { echo "error: no CA bundle at $ca_bundle" >&2; exit 2; }
cp "$ca_bundle" "$work/host-ca.crt"
cat > "$work/pip.conf" <<'PIPCONF'
[global]
cert = /usr/local/share/ca-certificates-host/host-ca.crt
find-links = /opt/wheels
break-system-packages = true
disable-pip-version-check = true
PIPCONF

start=$(date +%s)
mmdebstrap --quiet --variant=minbase \
    --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
    --customize-hook="mkdir -p \"\$1/usr/local/share/ca-certificates-host\" \"\$1/opt/wheels\"" \
    --customize-hook="copy-in $work/host-ca.crt /usr/local/share/ca-certificates-host" \
    --customize-hook="copy-in $work/pip.conf /etc" \
    --customize-hook="chmod 0644 \"\$1/etc/pip.conf\" \"\$1/usr/local/share/ca-certificates-host/host-ca.crt\"" \
    "$suite" "$work/rootfs.tar"
podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    "$work/rootfs.tar" "$tag" >/dev/null
echo "base image $tag built in $(( $(date +%s) - start ))s"
