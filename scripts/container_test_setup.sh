#!/usr/bin/env bash
# Prepare this machine for the live container test (tests/test_container.py, `make container-test`)
# and build the image, the way docs/container.md describes:
#
#   scripts/container_test_setup.sh [IMAGE_TAG]     (default: localhost/qlorax:test)
#
# 1. podman, runc and mmdebstrap from Debian's packages (apt-get, only when missing);
# 2. the base image from Debian's packages (scripts/build_base_image.sh; kept once built);
# 3. docker/Dockerfile built with only --build-arg BASE_IMAGE changed, reusing the layer cache.
#
# podman runs with --runtime runc and CONTAINERS_CONF=docker/containers.conf (hybrid cgroups).
# Needs root: rootful podman and apt-get. Prints "image-id <id>" and the build time last.
set -euo pipefail
cd "$(dirname "$0")/.."

tag="${1:-localhost/qlorax:test}"
base="${QLORAX_BASE_IMAGE:-localhost/qlorax-base:bookworm}"

if [ "$(id -u)" != 0 ]; then
    echo "error: the container test needs root (rootful podman, apt-get); uid is $(id -u)" >&2
    exit 2
fi

missing=()
for tool in podman runc mmdebstrap; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends podman runc mmdebstrap >/dev/null
fi
for tool in podman runc mmdebstrap; do
    command -v "$tool" >/dev/null 2>&1 || { echo "error: $tool is still missing after apt-get" >&2; exit 2; }
done

export CONTAINERS_CONF="$PWD/docker/containers.conf"
bash scripts/build_base_image.sh "$base"

# The host's wheel directory (pip's find-links here), mounted read-only into the build.
volumes=()
if [ -d /opt/wheels ]; then
    volumes+=(--volume /opt/wheels:/opt/wheels:ro)
fi
start=$(date +%s)
podman build --runtime runc --network=host --format docker "${volumes[@]}" \
    --build-arg BASE_IMAGE="$base" \
    --file docker/Dockerfile --tag "$tag" . >&2
echo "build-seconds $(( $(date +%s) - start ))"
echo "image-id $(podman image inspect --format '{{.Id}}' "$tag")"
